// Hopper warpgroup MMA (wgmma, sm_90a) helpers for the compressed-attention kernels
// (prepended to cmp_attn.cu by cuda/module.rs; used on sm_90a unless -DCMP_NO_WGMMA).
//
// A warpgroup = the 4 warps of a 128-thread CTA. One wgmma.mma_async computes D (64 x N, f32,
// in registers) += A (64 x 16) * B (16 x N); B is read from shared memory through a 64-bit matrix
// descriptor, A from shared memory (descriptor) or registers. Register layouts (warp w of the
// warpgroup, lane = tid % 32, gr = lane / 4, gc = (lane % 4) * 2), the same per warp as mma.sync:
//   D: d[j][0..1] = D[16w + gr][8j + gc .. +1], d[j][2..3] = D[16w + gr + 8][8j + gc .. +1]
//   A (registers): the m16n8k16 A fragment of rows 16w .. 16w + 15 (see mma_bf16 in common.cu)
// so a score tile S = Q K^T comes out exactly as the P operand of O += P V needs it.
//
// Shared-memory tiles use the 128-byte swizzle: a [ROWS x D] tile (D a multiple of 64 elements)
// is stored as D / 64 column blocks of [ROWS][64 elements = 128 bytes]; inside a block, the
// 16-byte chunk c of row r sits at chunk position c ^ (r % 8). Tiles start 1024-byte aligned (the
// hardware applies the XOR to address bits 4-6 from bits 7-9). Descriptors:
//   K-major (Q as A, K as B of S = Q K^T: the reduction dim is contiguous): start = the 16 x 16
//     slice's first row, + 32 bytes per k16 step inside a 64-element block; SBO = 1024 (next 8
//     rows), LBO unused.
//   MN-major (V as B of O = P V: N = dv contiguous, transposed read): start = the k16 slice's
//     first key row (+ 2048 bytes per k16 step); LBO = the column-block stride (next 64 of N),
//     SBO = 1024 (next 8 keys).
// Shared memory written by cp.async (generic proxy) must be fenced with fence_proxy_async()
// by the writing threads before the barrier that precedes the wgmma reading it.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_AVAILABLE 1
#else
#define WG_AVAILABLE 0
#endif

// K/V stages of the forward's wgmma attention loops (cmp_attn pass 1, win_attn): two (the next
// tile loads while this one is computed), but one when dk + dv > 256 (dk 192 / dv 128): there a
// 128-row Q tile and two stages take 129 KB, one CTA per SM, where one stage takes 89 KB, two
// CTAs per SM, each tile's load exposed within its CTA and overlapped by the other CTA's work.
// -DFWD_WG_2STAGE keeps two stages (cuda/mod.rs `fwd_wg_stages` mirrors both).
#if (DK + DV) > 256 && !defined(FWD_WG_2STAGE)
#define FWD_WG_STAGES 1
#else
#define FWD_WG_STAGES 2
#endif

#if WG_AVAILABLE

#ifndef ELEM_PTX   // the element type's PTX name (common.cu defines it with ELEM_F16)
#define ELEM_PTX "bf16"
#endif

// Byte offset of 16-byte chunk c of row r in a 128B-swizzled [ROWS x D] tile.
template <int ROWS>
__device__ __forceinline__ u32 sw128_off(int r, int c) {
    return (u32)((c >> 3) * (ROWS * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Loads `nrows` rows of D elements (row r from base + row_off(r)) into a swizzled [ROWS x D]
// tile at `dst`, zero-filling rows nrows .. ROWS (cp.async; the caller commits).
template <int ROWS, int D, int NTHREADS, class RowOff>
__device__ __forceinline__ void load_rows_sw128(unsigned char* dst, const bf16_t* base, int nrows,
                                                RowOff row_off) {
    constexpr int CHUNKS = D / 8;
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS, k = c % CHUNKS;
        const bool ok = r < nrows;
        const bf16_t* src = ok ? base + row_off(r) + k * 8 : base;
        cp_async16(dst + sw128_off<ROWS>(r, k), src, ok ? 16 : 0);
    }
}

// load_rows_sw128 with each thread keeping one chunk column and stepping over rows (when the
// thread count is a multiple of the chunks per row): the unrolled copies' addresses differ by
// compile-time constants, no per-chunk index arithmetic, at the price of more live registers
// (cmp_attn: 8.2 instead of 10.2 ms at 64k; cmp_topn keeps the loop above: its 157 registers
// allow 3 CTAs per SM, 194 only 2).
// (The first form takes the loading thread's index among NTHREADS: a warpgroup of a wider CTA
// loading its own tile.)
template <int ROWS, int D, int NTHREADS, class RowOff>
__device__ __forceinline__ void load_tile_sw128_by(unsigned char* dst, const bf16_t* base, int nrows,
                                                   RowOff row_off, unsigned tid) {
    constexpr int CHUNKS = D / 8;
    static_assert(NTHREADS % CHUNKS == 0 && ROWS % (NTHREADS / CHUNKS) == 0, "one chunk column per thread");
    constexpr int RPI = NTHREADS / CHUNKS;   // rows per iteration
    const int k = tid % CHUNKS, r0 = tid / CHUNKS;
#pragma unroll
    for (int it = 0; it < ROWS / RPI; ++it) {
        const int r = r0 + it * RPI;
        const bool ok = r < nrows;
        const bf16_t* src = ok ? base + row_off(r) + k * 8 : base;
        cp_async16(dst + sw128_off<ROWS>(r, k), src, ok ? 16 : 0);
    }
}
template <int ROWS, int D, int NTHREADS, class RowOff>
__device__ __forceinline__ void load_tile_sw128(unsigned char* dst, const bf16_t* base, int nrows,
                                                RowOff row_off) {
    constexpr int CHUNKS = D / 8;
    if constexpr (NTHREADS % CHUNKS == 0 && ROWS % (NTHREADS / CHUNKS) == 0) {
        load_tile_sw128_by<ROWS, D, NTHREADS>(dst, base, nrows, row_off, threadIdx.x);
    } else {
        load_rows_sw128<ROWS, D, NTHREADS>(dst, base, nrows, row_off);
    }
}

// The first 1024-byte aligned address at or after p.
__device__ __forceinline__ unsigned char* align1024(unsigned char* p) {
    const u32 a = smem_addr(p);
    return p + (((a + 1023u) & ~1023u) - a);
}

// Matrix descriptor with the 128-byte swizzle (layout type 1 in bits 62-63).
__device__ __forceinline__ unsigned long long wg_desc(u32 saddr, u32 lbo_bytes, u32 sbo_bytes) {
    return (unsigned long long)((saddr & 0x3ffffu) >> 4) | ((unsigned long long)(lbo_bytes >> 4) << 16) |
           ((unsigned long long)(sbo_bytes >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups are pending (older groups complete first).
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Orders the generic-proxy writes (cp.async, st.shared) of this thread before later async-proxy
// reads (wgmma operands); then a barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Pins accumulator registers after a wait: later reads cannot move above this point.
template <int NT>
__device__ __forceinline__ void wg_pin(float (&d)[NT][4]) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

// D (m64 x n64, f32) (+)= A (64 x 16, smem descriptor) * B (16 x n64, smem descriptor).
// SCALE_D = 0 overwrites D, 1 accumulates; TRANS_B = 1 reads B MN-major (see wg_desc).
template <int SCALE_D, int TRANS_B>
__device__ __forceinline__ void wg_ss_n64(float (&d)[8][4], unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." ELEM_PTX "." ELEM_PTX " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, %35;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(da), "l"(db), "n"(SCALE_D), "n"(TRANS_B));
}

// D (m64 x n64, f32) (+)= A (64 x 16, registers: the mma.sync m16n8k16 A fragment of warp w's
// rows 16w..16w+15) * B (16 x n64, smem descriptor).
template <int SCALE_D, int TRANS_B>
__device__ __forceinline__ void wg_rs_n64(float (&d)[8][4], const u32 (&a)[4], unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." ELEM_PTX "." ELEM_PTX " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(SCALE_D), "n"(TRANS_B));
}

// D (m64 x n128, f32) (+)= A (64 x 16, registers: the mma.sync m16n8k16 A fragment of warp w's
// rows 16w..16w+15) * B (16 x n128, smem descriptor).
template <int SCALE_D, int TRANS_B>
__device__ __forceinline__ void wg_rs_n128(float (&d)[16][4], const u32 (&a)[4], unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." ELEM_PTX "." ELEM_PTX " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(SCALE_D), "n"(TRANS_B));
}

// S (64 x 64 keys) = rows mt*64 .. +63 of the swizzled Q tile [QROWS x DK] at `qa` times the
// swizzled K tile [64 x DK] at `ka`, transposed (both K-major). Issues DK / 16 wgmmas; the
// caller fences before and commits after.
template <int QROWS>
__device__ __forceinline__ void wg_qk(float (&s)[8][4], u32 qa, u32 ka, int mt) {
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) {
        const u32 a = qa + (kk >> 2) * (QROWS * 128) + mt * 64 * 128 + (kk & 3) * 32;
        const u32 b = ka + (kk >> 2) * (64 * 128) + (kk & 3) * 32;
        if (kk == 0)
            wg_ss_n64<0, 0>(s, wg_desc(a, 16, 1024), wg_desc(b, 16, 1024));
        else
            wg_ss_n64<1, 0>(s, wg_desc(a, 16, 1024), wg_desc(b, 16, 1024));
    }
}

// O (64 x DV) += P (64 x 64 keys, registers: p[kc] = A fragment of keys 16kc .. 16kc+15) times
// the swizzled V tile [64 x DV] at `va` (MN-major). Issues 4 wgmmas; the caller fences before
// and commits after.
__device__ __forceinline__ void wg_pv(float (&o)[DV / 8][4], const u32 (&p)[4][4], u32 va) {
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
        const unsigned long long b = wg_desc(va + kc * 16 * 128, 64 * 128, 1024);
#if DV == 128
        wg_rs_n128<1, 1>(o, p[kc], b);
#elif DV == 64
        wg_rs_n64<1, 1>(o, p[kc], b);
#endif
    }
}

// The online-softmax step of row tile mt once its scores `s` (this thread's part of an m64 x NK
// wgmma accumulator, masked entries at -inf) are final: the running max and sum of `st` (log2
// domain, as RowStats), `o` rescaled by the max's change, and P = exp2(s * scale - max) packed as
// 16-bit A fragments for the P V wgmma. Shared by cmp_attn's and win_attn's wgmma tiles.
template <int NK, int M>
__device__ __forceinline__ void wg_softmax_step(float (&s)[NK / 8][4], RowStats<M>& st, int mt,
                                                float (&o)[DV / 8][4], u32 (&p)[NK / 16][4]) {
    float mx[2], alpha[2], mu[2], rs[2];
    mx[0] = mx[1] = NEG_INF;
#pragma unroll
    for (int nt = 0; nt < NK / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = 2 * mt + h;
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
        const float mn = fmaxf(st.m[i], mx[h] * SCALE_LOG2);   // log2 domain, as RowStats
        mu[h] = (mn == NEG_INF) ? 0.f : mn;   // all masked so far: keep exp2 finite (gives 0)
        alpha[h] = exp2f(st.m[i] - mu[h]);
        st.m[i] = mn;
        rs[h] = 0.f;
    }
#pragma unroll
    for (int nt = 0; nt < NK / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float pv = exp2f(fmaf(s[nt][e], SCALE_LOG2, -mu[e >> 1]));
            s[nt][e] = pv;
            rs[e >> 1] += pv;
        }
#pragma unroll
    for (int h = 0; h < 2; ++h) st.l[2 * mt + h] = st.l[2 * mt + h] * alpha[h] + rs[h];
    scale_acc_rows<DV>(o, alpha[0], alpha[1]);
#pragma unroll
    for (int kc = 0; kc < NK / 16; ++kc) {
        p[kc][0] = pack_bf16x2(s[2 * kc][0], s[2 * kc][1]);
        p[kc][1] = pack_bf16x2(s[2 * kc][2], s[2 * kc][3]);
        p[kc][2] = pack_bf16x2(s[2 * kc + 1][0], s[2 * kc + 1][1]);
        p[kc][3] = pack_bf16x2(s[2 * kc + 1][2], s[2 * kc + 1][3]);
    }
}

#ifdef WGMMA_SELFTEST
// Layout check (tests/cuda_forward_wgmma.rs): S = Q K^T for a [64 * MT_WIDE x DK] Q and a
// [64 x DK] K, written to s_out ([rows][64] f32); then O = bf16(S) V for a [64 x DV] V, written
// to o_out ([rows][DV] f32). Row-major inputs, 128 threads, dynamic smem >= 1024 +
// (rows * DK + 64 * DK + 64 * DV) * 2.
extern "C" __global__ void __launch_bounds__(128) wgmma_selftest(const bf16_t* __restrict__ q,
                                                                 const bf16_t* __restrict__ k,
                                                                 const bf16_t* __restrict__ v,
                                                                 float* __restrict__ s_out,
                                                                 float* __restrict__ o_out) {
    constexpr int MT = MT_WIDE, ROWS = 64 * MT;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* Qs = align1024(smem_raw);
    unsigned char* Ks = Qs + ROWS * DK * 2;
    unsigned char* Vs = Ks + 64 * DK * 2;
    load_tile_sw128<ROWS, DK, 128>(Qs, q, ROWS, [](int r) { return (i64)r * DK; });
    load_tile_sw128<64, DK, 128>(Ks, k, 64, [](int r) { return (i64)r * DK; });
    load_tile_sw128<64, DV, 128>(Vs, v, 64, [](int r) { return (i64)r * DV; });
    cp_async_commit();
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    float s[MT][8][4];
    float o[MT][DV / 8][4];
    zero_acc<MT>(o);
    wg_fence();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        wg_qk<ROWS>(s[mt], smem_addr(Qs), smem_addr(Ks), mt);
        wg_commit();
    }
    wg_wait<0>();
    u32 p[MT][4][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        wg_pin(s[mt]);
        const int r = mt * 64 + warp * 16 + gr;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            *(float2*)(s_out + r * 64 + j * 8 + gc) = make_float2(s[mt][j][0], s[mt][j][1]);
            *(float2*)(s_out + (r + 8) * 64 + j * 8 + gc) = make_float2(s[mt][j][2], s[mt][j][3]);
        }
#pragma unroll
        for (int kc = 0; kc < 4; ++kc) {
            p[mt][kc][0] = pack_bf16x2(s[mt][2 * kc][0], s[mt][2 * kc][1]);
            p[mt][kc][1] = pack_bf16x2(s[mt][2 * kc][2], s[mt][2 * kc][3]);
            p[mt][kc][2] = pack_bf16x2(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
            p[mt][kc][3] = pack_bf16x2(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
        }
    }
    wg_fence();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) wg_pv(o[mt], p[mt], smem_addr(Vs));
    wg_commit();
    wg_wait<0>();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        wg_pin(o[mt]);
        const int r = mt * 64 + warp * 16 + gr;
#pragma unroll
        for (int j = 0; j < DV / 8; ++j) {
            *(float2*)(o_out + r * DV + j * 8 + gc) = make_float2(o[mt][j][0], o[mt][j][1]);
            *(float2*)(o_out + (r + 8) * DV + j * 8 + gc) = make_float2(o[mt][j][2], o[mt][j][3]);
        }
    }
}
#endif  // WGMMA_SELFTEST

#endif  // WG_AVAILABLE
