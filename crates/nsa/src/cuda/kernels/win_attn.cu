// Sliding-window branch (SPEC.md "Sliding window branch"): keys max(0, t-w+1) ..= t, added to
// the output as g_win * o_win. Flash-style: one CTA = one KV group and P_WIN = 64 / G positions
// (row r -> position t0 + r / G, head g*G + r % G), so the G heads of a position share each K/V
// tile; the CTA walks the union of its rows' windows in 64-key tiles, masking per row.

#define P_WIN (64 / G)

extern "C" __global__ void __launch_bounds__(128) win_attn(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kw, const bf16_t* __restrict__ vw,
    const float* __restrict__ gate, const int4* __restrict__ items, float* __restrict__ out) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Qs = (bf16_t*)smem;
    bf16_t* Ks = Qs + 64 * QS_STRIDE;
    bf16_t* Vs = Ks + KT * KS_STRIDE;

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z;
    const int g = blockIdx.y;
    const int npos = min(P_WIN, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2;
    const int row0 = warp * 16;

    load_rows_async<64, DK, QS_STRIDE, 128>(Qs, q, nrows, [&](int r) {
        return ((i64)(start + t0 + r / G) * HQ + g * G + r % G) * DK;
    });
    cp_async_commit();

    int rr[2], tt[2];
    bool valid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        rr[h] = row0 + gr + 8 * h;
        valid[h] = rr[h] < nrows;
        tt[h] = t0 + rr[h] / G;
    }
    RowStats st;
    rowstats_init(st);
    float o[DV / 8][4];
#pragma unroll
    for (int nt = 0; nt < DV / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;

    const int kbeg = max(0, t0 - WIN + 1), kend = tmax + 1;
    for (int k0 = kbeg; k0 < kend; k0 += KT) {
        const int nk = min(KT, kend - k0);
        __syncthreads();
        load_rows_async<KT, DK, KS_STRIDE, 128>(Ks, kw + ((i64)(start + k0) * HKV + g) * DK, nk,
                                                [&](int r) { return (i64)r * HKV * DK; });
        load_rows_async<KT, DV, VS_STRIDE, 128>(Vs, vw + ((i64)(start + k0) * HKV + g) * DV, nk,
                                                [&](int r) { return (i64)r * HKV * DV; });
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
        int lo[2], hi[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            lo[h] = max(tt[h] - WIN + 1 - k0, 0);
            hi[h] = valid[h] ? min(max(tt[h] + 1 - k0, 0), nk) : 0;
        }
        attn_tile(Qs, Ks, Vs, row0, lo, hi, st, o);
    }
    cp_async_wait_all();
    float inv[2];
    rowstats_finish(st, inv);
    float* dst[2];
    float sc[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const i64 qrow = (i64)(start + tt[h]) * HQ + g * G + rr[h] % G;
        dst[h] = valid[h] ? out + qrow * DV : nullptr;
        sc[h] = valid[h] ? gate[qrow] * inv[h] : 0.f;
    }
    store_rows<true>(dst, sc, o);
}
