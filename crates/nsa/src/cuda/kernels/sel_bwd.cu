// Backward of the selection branch (SPEC.md "Selection branch"; the choice itself is not
// differentiated, gradients flow through the attention over the selected tokens s <= t).
//
// sel_bwd_dq       row-major, group-centric as the forward's sel_attn: one CTA = KV group g and
//                  BS_P = min(32, 64 / G) positions (4 warps; G >= 64: one position over G / 16
//                  warps), walking the union of their selected blocks (statistics, then dQ; one
//                  pass with saved statistics) through BS_STAGES K/V buffers; a warp none of
//                  whose positions chose a tile skips it. Adds into dq.
// Inverse index (deterministic, no floating-point atomics): for each (KV head g, selection block
// jg, numbered across the packed batch) the ascending list of the tokens that selected it.
//   sel_index_count       integer counts per (token chunk, g, jg)
//   sel_index_chunk_scan  per (g, jg): exclusive prefix over the chunks, and the total
//   sel_index_scan        one CTA: list offsets, segment table (lists cut into SEG tokens), and
//                         partial-slot offsets for the lists with more than one segment
//   sel_index_fill        one warp per (chunk, g) walks its tokens in order: a stable fill
// sel_bwd_dkdv     key-major: one CTA = one segment of one list: the block's K/V tile against
//                  the G heads of each token in the segment; a one-segment list writes dK/dV of
//                  the block directly, longer ones write partial sums ... Its products run on
//                  wgmma where bwd_wgmma.cu enables it (BW_WG: sm_90a, not -DBWD_NO_WGMMA),
//                  else on mma.sync (bwd_common.cu's bw_dkdv_rows).
// sel_dkdv_reduce  ... which this kernel adds up in segment order.
// Every order of summation is fixed by the data, so the gradients are bitwise reproducible.

// Positions per CTA (the host's plan::sel_positions mirrors BS_P, and its smem_of BS_STAGES).
// G >= 16: one position per CTA (G / 16 warps: one at G = 16), one K/V buffer;
// measured at 64k, G = 16 (NOTES-cuda-bwd.md v15): 31.5 ms saved / 56.1 recompute against 35.6 /
// 67.4 with the forward's packing below (2 CTAs of 4 warps per SM, by registers, each warp busy on
// ~31% of the tiles its CTA walks, against 5 independent one-warp CTAs).
// G < 16: the forward's P_SEL packing, min(32, 64 / G) positions (BS_P <= 32: the union merge
// keeps one lane per position and 32-bit `chose` masks), two K/V buffers when dk + dv <= 256;
// measured at G = 1 (recompute mode, where this kernel runs at G < 16): 543 ms against 663.
// Experiments (A/B timing): -DSEL_DQ_ONE_WARP forces the one-warp layout (16 / G positions) at
// every G, -DSEL_DQ_PACKED the packing at every G; -DSEL_DQ_ROWS=R packs min(32, R / G)
// positions; -DSEL_DQ_STAGES=S sets the K/V buffers of the packed layout.
#if defined(SEL_DQ_ONE_WARP) || (G >= 16 && !defined(SEL_DQ_PACKED))
#define BS_P (G >= 16 ? 1 : 16 / G)
#define BS_STAGES 1
#else
#ifdef SEL_DQ_ROWS
#define BS_ROWS_GOAL SEL_DQ_ROWS
#else
#define BS_ROWS_GOAL 64
#endif
#define BS_P (G >= BS_ROWS_GOAL ? 1 : (BS_ROWS_GOAL / G > 32 ? 32 : BS_ROWS_GOAL / G))
#ifdef SEL_DQ_STAGES
#define BS_STAGES SEL_DQ_STAGES
#else
#define BS_STAGES ((DK + DV) <= 256 ? 2 : 1)
#endif
#endif
#define BS_WARPS ((BS_P * G + 15) / 16)
// key tiles of the union of the CTA's block lists, at most (smem list, see sel_bwd_dq_body)
#define BS_MAX_TILES (BS_P * NSEL * ((SEL_L + KT - 1) / KT))
#define BS_ROWS (BS_WARPS * 16)
#define BS_THREADS (BS_WARPS * 32)
#define INT_MAX_ 0x7fffffff

template <bool SAVED>
__device__ __forceinline__ void sel_bwd_dq_body(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ ks, const bf16_t* __restrict__ vs,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const int4* __restrict__ items,
    const int* __restrict__ sel_idx, float* __restrict__ lse_out, float* __restrict__ dg_out,
    float* __restrict__ dq_out) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Qs = (bf16_t*)smem;
    bf16_t* dOs = Qs + BS_ROWS * QS_STRIDE;
    bf16_t* Ks = dOs + BS_ROWS * DOS_STRIDE;            // [BS_STAGES][KT][KS_STRIDE]
    bf16_t* Vs = Ks + BS_STAGES * KT * KS_STRIDE;       // [BS_STAGES][KT][VS_STRIDE]
    int* idx_s = (int*)(Vs + BS_STAGES * KT * VS_STRIDE);   // [BS_P][NSEL]
    int* tl_k0 = idx_s + BS_P * NSEL;                        // [BS_MAX_TILES] first key of the tile
    int* tl_nk = tl_k0 + BS_MAX_TILES;                       // [BS_MAX_TILES] its length
    unsigned* tl_mask = (unsigned*)(tl_nk + BS_MAX_TILES);   // [BS_MAX_TILES] positions that chose it
    int* n_tiles = (int*)(tl_mask + BS_MAX_TILES);

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z;
    const int g = blockIdx.y;
    const int npos = min(BS_P, len - t0), nrows = npos * G;
    const int tmax = t0 + npos - 1;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2;
    const int row0 = warp * 16;

    auto qoff = [&](int r) { return ((i64)(start + t0 + r / G) * HQ + g * G + r % G); };
    load_rows_async<BS_ROWS, DK, QS_STRIDE, BS_THREADS>(Qs, q, nrows, [&](int r) { return qoff(r) * DK; });
    load_rows_async<BS_ROWS, DV, DOS_STRIDE, BS_THREADS>(dOs, dO, nrows, [&](int r) { return qoff(r) * DV; });
    cp_async_commit();
    for (int e = tid; e < BS_P * NSEL; e += BS_THREADS) {
        const int p = e / NSEL;
        const int v = p < npos ? sel_idx[((i64)(start + t0 + p) * HKV + g) * NSEL + e % NSEL] : -1;
        idx_s[e] = v < 0 ? INT_MAX_ : v;
    }
    __syncthreads();
    // P-way merge of the sorted block lists into the union's key tiles, ascending (warp 0; lane
    // p < BS_P holds position p's next block); both passes walk this list, every warp the same
    // sequence, so the barriers inside bw_pipeline match.
    if (warp == 0) {
        const int count = sel_union_chunks<BS_P, KT>(idx_s, tmax, tl_k0, tl_nk, tl_mask);
        if (lane == 0) *n_tiles = count;
    }
    __syncthreads();
    const int ntl = *n_tiles;

    // per row: its position's bit (0 for a row past the CTA's), the keys < kend it sees
    int kend[2];
    unsigned pbit[2];
    i64 qrow[2];
    bool valid[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = row0 + gr + 8 * i;
        valid[i] = r < nrows;
        pbit[i] = valid[i] ? 1u << (r / G) : 0u;
        kend[i] = t0 + r / G + 1;
        qrow[i] = valid[i] ? qoff(r) : 0;
    }
    // positions of this warp's valid rows (warp-uniform): a tile none of them chose is skipped
    const unsigned warp_pos = __reduce_or_sync(0xffffffff, pbit[0] | pbit[1]);
    // the tiles of the list; fn runs only for those the warp's positions chose (`active`, set by
    // the mask of the tile about to be used): a skipped tile costs the warp the barriers only.
    auto for_tiles = [&](auto fn) {
        int c = 0;
        bool active = false;
        bw_pipeline<BS_THREADS, BS_STAGES>(
            Ks, Vs, ks, vs, g,
            [&](BwTile& t) {
                if (c >= ntl) return false;
                t.k0 = tl_k0[c];
                t.nk = tl_nk[c];
                t.chose = tl_mask[c];
                t.row = start + t.k0;
                ++c;
                return true;
            },
            [&](const BwTile& t, int (&lo)[2], int (&hi)[2]) {
                active = (t.chose & warp_pos) != 0;
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    lo[i] = 0;
                    hi[i] = (t.chose & pbit[i]) ? min(max(kend[i] - t.k0, 0), t.nk) : 0;
                }
            },
            [&](const int (&lo)[2], const int (&hi)[2], const bf16_t* Ks_, const bf16_t* Vs_) {
                if (active) fn(lo, hi, Ks_, Vs_);
            });
    };
    bw_rows_dq<true, SAVED>(Qs, dOs, row0, qrow, valid, gate, lse_out, dg_out, dq_out, for_tiles);
}

// seqs[b] = (start, len, cstart, first selection block of the sequence in the batch numbering)
__device__ __forceinline__ int bw_seq_of(const int4* __restrict__ seqs, int nseq, int tok) {
    int lo = 0, hi = nseq - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (seqs[mid].x <= tok) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// cnt[(chunk * HKV + g) * nb + jg] += 1 per selected entry (integer atomics: exact counts).
extern "C" __global__ void sel_index_count(const int* __restrict__ sel_idx, const int4* __restrict__ seqs,
                                           int nseq, int ntok, int chunk_len, int nb, int* __restrict__ cnt) {
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (i64)ntok * HKV * NSEL) return;
    const int j = sel_idx[e];
    if (j < 0) return;
    const int tok = (int)(e / (HKV * NSEL));
    const int g = (int)((e / NSEL) % HKV);
    const int jg = seqs[bw_seq_of(seqs, nseq, tok)].w + j;
    atomicAdd(cnt + ((i64)(tok / chunk_len) * HKV + g) * nb + jg, 1);
}

// Per pair p = g * nb + jg: cnt[c][p] -> exclusive prefix over chunks c; total[p].
extern "C" __global__ void sel_index_chunk_scan(int* __restrict__ cnt, int nchunks, int npairs,
                                                int* __restrict__ total) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= npairs) return;
    int run = 0;
    for (int c = 0; c < nchunks; ++c) {
        const i64 at = (i64)c * npairs + p;
        const int v = cnt[at];
        cnt[at] = run;
        run += v;
    }
    total[p] = run;
}

// One CTA of 1024 threads: exclusive scans over the pairs of the list lengths (base), of the
// segment counts ceil(total / seg_len) (seg_base, npairs + 1 entries) and of the partial slots
// (segments of lists with more than one, pslot_base). summary = (segments, partial slots, entries).
extern "C" __global__ void __launch_bounds__(1024) sel_index_scan(const int* __restrict__ total, int npairs,
                                                                  int seg_len, int* __restrict__ base,
                                                                  int* __restrict__ seg_base,
                                                                  int* __restrict__ pslot_base,
                                                                  int* __restrict__ summary) {
    __shared__ int sh[3][1024];
    const int tid = threadIdx.x, per = (npairs + 1023) / 1024;
    const int b0 = min(tid * per, npairs), b1 = min(b0 + per, npairs);
    int a[3] = {0, 0, 0};
    for (int i = b0; i < b1; ++i) {
        const int t = total[i], ns = (t + seg_len - 1) / seg_len;
        a[0] += t;
        a[1] += ns;
        a[2] += ns > 1 ? ns : 0;
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) sh[k][tid] = a[k];
    __syncthreads();
    for (int off = 1; off < 1024; off <<= 1) {
        int v[3];
#pragma unroll
        for (int k = 0; k < 3; ++k) v[k] = tid >= off ? sh[k][tid - off] : 0;
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 3; ++k) sh[k][tid] += v[k];
        __syncthreads();
    }
    int e[3];
#pragma unroll
    for (int k = 0; k < 3; ++k) e[k] = sh[k][tid] - a[k];
    for (int i = b0; i < b1; ++i) {
        const int t = total[i], ns = (t + seg_len - 1) / seg_len;
        base[i] = e[0];
        seg_base[i] = e[1];
        pslot_base[i] = e[2];
        e[0] += t;
        e[1] += ns;
        e[2] += ns > 1 ? ns : 0;
    }
    if (tid == 1023) {
        seg_base[npairs] = sh[1][1023];
        summary[0] = sh[1][1023];
        summary[1] = sh[2][1023];
        summary[2] = sh[0][1023];
    }
}

// One warp per (chunk, g): the chunk's tokens in ascending order, one lane per slot (the blocks
// of one token are distinct, so the lanes never share a counter). with_rank: list_rank gets the
// entry's rank in its token's selection (the lane), which the fused kernel's dQ slots need.
extern "C" __global__ void sel_index_fill(const int* __restrict__ sel_idx, const int4* __restrict__ seqs,
                                          int nseq, int ntok, int chunk_len, int nb, int* __restrict__ cnt,
                                          const int* __restrict__ base, int* __restrict__ list, int with_rank,
                                          int* __restrict__ list_rank) {
    const int c = blockIdx.x, g = blockIdx.y, lane = threadIdx.x;
    const int t_end = min(ntok, (c + 1) * chunk_len);
    const int npairs = HKV * nb;
    int* ccnt = cnt + (i64)c * npairs;
    for (int tok = c * chunk_len; tok < t_end; ++tok) {
        const int j = lane < NSEL ? sel_idx[((i64)tok * HKV + g) * NSEL + lane] : -1;
        if (j >= 0) {
            const int p = g * nb + seqs[bw_seq_of(seqs, nseq, tok)].w + j;
            const int at = ccnt[p];
            ccnt[p] = at + 1;
            list[base[p] + at] = tok;
            if (with_rank) list_rank[base[p] + at] = lane;   // the fused kernel's dQ slot
        }
        __syncwarp();
    }
}

// Segment s of the inverse index (numbered over every (KV head, block) pair, `seg_base`): its
// pair p = g * nb + jg, its number k in the pair's list and the list's segment count, the block
// (blocks[jg] = (seq start, seq len, j, 0)), and its tokens list[lbeg .. lbeg + npos).
struct SelSeg {
    int p, g, k, nseg, start, len, j, lbeg, npos;
};
__device__ __forceinline__ SelSeg sel_segment(int s, const int4* __restrict__ blocks, int nb,
                                              const int* __restrict__ total, const int* __restrict__ base,
                                              const int* __restrict__ seg_base, int seg_len) {
    int lo = 0, hi = HKV * nb - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (seg_base[mid] <= s) lo = mid; else hi = mid - 1;
    }
    SelSeg sg;
    sg.p = lo;
    sg.g = lo / nb;
    const int jg = lo % nb;
    sg.k = s - seg_base[lo];
    sg.nseg = seg_base[lo + 1] - seg_base[lo];
    const int4 bl = blocks[jg];
    sg.start = bl.x;
    sg.len = bl.y;
    sg.j = bl.z;
    sg.lbeg = base[lo] + sg.k * seg_len;
    sg.npos = min(seg_len, total[lo] - sg.k * seg_len);
    return sg;
}

// Writes the segment's dK (scaled) / dV of the block's keys kt0 .. kt0 + nk: into dk_out / dv_out
// for a one-segment list, else into the segment's partial slot for sel_dkdv_reduce.
__device__ __forceinline__ void sel_store_dkdv(const float (&dk)[DK / 8][4], const float (&dv)[DV / 8][4],
                                               const SelSeg& sg, int kt0, int nk, const int* __restrict__ pslot_base,
                                               float* __restrict__ dk_out, float* __restrict__ dv_out,
                                               float* __restrict__ pk, float* __restrict__ pv) {
    const int g = sg.g, first = sg.start + sg.j * SEL_L + kt0;
    if (sg.nseg == 1) {
        bw_store_kv(
            dk, dv, nk, SCALE_NAT, [&](int key) { return dk_out + ((i64)(first + key) * HKV + g) * DK; },
            [&](int key) { return dv_out + ((i64)(first + key) * HKV + g) * DV; });
    } else {
        const i64 slot = (i64)(pslot_base[sg.p] + sg.k) * SEL_L + kt0;
        bw_store_kv(
            dk, dv, nk, SCALE_NAT, [&](int key) { return pk + (slot + key) * DK; },
            [&](int key) { return pv + (slot + key) * DV; });
    }
}

// blocks[jg] = (seq start, seq len, j, 0). One CTA per segment (grid = summary[0]).
extern "C" __global__ void __launch_bounds__(128) sel_bwd_dkdv(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ ks, const bf16_t* __restrict__ vs,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const float* __restrict__ lse,
    const float* __restrict__ dg, const int4* __restrict__ blocks, int nb, const int* __restrict__ total,
    const int* __restrict__ base, const int* __restrict__ seg_base, const int* __restrict__ pslot_base,
    const int* __restrict__ list, int seg_len, float* __restrict__ dk_out, float* __restrict__ dv_out,
    float* __restrict__ pk, float* __restrict__ pv) {
    extern __shared__ __align__(16) unsigned char smem[];
    const SelSeg sg = sel_segment(blockIdx.x, blocks, nb, total, base, seg_base, seg_len);
    const int g = sg.g, start = sg.start, len = sg.len, j = sg.j, lbeg = sg.lbeg, npos = sg.npos;
#if BW_WG
    unsigned char* sm = align1024(smem);   // swizzled tiles (the host gives BW_WG_KV_SMEM, see bwd_wgmma.cu)
#endif
    for (int kt0 = 0; kt0 < SEL_L; kt0 += KT) {
        const int kfirst = j * SEL_L + kt0;
        const int nk = min(KT, min(SEL_L - kt0, len - kfirst));
        if (nk <= 0) break;
        __syncthreads();   // previous key tile done
        float dk[DK / 8][4], dv[DV / 8][4];
        bw_zero<DK>(dk);
        bw_zero<DV>(dv);
        auto tok_of = [&](int pos) { return list[lbeg + pos]; };
        auto t_of = [&](int tok) { return tok - start; };
        auto ok = [&](int key, int t) { return key < nk && kfirst + key <= t; };
#if BW_WG
        // wgmma key-major steps (returns with every wgmma complete)
        bw_wg_load_kv(sm, ks, vs, (i64)(start + kfirst), g, nk);
        bw_wg_dkdv_rows(sm, q, dO, lse, dg, gate, g, npos * G, tok_of, t_of, ok, dk, dv);
#else
        bw_load_kv(smem, ks, vs, (i64)(start + kfirst), g, nk);
        bw_dkdv_rows(smem, q, dO, lse, dg, gate, g, npos * G, tok_of, t_of, ok, dk, dv);
#endif
        cp_async_wait_all();
        sel_store_dkdv(dk, dv, sg, kt0, nk, pslot_base, dk_out, dv_out, pk, pv);
    }
}

// One CTA per pair: the lists with more than one segment sum their partials in segment order.
extern "C" __global__ void sel_dkdv_reduce(const int4* __restrict__ blocks, int nb, const int* __restrict__ seg_base,
                                           const int* __restrict__ pslot_base, const float* __restrict__ pk,
                                           const float* __restrict__ pv, float* __restrict__ dk_out,
                                           float* __restrict__ dv_out) {
    const int p = blockIdx.x;
    const int nseg = seg_base[p + 1] - seg_base[p];
    if (nseg <= 1) return;
    const int g = p / nb, jg = p % nb;
    const int4 bl = blocks[jg];
    const int nkeys = min(SEL_L, bl.y - bl.z * SEL_L);
    const i64 ps = pslot_base[p];
    const i64 first = (i64)bl.x + (i64)bl.z * SEL_L;
    for (int e = threadIdx.x; e < nkeys * (DK + DV); e += blockDim.x) {
        const int key = e / (DK + DV), c = e % (DK + DV);
        float acc = 0.f;
        if (c < DK) {
            for (int k = 0; k < nseg; ++k) acc += pk[((ps + k) * SEL_L + key) * DK + c];
            dk_out[((first + key) * HKV + g) * DK + c] = acc;
        } else {
            for (int k = 0; k < nseg; ++k) acc += pv[((ps + k) * SEL_L + key) * DV + c - DK];
            dv_out[((first + key) * HKV + g) * DV + c - DK] = acc;
        }
    }
}

// ---- fused selection backward (the default where built; NOTES-cuda-bwd.md v17) ----
// sel_bwd_dkdv_dq: sel_bwd_dkdv's key-major walk (one CTA = one segment of the list of KV head g
// and selection block j; wgmma row steps of 64 rows) that also computes every row's dQ for this
// block, where the position-major sel_bwd_dq recomputes S and dP with the K/V blocks gathered
// again per position. Per row step, after bw_wg_dkdv_step (dV += P^T dO, dK += dS^T Q):
//   dS (64 rows x 64 keys) from the step's dS^T registers into shared memory (bf16, padded rows),
//   dQ_r (64 x DK) = dS K          RS wgmma, A fragments of dS, the K tile read MN-major,
// written unscaled to the partial slot of (t, h, rank of j in t's list) in the SELB_DQ_PART format
// (bw_store_dq_partial); selb_dq_merge (SelBlock family) then adds SCALE_NAT * sum_r dQ_r in rank
// order to dq. No atomics, every order fixed: bitwise repeatable as the two kernels it replaces.
// The host launches it per range of KV heads [ga, ga + gcnt) (segments seg0 ..), the partial
// buffer holding the slots ((g - ga) * n_tok + t) * G + h % G) * NSEL + rank (int: the host keeps
// them below 2^31). Needs the wgmma path with 64-row steps and one key tile per block (SEL_L <=
// KT); elsewhere the kernel traps and the host never launches it (sel_fused.rs mirrors this).
#if BW_WG && BW_WG_RT == 64 && SEL_L <= KT
#define SEL_FUSED 1
#define SEL_FUSED_DS_STRIDE (64 + 8)   // dS row stride (bf16): conflict-free stores and fragment loads
// BW_WG_KV_SMEM, then the slots of the two row buffers, the dS tile, and the two rings of list
// entries (token, rank) of a step's positions
#define SEL_FUSED_SMEM (BW_WG_KV_SMEM + 2 * 64 * 4 + 64 * SEL_FUSED_DS_STRIDE * 2 + 4 * 64 * 4)

// bw_wg_dkdv_rows' walk (without the deferred dV / dK: dQ follows each step) with the dQ
// partials of every row. Every global read of a step's staging is a cp.async (v20): the list
// entries (token, rank) of step s + 1 travel with step s's rows into a two-slot ring, so staging
// step s + 1 (issued once step s's S^T / dP^T are in flight) computes its row addresses, t and
// dQ slots from shared memory, and its lse / dg / gate arrive by 4-byte cp.async: no thread waits
// on a global load in the loop. tokens: list + lbeg (packed token indices); ranks: the entries'
// ranks in their token's selection (sel_index_fill with ranks); start: the sequence's first token.
template <class Ok>
__device__ __forceinline__ void sel_wg_fused_rows(unsigned char* sm, const bf16_t* __restrict__ q,
                                                  const bf16_t* __restrict__ dO, const float* __restrict__ lse,
                                                  const float* __restrict__ dg, const float* __restrict__ gate,
                                                  const int* __restrict__ tokens, const int* __restrict__ ranks,
                                                  int start, int g, int ga, int n_tok, int nrows_total, Ok ok,
                                                  float (&dk)[DK / 8][4], float (&dv)[DV / 8][4],
                                                  dqpart_t* __restrict__ part_dq, float* __restrict__ part_scale) {
    constexpr int RT = 64;
    u32 dyn_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_smem));
    if (dyn_smem < SEL_FUSED_SMEM) __trap();   // the host's footprint (sel_fused.rs) is out of date
    unsigned char* rowbuf = sm + BW_WG_KV_BYTES;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    auto Qb = [&](int b) { return rowbuf + b * BW_WG_ROW_BYTES; };
    auto dOb = [&](int b) { return Qb(b) + RT * DK * 2; };
    auto meta = [&](int b) { return (float*)(rowbuf + 2 * BW_WG_ROW_BYTES + b * RT * 16); };
    int* slots = (int*)(rowbuf + 2 * BW_WG_ROW_BYTES + 2 * RT * 16);   // [2][RT], -1: no row
    bf16_t* dss = (bf16_t*)(slots + 2 * RT);                            // [64 rows][SEL_FUSED_DS_STRIDE]
    int* ptok = (int*)(dss + 64 * SEL_FUSED_DS_STRIDE);                 // [2][RT] tokens of step s's positions
    int* prank = ptok + 2 * RT;                                         // [2][RT] their ranks
    // step s: rows [RT s, RT s + RT), positions rho / G from p0 = RT s / G (at most RT of them)
    auto first_pos = [&](int s) { return s * RT / G; };
    auto fetch_list = [&](int s) {   // step s's list entries into ring slot s & 1 (no commit)
        const int r0 = s * RT, r1 = min(r0 + RT, nrows_total), p0 = first_pos(s);
        const int np = r1 > r0 ? (r1 - 1) / G - p0 + 1 : 0;
        for (int e = tid; e < np; e += 128) {
            cp_async4(ptok + (s & 1) * RT + e, tokens + p0 + e);
            cp_async4(prank + (s & 1) * RT + e, ranks + p0 + e);
        }
    };
    // step s's rows, metadata and slots (its list entries visible in ring slot s & 1), and step
    // s + 1's list entries: one commit group
    auto stage = [&](int s) {
        const int b = s & 1, rho0 = s * RT, nrows = min(RT, nrows_total - rho0), p0 = first_pos(s);
        auto tok_of = [&](int pos) { return ptok[b * RT + pos - p0]; };
        auto t_of = [&](int tok) { return tok - start; };
        auto qrow = [&](int r) {
            const int rho = rho0 + r;
            return (i64)tok_of(rho / G) * HQ + g * G + rho % G;
        };
        bw_wg_load_rows(Qb(b), dOb(b), q, dO, nrows, qrow);
        bw_stage_meta<RT, true>(meta(b), rho0, nrows, qrow, tok_of, t_of, lse, dg, gate);
        if (tid < RT) {
            const int rho = rho0 + tid, p = rho / G - p0;
            slots[b * RT + tid] = tid < nrows ? (((g - ga) * n_tok + ptok[b * RT + p]) * G + rho % G) * NSEL +
                                                    prank[b * RT + p]
                                              : -1;
        }
        if (rho0 + RT < nrows_total) fetch_list(s + 1);
        cp_async_commit();
    };
    const u32 ks = smem_addr(sm), vs = ks + 64 * DK * 2;
    if (nrows_total > 0) {
        fetch_list(0);
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();   // step 0's list entries are visible
        stage(0);
    }
    for (int i = 0, rho0 = 0; rho0 < nrows_total; ++i, rho0 += RT) {
        const int b = i & 1;
        cp_async_wait_all();
        fence_proxy_async();   // this thread's cp.async writes, before the wgmmas read them
        __syncthreads();       // step i's rows, metadata, slots and step i + 1's list entries are visible
        const float* m = meta(b);
        // dV / dK of the step (step i + 1 staged once S^T / dP^T are issued: its buffer, slots and
        // metadata were last read in step i - 1, its ring slot by step i's staging); dS^T (this
        // warp's keys 16 warp .. + 15, all 64 rows) into dss as dS
        bw_wg_dkdv_step<false>(
            ks, vs, smem_addr(Qb(b)), smem_addr(dOb(b)), m, m + RT, m + 2 * RT, (const int*)(m + 3 * RT), ok,
            [&]() {
                if (rho0 + RT < nrows_total) stage(i + 1);
            },
            dk, dv, [&](const float (&dst)[8][4]) {
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        dss[(nt * 8 + gc + (e & 1)) * SEL_FUSED_DS_STRIDE + warp * 16 + gr + 8 * (e >> 1)] =
                            f32_to_bf16(dst[nt][e]);
            });
        __syncthreads();   // every warp's keys of dS are stored
        u32 a[4][4];
#pragma unroll
        for (int kc = 0; kc < 4; ++kc) bw_frag_a(a[kc], dss, SEL_FUSED_DS_STRIDE, warp * 16, kc * 16);
        float dq[DK / 8][4];
        bw_zero<DK>(dq);
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < 4; ++kc) bw_wg_rs(dq, a[kc], wg_desc(ks + kc * 16 * 128, 64 * 128, 1024));
        wg_commit();
        wg_wait<0>();
        wg_pin(dq);
        bool valid[2];
        i64 slot[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int sl = slots[b * RT + warp * 16 + gr + 8 * h];
            valid[h] = sl >= 0;
            slot[h] = valid[h] ? sl : 0;
        }
        bw_store_dq_partial(dq, valid, slot, part_dq, part_scale, lane, gc);
        __syncthreads();   // buffer b, its slots and dss are free for the next steps
    }
}
#else
#define SEL_FUSED 0
#endif

// blocks[jg] = (seq start, seq len, j, 0). One CTA per segment seg0 + blockIdx.x of the KV heads
// ga .. (the host's launch per head range); dK / dV as sel_bwd_dkdv, dQ partials as above.
extern "C" __global__ void __launch_bounds__(128) sel_bwd_dkdv_dq(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ ks, const bf16_t* __restrict__ vs,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const float* __restrict__ lse,
    const float* __restrict__ dg, const int4* __restrict__ blocks, int nb, const int* __restrict__ total,
    const int* __restrict__ base, const int* __restrict__ seg_base, const int* __restrict__ pslot_base,
    const int* __restrict__ list, int seg_len, const int* __restrict__ list_rank, int seg0, int ga, int n_tok,
    float* __restrict__ dk_out, float* __restrict__ dv_out, float* __restrict__ pk, float* __restrict__ pv,
    dqpart_t* __restrict__ part_dq, float* __restrict__ part_scale) {
#if SEL_FUSED
    extern __shared__ __align__(16) unsigned char smem[];
    const SelSeg sg = sel_segment(seg0 + blockIdx.x, blocks, nb, total, base, seg_base, seg_len);
    const int g = sg.g, start = sg.start, len = sg.len, j = sg.j, lbeg = sg.lbeg, npos = sg.npos;
    const int kfirst = j * SEL_L;
    const int nk = min(SEL_L, len - kfirst);
    unsigned char* sm = align1024(smem);
    float dk[DK / 8][4], dv[DV / 8][4];
    bw_zero<DK>(dk);
    bw_zero<DV>(dv);
    auto ok = [&](int key, int t) { return key < nk && kfirst + key <= t; };
    bw_wg_load_kv(sm, ks, vs, (i64)(start + kfirst), g, nk);
    sel_wg_fused_rows(sm, q, dO, lse, dg, gate, list + lbeg, list_rank + lbeg, start, g, ga, n_tok, npos * G, ok,
                      dk, dv, part_dq, part_scale);
    cp_async_wait_all();
    sel_store_dkdv(dk, dv, sg, 0, nk, pslot_base, dk_out, dv_out, pk, pv);
#else
    __trap();   // not built for this shape / architecture: the host does not launch it
#endif
}

extern "C" __global__ void __launch_bounds__(BS_THREADS) sel_bwd_dq(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ ks, const bf16_t* __restrict__ vs,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const int4* __restrict__ items,
    const int* __restrict__ sel_idx, float* __restrict__ lse_out, float* __restrict__ dg_out,
    float* __restrict__ dq_out) {
    sel_bwd_dq_body<false>(q, ks, vs, dO, gate, items, sel_idx, lse_out, dg_out, dq_out);
}
// with the forward's saved lse and the gate gradients of bwd_gate_dot (dg_out is read)
extern "C" __global__ void __launch_bounds__(BS_THREADS) sel_bwd_dq_saved(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ ks, const bf16_t* __restrict__ vs,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const int4* __restrict__ items,
    const int* __restrict__ sel_idx, float* __restrict__ lse_out, float* __restrict__ dg_out,
    float* __restrict__ dq_out) {
    sel_bwd_dq_body<true>(q, ks, vs, dO, gate, items, sel_idx, lse_out, dg_out, dq_out);
}
