// Hopper wgmma (sm_90a) path of the key-major dK/dV kernels (cmp_bwd_dkdv, win_bwd_dkdv,
// sel_bwd_dkdv). Prepended after wgmma.cu (whose helpers it uses) to the compressed, window and
// selection backward families by cuda/backward/kernels.rs. Used when BW_WG is 1: sm_90a, dk 64,
// 128 or 192, dv 64 or 128, and not built with -DBWD_NO_WGMMA (then the mma.sync path of
// bwd_common.cu runs, as on sm_80); at dk 192 -DBW_WG_NO_192 restores the mma.sync kernels (the
// pre-v16 build) and -DBW_WG_NO_192_DQ only the dQ ones.
//
// One CTA = one warpgroup (4 warps) and the same 64 keys and work lists as the mma.sync path
// (host side unchanged but for the footprint: BW_WG_KV_SMEM, two buffers of BW_WG_RT = 64 query
// rows, 32 at dk 192, which `smem_of` in cuda/backward.rs mirrors). Per row step of RT rows, with
// warp w owning keys 16w .. 16w + 15 (the wgmma accumulator rows):
//   S^T  (64 keys x RT rows) = K Q^T          SS, K-major A (K tile) and B (Q rows), m64n{RT}k16
//   dP^T (64 keys x RT rows) = V dO^T         SS, K-major, m64n{RT}k16
//   P^T = g * exp2(S^T * scale - lse), dS^T = P^T (dP^T - dg)   (registers, as on mma.sync)
//   dV  += P^T dO                             RS (P^T as A fragments), dO read MN-major
//   dK  += dS^T Q                             RS, Q read MN-major
// dV / dK of step i stay in flight into step i + 1 (waited for after its S^T / dP^T are issued;
// then a barrier and step i + 2's row loads into step i's buffer); -DBW_WG_NO_DEFER waits at the
// end of each step instead.
// The accumulator layout per warp is the mma.sync C layout, so bw_store_kv writes dK / dV
// unchanged. Every sum runs in the same order on every run (no atomics): bitwise repeatable.

#if WG_AVAILABLE && !defined(BWD_NO_WGMMA) && (DK == 64 || DK == 128 || (DK == 192 && !defined(BW_WG_NO_192))) && \
    (DV == 64 || DV == 128)
#define BW_WG 1
#else
#define BW_WG 0
#endif
// The row-major dQ pass (cmp_bwd_dq_saved, win_bwd_dq_saved) on wgmma: with BW_WG, unless dk =
// 192 and -DBW_WG_NO_192_DQ (then only the key-major kernels run on wgmma at dk 192). The host
// (`smem_of` in cuda/backward.rs) mirrors both switches in its footprints.
#if BW_WG && !(DK == 192 && defined(BW_WG_NO_192_DQ))
#define BW_WG_DQ 1
#else
#define BW_WG_DQ 0
#endif
// Key warpgroups per CTA of the compressed and window key-major kernels (cmp_bwd_dkdv,
// win_bwd_dkdv; NOTES-cuda-bwd.md v19): two on wgmma with 64-row steps, i.e. 128 keys and 256
// threads per CTA, the two warpgroups sharing each row step's q / do rows in shared memory (half
// the row traffic per key: those kernels were bound by L2 / DRAM at 64 keys); one otherwise, or
// with -DBW_KM_ONE_WG (v16's CTAs). The selection kernels keep one. cuda/backward.rs mirrors it
// (`WgPaths::km_two`, the key warpgroups in `smem_of`).
#if BW_WG && !defined(BW_KM_ONE_WG) && ((defined(BW_WG_RT) && BW_WG_RT == 64) || (!defined(BW_WG_RT) && DK != 192))
#define BW_KM_KW 2
#else
#define BW_KM_KW 1
#endif
#define BW_KM_KEYS (64 * BW_KM_KW)

#if BW_WG

// Query rows per key-major row step on wgmma: 64 (default: S^T / dP^T are m64n64k16, which read
// 4 KB of shared memory per 32 K MAC instead of n32's 3 KB per 16 K, and half the steps, barriers
// and waits), or 32 with -DBW_WG_RT=32 (v8's step). The host's footprint (`smem_of` in
// cuda/backward.rs) allows 64: BW_WG_KV_SMEM below. At dk = 192 the default is 32 (and the host
// reserves 32-row buffers): dK (96 f32 per thread) + dV (64) + S^T / dP^T (2 x 32 at 64 rows)
// would not fit 255 registers.
#ifndef BW_WG_RT
#if DK == 192
#define BW_WG_RT 32
#else
#define BW_WG_RT 64
#endif
#endif
#if BW_WG_RT != 32 && BW_WG_RT != 64
#error "BW_WG_RT must be 32 or 64"
#endif
// The row-major dQ step defers each tile's dQ products past the next tile's load (BW_DQ_DEFER,
// see bw_wg_pipeline): the default since v13 (64k: cmp_dq 16.5 -> 13.7 ms, cuda_backward 16/16 on
// the H100); -DBW_DQ_NO_DEFER restores v11's order.
#if !defined(BW_DQ_NO_DEFER) && !defined(BW_DQ_DEFER)
#define BW_DQ_DEFER
#endif

// D (m64 x n32, f32) (+)= A (64 x 16, smem descriptor) * B (16 x n32, smem descriptor), both
// K-major.
template <int SCALE_D>
__device__ __forceinline__ void bw_wg_ss_n32(float (&d)[4][4], unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." ELEM_PTX "." ELEM_PTX " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
        : "l"(da), "l"(db), "n"(SCALE_D));
}
// The same with n64 (K-major B).
template <int SCALE_D>
__device__ __forceinline__ void bw_wg_ss_n(float (&d)[8][4], unsigned long long da, unsigned long long db) {
    wg_ss_n64<SCALE_D, 0>(d, da, db);
}
template <int SCALE_D>
__device__ __forceinline__ void bw_wg_ss_n(float (&d)[4][4], unsigned long long da, unsigned long long db) {
    bw_wg_ss_n32<SCALE_D>(d, da, db);
}

// C (64 x D) += A (64 x 16, registers) * B (16 x D, MN-major smem descriptor): one wgmma of the
// accumulator's width (the overload picks n64, n128 or, at dk = 192, n192 by the array size).
__device__ __forceinline__ void bw_wg_rs(float (&c)[16][4], const u32 (&a)[4], unsigned long long b) {
    wg_rs_n128<1, 1>(c, a, b);
}
__device__ __forceinline__ void bw_wg_rs(float (&c)[8][4], const u32 (&a)[4], unsigned long long b) {
    wg_rs_n64<1, 1>(c, a, b);
}
#if DK == 192
// D (m64 x n192, f32) (+)= A (64 x 16, registers: the m16n8k16 A fragment of warp w's rows) *
// B (16 x n192, smem descriptor): dK += dS^T Q and dQ += dS K at dk = 192 (one wgmma reads the A
// fragments once; MN-major B spans three 64-element column blocks LBO bytes apart, as n128 two).
template <int SCALE_D, int TRANS_B>
__device__ __forceinline__ void bw_wg_rs_n192(float (&d)[24][4], const u32 (&a)[4], unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %101, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32." ELEM_PTX "." ELEM_PTX " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95}, {%96,%97,%98,%99}, %100, p, 1, 1, %102;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]),
          "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]),
          "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]),
          "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]),
          "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]), "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(SCALE_D), "n"(TRANS_B));
}
__device__ __forceinline__ void bw_wg_rs(float (&c)[24][4], const u32 (&a)[4], unsigned long long b) {
    bw_wg_rs_n192<1, 1>(c, a, b);
}
#endif

// S (64 x BW_WG_RT) = A B^T over D: A the swizzled [64 x D] key-side tile at `a0`, B the swizzled
// [BW_WG_RT x D] row tile at `b0` (both K-major). Issues D / 16 wgmmas (caller fences / commits).
template <int D>
__device__ __forceinline__ void bw_wg_nt(float (&s)[BW_WG_RT / 8][4], u32 a0, u32 b0) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const u32 a = a0 + (kk >> 2) * (64 * 128) + (kk & 3) * 32;
        const u32 b = b0 + (kk >> 2) * (BW_WG_RT * 128) + (kk & 3) * 32;
        if (kk == 0)
            bw_wg_ss_n<0>(s, wg_desc(a, 16, 1024), wg_desc(b, 16, 1024));
        else
            bw_wg_ss_n<1>(s, wg_desc(a, 16, 1024), wg_desc(b, 16, 1024));
    }
}

// C (64 x D) += X (64 x BW_WG_RT, registers: x[kc] = A fragment of rows 16kc .. 16kc + 15) times
// the swizzled row tile [BW_WG_RT x D] at `m0`, read MN-major (N = D contiguous; column blocks of
// 64 are BW_WG_RT * 128 bytes apart, the next 8 rows 1024 bytes).
template <int D>
__device__ __forceinline__ void bw_wg_acc(float (&c)[D / 8][4], const u32 (&x)[BW_WG_RT / 16][4], u32 m0) {
#pragma unroll
    for (int kc = 0; kc < BW_WG_RT / 16; ++kc)
        bw_wg_rs(c, x[kc], wg_desc(m0 + kc * 16 * 128, BW_WG_RT * 128, 1024));
}

// The accumulator tile (64 x BW_WG_RT, f32) as A fragments of the element type.
__device__ __forceinline__ void bw_wg_frags(u32 (&a)[BW_WG_RT / 16][4], const float (&p)[BW_WG_RT / 8][4]) {
#pragma unroll
    for (int kc = 0; kc < BW_WG_RT / 16; ++kc) {
        a[kc][0] = pack_bf16x2(p[2 * kc][0], p[2 * kc][1]);
        a[kc][1] = pack_bf16x2(p[2 * kc][2], p[2 * kc][3]);
        a[kc][2] = pack_bf16x2(p[2 * kc + 1][0], p[2 * kc + 1][1]);
        a[kc][3] = pack_bf16x2(p[2 * kc + 1][2], p[2 * kc + 1][3]);
    }
}

// Shared memory (bytes from the 1024-aligned base): K [64 x DK], V [64 x DV], two row buffers
// (q [BW_WG_RT x DK], do [BW_WG_RT x DV]), then two metadata blocks (lse, dg, gate, t; BW_WG_RT
// each). BW_WG_KV_SMEM (with the 1 KB of alignment slack) is what the host's `smem_of` gives the
// key-major kernels on sm_90a.
#define BW_WG_KV_BYTES (64 * (DK + DV) * 2)
#define BW_WG_ROW_BYTES (BW_WG_RT * (DK + DV) * 2)
#define BW_WG_KV_SMEM (1024 + BW_WG_KV_BYTES + 2 * BW_WG_ROW_BYTES + 2 * BW_WG_RT * 16)
// ... with KW key warpgroups (KW K/V tiles, the same row buffers)
#define BW_WG_KV_SMEM_KW(KW) (BW_WG_KV_SMEM + ((KW) - 1) * BW_WG_KV_BYTES)

// Loads `nk` keys / values of KV head g (row stride HKV * D in global) into the swizzled K / V
// tiles at `sm` (1024-aligned); one commit group.
// With KW key warpgroups (BW_KM_KW) the CTA holds KW such tiles BW_WG_KV_BYTES apart, keys 64w ..
// 64w + 63 in warpgroup w's, each loaded by its own 128 threads.
template <int KW = 1>
__device__ __forceinline__ void bw_wg_load_kv(unsigned char* sm, const bf16_t* __restrict__ k,
                                              const bf16_t* __restrict__ v, i64 first_row, int g, int nk) {
    if constexpr (KW == 1) {
        load_tile_sw128<64, DK, 128>(sm, k + (first_row * HKV + g) * DK, nk,
                                     [&](int r) { return (i64)r * HKV * DK; });
        load_tile_sw128<64, DV, 128>(sm + 64 * DK * 2, v + (first_row * HKV + g) * DV, nk,
                                     [&](int r) { return (i64)r * HKV * DV; });
    } else {
        const unsigned w = threadIdx.x >> 7, tid = threadIdx.x & 127;
        const i64 row = first_row + 64 * w;
        const int n = min(max(nk - 64 * (int)w, 0), 64);
        unsigned char* t = sm + w * BW_WG_KV_BYTES;
        load_tile_sw128_by<64, DK, 128>(t, k + (row * HKV + g) * DK, n, [&](int r) { return (i64)r * HKV * DK; }, tid);
        load_tile_sw128_by<64, DV, 128>(t + 64 * DK * 2, v + (row * HKV + g) * DV, n,
                                        [&](int r) { return (i64)r * HKV * DV; }, tid);
    }
    cp_async_commit();
}

#ifndef BW_WG_LOAD_UNROLL
#define BW_WG_LOAD_UNROLL 2
#endif
// Loads `nrows` (position, head) rows of q and do (row r at element row qrow(r) of both) into the
// swizzled [BW_WG_RT x DK] / [BW_WG_RT x DV] tiles at `qdst` / `ddst`, zero-filling the rest
// (cp.async; the caller commits). With dk = dv one row index serves both tensors (one qrow, i.e.
// one index-list read in the selection kernel, per row and thread instead of two).
template <int NT = 128, class QRow>
__device__ __forceinline__ void bw_wg_load_rows(unsigned char* qdst, unsigned char* ddst, const bf16_t* __restrict__ q,
                                                const bf16_t* __restrict__ dO, int nrows, QRow qrow) {
    if constexpr (DK == DV) {
        constexpr int CH = DK / 8, RPI = NT / CH;   // 16-byte chunks per row, rows per pass
        const int k = threadIdx.x % CH, r0 = threadIdx.x / CH;
#pragma unroll BW_WG_LOAD_UNROLL
        for (int it = 0; it < BW_WG_RT / RPI; ++it) {
            const int r = r0 + it * RPI;
            const bool ok = r < nrows;
            const i64 row = ok ? qrow(r) : 0;
            const u32 off = sw128_off<BW_WG_RT>(r, k);
            cp_async16(qdst + off, q + row * DK + k * 8, ok ? 16 : 0);
            cp_async16(ddst + off, dO + row * DV + k * 8, ok ? 16 : 0);
        }
    } else {
        load_tile_sw128<BW_WG_RT, DK, NT>(qdst, q, nrows, [&](int r) { return qrow(r) * DK; });
        load_tile_sw128<BW_WG_RT, DV, NT>(ddst, dO, nrows, [&](int r) { return qrow(r) * DV; });
    }
}

// One row step on wgmma: S^T and dP^T issued together, P computed while dP^T runs, dV issued as
// soon as P is packed, dK after dS. DEFER = false: returns with every wgmma of the step
// complete. DEFER = true: after issuing S^T / dP^T it waits for the previous step's dV / dK
// (wg_wait<2>) and calls mid() (a barrier, then the next rows' loads into that step's buffer);
// returns with this step's dV / dK still in flight (the caller waits after the last step).
// DEFER = false calls mid() right after issuing S^T / dP^T (the fused selection kernel stages its
// next rows there).
// Row metadata (lse, dg, gate, t; BW_WG_RT each) is read from shared memory where it is used: the
// thread's columns of S^T are the row pairs nt * 8 + gc, + 1 (one 8-byte load per pair).
// ds_hook(dst) sees dS^T (f32, this thread's part, layout of S^T) once dK is issued (the fused
// selection kernel stores it for its dQ; the other callers pass bw_no_ds_hook).
// In a CTA of two key warpgroups (bw_wg_dkdv_rows<2>) ks / vs are the warpgroup's own tile and
// the keys ok() sees are the CTA's (warp w: 16w .. 16w + 15, i.e. 64 + .. in the second).
template <bool DEFER, class Ok, class Mid, class DsHook>
__device__ __forceinline__ void bw_wg_dkdv_step(u32 ks, u32 vs, u32 qs, u32 dos, const float* rlse,
                                                const float* rdg, const float* rgate, const int* rt, Ok ok,
                                                Mid mid, float (&dk)[DK / 8][4], float (&dv)[DV / 8][4],
                                                DsHook ds_hook) {
    constexpr int NT = BW_WG_RT / 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    const int key0 = warp * 16;
    float st[NT][4], dpt[NT][4];
    wg_fence();
    bw_wg_nt<DK>(st, ks, qs);
    wg_commit();
    bw_wg_nt<DV>(dpt, vs, dos);
    wg_commit();
    if (DEFER) wg_wait<2>();   // the previous step's dV / dK (older groups complete first)
    mid();
    wg_wait<1>();
    wg_pin(st);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int row = nt * 8 + gc;
        const float2 lse2 = *(const float2*)(rlse + row), gate2 = *(const float2*)(rgate + row);
        const int2 t2 = *(const int2*)(rt + row);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = key0 + gr + 8 * (e >> 1);
            const int t = (e & 1) ? t2.y : t2.x;
            const float p = (t >= 0 && ok(key, t)) ? exp2f(st[nt][e] * SCALE_LOG2 - ((e & 1) ? lse2.y : lse2.x)) : 0.f;
            st[nt][e] = ((e & 1) ? gate2.y : gate2.x) * p;
        }
    }
    u32 pa[BW_WG_RT / 16][4];
    bw_wg_frags(pa, st);
    wg_fence();
    bw_wg_acc<DV>(dv, pa, dos);
    wg_commit();
    wg_wait<1>();   // dP^T (older than the dV group) is complete
    wg_pin(dpt);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const float2 dg2 = *(const float2*)(rdg + nt * 8 + gc);
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[nt][e] = st[nt][e] * (dpt[nt][e] - ((e & 1) ? dg2.y : dg2.x));
    }
    u32 da[BW_WG_RT / 16][4];
    bw_wg_frags(da, dpt);
    wg_fence();
    bw_wg_acc<DK>(dk, da, qs);
    wg_commit();
    ds_hook(dpt);
    if (!DEFER) {
        wg_wait<0>();
        wg_pin(dk);
        wg_pin(dv);
    }
}

// The ds_hook of the key-major callers that need no dS^T.
struct BwNoDsHook {
    template <class T>
    __device__ __forceinline__ void operator()(const T&) const {}
};
#define bw_no_ds_hook BwNoDsHook()

// Loads the virtual rows [rho0, rho0 + BW_WG_RT) of a key-major walk (row rho = position rho / G,
// head g * G + rho % G; tok_of(position) its packed token, t_of(token) its seq-local position)
// into the swizzled q / do buffers at qdst / ddst (one commit group) and their lse, dg, gate and t
// into the metadata block m (bw_stage_meta). NT: the CTA's threads (128 per key warpgroup).
template <int NT = 128, class TokOf, class TOf>
__device__ __forceinline__ void bw_wg_stage_rows(unsigned char* qdst, unsigned char* ddst, float* m, const bf16_t* q,
                                                const bf16_t* dO, const float* lse, const float* dg, const float* gate,
                                                int g, int rho0, int nrows_total, TokOf tok_of, TOf t_of) {
    const int nrows = min(BW_WG_RT, nrows_total - rho0);
    auto qrow = [&](int r) {
        const int rho = rho0 + r;
        return (i64)tok_of(rho / G) * HQ + g * G + rho % G;
    };
    bw_wg_load_rows<NT>(qdst, ddst, q, dO, nrows, qrow);
#ifdef BW_WG_SYNC_META
    cp_async_commit();
    bw_stage_meta<BW_WG_RT>(m, rho0, nrows, qrow, tok_of, t_of, lse, dg, gate);
#else
    // lse, dg, gate by 4-byte cp.async in the rows' group (v21; -DBW_WG_SYNC_META: plain loads,
    // which stalled the staging threads, and with them their warpgroup's next wgmma, on every step)
    bw_stage_meta<BW_WG_RT, true>(m, rho0, nrows, qrow, tok_of, t_of, lse, dg, gate);
    cp_async_commit();
#endif
}

// bw_dkdv_rows on wgmma: the K/V tile (bw_wg_load_kv, committed before) at `sm`, the same
// virtual rows in steps of BW_WG_RT, double-buffered, metadata and masks. With KW = 2 key
// warpgroups (BW_KM_KW) the CTA's 256 threads share the row buffers (after the KW K/V tiles):
// warpgroup w runs the step on its own tile (keys 64w .. 64w + 63 of the CTA's, as ok() and
// bw_store_kv number them: warp w' owns keys 16w' ..).
template <int KW = 1, class TokOf, class TOf, class Ok>
__device__ __forceinline__ void bw_wg_dkdv_rows(unsigned char* sm, const bf16_t* __restrict__ q,
                                                const bf16_t* __restrict__ dO, const float* __restrict__ lse,
                                                const float* __restrict__ dg, const float* __restrict__ gate,
                                                int g, int nrows_total, TokOf tok_of, TOf t_of, Ok ok,
                                                float (&dk)[DK / 8][4], float (&dv)[DV / 8][4]) {
    constexpr int RT = BW_WG_RT;
    u32 dyn_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_smem));
    if (dyn_smem < BW_WG_KV_SMEM_KW(KW)) __trap();   // the host's footprint (smem_of) is out of date
    unsigned char* rowbuf = sm + KW * BW_WG_KV_BYTES;
    auto Qb = [&](int b) { return rowbuf + b * BW_WG_ROW_BYTES; };
    auto dOb = [&](int b) { return Qb(b) + RT * DK * 2; };
    auto meta = [&](int b) { return (float*)(rowbuf + 2 * BW_WG_ROW_BYTES + b * RT * 16); };
    auto stage = [&](int rho0, int b) {
        bw_wg_stage_rows<128 * KW>(Qb(b), dOb(b), meta(b), q, dO, lse, dg, gate, g, rho0, nrows_total, tok_of,
                                   t_of);
    };
    const int w = KW == 1 ? 0 : threadIdx.x >> 7;
    const u32 ks = smem_addr(sm) + w * BW_WG_KV_BYTES, vs = ks + 64 * DK * 2;

    if (nrows_total > 0) stage(0, 0);
#ifndef BW_WG_NO_DEFER
    // (default; -DBW_WG_NO_DEFER: the v7 order, every step's products waited for at its end)
    // step i + 1's rows load after step i's S^T / dP^T are issued and step i - 1's dV / dK
    // (which read that buffer) are complete in every warp; dK of step i overlaps step i + 1
    for (int i = 0, rho0 = 0; rho0 < nrows_total; ++i, rho0 += RT) {
        const int b = i & 1;
        cp_async_wait_all();
        fence_proxy_async();   // this thread's cp.async writes, before the wgmmas read them
        __syncthreads();       // step i's rows and metadata are visible
        const float* m = meta(b);
        bw_wg_dkdv_step<true>(
            ks, vs, smem_addr(Qb(b)), smem_addr(dOb(b)), m, m + RT, m + 2 * RT, (const int*)(m + 3 * RT), ok,
            [&]() {
                __syncthreads();   // every warp's step i - 1 products are done: buffer b ^ 1 is free
                if (rho0 + RT < nrows_total) stage(rho0 + RT, b ^ 1);
            },
            dk, dv, bw_no_ds_hook);
    }
    wg_wait<0>();
    wg_pin(dk);
    wg_pin(dv);
#else
    for (int i = 0, rho0 = 0; rho0 < nrows_total; ++i, rho0 += RT) {
        const int b = i & 1;
        if (rho0 + RT < nrows_total) {
            stage(rho0 + RT, b ^ 1);
            bw_cp_async_wait_1();
        } else {
            cp_async_wait_all();
        }
        fence_proxy_async();   // this thread's cp.async writes, before the wgmmas read them
        __syncthreads();       // step i's rows and metadata are visible
        const float* m = meta(b);
        bw_wg_dkdv_step<false>(ks, vs, smem_addr(Qb(b)), smem_addr(dOb(b)), m, m + RT, m + 2 * RT,
                               (const int*)(m + 3 * RT), ok, []() {}, dk, dv, bw_no_ds_hook);
        __syncthreads();   // buffer b is free for step i + 2
    }
#endif
}

// ---- row-major dQ pass on wgmma (cmp_bwd_dq_saved, win_bwd_dq_saved) ----
// One CTA = one warpgroup and 64 query rows (warp w: rows 16w .. 16w + 15, as on mma.sync), the
// statistics from the forward (SAVED mode only; the recompute mode keeps mma.sync). Per key tile:
//   S  (64 rows x 64 keys) = Q K^T     SS, K-major, m64n64k16 (wg_qk)
//   dP (64 rows x 64 keys) = dO V^T    SS, K-major, m64n64k16
//   dS = g * P * (dP - dg)             registers
//   dQ += dS K                         RS, K tile read MN-major, m64n{64,128,192}k16
// Shared memory (from the 1024-aligned base): Q [64 x DK], dO [64 x DV], BW_WG_DQ_STAGES K/V
// tile buffers: two, but one at dk = 192, where Q, dO and two tiles would take 120 KB (+1 KB of
// alignment slack: one CTA per SM); with one tile 80 KB, two CTAs per SM, each tile's load
// exposed within its CTA but hidden by the other CTA. Measured at 64k, 192/128 (NOTES-cuda-bwd.md
// v16): cmp_dq 23.5 -> 21.6 ms, win_dq 8.7 -> 6.7 with one buffer. -DBW_WG_DQ_2BUF restores two
// at dk = 192. The host's `smem_of` mirrors the switch.
#define BW_WG_Q_BYTES (64 * (DK + DV) * 2)
#if DK == 192 && !defined(BW_WG_DQ_2BUF)
#define BW_WG_DQ_STAGES 1
#else
#define BW_WG_DQ_STAGES 2
#endif

// S (64 x 64) = A B^T over D: A the swizzled [64 x D] tile at `a0`, B the swizzled [64 x D] tile
// at `b0` (both K-major). Issues D / 16 wgmmas (caller fences / commits).
template <int D>
__device__ __forceinline__ void bw_wg_nt64(float (&s)[8][4], u32 a0, u32 b0) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const u32 a = a0 + (kk >> 2) * (64 * 128) + (kk & 3) * 32;
        const u32 b = b0 + (kk >> 2) * (64 * 128) + (kk & 3) * 32;
        if (kk == 0)
            wg_ss_n64<0, 0>(s, wg_desc(a, 16, 1024), wg_desc(b, 16, 1024));
        else
            wg_ss_n64<1, 0>(s, wg_desc(a, 16, 1024), wg_desc(b, 16, 1024));
    }
}

// Q / dO of the CTA's 64 rows as wgmma A fragments in registers (BW_DQ_RS): S = Q K^T and dP =
// dO V^T then read only their B operand (the K / V tile) from shared memory, 2 KB per 32 K MAC
// instead of 4 KB. qf[kk] = the m16n8k16 A fragment of the warp's rows and columns 16kk .. +15,
// read from the swizzled [64 x D] tile at `t`.
template <int D>
__device__ __forceinline__ void bw_wg_frags_of(u32 (&f)[D / 16][4], const unsigned char* t) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    const int r = warp * 16 + gr;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        f[kk][0] = *(const u32*)(t + sw128_off<64>(r, 2 * kk) + gc * 2);
        f[kk][1] = *(const u32*)(t + sw128_off<64>(r + 8, 2 * kk) + gc * 2);
        f[kk][2] = *(const u32*)(t + sw128_off<64>(r, 2 * kk + 1) + gc * 2);
        f[kk][3] = *(const u32*)(t + sw128_off<64>(r + 8, 2 * kk + 1) + gc * 2);
    }
}

// S (64 x 64) = A B^T over D with A in registers (fragments of bw_wg_frags_of), B the swizzled
// [64 x D] tile at `b0` (K-major). Issues D / 16 wgmmas (caller fences / commits).
template <int D>
__device__ __forceinline__ void bw_wg_nt64_rs(float (&s)[8][4], const u32 (&a)[D / 16][4], u32 b0) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const u32 b = b0 + (kk >> 2) * (64 * 128) + (kk & 3) * 32;
        if (kk == 0)
            wg_rs_n64<0, 0>(s, a[kk], wg_desc(b, 16, 1024));
        else
            wg_rs_n64<1, 0>(s, a[kk], wg_desc(b, 16, 1024));
    }
}

// bw_pipeline with swizzled tiles: walks the tiles of next(tile), double-buffered (2 stages),
// calling fn(lo, hi, ks, vs, mid) with the shared addresses of the tile's K and V.
// Default: fn returns with its wgmmas complete and mid() does nothing; the next tile loads before
// fn. BW_DQ_DEFER: the next tile's load is mid() (a barrier, then the load into the other
// buffer), which fn calls once the previous tile's products (still in flight when it was
// entered) are complete; the caller waits (wg_wait<0>) after the walk.
template <class Next, class Mask, class Fn>
__device__ __forceinline__ void bw_wg_pipeline(unsigned char* kvbuf, const bf16_t* __restrict__ k,
                                               const bf16_t* __restrict__ v, int g, Next next, Mask mask, Fn fn) {
    auto Kb = [&](int b) { return kvbuf + b * BW_WG_KV_BYTES; };
    auto load = [&](const BwTile& t, int b) {
        load_tile_sw128<64, DK, 128>(Kb(b), k + (t.row * HKV + g) * DK, t.nk, [&](int r) { return (i64)r * HKV * DK; });
        load_tile_sw128<64, DV, 128>(Kb(b) + 64 * DK * 2, v + (t.row * HKV + g) * DV, t.nk,
                                     [&](int r) { return (i64)r * HKV * DV; });
        cp_async_commit();
    };
    BwTile cur;
    bool have = next(cur);
    __syncthreads();   // earlier users of the buffers are done
#if BW_WG_DQ_STAGES == 1
    // one K/V buffer: each tile loads once the previous tile's products (dQ reads K) are done
    // in every warp; the CTA's load latency is hidden only by other CTAs on the SM
    while (have) {
        load(cur, 0);
        cp_async_wait_all();
        fence_proxy_async();
        __syncthreads();   // tile cur is visible
        int lo[2], hi[2];
        mask(cur, lo, hi);
        const u32 ks = smem_addr(Kb(0));
        fn(lo, hi, ks, ks + 64 * DK * 2, []() {});
        wg_wait<0>();
        __syncthreads();   // every warp's products of tile cur are done: the buffer is free
        have = next(cur);
    }
#else
    BwTile nxt;
    if (have) load(cur, 0);
    int b = 0;
#ifdef BW_DQ_DEFER
    while (have) {
        cp_async_wait_all();
        fence_proxy_async();
        __syncthreads();   // tile cur is visible in buffer b
        int lo[2], hi[2];
        mask(cur, lo, hi);
        const u32 ks = smem_addr(Kb(b));
        bool more = false;
        fn(lo, hi, ks, ks + 64 * DK * 2, [&]() {
            __syncthreads();   // every warp's products of the previous tile (buffer b ^ 1) are done
            more = next(nxt);
            if (more) load(nxt, b ^ 1);
        });
        cur = nxt;
        have = more;
        b ^= 1;
    }
#else
    while (have) {
        const bool more = next(nxt);
        if (more) {
            load(nxt, b ^ 1);
            bw_cp_async_wait_1();
        } else {
            cp_async_wait_all();
        }
        fence_proxy_async();
        __syncthreads();
        int lo[2], hi[2];
        mask(cur, lo, hi);
        const u32 ks = smem_addr(Kb(b));
        fn(lo, hi, ks, ks + 64 * DK * 2, []() {});
        __syncthreads();
        cur = nxt;
        have = more;
        b ^= 1;
    }
#endif
#endif  // BW_WG_DQ_STAGES
}

// dQ of one key tile on wgmma (bw_dq_tile's math). Q / dO: the swizzled tiles at qs / dos, or
// (BW_DQ_RS) the fragments qf / df. Returns with its wgmmas complete, or (BW_DQ_DEFER) with dQ
// in flight, after calling mid() once the previous tile's dQ is complete.
template <class Mid>
__device__ __forceinline__ void bw_wg_dq_tile(u32 qs, u32 dos, const u32 (&qf)[DK / 16][4],
                                              const u32 (&df)[DV / 16][4], u32 ks, u32 vs, const int (&lo)[2],
                                              const int (&hi)[2], const float (&lse)[2], const float (&dg)[2],
                                              const float (&gt)[2], float (&dq)[DK / 8][4], Mid mid) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
    float s[8][4], dp[8][4];
    wg_fence();
#ifdef BW_DQ_RS
    bw_wg_nt64_rs<DK>(s, qf, ks);
    wg_commit();
    bw_wg_nt64_rs<DV>(dp, df, vs);
    wg_commit();
#else
    bw_wg_nt64<DK>(s, qs, ks);
    wg_commit();
    bw_wg_nt64<DV>(dp, dos, vs);
    wg_commit();
#endif
#ifdef BW_DQ_DEFER
    wg_wait<2>();   // the previous tile's dQ (older groups complete first)
    mid();
#endif
    wg_wait<1>();
    wg_pin(s);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = e >> 1, key = nt * 8 + gc + (e & 1);
            s[nt][e] = (key >= lo[i] && key < hi[i]) ? gt[i] * exp2f(s[nt][e] * SCALE_LOG2 - lse[i]) : 0.f;
        }
    wg_wait<0>();
    wg_pin(dp);
    u32 a[4][4];
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
        a[kc][0] = pack_bf16x2(s[2 * kc][0] * (dp[2 * kc][0] - dg[0]), s[2 * kc][1] * (dp[2 * kc][1] - dg[0]));
        a[kc][1] = pack_bf16x2(s[2 * kc][2] * (dp[2 * kc][2] - dg[1]), s[2 * kc][3] * (dp[2 * kc][3] - dg[1]));
        a[kc][2] = pack_bf16x2(s[2 * kc + 1][0] * (dp[2 * kc + 1][0] - dg[0]),
                               s[2 * kc + 1][1] * (dp[2 * kc + 1][1] - dg[0]));
        a[kc][3] = pack_bf16x2(s[2 * kc + 1][2] * (dp[2 * kc + 1][2] - dg[1]),
                               s[2 * kc + 1][3] * (dp[2 * kc + 1][3] - dg[1]));
    }
    wg_fence();
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) bw_wg_rs(dq, a[kc], wg_desc(ks + kc * 16 * 128, 64 * 128, 1024));
    wg_commit();
#ifndef BW_DQ_DEFER
    wg_wait<0>();
    wg_pin(dq);
#endif
}

// The saved-statistics dQ pass of a row-major CTA on wgmma: Q / dO (loads committed by the
// caller into `sm`), lse / dg from the forward, the tiles of for_tiles(fn) (bw_wg_pipeline);
// writes dq (ACC: +=). The thread's rows are row0 + gr and row0 + gr + 8 as on mma.sync.
template <bool ACC, class ForTiles>
__device__ __forceinline__ void bw_wg_rows_dq(unsigned char* sm, const i64 (&qrow)[2], const bool (&valid)[2],
                                              const float* __restrict__ gate, const float* __restrict__ lse_in,
                                              const float* __restrict__ dg_in, float* __restrict__ dq_out,
                                              ForTiles for_tiles) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
    float lse[2], dg[2], gt[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        lse[i] = valid[i] ? lse_in[qrow[i]] : POS_INF;
        dg[i] = valid[i] ? dg_in[qrow[i]] : 0.f;
        gt[i] = valid[i] ? gate[qrow[i]] : 0.f;
    }
    const u32 qs = smem_addr(sm), dos = qs + 64 * DK * 2;
    float dq[DK / 8][4];
    bw_zero<DK>(dq);
    u32 qf[DK / 16][4] = {}, df[DV / 16][4] = {};   // defined on every path (see v12 in the notes)
#ifdef BW_DQ_RS
    bool first = true;
#endif
    for_tiles([&](const int (&lo)[2], const int (&hi)[2], u32 ks, u32 vs, auto mid) {
#ifdef BW_DQ_RS
        if (first) {   // the walk's first wait + barrier covered the Q / dO loads (committed first)
            bw_wg_frags_of<DK>(qf, sm);
            bw_wg_frags_of<DV>(df, sm + 64 * DK * 2);
            first = false;
        }
#endif
        bw_wg_dq_tile(qs, dos, qf, df, ks, vs, lo, hi, lse, dg, gt, dq, mid);
    });
#ifdef BW_DQ_DEFER
    wg_wait<0>();
    wg_pin(dq);
#endif
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (!valid[i]) continue;
        float* dst = dq_out + qrow[i] * DK;
#pragma unroll
        for (int nt = 0; nt < DK / 8; ++nt) {
            float2* p = (float2*)(dst + nt * 8 + gc);
            float2 v = make_float2(dq[nt][2 * i] * SCALE_NAT, dq[nt][2 * i + 1] * SCALE_NAT);
            if (ACC) {
                const float2 old = *p;
                v.x += old.x;
                v.y += old.y;
            }
            *p = v;
        }
    }
}

#endif  // BW_WG
