// Decoding over a paged KV cache (SPEC.md "Decoding"), flash-decoding style.
//
// The cache (cuda/decode.rs) keeps, per layer, pools of fixed-size pages of PAGE tokens. A page
// holds all KV heads, head-major: element (page, head h, slot r, dim c) lives at
// ((page * HKV + h) * PAGE + r) * D + c, so the PAGE keys of one head are one contiguous run.
// Every sequence b has a page table row: position p -> page table[b * maxp + p / PAGE].
// Raw keys/values of the selection and window branches share one table; compressed keys/values
// have their own pool and table (position = compressed-token index). The last l raw tokens of
// the compression branch sit in a per-sequence ring [B, l, HKV, D] (slot p % l).
//
// A step (or a chunk of prefill rows) is a few launches, none of which needs the host:
//   decode_write    appends each row's raw K/V to the pages; when its token completes a
//                   compression block (t >= l-1, (t+1-l) % d == 0) computes the compressed token
//                   (phi = mean of the last l raw tokens) from the ring and the new rows, or
//                   (phi = linear / mlp) copies those l raw tokens to a staging slot for the
//                   phi_gemm of kernels/phi.cu; in step mode it also reads the position from
//                   `lens` and advances it.
//   decode_ring     (prefill only) refreshes the ring with the chunk's last l tokens.
//   decode_phi_put  (phi = linear / mlp) copies the staged phi_gemm outputs into the compressed
//                   pages (rows of sequences that completed no block are skipped).
//   decode_attn_cw  split-K attention over the compressed tokens (+ Eq. 9 partial scores);
//                   one CTA = (row, KV group, key split). With fuse_topn the last CTA of each
//                   (row, group) to finish also runs the top-n (no decode_topn launch).
//   decode_topn     per (row, group): log-sum-exp of every head, Eq. 9/10 scores from the
//                   partials, forced blocks, top-n (ties to the lower index), sorted output.
//   decode_sel      split-K attention over the window and over the selected blocks
//                   (token-causal in the own block).
//   decode_combine  merges the splits of each branch and applies the gates.
//
// Rows of a CTA are the G query heads of the group (zero-padded to 16 * WM rows): the G heads
// share every key, so one K/V tile feeds G rows of tensor-core work. With G <= 16 the four warps
// split the keys of a tile (each its own online softmax, merged at the end of the CTA); with
// larger G they split the rows.

#define PAGE 64
#define DEC_WM ((G + 15) / 16)                 // m16 row tiles
#define DEC_WK (DEC_WM >= 3 ? 1 : 4 / DEC_WM)  // warps sharing one row tile (split the keys)
#define DEC_KW (KT / DEC_WK)                   // keys of a tile per warp: 16, 32 or 64
#define DEC_QROWS (DEC_WM * 16)
#define DEC_INT_MAX 0x7fffffff
// tiles of one CTA whose page numbers are staged in shared memory (later ones read them from
// the table in the loop)
#define DEC_PGMAX 64
// Alignment of the dynamic shared memory (it follows the static arrays): the K/V swizzle
// assumes rows start on 128-byte lines; with the 16-byte default the base moved with the static
// arrays (measured: twice the shared wavefronts and L2 sectors of the tile copies, v7 notes)
#ifndef DEC_SMEM_ALIGN
#define DEC_SMEM_ALIGN 128
#endif
// K/V tiles in shared memory: with head dims that are multiples of 64, rows are unpadded and
// the 16-byte chunks of row r are XOR-swizzled by r % 8 (the 8 rows one mma fragment or one
// ldmatrix touches land in 8 different chunks: no bank conflicts, and 6% less shared memory than
// padding, which is what lets deeper pipelines keep two CTAs per SM); otherwise rows are padded
// by 8 elements as in the forward. The launcher mirrors the sizes (cuda/decode.rs).
#define DEC_SWIZZLE (DK % 64 == 0 && DV % 64 == 0)
#define DEC_KSTR (DEC_SWIZZLE ? DK : DK + 8)
#define DEC_VSTR (DEC_SWIZZLE ? DV : DV + 8)
// element offset of (row, col) in a K (D = DK) or V (D = DV) tile; col % 8 + 8 <= 8 stays in a chunk
__device__ __forceinline__ int dec_koff(int row, int col) {
    return DEC_SWIZZLE ? row * DK + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7) : row * DEC_KSTR + col;
}
__device__ __forceinline__ int dec_voff(int row, int col) {
    return DEC_SWIZZLE ? row * DV + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7) : row * DEC_VSTR + col;
}
// K/V pipeline depth (cp.async stages); the launcher mirrors it (cuda/decode.rs::stages)
#ifndef DEC_STAGES
#define DEC_STAGES 2
#endif

__device__ __forceinline__ int dec_cmp_visible(int t) {
    return t + 1 >= CMP_L ? (t + 1 - CMP_L) / CMP_D + 1 : 0;
}

// Element offset of (position p, head h) in a paged pool with head dim D.
__device__ __forceinline__ i64 dec_page_off(const int* __restrict__ table, int p, int h, int D) {
    const int page = table[p / PAGE];
    return (((i64)page * HKV + h) * PAGE + (p % PAGE)) * D;
}


// ---------------------------------------------------------------------------------------------
// decode_write / decode_ring
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void dec_acc8(float (&a)[8], uint4 u) {
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        a[2 * k] += bf16x2_lo(w[k]);
        a[2 * k + 1] += bf16x2_hi(w[k]);
    }
}

// One CTA per written row. wdesc[row] = (sequence b, position t, chunk start cs, chunk end ce):
// rows of one sequence are consecutive and in position order, so position p in [cs, t] is source
// row row - (t - p); positions before cs come from the ring. In step mode (one row per sequence)
// t = lens[b], cs = t, and the CTA advances lens[b] and writes both descriptors.
// phi_stage (phi = linear / mlp): instead of the mean, the block's l raw compression-branch
// tokens go to staging slot m ([M * l, HKV, D], rows m*l .. m*l + l - 1, the layout phi_gemm's
// gather mode reads with items[m] = (m * l, m)). Prefill: m = stage_slot[row] (the launcher
// numbered the completing rows and wrote items / pdst). Step mode: m = row, and the CTA writes
// items[row] = (row * l, row or -1) and pdst[row] = (b, compressed index or -1), so that the
// GEMMs and decode_phi_put, launched over all B rows, skip the sequences that completed no block.
extern "C" __global__ void __launch_bounds__(128) decode_write(
    int4* __restrict__ wdesc, int4* __restrict__ adesc, int* __restrict__ lens, int step_mode,
    const int* __restrict__ raw_table, const int* __restrict__ cmp_table, int maxp_raw, int maxp_cmp,
    const bf16_t* __restrict__ kc_src, const bf16_t* __restrict__ vc_src,
    const bf16_t* __restrict__ ks_src, const bf16_t* __restrict__ vs_src,
    const bf16_t* __restrict__ kw_src, const bf16_t* __restrict__ vw_src,
    bf16_t* __restrict__ ks_pool, bf16_t* __restrict__ vs_pool, bf16_t* __restrict__ kw_pool,
    bf16_t* __restrict__ vw_pool, bf16_t* __restrict__ kc_pool, bf16_t* __restrict__ vc_pool,
    bf16_t* __restrict__ ring_k, bf16_t* __restrict__ ring_v, int phi_stage,
    const int* __restrict__ stage_slot, int2* __restrict__ items, int2* __restrict__ pdst,
    bf16_t* __restrict__ stage_k, bf16_t* __restrict__ stage_v) {
    const int row = blockIdx.x, tid = threadIdx.x;
    const int4 d = wdesc[row];
    const int b = d.x;
    int t, cs;
    if (step_mode) {
        t = lens[b];
        cs = t;
        __syncthreads();   // every thread has read lens[b]
        if (tid == 0) {
            lens[b] = t + 1;
            wdesc[row] = make_int4(b, t, t, t + 1);
            adesc[row] = make_int4(b, t, row, 0);
        }
    } else {
        t = d.y;
        cs = d.z;
    }
    const int* rt = raw_table + (i64)b * maxp_raw;
    constexpr int CK = DK / 8, CV = DV / 8;
    // raw K/V of the selection and window branches
    for (int c = tid; c < HKV * CK; c += 128) {
        const int h = c / CK, k = (c % CK) * 8;
        const i64 src = ((i64)row * HKV + h) * DK + k, dst = dec_page_off(rt, t, h, DK) + k;
        *(uint4*)(ks_pool + dst) = *(const uint4*)(ks_src + src);
        *(uint4*)(kw_pool + dst) = *(const uint4*)(kw_src + src);
        if (step_mode)
            *(uint4*)(ring_k + (((i64)b * CMP_L + t % CMP_L) * HKV + h) * DK + k) = *(const uint4*)(kc_src + src);
    }
    for (int c = tid; c < HKV * CV; c += 128) {
        const int h = c / CV, k = (c % CV) * 8;
        const i64 src = ((i64)row * HKV + h) * DV + k, dst = dec_page_off(rt, t, h, DV) + k;
        *(uint4*)(vs_pool + dst) = *(const uint4*)(vs_src + src);
        *(uint4*)(vw_pool + dst) = *(const uint4*)(vw_src + src);
        if (step_mode)
            *(uint4*)(ring_v + (((i64)b * CMP_L + t % CMP_L) * HKV + h) * DV + k) = *(const uint4*)(vc_src + src);
    }
    // a completed compression block: tokens t-l+1 .. t (the ring slot written above is that of
    // token t - l, which the block does not read)
    const bool completes = t + 1 >= CMP_L && (t + 1 - CMP_L) % CMP_D == 0;
    const int ci = completes ? (t + 1 - CMP_L) / CMP_D : -1;
    if (phi_stage && step_mode && tid == 0) {
        items[row] = make_int2(row * CMP_L, completes ? row : -1);
        pdst[row] = make_int2(b, ci);
    }
    if (completes && phi_stage) {
        // phi = linear / mlp: stage the l raw tokens (token-major, as phi_gemm flattens them)
        const int m = step_mode ? row : stage_slot[row];
        for (int c = tid; c < CMP_L * HKV * (CK + CV); c += 128) {
            const int r = c / (HKV * (CK + CV)), rem = c % (HKV * (CK + CV));
            const int h = rem / (CK + CV), cc = rem % (CK + CV);
            const bool is_k = cc < CK;
            const int D = is_k ? DK : DV, off = (is_k ? cc : cc - CK) * 8;
            const bf16_t* src = is_k ? kc_src : vc_src;
            const bf16_t* ring = is_k ? ring_k : ring_v;
            const int p = t - CMP_L + 1 + r;
            const bf16_t* s = p >= cs ? src + ((i64)(row - (t - p)) * HKV + h) * D + off
                                      : ring + (((i64)b * CMP_L + p % CMP_L) * HKV + h) * D + off;
            *(uint4*)((is_k ? stage_k : stage_v) + (((i64)m * CMP_L + r) * HKV + h) * D + off) =
                *(const uint4*)s;
        }
    } else if (completes) {
        // phi = mean
        const int* ct = cmp_table + (i64)b * maxp_cmp;
        for (int c = tid; c < HKV * (CK + CV); c += 128) {
            const int h = c / (CK + CV), cc = c % (CK + CV);
            const bool is_k = cc < CK;
            const int D = is_k ? DK : DV, off = (is_k ? cc : cc - CK) * 8;
            const bf16_t* src = is_k ? kc_src : vc_src;
            const bf16_t* ring = is_k ? ring_k : ring_v;
            float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int r = 0; r < CMP_L; ++r) {
                const int p = t - CMP_L + 1 + r;
                const bf16_t* s = p >= cs ? src + ((i64)(row - (t - p)) * HKV + h) * D + off
                                          : ring + (((i64)b * CMP_L + p % CMP_L) * HKV + h) * D + off;
                dec_acc8(a, *(const uint4*)s);
            }
            const float inv = 1.f / (float)CMP_L;
            uint4 res;
            res.x = pack_bf16x2(a[0] * inv, a[1] * inv);
            res.y = pack_bf16x2(a[2] * inv, a[3] * inv);
            res.z = pack_bf16x2(a[4] * inv, a[5] * inv);
            res.w = pack_bf16x2(a[6] * inv, a[7] * inv);
            *(uint4*)((is_k ? kc_pool : vc_pool) + dec_page_off(ct, ci, h, D) + off) = res;
        }
    }
}

// phi = linear / mlp, after the phi GEMMs: staged output m ([M, HKV, D] bf16, K and V) goes to
// compressed position pdst[m].y of sequence pdst[m].x (skipped when pdst[m].y < 0).
extern "C" __global__ void __launch_bounds__(128) decode_phi_put(
    const int2* __restrict__ pdst, const bf16_t* __restrict__ out_k, const bf16_t* __restrict__ out_v,
    const int* __restrict__ cmp_table, int maxp_cmp, bf16_t* __restrict__ kc_pool,
    bf16_t* __restrict__ vc_pool) {
    const int m = blockIdx.x;
    const int2 dst = pdst[m];
    if (dst.y < 0) return;
    const int* ct = cmp_table + (i64)dst.x * maxp_cmp;
    constexpr int CK = DK / 8, CV = DV / 8;
    for (int c = threadIdx.x; c < HKV * (CK + CV); c += 128) {
        const int h = c / (CK + CV), cc = c % (CK + CV);
        const bool is_k = cc < CK;
        const int D = is_k ? DK : DV, off = (is_k ? cc : cc - CK) * 8;
        *(uint4*)((is_k ? kc_pool : vc_pool) + dec_page_off(ct, dst.y, h, D) + off) =
            *(const uint4*)((is_k ? out_k : out_v) + ((i64)m * HKV + h) * D + off);
    }
}

// Prefill only, after decode_write: the ring takes the raw compression-branch K/V of the last l
// positions of each chunk (a separate launch, because decode_write may still read the old ring).
extern "C" __global__ void __launch_bounds__(128) decode_ring(const int4* __restrict__ wdesc,
                                                              const bf16_t* __restrict__ kc_src,
                                                              const bf16_t* __restrict__ vc_src,
                                                              bf16_t* __restrict__ ring_k,
                                                              bf16_t* __restrict__ ring_v) {
    const int row = blockIdx.x, tid = threadIdx.x;
    const int4 d = wdesc[row];
    const int b = d.x, t = d.y, ce = d.w;
    if (t < ce - CMP_L) return;
    constexpr int CK = DK / 8, CV = DV / 8;
    for (int c = tid; c < HKV * CK; c += 128) {
        const int h = c / CK, k = (c % CK) * 8;
        *(uint4*)(ring_k + (((i64)b * CMP_L + t % CMP_L) * HKV + h) * DK + k) =
            *(const uint4*)(kc_src + ((i64)row * HKV + h) * DK + k);
    }
    for (int c = tid; c < HKV * CV; c += 128) {
        const int h = c / CV, k = (c % CV) * 8;
        *(uint4*)(ring_v + (((i64)b * CMP_L + t % CMP_L) * HKV + h) * DV + k) =
            *(const uint4*)(vc_src + ((i64)row * HKV + h) * DV + k);
    }
}

// ---------------------------------------------------------------------------------------------
// split-K attention core
// ---------------------------------------------------------------------------------------------

// Per-warp online-softmax state: rows wm*16 + gr and + 8 of the CTA, columns of the warp's keys.
struct DecState {
    float m[2];
    float l[2];
    float o[DV / 8][4];
};

// Shared memory of the attention kernels (dynamic): Q rows, DEC_STAGES K/V stages (K then V),
// then (compressed branch only) the logits of the chunk, [G][cc + DEC_LPAD] f32. Stage i's
// tiles are found by arithmetic (an array of stage pointers indexed at run time went to local
// memory: 48-byte stack frame, L2 round trips in the tile loop).
#define DEC_STAGE_ELEMS (KT * (DEC_KSTR + DEC_VSTR))
// logits row padding: with a row stride = 8 (mod 32) words, the float2 stores of one mma
// fragment (8 rows x 4 column pairs) take the minimum two wavefronts (v6: 8-way conflicts)
#define DEC_LPAD 8
struct DecSmem {
    bf16_t* Qs;
    bf16_t* KV;
    float* Ls;
};

__device__ __forceinline__ DecSmem dec_smem(unsigned char* smem) {
    DecSmem s;
    s.Qs = (bf16_t*)smem;
    s.KV = s.Qs + DEC_QROWS * QS_STRIDE;
    s.Ls = (float*)(s.KV + DEC_STAGES * DEC_STAGE_ELEMS);
    return s;
}
__device__ __forceinline__ bf16_t* dec_ks(const DecSmem& s, int stage) { return s.KV + stage * DEC_STAGE_ELEMS; }
__device__ __forceinline__ bf16_t* dec_vs(const DecSmem& s, int stage) {
    return s.KV + stage * DEC_STAGE_ELEMS + KT * DEC_KSTR;
}

// Query fragments (A operands of QK^T) of a warp's row tile, kept in registers across the tiles
// when they fit next to the accumulators (else re-read from shared memory every tile).
#define DEC_QREG (DK <= 192 && DV <= 128)
struct DecQ {
    u32 a[DEC_QREG ? DK / 16 : 1][4];
};

// Loads the G query rows of group g of row `row` (rows G .. 16*WM zero-filled).
__device__ __forceinline__ void dec_load_q(bf16_t* Qs, const bf16_t* __restrict__ q, int row, int g) {
    constexpr int CH = DK / 8;
    for (int c = threadIdx.x; c < DEC_QROWS * CH; c += 128) {
        const int r = c / CH, k = (c % CH) * 8;
        const bool ok = r < G;
        const bf16_t* src = ok ? q + ((i64)row * HQ + g * G + r) * DK + k : q;
        cp_async16(Qs + r * QS_STRIDE + k, src, ok ? 16 : 0);
    }
}

// Loads keys/values of positions start .. start + nk (rows nk .. KT zero-filled: a zero V row
// times a zero probability stays 0, never NaN).
// Page numbers of a tile of nk positions from `start` (KT == PAGE: at most two pages).
__device__ __forceinline__ int2 dec_tile_pages(const int* __restrict__ table, int start, int nk) {
    if (nk <= 0) return make_int2(0, 0);
    const int p0 = start / PAGE;
    const int a = table[p0];
    const int b = (start % PAGE) + nk > PAGE ? table[p0 + 1] : a;
    return make_int2(a, b);
}

// Loads keys/values of positions start .. start + nk, whose pages are pg (rows nk .. KT
// zero-filled: a zero V row times a zero probability stays 0, never NaN).
// (v7: fully unrolled with the page bases computed once; v6 spent ~35 instructions per 16-byte
// copy on 64-bit index arithmetic.)
template <int D, bool IS_K>
__device__ __forceinline__ void dec_load_rows(bf16_t* dst, const bf16_t* __restrict__ pool, int2 pg, int g,
                                              int off0, int nk) {
    constexpr int CH = D / 8;
    const bf16_t* b0 = pool + ((i64)pg.x * HKV + g) * PAGE * D;
    if constexpr (128 % CH == 0) {
        // the tile's rows lie in one page (every compressed tile, every selected tile when l'
        // is a multiple of PAGE): one pointer per thread, constant strides, ~4 instructions a copy
        if (off0 + nk <= PAGE) {
            constexpr int R = 128 / CH;   // rows per pass
            const int r0 = threadIdx.x / CH, k = (threadIdx.x % CH) * 8;
            const bf16_t* src = b0 + (off0 + r0) * D + k;
            const int dst0 = IS_K ? dec_koff(r0, k) : dec_voff(r0, k);
            constexpr int STR = IS_K ? DEC_KSTR : DEC_VSTR;
            if (nk == KT && (!DEC_SWIZZLE || R % 8 == 0)) {   // a full tile: no predicates
#pragma unroll
                for (int i = 0; i < KT / R; ++i) cp_async16(dst + dst0 + i * R * STR, src + i * R * D, 16);
                return;
            }
#pragma unroll
            for (int i = 0; i < KT / R; ++i) {
                const int r = r0 + i * R;
                const bool ok = r < nk;
                int off;
                if (!DEC_SWIZZLE || R % 8 == 0)
                    off = (IS_K ? dec_koff(r0, k) : dec_voff(r0, k)) + i * R * (IS_K ? DEC_KSTR : DEC_VSTR);
                else
                    off = IS_K ? dec_koff(r, k) : dec_voff(r, k);
                cp_async16(dst + off, ok ? src + i * R * D : pool, ok ? 16 : 0);
            }
            return;
        }
    }
    const bf16_t* b1 = pool + (((i64)pg.y * HKV + g) * PAGE - PAGE) * D;   // slot >= PAGE
#pragma unroll
    for (int i = 0; i < (KT * CH + 127) / 128; ++i) {
        const int c = threadIdx.x + i * 128;
        if ((KT * CH) % 128 == 0 || c < KT * CH) {
            const int r = c / CH, k = (c % CH) * 8;
            const int slot = off0 + r;
            const bool ok = r < nk;
            const bf16_t* src = (slot < PAGE ? b0 : b1) + slot * D + k;
            cp_async16(dst + (IS_K ? dec_koff(r, k) : dec_voff(r, k)), ok ? src : pool, ok ? 16 : 0);
        }
    }
}

__device__ __forceinline__ void dec_load_tile(bf16_t* Ks, bf16_t* Vs, const bf16_t* __restrict__ kp,
                                              const bf16_t* __restrict__ vp, int2 pg, int g, int start,
                                              int nk) {
    const int off0 = start % PAGE;
    dec_load_rows<DK, true>(Ks, kp, pg, g, off0, nk);
    dec_load_rows<DV, false>(Vs, vp, pg, g, off0, nk);
}

__device__ __forceinline__ void dec_ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}

// One tile for one warp: keys kw0 .. kw0 + DEC_KW of the tile (valid below nk). With Ls, the
// masked logits (log2 domain) of the G real rows are stored at column col0 + key.
__device__ __forceinline__ void dec_tile(const bf16_t* Qs, const DecQ& qf, const bf16_t* Ks,
                                         const bf16_t* Vs, int wm, int wk, int nk, DecState& st, float* Ls,
                                         int ls_stride, int col0) {
    const int lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    const int kw0 = wk * DEC_KW;
    float s[DEC_KW / 8][4];
#pragma unroll
    for (int nt = 0; nt < DEC_KW / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK; kk += 16) {
        u32 a[4];
#if DEC_QREG
        a[0] = qf.a[kk / 16][0];
        a[1] = qf.a[kk / 16][1];
        a[2] = qf.a[kk / 16][2];
        a[3] = qf.a[kk / 16][3];
#else
        const bf16_t* q0 = Qs + (wm * 16 + gr) * QS_STRIDE + kk + gc;
        a[0] = *(const u32*)(q0);
        a[1] = *(const u32*)(q0 + 8 * QS_STRIDE);
        a[2] = *(const u32*)(q0 + 8);
        a[3] = *(const u32*)(q0 + 8 * QS_STRIDE + 8);
#endif
        // B fragments of 16 keys x 16 dims per ldmatrix.x4 (matrices: keys +0..7 / +8..15 x
        // dims kk / kk+8); v6 read them with two 32-bit loads per 8 keys
#pragma unroll
        for (int np = 0; np < DEC_KW / 16; ++np) {
            const int mi = lane >> 3;
            const int kr = kw0 + np * 16 + (mi >> 1) * 8 + (lane & 7);
            u32 b0, b1, b2, b3;
            dec_ldsm_x4(b0, b1, b2, b3, Ks + dec_koff(kr, kk + (mi & 1) * 8));
            mma_bf16(s[2 * np], a, b0, b1);
            mma_bf16(s[2 * np + 1], a, b2, b3);
        }
    }
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int nt = 0; nt < DEC_KW / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = kw0 + nt * 8 + gc + (e & 1);
            const float v = key < nk ? s[nt][e] * SCALE_LOG2 : NEG_INF;
            s[nt][e] = v;
            mx[e >> 1] = fmaxf(mx[e >> 1], v);
        }
#ifndef DEC_EXP_NOLS   // experiment: no logits stores (timing)
    // masked keys store -inf; the fold reads only columns of valid keys
    if (Ls != nullptr) {
#pragma unroll
        for (int nt = 0; nt < DEC_KW / 8; ++nt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = wm * 16 + gr + 8 * hf;
                if (r < G)
                    *(float2*)(Ls + r * ls_stride + col0 + kw0 + nt * 8 + gc) =
                        make_float2(s[nt][2 * hf], s[nt][2 * hf + 1]);
            }
    }
#endif
    float mu[2], alpha[2], rs[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
        const float mn = fmaxf(st.m[i], mx[i]);
        mu[i] = (mn == NEG_INF) ? 0.f : mn;
        alpha[i] = exp2f(st.m[i] - mu[i]);
        st.m[i] = mn;
        rs[i] = 0.f;
    }
#pragma unroll
    for (int nt = 0; nt < DEC_KW / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float p = exp2f(s[nt][e] - mu[e >> 1]);
            s[nt][e] = p;
            rs[e >> 1] += p;
        }
#pragma unroll
    for (int i = 0; i < 2; ++i) st.l[i] = st.l[i] * alpha[i] + rs[i];
    // once the running maxima settle most tiles change none of them: skip the DV/2 multiplies
    if (__any_sync(0xffffffff, alpha[0] != 1.f || alpha[1] != 1.f)) scale_acc_rows<DV>(st.o, alpha[0], alpha[1]);
#pragma unroll
    for (int kc = 0; kc < DEC_KW / 16; ++kc) {
        u32 a[4];
        a[0] = pack_bf16x2(s[2 * kc][0], s[2 * kc][1]);
        a[1] = pack_bf16x2(s[2 * kc][2], s[2 * kc][3]);
        a[2] = pack_bf16x2(s[2 * kc + 1][0], s[2 * kc + 1][1]);
        a[3] = pack_bf16x2(s[2 * kc + 1][2], s[2 * kc + 1][3]);
        const int vrow = kw0 + kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int vcol = (lane >> 4) * 8;
#pragma unroll
        for (int n2 = 0; n2 < DV / 16; ++n2) {
            u32 b0, b1, b2, b3;
            ldmatrix_x4_trans(b0, b1, b2, b3, Vs + dec_voff(vrow, n2 * 16 + vcol));
            mma_bf16(st.o[2 * n2], a, b0, b1);
            mma_bf16(st.o[2 * n2 + 1], a, b2, b3);
        }
    }
}

// Runs the CTA over `ntiles` key tiles (tile_of(k, start, nk) gives tile k's first position and
// valid count) with a two-stage cp.async pipeline; Q is loaded (and committed) by the caller.
template <class TileOf>
__device__ __forceinline__ void dec_run(const DecSmem& sm, const bf16_t* __restrict__ kp,
                                        const bf16_t* __restrict__ vp, const int* __restrict__ table,
                                        int g, int ntiles, TileOf tile_of, DecState& st, float* Ls,
                                        int ls_stride) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = warp / DEC_WK, wk = warp % DEC_WK;
    // the page numbers of every tile (at most two pages each), read in parallel into shared
    // memory before the first copy: no dependent global load inside the tile loop
    __shared__ int2 pgs[DEC_PGMAX];
    for (int k = threadIdx.x; k < min(ntiles, DEC_PGMAX); k += 128) {
        int s0, n0;
        tile_of(k, s0, n0);
        pgs[k] = dec_tile_pages(table, s0, n0);
    }
    __syncthreads();
    auto pages = [&](int k, int s0, int n0) {
        return k < DEC_PGMAX ? pgs[k] : dec_tile_pages(table, s0, n0);
    };
    // prologue: tiles 0 .. DEC_STAGES-2 in flight (one commit group each, empty ones too, so
    // that "at most DEC_STAGES-1 groups pending" always means "tile k has landed")
#pragma unroll
    for (int k = 0; k < DEC_STAGES - 1; ++k) {
        if (k < ntiles) {
            int s0, n0;
            tile_of(k, s0, n0);
            dec_load_tile(dec_ks(sm, k), dec_vs(sm, k), kp, vp, pages(k, s0, n0), g, s0, n0);
        }
        cp_async_commit();
    }
    DecQ qf;
    int stage = 0;   // k % DEC_STAGES
    for (int k = 0; k < ntiles; ++k) {
        const int kn = k + DEC_STAGES - 1;
        if (kn < ntiles) {
            int s1, n1;
            tile_of(kn, s1, n1);
            const int sn = stage == 0 ? DEC_STAGES - 1 : stage - 1;   // kn % DEC_STAGES
            dec_load_tile(dec_ks(sm, sn), dec_vs(sm, sn), kp, vp, pages(kn, s1, n1), g, s1, n1);
        }
        cp_async_commit();
        asm volatile("cp.async.wait_group %0;\n" ::"n"(DEC_STAGES - 1));
        __syncthreads();
#if DEC_QREG
        if (k == 0 && wm < DEC_WM) {   // Q landed with the first tile's group
            const int gr = lane >> 2, gc = (lane & 3) * 2;
#pragma unroll
            for (int kk = 0; kk < DK / 16; ++kk) {
                const bf16_t* q0 = sm.Qs + (wm * 16 + gr) * QS_STRIDE + kk * 16 + gc;
                qf.a[kk][0] = *(const u32*)(q0);
                qf.a[kk][1] = *(const u32*)(q0 + 8 * QS_STRIDE);
                qf.a[kk][2] = *(const u32*)(q0 + 8);
                qf.a[kk][3] = *(const u32*)(q0 + 8 * QS_STRIDE + 8);
            }
        }
#endif
        int start, nk;
        tile_of(k, start, nk);
#ifndef DEC_EXP_NOTILE   // experiment: loads only (timing)
        if (wm < DEC_WM)
#else
        if (false)
#endif
            dec_tile(sm.Qs, qf, dec_ks(sm, stage), dec_vs(sm, stage), wm, wk, nk, st, Ls, ls_stride, k * KT);
        __syncthreads();
        stage = stage == DEC_STAGES - 1 ? 0 : stage + 1;
    }
    cp_async_wait_all();
    __syncthreads();
}

__device__ __forceinline__ void dec_state_init(DecState& st) {
    st.m[0] = st.m[1] = NEG_INF;
    st.l[0] = st.l[1] = 0.f;
#pragma unroll
    for (int nt = 0; nt < DV / 8; ++nt) st.o[nt][0] = st.o[nt][1] = st.o[nt][2] = st.o[nt][3] = 0.f;
}

// Merges the DEC_WK warps of each row tile and writes the CTA's partial: part_o [G, DV]
// (unnormalised, relative to the row max M), part_ml [G] = (M, L). M per row is left in fin_m.
// Reuses the K/V stages as scratch (the pipeline has drained).
__device__ __forceinline__ void dec_finish(const DecSmem& sm, DecState& st, float* __restrict__ part_o,
                                           float2* __restrict__ part_ml, float* fin_m) {
    __shared__ float red_m[4][16], red_l[4][16];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    const int wm = warp / DEC_WK;
    const bool active = wm < DEC_WM;
    float* red_o = (float*)sm.KV;   // [4 warps][16][DV]
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        st.l[i] += __shfl_xor_sync(0xffffffff, st.l[i], 1);
        st.l[i] += __shfl_xor_sync(0xffffffff, st.l[i], 2);
    }
    if (active && (lane & 3) == 0) {
        red_m[warp][gr] = st.m[0];
        red_m[warp][gr + 8] = st.m[1];
        red_l[warp][gr] = st.l[0];
        red_l[warp][gr + 8] = st.l[1];
    }
    __syncthreads();
    if (active) {
        float f[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = gr + 8 * i;
            float M = NEG_INF;
            for (int w = 0; w < DEC_WK; ++w) M = fmaxf(M, red_m[wm * DEC_WK + w][r]);
            f[i] = (M == NEG_INF) ? 0.f : exp2f(st.m[i] - M);
        }
        float* dst = red_o + warp * 16 * DV;
#pragma unroll
        for (int nt = 0; nt < DV / 8; ++nt) {
            *(float2*)(dst + gr * DV + nt * 8 + gc) = make_float2(st.o[nt][0] * f[0], st.o[nt][1] * f[0]);
            *(float2*)(dst + (gr + 8) * DV + nt * 8 + gc) = make_float2(st.o[nt][2] * f[1], st.o[nt][3] * f[1]);
        }
    }
    __syncthreads();
    for (int r = tid; r < G; r += 128) {
        const int wmr = r / 16, rr = r % 16;
        float M = NEG_INF;
        for (int w = 0; w < DEC_WK; ++w) M = fmaxf(M, red_m[wmr * DEC_WK + w][rr]);
        float L = 0.f;
        if (M != NEG_INF)
            for (int w = 0; w < DEC_WK; ++w) {
                const float mw = red_m[wmr * DEC_WK + w][rr];
                if (mw != NEG_INF) L += red_l[wmr * DEC_WK + w][rr] * exp2f(mw - M);
            }
        part_ml[r] = make_float2(M, L);
        fin_m[r] = M;
    }
    for (int e = tid; e < G * (DV / 4); e += 128) {
        const int r = e / (DV / 4), c = (e % (DV / 4)) * 4;
        const int wmr = r / 16, rr = r % 16;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int w = 0; w < DEC_WK; ++w) {
            const float4 v = *(const float4*)(red_o + ((wmr * DEC_WK + w) * 16 + rr) * DV + c);
            acc.x += v.x;
            acc.y += v.y;
            acc.z += v.z;
            acc.w += v.w;
        }
        *(float4*)(part_o + (i64)r * DV + c) = acc;
    }
    __syncthreads();
}

// overlap of compressed block i with selection block j, in units of d (Eq. 9)
__device__ __forceinline__ float dec_overlap_w(int i, int j) {
    const int a0 = i * CMP_D, a1 = a0 + CMP_L, b0 = j * SEL_L, b1 = b0 + SEL_L;
    const int lo = max(a0, b0), hi = min(a1, b1);
    return hi > lo ? (float)((hi - lo) / CMP_D) : 0.f;
}
// first selection block that compressed block i touches (for the chunk's j range)
__device__ __forceinline__ int dec_j_lo(int c0) { return (c0 * CMP_D) / SEL_L; }
// compressed blocks [ilo, ihi) overlapping selection block j
__device__ __forceinline__ int dec_i_lo(int j) {
    return (j * SEL_L + CMP_D > CMP_L) ? (j * SEL_L + CMP_D - CMP_L) / CMP_D : 0;
}
__device__ __forceinline__ int dec_i_hi(int j) { return ((j + 1) * SEL_L) / CMP_D; }

// ---------------------------------------------------------------------------------------------
// top-n
// ---------------------------------------------------------------------------------------------

// (v, i) ranks before (w, k): higher score first, then lower block index.
__device__ __forceinline__ bool dec_better(float v, int i, float w, int k) {
    return v > w || (v == w && i < k);
}

__device__ __forceinline__ void dec_bitonic_step(float& v, int& i, int j, bool up) {
    const int lane = threadIdx.x & 31;
    const float ov = __shfl_xor_sync(0xffffffff, v, j);
    const int oi = __shfl_xor_sync(0xffffffff, i, j);
    const bool lower = (lane & j) == 0;
    const bool take = (lower == up) ? dec_better(ov, oi, v, i) : dec_better(v, i, ov, oi);
    if (take) {
        v = ov;
        i = oi;
    }
}

// Sorts the warp's 32 (v, i) pairs best-first (lane 0 best).
__device__ __forceinline__ void dec_sort_desc(float& v, int& i) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 2; k <= 32; k <<= 1)
#pragma unroll
        for (int j = k >> 1; j > 0; j >>= 1) dec_bitonic_step(v, i, j, (lane & k) == 0);
}

// Merges a best-first list (v, i) into the best-first list (cv, ci): the best 32 of both.
__device__ __forceinline__ void dec_merge(float& cv, int& ci, float v, int i) {
    const int lane = threadIdx.x & 31;
    const float rv = __shfl_sync(0xffffffff, v, 31 - lane);
    const int ri = __shfl_sync(0xffffffff, i, 31 - lane);
    if (dec_better(rv, ri, cv, ci)) {
        cv = rv;
        ci = ri;
    }
#pragma unroll
    for (int jj = 16; jj > 0; jj >>= 1) dec_bitonic_step(cv, ci, jj, true);
}

__device__ __forceinline__ int dec_sort_asc_int(int x) {
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

// One CTA (8 warps; 4 when fused into decode_attn_cw) per (row, group).
// p[j] = sum_h sum_i w(i, j) exp2(s_hi - lse_h) is rebuilt
// from the chunks' partials: chunk c contributes sum_h exp2(M_ch - lse_h) * u_c[h][j]. The head
// sum is taken first, coalesced, into P[c][j - j_lo(c)] in shared memory (every global load is
// issued before any is used); then every warp scores a stride of candidates and keeps a running
// top-32 (bitonic), and warp 0 merges the eight lists. Forced blocks score +inf; inadmissible
// ones never enter. sel [rows, HKV, NSEL] ascending, -1 padded.
// Dynamic shared memory: ml [sc][G] float2, wgt [sc][G], P [sc][uj].
// The top-n of (row, group) for a CTA of NW warps (partials read through L2: in the fused
// path they were written by other CTAs of the same launch).
template <int NW, bool FUSED>
__device__ __forceinline__ void dec_topn_body(unsigned char* smem, int row, int g, int t,
                                              const float2* part_ml, const float* part_u, int sc,
                                              int cc, int ns, int uj, int* __restrict__ sel) {
    float2* ml = (float2*)smem;           // [sc][G]
    float* wgt = (float*)(ml + sc * G);   // [sc][G]
    float* P = wgt + sc * G;              // [sc][uj]
    __shared__ float lv[NW][32];
    __shared__ int li[NW][32];
    constexpr int NT = NW * 32;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int nvis = dec_cmp_visible(t), nadm = t / SEL_L + 1, own = t / SEL_L;
    const i64 rg = (i64)row * HKV + g;
    for (int e = tid; e < sc * G; e += NT) ml[e] = FUSED ? __ldcg(part_ml + rg * ns * G + e) : __ldg(part_ml + rg * ns * G + e);   // slots [0, sc)
    __syncthreads();
    // log-sum-exp of each head over the compressed splits: one warp per head, lanes over splits
    for (int h = warp; h < G; h += NW) {
        float M = NEG_INF;
        for (int s = lane; s < sc; s += 32)
            if (ml[s * G + h].y > 0.f) M = fmaxf(M, ml[s * G + h].x);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffff, M, o));
        float L = 0.f;
        for (int s = lane; s < sc; s += 32)
            if (ml[s * G + h].y > 0.f) L += ml[s * G + h].y * exp2f(ml[s * G + h].x - M);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffff, L, o);
        const float lse = L > 0.f ? M + log2f(L) : 0.f;
        for (int s = lane; s < sc; s += 32)
            wgt[s * G + h] = (L > 0.f && ml[s * G + h].y > 0.f) ? exp2f(ml[s * G + h].x - lse) : 0.f;
    }
    __syncthreads();
    const float* u = part_u + rg * sc * G * uj;
    for (int e = tid; e < sc * uj; e += NT) {
        const int s = e / uj, jj = e % uj;
        const int jl = dec_j_lo(s * cc);
        const int c1 = min(s * cc + cc, nvis);
        const int jh = c1 > s * cc ? ((c1 - 1) * CMP_D + CMP_L - 1) / SEL_L : jl - 1;
        float acc = 0.f;
        if (jl + jj <= jh) {
            float v[G];
#pragma unroll
            for (int h = 0; h < G; ++h) v[h] = wgt[s * G + h] != 0.f ? (FUSED ? __ldcg(u + (s * G + h) * uj + jj) : __ldg(u + (s * G + h) * uj + jj)) : 0.f;
#pragma unroll
            for (int h = 0; h < G; ++h) acc += wgt[s * G + h] * v[h];
        }
        P[e] = acc;
    }
    __syncthreads();
    float cv = NEG_INF;
    int ci = DEC_INT_MAX;
    for (int jb = warp * 32; jb < nadm; jb += NT) {
        const int j = jb + lane;
        float v = NEG_INF;
        int i = DEC_INT_MAX;
        if (j < nadm) {
            i = j;
            if (j < NINIT || (j <= own && j > own - NLOCAL)) {
                v = POS_INF;
            } else {
                const int ilo = dec_i_lo(j), ihi = min(nvis, dec_i_hi(j));
                float acc = 0.f;
                if (ilo < ihi)
                    for (int s = ilo / cc; s <= (ihi - 1) / cc; ++s) acc += P[s * uj + j - dec_j_lo(s * cc)];
                v = acc;
            }
        }
        // a candidate that does not beat the warp's current NSEL-th best cannot reach the final
        // top NSEL: skip the sort when no lane has one (most batches, once the list has filled)
        const float tv = __shfl_sync(0xffffffff, cv, NSEL - 1);
        const int ti = __shfl_sync(0xffffffff, ci, NSEL - 1);
        if (!__any_sync(0xffffffff, dec_better(v, i, tv, ti))) continue;
        dec_sort_desc(v, i);
        dec_merge(cv, ci, v, i);
    }
    lv[warp][lane] = cv;
    li[warp][lane] = ci;
    __syncthreads();
    if (warp == 0) {
        for (int w = 1; w < NW; ++w) dec_merge(cv, ci, lv[w][lane], li[w][lane]);
        int key = (lane < NSEL && cv != NEG_INF) ? ci : DEC_INT_MAX;
        key = dec_sort_asc_int(key);
        if (lane < NSEL) sel[rg * NSEL + lane] = key == DEC_INT_MAX ? -1 : key;
    }
}

extern "C" __global__ void __launch_bounds__(256) decode_topn(const int4* __restrict__ adesc,
                                                              const float2* __restrict__ part_ml,
                                                              const float* __restrict__ part_u, int sc,
                                                              int cc, int ns, int uj,
                                                              int* __restrict__ sel) {
    extern __shared__ __align__(DEC_SMEM_ALIGN) unsigned char smem[];
    const int row = blockIdx.x / HKV, g = blockIdx.x % HKV;
    dec_topn_body<8, false>(smem, row, g, adesc[row].y, part_ml, part_u, sc, cc, ns, uj, sel);
}

// Partial slots of (row, group): [0, sc) compressed splits, [sc, sc + sw) window splits,
// [sc + sw, ns) selected splits. part_o [rows*HKV, ns, G, DV], part_ml [rows*HKV, ns, G].
// part_u [rows*HKV, sc, G, uj]: u[h][j - j_lo] = sum_i w(i, j) * exp2(s_hi - M_h) over the
// chunk's visible compressed blocks i (Eq. 9 before normalisation).
extern "C" __global__ void __launch_bounds__(128) decode_attn_cw(
    const int4* __restrict__ adesc, const int* __restrict__ cmp_table, int maxp_cmp,
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc_pool, const bf16_t* __restrict__ vc_pool,
    int sc, int cc, int ns, int uj, float* __restrict__ part_o, float2* __restrict__ part_ml,
    float* __restrict__ part_u, int* __restrict__ sel, int* __restrict__ done, int fuse_topn) {
    extern __shared__ __align__(DEC_SMEM_ALIGN) unsigned char smem[];
    __shared__ float fin_m[DEC_QROWS];
    const DecSmem sm = dec_smem(smem);
    // one dimension, split fastest: the splits of a (row, group) are dispatched together, so
    // groups finish throughout the launch (a fused top-n overlaps later groups' streaming)
    const int s = blockIdx.x % sc, rgi = blockIdx.x / sc;
    const int row = rgi / HKV, g = rgi % HKV;
    const int4 d = adesc[row];
    const int b = d.x, t = d.y, qrow = d.z;
    const i64 rg = (i64)row * HKV + g;
    dec_load_q(sm.Qs, q, qrow, g);
    DecState st;
    dec_state_init(st);
    {
        const int nvis = dec_cmp_visible(t);
        const int c0 = s * cc, c1 = min(c0 + cc, nvis);
        const int n = max(c1 - c0, 0);
        const int* table = cmp_table + (i64)b * maxp_cmp;
        auto tile_of = [&](int k, int& start, int& nk) {
            start = c0 + k * KT;
            nk = min(KT, c1 - start);
        };
        const int lstr = cc + DEC_LPAD;
        dec_run(sm, kc_pool, vc_pool, table, g, (n + KT - 1) / KT, tile_of, st, sm.Ls, lstr);
        dec_finish(sm, st, part_o + (rg * ns + s) * G * DV, part_ml + (rg * ns + s) * G, fin_m);
        // Eq. 9 partial scores of the selection blocks this chunk touches
        float* u = part_u + (rg * sc + s) * G * uj;
#ifdef DEC_EXP_NOFOLD   // experiment: no Eq. 9 fold (timing)
        if (false) {
#else
        if (n > 0) {
#endif
            const int jl = dec_j_lo(c0);
            const int jh = ((c1 - 1) * CMP_D + CMP_L - 1) / SEL_L;   // inclusive
            const int nj = jh - jl + 1;
            const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
            // probabilities first (each logit once), then the overlap-weighted sums: one warp
            // per head, lanes over the selection blocks (v6: one (head, block) per thread with
            // a division and ~5 exp2 each, a quarter of the kernel's instructions)
            for (int h = warp; h < G; h += 4) {
                const float M = fin_m[h];
                float* row = sm.Ls + h * lstr;
                for (int c = lane; c < n; c += 32) row[c] = exp2f(row[c] - M);
            }
            __syncthreads();
            for (int h = warp; h < G; h += 4) {
                const float* row = sm.Ls + h * lstr - c0;
                for (int jj = lane; jj < nj; jj += 32) {
                    const int j = jl + jj;
                    float acc = 0.f;
#if SEL_L % CMP_D == 0 && CMP_L % CMP_D == 0
                    // l and l' multiples of d: block j overlaps i = j*P + m, m in (-Q, P), by
                    // min(m + Q, P) - max(m, 0) strides (Eq. 9; 1,2,2,2,1 for 32/16/64), constants
                    constexpr int P = SEL_L / CMP_D, Q = CMP_L / CMP_D;
#pragma unroll
                    for (int m = 1 - Q; m < P; ++m) {
                        const int i = j * P + m;
                        const float w = (float)(min(m + Q, P) - max(m, 0));
                        if (i >= c0 && i < c1) acc += w * row[i];
                    }
#else
                    const int ilo = max(c0, dec_i_lo(j)), ihi = min(c1, dec_i_hi(j));
                    for (int i = ilo; i < ihi; ++i) acc += dec_overlap_w(i, j) * row[i];
#endif
                    u[h * uj + jj] = acc;
                }
            }
        }
    }
    // fused top-n (large batches): the last of the sc CTAs of (row, group) to finish runs it,
    // while other groups' splits still stream (saves the launch and the dependent phase);
    // done[rg] counts finished splits and is reset by the last one (graph replays)
    if (fuse_topn) {
        __shared__ int last;
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            last = atomicAdd(done + rg, 1) == sc - 1;
            if (last) done[rg] = 0;
        }
        __syncthreads();
        if (last) {
            __threadfence();
            dec_topn_body<4, true>(smem, row, g, t, part_ml, part_u, sc, cc, ns, uj, sel);
        }
    }
}

// Window splits (blockIdx.y < sw) and selected-block splits (the rest) in one launch, neither
// needing the logits buffer. Selected split s takes the selected slots [s*spb, (s+1)*spb) of sel [rows, HKV, NSEL];
// block j covers positions [j*l', min((j+1)*l', t+1)), in tiles of KT.
extern "C" __global__ void __launch_bounds__(128) decode_sel(
    const int4* __restrict__ adesc, const int* __restrict__ raw_table, int maxp_raw,
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ ks_pool, const bf16_t* __restrict__ vs_pool,
    const bf16_t* __restrict__ kw_pool, const bf16_t* __restrict__ vw_pool, const int* __restrict__ sel,
    int sc, int sw, int cw, int spb, int ns, float* __restrict__ part_o, float2* __restrict__ part_ml) {
    extern __shared__ __align__(DEC_SMEM_ALIGN) unsigned char smem[];
    __shared__ float fin_m[DEC_QROWS];
    __shared__ int blk[NSEL];
    constexpr int TPB = (SEL_L + KT - 1) / KT;   // tiles per selection block
    const DecSmem sm = dec_smem(smem);
    const int row = blockIdx.x / HKV, g = blockIdx.x % HKV;
    const int4 d = adesc[row];
    const int b = d.x, t = d.y, qrow = d.z;
    const i64 rg = (i64)row * HKV + g;
    if ((int)blockIdx.y < sw) {
        // sliding window: keys max(0, t-w+1) ..= t, split sw ways
        const int s = blockIdx.y;
        dec_load_q(sm.Qs, q, qrow, g);
        DecState st;
        dec_state_init(st);
        const int lo = max(0, t - WIN + 1);
        const int k0 = lo + s * cw, k1 = min(k0 + cw, t + 1);
        const int n = max(k1 - k0, 0);
        const int* table = raw_table + (i64)b * maxp_raw;
        auto tile_of = [&](int k, int& start, int& nk) {
            start = k0 + k * KT;
            nk = min(KT, k1 - start);
        };
        dec_run(sm, kw_pool, vw_pool, table, g, (n + KT - 1) / KT, tile_of, st, nullptr, 0);
        const int slot = sc + s;
        dec_finish(sm, st, part_o + (rg * ns + slot) * G * DV, part_ml + (rg * ns + slot) * G, fin_m);
        return;
    }
    const int s = blockIdx.y - sw;
    const int k0 = s * spb, nb = max(0, min(spb, NSEL - k0));
    for (int k = threadIdx.x; k < nb; k += 128) blk[k] = sel[rg * NSEL + k0 + k];
    dec_load_q(sm.Qs, q, qrow, g);
    __syncthreads();
    DecState st;
    dec_state_init(st);
    const int* table = raw_table + (i64)b * maxp_raw;
    auto tile_of = [&](int k, int& start, int& nk) {
        const int j = blk[k / TPB];
        if (j < 0) {
            start = 0;
            nk = 0;
            return;
        }
        start = j * SEL_L + (k % TPB) * KT;
        nk = max(0, min(KT, min((j + 1) * SEL_L, t + 1) - start));
    };
    dec_run(sm, ks_pool, vs_pool, table, g, nb * TPB, tile_of, st, nullptr, 0);
    const int slot = sc + sw + s;
    dec_finish(sm, st, part_o + (rg * ns + slot) * G * DV, part_ml + (rg * ns + slot) * G, fin_m);
}

// ---------------------------------------------------------------------------------------------
// combine
// ---------------------------------------------------------------------------------------------

// One CTA per (row, group, head): each branch's splits merged (flash-decoding), then
// o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win into out [rows, HQ, DV]. The (m, l) of every
// slot are staged in shared memory first; the 128 threads are 4 slot lanes x 32 column lanes,
// each column lane summing a quarter of the slots, reduced through shared memory.
extern "C" __global__ void __launch_bounds__(128) decode_combine(
    const int4* __restrict__ adesc, const float* __restrict__ part_o, const float2* __restrict__ part_ml,
    const float* __restrict__ g_cmp, const float* __restrict__ g_slc, const float* __restrict__ g_win,
    int sc, int sw, int ss, float* __restrict__ out) {
    extern __shared__ __align__(DEC_SMEM_ALIGN) unsigned char smem[];
    const int ns = sc + sw + ss;
    float2* ml = (float2*)smem;          // [ns]
    float* coef = (float*)(ml + ns);     // [ns]
    __shared__ float4 red[4][DV / 4];
    const int row = blockIdx.x / HKV, g = blockIdx.x % HKV, h = blockIdx.y, tid = threadIdx.x;
    const int qrow = adesc[row].z;
    const i64 rg = (i64)row * HKV + g;
    for (int s = tid; s < ns; s += 128) ml[s] = part_ml[(rg * ns + s) * G + h];
    __syncthreads();
    if (tid < 96) {   // one warp per branch, lanes over its splits
        const int br = tid >> 5, lane = tid & 31;
        const int s0 = br == 0 ? 0 : (br == 1 ? sc + sw : sc);
        const int s1 = br == 0 ? sc : (br == 1 ? ns : sc + sw);
        const float* gate = br == 0 ? g_cmp : (br == 1 ? g_slc : g_win);
        const float gv = gate[(i64)qrow * HQ + g * G + h];
        float M = NEG_INF;
        for (int s = s0 + lane; s < s1; s += 32)
            if (ml[s].y > 0.f) M = fmaxf(M, ml[s].x);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffff, M, o));
        float L = 0.f;
        for (int s = s0 + lane; s < s1; s += 32)
            if (ml[s].y > 0.f) L += ml[s].y * exp2f(ml[s].x - M);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffff, L, o);
        for (int s = s0 + lane; s < s1; s += 32)
            coef[s] = (L > 0.f && ml[s].y > 0.f) ? gv * exp2f(ml[s].x - M) / L : 0.f;
    }
    __syncthreads();
    const int sl = tid >> 5, cl = tid & 31;
    for (int c4 = cl; c4 < DV / 4; c4 += 32) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
        for (int s = sl; s < ns; s += 4) {
            const float cf = coef[s];
            if (cf != 0.f) {
                const float4 v = *(const float4*)(part_o + ((rg * ns + s) * G + h) * DV + c4 * 4);
                acc.x += cf * v.x;
                acc.y += cf * v.y;
                acc.z += cf * v.z;
                acc.w += cf * v.w;
            }
        }
        red[sl][c4] = acc;
    }
    __syncthreads();
    for (int c4 = tid; c4 < DV / 4; c4 += 128) {
        float4 a = red[0][c4];
#pragma unroll
        for (int k = 1; k < 4; ++k) {
            a.x += red[k][c4].x;
            a.y += red[k][c4].y;
            a.z += red[k][c4].z;
            a.w += red[k][c4].w;
        }
        *(float4*)(out + ((i64)row * HQ + g * G + h) * DV + c4 * 4) = a;
    }
}
