//! The forward driver: query tiles in parallel (rayon), each running the three branches for
//! every KV group and mixing them (see the module documentation of [`super`]).

use super::attend::{gather_rows, Seg};
use super::compress::{self, CmpKv};
use super::phi::{self, BlockLayout};
use super::thin;
use super::thin::ThinScratch;
use super::tile::{ensure, MatRef};
use super::{combine, kv_rows, select, split_tiles, tiles, window, Dims, Saved};
use crate::blocks;
use crate::config::NsaConfig;
use crate::inputs::{NsaInputs, NsaOutput, PhiParams};
use rayon::prelude::*;

/// Per-thread scratch of a forward tile (contents are always written before being read).
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    /// The tile's `Q^T` (`[dk, lanes]`), shared by the three branches.
    qt: Vec<f32>,
    thin: ThinScratch,
    /// The selection's (the compression probabilities stay in `thin` meanwhile).
    sthin: ThinScratch,
    ranges: Vec<(usize, usize)>,
    ob: [Vec<f32>; 3],
    lse: [Vec<f32>; 3],
    runs: Vec<(usize, usize)>,
    psum: Vec<f32>,
    scores: Vec<f32>,
    best: Vec<(f32, usize)>,
}

/// A tile's rows of the per-branch outputs and lse (cmp, slc, win) kept for the backward.
type Kept<'a> = ([&'a mut [f32]; 3], [&'a mut [f32]; 3]);

/// The outputs one tile owns.
struct TileOut<'a> {
    b: usize,
    t0: usize,
    t1: usize,
    o: &'a mut [f32],
    /// The per-branch outputs and lse kept for the backward (`None`: forward only).
    keep: Option<Kept<'a>>,
    sel: &'a mut [i32],
}

/// The forward; with `save`, also what the backward needs (per-branch outputs and lse, three
/// `[N, HQ, dv]` buffers more, so the forward alone does not allocate or write them).
pub(crate) fn run(
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi_params: &PhiParams<f32>,
    save: bool,
) -> (NsaOutput<f32>, Option<Saved>) {
    let dims = Dims::new(cfg, x.dk, x.dv);
    let lay = BlockLayout::new(cfg, &x.cu_seqlens);
    let (pk, pv) = phi::phis(cfg, phi_params, x.dk, x.dv);
    let (kc, vc) = rayon::join(|| pk.forward(&lay, &x.k_cmp), || pv.forward(&lay, &x.v_cmp));
    let n = x.num_tokens();
    let (hq, dv) = (dims.hq, dims.dv);
    let mut o = vec![0.0f32; n * hq * dv];
    let kept = if save { n } else { 0 };
    let mut ob: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0f32; kept * hq * dv]);
    let mut lse: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0f32; kept * hq]);
    let mut sel = vec![-1i32; n * dims.hkv * dims.n];
    {
        let tl = tiles(&x.cu_seqlens, dims.tile_tokens());
        let [ob0, ob1, ob2] = &mut ob;
        let [l0, l1, l2] = &mut lse;
        let mut parts: Vec<TileOut<'_>> = Vec::with_capacity(tl.len());
        let mut o_it = split_tiles(&mut o, hq * dv, &tl).into_iter();
        let empty: Vec<(usize, usize, usize)> = Vec::new();
        let kept_tiles = if save { &tl } else { &empty };
        let mut ob_it = [ob0, ob1, ob2].map(|v| split_tiles(v, hq * dv, kept_tiles).into_iter());
        let mut l_it = [l0, l1, l2].map(|v| split_tiles(v, hq, kept_tiles).into_iter());
        let mut s_it = split_tiles(&mut sel, dims.hkv * dims.n, &tl).into_iter();
        for &(b, t0, t1) in &tl {
            parts.push(TileOut {
                b,
                t0,
                t1,
                o: o_it.next().unwrap(),
                keep: save.then(|| {
                    (
                        std::array::from_fn(|k| ob_it[k].next().unwrap()),
                        std::array::from_fn(|k| l_it[k].next().unwrap()),
                    )
                }),
                sel: s_it.next().unwrap(),
            });
        }
        let kv = CmpKv::new(&lay, &kc, &vc);
        parts
            .into_par_iter()
            .for_each_init(Scratch::default, |scr, part| {
                tile(&dims, x, &kv, part, scr);
            });
    }
    let saved = save.then(|| Saved {
        lay,
        kc,
        vc,
        o_branch: ob,
        lse,
        sel_idx: sel.clone(),
    });
    (NsaOutput { o, sel_idx: sel }, saved)
}

fn tile(dims: &Dims, x: &NsaInputs<f32>, kv: &CmpKv<'_>, part: TileOut<'_>, scr: &mut Scratch) {
    let TileOut {
        b,
        t0,
        t1,
        o,
        mut keep,
        sel,
    } = part;
    let Scratch {
        q,
        qt: qt_tile,
        thin,
        sthin,
        ranges,
        ob: sob,
        lse: slse,
        runs,
        psum,
        scores,
        best,
    } = scr;
    let (hq, hkv, gs, dk, dv, n) = (dims.hq, dims.hkv, dims.g, dims.dk, dims.dv, dims.n);
    let s0 = x.cu_seqlens[b];
    let rows = (t1 - t0) * gs;
    for k in 0..3 {
        ensure(&mut sob[k], rows * dv);
        ensure(&mut slse[k], rows);
    }
    let mut segs: Vec<Seg<'_>> = Vec::with_capacity(n);
    for g in 0..hkv {
        gather_rows(&x.q, hq, gs, dk, s0, g, t0..t1, q, dims.scale);
        let [oc, os, ow] = sob;
        let [lc, ls, lw] = slse;
        // The tile's rows (token-major, the `G` heads of the group inner) are the lanes of
        // thin tiles: no key is packed or copied.
        let qm = MatRef::rows(q, rows, dk);
        thin::pack_query(qm, qt_tile);
        let ldq = thin::lanes(rows);

        // Sliding window: one key span for the tile, each row its own range.
        let (k0, k1) = window::span(dims, t0, t1);
        window::ranges(dims, t0, t1, k0, k1, ranges);
        let wseg = Seg {
            k: kv_rows(&x.k_win, hkv, dk, g, s0 + k0, k1 - k0),
            v: kv_rows(&x.v_win, hkv, dv, g, s0 + k0, k1 - k0),
        };
        thin::forward_packed(
            qt_tile,
            rows,
            &[wseg],
            Some(ranges),
            thin,
            &mut ow[..rows * dv],
            &mut lw[..rows],
            false,
        );

        // Compression branch over the compressed tokens visible to the tile's last token;
        // its probabilities stay in the scratch for the importance scores.
        let nv = blocks::cmp_visible(t1 - 1, dims.l, dims.d);
        compress::ranges(dims, t0, t1, 0, nv, ranges);
        let cseg = kv.seg(dims, b, g, 0, nv);
        thin::forward_packed(
            qt_tile,
            rows,
            &[cseg],
            Some(ranges),
            thin,
            &mut oc[..rows * dv],
            &mut lc[..rows],
            true,
        );
        let (probs, w) = thin.probs();

        // Selection, token by token: importance + top-n, then the selected blocks' attention.
        for t in t0..t1 {
            let r0 = (t - t0) * gs;
            let qt = MatRef::rows(&q[r0 * dk..], gs, dk);
            let orow = r0 * dv..(r0 + gs) * dv;
            let nvis = blocks::cmp_visible(t, dims.l, dims.d);
            let p = probs.get(r0..).unwrap_or(&[]);
            select::importance(dims, t, p, 1, w, nvis, psum, scores);
            let row = &mut sel[((t - t0) * hkv + g) * n..][..n];
            select::top_n(dims, scores, best, row);
            select::runs(dims.lp, t, row, runs);
            select::segments(dims, &x.k_slc, &x.v_slc, s0, g, runs, &mut segs);
            let (ot, lt) = (&mut os[orow], &mut ls[r0..r0 + gs]);
            if gs.is_multiple_of(8) {
                // The token's lanes of the tile's `Q^T`, read in place.
                thin::forward_strided(&qt_tile[r0..], ldq, gs, &segs, None, sthin, ot, lt, false);
            } else {
                select::forward_token(qt, &segs, sthin, ot, lt);
            }
        }

        // The gates, and the group's rows to (token, head) order.
        for t in t0..t1 {
            let (r0, h0) = ((t - t0) * gs, (t - t0) * hq + g * gs);
            let rr = r0 * dv..(r0 + gs) * dv;
            let at = (s0 + t) * hq + g * gs..(s0 + t) * hq + (g + 1) * gs;
            combine::mix(
                [&x.g_cmp[at.clone()], &x.g_slc[at.clone()], &x.g_win[at]],
                [
                    &sob[0][rr.clone()],
                    &sob[1][rr.clone()],
                    &sob[2][rr.clone()],
                ],
                &mut o[h0 * dv..(h0 + gs) * dv],
                dv,
            );
            if let Some((ob, lse)) = keep.as_mut() {
                for k in 0..3 {
                    ob[k][h0 * dv..(h0 + gs) * dv].copy_from_slice(&sob[k][rr.clone()]);
                    lse[k][h0..h0 + gs].copy_from_slice(&slse[k][r0..r0 + gs]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_alone_equals_the_saving_forward_bitwise() {
        let cfg = NsaConfig::builder()
            .heads(4)
            .kv_heads(2)
            .cmp_block(8)
            .cmp_stride(4)
            .sel_block(8)
            .sel_count(5)
            .window(12)
            .build()
            .unwrap();
        let x = NsaInputs::random(&cfg, &[45, 70], 16, 8, false, 3);
        let phi = PhiParams::random(&cfg, 16, 8, 32, 4);
        let (a, none) = run(&cfg, &x, &phi, false);
        let (b, saved) = run(&cfg, &x, &phi, true);
        assert!(none.is_none());
        let saved = saved.unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.o), bits(&b.o));
        assert_eq!(a.sel_idx, b.sel_idx);
        assert_eq!(saved.sel_idx, b.sel_idx);
        // The saved branch outputs mix back into the output.
        let mut o = vec![0.0f32; b.o.len()];
        let ob = &saved.o_branch;
        combine::mix(
            [&x.g_cmp, &x.g_slc, &x.g_win],
            [&ob[0], &ob[1], &ob[2]],
            &mut o,
            x.dv,
        );
        assert_eq!(bits(&o), bits(&b.o));
        assert!(b.o.iter().any(|&v| v != 0.0));
    }
}
