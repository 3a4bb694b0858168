//! The CPU backward against the float64 reference, and its determinism.

mod cpu_common;
use cpu_common::*;
use nsa::{NsaGrads, PhiWeights};

/// Every gradient tensor with its name.
fn named<T>(g: &NsaGrads<T>) -> Vec<(String, &Vec<T>)> {
    let mut v = vec![
        ("dq".to_string(), &g.dq),
        ("dk_cmp".into(), &g.dk_cmp),
        ("dv_cmp".into(), &g.dv_cmp),
        ("dk_slc".into(), &g.dk_slc),
        ("dv_slc".into(), &g.dv_slc),
        ("dk_win".into(), &g.dk_win),
        ("dv_win".into(), &g.dv_win),
        ("dg_cmp".into(), &g.dg_cmp),
        ("dg_slc".into(), &g.dg_slc),
        ("dg_win".into(), &g.dg_win),
    ];
    for (which, w) in [("phi_k", &g.dphi.k), ("phi_v", &g.dphi.v)] {
        match w {
            PhiWeights::Mean => {}
            PhiWeights::Linear { pe, w } => {
                v.push((format!("{which}.pe"), pe));
                v.push((format!("{which}.w"), w));
            }
            PhiWeights::Mlp { pe, w1, b1, w2, b2 } => {
                for (n, t) in [("pe", pe), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)] {
                    v.push((format!("{which}.{n}"), t));
                }
            }
        }
    }
    v
}

#[test]
fn backward_matches_reference_on_many_shapes() {
    for (k, c) in cases().into_iter().enumerate() {
        let d_o = random_grad(c.x.num_tokens() * c.cfg.heads * c.x.dv, 100 + k as u64);
        let got = nsa::cpu::backward(&c.cfg, &c.x, &c.phi, &d_o).unwrap();
        let d_o64: Vec<f64> = d_o.iter().map(|&v| v as f64).collect();
        let want =
            nsa::reference::backward(&c.cfg, &c.x.map(f64::from), &c.phi.map(f64::from), &d_o64)
                .unwrap();
        let (g, w) = (named(&got), named(&want));
        assert_eq!(g.len(), w.len(), "{}: gradient kinds", c.name);
        let rms = |v: &[f64]| (v.iter().map(|x| x * x).sum::<f64>() / v.len().max(1) as f64).sqrt();
        let rms32 = |v: &[f32]| {
            (v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / v.len().max(1) as f64).sqrt()
        };
        for ((name, gt), (_, wt)) in g.iter().zip(&w) {
            assert_eq!(gt.len(), wt.len(), "{}: {name} size", c.name);
            // Gradients that are exactly zero in exact arithmetic: each softmax row's dS sums
            // to zero, so colsum(dKcmp) = 0, and with it the key phi's Linear `pe` gradient
            // (colsum(dKcmp) @ W^T) and its MLP output bias `b2`. Compare those in absolute
            // terms against the scale of the compressed keys' input gradient.
            let zero = (name == "phi_k.pe" && c.cfg.phi == nsa::PhiKind::Linear)
                || (name == "phi_k.b2" && c.cfg.phi == nsa::PhiKind::Mlp);
            if zero {
                let scale = rms(&want.dk_cmp);
                assert!(
                    rms(wt) < 1e-9 * scale,
                    "{}: reference {name} not ~0",
                    c.name
                );
                assert!(
                    rms32(gt) < 1e-5 * scale,
                    "{}: {name} rms {} vs scale {scale}",
                    c.name,
                    rms32(gt)
                );
                continue;
            }
            assert_close(&format!("{} {name}", c.name), gt, wt, 1e-5);
        }
    }
}
