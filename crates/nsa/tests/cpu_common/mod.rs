//! Shared helpers of the CPU-path tests: configurations, random inputs, comparisons with the
//! float64 reference.
#![allow(dead_code)]

use nsa::testing::{check_selection_tie_aware, max_abs, rel_rms};
use nsa::{NsaConfig, NsaInputs, PhiKind, PhiParams};

/// A small configuration: `l`, `d`, `l'`, `n`, `w` given, heads `hq`/`hkv`.
#[allow(clippy::too_many_arguments)]
pub fn cfg(
    hq: usize,
    hkv: usize,
    l: usize,
    d: usize,
    lp: usize,
    n: usize,
    w: usize,
    phi: PhiKind,
) -> NsaConfig {
    NsaConfig::builder()
        .heads(hq)
        .kv_heads(hkv)
        .cmp_block(l)
        .cmp_stride(d)
        .sel_block(lp)
        .sel_count(n)
        .window(w)
        .phi(phi)
        .build()
        .unwrap()
}

pub struct Case {
    pub name: String,
    pub cfg: NsaConfig,
    pub x: NsaInputs<f32>,
    pub phi: PhiParams<f32>,
}

#[allow(clippy::too_many_arguments)]
pub fn case(
    name: &str,
    cfg: NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    shared: bool,
    seed: u64,
) -> Case {
    let x = NsaInputs::random(&cfg, seqlens, dk, dv, shared, seed);
    let phi = PhiParams::random(&cfg, dk, dv, 12, seed + 1);
    Case {
        name: name.to_string(),
        cfg,
        x,
        phi,
    }
}

/// The shapes every CPU test runs over: G = 1, 2, 4, 16; dk != dv; T < l, T = 1, odd T,
/// varlen batches; mean/linear/mlp; shared and independent K/V; n_init/n_local variants.
pub fn cases() -> Vec<Case> {
    use PhiKind::*;
    vec![
        case(
            "mha G=1 mean",
            cfg(2, 2, 8, 4, 16, 4, 24, Mean),
            &[77],
            16,
            16,
            false,
            1,
        ),
        case(
            "G=2 linear dk!=dv varlen",
            cfg(4, 2, 8, 4, 16, 4, 20, Linear),
            &[45, 1, 7, 96],
            16,
            8,
            false,
            2,
        ),
        case(
            "G=4 mlp shared",
            cfg(4, 1, 8, 4, 16, 3, 16, Mlp),
            &[101, 33],
            8,
            12,
            true,
            3,
        ),
        case(
            "G=16 mean",
            cfg(16, 1, 16, 8, 32, 4, 40, Mean),
            &[150],
            16,
            8,
            false,
            4,
        ),
        case(
            "T<l and T=1",
            cfg(4, 2, 16, 4, 16, 3, 8, Linear),
            &[9, 1, 15, 16, 23],
            8,
            8,
            false,
            5,
        ),
        case(
            "l=d=l' mlp odd",
            cfg(2, 1, 8, 8, 8, 5, 12, Mlp),
            &[83],
            12,
            4,
            false,
            6,
        ),
        case(
            "G=2 long window odd",
            cfg(4, 2, 8, 4, 32, 6, 64, Mean),
            &[133, 57],
            8,
            16,
            true,
            7,
        ),
    ]
}

/// `rel_rms` with a message, under the SPEC's f32 bound.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let r = rel_rms(got, want);
    let m = max_abs(got, want);
    assert!(
        r < tol,
        "{what}: rel RMS {r:.3e} (max abs {m:.3e}) >= {tol:e}"
    );
}

/// Forward of the reference on the same data.
pub fn reference_forward(c: &Case) -> nsa::NsaOutput<f64> {
    nsa::reference::forward(&c.cfg, &c.x.map(f64::from), &c.phi.map(f64::from)).unwrap()
}

/// Tie-aware comparison of a selection with the reference's.
pub fn check_selection(c: &Case, want: &[i32], got: &[i32]) {
    let (scores, mb) =
        nsa::reference::selection_scores(&c.cfg, &c.x.map(f64::from), &c.phi.map(f64::from))
            .unwrap();
    if let Err(e) = check_selection_tie_aware(&c.cfg, &c.x.cu_seqlens, want, got, &scores, mb) {
        panic!("{}: {e}", c.name);
    }
}

/// Random upstream gradient.
pub fn random_grad(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
