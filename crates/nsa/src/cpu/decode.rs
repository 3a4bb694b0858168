//! Decoding on f32 (SPEC.md, "Decoding"), with the storage of [`crate::cache`]: each new token
//! is appended to its sequence's cache (raw selection/window K/V, the rolling buffer of the last
//! `l` compression-branch tokens, and a new compressed K/V from this module's `phi` whenever a
//! compression block completes), then its query reads the cache through the same tile kernels
//! as the forward: one `[G, D]` matrix per KV group against the visible compressed tokens, the
//! runs of selected blocks and the window. Same contract as [`crate::reference::decode`].
//!
//! ```
//! use nsa::{cache::DecodeCache, cpu, NsaConfig, NsaInputs, PhiParams};
//!
//! let cfg = NsaConfig::builder().heads(4).kv_heads(2).cmp_block(8).cmp_stride(4)
//!     .sel_block(16).sel_count(3).window(32).build()?;
//! let phi = PhiParams::mean();
//! // Two sequences of 101 and 38 tokens (dk = dv = 16): all but the last token are the prompt,
//! // the last one is decoded in one batched step.
//! let x = NsaInputs::random(&cfg, &[101, 38], 16, 16, false, 1);
//! let prompt = |b: usize, len: usize| {
//!     let first = x.cu_seqlens[b];
//!     x.gather(&(first..first + len).collect::<Vec<_>>(), vec![0, len])
//! };
//! let mut cache = DecodeCache::<f32>::new(&cfg, 2, 16, 16)?;
//! cpu::decode::prefill(&cfg, &mut cache, 0, &prompt(0, 100), &phi)?;
//! cpu::decode::prefill(&cfg, &mut cache, 1, &prompt(1, 37), &phi)?;
//! let last_tokens = x.gather(&[100, 138], vec![0, 1, 2]);
//! let rows = cpu::decode::step(&cfg, &mut cache, &last_tokens, &phi)?; // o [2, HQ, dv]
//!
//! // Each step row equals the last row of a forward over its whole sequence.
//! let row = 4 * 16; // HQ * dv
//! for b in 0..2 {
//!     let full = cpu::forward(&cfg, &x.sequence(b), &phi)?;
//!     let last = &full.o[full.o.len() - row..];
//!     assert!(nsa::testing::rel_rms(&rows.o[b * row..(b + 1) * row], last) < 1e-5);
//! }
//! # Ok::<(), nsa::NsaError>(())
//! ```

use super::attend::Seg;
use super::phi::PhiF32;
use super::thin::{self, ThinScratch};
use super::tile::{ensure, exp1, MatRef};
use super::{combine, kv_rows, select, window, Dims};
use crate::blocks;
use crate::cache::{BlockCompressor, DecodeCache, KvPart, SeqCache, TokenKv};
use crate::config::NsaConfig;
use crate::error::{NsaError, Result};
use crate::inputs::{NsaInputs, NsaOutput, PhiParams};
use rayon::prelude::*;

/// The f32 `phi` pair as a [`BlockCompressor`] for the cache.
#[derive(Debug, Clone, Copy)]
pub struct CpuCompressor<'a> {
    k: PhiF32<'a>,
    v: PhiF32<'a>,
}

impl<'a> CpuCompressor<'a> {
    /// The `phi` of K (`D = dk`) and V (`D = dv`).
    pub fn new(cfg: &NsaConfig, phi: &'a PhiParams<f32>, dk: usize, dv: usize) -> Self {
        let (k, v) = super::phi::phis(cfg, phi, dk, dv);
        CpuCompressor { k, v }
    }
}

impl BlockCompressor<f32> for CpuCompressor<'_> {
    fn compress(&self, part: KvPart, kv_head: usize, block: &[f32], out: &mut [f32]) {
        match part {
            KvPart::Key => self.k.forward_block(kv_head, block, out),
            KvPart::Value => self.v.forward_block(kv_head, block, out),
        }
    }
}

/// Per-thread scratch of a decode row.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    thin: ThinScratch,
    ob: [Vec<f32>; 3],
    lse: Vec<f32>,
    runs: Vec<(usize, usize)>,
    psum: Vec<f32>,
    scores: Vec<f32>,
    best: Vec<(f32, usize)>,
}

/// The output rows of KV group `g` (`o` `[G, dv]`, `sel` `[n]`) for the last token of `seq`,
/// with the token's query row `q` (`[HQ, dk]`) and gates (`[HQ]` each).
#[allow(clippy::too_many_arguments)]
fn group_row(
    dims: &Dims,
    seq: &SeqCache<f32>,
    q: &[f32],
    gates: [&[f32]; 3],
    g: usize,
    o: &mut [f32],
    sel: &mut [i32],
    scr: &mut Scratch,
) {
    let (hkv, gs, dk, dv, n) = (dims.hkv, dims.g, dims.dk, dims.dv, dims.n);
    let t = seq.len() - 1;
    let Scratch {
        q: qs,
        thin,
        ob,
        lse,
        runs,
        psum,
        scores,
        best,
    } = scr;
    for v in ob.iter_mut() {
        ensure(v, gs * dv);
    }
    ensure(lse, gs);
    ensure(qs, gs * dk);
    for (d, &v) in qs.iter_mut().zip(&q[g * gs * dk..(g + 1) * gs * dk]) {
        *d = dims.scale * v;
    }
    let qm = MatRef::rows(qs, gs, dk);
    let [oc, os, ow] = ob;

    // Compression branch over every compressed token made so far (all visible to t).
    let nvis = seq.num_cmp();
    let cseg = Seg {
        k: kv_rows(seq.k_cmp(), hkv, dk, g, 0, nvis),
        v: kv_rows(seq.v_cmp(), hkv, dv, g, 0, nvis),
    };
    thin::forward(qm, &[cseg], None, thin, oc, lse, true);

    // Selection.
    let (p, w) = thin.probs();
    select::importance(dims, t, p, 1, w, nvis, psum, scores);
    select::top_n(dims, scores, best, sel);
    select::runs(dims.lp, t, sel, runs);
    let mut segs: Vec<Seg<'_>> = Vec::with_capacity(n);
    select::segments(dims, seq.k_slc(), seq.v_slc(), 0, g, runs, &mut segs);
    select::forward_token(qm, &segs, thin, os, lse);

    // Window.
    let (k0, k1) = window::span(dims, t, t + 1);
    let wseg = Seg {
        k: kv_rows(seq.k_win(), hkv, dk, g, k0, k1 - k0),
        v: kv_rows(seq.v_win(), hkv, dv, g, k0, k1 - k0),
    };
    thin::forward(qm, &[wseg], None, thin, ow, lse, false);

    let heads = g * gs..(g + 1) * gs;
    combine::mix(
        [
            &gates[0][heads.clone()],
            &gates[1][heads.clone()],
            &gates[2][heads],
        ],
        [&ob[0][..gs * dv], &ob[1][..gs * dv], &ob[2][..gs * dv]],
        o,
        dv,
    );
}

/// The gates of packed token `i`, `[HQ]` each.
fn gates_of(x: &NsaInputs<f32>, hq: usize, i: usize) -> [&[f32]; 3] {
    [
        &x.g_cmp[i * hq..(i + 1) * hq],
        &x.g_slc[i * hq..(i + 1) * hq],
        &x.g_win[i * hq..(i + 1) * hq],
    ]
}

/// Appends the tokens of `x` (one sequence) to sequence `b` of the cache and returns their
/// output rows (`o` `[len, HQ, dv]`, `sel_idx` `[len, HKV, n]`), equal to the rows of a forward
/// over the whole prefix. An empty cache runs the blocked [`super::forward`] on `x`; a
/// non-empty one (chunked prefill) decodes the tokens one by one. Errors as the reference's.
pub fn prefill(
    cfg: &NsaConfig,
    cache: &mut DecodeCache<f32>,
    b: usize,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<NsaOutput<f32>> {
    cache.check_prefill(cfg, b, x, phi)?;
    let dims = Dims::new(cfg, x.dk, x.dv);
    let comp = CpuCompressor::new(cfg, phi, x.dk, x.dv);
    let len = x.num_tokens();
    let seq = &mut cache.seqs[b];
    seq.reserve(len);
    if seq.is_empty() {
        let out = super::forward(cfg, x, phi)?;
        for i in 0..len {
            seq.append(TokenKv::from_inputs(x, dims.hkv, i), &comp)?;
        }
        return Ok(out);
    }
    let (hq, dk, dv, n) = (dims.hq, dims.dk, dims.dv, dims.n);
    let mut out = NsaOutput {
        o: vec![0.0; len * hq * dv],
        sel_idx: vec![-1; len * dims.hkv * n],
    };
    let mut scr = Scratch::default();
    for i in 0..len {
        seq.append(TokenKv::from_inputs(x, dims.hkv, i), &comp)?;
        let o_row = &mut out.o[i * hq * dv..(i + 1) * hq * dv];
        let s_row = &mut out.sel_idx[i * dims.hkv * n..(i + 1) * dims.hkv * n];
        for (g, (o, sel)) in o_row
            .chunks_mut(dims.g * dv)
            .zip(s_row.chunks_mut(n))
            .enumerate()
        {
            group_row(
                &dims,
                seq,
                &x.q[i * hq * dk..(i + 1) * hq * dk],
                gates_of(x, hq, i),
                g,
                o,
                sel,
                &mut scr,
            );
        }
    }
    Ok(out)
}

/// Keys per chunk of a decode step's split (flash-decoding): compressed tokens per task of the
/// compression branch, selected or window tokens per task of the other two.
pub const DECODE_SPLIT: usize = 128;
/// (Sequence, KV group) pairs from which the per-pair phases of a step run in parallel.
const PAR_PAIRS: usize = 2;

/// One decode step for the whole batch: `x` holds one token per sequence (`cu_seqlens = [0, 1,
/// .., B]`); token `b` is appended to sequence `b` (any length, possibly empty) and the rows
/// `o` `[B, HQ, dv]`, `sel_idx` `[B, HKV, n]` are returned.
///
/// Parallel over (sequence, KV group, key chunk of [`DECODE_SPLIT`] keys), so one long
/// sequence with one KV head still uses every thread (flash-decoding): each chunk gives a
/// normalised partial output and its log-sum-exp, merged per branch in chunk order (bitwise
/// identical for any thread count). See [`step_split`].
pub fn step(
    cfg: &NsaConfig,
    cache: &mut DecodeCache<f32>,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<NsaOutput<f32>> {
    step_split(cfg, cache, x, phi, DECODE_SPLIT)
}

/// [`step`] with `split` keys per chunk (any `split >= 1` gives the same result within
/// rounding; tests use small ones to exercise the merge).
pub fn step_split(
    cfg: &NsaConfig,
    cache: &mut DecodeCache<f32>,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
    split: usize,
) -> Result<NsaOutput<f32>> {
    cache.check_step(cfg, x, phi)?;
    if split == 0 {
        return Err(NsaError::Decode("decode split of 0 keys".into()));
    }
    let batch = cache.batch();
    let dims = Dims::new(cfg, x.dk, x.dv);
    let comp = CpuCompressor::new(cfg, phi, x.dk, x.dv);
    for (b, seq) in cache.seqs.iter_mut().enumerate() {
        seq.append(TokenKv::from_inputs(x, dims.hkv, b), &comp)?;
    }
    let (hq, hkv, gs, dk, dv, n) = (dims.hq, dims.hkv, dims.g, dims.dk, dims.dv, dims.n);
    let seqs = &cache.seqs;
    let npairs = batch * hkv;
    // The scaled query rows of pair (b, g): `[G, dk]`.
    let qrows = |p: usize| -> Vec<f32> {
        let (b, g) = (p / hkv, p % hkv);
        x.q[(b * hq + g * gs) * dk..(b * hq + (g + 1) * gs) * dk]
            .iter()
            .map(|&v| dims.scale * v)
            .collect()
    };
    // Packed once per pair (`Q^T`, the heads as lanes) for all its chunks.
    let qts: Vec<Vec<f32>> = (0..npairs)
        .map(|p| {
            let q = qrows(p);
            let mut qt = Vec::new();
            thin::pack_query(MatRef::rows(&q, gs, dk), &mut qt);
            qt
        })
        .collect();

    // 1. Compression branch, split over chunks of compressed tokens.
    let mut cjobs: Vec<(usize, usize, usize)> = Vec::new();
    for p in 0..npairs {
        let nvis = seqs[p / hkv].num_cmp();
        cjobs
            .extend((0..nvis.div_ceil(split)).map(|c| (p, c * split, ((c + 1) * split).min(nvis))));
    }
    let cparts: Vec<Partial> = cjobs
        .par_iter()
        .map_init(Scratch::default, |scr, &(p, i0, i1)| {
            let (seq, g) = (&seqs[p / hkv], p % hkv);
            let seg = Seg {
                k: kv_rows(seq.k_cmp(), hkv, dk, g, i0, i1 - i0),
                v: kv_rows(seq.v_cmp(), hkv, dv, g, i0, i1 - i0),
            };
            let mut part = Partial::new(gs, dv);
            thin::forward_packed(
                &qts[p],
                gs,
                &[seg],
                None,
                &mut scr.thin,
                &mut part.o,
                &mut part.lse,
                true,
            );
            let (probs, w) = scr.thin.probs();
            part.j0 = spread_lanes(&dims, i0, i1, probs, w, &mut part.p);
            part
        })
        .collect();

    // 2. Per pair: merge the compression chunks, importance, top-n; the selected runs.
    let mut out = NsaOutput {
        o: vec![0.0; batch * hq * dv],
        sel_idx: vec![-1; batch * hkv * n],
    };
    let mut first = vec![0usize; npairs + 1];
    for &(p, _, _) in &cjobs {
        first[p + 1] += 1;
    }
    for p in 0..npairs {
        first[p + 1] += first[p];
    }
    let mut o_cmp = vec![0.0f32; npairs * gs * dv];
    let select_pair = |scr: &mut Scratch, (p, (oc, sel)): (usize, (&mut [f32], &mut [i32]))| {
        let seq = &seqs[p / hkv];
        let t = seq.len() - 1;
        let nvis = seq.num_cmp();
        let parts = &cparts[first[p]..first[p + 1]];
        let lse = merge(parts, gs, dv, oc);
        // Eq. 9-10 from the chunks' per-lane block scores (made in the parallel phase from
        // their local probabilities): block `j` gets `sum_c sum_r s_c[j, r] e^{lse_c[r] -
        // lse[r]}` (fixed-order lane sums, chunks in order).
        let w = gs.div_ceil(8) * 8;
        let mut wts = vec![0.0f32; w];
        let scores = &mut scr.scores;
        scores.clear();
        scores.resize(blocks::sel_admissible(t, dims.lp), 0.0);
        for part in parts {
            for (r, (&lt, &lc)) in lse.iter().zip(&part.lse).enumerate() {
                wts[r] = if lt == f32::NEG_INFINITY {
                    0.0
                } else {
                    exp1(lc - lt)
                };
            }
            for (s, row) in scores[part.j0..].iter_mut().zip(part.p.chunks_exact(w)) {
                *s += lane_dot(row, &wts);
            }
        }
        debug_assert!(nvis == 0 || parts.len() == nvis.div_ceil(split));
        select::top_n(&dims, scores, &mut scr.best, sel);
        let mut r = Vec::new();
        select::runs(dims.lp, t, sel, &mut r);
        r
    };
    // Few pairs: inline (a parallel phase costs a round trip through the pool).
    let runs: Vec<Vec<(usize, usize)>> = if npairs >= PAR_PAIRS {
        o_cmp
            .par_chunks_mut(gs * dv)
            .zip(out.sel_idx.par_chunks_mut(n))
            .enumerate()
            .map_init(Scratch::default, |scr, a| select_pair(scr, a))
            .collect()
    } else {
        let mut scr = Scratch::default();
        o_cmp
            .chunks_mut(gs * dv)
            .zip(out.sel_idx.chunks_mut(n))
            .enumerate()
            .map(|a| select_pair(&mut scr, a))
            .collect()
    };

    // 3. Selected and window tokens, split over chunks of at most `split` tokens.
    // Job: (pair, branch 1 = slc / 2 = win, token ranges of the chunk).
    let mut ajobs: Vec<AttnJob> = Vec::new();
    for p in 0..npairs {
        let t = seqs[p / hkv].len() - 1;
        let (k0, k1) = window::span(&dims, t, t + 1);
        for (branch, list) in [(1usize, runs[p].clone()), (2usize, vec![(k0, k1)])] {
            let mut cur: Vec<(usize, usize)> = Vec::new();
            let mut len = 0;
            for (mut a, e) in list {
                while a < e {
                    let take = (e - a).min(split - len);
                    cur.push((a, a + take));
                    a += take;
                    len += take;
                    if len == split {
                        ajobs.push((p, branch, std::mem::take(&mut cur)));
                        len = 0;
                    }
                }
            }
            if len > 0 {
                ajobs.push((p, branch, cur));
            }
        }
    }
    let aparts: Vec<Partial> = ajobs
        .par_iter()
        .map_init(Scratch::default, |scr, (p, branch, list)| {
            let p = *p;
            let (seq, g) = (&seqs[p / hkv], p % hkv);
            let (k, v) = if *branch == 1 {
                (seq.k_slc(), seq.v_slc())
            } else {
                (seq.k_win(), seq.v_win())
            };
            let segs: Vec<Seg<'_>> = list
                .iter()
                .map(|&(a, e)| Seg {
                    k: kv_rows(k, hkv, dk, g, a, e - a),
                    v: kv_rows(v, hkv, dv, g, a, e - a),
                })
                .collect();
            let mut part = Partial::new(gs, dv);
            thin::forward_packed(
                &qts[p],
                gs,
                &segs,
                None,
                &mut scr.thin,
                &mut part.o,
                &mut part.lse,
                false,
            );
            part
        })
        .collect();

    // 4. Merge per (pair, branch) in chunk order and mix the gates.
    let mut bounds = vec![(0usize, 0usize); npairs * 2];
    for (i, (p, branch, _)) in ajobs.iter().enumerate() {
        let e = &mut bounds[p * 2 + branch - 1];
        if e.1 == 0 {
            e.0 = i;
        }
        e.1 = i + 1;
    }
    let mix_pair = |(p, o): (usize, &mut [f32])| {
        let (b, g) = (p / hkv, p % hkv);
        let mut os = vec![0.0f32; gs * dv];
        let mut ow = vec![0.0f32; gs * dv];
        for (k, dst) in [(0usize, &mut os), (1, &mut ow)] {
            let (a, e) = bounds[p * 2 + k];
            merge(&aparts[a..e], gs, dv, dst);
        }
        let heads = g * gs..(g + 1) * gs;
        let gates = gates_of(x, hq, b);
        combine::mix(
            [
                &gates[0][heads.clone()],
                &gates[1][heads.clone()],
                &gates[2][heads],
            ],
            [&o_cmp[p * gs * dv..(p + 1) * gs * dv], &os, &ow],
            o,
            dv,
        );
    };
    if npairs >= PAR_PAIRS {
        out.o.par_chunks_mut(gs * dv).enumerate().for_each(mix_pair);
    } else {
        out.o.chunks_mut(gs * dv).enumerate().for_each(mix_pair);
    }
    Ok(out)
}

/// `sum_r x[r] y[r]` over a multiple-of-8 lane row, in a fixed order (8 partial sums, then
/// a fixed tree) so that it vectorises.
#[inline]
fn lane_dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (a, b) in x.chunks_exact(8).zip(y.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Eq. 9 per lane for the compressed tokens `i0..i1` (probabilities `p` `[i1 - i0, w]`):
/// `out[(j - j0) * w + r] = sum_i p[i, r] overlap(i, j) / d` for the selection blocks `j`
/// they overlap (in `i` order, as [`select::spread`]); returns `j0`.
fn spread_lanes(
    dims: &Dims,
    i0: usize,
    i1: usize,
    p: &[f32],
    w: usize,
    out: &mut Vec<f32>,
) -> usize {
    let (l, d, lp) = (dims.l, dims.d, dims.lp);
    out.clear();
    if i1 <= i0 {
        return 0;
    }
    let j0 = i0 * d / lp;
    let j1 = ((i1 - 1) * d + l - 1) / lp + 1;
    out.resize((j1 - j0) * w, 0.0);
    let mut add = |j: usize, row: &[f32], f: f32| {
        for (o, &x) in out[(j - j0) * w..(j - j0 + 1) * w].iter_mut().zip(row) {
            *o += x * f;
        }
    };
    for (i, row) in (i0..i1).zip(p.chunks_exact(w)) {
        let a0 = i * d;
        let ja = a0 / lp;
        let end0 = (ja + 1) * lp;
        if a0 + l <= end0 {
            add(ja, row, (l / d) as f32);
        } else {
            let w0 = (end0 - a0) / d;
            add(ja, row, w0 as f32);
            add(ja + 1, row, (l / d - w0) as f32);
        }
    }
    j0
}

/// A decode attention task: (pair `b * HKV + g`, branch 1 = selected / 2 = window, token ranges).
type AttnJob = (usize, usize, Vec<(usize, usize)>);

/// A chunk's normalised attention output `[G, dv]`, its log-sum-exp `[G]` and (compression
/// branch) the per-lane Eq. 9 scores of the selection blocks `j0..` its compressed tokens
/// overlap, from its local probabilities (`[blocks, w]`, the rows as lanes).
struct Partial {
    o: Vec<f32>,
    lse: Vec<f32>,
    p: Vec<f32>,
    j0: usize,
}

impl Partial {
    fn new(gs: usize, dv: usize) -> Self {
        Partial {
            o: vec![0.0; gs * dv],
            lse: vec![0.0; gs],
            p: Vec::new(),
            j0: 0,
        }
    }
}

/// Merges chunk results in order: `lse = log sum_c e^{lse_c}`, `o = sum_c e^{lse_c - lse} o_c`
/// (rows with nothing visible keep `o = 0`, `lse = -inf`). Returns the merged `lse`.
fn merge(parts: &[Partial], gs: usize, dv: usize, o: &mut [f32]) -> Vec<f32> {
    o[..gs * dv].fill(0.0);
    let mut lse = vec![f32::NEG_INFINITY; gs];
    for (r, l) in lse.iter_mut().enumerate() {
        let m = parts
            .iter()
            .map(|p| p.lse[r])
            .fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            continue;
        }
        let sum: f32 = parts.iter().map(|p| exp1(p.lse[r] - m)).sum();
        *l = m + sum.ln();
        let dst = &mut o[r * dv..(r + 1) * dv];
        for p in parts {
            if p.lse[r] == f32::NEG_INFINITY {
                continue;
            }
            let w = exp1(p.lse[r] - *l);
            for (d, &v) in dst.iter_mut().zip(&p.o[r * dv..(r + 1) * dv]) {
                *d += w * v;
            }
        }
    }
    lse
}
