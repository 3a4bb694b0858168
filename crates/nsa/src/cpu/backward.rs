//! The backward driver (FlashAttention-2 shaped, deterministic, no atomics):
//!
//! 1. per (token, head): the gates' gradients `dg_b = dot(dO, o_b)` and `delta_b = g_b dg_b`;
//! 2. query-major tiles: `dq` of the three branches (probabilities recomputed from the saved
//!    log-sum-exps);
//! 3. key-major tasks, each owning a disjoint slice of the key/value gradients: chunks of
//!    compressed tokens, chunks of window keys, and selection blocks, which gather the queries
//!    that chose them through an [`InverseIndex`]. A block chosen by more than `HOT` queries is
//!    split into fixed query ranges whose partial gradients are added in order;
//! 4. `phi` backward from the compressed tokens' gradients.

use super::attend::{self, gather_gated, gather_heads, gather_rows, Seg};
use super::compress::{self, CmpKv};
use super::phi;
use super::select::{self, InverseIndex};
use super::thin::{self, ThinScratch};
use super::tile::{axpy, ensure, MatRef};
use super::{
    combine, head_chunks, kv_rows, split_tiles, tiles, to_token_major, window, Dims, Saved,
};
use crate::blocks;
use crate::config::NsaConfig;
use crate::error::{NsaError, Result};
use crate::inputs::{NsaGrads, NsaInputs, PhiParams};
use rayon::prelude::*;

/// Compressed tokens per key-major task.
const CMP_CHUNK: usize = 32;
/// Window keys per key-major task.
const WIN_CHUNK: usize = 64;
/// Query rows per GEMM of the key-major passes.
const KV_ROWS: usize = 256;
/// Queries per part of a selection block's task.
const HOT: usize = 512;

/// Per-thread scratch (always written before read).
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    dob: Vec<f32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
    s: Vec<f32>,
    dp: Vec<f32>,
    dq: Vec<f32>,
    ranges: Vec<(usize, usize)>,
    runs: Vec<(usize, usize)>,
    thin: ThinScratch,
}

impl Scratch {
    /// The query pass of FlashAttention-2 over one key segment: `dq = beta * dq + dS K` for the
    /// `rows` gathered query rows and their key ranges.
    fn query_pass(&mut self, d: &Dims, rows: usize, seg: Seg<'_>, beta: f32) {
        attend::backward_q(
            MatRef::rows(&self.q, rows, d.dk),
            MatRef::rows(&self.dob, rows, d.dv),
            &[seg],
            &self.ranges,
            &self.lse,
            &self.delta,
            d.scale,
            &mut self.s,
            &mut self.dp,
            &mut self.dq,
            beta,
        );
    }

    /// The key pass of FlashAttention-2 (`dK`, `dV` of `seg`, accumulated) for the `rows`
    /// query rows gathered into this scratch with their key ranges.
    fn key_pass(&mut self, d: &Dims, rows: usize, seg: Seg<'_>, dk: &mut [f32], dv: &mut [f32]) {
        attend::backward_kv(
            MatRef::rows(&self.q, rows, d.dk),
            MatRef::rows(&self.dob, rows, d.dv),
            seg,
            &self.ranges,
            &self.lse,
            &self.delta,
            &mut self.s,
            &mut self.dp,
            dk,
            dv,
        );
    }
}

/// Everything the passes read.
struct Ctx<'a> {
    dims: Dims,
    x: &'a NsaInputs<f32>,
    d_o: &'a [f32],
    saved: &'a Saved,
    kv: CmpKv<'a>,
    /// `delta_b = g_b * dot(dO, o_b)`, `[N, HQ]` per branch.
    delta: [Vec<f32>; 3],
}

impl Ctx<'_> {
    fn gates(&self, k: usize) -> &[f32] {
        match k {
            0 => &self.x.g_cmp,
            1 => &self.x.g_slc,
            _ => &self.x.g_win,
        }
    }

    /// Gathers queries (scaled), `g_k * dO`, lse and delta of branch `k` for tokens `toks` of
    /// sequence `b`, group `g`, into the scratch.
    fn gather(
        &self,
        k: usize,
        b: usize,
        g: usize,
        toks: impl ExactSizeIterator<Item = usize> + Clone,
        scr: &mut Scratch,
        with_q: bool,
    ) {
        let d = &self.dims;
        let s0 = self.x.cu_seqlens[b];
        if with_q {
            gather_rows(
                &self.x.q,
                d.hq,
                d.g,
                d.dk,
                s0,
                g,
                toks.clone(),
                &mut scr.q,
                d.scale,
            );
        }
        gather_gated(
            self.d_o,
            self.gates(k),
            d.hq,
            d.g,
            d.dv,
            s0,
            g,
            toks.clone(),
            &mut scr.dob,
        );
        gather_heads(
            &self.saved.lse[k],
            d.hq,
            d.g,
            s0,
            g,
            toks.clone(),
            &mut scr.lse,
        );
        gather_heads(&self.delta[k], d.hq, d.g, s0, g, toks, &mut scr.delta);
    }
}

/// Checks that `saved` belongs to these inputs.
fn check_saved(cfg: &NsaConfig, x: &NsaInputs<f32>, saved: &Saved) -> Result<()> {
    let n = x.num_tokens();
    let ok = saved.lay.cu == x.cu_seqlens
        && saved
            .o_branch
            .iter()
            .all(|o| o.len() == n * cfg.heads * x.dv)
        && saved.lse.iter().all(|l| l.len() == n * cfg.heads)
        && saved.sel_idx.len() == n * cfg.kv_heads * cfg.sel_count
        && saved.lay.hkv == cfg.kv_heads
        && saved.lay.l == cfg.cmp_block
        && saved.lay.d == cfg.cmp_stride
        && saved.kc.out.len() == cfg.kv_heads * saved.lay.total() * x.dk
        && saved.vc.out.len() == cfg.kv_heads * saved.lay.total() * x.dv;
    if ok {
        Ok(())
    } else {
        Err(NsaError::Unsupported(
            "backward_saved: the saved state does not belong to these inputs/config".into(),
        ))
    }
}

/// NSA backward from the state saved by [`super::forward_saved`] (same `cfg`, `x`, `phi`).
pub fn backward_saved(
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
    saved: &Saved,
    d_o: &[f32],
) -> Result<NsaGrads<f32>> {
    x.validate(cfg)?;
    phi.validate(cfg, x.dk, x.dv)?;
    super::check_d_o(cfg, x, d_o)?;
    check_saved(cfg, x, saved)?;
    Ok(run(cfg, x, phi, saved, d_o))
}

pub(crate) fn run(
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi_params: &PhiParams<f32>,
    saved: &Saved,
    d_o: &[f32],
) -> NsaGrads<f32> {
    let dims = Dims::new(cfg, x.dk, x.dv);
    let n = x.num_tokens();
    let (hq, hkv, dk, dv) = (dims.hq, dims.hkv, dims.dk, dims.dv);

    // 1. Gate gradients and deltas.
    let mut dg: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0f32; n * hq]);
    let mut delta: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0f32; n * hq]);
    {
        const ROWS: usize = 1024;
        let [a0, a1, a2] = &mut dg;
        let [b0, b1, b2] = &mut delta;
        a0.par_chunks_mut(ROWS)
            .zip(a1.par_chunks_mut(ROWS))
            .zip(a2.par_chunks_mut(ROWS))
            .zip(
                b0.par_chunks_mut(ROWS)
                    .zip(b1.par_chunks_mut(ROWS))
                    .zip(b2.par_chunks_mut(ROWS)),
            )
            .enumerate()
            .for_each(|(c, (((g0, g1), g2), ((e0, e1), e2)))| {
                let r = c * ROWS..c * ROWS + g0.len();
                let gates = [
                    &x.g_cmp[r.clone()],
                    &x.g_slc[r.clone()],
                    &x.g_win[r.clone()],
                ];
                let br = |k: usize| &saved.o_branch[k][r.start * dv..r.end * dv];
                combine::gate_grads(
                    gates,
                    [br(0), br(1), br(2)],
                    &d_o[r.start * dv..r.end * dv],
                    dv,
                    [g0, g1, g2],
                    [e0, e1, e2],
                );
            });
    }
    let [dg_cmp, dg_slc, dg_win] = dg;
    let ctx = Ctx {
        dims,
        x,
        d_o,
        saved,
        kv: CmpKv::new(&saved.lay, &saved.kc, &saved.vc),
        delta,
    };

    // 2. dq, query-major.
    let mut dq = vec![0.0f32; n * hq * dk];
    {
        let tl = tiles(&x.cu_seqlens, dims.tile_tokens());
        let parts: Vec<_> = tl
            .iter()
            .copied()
            .zip(split_tiles(&mut dq, hq * dk, &tl))
            .collect();
        parts
            .into_par_iter()
            .for_each_init(Scratch::default, |scr, ((b, t0, t1), out)| {
                dq_tile(&ctx, b, t0, t1, out, scr);
            });
    }

    // 3. Key-major passes.
    let inv = InverseIndex::build(&dims, &x.cu_seqlens, &saved.sel_idx);
    let total = saved.lay.total();
    let mut dkc = vec![0.0f32; hkv * total * dk];
    let mut dvc = vec![0.0f32; hkv * total * dv];
    let mut dks = vec![0.0f32; hkv * n * dk];
    let mut dvs = vec![0.0f32; hkv * n * dv];
    let mut dkw = vec![0.0f32; hkv * n * dk];
    let mut dvw = vec![0.0f32; hkv * n * dv];
    {
        let cu = &x.cu_seqlens;
        let offs = &saved.lay.offsets;
        let cmp_tasks = head_chunks(&mut dkc, hkv, offs, dk, CMP_CHUNK)
            .into_iter()
            .zip(head_chunks(&mut dvc, hkv, offs, dv, CMP_CHUNK));
        let win_tasks = head_chunks(&mut dkw, hkv, cu, dk, WIN_CHUNK)
            .into_iter()
            .zip(head_chunks(&mut dvw, hkv, cu, dv, WIN_CHUNK));
        let sel_tasks = head_chunks(&mut dks, hkv, cu, dk, dims.lp)
            .into_iter()
            .zip(head_chunks(&mut dvs, hkv, cu, dv, dims.lp));
        let mut all: Vec<(usize, _)> = Vec::new();
        all.extend(cmp_tasks.map(|t| (0usize, t)));
        all.extend(sel_tasks.map(|t| (1usize, t)));
        all.extend(win_tasks.map(|t| (2usize, t)));
        all.into_par_iter().for_each_init(
            Scratch::default,
            |scr, (kind, ((g, b, r0, dkp), (_, _, _, dvp)))| {
                dkp.fill(0.0);
                dvp.fill(0.0);
                match kind {
                    0 => cmp_kv(&ctx, g, b, r0, dkp, dvp, scr),
                    1 => sel_kv(&ctx, &inv, g, b, r0 / dims.lp, dkp, dvp, scr),
                    _ => win_kv(&ctx, g, b, r0, dkp, dvp, scr),
                }
            },
        );
    }

    // 4. phi and layout.
    let (pk, pv) = phi::phis(cfg, phi_params, dk, dv);
    let ((dk_cmp, dphi_k), (dv_cmp, dphi_v)) = rayon::join(
        || pk.backward(&saved.lay, &x.k_cmp, &saved.kc, &dkc),
        || pv.backward(&saved.lay, &x.v_cmp, &saved.vc, &dvc),
    );
    NsaGrads {
        dq,
        dk_cmp,
        dv_cmp,
        dk_slc: to_token_major(&dks, hkv, n, dk),
        dv_slc: to_token_major(&dvs, hkv, n, dv),
        dk_win: to_token_major(&dkw, hkv, n, dk),
        dv_win: to_token_major(&dvw, hkv, n, dv),
        dg_cmp,
        dg_slc,
        dg_win,
        dphi: PhiParams {
            hidden: phi_params.hidden,
            k: dphi_k,
            v: dphi_v,
        },
    }
}

/// `dq` of the three branches for the tokens `t0..t1` of sequence `b` (`out` is
/// `[t1 - t0, HQ, dk]`).
fn dq_tile(ctx: &Ctx<'_>, b: usize, t0: usize, t1: usize, out: &mut [f32], scr: &mut Scratch) {
    let d = &ctx.dims;
    let x = ctx.x;
    let (hq, hkv, gs, dk, dv, n) = (d.hq, d.hkv, d.g, d.dk, d.dv, d.n);
    let s0 = x.cu_seqlens[b];
    let rows = (t1 - t0) * gs;
    let mut segs: Vec<Seg<'_>> = Vec::with_capacity(n);
    for g in 0..hkv {
        ensure(&mut scr.dq, rows * dk);
        // Compression branch (overwrites dq).
        ctx.gather(0, b, g, t0..t1, scr, true);
        let nv = blocks::cmp_visible(t1 - 1, d.l, d.d);
        compress::ranges(d, t0, t1, 0, nv, &mut scr.ranges);
        let seg = ctx.kv.seg(d, b, g, 0, nv);
        scr.query_pass(d, rows, seg, 0.0);

        // Selection branch, token by token.
        ctx.gather(1, b, g, t0..t1, scr, false);
        for t in t0..t1 {
            let r0 = (t - t0) * gs;
            let row = &ctx.saved.sel_idx[((s0 + t) * hkv + g) * n..][..n];
            select::runs(d.lp, t, row, &mut scr.runs);
            select::segments(d, &x.k_slc, &x.v_slc, s0, g, &scr.runs, &mut segs);
            thin::backward_q(
                MatRef::rows(&scr.q[r0 * dk..], gs, dk),
                MatRef::rows(&scr.dob[r0 * dv..], gs, dv),
                &segs,
                &scr.lse[r0..r0 + gs],
                &scr.delta[r0..r0 + gs],
                d.scale,
                &mut scr.thin,
                &mut scr.dq[r0 * dk..(r0 + gs) * dk],
            );
        }

        // Window branch.
        ctx.gather(2, b, g, t0..t1, scr, false);
        let (k0, k1) = window::span(d, t0, t1);
        window::ranges(d, t0, t1, k0, k1, &mut scr.ranges);
        let seg = Seg {
            k: kv_rows(&x.k_win, hkv, dk, g, s0 + k0, k1 - k0),
            v: kv_rows(&x.v_win, hkv, dv, g, s0 + k0, k1 - k0),
        };
        scr.query_pass(d, rows, seg, 1.0);

        for t in t0..t1 {
            let (r0, h0) = ((t - t0) * gs, (t - t0) * hq + g * gs);
            out[h0 * dk..(h0 + gs) * dk].copy_from_slice(&scr.dq[r0 * dk..(r0 + gs) * dk]);
        }
    }
}

/// Query tokens per GEMM of the key-major passes: `KV_ROWS / G` (the `G` heads of each token
/// are rows), so the packing of each key block is shared by many query rows.
fn kv_query_tokens(d: &Dims) -> usize {
    (KV_ROWS / d.g).max(1)
}

/// Key-major sub-tiles: query tokens `ta..tb` in steps of the tile size.
fn subtiles(d: &Dims, ta: usize, tb: usize) -> impl Iterator<Item = (usize, usize)> {
    let tq = kv_query_tokens(d);
    (ta..tb).step_by(tq).map(move |a| (a, (a + tq).min(tb)))
}

/// Gradients of the compressed tokens `i0 .. i0 + rows` of (head `g`, sequence `b`).
fn cmp_kv(
    ctx: &Ctx<'_>,
    g: usize,
    b: usize,
    i0: usize,
    dk: &mut [f32],
    dv: &mut [f32],
    scr: &mut Scratch,
) {
    let d = &ctx.dims;
    let i1 = i0 + dk.len() / d.dk;
    let len = ctx.x.cu_seqlens[b + 1] - ctx.x.cu_seqlens[b];
    let first = i0 * d.d + d.l - 1; // first query that sees block i0
    let seg = ctx.kv.seg(d, b, g, i0, i1);
    for (ta, tb) in subtiles(d, first.min(len), len) {
        ctx.gather(0, b, g, ta..tb, scr, true);
        compress::ranges(d, ta, tb, i0, i1, &mut scr.ranges);
        scr.key_pass(d, (tb - ta) * d.g, seg, dk, dv);
    }
}

/// Gradients of the window keys `k0 .. k0 + rows` of (head `g`, sequence `b`).
fn win_kv(
    ctx: &Ctx<'_>,
    g: usize,
    b: usize,
    k0: usize,
    dk: &mut [f32],
    dv: &mut [f32],
    scr: &mut Scratch,
) {
    let d = &ctx.dims;
    let x = ctx.x;
    let k1 = k0 + dk.len() / d.dk;
    let s0 = x.cu_seqlens[b];
    let len = x.cu_seqlens[b + 1] - s0;
    let seg = Seg {
        k: kv_rows(&x.k_win, d.hkv, d.dk, g, s0 + k0, k1 - k0),
        v: kv_rows(&x.v_win, d.hkv, d.dv, g, s0 + k0, k1 - k0),
    };
    let last = (k1 - 1 + d.w).min(len); // queries k0 ..= k1 - 1 + w - 1 see the chunk
    for (ta, tb) in subtiles(d, k0, last) {
        ctx.gather(2, b, g, ta..tb, scr, true);
        window::ranges(d, ta, tb, k0, k1, &mut scr.ranges);
        scr.key_pass(d, (tb - ta) * d.g, seg, dk, dv);
    }
}

/// Gradients of selection block `j` of (head `g`, sequence `b`), from the queries that chose it.
#[allow(clippy::too_many_arguments)]
fn sel_kv(
    ctx: &Ctx<'_>,
    inv: &InverseIndex,
    g: usize,
    b: usize,
    j: usize,
    dk: &mut [f32],
    dv: &mut [f32],
    scr: &mut Scratch,
) {
    let d = &ctx.dims;
    let x = ctx.x;
    let s0 = x.cu_seqlens[b];
    let a = j * d.lp;
    let nk = dk.len() / d.dk;
    let seg = Seg {
        k: kv_rows(&x.k_slc, d.hkv, d.dk, g, s0 + a, nk),
        v: kv_rows(&x.v_slc, d.hkv, d.dv, g, s0 + a, nk),
    };
    let qs = inv.queries(g, b, j);
    // One part of the query list into (dk, dv) (accumulating).
    let part = |toks: &[u32], dk: &mut [f32], dv: &mut [f32], scr: &mut Scratch| {
        let tq = kv_query_tokens(d);
        for chunk in toks.chunks(tq) {
            let it = chunk.iter().map(|&t| t as usize);
            ctx.gather(1, b, g, it.clone(), scr, true);
            scr.ranges.clear();
            for t in it {
                scr.ranges
                    .extend(std::iter::repeat_n((0, (t + 1 - a).min(nk)), d.g));
            }
            scr.key_pass(d, chunk.len() * d.g, seg, dk, dv);
        }
    };
    if qs.len() <= HOT {
        part(qs, dk, dv, scr);
        return;
    }
    // A hot block: fixed parts in parallel, partial sums added in part order.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = qs
        .par_chunks(HOT)
        .map_init(Scratch::default, |s, toks| {
            let mut pk = vec![0.0f32; dk.len()];
            let mut pv = vec![0.0f32; dv.len()];
            part(toks, &mut pk, &mut pv, s);
            (pk, pv)
        })
        .collect();
    for (pk, pv) in &partials {
        axpy(1.0, pk, dk);
        axpy(1.0, pv, dv);
    }
}
