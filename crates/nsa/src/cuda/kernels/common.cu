// Shared prelude of every NSA kernel family (prepended by the Rust side before NVRTC).
//
// Header-free on purpose: NVRTC 13.0 on the GPU machine ships no headers, so the few things we
// need (bf16 <-> f32, mma.sync, ldmatrix, cp.async) are written here through inline PTX.
//
// Shape constants arrive as -D defines from the launcher (see cuda/module.rs):
//   DK, DV        query/key and value head dims (multiples of 16, <= 256)
//   HQ, HKV, G    query heads, KV heads, group size G = HQ / HKV
//   CMP_L, CMP_D  compression block length l and stride d
//   SEL_L         selection block length l'
//   NSEL, NINIT, NLOCAL   selected blocks n, forced initial / local blocks
//   WIN           sliding window w
//   SCALE_LOG2    softmax scale * log2(e): scores are kept in the log2 domain (exp2f)
//   ELEM_F16      (optional) the 16-bit element type is IEEE half instead of bfloat16
//
// The 16-bit element type. `bf16_t` is "the 16-bit element type" of every kernel's Q/K/V and
// of the 16-bit copies the kernels make (compressed K/V, P and dS operands of the MMAs, saved
// branch outputs, dO): bfloat16 by default, IEEE binary16 (f16) when built with -DELEM_F16.
// The names below keep "bf16" (bf16_t, bf16_to_f32, f32_to_bf16, pack_bf16x2, bf16x2_lo/hi,
// mma_bf16) and convert to / multiply in whichever type is chosen; the explicit f16 helpers
// (f32_to_f16, pack_f16x2, mma_f16) are always f16 (cmp_topn's score matrix uses them).
// Accumulation is f32 either way.

typedef unsigned short bf16_t;   // raw bits of the 16-bit element type (bf16, or f16 under ELEM_F16)
typedef unsigned int u32;
typedef long long i64;

#define NEG_INF (__int_as_float(0xff800000))
#define POS_INF (__int_as_float(0x7f800000))

// Key tile: 64 keys per step of every attention loop.
#define KT 64
// Padded smem row strides (in bf16 elements): +8 elements = 16 bytes shifts consecutive rows by
// 4 banks, so the 8 rows touched by one mma fragment load (or one ldmatrix) hit distinct banks.
#define QS_STRIDE (DK + 8)
#define KS_STRIDE (DK + 8)
#define VS_STRIDE (DV + 8)

#ifdef ELEM_F16
#define ELEM_PTX "f16"
// f16 bits -> f32 (exact).
__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Round-to-nearest-even f32 -> f16 (overflow gives +-inf, NaN stays NaN).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Two floats -> one f16x2 register, `lo` in the low half (the lower k/column index).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The low / high element of a packed pair, as f32.
__device__ __forceinline__ float bf16x2_lo(u32 w) { return bf16_to_f32((bf16_t)(w & 0xffffu)); }
__device__ __forceinline__ float bf16x2_hi(u32 w) { return bf16_to_f32((bf16_t)(w >> 16)); }
#else
#define ELEM_PTX "bf16"
__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round-to-nearest-even f32 -> bf16 (NaN stays NaN).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Two floats -> one bf16x2 register, `lo` in the low half (the lower k/column index).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The low / high element of a packed pair, as f32 (bf16 is the top half of an f32).
__device__ __forceinline__ float bf16x2_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16x2_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
#endif

// f32 -> f16 bits, round to nearest even.
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Two floats -> one f16x2 register, `lo` in the low half.
__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// D = A * B + D, m16n8k16, f16 inputs, f32 accumulators (same fragment layouts as below).
__device__ __forceinline__ void mma_f16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D = A * B + D, m16n8k16, inputs of the 16-bit element type (bf16, or f16 under ELEM_F16),
// f32 accumulators.
// Fragment layouts (lane = threadIdx.x % 32, gr = lane / 4, gc = (lane % 4) * 2):
//   A (16x16, row-major): a0 = A[gr][gc..gc+1], a1 = A[gr+8][gc..], a2 = A[gr][gc+8..], a3 = A[gr+8][gc+8..]
//   B (16x8, k x n):      b0 = B[gc..gc+1][gr],  b1 = B[gc+8..gc+9][gr]
//   C (16x8):             c0,c1 = C[gr][gc..gc+1], c2,c3 = C[gr+8][gc..gc+1]
__device__ __forceinline__ void mma_bf16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." ELEM_PTX "." ELEM_PTX ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// Four 8x8 bf16 matrices, transposed on the way: lane i gives the row address of row i%8 of
// matrix i/8; register j receives matrix j in the B-fragment layout.
__device__ __forceinline__ void ldmatrix_x4_trans(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}

// 16-byte global -> shared copy; src_bytes = 0 fills the destination with zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
}
// 4-byte global -> shared copy (the 4- and 8-byte sizes exist only as cp.async.ca).
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
// Waits until at most one committed group is still in flight (double buffering).
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

// Loads `nrows` rows of `D` bf16 each into smem (row stride `STRIDE`), zero-filling rows
// `nrows .. ROWS`. Row r comes from `base + row_off(r)` (element offset, 64-bit).
template <int ROWS, int D, int STRIDE, int NTHREADS, class RowOff>
__device__ __forceinline__ void load_rows_async(bf16_t* dst, const bf16_t* base, int nrows,
                                                RowOff row_off) {
    constexpr int CHUNKS = D / 8;   // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS, k = (c % CHUNKS) * 8;
        const bool ok = r < nrows;
        const bf16_t* src = ok ? base + row_off(r) + k : base;
        cp_async16(dst + r * STRIDE + k, src, ok ? 16 : 0);
    }
}

// Rows per warp = 16 * MT. With MT = 2 a warp runs two m16 tiles against every K/V fragment it
// reads from shared memory, halving the shared-memory bytes per MMA (the m16n8k16 path moves 8 MAC
// per smem byte at MT = 1, exactly the SM's MMA/smem ratio). MT = 2 needs 2x the accumulator
// registers, so it is used for dv <= 128 only (the launcher passes -DMT_WIDE).
#ifndef MT_WIDE
#define MT_WIDE (DV <= 128 ? 2 : 1)
#endif

// Per-warp state of one flash-attention row block (16 * MT rows): the thread owns rows
// mt*16 + gr and mt*16 + gr + 8 (index i = 2*mt + h) of the warp's block, columns gc, gc+1 of
// every 8-wide n-tile.
template <int MT>
struct RowStats {
    float m[2 * MT];   // running max (log2 domain), -inf while nothing was seen
    float l[2 * MT];   // running sum of exp2 (this thread's columns only; reduced at the end)
};

// S = Q K^T for the warp's 16*MT query rows (q_row0 .. of Qs) against the KT keys of Ks.
template <int MT, int NK = KT>
__device__ __forceinline__ void qk_tile(const bf16_t* Qs, const bf16_t* Ks, int q_row0,
                                        float (&s)[MT][NK / 8][4]) {
    const int lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NK / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK; kk += 16) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const bf16_t* q0 = Qs + (q_row0 + mt * 16 + gr) * QS_STRIDE + kk + gc;
            a[mt][0] = *(const u32*)(q0);
            a[mt][1] = *(const u32*)(q0 + 8 * QS_STRIDE);
            a[mt][2] = *(const u32*)(q0 + 8);
            a[mt][3] = *(const u32*)(q0 + 8 * QS_STRIDE + 8);
        }
#pragma unroll
        for (int nt = 0; nt < NK / 8; ++nt) {
            const bf16_t* k0 = Ks + (nt * 8 + gr) * KS_STRIDE + kk + gc;
            const u32 b0 = *(const u32*)(k0), b1 = *(const u32*)(k0 + 8);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma_bf16(s[mt][nt], a[mt], b0, b1);
        }
    }
}

// The online-softmax correction of an m16 accumulator tile: row gr (elements 0, 1 of each n8
// block) times a0, row gr + 8 (elements 2, 3) times a1.
template <int D>
__device__ __forceinline__ void scale_acc_rows(float (&o)[D / 8][4], float a0, float a1) {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
        o[nt][0] *= a0;
        o[nt][1] *= a0;
        o[nt][2] *= a1;
        o[nt][3] *= a1;
    }
}

// One key tile of flash attention for the warp's rows: S = Q K^T (tensor cores), masked by
// [lo, hi) per row (key index in the tile), the online softmax update, and O += P V.
template <int MT, int NK = KT>
__device__ __forceinline__ void attn_tile(const bf16_t* Qs, const bf16_t* Ks, const bf16_t* Vs,
                                          int q_row0, const int (&lo)[2 * MT], const int (&hi)[2 * MT],
                                          RowStats<MT>& st, float (&o)[MT][DV / 8][4]) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
    float s[MT][NK / 8][4];
    qk_tile<MT, NK>(Qs, Ks, q_row0, s);
    float mx[2 * MT];
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i) mx[i] = NEG_INF;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NK / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = 2 * mt + (e >> 1), key = nt * 8 + gc + (e & 1);
                const float v = (key >= lo[i] && key < hi[i]) ? s[mt][nt][e] * SCALE_LOG2 : NEG_INF;
                s[mt][nt][e] = v;
                mx[i] = fmaxf(mx[i], v);
            }
    float alpha[2 * MT], mu[2 * MT], rs[2 * MT];
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
        const float mn = fmaxf(st.m[i], mx[i]);
        mu[i] = (mn == NEG_INF) ? 0.f : mn;   // all masked so far: keep exp2 finite (gives 0)
        alpha[i] = exp2f(st.m[i] - mu[i]);
        st.m[i] = mn;
        rs[i] = 0.f;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NK / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = 2 * mt + (e >> 1);
                const float p = exp2f(s[mt][nt][e] - mu[i]);
                s[mt][nt][e] = p;
                rs[i] += p;
            }
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i) st.l[i] = st.l[i] * alpha[i] + rs[i];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) scale_acc_rows<DV>(o[mt], alpha[2 * mt], alpha[2 * mt + 1]);
#pragma unroll
    for (int kc = 0; kc < NK / 16; ++kc) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = pack_bf16x2(s[mt][2 * kc][0], s[mt][2 * kc][1]);
            a[mt][1] = pack_bf16x2(s[mt][2 * kc][2], s[mt][2 * kc][3]);
            a[mt][2] = pack_bf16x2(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
            a[mt][3] = pack_bf16x2(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
        }
        const int vrow = kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int vcol = (lane >> 4) * 8;
#pragma unroll
        for (int n2 = 0; n2 < DV / 16; ++n2) {
            u32 b0, b1, b2, b3;
            ldmatrix_x4_trans(b0, b1, b2, b3, Vs + vrow * VS_STRIDE + n2 * 16 + vcol);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_bf16(o[mt][2 * n2], a[mt], b0, b1);
                mma_bf16(o[mt][2 * n2 + 1], a[mt], b2, b3);
            }
        }
    }
}

template <int MT>
__device__ __forceinline__ void rowstats_init(RowStats<MT>& st) {
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i) {
        st.m[i] = NEG_INF;
        st.l[i] = 0.f;
    }
}

template <int MT>
__device__ __forceinline__ void zero_acc(float (&o)[MT][DV / 8][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < DV / 8; ++nt) o[mt][nt][0] = o[mt][nt][1] = o[mt][nt][2] = o[mt][nt][3] = 0.f;
}

// Completes the row sums across the 4 lanes that share a row; returns 1/l (0 when l == 0:
// a row that saw no key gives exactly 0, never NaN).
template <int MT>
__device__ __forceinline__ void rowstats_finish(RowStats<MT>& st, float (&inv)[2 * MT]) {
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i) {
        st.l[i] += __shfl_xor_sync(0xffffffff, st.l[i], 1);
        st.l[i] += __shfl_xor_sync(0xffffffff, st.l[i], 2);
        inv[i] = st.l[i] > 0.f ? 1.f / st.l[i] : 0.f;
    }
}

// Writes scale * O for the thread's rows in bf16 (a branch output saved for the backward);
// `dst[i]` nullptr: row not written.
template <int MT>
__device__ __forceinline__ void store_rows_bf16(bf16_t* const (&dst)[2 * MT], const float (&scale)[2 * MT],
                                                const float (&o)[MT][DV / 8][4]) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i) {
        if (dst[i] == nullptr) continue;
        const int mt = i >> 1, h = i & 1;
#pragma unroll
        for (int nt = 0; nt < DV / 8; ++nt)
            *(u32*)(dst[i] + nt * 8 + gc) = pack_bf16x2(o[mt][nt][2 * h] * scale[i], o[mt][nt][2 * h + 1] * scale[i]);
    }
}

// Writes (or adds) scale * O for the thread's rows. `dst[i]` is the f32 output row of row i
// (nullptr: row not written), `scale[i]` its gate / l.
template <bool ACCUMULATE, int MT>
__device__ __forceinline__ void store_rows(float* const (&dst)[2 * MT], const float (&scale)[2 * MT],
                                           const float (&o)[MT][DV / 8][4]) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i) {
        if (dst[i] == nullptr) continue;
        const int mt = i >> 1, h = i & 1;
#pragma unroll
        for (int nt = 0; nt < DV / 8; ++nt) {
            float2* p = (float2*)(dst[i] + nt * 8 + gc);
            float2 v = make_float2(o[mt][nt][2 * h] * scale[i], o[mt][nt][2 * h + 1] * scale[i]);
            if (ACCUMULATE) {
                const float2 old = *p;
                v.x += old.x;
                v.y += old.y;
            }
            *p = v;
        }
    }
}

// The end of a branch kernel for the thread's rows (qrow[i]: the [N, HQ] row of row i, -1 when
// the row is not real): out[row] = (ACCUMULATE: +=) gate[row] * o / l, the branch's term of the
// gated sum; the row's log-sum-exp (log2 units, +inf for a row that saw no key) into `lse`
// when it is given; and o / l in 16 bits into `o_save` when it is given (the backward's saved
// statistics).
template <bool ACCUMULATE, int MT>
__device__ __forceinline__ void finish_branch_rows(const i64 (&qrow)[2 * MT], RowStats<MT>& st,
                                                   const float (&o)[MT][DV / 8][4],
                                                   const float* __restrict__ gate, float* __restrict__ out,
                                                   float* __restrict__ lse, bf16_t* __restrict__ o_save) {
    const int lane = threadIdx.x & 31;
    float inv[2 * MT];
    rowstats_finish(st, inv);
    float* dst[2 * MT];
    float sc[2 * MT];
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i) {
        const bool valid = qrow[i] >= 0;
        if (lse != nullptr && valid && (lane & 3) == 0)
            lse[qrow[i]] = st.l[i] > 0.f ? st.m[i] + log2f(st.l[i]) : POS_INF;
        dst[i] = valid ? out + qrow[i] * DV : nullptr;
        sc[i] = valid ? gate[qrow[i]] * inv[i] : 0.f;
    }
    store_rows<ACCUMULATE, MT>(dst, sc, o);
    if (o_save != nullptr) {
        bf16_t* ds[2 * MT];
#pragma unroll
        for (int i = 0; i < 2 * MT; ++i) ds[i] = qrow[i] >= 0 ? o_save + qrow[i] * DV : nullptr;
        store_rows_bf16<MT>(ds, inv, o);
    }
}

// The union of P positions' selected-block lists (`idx[p * NSEL + i]`, ascending, padded with
// 0x7fffffff), in ascending block order, cut into chunks of at most CHUNK keys that stop at tmax:
// chunk i = (first key k0s[i], length nks[i], the bit set masks[i] of the positions that chose
// its block). A P-way merge with lane p < P holding position p's next block; warp 0 calls it,
// lane 0 writes the arrays; returns the number of chunks (in every lane). Shared by the forward's
// sel_attn and the backward's sel_bwd_dq, which walk the same union.
template <int P, int CHUNK>
__device__ __forceinline__ int sel_union_chunks(const int* idx, int tmax, int* k0s, int* nks, unsigned* masks) {
    const int lane = threadIdx.x & 31;
    int ptr = 0, count = 0;
    int cur = lane < P ? idx[lane * NSEL] : 0x7fffffff;
    while (true) {
        int b = cur;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) b = min(b, __shfl_xor_sync(0xffffffff, b, off));
        if (b == 0x7fffffff) break;
        const unsigned chose = __ballot_sync(0xffffffff, lane < P && cur == b);
        if (lane < P && cur == b) {
            ++ptr;
            cur = ptr < NSEL ? idx[lane * NSEL + ptr] : 0x7fffffff;
        }
        const int bend = min((b + 1) * SEL_L, tmax + 1);
        for (int k0 = b * SEL_L; k0 < bend; k0 += CHUNK) {
            if (lane == 0) {
                k0s[count] = k0;
                nks[count] = min(CHUNK, bend - k0);
                masks[count] = chose;
            }
            ++count;
        }
    }
    return count;
}
