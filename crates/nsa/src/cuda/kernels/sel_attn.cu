// Selection branch (SPEC.md "Selection branch"): attention over the tokens s <= t of the n
// selected blocks, added to the output as g_slc * o_slc.
//
// Group-centric: one CTA serves one KV group g, so the G query heads of a position share every
// K/V block loaded into shared memory. Small groups would fill only G of the 16 rows of an
// m16n8k16 tile; instead the CTA packs P_SEL = min(32, 64 / G) consecutive positions into its
// rows (row r -> position t0 + r / G, head g*G + r % G) and walks the *union* of their selected
// blocks in ascending order (a P-way merge of the sorted index lists, one lane per position):
// each block is loaded once for all of them; rows of positions that did not choose it are
// masked, and a warp none of whose positions chose it skips the block. Neighbouring positions
// share the forced blocks and, with real (correlated) queries, most chosen ones, so the union
// stays close to n while the tensor-core rows are full. For G >= 64 one position fills G / 16
// warps.
//
// The union is first written out as a list of 32-key chunks (first key, length, which positions
// chose the block); the chunks then stream through two shared-memory stages with cp.async, the
// next chunk loading while the current one is computed (a 1-warp CTA has no other warps of its
// own to hide the load latency behind).

// Rows per CTA: 64 by default; -DSEL_FWD_ROWS=N (an experiment, measured slower: NOTES-cuda.md
// v19) packs min(32, N / G) positions, a larger union per CTA (fewer K/V bytes per position where
// neighbours' selections overlap, i.e. short sequences) for more warps per barrier. cuda/mod.rs
// `footprint` mirrors it.
#ifndef SEL_FWD_ROWS
#define SEL_FWD_ROWS 64
#endif
#define P_SEL (G >= SEL_FWD_ROWS ? 1 : (SEL_FWD_ROWS / G > 32 ? 32 : SEL_FWD_ROWS / G))
#define SEL_WARPS ((P_SEL * G + 15) / 16)
#define SEL_ROWS (SEL_WARPS * 16)
#define SEL_THREADS (SEL_WARPS * 32)
#define SK 32                                              // keys per chunk
#define MAX_CHUNKS (P_SEL * NSEL * ((SEL_L + SK - 1) / SK))
#define INT_MAX_ 0x7fffffff
// K/V chunk stages: two, or one at dk + dv > 256 with a register bound for four CTAs per SM of
// 128 threads (16 warps per SM for wider CTAs; dk 192: two stages and 134 registers allow three;
// -DSEL_2STAGE keeps two stages and no bound; cuda/mod.rs `sel_stages` mirrors it).
#if (DK + DV) > 256 && !defined(SEL_2STAGE)
#define SEL_STAGES 1
#define SEL_BOUNDS __launch_bounds__(SEL_THREADS, 512 / SEL_THREADS > 0 ? 512 / SEL_THREADS : 1)
#else
#define SEL_STAGES 2
#define SEL_BOUNDS __launch_bounds__(SEL_THREADS)
#endif

extern "C" __global__ void SEL_BOUNDS sel_attn(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ ks, const bf16_t* __restrict__ vs,
    const float* __restrict__ gate, const int4* __restrict__ items, const int* __restrict__ sel_idx,
    float* __restrict__ out, float* __restrict__ lse_save, bf16_t* __restrict__ o_save) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Qs = (bf16_t*)smem;
    bf16_t* Ks = Qs + SEL_ROWS * QS_STRIDE;                  // [SEL_STAGES][SK][KS_STRIDE]
    bf16_t* Vs = Ks + SEL_STAGES * SK * KS_STRIDE;           // [SEL_STAGES][SK][VS_STRIDE]
    int* idx_s = (int*)(Vs + SEL_STAGES * SK * VS_STRIDE);   // [P_SEL][NSEL]
    int* ch_k0 = idx_s + P_SEL * NSEL;              // [MAX_CHUNKS] first key of the chunk
    int* ch_nk = ch_k0 + MAX_CHUNKS;                // [MAX_CHUNKS] its length
    unsigned* ch_mask = (unsigned*)(ch_nk + MAX_CHUNKS);   // [MAX_CHUNKS] positions that chose it
    int* n_chunks = (int*)(ch_mask + MAX_CHUNKS);

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z;
    const int g = blockIdx.y;
    const int npos = min(P_SEL, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2;
    const int row0 = warp * 16;

    load_rows_async<SEL_ROWS, DK, QS_STRIDE, SEL_THREADS>(Qs, q, nrows, [&](int r) {
        return ((i64)(start + t0 + r / G) * HQ + g * G + r % G) * DK;
    });
    cp_async_commit();
    for (int e = tid; e < P_SEL * NSEL; e += SEL_THREADS) {
        const int p = e / NSEL;
        int v = p < npos ? sel_idx[((i64)(start + t0 + p) * HKV + g) * NSEL + e % NSEL] : -1;
        idx_s[e] = v < 0 ? INT_MAX_ : v;
    }
    __syncthreads();

    // the union of the positions' blocks, ascending, as chunks (warp 0; lane p < P_SEL holds
    // position p's next block)
    if (warp == 0) {
        const int count = sel_union_chunks<P_SEL, SK>(idx_s, tmax, ch_k0, ch_nk, ch_mask);
        if (lane == 0) *n_chunks = count;
    }
    __syncthreads();
    const int nch = *n_chunks;

    int rr[2], tt[2], pp[2];
    bool valid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        rr[h] = row0 + gr + 8 * h;
        valid[h] = rr[h] < nrows;
        pp[h] = rr[h] / G;
        tt[h] = t0 + pp[h];
    }

    RowStats<1> st;
    rowstats_init(st);
    float o[1][DV / 8][4];
    zero_acc(o);

    // positions this warp's rows belong to (a warp skips chunks none of them chose)
    unsigned warp_pos = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h)
        if (valid[h]) warp_pos |= 1u << pp[h];
    warp_pos = __reduce_or_sync(0xffffffff, warp_pos);

    auto issue = [&](int c) {
        const int k0 = ch_k0[c], nk = ch_nk[c], stage = c & (SEL_STAGES - 1);
        load_rows_async<SK, DK, KS_STRIDE, SEL_THREADS>(Ks + stage * SK * KS_STRIDE,
                                                        ks + ((i64)(start + k0) * HKV + g) * DK, nk,
                                                        [&](int r) { return (i64)r * HKV * DK; });
        load_rows_async<SK, DV, VS_STRIDE, SEL_THREADS>(Vs + stage * SK * VS_STRIDE,
                                                        vs + ((i64)(start + k0) * HKV + g) * DV, nk,
                                                        [&](int r) { return (i64)r * HKV * DV; });
        cp_async_commit();
    };
    if (SEL_STAGES == 2 && nch > 0) issue(0);
    for (int c = 0; c < nch; ++c) {
        if (SEL_STAGES == 1) {   // the previous chunk's readers passed the loop's last barrier
            issue(c);
            cp_async_wait_all();
        } else if (c + 1 < nch) {
            issue(c + 1);
            cp_async_wait_one();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        const int k0 = ch_k0[c], nk = ch_nk[c];
        const unsigned chose = ch_mask[c];
        if (chose & warp_pos) {
            int lo[2] = {0, 0}, hi[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const bool sel = valid[h] && ((chose >> pp[h]) & 1u);
                hi[h] = sel ? min(max(tt[h] + 1 - k0, 0), nk) : 0;
            }
            const int stage = c & (SEL_STAGES - 1);
            attn_tile<1, SK>(Qs, Ks + stage * SK * KS_STRIDE, Vs + stage * SK * VS_STRIDE, row0, lo, hi, st, o);
        }
        __syncthreads();
    }
    cp_async_wait_all();
    // adds g_slc * o_slc; o_slc and its lse for the backward
    i64 qrow[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) qrow[h] = valid[h] ? (i64)(start + tt[h]) * HQ + g * G + rr[h] % G : -1;
    finish_branch_rows<true, 1>(qrow, st, o, gate, out, o_save != nullptr ? lse_save : nullptr, o_save);
}
