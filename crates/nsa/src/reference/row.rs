//! One query token through the three branches, all heads: the unit that the forward, the
//! backward and the decode step of the reference are loops over. The keys come from a
//! [`SeqKv`] (the sequence's raw K/V for selection and window, its compressed K/V), so the
//! same code serves a whole-sequence forward and a decode cache.

use super::attend::{attend, attend_backward, Attention, HeadKv, HeadKvGrad};
use super::combine::{combine, combine_backward, BRANCHES};
use super::{compress, select, window};
use crate::config::NsaConfig;

/// Sizes of one call.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hq: usize,
    pub hkv: usize,
    /// GQA group size `G`.
    pub group: usize,
    pub dk: usize,
    pub dv: usize,
    pub scale: f64,
}

impl Dims {
    pub fn new(cfg: &NsaConfig, dk: usize, dv: usize) -> Self {
        Dims {
            hq: cfg.heads,
            hkv: cfg.kv_heads,
            group: cfg.group_size(),
            dk,
            dv,
            scale: cfg.softmax_scale(dk),
        }
    }
}

/// What the branches of one sequence read, each `[rows, HKV, D]`: the compressed K/V
/// (`rows` = compressed tokens) and the raw K/V of the selection and window branches.
#[derive(Debug, Clone, Copy)]
pub struct SeqKv<'a> {
    pub cmp_k: &'a [f64],
    pub cmp_v: &'a [f64],
    pub slc_k: &'a [f64],
    pub slc_v: &'a [f64],
    pub win_k: &'a [f64],
    pub win_v: &'a [f64],
}

impl<'a> SeqKv<'a> {
    /// The K/V of `branch` (0 compressed, 1 selected, 2 window) for KV head `g`.
    fn head(&self, dims: &Dims, branch: usize, g: usize) -> HeadKv<'a> {
        let (k, v) = match branch {
            0 => (self.cmp_k, self.cmp_v),
            1 => (self.slc_k, self.slc_v),
            _ => (self.win_k, self.win_v),
        };
        HeadKv {
            k,
            v,
            hkv: dims.hkv,
            h: g,
            dk: dims.dk,
            dv: dims.dv,
        }
    }
}

/// Gradient buffers shaped like a [`SeqKv`].
pub struct SeqKvGrad<'a> {
    pub cmp_k: &'a mut [f64],
    pub cmp_v: &'a mut [f64],
    pub slc_k: &'a mut [f64],
    pub slc_v: &'a mut [f64],
    pub win_k: &'a mut [f64],
    pub win_v: &'a mut [f64],
}

impl SeqKvGrad<'_> {
    fn branch(&mut self, branch: usize) -> HeadKvGrad<'_> {
        let (dk, dv) = match branch {
            0 => (&mut *self.cmp_k, &mut *self.cmp_v),
            1 => (&mut *self.slc_k, &mut *self.slc_v),
            _ => (&mut *self.win_k, &mut *self.win_v),
        };
        HeadKvGrad { dk, dv }
    }
}

/// The three branches of one query head: key lists and attention results, in the order
/// compressed, selected, window.
#[derive(Debug, Clone)]
pub struct HeadRow {
    pub keys: [Vec<usize>; BRANCHES],
    pub att: [Attention; BRANCHES],
}

/// Everything one query token computes before the gates.
#[derive(Debug, Clone)]
pub struct Row {
    /// One per query head.
    pub heads: Vec<HeadRow>,
    /// Per KV group: the selected blocks, ascending.
    pub sel: Vec<Vec<usize>>,
    /// Per KV group: the importance `p[t, g, j]` of every admissible block `j`.
    pub scores: Vec<Vec<f64>>,
}

/// Runs the three branches for the query at position `t` of its sequence (`q_row` is
/// `[HQ, dk]`).
pub fn row_forward(cfg: &NsaConfig, dims: &Dims, t: usize, q_row: &[f64], kv: &SeqKv<'_>) -> Row {
    let mut heads = Vec::with_capacity(dims.hq);
    let mut sel = Vec::with_capacity(dims.hkv);
    let mut scores = Vec::with_capacity(dims.hkv);
    let q_of = |h: usize| &q_row[h * dims.dk..(h + 1) * dims.dk];
    for g in 0..dims.hkv {
        let group_heads = g * dims.group..(g + 1) * dims.group;
        // Compressed branch first: its probabilities rank the selection blocks (Eq. 8).
        let cmp_keys = compress::visible_keys(cfg, t);
        let cmp_kv = kv.head(dims, 0, g);
        let cmp_att: Vec<Attention> = group_heads
            .clone()
            .map(|h| attend(q_of(h), dims.scale, &cmp_kv, &cmp_keys))
            .collect();
        let p_cmp: Vec<&[f64]> = cmp_att.iter().map(|a| a.p.as_slice()).collect();
        let p = select::group_scores(cfg, t, &p_cmp);
        let chosen = select::top_n(cfg, t, &p);
        let slc_keys = select::selected_keys(cfg, t, &chosen);
        let win_keys = window::window_keys(cfg, t);
        for (h, c_att) in group_heads.zip(cmp_att) {
            let s_att = attend(q_of(h), dims.scale, &kv.head(dims, 1, g), &slc_keys);
            let w_att = attend(q_of(h), dims.scale, &kv.head(dims, 2, g), &win_keys);
            heads.push(HeadRow {
                keys: [cmp_keys.clone(), slc_keys.clone(), win_keys.clone()],
                att: [c_att, s_att, w_att],
            });
        }
        sel.push(chosen);
        scores.push(p);
    }
    Row { heads, sel, scores }
}

/// Replaces the selection of KV group `g` in `row` (position `t`) by the blocks `chosen`
/// (ascending) and re-attends the group's heads over their tokens: the same function with the
/// top-n taken as given, e.g. a fast path's choice where it differs by a near-tie. Does nothing
/// when `chosen` is the row's own selection.
pub fn use_selection(
    cfg: &NsaConfig,
    dims: &Dims,
    t: usize,
    q_row: &[f64],
    kv: &SeqKv<'_>,
    row: &mut Row,
    g: usize,
    chosen: &[usize],
) {
    if row.sel[g] == chosen {
        return;
    }
    let keys = select::selected_keys(cfg, t, chosen);
    let head_kv = kv.head(dims, 1, g);
    for h in g * dims.group..(g + 1) * dims.group {
        let q = &q_row[h * dims.dk..(h + 1) * dims.dk];
        row.heads[h].att[1] = attend(q, dims.scale, &head_kv, &keys);
        row.heads[h].keys[1] = keys.clone();
    }
    row.sel[g] = chosen.to_vec();
}

/// Gates of one query token: `gates[b][h]` for branch `b` and head `h`.
pub type RowGates<'a> = [&'a [f64]; BRANCHES];

/// The gated output of one token, `[HQ, dv]`.
pub fn row_output(dims: &Dims, row: &Row, gates: RowGates<'_>) -> Vec<f64> {
    let mut out = vec![0.0; dims.hq * dims.dv];
    for (h, hr) in row.heads.iter().enumerate() {
        let g = [gates[0][h], gates[1][h], gates[2][h]];
        let br = [
            hr.att[0].o.as_slice(),
            hr.att[1].o.as_slice(),
            hr.att[2].o.as_slice(),
        ];
        combine(g, br, &mut out[h * dims.dv..(h + 1) * dims.dv]);
    }
    out
}

/// Backward of one token for upstream `d_o_row` (`[HQ, dv]`): **adds** to `dq_row`
/// (`[HQ, dk]`), to the K/V gradients of the sequence and to the gate gradients
/// (`d_gates[b]` is `[HQ]` for this token). The selection is taken as given.
pub fn row_backward(
    dims: &Dims,
    q_row: &[f64],
    kv: &SeqKv<'_>,
    row: &Row,
    gates: RowGates<'_>,
    d_o_row: &[f64],
    dq_row: &mut [f64],
    grad: &mut SeqKvGrad<'_>,
    d_gates: [&mut [f64]; BRANCHES],
) {
    let [dgc, dgs, dgw] = d_gates;
    for (h, hr) in row.heads.iter().enumerate() {
        let g = h / dims.group;
        let q = &q_row[h * dims.dk..(h + 1) * dims.dk];
        let d_o = &d_o_row[h * dims.dv..(h + 1) * dims.dv];
        let gate = [gates[0][h], gates[1][h], gates[2][h]];
        let br = [
            hr.att[0].o.as_slice(),
            hr.att[1].o.as_slice(),
            hr.att[2].o.as_slice(),
        ];
        let (d_gate, d_branch) = combine_backward(gate, br, d_o);
        dgc[h] += d_gate[0];
        dgs[h] += d_gate[1];
        dgw[h] += d_gate[2];
        let dq = &mut dq_row[h * dims.dk..(h + 1) * dims.dk];
        for b in 0..BRANCHES {
            attend_backward(
                q,
                dims.scale,
                &kv.head(dims, b, g),
                &hr.keys[b],
                &hr.att[b],
                &d_branch[b],
                dq,
                &mut grad.branch(b),
            );
        }
    }
}
