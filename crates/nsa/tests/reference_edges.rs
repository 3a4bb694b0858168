//! Reference forward/backward at the edges of visibility, and against independent dense
//! computations in the configurations where NSA reduces to them.

mod reference_util;

use nsa::blocks;
use nsa::reference::{backward, forward};
use nsa::{NsaConfig, NsaInputs, PhiKind, PhiParams};
use reference_util::*;

/// Independent compressed-branch output for mean `phi`: pools `[i*d, i*d+l)` by hand and
/// attends to the blocks that end at or before `t`; exactly 0 when there are none.
fn dense_mean_compressed(cfg: &NsaConfig, x: &NsaInputs<f64>) -> Vec<f64> {
    let (hq, hkv, dk, dv) = (cfg.heads, cfg.kv_heads, x.dk, x.dv);
    let (l, d) = (cfg.cmp_block, cfg.cmp_stride);
    let scale = 1.0 / (dk as f64).sqrt();
    let mut out = vec![0.0; x.num_tokens() * hq * dv];
    for seq in x.cu_seqlens.windows(2) {
        let (s0, len) = (seq[0], seq[1] - seq[0]);
        let pool = |src: &[f64], dim: usize, i: usize, kvh: usize| -> Vec<f64> {
            (0..dim)
                .map(|c| {
                    (i * d..i * d + l)
                        .map(|s| src[((s0 + s) * hkv + kvh) * dim + c])
                        .sum::<f64>()
                        / l as f64
                })
                .collect()
        };
        for t in 0..len {
            let vis: Vec<usize> = (0..len).filter(|&i| i * d + l <= t + 1).collect();
            for h in 0..hq {
                let kvh = h / (hq / hkv);
                let q = &x.q[((s0 + t) * hq + h) * dk..((s0 + t) * hq + h + 1) * dk];
                let logits: Vec<f64> = vis
                    .iter()
                    .map(|&i| {
                        let k = pool(&x.k_cmp, dk, i, kvh);
                        scale * q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>()
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|s| (s - m).exp()).sum();
                for (&i, s) in vis.iter().zip(&logits) {
                    let v = pool(&x.v_cmp, dv, i, kvh);
                    for c in 0..dv {
                        out[((s0 + t) * hq + h) * dv + c] += (s - m).exp() / z * v[c];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn all_blocks_selected_equals_dense_causal_attention() {
    for (hq, hkv) in [(2, 2), (6, 2)] {
        // n = 5 >= the 5 selection blocks of a 37-token sequence (l' = 8).
        let cfg = NsaConfig {
            sel_count: 5,
            ..small_cfg(hq, hkv, PhiKind::Linear)
        };
        let mut x = inputs(&cfg, &[37, 11, 1], 3, 2, 7);
        set_gates(&mut x, [0.0, 1.0, 0.0]);
        let phi = phi(&cfg, 3, 2, 8);
        let got = forward(&cfg, &x, &phi).unwrap();
        let want = dense_causal(&cfg, &x, &x.k_slc, &x.v_slc);
        assert!(
            max_diff(&got.o, &want) < 1e-12,
            "hq={hq}: {}",
            max_diff(&got.o, &want)
        );
        // every admissible block selected, ascending
        for (i, row) in got.sel_idx.chunks(cfg.sel_count).enumerate() {
            let tok = i / hkv;
            let t = tok - x.cu_seqlens.iter().rfind(|&&c| c <= tok).unwrap();
            let n_adm = blocks::sel_admissible(t, cfg.sel_block);
            let want_row: Vec<i32> = (0..5)
                .map(|j| if j < n_adm { j as i32 } else { -1 })
                .collect();
            assert_eq!(row, &want_row[..], "token {tok}");
        }
    }
}

#[test]
fn window_covering_the_sequence_equals_dense_causal_attention() {
    let cfg = NsaConfig {
        window: 40,
        ..small_cfg(4, 2, PhiKind::Mlp)
    };
    let mut x = inputs(&cfg, &[37, 40, 3], 3, 4, 11);
    set_gates(&mut x, [0.0, 0.0, 1.0]);
    let phi = phi(&cfg, 3, 4, 12);
    let got = forward(&cfg, &x, &phi).unwrap();
    let want = dense_causal(&cfg, &x, &x.k_win, &x.v_win);
    assert!(max_diff(&got.o, &want) < 1e-12);
}

#[test]
fn short_window_reads_exactly_w_tokens() {
    // w = 5: replacing keys/values older than t-4 must not change row t, while changing
    // token t-4 must.
    let cfg = small_cfg(2, 1, PhiKind::Mean);
    let mut x = inputs(&cfg, &[20], 3, 2, 3);
    set_gates(&mut x, [0.0, 0.0, 1.0]);
    let phi = phi(&cfg, 3, 2, 4);
    let base = forward(&cfg, &x, &phi).unwrap();
    let t = 12;
    let row = |o: &[f64]| o[t * 2 * 2..(t + 1) * 2 * 2].to_vec();
    let mut far = x.clone();
    for s in 0..t - 4 {
        far.k_win[s * 3] += 3.0;
        far.v_win[s * 2] += 3.0;
    }
    assert_eq!(row(&forward(&cfg, &far, &phi).unwrap().o), row(&base.o));
    let mut edge = x.clone();
    edge.v_win[(t - 4) * 2] += 3.0;
    assert!(max_diff(&row(&forward(&cfg, &edge, &phi).unwrap().o), &row(&base.o)) > 1e-6);
}

#[test]
fn compressed_branch_equals_hand_pooled_attention() {
    for (hq, hkv) in [(3, 3), (4, 2)] {
        let cfg = small_cfg(hq, hkv, PhiKind::Mean);
        let mut x = inputs(&cfg, &[23, 2, 4, 5, 9], 3, 2, 21);
        set_gates(&mut x, [1.0, 0.0, 0.0]);
        let got = forward(&cfg, &x, &PhiParams::mean()).unwrap();
        let want = dense_mean_compressed(&cfg, &x);
        assert!(
            max_diff(&got.o, &want) < 1e-12,
            "{}",
            max_diff(&got.o, &want)
        );
    }
}

#[test]
fn compressed_visibility_edges() {
    // l = 4, d = 2: t = 2 sees nothing, t = 3 and t = 4 see block 0, t = 5 sees blocks 0, 1.
    let cfg = small_cfg(2, 1, PhiKind::Mean);
    let (dk, dv) = (3, 2);
    let mut x = inputs(&cfg, &[12], dk, dv, 5);
    set_gates(&mut x, [1.0, 0.0, 0.0]);
    let phi = PhiParams::mean();
    let o = forward(&cfg, &x, &phi).unwrap().o;
    let row = |o: &[f64], t: usize| o[t * 2 * dv..(t + 1) * 2 * dv].to_vec();
    let l = cfg.cmp_block;
    assert!(
        row(&o, l - 2).iter().all(|&v| v == 0.0),
        "t = l-2 sees no block"
    );
    // One visible block: softmax over one key is 1, so the output is its pooled value.
    let pooled_v0: Vec<f64> = (0..dv)
        .map(|c| (0..l).map(|s| x.v_cmp[s * dv + c]).sum::<f64>() / l as f64)
        .collect();
    for t in [l - 1, l] {
        for h in 0..2 {
            let got = &row(&o, t)[h * dv..(h + 1) * dv];
            assert!(max_diff(got, &pooled_v0) < 1e-14, "t={t} h={h}");
        }
    }
    // Block 1 = tokens 2..6 is not seen by t = 4 (partly past) but is by t = 5.
    let mut y = x.clone();
    y.v_cmp[5 * dv] += 10.0;
    let o2 = forward(&cfg, &y, &phi).unwrap().o;
    for t in 0..=4 {
        assert_eq!(row(&o2, t), row(&o, t), "t={t}");
    }
    assert!(max_diff(&row(&o2, 5), &row(&o, 5)) > 1e-3);
}

/// With no compressed token visible anywhere (T < l - 1 ... l - 1), the compressed branch
/// is exactly 0 in the output and all its gradients are exactly 0, and nothing is NaN.
#[test]
fn empty_compressed_branch_is_exactly_zero_forward_and_backward() {
    for kind in [PhiKind::Mean, PhiKind::Linear, PhiKind::Mlp] {
        let cfg = small_cfg(4, 2, kind);
        for seqlens in [vec![1], vec![3], vec![1, 2, 3]] {
            let x = inputs(&cfg, &seqlens, 3, 2, 31);
            let phi = phi(&cfg, 3, 2, 32);
            let out = forward(&cfg, &x, &phi).unwrap();
            assert!(all_finite(&out.o));
            // Same output with the compression gate at 0: the branch contributes nothing.
            let mut x0 = x.clone();
            x0.g_cmp.iter_mut().for_each(|g| *g = 0.0);
            assert_eq!(forward(&cfg, &x0, &phi).unwrap().o, out.o);
            let d_o: Vec<f64> = (0..out.o.len())
                .map(|i| ((i * 7 % 11) as f64) - 5.0)
                .collect();
            let gr = backward(&cfg, &x, &phi, &d_o).unwrap();
            for (name, g) in [
                ("dk_cmp", &gr.dk_cmp),
                ("dv_cmp", &gr.dv_cmp),
                ("dg_cmp", &gr.dg_cmp),
            ] {
                assert!(
                    g.iter().all(|&v| v == 0.0),
                    "{kind:?} {seqlens:?}: {name} not zero"
                );
            }
            for (name, _, t) in gr.dphi.named_tensors(&cfg, 3, 2) {
                assert!(t.iter().all(|&v| v == 0.0), "{name} not zero");
            }
            for g in [
                &gr.dq, &gr.dk_slc, &gr.dv_slc, &gr.dk_win, &gr.dv_win, &gr.dg_slc,
            ] {
                assert!(all_finite(g));
            }
            // The other branches still get gradient.
            assert!(gr.dv_win.iter().any(|&v| v != 0.0));
        }
    }
}

#[test]
fn single_token_sequence() {
    // T = 1: selection and window both attend to the token alone, so o = (gs + gw) * v.
    let cfg = small_cfg(2, 2, PhiKind::Mlp);
    let x = inputs(&cfg, &[1], 3, 2, 41);
    let out = forward(&cfg, &x, &phi(&cfg, 3, 2, 42)).unwrap();
    for h in 0..2 {
        for c in 0..2 {
            let want = x.g_slc[h] * x.v_slc[h * 2 + c] + x.g_win[h] * x.v_win[h * 2 + c];
            assert!((out.o[h * 2 + c] - want).abs() < 1e-15);
        }
        assert_eq!(&out.sel_idx[h * 3..h * 3 + 3], &[0, -1, -1]);
    }
}

#[test]
fn sequence_length_not_a_multiple_of_any_block() {
    // T = 23: not a multiple of l = 4, d = 2, l' = 8 or w = 5. Check the number of compressed
    // blocks seen by the last token against the definition through the hand-pooled oracle,
    // and the selection rows' shape.
    let cfg = small_cfg(2, 1, PhiKind::Mean);
    let mut x = inputs(&cfg, &[23], 3, 2, 51);
    set_gates(&mut x, [1.0, 0.0, 0.0]);
    let out = forward(&cfg, &x, &PhiParams::mean()).unwrap();
    assert!(max_diff(&out.o, &dense_mean_compressed(&cfg, &x)) < 1e-12);
    assert_eq!(blocks::cmp_blocks_in(23, 4, 2), 10);
    // Last token: 3 admissible blocks, forced {0, 2} plus one free (block 1): all three.
    assert_eq!(&out.sel_idx[22 * 3..23 * 3], &[0, 1, 2]);
    // Token 7: only block 0 admissible.
    assert_eq!(&out.sel_idx[7 * 3..8 * 3], &[0, -1, -1]);
}
