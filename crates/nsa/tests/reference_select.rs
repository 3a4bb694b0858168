//! Selection through the whole reference op: Eq. 9 importance against a hand-computed
//! example (l=32, d=16, l'=64: weights 1,2,2,2,1), the group sum, forced blocks, ties to the
//! lower index, and the tie-aware comparison helper.

mod reference_util;

use nsa::reference::{
    backward, backward_with_selection, forward, forward_with_selection, selection_scores,
};
use nsa::testing::check_selection_tie_aware;
use nsa::{NsaConfig, NsaInputs, PhiKind, PhiParams};
use rand::{rngs::StdRng, Rng, SeedableRng};
use reference_util::*;

/// The paper's 32/16/64 geometry, mean `phi`, `dk = dv = 1`, scale 1, one KV group of `g`
/// heads; `n = 3` with forced {block 0, own block}, so one free slot.
fn eq9_cfg(g: usize) -> NsaConfig {
    NsaConfig::builder()
        .heads(g)
        .kv_heads(1)
        .cmp_block(32)
        .cmp_stride(16)
        .sel_block(64)
        .sel_count(3)
        .init_blocks(1)
        .local_blocks(1)
        .window(8)
        .scale(1.0)
        .phi(PhiKind::Mean)
        .build()
        .unwrap()
}

/// Inputs whose compressed keys are `ln a_i`: every stride chunk `m` (16 tokens) holds the
/// constant key `u_m`, so compressed key `i` (mean of chunks `i`, `i+1`) is
/// `(u_i + u_{i+1}) / 2`; choose `u_{i+1} = 2 ln a_i - u_i`. With `q = 1`, `dk = 1` and
/// scale 1 the compression probabilities of a query seeing blocks `0..m` are
/// `p_i = a_i / sum_{i<m} a_i`.
fn eq9_inputs(cfg: &NsaConfig, len: usize, a: &[f64], q: f64) -> NsaInputs<f64> {
    let chunks = len / 16 + 1;
    let mut u = vec![0.0; chunks + 1];
    for i in 0..chunks {
        u[i + 1] = 2.0 * a.get(i).copied().unwrap_or(1.0).ln() - u[i];
    }
    let mut x = inputs(cfg, &[len], 1, 1, 5);
    for s in 0..len {
        x.k_cmp[s] = u[s / 16];
    }
    x.q.iter_mut().for_each(|v| *v = q);
    x
}

/// `p[j]` by hand: block 0 takes compressed blocks 0..3 with weights 2,2,2,1; block j >= 1
/// takes 4j-1 .. 4j+3 with weights 1,2,2,2,1 (only those visible, i < m).
fn hand_scores(p: &[f64], blocks: usize) -> Vec<f64> {
    let get = |i: usize| p.get(i).copied().unwrap_or(0.0);
    (0..blocks)
        .map(|j| {
            if j == 0 {
                2.0 * get(0) + 2.0 * get(1) + 2.0 * get(2) + get(3)
            } else {
                let w = [1.0, 2.0, 2.0, 2.0, 1.0];
                (0..5).map(|k| w[k] * get(4 * j - 1 + k)).sum()
            }
        })
        .collect()
}

#[test]
fn eq9_scores_match_the_hand_computed_weights() {
    let len = 320;
    let mut rng = StdRng::seed_from_u64(9);
    let a: Vec<f64> = (0..len / 16)
        .map(|_| 1.0 + 9.0 * rng.gen::<f64>())
        .collect();
    for g in [1, 3] {
        let cfg = eq9_cfg(g);
        let x = eq9_inputs(&cfg, len, &a, 1.0);
        let phi = PhiParams::mean();
        let (scores, max_blocks) = selection_scores(&cfg, &x, &phi).unwrap();
        assert_eq!(max_blocks, 5);
        let out = forward(&cfg, &x, &phi).unwrap();
        for t in [31, 47, 63, 64, 100, 200, 255, 256, 300, 319] {
            // compressed blocks visible at t: i*16 + 31 <= t
            let m = if t >= 31 { (t - 31) / 16 + 1 } else { 0 };
            let z: f64 = a[..m].iter().sum();
            let p: Vec<f64> = a[..m].iter().map(|ai| ai / z).collect();
            let admissible = t / 64 + 1;
            let want: Vec<f64> = hand_scores(&p, admissible)
                .iter()
                .map(|s| s * g as f64)
                .collect();
            let got = &scores[t * max_blocks..(t + 1) * max_blocks];
            for j in 0..max_blocks {
                if j < admissible {
                    assert!(
                        (got[j] - want[j]).abs() < 1e-12,
                        "g={g} t={t} j={j}: {} vs {}",
                        got[j],
                        want[j]
                    );
                } else {
                    assert_eq!(got[j], f64::NEG_INFINITY, "t={t} j={j}");
                }
            }
            // The selection: forced 0 and own block, plus the best other block (if any).
            let own = t / 64;
            let mut sel = vec![0usize];
            if own > 0 {
                sel.push(own);
            }
            if let Some(best) =
                (1..own).max_by(|&i, &k| want[i].total_cmp(&want[k]).then(k.cmp(&i)))
            {
                sel.push(best);
            }
            sel.sort_unstable();
            let mut row: Vec<i32> = sel.iter().map(|&j| j as i32).collect();
            row.resize(3, -1);
            assert_eq!(&out.sel_idx[t * 3..t * 3 + 3], &row[..], "g={g} t={t}");
        }
    }
}

#[test]
fn equal_scores_go_to_the_lower_block() {
    // q = 0: every compressed logit is 0, so p is uniform and blocks 1, 2, 3 of t = 319 all
    // score 8/19 exactly; the free slot must go to block 1. At t = 255 (blocks 0..3, own 3),
    // blocks 1 and 2 tie and 1 wins.
    let cfg = eq9_cfg(2);
    let x = eq9_inputs(&cfg, 320, &[1.0; 20], 0.0);
    let phi = PhiParams::mean();
    let (scores, mb) = selection_scores(&cfg, &x, &phi).unwrap();
    let s = &scores[319 * mb..320 * mb];
    assert_eq!(s[1], s[2]);
    assert_eq!(s[2], s[3]);
    let out = forward(&cfg, &x, &phi).unwrap();
    assert_eq!(&out.sel_idx[319 * 3..320 * 3], &[0, 1, 4]);
    assert_eq!(&out.sel_idx[255 * 3..256 * 3], &[0, 1, 3]);
}

#[test]
fn forced_blocks_are_selected_even_with_the_lowest_scores() {
    // Make block 0's and the own block's compressed keys very unlikely: the top-n still holds
    // them, and the free slots take the best others.
    let cfg = NsaConfig {
        sel_count: 4,
        ..eq9_cfg(1)
    };
    let len = 400; // 7 selection blocks for the last token
    let mut a = vec![1.0; 25];
    for ai in a.iter_mut().take(4) {
        *ai = 1e-6; // blocks 0..3 feed selection block 0
    }
    for ai in a.iter_mut().skip(19) {
        *ai = 1e-6; // blocks 19.. feed selection blocks 5, 6
    }
    a[10] = 50.0; // selection block 2 (compressed 7..11) and 3 (11..15)
    a[13] = 40.0;
    let x = eq9_inputs(&cfg, len, &a, 1.0);
    let out = forward(&cfg, &x, &PhiParams::mean()).unwrap();
    let t = len - 1;
    assert_eq!(&out.sel_idx[t * 4..t * 4 + 4], &[0, 2, 3, 6]);
}

#[test]
fn tie_aware_check_accepts_ties_and_rejects_the_rest() {
    let cfg = eq9_cfg(2);
    let x = eq9_inputs(&cfg, 320, &[1.0; 20], 0.0);
    let phi = PhiParams::mean();
    let (scores, mb) = selection_scores(&cfg, &x, &phi).unwrap();
    let want = forward(&cfg, &x, &phi).unwrap().sel_idx;
    let cu = &x.cu_seqlens;
    assert_eq!(
        check_selection_tie_aware(&cfg, cu, &want, &want, &scores, mb),
        Ok(())
    );
    // t = 319: [0, 1, 4] -> [0, 3, 4] replaces block 1 by block 3 of equal score: accepted.
    let mut tie = want.clone();
    tie[319 * 3..320 * 3].copy_from_slice(&[0, 3, 4]);
    assert_eq!(
        check_selection_tie_aware(&cfg, cu, &want, &tie, &scores, mb),
        Ok(())
    );
    // Dropping a forced block for a tied one: rejected.
    let mut no_forced = want.clone();
    no_forced[319 * 3..320 * 3].copy_from_slice(&[1, 2, 4]);
    assert!(check_selection_tie_aware(&cfg, cu, &want, &no_forced, &scores, mb).is_err());
    // Not ascending, padding inside, inadmissible, or fewer blocks: rejected.
    for bad in [[0, 4, 3], [0, -1, 4], [0, 1, 5], [0, 4, -1]] {
        let mut b = want.clone();
        b[319 * 3..320 * 3].copy_from_slice(&bad);
        assert!(
            check_selection_tie_aware(&cfg, cu, &want, &b, &scores, mb).is_err(),
            "{bad:?}"
        );
    }

    // With distinct scores, swapping a free block for a lower-scoring one is rejected.
    let mut rng = StdRng::seed_from_u64(3);
    let a: Vec<f64> = (0..20).map(|_| 1.0 + 9.0 * rng.gen::<f64>()).collect();
    let x = eq9_inputs(&cfg, 320, &a, 1.0);
    let (scores, mb) = selection_scores(&cfg, &x, &phi).unwrap();
    let want = forward(&cfg, &x, &phi).unwrap().sel_idx;
    let free = want[319 * 3 + 1];
    let other = (1..4).find(|&j| j != free).unwrap();
    let mut swapped = want.clone();
    swapped[319 * 3 + 1] = other;
    assert!(check_selection_tie_aware(&cfg, &x.cu_seqlens, &want, &swapped, &scores, mb).is_err());
    // Size mismatches are reported, not panicked on.
    assert!(
        check_selection_tie_aware(&cfg, &x.cu_seqlens, &want, &want[1..], &scores, mb).is_err()
    );
}

#[test]
fn scores_of_a_varlen_batch_are_per_sequence() {
    // selection_scores of a packed batch equals that of each sequence alone, padded with
    // -inf to the batch's max_blocks.
    let cfg = small_cfg(4, 2, PhiKind::Linear);
    let x = inputs(&cfg, &[30, 9, 17], 3, 2, 77);
    let phi = phi(&cfg, 3, 2, 78);
    let (all, mb) = selection_scores(&cfg, &x, &phi).unwrap();
    assert_eq!(mb, 4);
    for b in 0..3 {
        let xs = x.sequence(b);
        let (one, mb1) = selection_scores(&cfg, &xs, &phi).unwrap();
        for (t, i) in x.seq_range(b).enumerate() {
            for g in 0..2 {
                let got = &all[(i * 2 + g) * mb..(i * 2 + g + 1) * mb];
                let want = &one[(t * 2 + g) * mb1..(t * 2 + g + 1) * mb1];
                assert_eq!(&got[..mb1], want);
                assert!(got[mb1..].iter().all(|&v| v == f64::NEG_INFINITY));
            }
        }
    }
}

/// The reference with a given selection: its own selection gives back `forward` / `backward`
/// bit for bit; a changed free block changes exactly the selected branch of that (token, group),
/// whose output is then attention over the given blocks' tokens (checked with a softmax written
/// here); malformed selections are typed errors.
#[test]
fn a_given_selection_replaces_the_top_n() {
    let cfg = small_cfg(4, 2, PhiKind::Linear); // l' = 8, n = 3: block 0 and own block forced
    let (dk, dv) = (3, 2);
    let mut x = inputs(&cfg, &[29, 17], dk, dv, 11);
    set_gates(&mut x, [0.3, 1.0, 0.6]);
    let phi = phi(&cfg, dk, dv, 12);
    let own = forward(&cfg, &x, &phi).unwrap();
    let same = forward_with_selection(&cfg, &x, &phi, &own.sel_idx).unwrap();
    assert_eq!(same.o, own.o);
    assert_eq!(same.sel_idx, own.sel_idx);
    let mut rng = StdRng::seed_from_u64(13);
    let d_o: Vec<f64> = (0..own.o.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let g_own = backward(&cfg, &x, &phi, &d_o).unwrap();
    let g_same = backward_with_selection(&cfg, &x, &phi, &d_o, &own.sel_idx).unwrap();
    assert_eq!(g_same.dq, g_own.dq);
    assert_eq!(g_same.dk_slc, g_own.dk_slc);
    assert_eq!(g_same.dphi, g_own.dphi);

    // token 28 of the first sequence sees blocks 0..=3; forced {0, 3}, one free of {1, 2}
    let (i, t, g, n) = (28usize, 28usize, 1usize, cfg.sel_count);
    let (hq, hkv, group) = (cfg.heads, cfg.kv_heads, cfg.group_size());
    let at = (i * hkv + g) * n;
    let mine = &own.sel_idx[at..at + n];
    assert_eq!((mine[0], mine[2]), (0, 3), "forced blocks: {mine:?}");
    let other = if mine[1] == 1 { 2 } else { 1 };
    let mut sel = own.sel_idx.clone();
    sel[at + 1] = other;
    let changed = forward_with_selection(&cfg, &x, &phi, &sel).unwrap();
    assert_eq!(changed.sel_idx, sel);
    for r in 0..x.num_tokens() * hq {
        let touched = r / hq == i && (r % hq) / group == g;
        let (a, b) = (
            &changed.o[r * dv..(r + 1) * dv],
            &own.o[r * dv..(r + 1) * dv],
        );
        assert_eq!(a != b, touched, "row {r}: {a:?} vs {b:?}");
    }
    // with the selected gate at 1, the change is exactly o_slc(new) - o_slc(old)
    let scale = cfg.softmax_scale(dk);
    let attend_blocks = |h: usize, blocks: &[i32]| -> Vec<f64> {
        let keys: Vec<usize> = blocks
            .iter()
            .flat_map(|&b| (b as usize * 8..(b as usize + 1) * 8).filter(|&s| s <= t))
            .collect();
        let q = &x.q[(i * hq + h) * dk..(i * hq + h + 1) * dk];
        let logits: Vec<f64> = keys
            .iter()
            .map(|&s| {
                let k = &x.k_slc[(s * hkv + g) * dk..(s * hkv + g + 1) * dk];
                scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>()
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let z: f64 = w.iter().sum();
        (0..dv)
            .map(|c| {
                keys.iter()
                    .zip(&w)
                    .map(|(&s, wi)| wi / z * x.v_slc[(s * hkv + g) * dv + c])
                    .sum()
            })
            .collect()
    };
    for h in g * group..(g + 1) * group {
        let (new, old) = (attend_blocks(h, &sel[at..at + n]), attend_blocks(h, mine));
        for c in 0..dv {
            let r = (i * hq + h) * dv + c;
            let want = new[c] - old[c];
            let got = changed.o[r] - own.o[r];
            assert!(
                (got - want).abs() < 1e-12,
                "head {h} dim {c}: {got} vs {want}"
            );
        }
    }
    let g_changed = backward_with_selection(&cfg, &x, &phi, &d_o, &sel).unwrap();
    for r in 0..x.num_tokens() * hq {
        let touched = r / hq == i && (r % hq) / group == g;
        let (a, b) = (
            &g_changed.dq[r * dk..(r + 1) * dk],
            &g_own.dq[r * dk..(r + 1) * dk],
        );
        assert_eq!(a != b, touched, "dq row {r}");
    }
    // the swapped-in block's keys now get gradient from token 28
    let new_block = other as usize * 8..(other as usize + 1) * 8;
    let moved = new_block.clone().any(|s| {
        let k = (s * hkv + g) * dk;
        g_changed.dk_slc[k..k + dk] != g_own.dk_slc[k..k + dk]
    });
    assert!(moved, "dk_slc of block {other} unchanged");

    // malformed selections
    let bad = |sel: &[i32]| forward_with_selection(&cfg, &x, &phi, sel).unwrap_err();
    assert!(matches!(
        bad(&sel[1..]),
        nsa::NsaError::ShapeMismatch { .. }
    ));
    let mut unsorted = sel.clone();
    unsorted.swap(at, at + 1);
    assert!(matches!(bad(&unsorted), nsa::NsaError::Unsupported(_)));
    let mut ahead = sel.clone();
    ahead[at + 2] = 4; // block 4 starts after position 28
    assert!(matches!(bad(&ahead), nsa::NsaError::Unsupported(_)));
    let mut gap = sel.clone();
    gap[at + 1] = -1; // padding before a block
    assert!(matches!(bad(&gap), nsa::NsaError::Unsupported(_)));
    assert!(backward_with_selection(&cfg, &x, &phi, &d_o, &gap).is_err());
}
