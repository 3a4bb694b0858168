// Backward of phi = linear / mlp (SPEC.md "Compression branch"; forward in phi.cu), per KV head g,
// for K (D = dk) or V (D = dv). With M compressed tokens, Kd = l*D, the flattened block plus the
// position encoding Z[m][k] = x[src(m) + k / D, g, k % D] + pe[g][k] (gathered from the raw K or V,
// never stored) and dC = dKcmp or dVcmp ([M, HKV, D] f32, from cmp_bwd_dkdv):
//   linear  C = Z W:                 dW = Z^T dC,  dZ = dC W^T
//   mlp     A = Z W1 + b1 (recomputed), C = silu(A) W2 + b2:
//           db2 = colsum(dC), dW2 = silu(A)^T dC, dA = (dC W2^T) * silu'(A),
//           db1 = colsum(dA), dW1 = Z^T dA,      dZ = dA W1^T
//   both    dpe = colsum(dZ); dx[s] = sum over the blocks i that hold raw token s of
//           dZ[i][(s - i*d)*D + c] (ascending i).
// Every sum runs in a fixed order inside one thread (no atomics, no split reductions): the
// gradients are bitwise repeatable.
//
// phi_bwd_gemm   C[g](m, n) = sum_k A_g(m, k) B_g(k, n) (+ bias[g][n]) (* silu'(pre[g](m, n)))
//                with A one of: dense strided (a_mode 0), Z (1), Z^T (2), silu(dense) (3), and B
//                dense strided. f32 FMA tiles of 64 x 64 (4 x 4 per thread), as phi_gemm.
// phi_bwd_colsum out[g][c] = sum_m a[g*sg + m*sm + c], one thread per (g, column).
// phi_bwd_scatter dx from dZ, one thread per (raw token, KV head, element).

#define PB_M 64
#define PB_N 64
#define PB_K 16

__device__ __forceinline__ float pb_sigmoid(float a) { return 1.f / (1.f + expf(-a)); }

extern "C" __global__ void __launch_bounds__(256) phi_bwd_gemm(
    int M, int N, int K,
    int a_mode, const float* __restrict__ A, i64 a_sg, i64 a_sm, i64 a_sk,
    const float* __restrict__ B, i64 b_sg, i64 b_sk, i64 b_sn,
    const bf16_t* __restrict__ x, const float* __restrict__ pe, const int2* __restrict__ items, int D,
    const float* __restrict__ bias, const float* __restrict__ pre, float* __restrict__ C, i64 c_sg,
    i64 c_sm) {
    __shared__ float As[PB_K][PB_M + 4];
    __shared__ float Bs[PB_K][PB_N + 4];
    const int g = blockIdx.z, m0 = blockIdx.y * PB_M, n0 = blockIdx.x * PB_N;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int Kd = CMP_L * D;
    // which index varies fastest across threads when loading (coalescing)
    const bool a_row_fast = a_mode == 2 || ((a_mode == 0 || a_mode == 3) && a_sm == 1);
    const bool b_col_fast = b_sn == 1;
    // Z[m][k] of head g
    auto zval = [&](int m, int k) -> float {
        const int r = k / D, c = k % D;
        return bf16_to_f32(x[((i64)(items[m].x + r) * HKV + g) * D + c]) + pe[(i64)g * Kd + k];
    };
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < K; k0 += PB_K) {
        for (int e = tid; e < PB_M * PB_K; e += 256) {
            const int mm = a_row_fast ? e % PB_M : e / PB_K;
            const int kk = a_row_fast ? e / PB_M : e % PB_K;
            const int m = m0 + mm, k = k0 + kk;
            float v = 0.f;
            if (m < M && k < K) {
                if (a_mode == 1) {
                    v = zval(m, k);
                } else if (a_mode == 2) {
                    v = zval(k, m);
                } else {
                    v = A[(i64)g * a_sg + (i64)m * a_sm + (i64)k * a_sk];
                    if (a_mode == 3) v = v * pb_sigmoid(v);
                }
            }
            As[kk][mm] = v;
        }
        for (int e = tid; e < PB_K * PB_N; e += 256) {
            const int nn = b_col_fast ? e % PB_N : e / PB_K;
            const int kk = b_col_fast ? e / PB_N : e % PB_K;
            const int k = k0 + kk, n = n0 + nn;
            Bs[kk][nn] = (k < K && n < N) ? B[(i64)g * b_sg + (i64)k * b_sk + (i64)n * b_sn] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < PB_K; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty * 4 + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx * 4 + j;
            if (n >= N) continue;
            const i64 at = (i64)g * c_sg + (i64)m * c_sm + n;
            float v = acc[i][j] + (bias != nullptr ? bias[(i64)g * N + n] : 0.f);
            if (pre != nullptr) {
                // d silu(a) / da = s + a s (1 - s)
                const float a = pre[at], s = pb_sigmoid(a);
                v *= s + a * s * (1.f - s);
            }
            C[at] = v;
        }
    }
}

extern "C" __global__ void phi_bwd_colsum(const float* __restrict__ a, i64 sg, i64 sm, int rows, int cols,
                                          float* __restrict__ out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, g = blockIdx.y;
    if (c >= cols) return;
    const float* p = a + (i64)g * sg + c;
    float acc = 0.f;
    for (int m = 0; m < rows; ++m) acc += p[(i64)m * sm];
    out[(i64)g * cols + c] = acc;
}

// seqs: (start, len, first compressed token, first selection block) per sequence.
__device__ __forceinline__ int pb_seq_of(const int4* __restrict__ seqs, int nseq, int tok) {
    int lo = 0, hi = nseq - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (seqs[mid].x <= tok) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// dz: [HKV][M][CMP_L * D]; dx: [ntok, HKV, D] (every element written, 0 outside any block).
extern "C" __global__ void phi_bwd_scatter(const float* __restrict__ dz, const int4* __restrict__ seqs, int nseq,
                                           int ntok, int M, int D, float* __restrict__ dx) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)ntok * HKV * D) return;
    const int c = (int)(idx % D);
    const i64 rest = idx / D;
    const int g = (int)(rest % HKV);
    const int tok = (int)(rest / HKV);
    const int4 sq = seqs[pb_seq_of(seqs, nseq, tok)];
    const int s = tok - sq.x;
    const int ncmp = sq.y >= CMP_L ? (sq.y - CMP_L) / CMP_D + 1 : 0;
    const int ilo = s >= CMP_L ? (s - CMP_L + CMP_D) / CMP_D : 0;   // ceil((s - l + 1) / d)
    const int ihi = min(ncmp - 1, s / CMP_D);
    const i64 Kd = (i64)CMP_L * D;
    float acc = 0.f;
    for (int i = ilo; i <= ihi; ++i)
        acc += dz[((i64)g * M + sq.z + i) * Kd + (i64)(s - i * CMP_D) * D + c];
    dx[idx] = acc;
}
