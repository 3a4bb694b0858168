//! The float64 reference of NSA: forward, backward, selection scores and decoding, written as
//! plain loops for clarity. It is the oracle every other backend is checked against.
//!
//! Layout (the same split as the CPU and CUDA paths):
//! - [`phi`]: compression function, forward and backward (incl. parameter gradients);
//! - [`attend`]: softmax attention of one query over an explicit key list, with backward;
//! - [`compress`]: compressed K/V of a sequence and the compressed tokens a query sees;
//! - [`select`]: Eq. 8-10 importance, forced blocks, top-n, the selected token list;
//! - [`window`]: the sliding-window key list;
//! - [`combine`]: the gates;
//! - [`row`]: one query token through the three branches (shared by all of the above);
//! - [`decode`]: prefill and step over a [`crate::cache::DecodeCache`].
//!
//! Every sequence of a packed batch is processed on its own (`cu_seqlens`); masked positions
//! are never in a key list, so no finite mask value appears anywhere.
//!
//! Choices where SPEC.md leaves room (each is also noted where it is implemented):
//! - Compressed block `i` is visible iff `i*d + l - 1 <= t` (count `floor((t+1-l)/d) + 1`,
//!   the settled erratum of SPEC's `floor((t-l)/d) + 1`); see [`crate::blocks::cmp_visible`].
//! - With no compressed token visible, the compressed branch gives `o = 0`, `lse = -inf`,
//!   `p_cmp` empty, hence every admissible selection block scores exactly 0 and the top-n
//!   falls back to "forced, then lowest indices" (ties to the lower index).
//! - Blocks that no visible compressed block overlaps (typically the query's own, still
//!   incomplete block) score 0 and compete like any other; they are never excluded.
//! - Gradients of the gates are taken w.r.t. the gate *values* that the op receives (the
//!   sigmoid, if any, belongs to the caller).
//! - `selection_scores` gives `-inf` for non-admissible blocks and finite scores (possibly 0)
//!   for every admissible one.

// Index loops mirror the equations (`for c in 0..dim { .. w[(h*ld + i)*dim + c] .. }`); in an
// oracle that is meant to be read against the paper they are clearer than iterator chains.
#![allow(clippy::needless_range_loop)]
// Backward helpers take the forward's inputs plus the gradient buffers; bundling them into
// structs only to please the lint would hide what each function reads and writes.
#![allow(clippy::too_many_arguments)]

pub mod attend;
pub mod combine;
pub mod compress;
pub mod decode;
pub mod phi;
pub mod row;
pub mod select;
pub mod window;

use crate::blocks;
use crate::config::NsaConfig;
use crate::error::{NsaError, Result};
use crate::inputs::{NsaGrads, NsaInputs, NsaOutput, PhiParams};
use phi::Phi;
use row::{Dims, Row, SeqKv, SeqKvGrad};

/// The two `phi` of a call (K with `D = dk`, V with `D = dv`).
fn phis<'a>(cfg: &NsaConfig, phi: &'a PhiParams<f64>, dk: usize, dv: usize) -> (Phi<'a>, Phi<'a>) {
    let mk = |weights, dim| Phi {
        weights,
        l: cfg.cmp_block,
        dim,
        hidden: phi.hidden,
    };
    (mk(&phi.k, dk), mk(&phi.v, dv))
}

/// Validates the configuration, the inputs and the `phi` parameters.
fn check(cfg: &NsaConfig, x: &NsaInputs<f64>, phi: &PhiParams<f64>) -> Result<()> {
    x.validate(cfg)?;
    phi.validate(cfg, x.dk, x.dv)
}

/// `v[r.start*per .. r.end*per]`: the rows of a token range of a `[N, per]` tensor.
fn rows<'a, T>(v: &'a [T], r: &std::ops::Range<usize>, per: usize) -> &'a [T] {
    &v[r.start * per..r.end * per]
}

/// Checks a given selection `[N, HKV, n]` (the layout of [`NsaOutput::sel_idx`]): per (token,
/// group) ascending distinct blocks admissible at the token's position, padded with `-1` at the
/// end.
fn check_selection(cfg: &NsaConfig, x: &NsaInputs<f64>, sel: &[i32]) -> Result<()> {
    let (hkv, n) = (cfg.kv_heads, cfg.sel_count);
    if sel.len() != x.num_tokens() * hkv * n {
        return Err(NsaError::ShapeMismatch {
            name: "sel_idx".into(),
            expected: vec![x.num_tokens(), hkv, n],
            got: vec![sel.len()],
        });
    }
    for b in 0..x.num_seqs() {
        let r = x.seq_range(b);
        for t in 0..r.len() {
            let admissible = blocks::sel_admissible(t, cfg.sel_block) as i64;
            for g in 0..hkv {
                let at = ((r.start + t) * hkv + g) * n;
                let list = &sel[at..at + n];
                let used = list.iter().take_while(|&&j| j >= 0).count();
                let ascending = list[..used].windows(2).all(|w| w[0] < w[1]);
                let in_range = list[..used].iter().all(|&j| (j as i64) < admissible);
                if !ascending || !in_range || list[used..].iter().any(|&j| j != -1) {
                    return Err(NsaError::Unsupported(format!(
                        "sel_idx of token {} (position {t}), group {g}: {list:?} is not ascending \
                         distinct blocks below {admissible} padded with -1",
                        r.start + t
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The branches of packed token `i` (position `t`): [`row::row_forward`], then, with `given`
/// (a checked `[N, HKV, n]` selection), each group's selected branch over the given blocks.
fn branches(
    cfg: &NsaConfig,
    dims: &Dims,
    t: usize,
    i: usize,
    q_row: &[f64],
    kv: &SeqKv<'_>,
    given: Option<&[i32]>,
) -> Row {
    let mut row = row::row_forward(cfg, dims, t, q_row, kv);
    if let Some(sel) = given {
        let n = cfg.sel_count;
        for g in 0..dims.hkv {
            let at = (i * dims.hkv + g) * n;
            let chosen: Vec<usize> = sel[at..at + n]
                .iter()
                .take_while(|&&j| j >= 0)
                .map(|&j| j as usize)
                .collect();
            row::use_selection(cfg, dims, t, q_row, kv, &mut row, g, &chosen);
        }
    }
    row
}

/// Runs `f(t, i, row, kv)` for every token of every sequence: `t` is the token's position in
/// its sequence, `i` its packed index, `row` its branches, `kv` what they read. With `given`
/// (a checked `[N, HKV, n]` selection) the selected branch attends to those blocks instead of
/// the row's own top-n.
fn for_each_row(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
    given: Option<&[i32]>,
    mut f: impl FnMut(usize, usize, &Row, &SeqKv<'_>),
) {
    let dims = Dims::new(cfg, x.dk, x.dv);
    let (phi_k, phi_v) = phis(cfg, phi, x.dk, x.dv);
    let (rk, rv) = (dims.hkv * dims.dk, dims.hkv * dims.dv);
    for b in 0..x.num_seqs() {
        let r = x.seq_range(b);
        let (k_cmp, v_cmp) = (rows(&x.k_cmp, &r, rk), rows(&x.v_cmp, &r, rv));
        let comp = compress::compress_sequence(cfg, &phi_k, &phi_v, k_cmp, v_cmp, r.len());
        let kv = SeqKv {
            cmp_k: &comp.k,
            cmp_v: &comp.v,
            slc_k: rows(&x.k_slc, &r, rk),
            slc_v: rows(&x.v_slc, &r, rv),
            win_k: rows(&x.k_win, &r, rk),
            win_v: rows(&x.v_win, &r, rv),
        };
        for t in 0..r.len() {
            let i = r.start + t;
            let q_row = &x.q[i * dims.hq * dims.dk..(i + 1) * dims.hq * dims.dk];
            let row = branches(cfg, &dims, t, i, q_row, &kv, given);
            f(t, i, &row, &kv);
        }
    }
}

/// The gates of packed token `i`, per branch `[HQ]`.
fn gates_of<'a>(x: &'a NsaInputs<f64>, hq: usize, i: usize) -> row::RowGates<'a> {
    [
        &x.g_cmp[i * hq..(i + 1) * hq],
        &x.g_slc[i * hq..(i + 1) * hq],
        &x.g_win[i * hq..(i + 1) * hq],
    ]
}

/// NSA forward: `o` `[N, HQ, dv]` and the selected blocks `sel_idx` `[N, HKV, n]`.
pub fn forward(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
) -> Result<NsaOutput<f64>> {
    check(cfg, x, phi)?;
    forward_rows(cfg, x, phi, None)
}

/// [`forward`] with the top-n taken from `sel` (`[N, HKV, n]`, ascending, padded with `-1`, as
/// [`NsaOutput::sel_idx`]) instead of computed: the oracle for a fast path whose selection
/// differs from the reference's by near-ties (bf16 scores), or for a caller-chosen selection.
/// The returned `sel_idx` is `sel`.
pub fn forward_with_selection(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
    sel: &[i32],
) -> Result<NsaOutput<f64>> {
    check(cfg, x, phi)?;
    check_selection(cfg, x, sel)?;
    forward_rows(cfg, x, phi, Some(sel))
}

fn forward_rows(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
    given: Option<&[i32]>,
) -> Result<NsaOutput<f64>> {
    let dims = Dims::new(cfg, x.dk, x.dv);
    let n = x.num_tokens();
    let mut o = vec![0.0; n * dims.hq * dims.dv];
    let mut sel_idx = vec![-1i32; n * dims.hkv * cfg.sel_count];
    for_each_row(cfg, x, phi, given, |_t, i, row, _kv| {
        let out = row::row_output(&dims, row, gates_of(x, dims.hq, i));
        o[i * dims.hq * dims.dv..(i + 1) * dims.hq * dims.dv].copy_from_slice(&out);
        for (g, chosen) in row.sel.iter().enumerate() {
            let at = (i * dims.hkv + g) * cfg.sel_count;
            sel_idx[at..at + cfg.sel_count].copy_from_slice(&select::padded(cfg, chosen));
        }
    });
    Ok(NsaOutput { o, sel_idx })
}

/// Group importance scores `p[t, g, j]` (Eq. 8-10 summed over the group), `[N, HKV,
/// max_blocks]` where `max_blocks` is the largest `sel_admissible(len - 1)` over the
/// sequences; entries of blocks not admissible for the token are `f64::NEG_INFINITY`.
pub fn selection_scores(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
) -> Result<(Vec<f64>, usize)> {
    check(cfg, x, phi)?;
    let max_blocks = (0..x.num_seqs())
        .map(|b| blocks::sel_admissible(x.seq_range(b).len() - 1, cfg.sel_block))
        .max()
        .unwrap_or(0);
    let hkv = cfg.kv_heads;
    let mut p = vec![f64::NEG_INFINITY; x.num_tokens() * hkv * max_blocks];
    for_each_row(cfg, x, phi, None, |_t, i, row, _kv| {
        for (g, s) in row.scores.iter().enumerate() {
            let at = (i * hkv + g) * max_blocks;
            p[at..at + s.len()].copy_from_slice(s);
        }
    });
    Ok((p, max_blocks))
}

/// NSA backward for the upstream gradient `d_o` (`[N, HQ, dv]`): gradients of `q`, of the
/// K/V of every branch (the compressed branch through `phi` down to the raw `k_cmp`/`v_cmp`,
/// plus the `phi` parameters) and of the three gates. The top-n choice is not differentiated
/// (SPEC.md): the selection made by the forward is used as a constant.
pub fn backward(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
    d_o: &[f64],
) -> Result<NsaGrads<f64>> {
    check(cfg, x, phi)?;
    backward_rows(cfg, x, phi, d_o, None)
}

/// [`backward`] with the top-n taken from `sel` (see [`forward_with_selection`]).
pub fn backward_with_selection(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
    d_o: &[f64],
    sel: &[i32],
) -> Result<NsaGrads<f64>> {
    check(cfg, x, phi)?;
    check_selection(cfg, x, sel)?;
    backward_rows(cfg, x, phi, d_o, Some(sel))
}

fn backward_rows(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
    d_o: &[f64],
    given: Option<&[i32]>,
) -> Result<NsaGrads<f64>> {
    let dims = Dims::new(cfg, x.dk, x.dv);
    let n = x.num_tokens();
    if d_o.len() != n * dims.hq * dims.dv {
        return Err(NsaError::ShapeMismatch {
            name: "d_o".into(),
            expected: vec![n, dims.hq, dims.dv],
            got: vec![d_o.len()],
        });
    }
    let (phi_k, phi_v) = phis(cfg, phi, x.dk, x.dv);
    let (rk, rv) = (dims.hkv * dims.dk, dims.hkv * dims.dv);
    let zeros = |len: usize| vec![0.0; len];
    let mut gr = NsaGrads {
        dq: zeros(x.q.len()),
        dk_cmp: zeros(x.k_cmp.len()),
        dv_cmp: zeros(x.v_cmp.len()),
        dk_slc: zeros(x.k_slc.len()),
        dv_slc: zeros(x.v_slc.len()),
        dk_win: zeros(x.k_win.len()),
        dv_win: zeros(x.v_win.len()),
        dg_cmp: zeros(x.g_cmp.len()),
        dg_slc: zeros(x.g_slc.len()),
        dg_win: zeros(x.g_win.len()),
        dphi: PhiParams {
            hidden: phi.hidden,
            k: phi::zeros_like(&phi.k),
            v: phi::zeros_like(&phi.v),
        },
    };
    for b in 0..x.num_seqs() {
        let r = x.seq_range(b);
        let len = r.len();
        let (k_cmp, v_cmp) = (rows(&x.k_cmp, &r, rk), rows(&x.v_cmp, &r, rv));
        let comp = compress::compress_sequence(cfg, &phi_k, &phi_v, k_cmp, v_cmp, len);
        let kv = SeqKv {
            cmp_k: &comp.k,
            cmp_v: &comp.v,
            slc_k: rows(&x.k_slc, &r, rk),
            slc_v: rows(&x.v_slc, &r, rv),
            win_k: rows(&x.k_win, &r, rk),
            win_v: rows(&x.v_win, &r, rv),
        };
        // Gradients of the compressed K/V of this sequence, pushed through phi at the end.
        let mut dkc = zeros(comp.k.len());
        let mut dvc = zeros(comp.v.len());
        {
            let (hq, dk, dv) = (dims.hq, dims.dk, dims.dv);
            let mut grad = SeqKvGrad {
                cmp_k: &mut dkc,
                cmp_v: &mut dvc,
                slc_k: &mut gr.dk_slc[r.start * rk..r.end * rk],
                slc_v: &mut gr.dv_slc[r.start * rv..r.end * rv],
                win_k: &mut gr.dk_win[r.start * rk..r.end * rk],
                win_v: &mut gr.dv_win[r.start * rv..r.end * rv],
            };
            for t in 0..len {
                let i = r.start + t;
                let q_row = &x.q[i * hq * dk..(i + 1) * hq * dk];
                let row = branches(cfg, &dims, t, i, q_row, &kv, given);
                row::row_backward(
                    &dims,
                    q_row,
                    &kv,
                    &row,
                    gates_of(x, hq, i),
                    &d_o[i * hq * dv..(i + 1) * hq * dv],
                    &mut gr.dq[i * hq * dk..(i + 1) * hq * dk],
                    &mut grad,
                    [
                        &mut gr.dg_cmp[i * hq..(i + 1) * hq],
                        &mut gr.dg_slc[i * hq..(i + 1) * hq],
                        &mut gr.dg_win[i * hq..(i + 1) * hq],
                    ],
                );
            }
        }
        compress::compress_backward(
            cfg,
            &phi_k,
            &phi_v,
            k_cmp,
            v_cmp,
            len,
            &dkc,
            &dvc,
            &mut gr.dk_cmp[r.start * rk..r.end * rk],
            &mut gr.dv_cmp[r.start * rv..r.end * rv],
            &mut gr.dphi.k,
            &mut gr.dphi.v,
        );
    }
    Ok(gr)
}
