//! Prefix invariance, decoding (step by step, chunked prefill, batches of different lengths)
//! and packed variable-length batches against the reference forward/backward.

mod reference_util;

use nsa::cache::DecodeCache;
use nsa::reference::{backward, decode, forward};
use nsa::{NsaConfig, NsaInputs, PhiKind, PhiParams};
use reference_util::*;

/// Rows `range` of a `[N, per]` tensor.
fn rows<T: Copy>(v: &[T], range: std::ops::Range<usize>, per: usize) -> Vec<T> {
    v[range.start * per..range.end * per].to_vec()
}

fn setup(
    kind: PhiKind,
    hq: usize,
    hkv: usize,
    len: usize,
    seed: u64,
) -> (NsaConfig, NsaInputs<f64>, PhiParams<f64>) {
    let cfg = small_cfg(hq, hkv, kind);
    let x = inputs(&cfg, &[len], 3, 2, seed);
    let p = phi(&cfg, 3, 2, seed + 1);
    (cfg, x, p)
}

#[test]
fn prefix_invariance() {
    for kind in [PhiKind::Mean, PhiKind::Linear, PhiKind::Mlp] {
        let (cfg, x, phi) = setup(kind, 4, 2, 40, 1);
        let full = forward(&cfg, &x, &phi).unwrap();
        let (ro, rs) = (cfg.heads * x.dv, cfg.kv_heads * cfg.sel_count);
        for p in [1, 2, 3, 4, 5, 8, 9, 17, 24, 33, 39] {
            let pre = forward(&cfg, &tokens(&x, 0..p), &phi).unwrap();
            assert_eq!(pre.o, rows(&full.o, 0..p, ro), "{kind:?} prefix {p}");
            assert_eq!(
                pre.sel_idx,
                rows(&full.sel_idx, 0..p, rs),
                "{kind:?} prefix {p}"
            );
        }
    }
}

#[test]
fn decode_steps_equal_forward_rows() {
    for (kind, hq, hkv) in [
        (PhiKind::Mean, 2, 2),
        (PhiKind::Mlp, 6, 2),
        (PhiKind::Linear, 4, 1),
    ] {
        let (cfg, x, phi) = setup(kind, hq, hkv, 37, 10);
        let full = forward(&cfg, &x, &phi).unwrap();
        let (ro, rs) = (cfg.heads * x.dv, cfg.kv_heads * cfg.sel_count);
        let mut cache = DecodeCache::new(&cfg, 1, 3, 2).unwrap();
        for t in 0..37 {
            let out = decode::step(&cfg, &mut cache, &tokens(&x, t..t + 1), &phi).unwrap();
            let err = max_diff(&out.o, &rows(&full.o, t..t + 1, ro));
            assert!(err <= 1e-12, "{kind:?} step {t}: {err}");
            assert_eq!(
                out.sel_idx,
                rows(&full.sel_idx, t..t + 1, rs),
                "{kind:?} step {t}"
            );
        }
        assert_eq!(cache.seqs[0].len(), 37);
        assert_eq!(
            cache.seqs[0].num_cmp(),
            nsa::blocks::cmp_blocks_in(37, 4, 2)
        );
    }
}

#[test]
fn chunked_prefill_equals_single_prefill_and_forward() {
    let (cfg, x, phi) = setup(PhiKind::Mlp, 4, 2, 45, 20);
    let full = forward(&cfg, &x, &phi).unwrap();
    let (ro, rs) = (cfg.heads * x.dv, cfg.kv_heads * cfg.sel_count);

    let mut single = DecodeCache::new(&cfg, 1, 3, 2).unwrap();
    let one = decode::prefill(&cfg, &mut single, 0, &tokens(&x, 0..37), &phi).unwrap();
    assert!(max_diff(&one.o, &rows(&full.o, 0..37, ro)) <= 1e-12);
    assert_eq!(one.sel_idx, rows(&full.sel_idx, 0..37, rs));

    // Chunks cut inside compression blocks, at block edges, and one token long.
    let mut chunked = DecodeCache::new(&cfg, 1, 3, 2).unwrap();
    let mut o = vec![];
    let mut sel = vec![];
    for r in [0..5, 5..6, 6..19, 19..37] {
        let out = decode::prefill(&cfg, &mut chunked, 0, &tokens(&x, r), &phi).unwrap();
        o.extend(out.o);
        sel.extend(out.sel_idx);
    }
    assert_eq!(o, one.o);
    assert_eq!(sel, one.sel_idx);
    assert_eq!(chunked, single, "the caches hold the same state");

    // Decode steps continue where the prefill stopped.
    for t in 37..45 {
        let out = decode::step(&cfg, &mut chunked, &tokens(&x, t..t + 1), &phi).unwrap();
        assert!(
            max_diff(&out.o, &rows(&full.o, t..t + 1, ro)) <= 1e-12,
            "step {t}"
        );
        assert_eq!(out.sel_idx, rows(&full.sel_idx, t..t + 1, rs));
    }
}

#[test]
fn batch_decode_with_sequences_of_different_lengths() {
    let cfg = small_cfg(4, 2, PhiKind::Linear);
    let phi = phi(&cfg, 3, 2, 31);
    // Prefilled lengths 3, 0 (empty until the first step) and 22, then 16 steps each.
    let prefilled = [3usize, 0, 22];
    let steps = 16;
    let full: Vec<NsaInputs<f64>> = prefilled
        .iter()
        .enumerate()
        .map(|(b, &p)| inputs(&cfg, &[p + steps], 3, 2, 40 + b as u64))
        .collect();
    let want: Vec<_> = full
        .iter()
        .map(|x| forward(&cfg, x, &phi).unwrap())
        .collect();
    let (ro, rs) = (cfg.heads * 2, cfg.kv_heads * cfg.sel_count);

    let mut cache = DecodeCache::new(&cfg, 3, 3, 2).unwrap();
    for (b, &p) in prefilled.iter().enumerate() {
        if p > 0 {
            decode::prefill(&cfg, &mut cache, b, &tokens(&full[b], 0..p), &phi).unwrap();
        }
    }
    assert_eq!(cache.lens(), vec![3, 0, 22]);
    for s in 0..steps {
        let step_in = concat(
            &(0..3)
                .map(|b| tokens(&full[b], prefilled[b] + s..prefilled[b] + s + 1))
                .collect::<Vec<_>>(),
        );
        let out = decode::step(&cfg, &mut cache, &step_in, &phi).unwrap();
        for b in 0..3 {
            let t = prefilled[b] + s;
            let err = max_diff(&rows(&out.o, b..b + 1, ro), &rows(&want[b].o, t..t + 1, ro));
            assert!(err <= 1e-12, "seq {b} token {t}: {err}");
            assert_eq!(
                rows(&out.sel_idx, b..b + 1, rs),
                rows(&want[b].sel_idx, t..t + 1, rs)
            );
        }
    }
    assert_eq!(cache.lens(), vec![3 + steps, steps, 22 + steps]);
}

#[test]
fn varlen_forward_and_backward_equal_a_loop_over_sequences() {
    for kind in [PhiKind::Mean, PhiKind::Mlp] {
        let cfg = small_cfg(6, 2, kind);
        let x = inputs(&cfg, &[30, 1, 9, 17, 4], 3, 2, 50);
        let phi = phi(&cfg, 3, 2, 51);
        let d_o: Vec<f64> = inputs(&cfg, &[x.num_tokens()], 2, 2, 52)
            .q
            .iter()
            .take(x.num_tokens() * cfg.heads * 2)
            .copied()
            .collect();
        let packed = forward(&cfg, &x, &phi).unwrap();
        let gp = backward(&cfg, &x, &phi, &d_o).unwrap();
        let (hq, hkv, n) = (cfg.heads, cfg.kv_heads, cfg.sel_count);
        let mut dphi_sum: Vec<Vec<f64>> = gp
            .dphi
            .named_tensors(&cfg, 3, 2)
            .iter()
            .map(|(_, _, t)| vec![0.0; t.len()])
            .collect();
        for b in 0..x.num_seqs() {
            let r = x.seq_range(b);
            let xs = x.sequence(b);
            let one = forward(&cfg, &xs, &phi).unwrap();
            assert_eq!(
                one.o,
                rows(&packed.o, r.clone(), hq * 2),
                "{kind:?} seq {b}"
            );
            assert_eq!(one.sel_idx, rows(&packed.sel_idx, r.clone(), hkv * n));
            let g1 = backward(&cfg, &xs, &phi, &rows(&d_o, r.clone(), hq * 2)).unwrap();
            for (got, want, per) in [
                (&g1.dq, &gp.dq, hq * 3),
                (&g1.dk_cmp, &gp.dk_cmp, hkv * 3),
                (&g1.dv_cmp, &gp.dv_cmp, hkv * 2),
                (&g1.dk_slc, &gp.dk_slc, hkv * 3),
                (&g1.dv_slc, &gp.dv_slc, hkv * 2),
                (&g1.dk_win, &gp.dk_win, hkv * 3),
                (&g1.dv_win, &gp.dv_win, hkv * 2),
                (&g1.dg_cmp, &gp.dg_cmp, hq),
                (&g1.dg_slc, &gp.dg_slc, hq),
                (&g1.dg_win, &gp.dg_win, hq),
            ] {
                assert_eq!(got, &rows(want, r.clone(), per), "{kind:?} seq {b}");
            }
            for (acc, (_, _, t)) in dphi_sum.iter_mut().zip(g1.dphi.named_tensors(&cfg, 3, 2)) {
                acc.iter_mut().zip(t).for_each(|(a, v)| *a += v);
            }
        }
        for (sum, (name, _, t)) in dphi_sum.iter().zip(gp.dphi.named_tensors(&cfg, 3, 2)) {
            assert!(max_diff(sum, t) < 1e-12, "{kind:?} {name}");
        }
    }
}
