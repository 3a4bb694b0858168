//! Reference backward against central finite differences of the reference forward, for
//! every input tensor and every `phi` parameter, for mean / linear / MLP `phi`, with G = 1 and
//! G = 3, dk != dv, on a packed batch of two sequences.
//!
//! The loss is `L = sum(o * r)` for a fixed random `r`, so `dL/dx = backward(d_o = r)`.
//! Every perturbed forward must make the same top-n choice as the unperturbed one (selection
//! is not differentiated); the inputs are fixed by seeds, so this either always holds or the
//! test says which element broke it.

mod reference_util;

use nsa::reference::{backward, forward};
use nsa::{NsaConfig, NsaGrads, NsaInputs, PhiKind, PhiParams, PhiWeights};
use rand::{rngs::StdRng, Rng, SeedableRng};
use reference_util::*;

const EPS: f64 = 1e-6;
/// Per element: |fd - analytic| <= ATOL + RTOL * |analytic|.
const ATOL: f64 = 1e-7;
const RTOL: f64 = 1e-6;

const INPUT_NAMES: [&str; 10] = [
    "q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win",
];

fn input_mut(x: &mut NsaInputs<f64>, which: usize) -> &mut Vec<f64> {
    match which {
        0 => &mut x.q,
        1 => &mut x.k_cmp,
        2 => &mut x.v_cmp,
        3 => &mut x.k_slc,
        4 => &mut x.v_slc,
        5 => &mut x.k_win,
        6 => &mut x.v_win,
        7 => &mut x.g_cmp,
        8 => &mut x.g_slc,
        _ => &mut x.g_win,
    }
}

fn input_grad(g: &NsaGrads<f64>, which: usize) -> &Vec<f64> {
    [
        &g.dq, &g.dk_cmp, &g.dv_cmp, &g.dk_slc, &g.dv_slc, &g.dk_win, &g.dv_win, &g.dg_cmp,
        &g.dg_slc, &g.dg_win,
    ][which]
}

/// The parameter tensors of one `phi`, in the order of `PhiWeights::named`.
fn phi_tensors_mut(w: &mut PhiWeights<f64>) -> Vec<&mut Vec<f64>> {
    match w {
        PhiWeights::Mean => vec![],
        PhiWeights::Linear { pe, w } => vec![pe, w],
        PhiWeights::Mlp { pe, w1, b1, w2, b2 } => vec![pe, w1, b1, w2, b2],
    }
}

struct Problem {
    cfg: NsaConfig,
    r: Vec<f64>,
    sel: Vec<i32>,
}

impl Problem {
    /// Loss and whether the selection equals the unperturbed one.
    fn loss(&self, x: &NsaInputs<f64>, phi: &PhiParams<f64>) -> (f64, bool) {
        let out = forward(&self.cfg, x, phi).unwrap();
        let l = out.o.iter().zip(&self.r).map(|(a, b)| a * b).sum();
        (l, out.sel_idx == self.sel)
    }

    /// Compares `analytic` with central differences of `perturb`'s element `e`.
    fn check_tensor(
        &self,
        name: &str,
        analytic: &[f64],
        len: usize,
        must_be_nonzero: bool,
        mut perturb: impl FnMut(usize, f64) -> (NsaInputs<f64>, PhiParams<f64>),
    ) {
        assert_eq!(analytic.len(), len, "{name}: gradient size");
        let mut worst = 0.0f64;
        for (e, &an) in analytic.iter().enumerate() {
            let (xp, pp) = perturb(e, EPS);
            let (lp, same_p) = self.loss(&xp, &pp);
            let (xm, pm) = perturb(e, -EPS);
            let (lm, same_m) = self.loss(&xm, &pm);
            assert!(
                same_p && same_m,
                "{name}[{e}]: selection changed under perturbation"
            );
            let fd = (lp - lm) / (2.0 * EPS);
            let err = (fd - an).abs();
            assert!(
                err <= ATOL + RTOL * an.abs(),
                "{:?} G={} {name}[{e}]: finite difference {fd}, backward {}",
                self.cfg.phi,
                self.cfg.group_size(),
                an
            );
            worst = worst.max(err);
        }
        // A gradient that is zero everywhere would pass trivially.
        let norm = analytic.iter().map(|v| v.abs()).fold(0.0, f64::max);
        if must_be_nonzero {
            assert!(norm > 1e-4, "{name}: gradient is (almost) zero ({norm})");
        }
    }
}

fn check_all(kind: PhiKind, hq: usize, hkv: usize, seed: u64) {
    let cfg = small_cfg(hq, hkv, kind);
    let (dk, dv) = (3, 2);
    // Two sequences; tokens 24.. of the first have a real top-n choice (forced {0, own}, one
    // free slot among two candidates).
    let x = inputs(&cfg, &[34, 11], dk, dv, seed);
    let phi = phi(&cfg, dk, dv, seed + 1);
    let mut rng = StdRng::seed_from_u64(seed + 2);
    let r: Vec<f64> = (0..x.num_tokens() * hq * dv)
        .map(|_| rng.gen::<f64>() * 2.0 - 1.0)
        .collect();
    let sel = forward(&cfg, &x, &phi).unwrap().sel_idx;
    let p = Problem {
        cfg: cfg.clone(),
        r: r.clone(),
        sel,
    };
    let g = backward(&cfg, &x, &phi, &r).unwrap();

    for (which, name) in INPUT_NAMES.iter().enumerate() {
        let len = input_mut(&mut x.clone(), which).len();
        p.check_tensor(name, input_grad(&g, which), len, true, |e, h| {
            let mut y = x.clone();
            input_mut(&mut y, which)[e] += h;
            (y, phi.clone())
        });
    }

    let mut dphi = g.dphi.clone();
    let grads_k: Vec<Vec<f64>> = phi_tensors_mut(&mut dphi.k)
        .into_iter()
        .map(|t| t.clone())
        .collect();
    let grads_v: Vec<Vec<f64>> = phi_tensors_mut(&mut dphi.v)
        .into_iter()
        .map(|t| t.clone())
        .collect();
    let expected = match kind {
        PhiKind::Mean => 0,
        PhiKind::Linear => 2,
        PhiKind::Mlp => 5,
    };
    assert_eq!(grads_k.len(), expected);
    assert_eq!(grads_v.len(), expected);
    for (part, grads) in [("phi_k", &grads_k), ("phi_v", &grads_v)] {
        for (ti, analytic) in grads.iter().enumerate() {
            let name = format!("{part}[{ti}]");
            // A parameter that adds the same vector to every compressed key of a head (the
            // linear pe, the MLP's output bias b2) shifts all logits of a softmax equally:
            // its gradient is exactly 0, which the finite differences confirm.
            let key_shift = part == "phi_k"
                && ((kind == PhiKind::Linear && ti == 0) || (kind == PhiKind::Mlp && ti == 4));
            p.check_tensor(&name, analytic, analytic.len(), !key_shift, |e, h| {
                let mut q = phi.clone();
                let w = if part == "phi_k" { &mut q.k } else { &mut q.v };
                phi_tensors_mut(w)[ti][e] += h;
                (x.clone(), q)
            });
        }
    }
}

#[test]
fn gradients_mean_phi_g1() {
    check_all(PhiKind::Mean, 2, 2, 100);
}

#[test]
fn gradients_mean_phi_g3() {
    check_all(PhiKind::Mean, 6, 2, 200);
}

#[test]
fn gradients_linear_phi_g1() {
    check_all(PhiKind::Linear, 2, 2, 300);
}

#[test]
fn gradients_linear_phi_g3() {
    check_all(PhiKind::Linear, 6, 2, 400);
}

#[test]
fn gradients_mlp_phi_g1() {
    check_all(PhiKind::Mlp, 2, 2, 500);
}

#[test]
fn gradients_mlp_phi_g3() {
    check_all(PhiKind::Mlp, 6, 2, 600);
}
