// Selection branch, block-outer ("FSA-style" loop inversion) for small groups G < 16.
//
// sel_attn (position-major) streams every selected block of its positions through shared memory;
// on random data the positions of a CTA share almost no block, so at G < 16 each loaded K/V
// byte serves only G rows and the kernel is bound by K/V bytes through L2 (~1/G).
// Here the loop is inverted: one CTA holds one selection block's K/V in shared memory and walks
// the query rows (position x head of the group) that selected it, 64 rows per m16n8k16 tile
// (SELB_PG = 64 / G positions x G heads). Each (position t, head h, rank r of the block in t's
// list) gets a partial output, normalised, and its log-sum-exp; selb_merge combines the n
// partials of a row by their lse (fixed rank order) and adds g_slc * o_slc to the output.
//
// The positions are processed in chunks (token range x KV-head range, chosen by the host so that
// the partial buffer stays bounded); per chunk:
//   selb_count  integer counts per (KV head g, selection block jg numbered across the batch)
//   selb_scan   one CTA: list offsets and segment offsets (lists cut into SELB_SEG positions);
//               the counters become the fill cursors
//   selb_fill   every (t, g, rank) entry into its list (t and rank packed as t_local * 32 + r)
//   selb_attn   one CTA per segment: the block's K/V once, then its positions SELB_PG at a time
//   selb_merge  one warp per (t, h): combine, gate, accumulate; o_slc / lse for the backward
// The order of entries inside a list follows integer atomics and may change from run to run,
// but no result depends on it: each partial is computed from its own row alone (Q row, block,
// causal limit) and written to its own slot, and the merge sums the ranks in ascending order, so
// the output is bitwise repeatable. No floating-point atomics.
//
// Partial outputs (SELB_PART, set through NSA_CUDA_DEFINES; the host sizes the buffer from the
// same define, sel_block.rs part_mode): 0 = f32; 1 = bf16; 2 (the default) = f16 of o / max|o|
// with the row's max |o| kept as an f32 scale: 11 significant bits relative to the row's largest
// element and no f16 overflow whatever the values (measured: errors as with f32 partials, bf16
// partials ~1.5x larger; bench/NOTES-cuda.md v14). The lse stays f32 in every mode.

#ifndef SELB_PART
#define SELB_PART 2
#endif

#define SELB_PG (64 / G)                   // positions per 64-row tile
#define SELB_TILES 16                      // tiles per segment
#define SELB_SEG (SELB_TILES * SELB_PG)    // positions per segment
#define SELB_KT ((SEL_L % 64) == 0 ? 64 : 32)
// Q stages of selb_attn: the gather of group i + SELB_QSTAGES - 1 is in flight while group i
// computes (the host's shared-memory footprint follows, sel_block.rs q_stages). The default, 2,
// is the measured and tested loop; deeper pipelines (-DSELB_QSTAGES=3|4 through NSA_CUDA_DEFINES)
// are an experiment not yet run on the GPU (bench/NOTES-cuda.md v14c).
#ifndef SELB_QSTAGES
#define SELB_QSTAGES 2
#endif

#if SELB_PART == 0
typedef float part_t;
#else
typedef unsigned short part_t;
#endif

__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Four f16 values packed in two words (a 16-bit partial row) as f32, in memory order.
__device__ __forceinline__ float4 f16x4_to_f32(uint2 u) {
    return make_float4(f16_bits_to_f32(u.x & 0xffffu), f16_bits_to_f32(u.x >> 16), f16_bits_to_f32(u.y & 0xffffu),
                       f16_bits_to_f32(u.y >> 16));
}

// The merges' weighted sum of a row's rank partials, four columns at a time: sum over the ranks
// r with wr[r] != 0, in ascending rank order, of wr[r] * load(r) (`load` reads rank r's four
// partial values in their storage format). Shared by selb_merge and selb_dq_merge.
template <class Load>
__device__ __forceinline__ float4 selb_weighted_sum4(const float (&wr)[NSEL], Load load) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int r = 0; r < NSEL; ++r) {
        if (wr[r] != 0.f) {
            const float4 v = load(r);
            acc.x = fmaf(wr[r], v.x, acc.x);
            acc.y = fmaf(wr[r], v.y, acc.y);
            acc.z = fmaf(wr[r], v.z, acc.z);
            acc.w = fmaf(wr[r], v.w, acc.w);
        }
    }
    return acc;
}

// pair index of an entry: (g - ga) * nbc + (jbase[t] + j - jg_lo)

// One thread per (t, g) of the chunk (t fastest); lanes that count the same pair add together
// (one atomic per distinct pair and warp: the forced blocks are shared by consecutive t).
template <bool FILL>
__device__ __forceinline__ void selb_entries(const int* __restrict__ sel_idx, const int* __restrict__ jbase, int ta,
                                             int ct, int ga, int gcnt, int jg_lo, int nbc, int* __restrict__ cnt,
                                             int* __restrict__ list) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const bool in = i < (i64)ct * gcnt;
    const int tl = in ? (int)(i % ct) : 0, gl = in ? (int)(i / ct) : 0;
    const int t = ta + tl, g = ga + gl;
    const int lane = threadIdx.x & 31;
    const int jb = in ? jbase[t] - jg_lo : 0;
    const int* row = sel_idx + ((i64)t * HKV + g) * NSEL;
#pragma unroll 4
    for (int r = 0; r < NSEL; ++r) {
        const int j = in ? row[r] : -1;
        const int key = j >= 0 ? gl * nbc + jb + j : -1 - lane;   // unique negative: no peers
        const unsigned peers = __match_any_sync(0xffffffff, key);
        if (j >= 0) {
            const int leader = __ffs(peers) - 1;
            const int below = __popc(peers & ((1u << lane) - 1u));
            int at = 0;
            if (lane == leader) at = atomicAdd(cnt + key, __popc(peers));
            if (FILL) {
                at = __shfl_sync(peers, at, leader);
                list[at + below] = tl * 32 + r;
            }
        }
        __syncwarp();
    }
}

extern "C" __global__ void selb_count(const int* __restrict__ sel_idx, const int* __restrict__ jbase, int ta, int ct,
                                      int ga, int gcnt, int jg_lo, int nbc, int* __restrict__ cnt) {
    selb_entries<false>(sel_idx, jbase, ta, ct, ga, gcnt, jg_lo, nbc, cnt, nullptr);
}

extern "C" __global__ void selb_fill(const int* __restrict__ sel_idx, const int* __restrict__ jbase, int ta, int ct,
                                     int ga, int gcnt, int jg_lo, int nbc, int* __restrict__ cursor,
                                     int* __restrict__ list) {
    selb_entries<true>(sel_idx, jbase, ta, ct, ga, gcnt, jg_lo, nbc, cursor, list);
}

// One CTA of 1024 threads: base[p] = exclusive prefix of cnt (npairs + 1 entries), seg_base[p]
// = exclusive prefix of ceil(cnt / SELB_SEG) (npairs + 1 entries); cnt[p] <- base[p] (cursor).
extern "C" __global__ void __launch_bounds__(1024) selb_scan(int* __restrict__ cnt, int npairs, int* __restrict__ base,
                                                             int* __restrict__ seg_base) {
    __shared__ int sh[2][1024];
    const int tid = threadIdx.x, per = (npairs + 1023) / 1024;
    const int p0 = min(tid * per, npairs), p1 = min(p0 + per, npairs);
    int a0 = 0, a1 = 0;
    for (int p = p0; p < p1; ++p) {
        const int c = cnt[p];
        a0 += c;
        a1 += (c + SELB_SEG - 1) / SELB_SEG;
    }
    sh[0][tid] = a0;
    sh[1][tid] = a1;
    __syncthreads();
    for (int off = 1; off < 1024; off <<= 1) {
        const int v0 = tid >= off ? sh[0][tid - off] : 0, v1 = tid >= off ? sh[1][tid - off] : 0;
        __syncthreads();
        sh[0][tid] += v0;
        sh[1][tid] += v1;
        __syncthreads();
    }
    int e0 = sh[0][tid] - a0, e1 = sh[1][tid] - a1;
    for (int p = p0; p < p1; ++p) {
        const int c = cnt[p];
        base[p] = e0;
        seg_base[p] = e1;
        cnt[p] = e0;
        e0 += c;
        e1 += (c + SELB_SEG - 1) / SELB_SEG;
    }
    if (tid == 1023) {
        base[npairs] = sh[0][1023];
        seg_base[npairs] = sh[1][1023];
    }
}

// The thread's rows of one tile: scale * O as the partial (see SELB_PART); `pscale[h]` receives
// the row's scale in mode 2 (all lanes of the warp take part: quad shuffles).
__device__ __forceinline__ void selb_store_part(part_t* const (&dst)[2], const float (&scale)[2],
                                                const float (&o)[1][DV / 8][4], float (&pscale)[2]) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
    float mul[2] = {scale[0], scale[1]};
#if SELB_PART == 2
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float a = 0.f;
#pragma unroll
        for (int nt = 0; nt < DV / 8; ++nt) a = fmaxf(a, fmaxf(fabsf(o[0][nt][2 * h]), fabsf(o[0][nt][2 * h + 1])));
        a = fmaxf(a, __shfl_xor_sync(0xffffffff, a, 1));
        a = fmaxf(a, __shfl_xor_sync(0xffffffff, a, 2));
        pscale[h] = a * scale[h];           // max |o_normalised|
        mul[h] = a > 0.f ? 1.f / a : 0.f;   // o / max|o|: in [-1, 1]
    }
#else
    pscale[0] = pscale[1] = 1.f;
#endif
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (dst[h] == nullptr) continue;
#pragma unroll
        for (int nt = 0; nt < DV / 8; ++nt) {
            const float x = o[0][nt][2 * h] * mul[h], y = o[0][nt][2 * h + 1] * mul[h];
#if SELB_PART == 0
            *(float2*)(dst[h] + nt * 8 + gc) = make_float2(x, y);
#elif SELB_PART == 1
            u32 w;
            asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(y), "f"(x));
            *(u32*)(dst[h] + nt * 8 + gc) = w;
#else
            *(u32*)(dst[h] + nt * 8 + gc) = pack_f16x2(x, y);
#endif
        }
    }
}

// The list segment of CTA blockIdx.x (selb_attn and the backward's selb_bwd_dq): pair p of the
// chunk's inverse index (KV head ga + p / nbc, selection block jg_lo + p % nbc, found by binary
// search over the segment bases), its entries e0 .. e0 + ne of `list` and the block's first token
// and key count. False when the CTA has no segment.
struct SelbSeg {
    int g, first, nk, e0, ne;
};
__device__ __forceinline__ bool selb_segment(const int2* __restrict__ blk, const int* __restrict__ base,
                                             const int* __restrict__ seg_base, int npairs, int nbc, int jg_lo,
                                             int ga, SelbSeg& sg) {
    const int s = blockIdx.x;
    if (s >= seg_base[npairs]) return false;
    int lo = 0, hi = npairs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (seg_base[mid] <= s) lo = mid; else hi = mid - 1;
    }
    const int p = lo;
    sg.g = ga + p / nbc;
    const int jg = jg_lo + p % nbc;
    sg.e0 = base[p] + (s - seg_base[p]) * SELB_SEG;
    sg.ne = min(SELB_SEG, base[p + 1] - sg.e0);
    const int2 b = blk[jg];
    sg.first = b.x;
    sg.nk = b.y;
    return true;
}

// The segment's block K/V into shared memory (cp.async, left uncommitted: the caller's first
// gather commits them) and its list entries into `ent` (visible after the caller's barrier).
__device__ __forceinline__ void selb_load_segment(bf16_t* Ks, bf16_t* Vs, const bf16_t* __restrict__ ks,
                                                  const bf16_t* __restrict__ vs, const int* __restrict__ list,
                                                  int* ent, const SelbSeg& sg) {
    load_rows_async<SEL_L, DK, KS_STRIDE, 128>(Ks, ks + ((i64)sg.first * HKV + sg.g) * DK, sg.nk,
                                               [&](int r) { return (i64)r * HKV * DK; });
    load_rows_async<SEL_L, DV, VS_STRIDE, 128>(Vs, vs + ((i64)sg.first * HKV + sg.g) * DV, sg.nk,
                                               [&](int r) { return (i64)r * HKV * DV; });
    for (int e = threadIdx.x; e < sg.ne; e += 128) ent[e] = list[sg.e0 + e];
}

// blk[jg] = (first key token of the block, keys in it). Grid: an upper bound on the segments of
// the chunk; CTAs past seg_base[npairs] return at once.
extern "C" __global__ void __launch_bounds__(128) selb_attn(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ ks, const bf16_t* __restrict__ vs,
    const int2* __restrict__ blk, const int* __restrict__ base, const int* __restrict__ seg_base,
    const int* __restrict__ list, int npairs, int nbc, int jg_lo, int ga, int ta, int ct, part_t* __restrict__ part_o,
    float* __restrict__ part_lse, float* __restrict__ part_scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Ks = (bf16_t*)smem;                 // [SEL_L][KS_STRIDE]
    bf16_t* Vs = Ks + SEL_L * KS_STRIDE;        // [SEL_L][VS_STRIDE]
    bf16_t* Qs = Vs + SEL_L * VS_STRIDE;        // [SELB_QSTAGES][64][QS_STRIDE]
    int* ent = (int*)(Qs + SELB_QSTAGES * 64 * QS_STRIDE);   // [SELB_SEG]

    SelbSeg sg;
    if (!selb_segment(blk, base, seg_base, npairs, nbc, jg_lo, ga, sg)) return;
    const int g = sg.g, gl = g - ga, first = sg.first, nk = sg.nk, ne = sg.ne;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2;
    const int row0 = warp * 16;
    selb_load_segment(Ks, Vs, ks, vs, list, ent, sg);
    __syncthreads();

    const int ngroups = (ne + SELB_PG - 1) / SELB_PG;
#if SELB_QSTAGES <= 2
    auto gather = [&](int gi) {
        const int np = min(SELB_PG, ne - gi * SELB_PG);
        const int* eg = ent + gi * SELB_PG;
        load_rows_async<64, DK, QS_STRIDE, 128>(Qs + (gi & 1) * 64 * QS_STRIDE, q, np * G, [&](int r) {
            return ((i64)(ta + (eg[r / G] >> 5)) * HQ + g * G + r % G) * DK;
        });
        cp_async_commit();
    };
    gather(0);   // one group with the K/V loads

    for (int gi = 0; gi < ngroups; ++gi) {
        if (gi + 1 < ngroups) {
            gather(gi + 1);
            cp_async_wait_one();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
#define SELB_QSLOT(i) ((i) & 1)
#else
    auto gather = [&](int gi) {   // one commit group per call (empty past the last group)
        if (gi < ngroups) {
            const int np = min(SELB_PG, ne - gi * SELB_PG);
            const int* eg = ent + gi * SELB_PG;
            load_rows_async<64, DK, QS_STRIDE, 128>(Qs + (gi % SELB_QSTAGES) * 64 * QS_STRIDE, q, np * G,
                                                     [&](int r) {
                                                         return ((i64)(ta + (eg[r / G] >> 5)) * HQ + g * G + r % G) * DK;
                                                     });
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < SELB_QSTAGES - 1; ++i) gather(i);   // the first group carries the K/V loads

    for (int gi = 0; gi < ngroups; ++gi) {
        gather(gi + SELB_QSTAGES - 1);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(SELB_QSTAGES - 1));   // group gi has landed
        __syncthreads();
#define SELB_QSLOT(i) ((i) % SELB_QSTAGES)
#endif
        const int nrows = min(SELB_PG, ne - gi * SELB_PG) * G;
        if (row0 < nrows) {
            bool valid[2];
            int lim[2];
            i64 slot[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row0 + gr + 8 * h;
                valid[h] = r < nrows;
                const int packed = valid[h] ? ent[gi * SELB_PG + r / G] : 0;
                const int tl = packed >> 5;
                lim[h] = valid[h] ? ta + tl - first : -1;   // keys 0..lim of the block are visible
                slot[h] = ((i64)(gl * ct + tl) * G + r % G) * NSEL + (packed & 31);
            }
            RowStats<1> st;
            rowstats_init(st);
            float o[1][DV / 8][4];
            zero_acc(o);
            const bf16_t* Qg = Qs + SELB_QSLOT(gi) * 64 * QS_STRIDE;
#pragma unroll 1
            for (int kt0 = 0; kt0 < SEL_L; kt0 += SELB_KT) {
                int lo2[2] = {0, 0}, hi2[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) hi2[h] = min(max(lim[h] + 1 - kt0, 0), min(SELB_KT, nk - kt0));
                if (__any_sync(0xffffffff, hi2[0] > 0 || hi2[1] > 0))
                    attn_tile<1, SELB_KT>(Qg, Ks + kt0 * KS_STRIDE, Vs + kt0 * VS_STRIDE, row0, lo2, hi2, st, o);
            }
            float inv[2];
            rowstats_finish(st, inv);
            part_t* dst[2];
            float psc[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) dst[h] = valid[h] ? part_o + slot[h] * DV : nullptr;
            selb_store_part(dst, inv, o, psc);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (valid[h] && (lane & 3) == 0) {
                    part_lse[slot[h]] = st.l[h] > 0.f ? st.m[h] + log2f(st.l[h]) : NEG_INF;
#if SELB_PART == 2
                    part_scale[slot[h]] = psc[h];
#endif
                }
            }
        }
        __syncthreads();   // the stage is refilled by the next gather
    }
#if SELB_QSTAGES > 2
    cp_async_wait_all();   // (only empty groups can remain)
#endif
}

// One warp per row (t, h) of the chunk, rows numbered ((g - ga) * ct + t - ta) * G + h % G
// (the slot order / NSEL). Combines the valid ranks' partials in ascending rank order.
extern "C" __global__ void __launch_bounds__(256) selb_merge(
    const int* __restrict__ sel_idx, const float* __restrict__ gate, const part_t* __restrict__ part_o,
    const float* __restrict__ part_lse, const float* __restrict__ part_scale, int ta, int ct, int ga, int nrows,
    float* __restrict__ out,
    float* __restrict__ lse_save, bf16_t* __restrict__ o_save) {
    const int row = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= nrows) return;   // whole warps
    const int hh = row % G, rest = row / G, tl = rest % ct, gl = rest / ct;
    const int t = ta + tl, g = ga + gl;
    const i64 slot0 = (i64)row * NSEL;
    const int j = lane < NSEL ? sel_idx[((i64)t * HKV + g) * NSEL + lane] : -1;
    const float lse = j >= 0 ? part_lse[slot0 + lane] : NEG_INF;
    float m = lse;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
    const float w = (m == NEG_INF || lse == NEG_INF) ? 0.f : exp2f(lse - m);
    float l = w;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffff, l, off);
#if SELB_PART == 2
    const float wsc = w != 0.f ? w * part_scale[slot0 + lane] : 0.f;   // weight x the slot's scale
#else
    const float wsc = w;
#endif
    float wr[NSEL];
#pragma unroll
    for (int r = 0; r < NSEL; ++r) wr[r] = __shfl_sync(0xffffffff, wsc, r);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const i64 qrow = (i64)t * HQ + g * G + hh;
    const float gt = gate[qrow] * inv;
    for (int c4 = lane; c4 < DV / 4; c4 += 32) {
        const float4 acc = selb_weighted_sum4(wr, [&](int r) {
#if SELB_PART == 0
            return *(const float4*)(part_o + (slot0 + r) * DV + 4 * c4);
#elif SELB_PART == 1
            const uint2 u = *(const uint2*)(part_o + (slot0 + r) * DV + 4 * c4);
            return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                               __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
#else
            return f16x4_to_f32(*(const uint2*)(part_o + (slot0 + r) * DV + 4 * c4));
#endif
        });
        float4* po = (float4*)(out + qrow * DV) + c4;
        float4 ov = *po;
        ov.x = fmaf(gt, acc.x, ov.x);
        ov.y = fmaf(gt, acc.y, ov.y);
        ov.z = fmaf(gt, acc.z, ov.z);
        ov.w = fmaf(gt, acc.w, ov.w);
        *po = ov;
        if (o_save != nullptr) {
            uint2 u;
            u.x = pack_bf16x2(acc.x * inv, acc.y * inv);
            u.y = pack_bf16x2(acc.z * inv, acc.w * inv);
            *(uint2*)(o_save + qrow * DV + 4 * c4) = u;
        }
    }
    if (lse_save != nullptr && lane == 0) lse_save[qrow] = l > 0.f ? m + log2f(l) : POS_INF;
}
