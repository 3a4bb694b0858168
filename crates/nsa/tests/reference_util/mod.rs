//! Helpers shared by the reference test suites: small configurations, random float64 data,
//! and an independent dense causal attention.
#![allow(dead_code)]

use nsa::{NsaConfig, NsaInputs, PhiKind, PhiParams};

/// A small configuration: l=4, d=2, l'=8, n=3 (1 initial + 1 local forced, 1 free), w=5.
pub fn small_cfg(heads: usize, kv_heads: usize, phi: PhiKind) -> NsaConfig {
    NsaConfig::builder()
        .heads(heads)
        .kv_heads(kv_heads)
        .cmp_block(4)
        .cmp_stride(2)
        .sel_block(8)
        .sel_count(3)
        .init_blocks(1)
        .local_blocks(1)
        .window(5)
        .phi(phi)
        .build()
        .unwrap()
}

/// Random float64 inputs (fresh normal q/k/v, uniform gates), independent K/V per branch.
pub fn inputs(
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    seed: u64,
) -> NsaInputs<f64> {
    NsaInputs::<f32>::random(cfg, seqlens, dk, dv, false, seed).map(f64::from)
}

/// Random `phi` parameters of the configured kind (MLP hidden size 5).
pub fn phi(cfg: &NsaConfig, dk: usize, dv: usize, seed: u64) -> PhiParams<f64> {
    PhiParams::<f32>::random(cfg, dk, dv, 5, seed).map(f64::from)
}

/// Sets every gate of branch `which` (0 cmp, 1 slc, 2 win) to `value`.
pub fn set_gates(x: &mut NsaInputs<f64>, gates: [f64; 3]) {
    x.g_cmp.iter_mut().for_each(|g| *g = gates[0]);
    x.g_slc.iter_mut().for_each(|g| *g = gates[1]);
    x.g_win.iter_mut().for_each(|g| *g = gates[2]);
}

/// Dense causal softmax attention, written independently of the crate: for every sequence,
/// token `t` and query head `h` (KV head `h / G`), attends to keys `0..=t` of `k`/`v`
/// (`[N, HKV, D]`). Returns `[N, HQ, dv]`.
pub fn dense_causal(cfg: &NsaConfig, x: &NsaInputs<f64>, k: &[f64], v: &[f64]) -> Vec<f64> {
    let (hq, hkv, dk, dv) = (cfg.heads, cfg.kv_heads, x.dk, x.dv);
    let g = hq / hkv;
    let scale = cfg.scale.unwrap_or(1.0 / (dk as f64).sqrt());
    let mut out = vec![0.0; x.num_tokens() * hq * dv];
    for seq in x.cu_seqlens.windows(2) {
        for i in seq[0]..seq[1] {
            for h in 0..hq {
                let kvh = h / g;
                let q = &x.q[(i * hq + h) * dk..(i * hq + h + 1) * dk];
                let logits: Vec<f64> = (seq[0]..=i)
                    .map(|s| {
                        let kk = &k[(s * hkv + kvh) * dk..(s * hkv + kvh + 1) * dk];
                        scale * q.iter().zip(kk).map(|(a, b)| a * b).sum::<f64>()
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = logits.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for (s, ws) in (seq[0]..=i).zip(&w) {
                    for c in 0..dv {
                        out[(i * hq + h) * dv + c] += ws / z * v[(s * hkv + kvh) * dv + c];
                    }
                }
            }
        }
    }
    out
}

/// Largest absolute difference.
pub fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// True when every element is finite.
pub fn all_finite(a: &[f64]) -> bool {
    a.iter().all(|v| v.is_finite())
}

/// Packs several batches (each any number of sequences) into one, in order.
pub fn concat(parts: &[NsaInputs<f64>]) -> NsaInputs<f64> {
    let mut out = NsaInputs {
        dk: parts[0].dk,
        dv: parts[0].dv,
        cu_seqlens: vec![0],
        q: vec![],
        k_cmp: vec![],
        v_cmp: vec![],
        k_slc: vec![],
        v_slc: vec![],
        k_win: vec![],
        v_win: vec![],
        g_cmp: vec![],
        g_slc: vec![],
        g_win: vec![],
    };
    for p in parts {
        let base = *out.cu_seqlens.last().unwrap();
        out.cu_seqlens
            .extend(p.cu_seqlens[1..].iter().map(|c| c + base));
        out.q.extend(&p.q);
        out.k_cmp.extend(&p.k_cmp);
        out.v_cmp.extend(&p.v_cmp);
        out.k_slc.extend(&p.k_slc);
        out.v_slc.extend(&p.v_slc);
        out.k_win.extend(&p.k_win);
        out.v_win.extend(&p.v_win);
        out.g_cmp.extend(&p.g_cmp);
        out.g_slc.extend(&p.g_slc);
        out.g_win.extend(&p.g_win);
    }
    out
}

/// Tokens `range` of a one-sequence batch, as a one-sequence batch.
pub fn tokens(x: &NsaInputs<f64>, range: std::ops::Range<usize>) -> NsaInputs<f64> {
    assert_eq!(x.num_seqs(), 1);
    let n = x.num_tokens();
    let mut y = x.clone();
    let cuts: Vec<usize> = [0, range.start, range.end, n]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    y.cu_seqlens = cuts.clone();
    let b = cuts.iter().position(|&c| c == range.start).unwrap();
    y.sequence(b)
}
