// Sliding-window branch (SPEC.md "Sliding window branch"): keys max(0, t-w+1) ..= t, added to
// the output as g_win * o_win. Flash-style: one CTA = one KV group and P_WIN = WIN_ROWS / G
// positions (row r -> position t0 + r / G, head g*G + r % G), so the G heads of a position share
// each K/V tile; the CTA walks the union of its rows' windows in 64-key tiles, masking per row.
// 4 warps x 16*MT rows.

#define WMT MT_WIDE
#define WIN_ROWS (64 * WMT)
#define P_WIN (WIN_ROWS / G)

extern "C" __global__ void __launch_bounds__(128) win_attn(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kw, const bf16_t* __restrict__ vw,
    const float* __restrict__ gate, const int4* __restrict__ items, float* __restrict__ out,
    float* __restrict__ lse_save, bf16_t* __restrict__ o_save) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Qs = (bf16_t*)smem;
    bf16_t* Ks = Qs + WIN_ROWS * QS_STRIDE;
    bf16_t* Vs = Ks + KT * KS_STRIDE;

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z;
    const int g = blockIdx.y;
    const int npos = min(P_WIN, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2;
    const int row0 = warp * 16 * WMT;

    load_rows_async<WIN_ROWS, DK, QS_STRIDE, 128>(Qs, q, nrows, [&](int r) {
        return ((i64)(start + t0 + r / G) * HQ + g * G + r % G) * DK;
    });
    cp_async_commit();

    int rr[2 * WMT], tt[2 * WMT];
    bool valid[2 * WMT];
#pragma unroll
    for (int i = 0; i < 2 * WMT; ++i) {
        rr[i] = row0 + (i >> 1) * 16 + gr + 8 * (i & 1);
        valid[i] = rr[i] < nrows;
        tt[i] = t0 + rr[i] / G;
    }
    RowStats<WMT> st;
    rowstats_init(st);
    float o[WMT][DV / 8][4];
    zero_acc(o);

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
        int lo[2 * WMT], hi[2 * WMT];
#pragma unroll
        for (int i = 0; i < 2 * WMT; ++i) {
            lo[i] = max(tt[i] - WIN + 1 - k0, 0);
            hi[i] = valid[i] ? min(max(tt[i] + 1 - k0, 0), nk) : 0;
        }
        attn_tile<WMT>(Qs, Ks, Vs, row0, lo, hi, st, o);
    }
    cp_async_wait_all();
    float inv[2 * WMT];
    rowstats_finish(st, inv);
    float* dst[2 * WMT];
    float sc[2 * WMT];
#pragma unroll
    for (int i = 0; i < 2 * WMT; ++i) {
        const i64 qrow = (i64)(start + tt[i]) * HQ + g * G + rr[i] % G;
        dst[i] = valid[i] ? out + qrow * DV : nullptr;
        sc[i] = valid[i] ? gate[qrow] * inv[i] : 0.f;
    }
    store_rows<true, WMT>(dst, sc, o);
    if (o_save != nullptr) {   // o_win (before its gate) and the row lse for the backward
        bf16_t* ds[2 * WMT];
#pragma unroll
        for (int i = 0; i < 2 * WMT; ++i) {
            const i64 qrow = (i64)(start + tt[i]) * HQ + g * G + rr[i] % G;
            ds[i] = valid[i] ? o_save + qrow * DV : nullptr;
            if (valid[i] && (lane & 3) == 0) lse_save[qrow] = st.l[i] > 0.f ? st.m[i] + log2f(st.l[i]) : POS_INF;
        }
        store_rows_bf16<WMT>(ds, inv, o);
    }
}
