// Backward of the sliding-window branch (SPEC.md "Sliding window branch": keys
// max(0, t - w + 1) ..= t).
//
// win_bwd_dq    row-major: one CTA = KV group g and 64 / G positions; pass 1 recomputes o_win and
//               lse, writes lse and dg_win; pass 2 adds the window's dQ into dq.
// win_bwd_dkdv  key-major: one CTA = KV group g and BW_KM_KEYS keys [k0, k0 + 128) of a sequence
//               (two key warpgroups on wgmma, 64 keys otherwise; bwd_wgmma.cu); the rows are the
//               positions t in [k0, k0 + nk + w - 1) that can see one of them (products on wgmma
//               where bwd_wgmma.cu enables it, BW_WG).

#define BQ_ROWS 64
#define BQ_P (BQ_ROWS / G)

template <bool SAVED>
__device__ __forceinline__ void win_bwd_dq_body(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kw, const bf16_t* __restrict__ vw,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const int4* __restrict__ items,
    float* __restrict__ lse_out, float* __restrict__ dg_out, float* __restrict__ dq_out) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Qs = (bf16_t*)smem;
    bf16_t* dOs = Qs + BQ_ROWS * QS_STRIDE;
    bf16_t* Ks = dOs + BQ_ROWS * DOS_STRIDE;   // BW_QSTAGES tiles
    bf16_t* Vs = Ks + BW_QSTAGES * KT * KS_STRIDE;

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z;
    const int g = blockIdx.y;
    const int npos = min(BQ_P, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2;
    const int row0 = warp * 16;

    auto qoff = [&](int r) { return ((i64)(start + t0 + r / G) * HQ + g * G + r % G); };
    load_rows_async<BQ_ROWS, DK, QS_STRIDE, 128>(Qs, q, nrows, [&](int r) { return qoff(r) * DK; });
    load_rows_async<BQ_ROWS, DV, DOS_STRIDE, 128>(dOs, dO, nrows, [&](int r) { return qoff(r) * DV; });
    cp_async_commit();

    int tt[2];
    i64 qrow[2];
    bool valid[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = row0 + gr + 8 * i;
        valid[i] = r < nrows;
        tt[i] = t0 + r / G;
        qrow[i] = valid[i] ? qoff(r) : 0;
    }
    const int kbeg = max(0, t0 - WIN + 1), kend = tmax + 1;
    auto for_tiles = [&](auto fn) {
        int k0 = kbeg;
        bw_pipeline<128, BW_QSTAGES>(
            Ks, Vs, kw, vw, g,
            [&](BwTile& t) {
                if (k0 >= kend) return false;
                t.row = start + k0;
                t.k0 = k0;
                t.nk = min(KT, kend - k0);
                t.chose = 0;
                k0 += KT;
                return true;
            },
            [&](const BwTile& t, int (&lo)[2], int (&hi)[2]) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    lo[i] = max(tt[i] - WIN + 1 - t.k0, 0);
                    hi[i] = valid[i] ? min(max(tt[i] + 1 - t.k0, 0), t.nk) : 0;
                }
            },
            fn);
    };
    bw_rows_dq<true, SAVED>(Qs, dOs, row0, qrow, valid, gate, lse_out, dg_out, dq_out, for_tiles);
}

#if BW_WG_DQ
// win_bwd_dq_body<true> on wgmma (bw_wg_rows_dq): the same items, rows, tiles and masks.
__device__ __forceinline__ void win_bwd_dq_wg(const bf16_t* __restrict__ q, const bf16_t* __restrict__ kw,
                                              const bf16_t* __restrict__ vw, const bf16_t* __restrict__ dO,
                                              const float* __restrict__ gate, const int4* __restrict__ items,
                                              const float* __restrict__ lse_in, const float* __restrict__ dg_in,
                                              float* __restrict__ dq_out) {
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned char* sm = align1024(smem);
    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z;
    const int g = blockIdx.y;
    const int npos = min(BQ_P, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2;
    const int row0 = warp * 16;

    auto qoff = [&](int r) { return ((i64)(start + t0 + r / G) * HQ + g * G + r % G); };
    load_rows_sw128<BQ_ROWS, DK, 128>(sm, q, nrows, [&](int r) { return qoff(r) * DK; });
    load_rows_sw128<BQ_ROWS, DV, 128>(sm + BQ_ROWS * DK * 2, dO, nrows, [&](int r) { return qoff(r) * DV; });
    cp_async_commit();

    int tt[2];
    i64 qrow[2];
    bool valid[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = row0 + gr + 8 * i;
        valid[i] = r < nrows;
        tt[i] = t0 + r / G;
        qrow[i] = valid[i] ? qoff(r) : 0;
    }
    const int kbeg = max(0, t0 - WIN + 1), kend = tmax + 1;
    auto for_tiles = [&](auto fn) {
        int k0 = kbeg;
        bw_wg_pipeline(
            sm + BW_WG_Q_BYTES, kw, vw, g,
            [&](BwTile& t) {
                if (k0 >= kend) return false;
                t.row = start + k0;
                t.k0 = k0;
                t.nk = min(KT, kend - k0);
                t.chose = 0;
                k0 += KT;
                return true;
            },
            [&](const BwTile& t, int (&lo)[2], int (&hi)[2]) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    lo[i] = max(tt[i] - WIN + 1 - t.k0, 0);
                    hi[i] = valid[i] ? min(max(tt[i] + 1 - t.k0, 0), t.nk) : 0;
                }
            },
            fn);
    };
    bw_wg_rows_dq<true>(sm, qrow, valid, gate, lse_in, dg_in, dq_out, for_tiles);
}
#endif

// items[b] = (seq start, seq len, k0, 0)
extern "C" __global__ void __launch_bounds__(128 * BW_KM_KW) win_bwd_dkdv(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kw, const bf16_t* __restrict__ vw,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const float* __restrict__ lse,
    const float* __restrict__ dg, const int4* __restrict__ items, float* __restrict__ dk_out,
    float* __restrict__ dv_out) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, k0 = it.z;
    const int g = blockIdx.y;
    if (blockDim.x != 128 * BW_KM_KW) __trap();   // the host (BwdSmem::km_threads) disagrees
    const int nk = min(BW_KM_KEYS, len - k0);
    const int tend = min(len, k0 + nk - 1 + WIN);   // last position that sees a key, + 1
    const int npos = tend - k0;
    float dk[DK / 8][4], dv[DV / 8][4];
    bw_zero<DK>(dk);
    bw_zero<DV>(dv);
    auto tok_of = [&](int p) { return start + k0 + p; };
    auto t_of = [&](int tok) { return tok - start; };
    auto ok = [&](int key, int t) {
        const int s = k0 + key;
        return key < nk && s <= t && t - s < WIN;
    };
#if BW_WG
    unsigned char* sm = align1024(smem);
    bw_wg_load_kv<BW_KM_KW>(sm, kw, vw, (i64)(start + k0), g, nk);
    bw_wg_dkdv_rows<BW_KM_KW>(sm, q, dO, lse, dg, gate, g, npos * G, tok_of, t_of, ok, dk, dv);
#else
    bw_load_kv(smem, kw, vw, (i64)(start + k0), g, nk);
    bw_dkdv_rows(smem, q, dO, lse, dg, gate, g, npos * G, tok_of, t_of, ok, dk, dv);
#endif
    cp_async_wait_all();
    bw_store_kv(
        dk, dv, nk, SCALE_NAT, [&](int key) { return dk_out + ((i64)(start + k0 + key) * HKV + g) * DK; },
        [&](int key) { return dv_out + ((i64)(start + k0 + key) * HKV + g) * DV; });
}

extern "C" __global__ void __launch_bounds__(128) win_bwd_dq(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kw, const bf16_t* __restrict__ vw,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const int4* __restrict__ items,
    float* __restrict__ lse_out, float* __restrict__ dg_out, float* __restrict__ dq_out) {
    win_bwd_dq_body<false>(q, kw, vw, dO, gate, items, lse_out, dg_out, dq_out);
}
// with the forward's saved lse and the gate gradients of bwd_gate_dot (dg_out is read)
extern "C" __global__ void __launch_bounds__(128) win_bwd_dq_saved(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kw, const bf16_t* __restrict__ vw,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const int4* __restrict__ items,
    float* __restrict__ lse_out, float* __restrict__ dg_out, float* __restrict__ dq_out) {
#if BW_WG_DQ
    win_bwd_dq_wg(q, kw, vw, dO, gate, items, lse_out, dg_out, dq_out);
#else
    win_bwd_dq_body<true>(q, kw, vw, dO, gate, items, lse_out, dg_out, dq_out);
#endif
}
