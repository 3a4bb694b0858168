// phi = linear / mlp (SPEC.md "Compression branch"): one small GEMM per KV head,
//   C[g][m][n] = act( sum_k A(g, m, k) * W[g][k][n] + bias[g][n] ),
// where row m is compressed token m of the batch and A is either
//   gather: the flattened block plus the position encoding, A(g, m, r*D + c) =
//           x[src(m) + r, g, c] + pe[g, r, c]  (read straight from the raw K or V, never stored), or
//   dense:  a hidden activation hin[g][m][k] (the MLP's second layer).
// act = 1 applies SiLU. The result goes to a f32 hidden buffer [HKV][M][N] or, as bf16, to the
// compressed K/V at [dst(m), g, :]. A row with dst(m) = items[m].y < 0 is skipped (never written;
// the decode cache launches over every sequence of a step and marks those that completed no
// block this way), and a CTA whose rows are all skipped returns at once (the forward's rows all
// have dst >= 0). Plain f32 FMA tiles (64 x 64 per CTA, 4 x 4 per thread): this is a few GFLOP
// next to the attention, so simplicity wins here.

#define GT_M 64
#define GT_N 64
#define GT_K 16

extern "C" __global__ void __launch_bounds__(256) phi_gemm(
    const bf16_t* __restrict__ x, const float* __restrict__ pe, const float* __restrict__ hin,
    const int2* __restrict__ items, int M, int N, int Kd, int D, int gather,
    const float* __restrict__ W, const float* __restrict__ bias, int act, float* __restrict__ out_f32,
    bf16_t* __restrict__ out_bf16) {
    __shared__ float As[GT_K][GT_M + 4];
    __shared__ float Bs[GT_K][GT_N + 4];
    const int g = blockIdx.z, m0 = blockIdx.y * GT_M, n0 = blockIdx.x * GT_N;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const float* Wg = W + (i64)g * Kd * N;
    const int l = Kd / D;
    {
        int live = 0;
        for (int m = m0 + tid; m < min(M, m0 + GT_M); m += 256) live |= items[m].y >= 0;
        if (!__syncthreads_or(live)) return;
    }
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < Kd; k0 += GT_K) {
        for (int e = tid; e < GT_M * GT_K; e += 256) {
            const int mm = e / GT_K, kk = e % GT_K, m = m0 + mm, k = k0 + kk;
            float v = 0.f;
            if (m < M && k < Kd) {
                if (gather) {
                    const int r = k / D, c = k % D;
                    const int src = items[m].x;
                    v = bf16_to_f32(x[((i64)(src + r) * HKV + g) * D + c]) + pe[((i64)g * l + r) * D + c];
                } else {
                    v = hin[((i64)g * M + m) * Kd + k];
                }
            }
            As[kk][mm] = v;
        }
        for (int e = tid; e < GT_K * GT_N; e += 256) {
            const int kk = e / GT_N, nn = e % GT_N, k = k0 + kk, n = n0 + nn;
            Bs[kk][nn] = (k < Kd && n < N) ? Wg[(i64)k * N + n] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GT_K; ++kk) {
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
        if (m >= M || items[m].y < 0) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx * 4 + j;
            if (n >= N) continue;
            float v = acc[i][j] + (bias != nullptr ? bias[(i64)g * N + n] : 0.f);
            if (act) v = v / (1.f + __expf(-v));
            if (out_bf16 != nullptr)
                out_bf16[((i64)items[m].y * HKV + g) * N + n] = f32_to_bf16(v);
            else
                out_f32[((i64)g * M + m) * N + n] = v;
        }
    }
}
