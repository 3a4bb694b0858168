// Backward of the compression branch (SPEC.md "Compression branch"), phi = mean.
//
// cmp_bwd_dq    row-major: one CTA = KV group g and 64 / G positions (rows = their G heads, as in
//               the forward). Pass 1 recomputes o_cmp and the row lse over the visible compressed
//               tokens (block i visible iff i*d + l - 1 <= t), writes lse and dg_cmp = do . o_cmp;
//               pass 2 accumulates dQ over the same tiles and writes dq (first branch: `=`).
//               Rows with no visible block (t < l - 1) get lse = +inf, dg = 0, dq = 0: no NaN.
// cmp_bwd_dkdv  key-major: one CTA = KV group g and BW_KM_KEYS compressed tokens [c0, c0 + 128)
//               (two key warpgroups on wgmma, bwd_wgmma.cu; 64 and one otherwise) of one sequence
//               and one chunk of the positions t >= c0*d + l - 1 that see them; it walks the
//               (position, head of g) rows and writes dKcmp, dVcmp (f32 scratch) of its
//               compressed tokens, or a partial sum that cmp_dkdv_reduce adds up in chunk order.
//               No atomics. Its products run on wgmma where bwd_wgmma.cu enables it (BW_WG).
// cmp_mean_bwd  phi = mean backward: raw token s of a sequence belongs to the compressed blocks
//               i with i*d <= s < i*d + l (at most l/d of them); dk[s] = (1/l) sum_i dKcmp[i],
//               gathered in ascending i (no scatter, no atomics).

#define BQ_ROWS 64
#define BQ_P (BQ_ROWS / G)

__device__ __forceinline__ int bw_cmp_visible(int t) { return t + 1 >= CMP_L ? (t + 1 - CMP_L) / CMP_D + 1 : 0; }

template <bool SAVED>
__device__ __forceinline__ void cmp_bwd_dq_body(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const int4* __restrict__ items,
    float* __restrict__ lse_out, float* __restrict__ dg_out, float* __restrict__ dq_out) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Qs = (bf16_t*)smem;
    bf16_t* dOs = Qs + BQ_ROWS * QS_STRIDE;
    bf16_t* Ks = dOs + BQ_ROWS * DOS_STRIDE;   // BW_QSTAGES tiles
    bf16_t* Vs = Ks + BW_QSTAGES * KT * KS_STRIDE;

    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z, cstart = it.w;
    const int g = blockIdx.y;
    const int npos = min(BQ_P, len - t0), nrows = npos * G;
    const int ncmp = bw_cmp_visible(t0 + npos - 1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2;
    const int row0 = warp * 16;

    auto qoff = [&](int r) { return ((i64)(start + t0 + r / G) * HQ + g * G + r % G); };
    load_rows_async<BQ_ROWS, DK, QS_STRIDE, 128>(Qs, q, nrows, [&](int r) { return qoff(r) * DK; });
    load_rows_async<BQ_ROWS, DV, DOS_STRIDE, 128>(dOs, dO, nrows, [&](int r) { return qoff(r) * DV; });
    cp_async_commit();

    int vis[2];
    i64 qrow[2];
    bool valid[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = row0 + gr + 8 * i;
        valid[i] = r < nrows;
        vis[i] = valid[i] ? bw_cmp_visible(t0 + r / G) : 0;
        qrow[i] = valid[i] ? qoff(r) : 0;
    }
    auto for_tiles = [&](auto fn) {
        int c = 0;
        bw_pipeline<128, BW_QSTAGES>(
            Ks, Vs, kc, vc, g,
            [&](BwTile& t) {
                if (c >= ncmp) return false;
                t.row = cstart + c;
                t.k0 = c;
                t.nk = min(KT, ncmp - c);
                t.chose = 0;
                c += KT;
                return true;
            },
            [&](const BwTile& t, int (&lo)[2], int (&hi)[2]) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    lo[i] = 0;
                    hi[i] = min(max(vis[i] - t.k0, 0), t.nk);
                }
            },
            fn);
    };
    bw_rows_dq<false, SAVED>(Qs, dOs, row0, qrow, valid, gate, lse_out, dg_out, dq_out, for_tiles);
}

#if BW_WG_DQ
// cmp_bwd_dq_body<true> on wgmma (bw_wg_rows_dq): the same items, rows, tiles and masks.
__device__ __forceinline__ void cmp_bwd_dq_wg(const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc,
                                              const bf16_t* __restrict__ vc, const bf16_t* __restrict__ dO,
                                              const float* __restrict__ gate, const int4* __restrict__ items,
                                              const float* __restrict__ lse_in, const float* __restrict__ dg_in,
                                              float* __restrict__ dq_out) {
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned char* sm = align1024(smem);
    const int4 it = items[blockIdx.x];
    const int start = it.x, len = it.y, t0 = it.z, cstart = it.w;
    const int g = blockIdx.y;
    const int npos = min(BQ_P, len - t0), nrows = npos * G;
    const int ncmp = bw_cmp_visible(t0 + npos - 1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2;
    const int row0 = warp * 16;

    auto qoff = [&](int r) { return ((i64)(start + t0 + r / G) * HQ + g * G + r % G); };
    load_tile_sw128<BQ_ROWS, DK, 128>(sm, q, nrows, [&](int r) { return qoff(r) * DK; });
    load_tile_sw128<BQ_ROWS, DV, 128>(sm + BQ_ROWS * DK * 2, dO, nrows, [&](int r) { return qoff(r) * DV; });
    cp_async_commit();

    int vis[2];
    i64 qrow[2];
    bool valid[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = row0 + gr + 8 * i;
        valid[i] = r < nrows;
        vis[i] = valid[i] ? bw_cmp_visible(t0 + r / G) : 0;
        qrow[i] = valid[i] ? qoff(r) : 0;
    }
    auto for_tiles = [&](auto fn) {
        int c = 0;
        bw_wg_pipeline(
            sm + BW_WG_Q_BYTES, kc, vc, g,
            [&](BwTile& t) {
                if (c >= ncmp) return false;
                t.row = cstart + c;
                t.k0 = c;
                t.nk = min(KT, ncmp - c);
                t.chose = 0;
                c += KT;
                return true;
            },
            [&](const BwTile& t, int (&lo)[2], int (&hi)[2]) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    lo[i] = 0;
                    hi[i] = min(max(vis[i] - t.k0, 0), t.nk);
                }
            },
            fn);
    };
    bw_wg_rows_dq<false>(sm, qrow, valid, gate, lse_in, dg_in, dq_out, for_tiles);
}
#endif

// items[b] = (seq start, seq len, c0, cstart, p0, np, slot, 0): the 64 compressed tokens
// [c0, c0 + 64) of a sequence against the positions [tlo + p0, tlo + p0 + np) (tlo: the first
// position that sees token c0). A key tile's positions are cut into at most a few chunks so that
// the tiles of early tokens (seen by every later position) do not outlast the others; slot < 0:
// the only chunk, written to dKcmp/dVcmp directly; else a partial sum in slot `slot`.
extern "C" __global__ void __launch_bounds__(128 * BW_KM_KW) cmp_bwd_dkdv(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const float* __restrict__ lse,
    const float* __restrict__ dg, const int4* __restrict__ items, float* __restrict__ dkc,
    float* __restrict__ dvc, float* __restrict__ pk, float* __restrict__ pv) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int4 it = items[2 * blockIdx.x], it2 = items[2 * blockIdx.x + 1];
    const int start = it.x, len = it.y, c0 = it.z, cstart = it.w;
    const int p0 = it2.x, np = it2.y, slot = it2.z;
    const int g = blockIdx.y;
    if (blockDim.x != 128 * BW_KM_KW) __trap();   // the host (BwdSmem::km_threads) disagrees
    const int ncmp_seq = len >= CMP_L ? (len - CMP_L) / CMP_D + 1 : 0;
    const int nk = min(BW_KM_KEYS, ncmp_seq - c0);
    const int tlo = c0 * CMP_D + CMP_L - 1 + p0;
    float dk[DK / 8][4], dv[DV / 8][4];
    bw_zero<DK>(dk);
    bw_zero<DV>(dv);
    auto tok_of = [&](int p) { return start + tlo + p; };
    auto t_of = [&](int tok) { return tok - start; };
    auto ok = [&](int key, int t) { return key < nk && (c0 + key) * CMP_D + CMP_L - 1 <= t; };
#if BW_WG
    unsigned char* sm = align1024(smem);
    bw_wg_load_kv<BW_KM_KW>(sm, kc, vc, (i64)(cstart + c0), g, nk);
    bw_wg_dkdv_rows<BW_KM_KW>(sm, q, dO, lse, dg, gate, g, np * G, tok_of, t_of, ok, dk, dv);
#else
    bw_load_kv(smem, kc, vc, (i64)(cstart + c0), g, nk);
    bw_dkdv_rows(smem, q, dO, lse, dg, gate, g, np * G, tok_of, t_of, ok, dk, dv);
#endif
    cp_async_wait_all();
    if (slot < 0) {
        bw_store_kv(
            dk, dv, nk, SCALE_NAT, [&](int key) { return dkc + ((i64)(cstart + c0 + key) * HKV + g) * DK; },
            [&](int key) { return dvc + ((i64)(cstart + c0 + key) * HKV + g) * DV; });
    } else {
        const i64 at = ((i64)slot * HKV + g) * BW_KM_KEYS;
        bw_store_kv(
            dk, dv, nk, SCALE_NAT, [&](int key) { return pk + (at + key) * DK; },
            [&](int key) { return pv + (at + key) * DV; });
    }
}

// items[b] = (first compressed token, nk, first slot, chunks) of a key tile cut into chunks:
// adds the chunks' partial sums in chunk order.
extern "C" __global__ void cmp_dkdv_reduce(const int4* __restrict__ items, const float* __restrict__ pk,
                                           const float* __restrict__ pv, float* __restrict__ dkc,
                                           float* __restrict__ dvc) {
    const int4 it = items[blockIdx.x];
    const int g = blockIdx.y;
    for (int e = threadIdx.x; e < it.y * (DK + DV); e += blockDim.x) {
        const int key = e / (DK + DV), c = e % (DK + DV);
        float acc = 0.f;
        if (c < DK) {
            for (int k = 0; k < it.w; ++k) acc += pk[(((i64)(it.z + k) * HKV + g) * BW_KM_KEYS + key) * DK + c];
            dkc[((i64)(it.x + key) * HKV + g) * DK + c] = acc;
        } else {
            for (int k = 0; k < it.w; ++k) acc += pv[(((i64)(it.z + k) * HKV + g) * BW_KM_KEYS + key) * DV + c - DK];
            dvc[((i64)(it.x + key) * HKV + g) * DV + c - DK] = acc;
        }
    }
}

// seqs[b] = (start, len, cstart, *); largest b with seqs[b].x <= tok.
__device__ __forceinline__ int bw_seq_of(const int4* __restrict__ seqs, int nseq, int tok) {
    int lo = 0, hi = nseq - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (seqs[mid].x <= tok) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// One thread per (raw token, KV head, 4-element chunk of dk or dv).
extern "C" __global__ void cmp_mean_bwd(const float* __restrict__ dkc, const float* __restrict__ dvc,
                                        const int4* __restrict__ seqs, int nseq, int ntok,
                                        float* __restrict__ dk, float* __restrict__ dv) {
    constexpr int CK = DK / 4, CV = DV / 4;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)ntok * HKV * (CK + CV)) return;
    const int c = (int)(idx % (CK + CV));
    const i64 rest = idx / (CK + CV);
    const int g = (int)(rest % HKV);
    const int tok = (int)(rest / HKV);
    const int4 sq = seqs[bw_seq_of(seqs, nseq, tok)];
    const int s = tok - sq.x;
    const int ncmp = sq.y >= CMP_L ? (sq.y - CMP_L) / CMP_D + 1 : 0;
    const int ilo = s >= CMP_L ? (s - CMP_L + CMP_D) / CMP_D : 0;   // ceil((s - l + 1) / d)
    const int ihi = min(ncmp - 1, s / CMP_D);
    const bool is_k = c < CK;
    const int D = is_k ? DK : DV;
    const int off = (is_k ? c : c - CK) * 4;
    const float* src = is_k ? dkc : dvc;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i = ilo; i <= ihi; ++i) {
        const float4 x = *(const float4*)(src + ((i64)(sq.z + i) * HKV + g) * D + off);
        a.x += x.x;
        a.y += x.y;
        a.z += x.z;
        a.w += x.w;
    }
    const float inv = 1.f / (float)CMP_L;
    a.x *= inv;
    a.y *= inv;
    a.z *= inv;
    a.w *= inv;
    *(float4*)((is_k ? dk : dv) + ((i64)tok * HKV + g) * D + off) = a;
}

extern "C" __global__ void __launch_bounds__(128) cmp_bwd_dq(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const int4* __restrict__ items,
    float* __restrict__ lse_out, float* __restrict__ dg_out, float* __restrict__ dq_out) {
    cmp_bwd_dq_body<false>(q, kc, vc, dO, gate, items, lse_out, dg_out, dq_out);
}
// with the forward's saved lse and the gate gradients of bwd_gate_dot (dg_out is read)
extern "C" __global__ void __launch_bounds__(128) cmp_bwd_dq_saved(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    const bf16_t* __restrict__ dO, const float* __restrict__ gate, const int4* __restrict__ items,
    float* __restrict__ lse_out, float* __restrict__ dg_out, float* __restrict__ dq_out) {
#if BW_WG_DQ
    cmp_bwd_dq_wg(q, kc, vc, dO, gate, items, lse_out, dg_out, dq_out);
#else
    cmp_bwd_dq_body<true>(q, kc, vc, dO, gate, items, lse_out, dg_out, dq_out);
#endif
}

// dg[row] = do[row] . o_b[row] for `rows` rows (o_b: the branch output the forward saved, bf16).
// One warp per row, 4 elements per lane and step.
extern "C" __global__ void bwd_gate_dot(const bf16_t* __restrict__ dO, const bf16_t* __restrict__ ob, i64 rows,
                                        float* __restrict__ dg) {
    const i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float acc = 0.f;
    for (int c = lane * 4; c < DV; c += 128) {
        const uint2 a = *(const uint2*)(dO + row * DV + c), b = *(const uint2*)(ob + row * DV + c);
        acc += bf16x2_lo(a.x) * bf16x2_lo(b.x) + bf16x2_hi(a.x) * bf16x2_hi(b.x) +
               bf16x2_lo(a.y) * bf16x2_lo(b.y) + bf16x2_hi(a.y) * bf16x2_hi(b.y);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
    if (lane == 0) dg[row] = acc;
}
