//! One attention tile: a few query rows against a list of key segments (SPEC.md, "Output":
//! each branch is ordinary softmax attention over its own key list).
//!
//! The query rows are already multiplied by the softmax scale, so `S = Q K^T` are the logits.
//! Segments are strided `[nk, D]` views straight into the key/value tensors (a range of tokens
//! of one KV head, a run of selected blocks, the compressed tokens), concatenated along the
//! key axis; row `r` sees the concatenated columns `ranges[r]`. All products are GEMMs; the
//! outputs are dense row-major scratch tiles.

use super::tile::{ensure, gemm, probs_and_dscores, MatMut, MatRef};

/// A key segment and its values (same number of rows).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg<'a> {
    /// `[nk, dk]`
    pub k: MatRef<'a>,
    /// `[nk, dv]`
    pub v: MatRef<'a>,
}

impl Seg<'_> {
    pub fn len(&self) -> usize {
        self.k.rows
    }
}

fn total_cols(segs: &[Seg<'_>]) -> usize {
    segs.iter().map(|s| s.len()).sum()
}

/// `S[:, off..off+nk] = Q @ K_seg^T` for every segment; `s` is `rows x ncols` row-major.
fn logits(q: MatRef<'_>, segs: &[Seg<'_>], s: &mut [f32], ncols: usize) {
    let mut off = 0;
    for seg in segs {
        let nk = seg.len();
        if nk > 0 {
            gemm(
                1.0,
                q,
                seg.k.t(),
                0.0,
                MatMut::new(&mut s[off..], q.rows, nk, ncols, 1),
            );
        }
        off += nk;
    }
}

/// `out (+)= alpha * M[:, seg cols] @ X_seg` summed over segments; `m` is `rows x ncols`.
/// `beta` applies to the first segment (0 overwrites `out`).
#[allow(clippy::too_many_arguments)]
fn times_segments(
    alpha: f32,
    m: &[f32],
    rows: usize,
    ncols: usize,
    segs: &[Seg<'_>],
    which_v: bool,
    beta: f32,
    out: &mut [f32],
    width: usize,
) {
    let mut off = 0;
    let mut first = true;
    for seg in segs {
        let nk = seg.len();
        if nk == 0 {
            continue;
        }
        let x = if which_v { seg.v } else { seg.k };
        let b = if first { beta } else { 1.0 };
        gemm(
            alpha,
            MatRef::new(&m[off..], rows, nk, ncols, 1),
            x,
            b,
            MatMut::rows(out, rows, width),
        );
        first = false;
        off += nk;
    }
    if first && beta == 0.0 {
        out[..rows * width].fill(0.0);
    }
}

/// Recomputes `P` and `dS = P * (dP - delta)` of a tile into `s` and `dp` (`rows x ncols`).
#[allow(clippy::too_many_arguments)]
fn recompute(
    q: MatRef<'_>,
    dob: MatRef<'_>,
    segs: &[Seg<'_>],
    ranges: &[(usize, usize)],
    lse: &[f32],
    delta: &[f32],
    s: &mut Vec<f32>,
    dp: &mut Vec<f32>,
) -> usize {
    let rows = q.rows;
    let ncols = total_cols(segs);
    ensure(s, rows * ncols);
    ensure(dp, rows * ncols);
    logits(q, segs, s, ncols);
    let mut off = 0;
    for seg in segs {
        let nk = seg.len();
        if nk > 0 {
            gemm(
                1.0,
                dob,
                seg.v.t(),
                0.0,
                MatMut::new(&mut dp[off..], rows, nk, ncols, 1),
            );
        }
        off += nk;
    }
    probs_and_dscores(s, dp, ncols, ncols, ranges, lse, delta);
    ncols
}

/// Query side of the backward: `dq (+)= scale * dS @ K` (`dq` is `rows x dk`; `beta` 0
/// overwrites). `dob` is the branch's upstream gradient (gate times `dO`), `delta[r] =
/// dot(dob_r, o_r)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_q(
    q: MatRef<'_>,
    dob: MatRef<'_>,
    segs: &[Seg<'_>],
    ranges: &[(usize, usize)],
    lse: &[f32],
    delta: &[f32],
    scale: f32,
    s: &mut Vec<f32>,
    dp: &mut Vec<f32>,
    dq: &mut [f32],
    beta: f32,
) {
    let rows = q.rows;
    let dk = q.cols;
    let ncols = recompute(q, dob, segs, ranges, lse, delta, s, dp);
    times_segments(scale, dp, rows, ncols, segs, false, beta, dq, dk);
}

/// Key side of the backward for one segment: `dk += dS^T @ Q` (Q holds the scale already)
/// and `dv += P^T @ dob`; `dk` is `nk x dk`, `dv` is `nk x dv`, both row-major.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_kv(
    q: MatRef<'_>,
    dob: MatRef<'_>,
    seg: Seg<'_>,
    ranges: &[(usize, usize)],
    lse: &[f32],
    delta: &[f32],
    s: &mut Vec<f32>,
    dp: &mut Vec<f32>,
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let rows = q.rows;
    let nk = seg.len();
    if rows == 0 || nk == 0 {
        return;
    }
    let ncols = recompute(
        q,
        dob,
        std::slice::from_ref(&seg),
        ranges,
        lse,
        delta,
        s,
        dp,
    );
    gemm(
        1.0,
        MatRef::rows(s, rows, ncols).t(),
        dob,
        1.0,
        MatMut::rows(dv, nk, dob.cols),
    );
    gemm(
        1.0,
        MatRef::rows(dp, rows, ncols).t(),
        q,
        1.0,
        MatMut::rows(dk, nk, q.cols),
    );
}

/// Gathers the rows of group `g` (heads `g*G .. g*G + G` of a `[N, heads, dim]` tensor) for the
/// sequence tokens `toks` of the sequence starting at packed token `s0`, times `scale`:
/// `[len * G, dim]`, row `k * G + hh` for the `k`-th token.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gather_rows(
    src: &[f32],
    heads: usize,
    gsize: usize,
    dim: usize,
    s0: usize,
    g: usize,
    toks: impl ExactSizeIterator<Item = usize>,
    out: &mut Vec<f32>,
    scale: f32,
) {
    let per = gsize * dim;
    ensure(out, toks.len() * per);
    for (k, t) in toks.enumerate() {
        let at = ((s0 + t) * heads + g * gsize) * dim;
        let dst = &mut out[k * per..(k + 1) * per];
        for (d, s) in dst.iter_mut().zip(&src[at..at + per]) {
            *d = scale * s;
        }
    }
}

/// Like [`gather_rows`] with a per-(token, head) factor (`gates`, `[N, HQ]`): the upstream
/// gradient of one branch, `gate * dO`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gather_gated(
    src: &[f32],
    gates: &[f32],
    heads: usize,
    gsize: usize,
    dim: usize,
    s0: usize,
    g: usize,
    toks: impl ExactSizeIterator<Item = usize>,
    out: &mut Vec<f32>,
) {
    ensure(out, toks.len() * gsize * dim);
    for (k, t) in toks.enumerate() {
        for hh in 0..gsize {
            let h = (s0 + t) * heads + g * gsize + hh;
            let gate = gates[h];
            let dst = &mut out[(k * gsize + hh) * dim..][..dim];
            for (d, s) in dst.iter_mut().zip(&src[h * dim..(h + 1) * dim]) {
                *d = gate * s;
            }
        }
    }
}

/// Gathers one value per (token, head) of group `g` (`[N, heads]` source).
pub(crate) fn gather_heads(
    src: &[f32],
    heads: usize,
    gsize: usize,
    s0: usize,
    g: usize,
    toks: impl ExactSizeIterator<Item = usize>,
    out: &mut Vec<f32>,
) {
    ensure(out, toks.len() * gsize);
    for (k, t) in toks.enumerate() {
        let at = (s0 + t) * heads + g * gsize;
        out[k * gsize..(k + 1) * gsize].copy_from_slice(&src[at..at + gsize]);
    }
}
