//! Decoding on f32 (SPEC.md, "Decoding"), with the storage of [`crate::cache`]: each new token
//! is appended to its sequence's cache (raw selection/window K/V, the rolling buffer of the last
//! `l` compression-branch tokens, and a new compressed K/V from this module's `phi` whenever a
//! compression block completes), then its query reads the cache through the same tile kernels
//! as the forward: one `[G, D]` matrix per KV group against the visible compressed tokens, the
//! runs of selected blocks and the window. Same contract as [`crate::reference::decode`].

use super::attend::{self, Seg};
use super::phi::PhiF32;
use super::tile::{ensure, MatRef};
use super::{combine, kv_rows, select, window, Dims};
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
    s: Vec<f32>,
    s2: Vec<f32>,
    ob: [Vec<f32>; 3],
    lse: Vec<f32>,
    ranges: Vec<(usize, usize)>,
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
        s,
        s2,
        ob,
        lse,
        ranges,
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
    ranges.clear();
    ranges.resize(gs, (0, nvis));
    let ncols = attend::forward(qm, &[cseg], ranges, s, oc, dv, lse);

    // Selection.
    select::importance(dims, t, s, ncols, nvis, psum, scores);
    select::top_n(dims, scores, best, sel);
    select::runs(dims.lp, t, sel, runs);
    let mut segs: Vec<Seg<'_>> = Vec::with_capacity(n);
    select::segments(dims, seq.k_slc(), seq.v_slc(), 0, g, runs, &mut segs);
    select::forward_token(dims, qm, &segs, ranges, s2, os, lse);

    // Window.
    let (k0, k1) = window::span(dims, t, t + 1);
    let wseg = Seg {
        k: kv_rows(seq.k_win(), hkv, dk, g, k0, k1 - k0),
        v: kv_rows(seq.v_win(), hkv, dv, g, k0, k1 - k0),
    };
    ranges.clear();
    ranges.resize(gs, (0, k1 - k0));
    attend::forward(qm, &[wseg], ranges, s, ow, dv, lse);

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

fn check(
    cfg: &NsaConfig,
    cache: &DecodeCache<f32>,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<()> {
    x.validate(cfg)?;
    phi.validate(cfg, x.dk, x.dv)?;
    cache.check_dims(cfg, x)
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
    check(cfg, cache, x, phi)?;
    if x.num_seqs() != 1 {
        return Err(NsaError::Decode(format!(
            "prefill takes one sequence, got {}",
            x.num_seqs()
        )));
    }
    if b >= cache.batch() {
        return Err(NsaError::Decode(format!(
            "sequence {b} out of range: the cache holds {}",
            cache.batch()
        )));
    }
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

/// One decode step for the whole batch: `x` holds one token per sequence (`cu_seqlens = [0, 1,
/// .., B]`); token `b` is appended to sequence `b` (any length, possibly empty) and the rows
/// `o` `[B, HQ, dv]`, `sel_idx` `[B, HKV, n]` are returned. (Sequence, KV group) pairs run in
/// parallel.
pub fn step(
    cfg: &NsaConfig,
    cache: &mut DecodeCache<f32>,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<NsaOutput<f32>> {
    check(cfg, cache, x, phi)?;
    let batch = cache.batch();
    let one_each: Vec<usize> = (0..=batch).collect();
    if x.cu_seqlens != one_each {
        return Err(NsaError::Decode(format!(
            "a step takes one token for each of the {batch} cached sequences (cu_seqlens [0, 1, .., {batch}]), got cu_seqlens {:?}",
            x.cu_seqlens
        )));
    }
    let dims = Dims::new(cfg, x.dk, x.dv);
    let comp = CpuCompressor::new(cfg, phi, x.dk, x.dv);
    for (b, seq) in cache.seqs.iter_mut().enumerate() {
        seq.append(TokenKv::from_inputs(x, dims.hkv, b), &comp)?;
    }
    let (hq, dk, dv, n) = (dims.hq, dims.dk, dims.dv, dims.n);
    let mut out = NsaOutput {
        o: vec![0.0; batch * hq * dv],
        sel_idx: vec![-1; batch * dims.hkv * n],
    };
    let seqs = &cache.seqs;
    out.o
        .par_chunks_mut(dims.g * dv)
        .zip(out.sel_idx.par_chunks_mut(n))
        .enumerate()
        .for_each_init(Scratch::default, |scr, (k, (o, sel))| {
            let (b, g) = (k / dims.hkv, k % dims.hkv);
            group_row(
                &dims,
                &seqs[b],
                &x.q[b * hq * dk..(b + 1) * hq * dk],
                gates_of(x, hq, b),
                g,
                o,
                sel,
                scr,
            );
        });
    Ok(out)
}
