//! Selection branch (SPEC.md, "Selection branch"): block importance from the compressed
//! probabilities (paper Eq. 8-10, read as overlap weights), the group's top-n with forced
//! blocks, the selected blocks' attention, and the inverse index (block -> queries that chose
//! it) of the backward.
//!
//! Importance and top-n are streaming: one token's scores (`sel_admissible(t)` floats) are
//! built from its `G` probability rows, consumed by an insertion top-n of size `n`, and
//! dropped; memory stays O(T / l') per thread.

use super::attend::Seg;
use super::thin::{self, ThinScratch};
use super::tile::MatRef;
use super::{kv_rows, Dims};
use crate::blocks;

/// Eq. 9-10 for the query at `t`: `scores[j] = sum_hh sum_i P[hh, i] * overlap(i, j) / d` over
/// the `G` probability rows, `P[hh, i] = probs[hh * hs + i * ks]`, `i < nvis`, for every
/// admissible block `j`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn importance(
    dims: &Dims,
    t: usize,
    probs: &[f32],
    hs: usize,
    ks: usize,
    nvis: usize,
    psum: &mut Vec<f32>,
    scores: &mut Vec<f32>,
) {
    let nadm = blocks::sel_admissible(t, dims.lp);
    scores.clear();
    scores.resize(nadm, 0.0);
    if nvis == 0 {
        return;
    }
    // Sum the group's heads first (Eq. 10), then spread each compressed block over the (at
    // most two, since l <= l') selection blocks it overlaps (Eq. 9).
    psum.clear();
    if ks == 1 {
        psum.extend_from_slice(&probs[..nvis]);
        for hh in 1..dims.g {
            for (a, p) in psum.iter_mut().zip(&probs[hh * hs..hh * hs + nvis]) {
                *a += p;
            }
        }
    } else {
        // Eight keys at a time, each still summed over the heads in order (the same values
        // as one key at a time), as eight independent chains instead of one.
        psum.resize(nvis, 0.0);
        let n8 = nvis / 8 * 8;
        for (i, out) in (0..n8).step_by(8).zip(psum.chunks_exact_mut(8)) {
            let mut acc = [0.0f32; 8];
            for (k, a) in acc.iter_mut().enumerate() {
                *a = probs[(i + k) * ks];
            }
            for hh in 1..dims.g {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a += probs[(i + k) * ks + hh * hs];
                }
            }
            out.copy_from_slice(&acc);
        }
        for (i, out) in psum.iter_mut().enumerate().skip(n8) {
            let row = &probs[i * ks..];
            let mut a = row[0];
            for hh in 1..dims.g {
                a += row[hh * hs];
            }
            *out = a;
        }
    }
    spread(dims, t, psum, scores);
}

/// Eq. 9 from the group-summed probabilities `psum[i]` of the compressed blocks visible at
/// `t`: `scores[j]` (`sel_admissible(t)` of them, zeroed first) `= sum_i psum[i] *
/// overlap(i, j) / d`.
pub(crate) fn spread(dims: &Dims, t: usize, psum: &[f32], scores: &mut Vec<f32>) {
    let nadm = blocks::sel_admissible(t, dims.lp);
    scores.clear();
    scores.resize(nadm, 0.0);
    let (l, d, lp) = (dims.l, dims.d, dims.lp);
    for (i, &p) in psum.iter().enumerate() {
        let a0 = i * d;
        let j0 = a0 / lp;
        let end0 = (j0 + 1) * lp;
        if a0 + l <= end0 {
            scores[j0] += p * (l / d) as f32;
        } else {
            let w0 = (end0 - a0) / d;
            scores[j0] += p * w0 as f32;
            scores[j0 + 1] += p * (l / d - w0) as f32;
        }
    }
}

/// Whether block `j` is forced for a query whose own block is `own`.
fn forced(dims: &Dims, j: usize, own: usize) -> bool {
    j < dims.n_init || (j <= own && j + dims.n_local > own)
}

/// Top-n of the query at `t` from its group scores (`scores.len() = sel_admissible(t)`):
/// forced blocks, then the highest-scoring others (ties to the lower index); written ascending
/// into `out` (`[n]`), padded with -1.
pub(crate) fn top_n(dims: &Dims, scores: &[f32], best: &mut Vec<(f32, usize)>, out: &mut [i32]) {
    let nadm = scores.len();
    let own = nadm - 1;
    out.fill(-1);
    if nadm <= dims.n {
        for (o, j) in out.iter_mut().zip(0..nadm) {
            *o = j as i32;
        }
        return;
    }
    let nforced = (0..nadm).filter(|&j| forced(dims, j, own)).count();
    let slots = dims.n - nforced;
    // `best` is sorted by (score desc, index asc); candidates arrive in ascending index, so a
    // newcomer equal to an incumbent never displaces it.
    best.clear();
    if slots > 0 {
        for (j, &s) in scores.iter().enumerate() {
            if forced(dims, j, own) {
                continue;
            }
            if best.len() == slots {
                if s <= best[slots - 1].0 {
                    continue;
                }
                best.pop();
            }
            let pos = best.partition_point(|&(b, _)| b >= s);
            best.insert(pos, (s, j));
        }
    }
    let mut k = 0;
    for j in (0..nadm).filter(|&j| forced(dims, j, own)) {
        out[k] = j as i32;
        k += 1;
    }
    for &(_, j) in best.iter() {
        out[k] = j as i32;
        k += 1;
    }
    out[..k].sort_unstable();
}

/// Runs of consecutive selected blocks as token ranges `[a, e)` of the sequence, clipped to
/// `t + 1` (token-level causal mask inside the query's own block).
pub(crate) fn runs(lp: usize, t: usize, sel: &[i32], out: &mut Vec<(usize, usize)>) {
    out.clear();
    for &j in sel.iter().take_while(|&&j| j >= 0) {
        let (a, e) = (j as usize * lp, ((j as usize + 1) * lp).min(t + 1));
        match out.last_mut() {
            Some(last) if last.1 == a => last.1 = e,
            _ => out.push((a, e)),
        }
    }
}

/// The key/value segments of the runs (head `g` of the sequence starting at packed `s0`).
pub(crate) fn segments<'a>(
    dims: &Dims,
    k: &'a [f32],
    v: &'a [f32],
    s0: usize,
    g: usize,
    runs: &[(usize, usize)],
    out: &mut Vec<Seg<'a>>,
) {
    out.clear();
    for &(a, e) in runs {
        out.push(Seg {
            k: kv_rows(k, dims.hkv, dims.dk, g, s0 + a, e - a),
            v: kv_rows(v, dims.hkv, dims.dv, g, s0 + a, e - a),
        });
    }
}

/// Forward of the branch for the `G` rows of one token: every row sees every selected key
/// (the thin, pack-free kernel of [`thin`]).
pub(crate) fn forward_token(
    q: MatRef<'_>,
    segs: &[Seg<'_>],
    scr: &mut ThinScratch,
    o: &mut [f32],
    lse: &mut [f32],
) {
    thin::forward(q, segs, None, scr, o, lse, false);
}

/// Inverse index of the selection: for each (KV head, sequence, block) the packed tokens that
/// selected it, ascending. CSR layout over `key = g * nblk_total + blk_off[b] + j`.
pub(crate) struct InverseIndex {
    /// `blk_off[b]`: first block id of sequence `b` (len `B + 1`).
    pub blk_off: Vec<usize>,
    /// `start[key]..start[key + 1]` index `tokens`.
    pub start: Vec<usize>,
    /// Sequence-relative token positions.
    pub tokens: Vec<u32>,
}

impl InverseIndex {
    /// Counting sort of `sel_idx` (`[N, HKV, n]`) in token order (deterministic).
    pub fn build(dims: &Dims, cu: &[usize], sel: &[i32]) -> Self {
        let mut blk_off = vec![0usize];
        for w in cu.windows(2) {
            blk_off.push(blk_off.last().unwrap() + (w[1] - w[0]).div_ceil(dims.lp));
        }
        let nblk = *blk_off.last().unwrap();
        let keys = dims.hkv * nblk;
        let mut start = vec![0usize; keys + 1];
        let each = |f: &mut dyn FnMut(usize, usize)| {
            for (b, w) in cu.windows(2).enumerate() {
                for i in w[0]..w[1] {
                    for g in 0..dims.hkv {
                        let row = &sel[(i * dims.hkv + g) * dims.n..][..dims.n];
                        for &j in row.iter().take_while(|&&j| j >= 0) {
                            f(g * nblk + blk_off[b] + j as usize, i - w[0]);
                        }
                    }
                }
            }
        };
        each(&mut |key, _| start[key + 1] += 1);
        for k in 0..keys {
            start[k + 1] += start[k];
        }
        let mut fill = start.clone();
        let mut tokens = vec![0u32; start[keys]];
        each(&mut |key, t| {
            tokens[fill[key]] = t as u32;
            fill[key] += 1;
        });
        InverseIndex {
            blk_off,
            start,
            tokens,
        }
    }

    pub fn nblk(&self) -> usize {
        *self.blk_off.last().unwrap()
    }

    /// Tokens of sequence `b` that selected block `j` for KV head `g`.
    pub fn queries(&self, g: usize, b: usize, j: usize) -> &[u32] {
        let key = g * self.nblk() + self.blk_off[b] + j;
        &self.tokens[self.start[key]..self.start[key + 1]]
    }
}
