// Backward prelude (appended after common.cu, before each *_bwd.cu family).
//
// FlashAttention-2 style backward of one attention branch, in the notation of SPEC.md:
//   s = scale * q.k,  p = exp(s - lse),  o_b = sum p v,  o = ... + g_b * o_b + ...
// With do the upstream gradient of o and dO_b = g_b * do the gradient reaching o_b:
//   dg_b  = do . o_b                                   (the gate gradient, per row)
//   dP    = dO_b V^T = g_b * (do V^T)
//   Delta = rowsum(dO_b * o_b) = g_b * dg_b
//   dS    = P * (dP - Delta) = g_b * P * (do V^T - dg_b)
//   dQ    = scale * dS K,   dK = scale * dS^T Q,   dV = (g_b P)^T do
// so one bf16 copy of do serves all three branches, and the gate gradient doubles as Delta.
// Scores stay in the log2 domain as in the forward (lse2 = lse * log2 e, exp2).
//
// Uses only the basic helpers of common.cu (bf16, mma_bf16, ldmatrix_x4_trans, cp.async,
// load_rows_async, KT and the padded strides); every helper here is prefixed `bw_`.

#define SCALE_NAT (SCALE_LOG2 * 0.693147180559945309f)
#define DOS_STRIDE (DV + 8)
// query rows per step of the key-major (dK/dV) kernels
#define BW_RT 32

// A fragment (16 x 16) of a row-major bf16 smem matrix: rows r0 .. r0+15, columns kk .. kk+15.
__device__ __forceinline__ void bw_frag_a(u32 (&a)[4], const bf16_t* m, int stride, int r0, int kk) {
    const int lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    const bf16_t* p = m + (r0 + gr) * stride + kk + gc;
    a[0] = *(const u32*)(p);
    a[1] = *(const u32*)(p + 8 * stride);
    a[2] = *(const u32*)(p + 8);
    a[3] = *(const u32*)(p + 8 * stride + 8);
}

// C[16 x 8*NT] = A[ra0 .. ra0+15][0..D) * B[rb0 .. rb0+8*NT)[0..D)^T, both row-major in smem.
template <int D, int NT>
__device__ __forceinline__ void bw_mm_nt(float (&c)[NT][4], const bf16_t* A, int sa, int ra0,
                                         const bf16_t* B, int sb, int rb0) {
    const int lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
        u32 a[4];
        bw_frag_a(a, A, sa, ra0, kk);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const bf16_t* p = B + (rb0 + nt * 8 + gr) * sb + kk + gc;
            mma_bf16(c[nt], a, *(const u32*)(p), *(const u32*)(p + 8));
        }
    }
}

// C[16 x D] += P[16 x KN] * M[0..KN)[0..D): P in registers (accumulator layout, rounded to bf16
// here), M row-major in smem (row index = the product's k), read transposed by ldmatrix.
template <int D, int KN>
__device__ __forceinline__ void bw_mm_pm(float (&c)[D / 8][4], const float (&p)[KN / 8][4],
                                         const bf16_t* M, int sm) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kc = 0; kc < KN / 16; ++kc) {
        u32 a[4];
        a[0] = pack_bf16x2(p[2 * kc][0], p[2 * kc][1]);
        a[1] = pack_bf16x2(p[2 * kc][2], p[2 * kc][3]);
        a[2] = pack_bf16x2(p[2 * kc + 1][0], p[2 * kc + 1][1]);
        a[3] = pack_bf16x2(p[2 * kc + 1][2], p[2 * kc + 1][3]);
        const int mrow = kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int mcol = (lane >> 4) * 8;
#pragma unroll
        for (int n2 = 0; n2 < D / 16; ++n2) {
            u32 b0, b1, b2, b3;
            ldmatrix_x4_trans(b0, b1, b2, b3, M + mrow * sm + n2 * 16 + mcol);
            mma_bf16(c[2 * n2], a, b0, b1);
            mma_bf16(c[2 * n2 + 1], a, b2, b3);
        }
    }
}

template <int D>
__device__ __forceinline__ void bw_zero(float (&c)[D / 8][4]) {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
}

// ---- row-major side (one warp = 16 query rows): statistics pass and dQ pass ----

// Forward recompute of one key tile (online softmax), rows masked to keys [lo, hi) of the tile.
__device__ __forceinline__ void bw_fwd_tile(const bf16_t* Qs, const bf16_t* Ks, const bf16_t* Vs,
                                            int row0, const int (&lo)[2], const int (&hi)[2],
                                            float (&m)[2], float (&l)[2], float (&o)[DV / 8][4]) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
    float s[KT / 8][4];
    bw_mm_nt<DK, KT / 8>(s, Qs, QS_STRIDE, row0, Ks, KS_STRIDE, 0);
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = e >> 1, key = nt * 8 + gc + (e & 1);
            const float v = (key >= lo[i] && key < hi[i]) ? s[nt][e] * SCALE_LOG2 : NEG_INF;
            s[nt][e] = v;
            mx[i] = fmaxf(mx[i], v);
        }
    float alpha[2], mu[2], rs[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
        const float mn = fmaxf(m[i], mx[i]);
        mu[i] = (mn == NEG_INF) ? 0.f : mn;
        alpha[i] = exp2f(m[i] - mu[i]);
        m[i] = mn;
        rs[i] = 0.f;
    }
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float p = exp2f(s[nt][e] - mu[e >> 1]);
            s[nt][e] = p;
            rs[e >> 1] += p;
        }
#pragma unroll
    for (int i = 0; i < 2; ++i) l[i] = l[i] * alpha[i] + rs[i];
    scale_acc_rows<DV>(o, alpha[0], alpha[1]);
    bw_mm_pm<DV, KT>(o, s, Vs, VS_STRIDE);
}

// End of the statistics pass: lse2 (log2 domain, +inf for a row that saw no key) and
// dg = do . o_b (0 for such a row), reduced over the 4 lanes of a row.
__device__ __forceinline__ void bw_stats_finish(const bf16_t* dOs, int row0, float (&m)[2], float (&l)[2],
                                                const float (&o)[DV / 8][4], float (&lse)[2], float (&dg)[2]) {
    const int lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
        lse[i] = l[i] > 0.f ? m[i] + log2f(l[i]) : POS_INF;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        const bf16_t* d = dOs + (row0 + gr + 8 * i) * DOS_STRIDE + gc;
        float acc = 0.f;
#pragma unroll
        for (int nt = 0; nt < DV / 8; ++nt) {
            const u32 w = *(const u32*)(d + nt * 8);
            acc += o[nt][2 * i] * bf16x2_lo(w) + o[nt][2 * i + 1] * bf16x2_hi(w);
        }
        acc += __shfl_xor_sync(0xffffffff, acc, 1);
        acc += __shfl_xor_sync(0xffffffff, acc, 2);
        dg[i] = acc * inv;
    }
}

// dQ of one key tile: dq += dS K with dS = g * P * (do V^T - dg) (scale applied at the end).
__device__ __forceinline__ void bw_dq_tile(const bf16_t* Qs, const bf16_t* dOs, const bf16_t* Ks,
                                           const bf16_t* Vs, int row0, const int (&lo)[2], const int (&hi)[2],
                                           const float (&lse)[2], const float (&dg)[2], const float (&gt)[2],
                                           float (&dq)[DK / 8][4]) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
    float s[KT / 8][4], dp[KT / 8][4];
    bw_mm_nt<DK, KT / 8>(s, Qs, QS_STRIDE, row0, Ks, KS_STRIDE, 0);
    bw_mm_nt<DV, KT / 8>(dp, dOs, DOS_STRIDE, row0, Vs, VS_STRIDE, 0);
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = e >> 1, key = nt * 8 + gc + (e & 1);
            const float p = (key >= lo[i] && key < hi[i]) ? exp2f(s[nt][e] * SCALE_LOG2 - lse[i]) : 0.f;
            s[nt][e] = gt[i] * p * (dp[nt][e] - dg[i]);
        }
    bw_mm_pm<DK, KT>(dq, s, Ks, KS_STRIDE);
}

// K/V tile buffers of the 4-warp row-major kernels (compressed, window): 2 (the next tile loads
// while this one is used) when two CTAs still fit an SM (dk + dv <= 256), else 1. The selection
// dQ kernel follows the same rule (BS_STAGES, sel_bwd.cu) since it has 4 warps too; its old
// one-warp layout (-DSEL_DQ_ONE_WARP) keeps 1: a second buffer cut its CTAs per SM from 5 to 2.
#define BW_QSTAGES ((DK + DV) <= 256 ? 2 : 1)

__device__ __forceinline__ void bw_cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }

// One key tile of a row-major walk: `nk` keys from global row `row` (KV rows, stride HKV * D),
// `k0` its first key (branch-specific meaning), `chose` a branch-specific bit set.
struct BwTile {
    i64 row;
    int k0, nk;
    unsigned chose;
};

// Walks the tiles that next(tile) produces (false: no more), loading each into Kbuf/Vbuf (one of
// STAGES buffers) and calling fn(lo, hi, Ks, Vs) with the thread's row masks from
// mask(tile, lo, hi). Every thread of the CTA calls it (it has barriers).
template <int NTHREADS, int STAGES, class Next, class Mask, class Fn>
__device__ __forceinline__ void bw_pipeline(bf16_t* Kbuf, bf16_t* Vbuf, const bf16_t* __restrict__ k,
                                            const bf16_t* __restrict__ v, int g, Next next, Mask mask, Fn fn) {
    auto load = [&](const BwTile& t, int b) {
        load_rows_async<KT, DK, KS_STRIDE, NTHREADS>(Kbuf + b * KT * KS_STRIDE, k + (t.row * HKV + g) * DK, t.nk,
                                                     [&](int r) { return (i64)r * HKV * DK; });
        load_rows_async<KT, DV, VS_STRIDE, NTHREADS>(Vbuf + b * KT * VS_STRIDE, v + (t.row * HKV + g) * DV, t.nk,
                                                     [&](int r) { return (i64)r * HKV * DV; });
        cp_async_commit();
    };
    BwTile cur, nxt;
    bool have = next(cur);
    __syncthreads();   // earlier users of the buffers are done
    if (STAGES == 2) {
        if (have) load(cur, 0);
        int b = 0;
        while (have) {
            const bool more = next(nxt);
            if (more) {
                load(nxt, b ^ 1);
                bw_cp_async_wait_1();
            } else {
                cp_async_wait_all();
            }
            __syncthreads();
            int lo[2], hi[2];
            mask(cur, lo, hi);
            fn(lo, hi, Kbuf + b * KT * KS_STRIDE, Vbuf + b * KT * VS_STRIDE);
            __syncthreads();
            cur = nxt;
            have = more;
            b ^= 1;
        }
    } else {
        while (have) {
            load(cur, 0);
            cp_async_wait_all();
            __syncthreads();
            int lo[2], hi[2];
            mask(cur, lo, hi);
            fn(lo, hi, Kbuf, Vbuf);
            __syncthreads();
            have = next(cur);
        }
    }
}

// The passes of a row-major CTA: `for_tiles(fn)` walks the key tiles of the rows' union
// (bw_pipeline) and calls fn(lo, hi, Ks, Vs) with the thread's two rows' key masks.
// SAVED = false: a statistics pass recomputes o_b and the lse, and writes lse (scratch) and dg
// (the gate gradient) of every valid row; SAVED = true: both come from `lse_io` / `dg_io` (the
// forward's saved lse and bwd_gate_dot). Then the dQ pass writes dq (= or +=).
template <bool ACC, bool SAVED, class ForTiles>
__device__ __forceinline__ void bw_rows_dq(const bf16_t* Qs, const bf16_t* dOs, int row0, const i64 (&qrow)[2],
                                           const bool (&valid)[2], const float* __restrict__ gate,
                                           float* __restrict__ lse_io, float* __restrict__ dg_io,
                                           float* __restrict__ dq_out, ForTiles for_tiles) {
    const int lane = threadIdx.x & 31, gc = (lane & 3) * 2;
    float lse[2], dg[2], gt[2];
    if (SAVED) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            lse[i] = valid[i] ? lse_io[qrow[i]] : POS_INF;
            dg[i] = valid[i] ? dg_io[qrow[i]] : 0.f;
        }
    } else {
        float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
        float o[DV / 8][4];
        bw_zero<DV>(o);
        for_tiles([&](const int (&lo)[2], const int (&hi)[2], const bf16_t* Ks, const bf16_t* Vs) {
            bw_fwd_tile(Qs, Ks, Vs, row0, lo, hi, m, l, o);
        });
        cp_async_wait_all();
        __syncthreads();
        bw_stats_finish(dOs, row0, m, l, o, lse, dg);
#pragma unroll
        for (int i = 0; i < 2; ++i)
            if (valid[i] && (lane & 3) == 0) {
                lse_io[qrow[i]] = lse[i];
                dg_io[qrow[i]] = dg[i];
            }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) gt[i] = valid[i] ? gate[qrow[i]] : 0.f;
    float dq[DK / 8][4];
    bw_zero<DK>(dq);
    for_tiles([&](const int (&lo)[2], const int (&hi)[2], const bf16_t* Ks, const bf16_t* Vs) {
        bw_dq_tile(Qs, dOs, Ks, Vs, row0, lo, hi, lse, dg, gt, dq);
    });
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

// ---- key-major side (one warp = 16 keys of a 64-key tile): dK, dV ----

// One step of BW_RT query rows against the warp's 16 keys. Row metadata in smem: lse2, dg, gate
// and the seq-local position (-1: no row). ok(key, t): key (0..63 in the tile) is seen by a row at t.
template <class Ok>
__device__ __forceinline__ void bw_dkdv_tile(const bf16_t* Ks, const bf16_t* Vs, const bf16_t* Qs,
                                             const bf16_t* dOs, const float* rlse, const float* rdg,
                                             const float* rgate, const int* rt, Ok ok,
                                             float (&dk)[DK / 8][4], float (&dv)[DV / 8][4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    const int key0 = warp * 16;
    float st[BW_RT / 8][4], dpt[BW_RT / 8][4];
    bw_mm_nt<DK, BW_RT / 8>(st, Ks, KS_STRIDE, key0, Qs, QS_STRIDE, 0);
    bw_mm_nt<DV, BW_RT / 8>(dpt, Vs, VS_STRIDE, key0, dOs, DOS_STRIDE, 0);
#pragma unroll
    for (int nt = 0; nt < BW_RT / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = key0 + gr + 8 * (e >> 1), row = nt * 8 + gc + (e & 1);
            const int t = rt[row];
            const float p = (t >= 0 && ok(key, t)) ? exp2f(st[nt][e] * SCALE_LOG2 - rlse[row]) : 0.f;
            const float pg = rgate[row] * p;
            st[nt][e] = pg;
            dpt[nt][e] = pg * (dpt[nt][e] - rdg[row]);
        }
    bw_mm_pm<DV, BW_RT>(dv, st, dOs, DOS_STRIDE);
    bw_mm_pm<DK, BW_RT>(dk, dpt, Qs, QS_STRIDE);
}

// Shared memory of a key-major CTA (bytes): K, V tiles, two buffers of BW_RT rows of q and do
// and their row metadata (double buffering: the next rows load while these are used).
#define BW_ROWBUF ((BW_RT * QS_STRIDE + BW_RT * DOS_STRIDE) * 2 + BW_RT * 16)
#define BW_KV_SMEM ((KT * KS_STRIDE + KT * VS_STRIDE) * 2 + 2 * BW_ROWBUF)

// The metadata of a key-major row step, read where the step uses it: for its RT rows (row r:
// virtual row rho0 + r, [N, HQ] row qrow(r)) the lse, dg = do . o and gate, then the position
// (as int); rows past nrows get zeros and position -1. Threads tid < RT write one row each.
// ASYNC: lse, dg and gate by 4-byte cp.async (the caller commits them with its row loads), so the
// staging threads do not wait on them; else plain loads.
template <int RT, bool ASYNC = false, class QRow, class TokOf, class TOf>
__device__ __forceinline__ void bw_stage_meta(float* m, int rho0, int nrows, QRow qrow, TokOf tok_of, TOf t_of,
                                              const float* __restrict__ lse, const float* __restrict__ dg,
                                              const float* __restrict__ gate) {
    const int tid = threadIdx.x;
    if (tid < RT) {
        if (tid < nrows) {
            const i64 qr = qrow(tid);
            if constexpr (ASYNC) {
                cp_async4(m + tid, lse + qr);
                cp_async4(m + RT + tid, dg + qr);
                cp_async4(m + 2 * RT + tid, gate + qr);
            } else {
                m[tid] = lse[qr];
                m[RT + tid] = dg[qr];
                m[2 * RT + tid] = gate[qr];
            }
            ((int*)m)[3 * RT + tid] = t_of(tok_of((rho0 + tid) / G));
        } else {
            m[tid] = 0.f;
            m[RT + tid] = 0.f;
            m[2 * RT + tid] = 0.f;
            ((int*)m)[3 * RT + tid] = -1;
        }
    }
}

// Runs the key-major loop over `nrows_total` virtual rows (row rho = position rho / G, head
// g*G + rho % G) for the K/V tile whose loads were committed (bw_load_kv) before. tok_of(p):
// packed token index of position p; t_of(tok): its seq-local position. Accumulates into dk, dv
// (dk unscaled). Row steps are double-buffered: step i + 1's q/do rows (cp.async) and metadata
// load while step i computes.
template <class TokOf, class TOf, class Ok>
__device__ __forceinline__ void bw_dkdv_rows(unsigned char* smem, const bf16_t* __restrict__ q,
                                             const bf16_t* __restrict__ dO, const float* __restrict__ lse,
                                             const float* __restrict__ dg, const float* __restrict__ gate, int g,
                                             int nrows_total, TokOf tok_of, TOf t_of, Ok ok,
                                             float (&dk)[DK / 8][4], float (&dv)[DV / 8][4]) {
    const bf16_t* Ks = (const bf16_t*)smem;
    const bf16_t* Vs = Ks + KT * KS_STRIDE;
    unsigned char* rowbuf = smem + (KT * KS_STRIDE + KT * VS_STRIDE) * 2;
    const int tid = threadIdx.x;
    auto Qb = [&](int b) { return (bf16_t*)(rowbuf + b * BW_ROWBUF); };
    auto dOb = [&](int b) { return Qb(b) + BW_RT * QS_STRIDE; };
    auto meta = [&](int b) { return (float*)(dOb(b) + BW_RT * DOS_STRIDE); };   // lse, dg, gate, t
    // issues the loads of the rows [rho0, rho0 + BW_RT) into buffer b (one commit group)
    auto stage = [&](int rho0, int b) {
        const int nrows = min(BW_RT, nrows_total - rho0);
        auto qrow = [&](int r) {
            const int rho = rho0 + r;
            return (i64)tok_of(rho / G) * HQ + g * G + rho % G;
        };
        load_rows_async<BW_RT, DK, QS_STRIDE, 128>(Qb(b), q, nrows, [&](int r) { return qrow(r) * DK; });
        load_rows_async<BW_RT, DV, DOS_STRIDE, 128>(dOb(b), dO, nrows, [&](int r) { return qrow(r) * DV; });
        cp_async_commit();
        bw_stage_meta<BW_RT>(meta(b), rho0, nrows, qrow, tok_of, t_of, lse, dg, gate);
    };
    if (nrows_total > 0) stage(0, 0);
    for (int i = 0, rho0 = 0; rho0 < nrows_total; ++i, rho0 += BW_RT) {
        const int b = i & 1;
        if (rho0 + BW_RT < nrows_total) {
            stage(rho0 + BW_RT, b ^ 1);
            bw_cp_async_wait_1();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();   // step i's rows and metadata are visible
        const float* m = meta(b);
        bw_dkdv_tile(Ks, Vs, Qb(b), dOb(b), m, m + BW_RT, m + 2 * BW_RT, (const int*)(m + 3 * BW_RT), ok, dk, dv);
        __syncthreads();   // buffer b is free for step i + 2
    }
}

// Writes the warp's 16 keys of dK (times `kscale`) and dV: key k (0..63) goes to row dst_k(k)
// / dst_v(k) (f32 pointers), keys >= nk are skipped.
template <class DstK, class DstV>
__device__ __forceinline__ void bw_store_kv(const float (&dk)[DK / 8][4], const float (&dv)[DV / 8][4], int nk,
                                            float kscale, DstK dst_k, DstV dst_v) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int key = warp * 16 + gr + 8 * h;
        if (key >= nk) continue;
        float* pk = dst_k(key);
        float* pv = dst_v(key);
#pragma unroll
        for (int nt = 0; nt < DK / 8; ++nt)
            *(float2*)(pk + nt * 8 + gc) = make_float2(dk[nt][2 * h] * kscale, dk[nt][2 * h + 1] * kscale);
#pragma unroll
        for (int nt = 0; nt < DV / 8; ++nt)
            *(float2*)(pv + nt * 8 + gc) = make_float2(dv[nt][2 * h], dv[nt][2 * h + 1]);
    }
}

// Loads `nk` keys / values (row stride HKV * D in global) of KV head g into Ks / Vs.
__device__ __forceinline__ void bw_load_kv(unsigned char* smem, const bf16_t* __restrict__ k,
                                           const bf16_t* __restrict__ v, i64 first_row, int g, int nk) {
    bf16_t* Ks = (bf16_t*)smem;
    bf16_t* Vs = Ks + KT * KS_STRIDE;
    load_rows_async<KT, DK, KS_STRIDE, 128>(Ks, k + (first_row * HKV + g) * DK, nk,
                                            [&](int r) { return (i64)r * HKV * DK; });
    load_rows_async<KT, DV, VS_STRIDE, 128>(Vs, v + (first_row * HKV + g) * DV, nk,
                                            [&](int r) { return (i64)r * HKV * DV; });
    cp_async_commit();
}

// ---- selection dQ partials (block-outer paths: sel_block_bwd.cu's selb_bwd_dq and sel_bwd.cu's
// fused sel_bwd_dkdv_dq write them, sel_block_bwd.cu's selb_dq_merge adds them up) ----
// One partial per slot (t, h, rank r of the block in t's list): dQ_r = dS K of that block alone,
// unscaled. Format (SELB_DQ_PART, through NSA_CUDA_DEFINES; the host sizes the buffer from the
// same define, sel_block.rs dq_part_mode): 0 = f32 rows of DK; 2 (the default) = f16 of
// dQ_r / max|dQ_r| with the row's max |dQ_r| as an f32 scale per slot (the forward's SELB_PART = 2
// format): half the partial bytes, sel_dq 5-6 ms less than f32 at 64k (NOTES-cuda-bwd.md v14).
#ifndef SELB_DQ_PART
#define SELB_DQ_PART 2
#endif

#if SELB_DQ_PART == 0
typedef float dqpart_t;
#else
typedef unsigned short dqpart_t;
#endif

// Writes the thread's two rows of dQ_r (the accumulator layout of mma.sync and wgmma alike: rows
// gr and gr + 8 of the warp's 16 in dq[.][0..1] and dq[.][2..3], columns 8 nt + gc, + 1) to their
// slots; rows with valid[h] false are skipped. The f16 format's row max runs over the quad
// (lane = threadIdx.x % 32, gc = (lane % 4) * 2).
__device__ __forceinline__ void bw_store_dq_partial(const float (&dq)[DK / 8][4], const bool (&valid)[2],
                                                    const i64 (&slot)[2], dqpart_t* part_dq,
                                                    float* part_scale, int lane, int gc) {
    float mul[2] = {1.f, 1.f};
#if SELB_DQ_PART == 2
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float a = 0.f;
#pragma unroll
        for (int nt = 0; nt < DK / 8; ++nt) a = fmaxf(a, fmaxf(fabsf(dq[nt][2 * h]), fabsf(dq[nt][2 * h + 1])));
        a = fmaxf(a, __shfl_xor_sync(0xffffffff, a, 1));
        a = fmaxf(a, __shfl_xor_sync(0xffffffff, a, 2));
        mul[h] = a > 0.f ? 1.f / a : 0.f;   // dQ_r / max|dQ_r|: in [-1, 1]
        if (valid[h] && (lane & 3) == 0) part_scale[slot[h]] = a;
    }
#endif
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (!valid[h]) continue;
        dqpart_t* dst = part_dq + slot[h] * DK;
#pragma unroll
        for (int nt = 0; nt < DK / 8; ++nt) {
            const float x = dq[nt][2 * h] * mul[h], y = dq[nt][2 * h + 1] * mul[h];
#if SELB_DQ_PART == 0
            *(float2*)(dst + nt * 8 + gc) = make_float2(x, y);
#else
            *(u32*)(dst + nt * 8 + gc) = pack_f16x2(x, y);
#endif
        }
    }
}
