// Selection branch dQ, block-outer, for small groups (G < 16) with the forward's saved statistics
// (appended after common.cu, bwd_common.cu and sel_block.cu: it reuses the forward's chunked
// inverse index selb_count / selb_scan / selb_fill and its segment numbering).
//
// sel_bwd_dq (sel_bwd.cu) is position-major: a CTA of 16 / G positions streams the union of their
// selected blocks, so at G < 16 every K/V byte loaded serves ~G rows and the kernel's bytes grow
// as 1/G. Here, as in the forward's selb_attn, one CTA holds one selection block's K and V in
// shared memory and walks the query rows (position x head of the group) that chose it, 64 rows
// (SELB_PG positions x G heads) per step, Q and dO gathered by cp.async (two stages), with each
// row's lse (the selected branch's, saved by the forward, log2 units), dg = do . o_slc (written by
// bwd_gate_dot: Delta / g_slc) and gate g_slc. In the notation of bwd_common.cu, per row and key
// of the block (causal inside the own block):
//   P = exp2(S * SCALE_LOG2 - lse),  dS = g * P * (do V^T - dg),  dQ_r = dS K   (unscaled)
// written to the partial slot of (t, h, rank r of the block in t's list). selb_dq_merge then
// adds SCALE_NAT * sum_r dQ_r, ranks in ascending order, to dq (`+=`: the same contract as
// sel_bwd_dq, which adds after the compressed `=` and the window `+=`). Every partial depends only
// on its own row and goes to its own slot, the merge order is fixed: bitwise repeatable, no
// floating-point atomics.
//
// Partial format: SELB_DQ_PART and bw_store_dq_partial in bwd_common.cu (shared with sel_bwd.cu's
// fused sel_bwd_dkdv_dq, whose partials selb_dq_merge adds up as well).

// bytes of one Q / dO / row-metadata stage (the metadata: lse, dg, gate of 64 rows)
#define SELB_DQ_STAGE ((64 * QS_STRIDE + 64 * DOS_STRIDE) * 2 + 64 * 3 * 4)

// 4-byte global -> shared copy; src_bytes = 0 writes a zero.
__device__ __forceinline__ void selb_cp_async4(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
}

// Grid: an upper bound on the chunk's segments (as selb_attn); CTAs past seg_base[npairs] return.
extern "C" __global__ void __launch_bounds__(128) selb_bwd_dq(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ ks, const bf16_t* __restrict__ vs,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const float* __restrict__ lse,
    const float* __restrict__ dg, const int2* __restrict__ blk, const int* __restrict__ base,
    const int* __restrict__ seg_base, const int* __restrict__ list, int npairs, int nbc, int jg_lo, int ga, int ta,
    int ct, dqpart_t* __restrict__ part_dq, float* __restrict__ part_scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Ks = (bf16_t*)smem;                                  // [SEL_L][KS_STRIDE]
    bf16_t* Vs = Ks + SEL_L * KS_STRIDE;                         // [SEL_L][VS_STRIDE]
    unsigned char* stages = (unsigned char*)(Vs + SEL_L * VS_STRIDE);   // 2 x SELB_DQ_STAGE
    int* ent = (int*)(stages + 2 * SELB_DQ_STAGE);               // [SELB_SEG]
    auto Qb = [&](int b) { return (bf16_t*)(stages + b * SELB_DQ_STAGE); };
    auto dOb = [&](int b) { return Qb(b) + 64 * QS_STRIDE; };
    auto meta = [&](int b) { return (float*)(dOb(b) + 64 * DOS_STRIDE); };   // lse[64] dg[64] gate[64]

    SelbSeg sg;
    if (!selb_segment(blk, base, seg_base, npairs, nbc, jg_lo, ga, sg)) return;
    const int g = sg.g, gl = g - ga, first = sg.first, nk = sg.nk, ne = sg.ne;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    const int row0 = warp * 16;
    selb_load_segment(Ks, Vs, ks, vs, list, ent, sg);
    __syncthreads();

    const int ngroups = (ne + SELB_PG - 1) / SELB_PG;
    // the rows of group gi into stage gi & 1 (one commit group; the first carries the K/V loads)
    auto gather = [&](int gi) {
        const int b = gi & 1;
        const int nr = min(SELB_PG, ne - gi * SELB_PG) * G;
        const int* eg = ent + gi * SELB_PG;
        auto qrow = [&](int r) { return (i64)(ta + (eg[r / G] >> 5)) * HQ + g * G + r % G; };
        load_rows_async<64, DK, QS_STRIDE, 128>(Qb(b), q, nr, [&](int r) { return qrow(r) * DK; });
        load_rows_async<64, DV, DOS_STRIDE, 128>(dOb(b), dO, nr, [&](int r) { return qrow(r) * DV; });
        if (tid < 64) {
            float* m = meta(b);
            const bool ok = tid < nr;
            const i64 qr = ok ? qrow(tid) : 0;
            selb_cp_async4(m + tid, lse + qr, ok ? 4 : 0);
            selb_cp_async4(m + 64 + tid, dg + qr, ok ? 4 : 0);
            selb_cp_async4(m + 128 + tid, gate + qr, ok ? 4 : 0);
        }
        cp_async_commit();
    };
    gather(0);

    for (int gi = 0; gi < ngroups; ++gi) {
        if (gi + 1 < ngroups) {
            gather(gi + 1);
            cp_async_wait_one();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        const int b = gi & 1;
        const int nrows = min(SELB_PG, ne - gi * SELB_PG) * G;
        if (row0 < nrows) {   // warp-uniform
            bool valid[2];
            int lim[2];
            i64 slot[2];
            float rl[2], rd[2], rg[2];
            const float* m = meta(b);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row0 + gr + 8 * h;
                valid[h] = r < nrows;
                const int packed = valid[h] ? ent[gi * SELB_PG + r / G] : 0;
                const int tl = packed >> 5;
                lim[h] = valid[h] ? ta + tl - first : -1;   // keys 0..lim of the block are visible
                slot[h] = ((i64)(gl * ct + tl) * G + r % G) * NSEL + (packed & 31);
                rl[h] = m[r];
                rd[h] = m[64 + r];
                rg[h] = valid[h] ? m[128 + r] : 0.f;
            }
            float dq[DK / 8][4];
            bw_zero<DK>(dq);
            const bf16_t* Qg = Qb(b);
            const bf16_t* dOg = dOb(b);
#pragma unroll 1
            for (int kt0 = 0; kt0 < SEL_L; kt0 += SELB_KT) {
                int hk[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) hk[h] = min(max(lim[h] + 1 - kt0, 0), min(SELB_KT, nk - kt0));
                if (!__any_sync(0xffffffff, hk[0] > 0 || hk[1] > 0)) continue;
                const bf16_t* Kt = Ks + kt0 * KS_STRIDE;
                float sc[SELB_KT / 8][4], dp[SELB_KT / 8][4];
                bw_mm_nt<DK, SELB_KT / 8>(sc, Qg, QS_STRIDE, row0, Kt, KS_STRIDE, 0);
                bw_mm_nt<DV, SELB_KT / 8>(dp, dOg, DOS_STRIDE, row0, Vs + kt0 * VS_STRIDE, VS_STRIDE, 0);
#pragma unroll
                for (int nt = 0; nt < SELB_KT / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = e >> 1, key = nt * 8 + gc + (e & 1);
                        const float pr = key < hk[i] ? exp2f(sc[nt][e] * SCALE_LOG2 - rl[i]) : 0.f;
                        sc[nt][e] = rg[i] * pr * (dp[nt][e] - rd[i]);
                    }
                bw_mm_pm<DK, SELB_KT>(dq, sc, Kt, KS_STRIDE);
            }
            bw_store_dq_partial(dq, valid, slot, part_dq, part_scale, lane, gc);
        }
        __syncthreads();   // stage b is refilled by the next gather
    }
}

// One warp per row (t, h) of the chunk, rows numbered ((g - ga) * ct + t - ta) * G + h % G (the
// slot order / NSEL, as selb_merge): dq[t, h] += SCALE_NAT * sum of the valid ranks' partials,
// ascending rank order.
extern "C" __global__ void __launch_bounds__(256) selb_dq_merge(const int* __restrict__ sel_idx,
                                                                const dqpart_t* __restrict__ part_dq,
                                                                const float* __restrict__ part_scale, int ta,
                                                                int ct, int ga, int nrows, float* __restrict__ dq_out) {
    const int row = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= nrows) return;   // whole warps
    const int hh = row % G, rest = row / G, tl = rest % ct, gl = rest / ct;
    const int t = ta + tl, g = ga + gl;
    const i64 slot0 = (i64)row * NSEL;
    const int j = lane < NSEL ? sel_idx[((i64)t * HKV + g) * NSEL + lane] : -1;
#if SELB_DQ_PART == 2
    const float w = j >= 0 ? SCALE_NAT * part_scale[slot0 + lane] : 0.f;
#else
    const float w = j >= 0 ? SCALE_NAT : 0.f;
#endif
    float wr[NSEL];
#pragma unroll
    for (int r = 0; r < NSEL; ++r) wr[r] = __shfl_sync(0xffffffff, w, r);
    const i64 qrow = (i64)t * HQ + g * G + hh;
    for (int c4 = lane; c4 < DK / 4; c4 += 32) {
        const float4 acc = selb_weighted_sum4(wr, [&](int r) {
#if SELB_DQ_PART == 0
            return *(const float4*)(part_dq + (slot0 + r) * DK + 4 * c4);
#else
            return f16x4_to_f32(*(const uint2*)(part_dq + (slot0 + r) * DK + 4 * c4));
#endif
        });
        float4* po = (float4*)(dq_out + qrow * DK) + c4;
        float4 ov = *po;
        ov.x += acc.x;
        ov.y += acc.y;
        ov.z += acc.z;
        ov.w += acc.w;
        *po = ov;
    }
}
