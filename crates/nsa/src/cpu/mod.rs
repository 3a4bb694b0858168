//! The fast f32 CPU path of NSA: the same function as [`crate::reference`] (SPEC.md), blocked,
//! multi-threaded with rayon. Thin tiles (a group's query rows against many keys) use the
//! pack-free register-blocked kernel of `micro` through `thin`; the wide tiles of the
//! backward's key-major passes use `matrixmultiply` GEMMs.
//!
//! # Shape of the computation
//!
//! The forward walks **tiles**: a few consecutive query tokens of one sequence (`64 / G` of
//! them, at least 1) with, for each KV group, the `G` query heads of the group as the rows of
//! one matrix, so every key/value block a group reads is read once for all its heads:
//!
//! 1. `window`: the sliding window, one key span for the whole tile with per-row ranges;
//! 2. `compress`: logits against the compressed keys visible to the tile, softmax (hard
//!    exclusion of invisible blocks, per-row ranges), `P @ Vcmp`; the probabilities stay in
//!    the tile's scratch;
//! 3. `select`: Eq. 9-10 importance of the selection blocks from those probabilities, then a
//!    streaming top-n per token: the scores of one token live only while it is chosen (O(T/l')
//!    scratch per thread, never a `[T, T/d]` tensor); then the selected blocks' attention per
//!    token, the `G` heads as the lanes of a thin tile reading the selected keys in place;
//! 4. `combine`: the gates.
//!
//! All three branches run in the transposed layout of `thin` (`S^T = K Q^T`, the tile's rows
//! as vector lanes), so no key or value is packed or copied.
//!
//! The backward ([`backward`]) is FlashAttention-2 shaped and free of data races: a query-major
//! pass computes `dq` (and the gates' gradients) per tile; key-major passes compute the key and
//! value gradients, each task owning a disjoint output block: chunks of compressed tokens, key
//! chunks of the window, and for the selection branch each selection block gathers the queries
//! that selected it through an inverse index (block -> queries, built by a counting sort in
//! token order). Hot blocks (the forced initial block is chosen by every query) are split into
//! fixed query ranges whose partial sums are added in a fixed order, so results are bitwise
//! identical for any number of threads. `phi` is then back-propagated by the `phi` module.
//!
//! Decoding ([`decode`]) uses [`crate::cache`] with this module's f32 `phi` and splits every
//! branch over key chunks (flash-decoding, merged in a fixed order); [`dense`] is the blocked
//! dense causal attention baseline.

mod attend;
mod backward;
mod combine;
mod compress;
pub mod decode;
pub mod dense;
mod forward;
mod micro;
mod phi;
mod select;
mod thin;
mod tile;
mod window;

use crate::config::NsaConfig;
use crate::error::{NsaError, Result};
use crate::inputs::{NsaGrads, NsaInputs, NsaOutput, PhiParams};

pub use backward::backward_saved;

/// What the forward keeps for the backward: per-branch outputs and log-sum-exps, the selected
/// blocks, and the compressed K/V. No probabilities (they are recomputed tile by tile).
#[derive(Debug, Clone)]
pub struct Saved {
    pub(crate) lay: phi::BlockLayout,
    pub(crate) kc: phi::Compressed,
    pub(crate) vc: phi::Compressed,
    /// Per-branch attention outputs before the gates, `[N, HQ, dv]` each (cmp, slc, win).
    pub(crate) o_branch: [Vec<f32>; 3],
    /// Per-branch log-sum-exp of the scaled logits, `[N, HQ]` each (`-inf`: nothing visible).
    pub(crate) lse: [Vec<f32>; 3],
    /// `[N, HKV, n]`, as in the output.
    pub(crate) sel_idx: Vec<i32>,
}

impl Saved {
    /// Log-sum-exp of each branch (`cmp`, `slc`, `win`), `[N, HQ]` each.
    pub fn lse(&self) -> &[Vec<f32>; 3] {
        &self.lse
    }

    /// Selected blocks `[N, HKV, n]`.
    pub fn sel_idx(&self) -> &[i32] {
        &self.sel_idx
    }
}

/// Sizes every kernel needs, from the configuration and the head dims.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub hq: usize,
    pub hkv: usize,
    /// GQA group size `G`.
    pub g: usize,
    pub dk: usize,
    pub dv: usize,
    /// Compression block `l` and stride `d`.
    pub l: usize,
    pub d: usize,
    /// Selection block `l'` and count `n`.
    pub lp: usize,
    pub n: usize,
    pub n_init: usize,
    pub n_local: usize,
    pub w: usize,
    pub scale: f32,
}

impl Dims {
    pub fn new(cfg: &NsaConfig, dk: usize, dv: usize) -> Self {
        Dims {
            hq: cfg.heads,
            hkv: cfg.kv_heads,
            g: cfg.group_size(),
            dk,
            dv,
            l: cfg.cmp_block,
            d: cfg.cmp_stride,
            lp: cfg.sel_block,
            n: cfg.sel_count,
            n_init: cfg.init_blocks,
            n_local: cfg.local_blocks,
            w: cfg.window,
            scale: cfg.softmax_scale(dk) as f32,
        }
    }

    /// Query tokens per tile: `64 / G` rows of each group's matrix, at least 1 token.
    pub fn tile_tokens(&self) -> usize {
        (64 / self.g).clamp(1, 64)
    }
}

/// `[ntok, D]` view of KV head `g` of a token-major `[*, HKV, D]` tensor, from token `tok0`.
pub(crate) fn kv_rows(
    x: &[f32],
    hkv: usize,
    dim: usize,
    g: usize,
    tok0: usize,
    ntok: usize,
) -> tile::MatRef<'_> {
    if ntok == 0 {
        return tile::MatRef::new(&x[..0], 0, dim, hkv * dim, 1);
    }
    tile::MatRef::new(&x[(tok0 * hkv + g) * dim..], ntok, dim, hkv * dim, 1)
}

/// `(b, t0, t1)` query tiles covering every sequence in packed order.
pub(crate) fn tiles(cu: &[usize], tq: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (b, w) in cu.windows(2).enumerate() {
        let len = w[1] - w[0];
        let mut t0 = 0;
        while t0 < len {
            let t1 = (t0 + tq).min(len);
            out.push((b, t0, t1));
            t0 = t1;
        }
    }
    out
}

/// Splits a `[N, per]` buffer into the rows of each tile (tiles in packed order).
pub(crate) fn split_tiles<'a, T>(
    mut buf: &'a mut [T],
    per: usize,
    tiles: &[(usize, usize, usize)],
) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(tiles.len());
    for &(_, t0, t1) in tiles {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut((t1 - t0) * per);
        out.push(head);
        buf = rest;
    }
    out
}

fn check(cfg: &NsaConfig, x: &NsaInputs<f32>, phi: &PhiParams<f32>) -> Result<()> {
    x.validate(cfg)?;
    phi.validate(cfg, x.dk, x.dv)
}

/// NSA forward on f32: `o` `[N, HQ, dv]` and `sel_idx` `[N, HKV, n]` (SPEC.md).
pub fn forward(
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<NsaOutput<f32>> {
    check(cfg, x, phi)?;
    Ok(forward::run(cfg, x, phi, false).0)
}

/// [`forward`] that also returns what [`backward_saved`] needs.
pub fn forward_saved(
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<(NsaOutput<f32>, Saved)> {
    check(cfg, x, phi)?;
    let (o, saved) = forward::run(cfg, x, phi, true);
    Ok((o, saved.expect("saved on request")))
}

/// NSA backward on f32 for the upstream gradient `d_o` (`[N, HQ, dv]`): runs the forward to
/// get its saved state, then [`backward_saved`]. Deterministic: bitwise identical results for
/// any thread count.
pub fn backward(
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
    d_o: &[f32],
) -> Result<NsaGrads<f32>> {
    check(cfg, x, phi)?;
    check_d_o(cfg, x, d_o)?;
    let (_, saved) = forward::run(cfg, x, phi, true);
    let saved = saved.expect("saved on request");
    Ok(backward::run(cfg, x, phi, &saved, d_o))
}

fn check_d_o(cfg: &NsaConfig, x: &NsaInputs<f32>, d_o: &[f32]) -> Result<()> {
    let n = x.num_tokens();
    if d_o.len() != n * cfg.heads * x.dv {
        return Err(NsaError::ShapeMismatch {
            name: "d_o".into(),
            expected: vec![n, cfg.heads, x.dv],
            got: vec![d_o.len()],
        });
    }
    Ok(())
}

/// Splits a head-major `[HKV, R, per]` buffer, where sequence `b` owns rows
/// `offsets[b]..offsets[b + 1]`, into `(head, sequence, first row in the sequence, rows)`
/// tasks of at most `chunk` rows each.
pub(crate) fn head_chunks<'a>(
    buf: &'a mut [f32],
    hkv: usize,
    offsets: &[usize],
    per: usize,
    chunk: usize,
) -> Vec<(usize, usize, usize, &'a mut [f32])> {
    let total = *offsets.last().unwrap();
    let mut tasks = Vec::new();
    if total == 0 || per == 0 {
        return tasks;
    }
    for (g, head) in buf.chunks_mut(total * per).take(hkv).enumerate() {
        let mut rest = head;
        for (b, w) in offsets.windows(2).enumerate() {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut((w[1] - w[0]) * per);
            rest = tail;
            for (c, part) in mine.chunks_mut(chunk * per).enumerate() {
                tasks.push((g, b, c * chunk, part));
            }
        }
    }
    tasks
}

/// `[HKV, N, D]` -> `[N, HKV, D]`
pub(crate) fn to_token_major(h: &[f32], hkv: usize, n: usize, dim: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0.0f32; n * hkv * dim];
    if dim == 0 {
        return out;
    }
    out.par_chunks_mut(hkv * dim)
        .enumerate()
        .for_each(|(t, row)| {
            for g in 0..hkv {
                row[g * dim..(g + 1) * dim]
                    .copy_from_slice(&h[(g * n + t) * dim..(g * n + t + 1) * dim]);
            }
        });
    out
}
