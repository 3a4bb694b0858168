// Compression branch and block selection, fused (SPEC.md "Compression branch", "Selection branch").
//
// One CTA = one KV group g and P_CMP consecutive query positions of one sequence: its 64 rows are
// the G query heads of each position (row r -> position t0 + r / G, head g*G + r % G), so all rows
// share the compressed keys of group g and the G heads of a position sit in the same CTA (the group
// sum of Eq. 10 never leaves shared memory).
//
// Pass 1: flash attention over the visible compressed blocks -> o_cmp (written as g_cmp * o_cmp,
//         the first term of the gated sum) and the log-sum-exp of each row.
// Pass 2: the same Q Kcmp^T again; p_cmp = exp2(s - lse) goes to shared memory one 64-block tile
//         at a time, is folded into selection-block scores with the overlap weights of Eq. 9
//         (|[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d, any l, d, l'), summed over the group's heads, and
//         each selection block, once no later tile can touch it, is merged into a running top-n per
//         position (a warp-wide bitonic sort/merge). Forced blocks enter with +inf, inadmissible
//         ones never. Ties go to the lower block index. Nothing of size [T, T/d] is ever stored.

#define P_CMP (64 / G)          // positions per CTA
#define RING 128                // score slots per position (selection blocks j live at j % RING)
#define TOPW 32                 // width of the running top list (NSEL <= 32)
#define PS_STRIDE (KT + 4)
#define INT_MAX_ 0x7fffffff

__device__ __forceinline__ int cmp_visible(int t) { return t + 1 >= CMP_L ? (t + 1 - CMP_L) / CMP_D + 1 : 0; }

// overlap of compressed block i with selection block j, in units of d (Eq. 9)
__device__ __forceinline__ float overlap_w(int i, int j) {
    const int a0 = i * CMP_D, a1 = a0 + CMP_L, b0 = j * SEL_L, b1 = b0 + SEL_L;
    const int lo = max(a0, b0), hi = min(a1, b1);
    return hi > lo ? (float)((hi - lo) / CMP_D) : 0.f;
}

// (v, i) ranks before (w, k): higher score first, then lower block index.
__device__ __forceinline__ bool better(float v, int i, float w, int k) {
    return v > w || (v == w && i < k);
}

// Bitonic stage step within the warp: lanes `lane` and `lane ^ j` compare; `up` says the pair is
// ordered best-first.
__device__ __forceinline__ void bitonic_step(float& v, int& i, int j, bool up) {
    const int lane = threadIdx.x & 31;
    const float ov = __shfl_xor_sync(0xffffffff, v, j);
    const int oi = __shfl_xor_sync(0xffffffff, i, j);
    const bool lower = (lane & j) == 0;
    const bool take = (lower == up) ? better(ov, oi, v, i) : better(v, i, ov, oi);
    if (take) {
        v = ov;
        i = oi;
    }
}

// Sorts the warp's 32 (v, i) pairs best-first (lane 0 best).
__device__ __forceinline__ void warp_sort_desc(float& v, int& i) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 2; k <= 32; k <<= 1)
#pragma unroll
        for (int j = k >> 1; j > 0; j >>= 1) bitonic_step(v, i, j, (lane & k) == 0);
}

// Sorts the warp's 32 ints ascending.
__device__ __forceinline__ int warp_sort_asc_int(int x) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 2; k <= 32; k <<= 1)
#pragma unroll
        for (int j = k >> 1; j > 0; j >>= 1) {
            const int o = __shfl_xor_sync(0xffffffff, x, j);
            const bool lower = (lane & j) == 0, up = (lane & k) == 0;
            x = (lower == up) ? min(x, o) : max(x, o);
        }
    return x;
}

extern "C" __global__ void __launch_bounds__(128) cmp_attn_topn(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    const float* __restrict__ gate, const int4* __restrict__ items, float* __restrict__ out,
    int* __restrict__ sel_idx) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Qs = (bf16_t*)smem;
    bf16_t* Ks = Qs + 64 * QS_STRIDE;
    bf16_t* Vs = Ks + KT * KS_STRIDE;
    float* Ps = (float*)(Vs + KT * VS_STRIDE);
    float* score = Ps + 64 * PS_STRIDE;
    float* topv = score + P_CMP * RING;
    int* topi = (int*)(topv + P_CMP * TOPW);

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z, cstart = it.w;
    const int g = blockIdx.y;
    const int npos = min(P_CMP, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int ncmp = cmp_visible(tmax);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    const int row0 = warp * 16;

    load_rows_async<64, DK, QS_STRIDE, 128>(Qs, q, nrows, [&](int r) {
        return ((i64)(start + t0 + r / G) * HQ + g * G + r % G) * DK;
    });
    cp_async_commit();

    int rr[2], tt[2], vis[2];
    bool valid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        rr[h] = row0 + gr + 8 * h;
        valid[h] = rr[h] < nrows;
        tt[h] = t0 + rr[h] / G;
        vis[h] = valid[h] ? cmp_visible(tt[h]) : 0;
    }
    auto krow = [&](int r) { return ((i64)(cstart + r) * HKV + g) * DK; };
    auto vrow = [&](int r) { return ((i64)(cstart + r) * HKV + g) * DV; };

    // ---- pass 1: attention over the compressed tokens ----
    RowStats st;
    rowstats_init(st);
    float o[DV / 8][4];
#pragma unroll
    for (int nt = 0; nt < DV / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
    for (int c0 = 0; c0 < ncmp; c0 += KT) {
        const int nk = min(KT, ncmp - c0);
        __syncthreads();
        load_rows_async<KT, DK, KS_STRIDE, 128>(Ks, kc + krow(c0) , nk, [&](int r) { return (i64)r * HKV * DK; });
        load_rows_async<KT, DV, VS_STRIDE, 128>(Vs, vc + vrow(c0), nk, [&](int r) { return (i64)r * HKV * DV; });
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
        int lo[2] = {0, 0}, hi[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) hi[h] = min(max(vis[h] - c0, 0), nk);
        attn_tile(Qs, Ks, Vs, row0, lo, hi, st, o);
    }
    cp_async_wait_all();
    float inv[2];
    rowstats_finish(st, inv);
    float lse[2];
    {
        float* dst[2];
        float sc[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            lse[h] = st.l[h] > 0.f ? st.m[h] + log2f(st.l[h]) : POS_INF;
            const i64 qrow = (i64)(start + tt[h]) * HQ + g * G + rr[h] % G;
            dst[h] = valid[h] ? out + qrow * DV : nullptr;
            sc[h] = valid[h] ? gate[qrow] * inv[h] : 0.f;
        }
        store_rows<false>(dst, sc, o);
    }

    // ---- pass 2: selection scores and streaming top-n ----
    for (int e = tid; e < P_CMP * RING; e += 128) score[e] = 0.f;
    for (int e = tid; e < P_CMP * TOPW; e += 128) {
        topv[e] = NEG_INF;
        topi[e] = INT_MAX_;
    }
    const int nsel_max = tmax / SEL_L + 1;   // admissible blocks of the last position
    int j_done = 0;                          // blocks [0, j_done) are merged into the top lists

    // merges candidate blocks [j_begin, j_end) into the top lists; one warp per position
    auto merge = [&](int j_begin, int j_end) {
        for (int p = warp; p < npos; p += 4) {
            const int t = t0 + p, own = t / SEL_L;
            for (int jb = j_begin; jb < j_end; jb += 32) {
                const int j = jb + lane;
                float v = NEG_INF;
                int i = INT_MAX_;
                if (j < j_end) {
                    float* slot = score + p * RING + (j % RING);
                    const float sv = *slot;
                    *slot = 0.f;
                    const bool adm = j * SEL_L <= t;
                    const bool forced = j < NINIT || (j <= own && j > own - NLOCAL);
                    if (adm) {
                        v = forced ? POS_INF : sv;
                        i = j;
                    }
                }
                warp_sort_desc(v, i);
                // bitonic merge with the current list: the best 32 of both form a bitonic sequence
                const float rv = __shfl_sync(0xffffffff, v, 31 - lane);
                const int ri = __shfl_sync(0xffffffff, i, 31 - lane);
                float cv = topv[p * TOPW + lane];
                int ci = topi[p * TOPW + lane];
                if (better(rv, ri, cv, ci)) {
                    cv = rv;
                    ci = ri;
                }
#pragma unroll
                for (int jj = 16; jj > 0; jj >>= 1) bitonic_step(cv, ci, jj, true);
                topv[p * TOPW + lane] = cv;
                topi[p * TOPW + lane] = ci;
            }
        }
    };

    __syncthreads();
    for (int c0 = 0; c0 < ncmp; c0 += KT) {
        const int nk = min(KT, ncmp - c0);
        load_rows_async<KT, DK, KS_STRIDE, 128>(Ks, kc + krow(c0), nk, [&](int r) { return (i64)r * HKV * DK; });
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
        {
            float s[KT / 8][4];
            qk_tile(Qs, Ks, row0, s);
#pragma unroll
            for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int key = nt * 8 + gc;
                    const int hi = min(max(vis[h] - c0, 0), nk);
                    float2 pv;
                    pv.x = key < hi ? exp2f(s[nt][2 * h] * SCALE_LOG2 - lse[h]) : 0.f;
                    pv.y = key + 1 < hi ? exp2f(s[nt][2 * h + 1] * SCALE_LOG2 - lse[h]) : 0.f;
                    *(float2*)(Ps + rr[h] * PS_STRIDE + key) = pv;
                }
        }
        __syncthreads();
        // fold p_cmp into selection-block scores (Eq. 9, group sum of Eq. 10)
        const int c1 = c0 + nk;
        const int j_lo = (c0 * CMP_D) / SEL_L;
        const int j_hi = ((c1 - 1) * CMP_D + CMP_L - 1) / SEL_L;   // inclusive
        const int nj = j_hi - j_lo + 1;
        for (int e = tid; e < npos * nj; e += 128) {
            const int p = e / nj, j = j_lo + e % nj;
            const int ilo = max(c0, (j * SEL_L + CMP_D > CMP_L) ? (j * SEL_L + CMP_D - CMP_L) / CMP_D : 0);
            const int ihi = min(c1, (j + 1) * SEL_L / CMP_D);
            float acc = 0.f;
            for (int i = ilo; i < ihi; ++i) {
                const float w = overlap_w(i, j);
                float sum = 0.f;
                for (int hh = 0; hh < G; ++hh) sum += Ps[(p * G + hh) * PS_STRIDE + (i - c0)];
                acc += w * sum;
            }
            score[p * RING + (j % RING)] += acc;
        }
        __syncthreads();
        // blocks whose last overlapping compressed block is < c1 are complete
        const int j_fin = min((c1 * CMP_D) / SEL_L, nsel_max);
        if (j_fin > j_done) {
            merge(j_done, j_fin);
            j_done = j_fin;
        }
        __syncthreads();
    }
    merge(j_done, nsel_max);
    __syncwarp();

    // ---- output: the n best, ascending block order, padded with -1 ----
    for (int p = warp; p < npos; p += 4) {
        const float v = topv[p * TOPW + lane];
        const int i = topi[p * TOPW + lane];
        int key = (lane < NSEL && v != NEG_INF) ? i : INT_MAX_;
        key = warp_sort_asc_int(key);
        if (lane < NSEL)
            sel_idx[((i64)(start + t0 + p) * HKV + g) * NSEL + lane] = key == INT_MAX_ ? -1 : key;
    }
}
