// Compression branch and block selection, fused (SPEC.md "Compression branch", "Selection branch").
//
// One CTA = one KV group g and P_CMP consecutive query positions of one sequence: its rows are
// the G query heads of each position (row r -> position t0 + r / G, head g*G + r % G), so all rows
// share the compressed keys of group g and the G heads of a position sit in the same CTA (the group
// sum of Eq. 10 never leaves shared memory).
//
// Pass 1: flash attention over the visible compressed blocks -> o_cmp (written as g_cmp * o_cmp,
//         the first term of the gated sum) and the log-sum-exp of each row.
// Pass 2: the same Q Kcmp^T again; p_cmp = exp2(s - lse) stays in registers and is folded into
//         selection-block scores on the tensor cores: S_blk = P (rows x 64 compressed blocks, f16)
//         x W (64 x JW, the overlap weights of Eq. 9, |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d, any
//         l, d, l', exact small integers in f16), f32 accumulation. The per-row block scores are
//         summed over the group's heads (Eq. 10) into a ring of per-position scores, and each
//         selection block, once no later tile can touch it, enters a running top-n per position
//         (one warp per position; candidates that do not beat the current n-th best are dropped
//         with one ballot, the rest are inserted by rank). Forced blocks enter with +inf,
//         inadmissible ones never; ties go to the lower block index. Nothing of size [T, T/d]
//         is ever stored.

#define CMT MT_WIDE
#define CMP_ROWS (64 * CMT)     // 4 warps x 16*CMT rows
#define P_CMP (CMP_ROWS / G)    // positions per CTA
// Selection blocks touched by one tile of 64 compressed blocks (conservative) and the padded
// width of the per-tile score matrix (n-tiles of 8).
#define JSPAN ((63 * CMP_D + CMP_L - 1) / SEL_L + 2)
#define JW (((JSPAN + 7) / 8) * 8)
#define DS_STRIDE (JW + 4)      // floats per row of the per-row block scores
// Blocks a tile can complete.
#define PER_TILE ((64 * CMP_D + SEL_L - 1) / SEL_L + 1)
// How the running top-n lists are merged. Few positions per CTA (large G): one warp per
// position, its 32 lanes testing 32 candidate blocks at once (most fail one ballot against the
// n-th best), lists of TOPW = 32 entries, merges every MERGE_EVERY tiles. Many positions per
// CTA (P_CMP >= TOPN_LANE_MIN, default 16: G <= 8): one thread per position, which adds the
// tile's per-row block scores of its G heads into its own score ring (the group sum, no
// CTA-wide pass and barrier), tests the tile's new blocks against its n-th best and inserts
// the winners into its sorted list of NSEL, held in registers; it merges after every tile, so
// the score ring only needs JSPAN + PER_TILE slots (the shared memory of 128 positions then
// allows two CTAs per SM). Measured at 64k (NOTES-cuda.md v15), topn against the warp merge:
// G = 1 17.2 / 87.8 ms, G = 2 16.2 / 51.1, G = 4 15.4 / 19.0, G = 8 13.2 / 14.5, but G = 16
// 14.6 / 9.3 (8 threads each summing 16 heads), hence the threshold. -DTOPN_WARP_MERGE forces
// the warp merge.
#ifndef TOPN_LANE_MIN
#define TOPN_LANE_MIN 16
#endif
#if P_CMP >= TOPN_LANE_MIN && !defined(TOPN_WARP_MERGE)
#define LANE_MERGE 1
#define RING (((JSPAN + PER_TILE + 15) / 16) * 16)
#define TOP_STRIDE (NSEL + 1)   // odd: the lanes' lists fall in different banks
// The per-row block scores transposed, [JW][DST_STRIDE]: thread p reads its G rows of column jj
// at consecutive addresses (G = 1: conflict-free), and the MMA layout's scalar stores (8 rows x
// 4 column pairs per instruction) fall in 32 distinct banks since DST_STRIDE = 4 (mod 32).
#define DST_STRIDE (CMP_ROWS + 4)
#else
#define LANE_MERGE 0
#define RING 128                // score slots per position (selection blocks j live at j % RING)
#define TOP_STRIDE 32           // TOPW: width of the running top list (NSEL <= 32)
#endif
#define RING_STRIDE (RING + 1)  // odd: a thread per position reads its ring without conflicts
// How many tiles may pass between merges: the pending blocks (at most JSPAN + MERGE_EVERY *
// PER_TILE) must fit the ring without two sharing a slot.
#define MERGE_EVERY_RAW (LANE_MERGE ? 1 : (RING - JSPAN) / PER_TILE - 1)
#define MERGE_EVERY (MERGE_EVERY_RAW < 1 ? 1 : MERGE_EVERY_RAW)
#define WT_STRIDE (KT + 8)      // f16 per row of the transposed overlap matrix
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

// Pass 1 runs on Hopper's warpgroup MMA (wgmma.cu) when built for sm_90a, for the head dims it
// covers (dk a multiple of 64 up to 256, dv 64 or 128) with the double-buffered loop; otherwise
// on mma.sync (the fallback: sm_80/sm_89, other head dims, -DCMP_SINGLE_BUFFER, or -DCMP_NO_WGMMA
// through NSA_CUDA_DEFINES for comparisons).
#if WG_AVAILABLE && !defined(CMP_NO_WGMMA) && !defined(CMP_SINGLE_BUFFER) && DK % 64 == 0 && DK <= 256 && \
    (DV == 64 || DV == 128)
#define CMP_USE_WGMMA 1
#else
#define CMP_USE_WGMMA 0
#endif

#if !CMP_USE_WGMMA
// Pass 1 (kernel `cmp_attn`): writes g_cmp * o_cmp (the first term of the gated sum, `=`) and
// the log2-domain log-sum-exp of every row to `lse` ([N, HQ]; +inf for rows that see nothing).
extern "C" __global__ void __launch_bounds__(128) cmp_attn(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    const float* __restrict__ gate, const int4* __restrict__ items, float* __restrict__ out,
    float* __restrict__ lse_out, bf16_t* __restrict__ o_save) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Qs = (bf16_t*)smem;
    bf16_t* Ks = Qs + CMP_ROWS * QS_STRIDE;
    bf16_t* Vs = Ks + KT * KS_STRIDE;

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z, cstart = it.w;
    const int g = blockIdx.y;
    const int npos = min(P_CMP, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int ncmp = cmp_visible(tmax);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    const int row0 = warp * 16 * CMT;

    load_rows_async<CMP_ROWS, DK, QS_STRIDE, 128>(Qs, q, nrows, [&](int r) {
        return ((i64)(start + t0 + r / G) * HQ + g * G + r % G) * DK;
    });
    cp_async_commit();

    int rr[2 * CMT], tt[2 * CMT], vis[2 * CMT];
    bool valid[2 * CMT];
#pragma unroll
    for (int h = 0; h < 2 * CMT; ++h) {
        rr[h] = row0 + (h >> 1) * 16 + gr + 8 * (h & 1);
        valid[h] = rr[h] < nrows;
        tt[h] = t0 + rr[h] / G;
        vis[h] = valid[h] ? cmp_visible(tt[h]) : 0;
    }
    auto krow = [&](int r) { return ((i64)(cstart + r) * HKV + g) * DK; };
    auto vrow = [&](int r) { return ((i64)(cstart + r) * HKV + g) * DV; };

    // ---- pass 1: attention over the compressed tokens ----
    RowStats<CMT> st;
    rowstats_init(st);
    float o[CMT][DV / 8][4];
    zero_acc(o);
#ifndef CMP_SINGLE_BUFFER
    // two K/V stages, the next tile loading while the current one is computed (-DCMP_SINGLE_BUFFER
    // restores the one-stage loop below, for comparisons)
    auto issue = [&](int c0) {
        const int nk = min(KT, ncmp - c0), stage = (c0 / KT) & (FWD_WG_STAGES - 1);
        load_rows_async<KT, DK, KS_STRIDE, 128>(Ks + stage * (KT * KS_STRIDE + KT * VS_STRIDE), kc + krow(c0), nk,
                                                [&](int r) { return (i64)r * HKV * DK; });
        load_rows_async<KT, DV, VS_STRIDE, 128>(Ks + stage * (KT * KS_STRIDE + KT * VS_STRIDE) + KT * KS_STRIDE, vc + vrow(c0), nk,
                                                [&](int r) { return (i64)r * HKV * DV; });
        cp_async_commit();
    };
    if (FWD_WG_STAGES == 2 && ncmp > 0) issue(0);
    for (int c0 = 0; c0 < ncmp; c0 += KT) {
        const int nk = min(KT, ncmp - c0), stage = (c0 / KT) & (FWD_WG_STAGES - 1);
        if (FWD_WG_STAGES == 1) {   // the previous tile's readers passed the loop's last barrier
            issue(c0);
            cp_async_wait_all();
        } else if (c0 + KT < ncmp) {
            issue(c0 + KT);
            cp_async_wait_one();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        int lo[2 * CMT], hi[2 * CMT];
#pragma unroll
        for (int h = 0; h < 2 * CMT; ++h) {
            lo[h] = 0;
            hi[h] = min(max(vis[h] - c0, 0), nk);
        }
        const bf16_t* Kst = Ks + stage * (KT * KS_STRIDE + KT * VS_STRIDE);
        attn_tile<CMT>(Qs, Kst, Kst + KT * KS_STRIDE, row0, lo, hi, st, o);
        __syncthreads();
    }
#else
    for (int c0 = 0; c0 < ncmp; c0 += KT) {
        const int nk = min(KT, ncmp - c0);
        __syncthreads();
        load_rows_async<KT, DK, KS_STRIDE, 128>(Ks, kc + krow(c0) , nk, [&](int r) { return (i64)r * HKV * DK; });
        load_rows_async<KT, DV, VS_STRIDE, 128>(Vs, vc + vrow(c0), nk, [&](int r) { return (i64)r * HKV * DV; });
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
        int lo[2 * CMT], hi[2 * CMT];
#pragma unroll
        for (int h = 0; h < 2 * CMT; ++h) {
            lo[h] = 0;
            hi[h] = min(max(vis[h] - c0, 0), nk);
        }
        attn_tile<CMT>(Qs, Ks, Vs, row0, lo, hi, st, o);
    }
#endif
    cp_async_wait_all();
    // the first term of the gated sum (written), the row lse (pass 2 and the backward read it)
    // and o_cmp for the backward
    i64 qrow[2 * CMT];
#pragma unroll
    for (int h = 0; h < 2 * CMT; ++h) qrow[h] = valid[h] ? (i64)(start + tt[h]) * HQ + g * G + rr[h] % G : -1;
    finish_branch_rows<false, CMT>(qrow, st, o, gate, out, lse_out, o_save);

}

#else  // CMP_USE_WGMMA

// One key tile for the warpgroup's CMT m64 row tiles: S = Q K^T (wgmma, smem operands), the
// masked online softmax (as attn_tile in common.cu), O += P V (wgmma, P from registers).
// The second tile's scores compute while the first tile's softmax runs, and the first tile's
// P V while the second's softmax runs (wgmma groups: S0, S1, PV0, PV1, completed in order).
// Keys at or past hi[i] are masked only when `need_mask` (CTA-uniform: the tile reaches past some
// row's visible blocks); the running max is kept on raw scores and the scale folded into one FMA
// in front of exp2 (scale > 0: NsaConfig::validate).
__device__ __forceinline__ void wg_attn_tile(u32 qa, u32 ka, u32 va, bool need_mask,
                                             const int (&hi)[2 * CMT], RowStats<CMT>& st,
                                             float (&o)[CMT][DV / 8][4]) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
    float s[CMT][KT / 8][4];
    wg_fence();
#pragma unroll
    for (int mt = 0; mt < CMT; ++mt) {
        wg_qk<CMP_ROWS>(s[mt], qa, ka, mt);
        wg_commit();
    }
    u32 p[CMT][KT / 16][4];
#pragma unroll
    for (int mt = 0; mt < CMT; ++mt) {
        if (mt == 0)
            wg_wait<CMT - 1>();
        else
            wg_wait<1>();
        wg_pin(s[mt]);
        if (need_mask) {
#pragma unroll
            for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = nt * 8 + gc + (e & 1);
                    if (key >= hi[2 * mt + (e >> 1)]) s[mt][nt][e] = NEG_INF;
                }
        }
        wg_softmax_step<KT>(s[mt], st, mt, o[mt], p[mt]);
        wg_fence();
        wg_pv(o[mt], p[mt], va);
        wg_commit();
    }
    wg_wait<0>();
#pragma unroll
    for (int mt = 0; mt < CMT; ++mt) wg_pin(o[mt]);
}

// Pass 1 on wgmma: the CTA's 128 threads are one warpgroup; row tile mt (64 rows) belongs to all
// four warps (warp w: rows mt*64 + 16w .. +15). Q, K and V tiles are 128B-swizzled, unpadded
// (fits the padded mma.sync footprint the launcher reserves, with 1 KB for the alignment).
extern "C" __global__ void __launch_bounds__(128) cmp_attn(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    const float* __restrict__ gate, const int4* __restrict__ items, float* __restrict__ out,
    float* __restrict__ lse_out, bf16_t* __restrict__ o_save) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* Qs = align1024(smem_raw);             // [CMP_ROWS x DK]
    unsigned char* KVs = Qs + CMP_ROWS * DK * 2;         // FWD_WG_STAGES x (K [KT x DK], V [KT x DV])
    constexpr int K_BYTES = KT * DK * 2, STAGE_BYTES = KT * (DK + DV) * 2;

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z, cstart = it.w;
    const int g = blockIdx.y;
    const int npos = min(P_CMP, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int ncmp = cmp_visible(tmax);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2;

    load_tile_sw128<CMP_ROWS, DK, 128>(Qs, q, nrows, [&](int r) {
        return ((i64)(start + t0 + r / G) * HQ + g * G + r % G) * DK;
    });
    cp_async_commit();

    int rr[2 * CMT], tt[2 * CMT], vis[2 * CMT];
    bool valid[2 * CMT];
#pragma unroll
    for (int h = 0; h < 2 * CMT; ++h) {
        rr[h] = (h >> 1) * 64 + warp * 16 + gr + 8 * (h & 1);
        valid[h] = rr[h] < nrows;
        tt[h] = t0 + rr[h] / G;
        vis[h] = valid[h] ? cmp_visible(tt[h]) : 0;
    }
    auto krow = [&](int r) { return ((i64)(cstart + r) * HKV + g) * DK; };
    auto vrow = [&](int r) { return ((i64)(cstart + r) * HKV + g) * DV; };
    const int vis_lo = cmp_visible(t0);

    RowStats<CMT> st;
    rowstats_init(st);
    float o[CMT][DV / 8][4];
    zero_acc(o);
    auto issue = [&](int c0) {
        const int nk = min(KT, ncmp - c0), stage = (c0 / KT) & (FWD_WG_STAGES - 1);
        load_tile_sw128<KT, DK, 128>(KVs + stage * STAGE_BYTES, kc + krow(c0), nk,
                                     [&](int r) { return (i64)r * HKV * DK; });
        load_tile_sw128<KT, DV, 128>(KVs + stage * STAGE_BYTES + K_BYTES, vc + vrow(c0), nk,
                                     [&](int r) { return (i64)r * HKV * DV; });
        cp_async_commit();
    };
    if (FWD_WG_STAGES == 2 && ncmp > 0) issue(0);
    for (int c0 = 0; c0 < ncmp; c0 += KT) {
        const int nk = min(KT, ncmp - c0), stage = (c0 / KT) & (FWD_WG_STAGES - 1);
        if (FWD_WG_STAGES == 1) {   // the previous tile's readers passed the loop's last barrier
            issue(c0);
            cp_async_wait_all();
        } else if (c0 + KT < ncmp) {
            issue(c0 + KT);
            cp_async_wait_one();
        } else {
            cp_async_wait_all();
        }
        fence_proxy_async();   // cp.async wrote Q / this stage; the wgmma reads them (async proxy)
        __syncthreads();
        int hi[2 * CMT];
#pragma unroll
        for (int h = 0; h < 2 * CMT; ++h) hi[h] = min(max(vis[h] - c0, 0), nk);
        const u32 ka = smem_addr(KVs + stage * STAGE_BYTES);
        // rows of this CTA see at least cmp_visible(t0) blocks; rows past nrows (zero Q) stay finite
        wg_attn_tile(smem_addr(Qs), ka, ka + K_BYTES, c0 + KT > vis_lo, hi, st, o);
        __syncthreads();   // every wgmma of this stage completed before it is refilled
    }
    cp_async_wait_all();
    // the first term of the gated sum (written), the row lse (pass 2 and the backward read it)
    // and o_cmp for the backward
    i64 qrow[2 * CMT];
#pragma unroll
    for (int h = 0; h < 2 * CMT; ++h) qrow[h] = valid[h] ? (i64)(start + tt[h]) * HQ + g * G + rr[h] % G : -1;
    finish_branch_rows<false, CMT>(qrow, st, o, gate, out, lse_out, o_save);
}
#endif  // CMP_USE_WGMMA

// Pass 2's Q Kcmp^T on wgmma (sm_90a, dk a multiple of 64; -DCMP_NO_WGMMA: mma.sync): Q and K
// swizzled and unpadded, the thread's rows as in the wgmma pass 1, and the next K tile loaded as
// soon as this tile's scores are in registers (overlapping the group sum and the merges).
#if WG_AVAILABLE && !defined(CMP_NO_WGMMA) && DK % 64 == 0 && DK <= 256
#define TOPN_USE_WGMMA 1
#else
#define TOPN_USE_WGMMA 0
#endif

// The group sum (Eq. 10) in registers at G = 16 with the wgmma row layout: the 16 rows of warp w
// in m-tile mt are exactly the 16 heads of position mt * 4 + w, which is also the position that
// warp w merges (merge: p = warp, warp + 4). The per-row block scores never go through shared
// memory (no Ds stores, no group-sum loop, one barrier less per tile, none after a merge).
// Opt-in (-DTOPN_SHFL through NSA_CUDA_DEFINES): on the H100 it measured no faster than the
// shared-memory sum (bench/NOTES-cuda.md, v12), which stays the default.
#if TOPN_USE_WGMMA && G == 16 && defined(TOPN_SHFL)
#define TOPN_SHFL_SUM 1
#else
#define TOPN_SHFL_SUM 0
#endif

// Pass 2 (kernel `cmp_topn`): selection scores and the streaming top-n, from the row
// log-sum-exp of pass 1; writes sel_idx.
extern "C" __global__ void __launch_bounds__(128) cmp_topn(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const float* __restrict__ lse_in,
    const int4* __restrict__ items, int* __restrict__ sel_idx) {
    extern __shared__ __align__(16) unsigned char smem[];
#if TOPN_USE_WGMMA
    // [CMP_ROWS x DK] and [KT x DK], 1024-aligned (fits the padded footprint: (rows + 64) x 16 B spare)
    unsigned char* Qs = align1024(smem);
    unsigned char* Ks = Qs + CMP_ROWS * DK * 2;
    float* Ds = (float*)(Ks + KT * DK * 2);             // [CMP_ROWS][DS_STRIDE] per-row block scores
#else
    bf16_t* Qs = (bf16_t*)smem;
    bf16_t* Ks = Qs + CMP_ROWS * QS_STRIDE;
    float* Ds = (float*)(Ks + KT * KS_STRIDE);          // [CMP_ROWS][DS_STRIDE] per-row block scores
#endif
    float* score = Ds + CMP_ROWS * DS_STRIDE;
    float* topv = score + P_CMP * RING_STRIDE;         // [P_CMP][TOP_STRIDE] running top lists
    int* topi = (int*)(topv + P_CMP * TOP_STRIDE);
    bf16_t* Wt = (bf16_t*)(topi + P_CMP * TOP_STRIDE);   // [JW][WT_STRIDE] f16 bits

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z, cstart = it.w;
    const int g = blockIdx.y;
    const int npos = min(P_CMP, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int ncmp = cmp_visible(tmax);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, gc = (lane & 3) * 2;
#if TOPN_USE_WGMMA
    // row of (m16 tile mt, half h) of this thread: mt*64 + warp*16 + gr + 8h (wgmma layout)
#define TOPN_ROW(mt, h) ((mt) * 64 + warp * 16 + gr + 8 * (h))
    load_rows_sw128<CMP_ROWS, DK, 128>(Qs, q, nrows, [&](int r) {
        return ((i64)(start + t0 + r / G) * HQ + g * G + r % G) * DK;
    });
#else
    const int row0 = warp * 16 * CMT;
#define TOPN_ROW(mt, h) (row0 + (mt) * 16 + gr + 8 * (h))
    load_rows_async<CMP_ROWS, DK, QS_STRIDE, 128>(Qs, q, nrows, [&](int r) {
        return ((i64)(start + t0 + r / G) * HQ + g * G + r % G) * DK;
    });
#endif
    cp_async_commit();

    int rr[2 * CMT], tt[2 * CMT], vis[2 * CMT];
    bool valid[2 * CMT];
#pragma unroll
    for (int h = 0; h < 2 * CMT; ++h) {
        rr[h] = TOPN_ROW(h >> 1, h & 1);
        valid[h] = rr[h] < nrows;
        tt[h] = t0 + rr[h] / G;
        vis[h] = valid[h] ? cmp_visible(tt[h]) : 0;
    }
    auto krow = [&](int r) { return ((i64)(cstart + r) * HKV + g) * DK; };
    float lse[2 * CMT];
#pragma unroll
    for (int h = 0; h < 2 * CMT; ++h)
        lse[h] = valid[h] ? lse_in[(i64)(start + tt[h]) * HQ + g * G + rr[h] % G] : POS_INF;

    // ---- pass 2: selection scores and streaming top-n ----
    for (int e = tid; e < P_CMP * RING_STRIDE; e += 128) score[e] = 0.f;
    for (int e = tid; e < P_CMP * TOP_STRIDE; e += 128) {
        topv[e] = NEG_INF;
        topi[e] = INT_MAX_;
    }
    const int nsel_max = tmax / SEL_L + 1;   // admissible blocks of the last position
    int j_done = 0;                          // blocks [0, j_done) are merged into the top lists

#if LANE_MERGE
    // One thread per position p = tid: its running top-n, best first, in registers.
    float lv[NSEL];
    int li[NSEL];
#pragma unroll
    for (int k = 0; k < NSEL; ++k) {
        lv[k] = NEG_INF;
        li[k] = INT_MAX_;
    }
    // Inserts candidate (v, j). Candidates arrive in ascending j, above every index already in
    // the list, so (v, j) ranks before entry k iff v > lv[k] (`better` with a tie going to the
    // entry's lower index; empty entries hold -inf, and v >= 0). Branch-free over the list, so
    // it stays in registers: the entries from the insertion point on shift down by one.
    auto insert = [&](float v, int j) {
        bool b[NSEL];
#pragma unroll
        for (int k = 0; k < NSEL; ++k) b[k] = v > lv[k];
#pragma unroll
        for (int k = NSEL - 1; k > 0; --k)
            if (b[k]) {
                lv[k] = b[k - 1] ? lv[k - 1] : v;
                li[k] = b[k - 1] ? li[k - 1] : j;
            }
        if (b[0]) {
            lv[0] = v;
            li[0] = j;
        }
    };
    // The group sum (Eq. 10) of this tile's per-row block scores for position p, heads in a
    // fixed order, into its score ring.
    auto tile_sum = [&](const float* DsT, int j_lo, int nj) {
        const int p = tid;
        if (p >= npos) return;
        float* ring = score + p * RING_STRIDE;
        for (int jj = 0; jj < nj; ++jj) {
            float sum = 0.f;
#pragma unroll
            for (int hh = 0; hh < G; ++hh) sum += DsT[jj * DST_STRIDE + p * G + hh];
            ring[(j_lo + jj) % RING] += sum;
        }
    };
    // Merges candidate blocks [j_begin, j_end) into position p's list, 32 at a time: a first
    // sweep keeps in the ring only the blocks that beat the n-th best of the sweep's start (most
    // do not), the second inserts those in ascending order (a later one may no longer qualify:
    // the insertion then changes nothing). Empties the ring slots.
    auto merge = [&](int j_begin, int j_end) {
        const int p = tid;
        if (p >= npos) return;
        const int t = t0 + p, own = t / SEL_L;
        float* ring = score + p * RING_STRIDE;
        for (int jb = j_begin; jb < j_end; jb += 32) {
            const int cnt = min(32, j_end - jb);
            const float th = lv[NSEL - 1];
            unsigned m = 0;
#pragma unroll 4
            for (int c = 0; c < cnt; ++c) {
                const int j = jb + c;
                float* slot = ring + (j % RING);
                const bool forced = j < NINIT || (j <= own && j > own - NLOCAL);
                const float v = forced ? POS_INF : *slot;
                const bool win = j * SEL_L <= t && v > th;   // admissible and beats the n-th best
                *slot = win ? v : 0.f;
                m |= (unsigned)win << c;
            }
            while (m) {
                const int j = jb + __ffs(m) - 1;
                m &= m - 1;
                float* slot = ring + (j % RING);
                insert(*slot, j);
                *slot = 0.f;
            }
        }
    };
#else
    // merges candidate blocks [j_begin, j_end) into the top lists; one warp per position
    auto merge = [&](int j_begin, int j_end) {
        for (int p = warp; p < npos; p += 4) {
            const int t = t0 + p, own = t / SEL_L;
            float cv = topv[p * TOP_STRIDE + lane];
            int ci = topi[p * TOP_STRIDE + lane];
            bool changed = false;
            for (int jb = j_begin; jb < j_end; jb += 32) {
                const int j = jb + lane;
                float v = NEG_INF;
                int i = INT_MAX_;
                if (j < j_end) {
                    float* slot = score + p * RING_STRIDE + (j % RING);
                    const float sv = *slot;
                    *slot = 0.f;
                    const bool adm = j * SEL_L <= t;
                    const bool forced = j < NINIT || (j <= own && j > own - NLOCAL);
                    if (adm) {
                        v = forced ? POS_INF : sv;
                        i = j;
                    }
                }
                // the n-th best so far only improves: most candidates fail this one test
                const float tv = __shfl_sync(0xffffffff, cv, NSEL - 1);
                const int ti = __shfl_sync(0xffffffff, ci, NSEL - 1);
                unsigned m = __ballot_sync(0xffffffff, better(v, i, tv, ti));
                while (m) {
                    const int src = __ffs(m) - 1;
                    m &= m - 1;
                    const float nv = __shfl_sync(0xffffffff, v, src);
                    const int ni = __shfl_sync(0xffffffff, i, src);
                    const int pos = __popc(__ballot_sync(0xffffffff, better(cv, ci, nv, ni)));
                    const float uv = __shfl_up_sync(0xffffffff, cv, 1);
                    const int ui = __shfl_up_sync(0xffffffff, ci, 1);
                    if (lane == pos) {
                        cv = nv;
                        ci = ni;
                    } else if (lane > pos) {
                        cv = uv;
                        ci = ui;
                    }
                    changed = true;
                }
            }
            if (changed) {
                topv[p * TOP_STRIDE + lane] = cv;
                topi[p * TOP_STRIDE + lane] = ci;
            }
        }
    };
#endif

#if (KT * CMP_D) % SEL_L == 0
    // Every tile starts on a selection-block boundary (c0 * d is a multiple of l'), so W is the
    // same for every tile: overlap(c0 + i, j_lo + jj) = overlap(i, jj). Entries past the tile
    // (i >= nk, jj >= nj) meet p = 0 or go unread.
    for (int e = tid; e < JW * KT; e += 128) {
        const int jj = e / KT, i = e % KT;
        Wt[jj * WT_STRIDE + i] = f32_to_f16(overlap_w(i, jj));
    }
#endif
    // rows of this CTA see at least vis_lo compressed tokens: tiles below it need no mask
    const int vis_lo = cmp_visible(t0);
    __syncthreads();
#ifndef EXP_NO_PASS2
    for (int c0 = 0; c0 < ncmp; c0 += KT) {
        const int nk = min(KT, ncmp - c0);
        const int c1 = c0 + nk;
        const int j_lo = (c0 * CMP_D) / SEL_L;
        const int j_hi = ((c1 - 1) * CMP_D + CMP_L - 1) / SEL_L;   // inclusive
        const int nj = j_hi - j_lo + 1;                           // <= JSPAN <= JW
#if TOPN_USE_WGMMA
        if (c0 == 0) {   // later tiles were issued by the previous iteration
            load_rows_sw128<KT, DK, 128>(Ks, kc + krow(c0), nk, [&](int r) { return (i64)r * HKV * DK; });
            cp_async_commit();
        }
#else
        load_rows_async<KT, DK, KS_STRIDE, 128>(Ks, kc + krow(c0), nk, [&](int r) { return (i64)r * HKV * DK; });
        cp_async_commit();
#endif
#if (KT * CMP_D) % SEL_L != 0
        // W^T for this tile: Wt[jj][i] = overlap(c0 + i, j_lo + jj), 0 outside the tile
        for (int e = tid; e < JW * KT; e += 128) {
            const int jj = e / KT, i = e % KT;
            const float w = (i < nk && jj < nj) ? overlap_w(c0 + i, j_lo + jj) : 0.f;
            Wt[jj * WT_STRIDE + i] = f32_to_f16(w);
        }
#endif
        cp_async_wait_all();
#if TOPN_USE_WGMMA
        fence_proxy_async();   // cp.async wrote Q / K; the wgmma reads them
#endif
        __syncthreads();
        {
            float s[CMT][KT / 8][4];
#if TOPN_USE_WGMMA
            wg_fence();
#pragma unroll
            for (int mt = 0; mt < CMT; ++mt) wg_qk<CMP_ROWS>(s[mt], smem_addr(Qs), smem_addr(Ks), mt);
            wg_commit();
            wg_wait<0>();
#pragma unroll
            for (int mt = 0; mt < CMT; ++mt) wg_pin(s[mt]);
#else
            qk_tile<CMT>(Qs, Ks, row0, s);
#endif
            if (c0 + KT > vis_lo) {   // CTA-uniform: some row sees only part of this tile
#pragma unroll
                for (int mt = 0; mt < CMT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int h = 2 * mt + (e >> 1), key = nt * 8 + gc + (e & 1);
                            const int hi = min(max(vis[h] - c0, 0), nk);
                            s[mt][nt][e] = key < hi ? exp2f(fmaf(s[mt][nt][e], SCALE_LOG2, -lse[h])) : 0.f;
                        }
            } else {   // rows past nrows have lse = +inf: p = 0
#pragma unroll
                for (int mt = 0; mt < CMT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            s[mt][nt][e] = exp2f(fmaf(s[mt][nt][e], SCALE_LOG2, -lse[2 * mt + (e >> 1)]));
            }
            // per-row block scores D = P W on the tensor cores (f16 operands, f32 accumulation)
            float d[CMT][JW / 8][4];
#pragma unroll
            for (int mt = 0; mt < CMT; ++mt)
#pragma unroll
                for (int nt = 0; nt < JW / 8; ++nt) d[mt][nt][0] = d[mt][nt][1] = d[mt][nt][2] = d[mt][nt][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < KT / 16; ++kc) {
                u32 a[CMT][4];
#pragma unroll
                for (int mt = 0; mt < CMT; ++mt) {
                    a[mt][0] = pack_f16x2(s[mt][2 * kc][0], s[mt][2 * kc][1]);
                    a[mt][1] = pack_f16x2(s[mt][2 * kc][2], s[mt][2 * kc][3]);
                    a[mt][2] = pack_f16x2(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
                    a[mt][3] = pack_f16x2(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
                }
#pragma unroll
                for (int nt = 0; nt < JW / 8; ++nt) {
                    const bf16_t* w0 = Wt + (nt * 8 + gr) * WT_STRIDE + kc * 16 + gc;
                    const u32 b0 = *(const u32*)w0, b1 = *(const u32*)(w0 + 8);
#pragma unroll
                    for (int mt = 0; mt < CMT; ++mt) mma_f16(d[mt][nt], a[mt], b0, b1);
                }
            }
#if TOPN_SHFL_SUM
#ifndef EXP_NO_SCORE
            // this thread holds heads gr and gr + 8 of position mt * 4 + warp; the butterfly over
            // the 8 lanes of equal gc adds the rest (a fixed order: every run gives the same bits)
#pragma unroll
            for (int mt = 0; mt < CMT; ++mt) {
                const int p = mt * 4 + warp;
#pragma unroll
                for (int nt = 0; nt < JW / 8; ++nt)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        float v = d[mt][nt][c] + d[mt][nt][2 + c];
                        v += __shfl_xor_sync(0xffffffff, v, 4);
                        v += __shfl_xor_sync(0xffffffff, v, 8);
                        v += __shfl_xor_sync(0xffffffff, v, 16);
                        const int jj = nt * 8 + gc + c;
                        if (gr == 0 && jj < nj && p < npos) score[p * RING_STRIDE + ((j_lo + jj) % RING)] += v;
                    }
            }
#endif
#elif LANE_MERGE
#pragma unroll
            for (int mt = 0; mt < CMT; ++mt)
#pragma unroll
                for (int nt = 0; nt < JW / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        Ds[(nt * 8 + gc + (e & 1)) * DST_STRIDE + TOPN_ROW(mt, e >> 1)] = d[mt][nt][e];
#else
#pragma unroll
            for (int mt = 0; mt < CMT; ++mt)
#pragma unroll
                for (int nt = 0; nt < JW / 8; ++nt) {
                    const int r = TOPN_ROW(mt, 0);
                    *(float2*)(Ds + r * DS_STRIDE + nt * 8 + gc) = make_float2(d[mt][nt][0], d[mt][nt][1]);
                    *(float2*)(Ds + (r + 8) * DS_STRIDE + nt * 8 + gc) = make_float2(d[mt][nt][2], d[mt][nt][3]);
                }
#endif
        }
        // TOPN_SHFL_SUM: also orders this warp's score updates before its merge below
        __syncthreads();
#if TOPN_USE_WGMMA
        // every wgmma of this tile completed (each thread waited before the barrier): refill K
        if (c0 + KT < ncmp) {
            load_rows_sw128<KT, DK, 128>(Ks, kc + krow(c0 + KT), min(KT, ncmp - c0 - KT),
                                         [&](int r) { return (i64)r * HKV * DK; });
            cp_async_commit();
        }
#endif
#if LANE_MERGE
        // thread p alone owns position p's ring and list: no barrier after these (the next
        // tile's Ds stores come after its first barrier)
#ifndef EXP_NO_SCORE
        tile_sum(Ds, j_lo, nj);
#endif
#ifndef EXP_NO_MERGE
        {
            const int j_fin = min((c1 * CMP_D) / SEL_L, nsel_max);
            if (j_fin > j_done) {
                merge(j_done, j_fin);
                j_done = j_fin;
            }
        }
#endif
#elif !defined(EXP_NO_SCORE)
#if !TOPN_SHFL_SUM
        // group sum (Eq. 10) into the per-position score ring, heads in a fixed order
        for (int e = tid; e < npos * nj; e += 128) {
            const int p = e / nj, jj = e % nj;
            float sum = 0.f;
            for (int hh = 0; hh < G; ++hh) sum += Ds[(p * G + hh) * DS_STRIDE + jj];
            score[p * RING_STRIDE + ((j_lo + jj) % RING)] += sum;
        }
        __syncthreads();
#endif
        // blocks whose last overlapping compressed block is < c1 are complete
        const int j_fin = min((c1 * CMP_D) / SEL_L, nsel_max);
#ifndef EXP_NO_MERGE
        // merging every MERGE_EVERY tiles (uniform across the CTA) saves barriers; the ring
        // still holds every pending block (see MERGE_EVERY)
        if (j_fin > j_done && (c0 / KT) % MERGE_EVERY == MERGE_EVERY - 1) {
            merge(j_done, j_fin);
            j_done = j_fin;
#if TOPN_SHFL_SUM
            // the positions this warp merged are written only by this warp (the next tile's
            // first barrier orders the rest)
            __syncwarp();
#else
            __syncthreads();
#endif
        }
#endif
#endif
    }
#endif
    merge(j_done, nsel_max);
#if LANE_MERGE
    if (tid < npos) {
#pragma unroll
        for (int k = 0; k < NSEL; ++k) {
            topv[tid * TOP_STRIDE + k] = lv[k];
            topi[tid * TOP_STRIDE + k] = li[k];
        }
    }
    __syncthreads();   // the lists were written by thread p, the output reads them by warp
#else
    __syncwarp();
#endif

    // ---- output: the n best, ascending block order, padded with -1 ----
    for (int p = warp; p < npos; p += 4) {
        const float v = lane < NSEL ? topv[p * TOP_STRIDE + lane] : NEG_INF;
        const int i = lane < NSEL ? topi[p * TOP_STRIDE + lane] : INT_MAX_;
        int key = (lane < NSEL && v != NEG_INF) ? i : INT_MAX_;
        key = warp_sort_asc_int(key);
        if (lane < NSEL)
            sel_idx[((i64)(start + t0 + p) * HKV + g) * NSEL + lane] = key == INT_MAX_ ? -1 : key;
    }
#undef TOPN_ROW
}
