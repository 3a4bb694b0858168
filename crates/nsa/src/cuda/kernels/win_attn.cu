// Sliding-window branch (SPEC.md "Sliding window branch"): keys max(0, t-w+1) ..= t, added to
// the output as g_win * o_win. Flash-style: one CTA = one KV group and P_WIN = WIN_ROWS / G
// positions (row r -> position t0 + r / G, head g*G + r % G), so the G heads of a position share
// each K/V tile; the CTA walks the union of its rows' windows in 64-key tiles, masking per row.
// 4 warps x 16*MT rows.
//
// On sm_90a (dk a multiple of 64 up to 256, dv 64 or 128) the kernel runs on Hopper's warpgroup
// MMA with two K/V stages, like cmp_attn's pass 1 (wgmma.cu is prepended to this family); the
// mma.sync kernel below is the fallback (sm_80/sm_89, other head dims, or -DCMP_NO_WGMMA /
// -DWIN_NO_WGMMA through NSA_CUDA_DEFINES). The host's footprint (cuda/mod.rs,
// `win_uses_wgmma`) mirrors this condition.

#define WMT MT_WIDE
#define WIN_ROWS (64 * WMT)
#define P_WIN (WIN_ROWS / G)

#if WG_AVAILABLE && !defined(CMP_NO_WGMMA) && !defined(WIN_NO_WGMMA) && DK % 64 == 0 && DK <= 256 && \
    (DV == 64 || DV == 128)
#define WIN_USE_WGMMA 1
#else
#define WIN_USE_WGMMA 0
#endif

#if !WIN_USE_WGMMA

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
    // adds g_win * o_win (the gated sum is complete); o_win and its lse for the backward
    i64 qrow[2 * WMT];
#pragma unroll
    for (int i = 0; i < 2 * WMT; ++i) qrow[i] = valid[i] ? (i64)(start + tt[i]) * HQ + g * G + rr[i] % G : -1;
    finish_branch_rows<true, WMT>(qrow, st, o, gate, out, o_save != nullptr ? lse_save : nullptr, o_save);
}

#else  // WIN_USE_WGMMA

// D (m64 x n16, f32) (+)= A (64 x 16, smem descriptor) * B (16 x n16, smem descriptor, K-major):
// the scores of a narrow last tile (at most 16 keys). Register layout as wg_ss_n64 (d[j][..]:
// columns 8j + gc, + 1).
template <int SCALE_D>
__device__ __forceinline__ void win_ss_n16(float (&d)[2][4], unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32." ELEM_PTX "." ELEM_PTX " "
        "{%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3])
        : "l"(da), "l"(db), "n"(SCALE_D));
}

// S (64 rows x NK keys) = rows mt*64 .. +63 of the swizzled Q tile times the first NK rows of
// the swizzled [KT x DK] K tile (NK = 64: wg_qk; NK = 16: m64n16 wgmmas on the same descriptors).
template <int NK>
__device__ __forceinline__ void win_qk(float (&s)[NK / 8][4], u32 qa, u32 ka, int mt) {
    if constexpr (NK == KT) {
        wg_qk<WIN_ROWS>(s, qa, ka, mt);
    } else {
        static_assert(NK == 16, "narrow tiles are 16 keys");
#pragma unroll
        for (int kk = 0; kk < DK / 16; ++kk) {
            const u32 a = qa + (kk >> 2) * (WIN_ROWS * 128) + mt * 64 * 128 + (kk & 3) * 32;
            const u32 b = ka + (kk >> 2) * (KT * 128) + (kk & 3) * 32;
            if (kk == 0)
                win_ss_n16<0>(s, wg_desc(a, 16, 1024), wg_desc(b, 16, 1024));
            else
                win_ss_n16<1>(s, wg_desc(a, 16, 1024), wg_desc(b, 16, 1024));
        }
    }
}

// O (64 x DV) += P (64 x NK keys, registers) times the first NK rows of the swizzled V tile.
template <int NK>
__device__ __forceinline__ void win_pv(float (&o)[DV / 8][4], const u32 (&p)[NK / 16][4], u32 va) {
#pragma unroll
    for (int kc = 0; kc < NK / 16; ++kc) {
        const unsigned long long b = wg_desc(va + kc * 16 * 128, 64 * 128, 1024);
#if DV == 128
        wg_rs_n128<1, 1>(o, p[kc], b);
#elif DV == 64
        wg_rs_n64<1, 1>(o, p[kc], b);
#endif
    }
}

// One key tile (keys k0 .. k0 + NK - 1) for the warpgroup's WMT m64 row tiles: S = Q K^T (wgmma,
// smem operands), the masked online softmax, O += P V (wgmma, P from registers); the same
// schedule as cmp_attn's wg_attn_tile (S0 and S1 issued together, the softmax of tile 0 while
// S1 computes, P0 V while the softmax of tile 1 runs). The mask is the window's two-sided one:
// row i (position t) sees key k0 + key iff 0 <= t - k0 - key < WIN, with rel[i] = t - k0; it is
// applied only when `need_mask` (CTA-uniform: the tile is not inside every row's window).
// Zero-filled keys past the sequence lie past every valid row's t, so the mask drops them.
template <int NK>
__device__ __forceinline__ void win_wg_tile(u32 qa, u32 ka, u32 va, bool need_mask,
                                            const int (&rel)[2 * WMT], RowStats<WMT>& st,
                                            float (&o)[WMT][DV / 8][4]) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
    float s[WMT][NK / 8][4];
    wg_fence();
#pragma unroll
    for (int mt = 0; mt < WMT; ++mt) {
        win_qk<NK>(s[mt], qa, ka, mt);
        wg_commit();
    }
    u32 p[WMT][NK / 16][4];
#pragma unroll
    for (int mt = 0; mt < WMT; ++mt) {
        if (mt == 0)
            wg_wait<WMT - 1>();
        else
            wg_wait<1>();
        wg_pin(s[mt]);
        if (need_mask) {
#pragma unroll
            for (int nt = 0; nt < NK / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = nt * 8 + gc + (e & 1);
                    if ((unsigned)(rel[2 * mt + (e >> 1)] - key) >= (unsigned)WIN) s[mt][nt][e] = NEG_INF;
                }
        }
        wg_softmax_step<NK>(s[mt], st, mt, o[mt], p[mt]);
        wg_fence();
        win_pv<NK>(o[mt], p[mt], va);
        wg_commit();
    }
    wg_wait<0>();
#pragma unroll
    for (int mt = 0; mt < WMT; ++mt) wg_pin(o[mt]);
}

// Shared memory of the wgmma kernel: 1 KB of alignment slack, the swizzled Q tile and
// FWD_WG_STAGES K/V stages (wgmma.cu; cuda/mod.rs reserves exactly this).
#define WIN_WG_SMEM (1024 + WIN_ROWS * DK * 2 + FWD_WG_STAGES * KT * (DK + DV) * 2)

// The window on wgmma: the CTA's 128 threads are one warpgroup; row tile mt (64 rows) belongs to
// all four warps (warp w: rows mt*64 + 16w .. +15). Q, K and V tiles are 128B-swizzled and
// unpadded; the next K/V tile loads (cp.async) while the current one is computed (one stage at
// dk + dv > 256: FWD_WG_STAGES in wgmma.cu).
extern "C" __global__ void __launch_bounds__(128) win_attn(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kw, const bf16_t* __restrict__ vw,
    const float* __restrict__ gate, const int4* __restrict__ items, float* __restrict__ out,
    float* __restrict__ lse_save, bf16_t* __restrict__ o_save) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    {   // a launch with less shared memory than this layout needs fails loudly, never corrupts
        u32 dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < WIN_WG_SMEM) __trap();
    }
    unsigned char* Qs = align1024(smem_raw);             // [WIN_ROWS x DK]
    unsigned char* KVs = Qs + WIN_ROWS * DK * 2;         // FWD_WG_STAGES x (K [KT x DK], V [KT x DV])
    constexpr int K_BYTES = KT * DK * 2, STAGE_BYTES = KT * (DK + DV) * 2;

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z;
    const int g = blockIdx.y;
    const int npos = min(P_WIN, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2;

    load_tile_sw128<WIN_ROWS, DK, 128>(Qs, q, nrows, [&](int r) {
        return ((i64)(start + t0 + r / G) * HQ + g * G + r % G) * DK;
    });
    cp_async_commit();

    int rr[2 * WMT], tt[2 * WMT];
    bool valid[2 * WMT];
#pragma unroll
    for (int i = 0; i < 2 * WMT; ++i) {
        rr[i] = (i >> 1) * 64 + warp * 16 + gr + 8 * (i & 1);
        valid[i] = rr[i] < nrows;
        tt[i] = t0 + rr[i] / G;
    }
    RowStats<WMT> st;
    rowstats_init(st);
    float o[WMT][DV / 8][4];
    zero_acc(o);

    // keys of the union of the rows' windows: [kbeg, kend), in tiles of KT from kbeg
    const int kbeg = max(0, t0 - WIN + 1), kend = tmax + 1;
    const int ntiles = (kend - kbeg + KT - 1) / KT;
    const i64 kv_base = (i64)(start + kbeg) * HKV + g;
    auto issue = [&](int j) {
        const int nk = min(KT, kend - kbeg - j * KT);
        unsigned char* st_ = KVs + (j & (FWD_WG_STAGES - 1)) * STAGE_BYTES;
        load_tile_sw128<KT, DK, 128>(st_, kw + (kv_base + (i64)j * KT * HKV) * DK, nk,
                                     [&](int r) { return (i64)r * HKV * DK; });
        load_tile_sw128<KT, DV, 128>(st_ + K_BYTES, vw + (kv_base + (i64)j * KT * HKV) * DV, nk,
                                     [&](int r) { return (i64)r * HKV * DV; });
        cp_async_commit();
    };
    if (FWD_WG_STAGES == 2) issue(0);   // ntiles >= 1: every row sees at least its own key
    for (int j = 0; j < ntiles; ++j) {
        const int k0 = kbeg + j * KT;
        if (FWD_WG_STAGES == 1) {   // the previous tile's readers passed the loop's last barrier
            issue(j);
            cp_async_wait_all();
        } else if (j + 1 < ntiles) {
            issue(j + 1);
            cp_async_wait_one();
        } else {
            cp_async_wait_all();
        }
        fence_proxy_async();   // cp.async wrote Q / this stage; the wgmma reads them (async proxy)
        __syncthreads();
        int rel[2 * WMT];
#pragma unroll
        for (int i = 0; i < 2 * WMT; ++i) rel[i] = tt[i] - k0;
        // every row sees the whole tile iff it starts inside the last row's window and ends at or
        // before the first row's position (then it is also a full tile)
        const bool need_mask = k0 < tmax - WIN + 1 || k0 + KT - 1 > t0;
        const u32 ka = smem_addr(KVs + (j & (FWD_WG_STAGES - 1)) * STAGE_BYTES);
#ifndef WIN_NO_NARROW
        // a last tile of at most 16 keys (G = 8, 16, 32, 64 at w = 512: 519 keys per 8 positions
        // at G = 16 leave 7) runs as m64n16 scores and one k16 step of P V (-DWIN_NO_NARROW: a
        // full 64-key tile)
        if (j == ntiles - 1 && kend - k0 <= 16)
            win_wg_tile<16>(smem_addr(Qs), ka, ka + K_BYTES, true, rel, st, o);
        else
#endif
            win_wg_tile<KT>(smem_addr(Qs), ka, ka + K_BYTES, need_mask, rel, st, o);
        __syncthreads();   // every wgmma of this stage completed before it is refilled
    }
    cp_async_wait_all();
    // adds g_win * o_win (the gated sum is complete); o_win and its lse for the backward
    i64 qrow[2 * WMT];
#pragma unroll
    for (int i = 0; i < 2 * WMT; ++i) qrow[i] = valid[i] ? (i64)(start + tt[i]) * HQ + g * G + rr[i] % G : -1;
    finish_branch_rows<true, WMT>(qrow, st, o, gate, out, o_save != nullptr ? lse_save : nullptr, o_save);
}
#endif  // WIN_USE_WGMMA
