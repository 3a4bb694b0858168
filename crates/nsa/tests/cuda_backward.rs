#![cfg(feature = "cuda")]
//! CUDA backward pass against the float64 reference (run on the GPU machine; see
//! scripts/pack_gpu.sh). Inputs and the upstream gradient are rounded to bf16 once (the kernels'
//! operand type) and the reference runs on exactly those values. The reference takes the GPU's
//! block selection (SPEC: the choice is not differentiated; bf16 scoring may swap near-tied
//! blocks, which the forward tests check tie-aware), so both differentiate the same function.

use nsa::cuda::backward::{self as bwd, BwdFamily, BwdMode, SelDqPath};
use nsa::cuda::{self, Shape};
use nsa::reference::{compress, phi::Phi, row};
use nsa::testing::{max_abs, rel_rms};
use nsa::{NsaConfig, NsaError, NsaGrads, NsaInputs, PhiKind, PhiParams, PhiWeights};
use std::time::{SystemTime, UNIX_EPOCH};

/// bf16 gradient tolerance of SPEC.md (relative RMS, per tensor).
const GRAD_TOL: f64 = 5e-3;

fn shape(dk: usize, dv: usize, hq: usize, hkv: usize, l: usize, d: usize, lp: usize) -> Shape {
    Shape {
        dk,
        dv,
        hq,
        hkv,
        cmp_l: l,
        cmp_d: d,
        sel_l: lp,
        nsel: 16,
        ninit: 1,
        nlocal: 2,
        win: 512,
        scale: 1.0 / (dk as f64).sqrt(),
        mt: cuda::default_mt(dv),
        elem: cuda::Elem::Bf16,
    }
}

/// Every backward family compiles for sm_90a at the tested and benchmarked shapes (NVRTC only,
/// no GPU); prints the register / spill report of each kernel.
#[test]
fn every_backward_kernel_compiles() {
    let shapes = [
        shape(128, 128, 64, 4, 32, 16, 64),
        shape(192, 128, 64, 4, 32, 16, 64),
        shape(64, 64, 8, 8, 32, 16, 64),
        shape(256, 256, 16, 2, 16, 8, 32),
        shape(128, 128, 8, 2, 32, 16, 64),
        shape(64, 64, 64, 1, 32, 16, 64),
        shape(64, 64, 4, 2, 48, 16, 96),
        shape(128, 64, 4, 2, 32, 16, 64),
        shape(128, 128, 64, 4, 32, 16, 64).with_elem(cuda::Elem::F16),
    ];
    for s in &shapes {
        for fam in BwdFamily::ALL {
            let c = bwd::compile_bwd(fam, s, "sm_90a", &["--ptxas-options=-v"])
                .unwrap_or_else(|e| panic!("{fam:?} {s:?}: {e}"));
            assert!(!c.cubin.is_empty());
            let report: Vec<&str> = c
                .log
                .lines()
                .filter(|l| {
                    l.contains("registers") || l.contains("spill") || l.contains("Compiling")
                })
                .collect();
            println!(
                "{fam:?} dk={} dv={} G={}:\n  {}",
                s.dk,
                s.dv,
                s.hq / s.hkv,
                report.join("\n  ")
            );
        }
    }
}

fn seed() -> u64 {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed = {s}");
    s
}

fn bf16(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

/// A fresh N(0, 1) upstream gradient, bf16-rounded (64-bit LCG + Box-Muller, from `seed`).
fn random_do(len: usize, seed: u64) -> Vec<f32> {
    let mut st = seed | 1;
    let mut next = || {
        st = st
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((st >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (u1, u2) = (next(), next());
            bf16(((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32)
        })
        .collect()
}

/// reference::backward with the selection taken from `sel` (`[N, HKV, n]`, the GPU's), and the
/// number of (token, group) rows where `sel` differs from the reference's own top-n.
fn reference_with_selection(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    d_o: &[f64],
    sel: &[i32],
) -> (NsaGrads<f64>, usize) {
    let phi = PhiParams::mean();
    let own = nsa::reference::forward(cfg, x, &phi).unwrap();
    let n = cfg.sel_count;
    let differing = own
        .sel_idx
        .chunks(n)
        .zip(sel.chunks(n))
        .filter(|(a, b)| a != b)
        .count();
    let g = nsa::reference::backward_with_selection(cfg, x, &phi, d_o, sel).unwrap();
    (g, differing)
}

/// [`reference_with_selection`] with the `phi` parameters `phi` (their gradients in `dphi`), as
/// the reference's own row loop (it also needs each sequence's compressed K/V gradients).
/// Also returns, per phi parameter gradient, the sum over the (compressed token, KV head)
/// contributions of their squares: the scale of a gradient that is a sum of those contributions
/// before any cancellation between them.
fn reference_with_selection_phi(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
    d_o: &[f64],
    sel: &[i32],
) -> (NsaGrads<f64>, usize, PhiParams<f64>) {
    let dims = row::Dims::new(cfg, x.dk, x.dv);
    let (hq, hkv, dk, dv, n) = (dims.hq, dims.hkv, dims.dk, dims.dv, cfg.sel_count);
    let phi_k = Phi {
        weights: &phi.k,
        l: cfg.cmp_block,
        dim: dk,
        hidden: phi.hidden,
    };
    let phi_v = Phi {
        weights: &phi.v,
        l: cfg.cmp_block,
        dim: dv,
        hidden: phi.hidden,
    };
    let z = |len: usize| vec![0.0f64; len];
    let mut gr = NsaGrads {
        dq: z(x.q.len()),
        dk_cmp: z(x.k_cmp.len()),
        dv_cmp: z(x.v_cmp.len()),
        dk_slc: z(x.k_slc.len()),
        dv_slc: z(x.v_slc.len()),
        dk_win: z(x.k_win.len()),
        dv_win: z(x.v_win.len()),
        dg_cmp: z(x.g_cmp.len()),
        dg_slc: z(x.g_slc.len()),
        dg_win: z(x.g_win.len()),
        dphi: phi.map(|_| 0.0),
    };
    let mut terms = phi.map(|_| 0.0);
    let (rk, rv) = (hkv * dk, hkv * dv);
    let mut differing = 0;
    for b in 0..x.num_seqs() {
        let r = x.seq_range(b);
        let len = r.len();
        let (k_cmp, v_cmp) = (
            &x.k_cmp[r.start * rk..r.end * rk],
            &x.v_cmp[r.start * rv..r.end * rv],
        );
        let comp = compress::compress_sequence(cfg, &phi_k, &phi_v, k_cmp, v_cmp, len);
        let kv = row::SeqKv {
            cmp_k: &comp.k,
            cmp_v: &comp.v,
            slc_k: &x.k_slc[r.start * rk..r.end * rk],
            slc_v: &x.v_slc[r.start * rv..r.end * rv],
            win_k: &x.k_win[r.start * rk..r.end * rk],
            win_v: &x.v_win[r.start * rv..r.end * rv],
        };
        let mut dkc = z(comp.k.len());
        let mut dvc = z(comp.v.len());
        {
            let mut grad = row::SeqKvGrad {
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
                let mut rw = row::row_forward(cfg, &dims, t, q_row, &kv);
                for g in 0..hkv {
                    let at = (i * hkv + g) * n;
                    let gpu: Vec<usize> = sel[at..at + n]
                        .iter()
                        .filter(|&&j| j >= 0)
                        .map(|&j| j as usize)
                        .collect();
                    differing += (gpu != rw.sel[g]) as usize;
                    row::use_selection(cfg, &dims, t, q_row, &kv, &mut rw, g, &gpu);
                }
                row::row_backward(
                    &dims,
                    q_row,
                    &kv,
                    &rw,
                    [
                        &x.g_cmp[i * hq..(i + 1) * hq],
                        &x.g_slc[i * hq..(i + 1) * hq],
                        &x.g_win[i * hq..(i + 1) * hq],
                    ],
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
        // the contributions of each (compressed token, KV head) to the phi gradients, squared
        for (p, raw, dc, sq) in [
            (&phi_k, k_cmp, &dkc, &mut terms.k),
            (&phi_v, v_cmp, &dvc, &mut terms.v),
        ] {
            let dim = p.dim;
            let ncmp = dc.len() / (hkv * dim);
            for i in 0..ncmp {
                for h in 0..hkv {
                    let block: Vec<f64> = (0..cfg.cmp_block * dim)
                        .map(|e| raw[((i * cfg.cmp_stride + e / dim) * hkv + h) * dim + e % dim])
                        .collect();
                    let mut d_block = vec![0.0; block.len()];
                    let mut dw = phi_weights_zero(p.weights);
                    let d_out = &dc[(i * hkv + h) * dim..(i * hkv + h + 1) * dim];
                    p.backward(h, &block, d_out, &mut d_block, &mut dw);
                    for (acc, t) in phi_tensors_mut(sq).into_iter().zip(phi_tensors(&dw)) {
                        for (a, v) in acc.iter_mut().zip(t) {
                            *a += v * v;
                        }
                    }
                }
            }
        }
    }
    (gr, differing, terms)
}

fn phi_weights_zero(w: &PhiWeights<f64>) -> PhiWeights<f64> {
    w.map(|_| 0.0)
}

fn phi_tensors(w: &PhiWeights<f64>) -> Vec<&Vec<f64>> {
    match w {
        PhiWeights::Mean => vec![],
        PhiWeights::Linear { pe, w } => vec![pe, w],
        PhiWeights::Mlp { pe, w1, b1, w2, b2 } => vec![pe, w1, b1, w2, b2],
    }
}

fn phi_tensors_mut(w: &mut PhiWeights<f64>) -> Vec<&mut Vec<f64>> {
    match w {
        PhiWeights::Mean => vec![],
        PhiWeights::Linear { pe, w } => vec![pe, w],
        PhiWeights::Mlp { pe, w1, b1, w2, b2 } => vec![pe, w1, b1, w2, b2],
    }
}

fn named(g: &NsaGrads<f32>) -> [(&'static str, &Vec<f32>); 10] {
    [
        ("dq", &g.dq),
        ("dk_cmp", &g.dk_cmp),
        ("dv_cmp", &g.dv_cmp),
        ("dk_slc", &g.dk_slc),
        ("dv_slc", &g.dv_slc),
        ("dk_win", &g.dk_win),
        ("dv_win", &g.dv_win),
        ("dg_cmp", &g.dg_cmp),
        ("dg_slc", &g.dg_slc),
        ("dg_win", &g.dg_win),
    ]
}

/// The ten activation gradients and, for phi = linear / mlp, every phi parameter gradient
/// (`phi_k.pe`, `phi_k.w`, ... as in the weight files).
fn named_all<'a>(
    g: &'a NsaGrads<f32>,
    cfg: &NsaConfig,
    dk: usize,
    dv: usize,
) -> Vec<(String, &'a Vec<f32>)> {
    let mut v: Vec<(String, &Vec<f32>)> = named(g)
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    v.extend(
        g.dphi
            .named_tensors(cfg, dk, dv)
            .into_iter()
            .map(|(n, _, t)| (n, t)),
    );
    v
}

fn run_case(name: &str, cfg: &NsaConfig, seqlens: &[usize], dk: usize, dv: usize, shared: bool) {
    run_case_with(name, cfg, seqlens, dk, dv, shared, BwdMode::default(), 0)
}

/// `mode`: statistics saved by the forward (the default of `cuda::backward::backward`) or
/// recomputed by the backward (the low-memory mode). `hidden`: the MLP width when `cfg.phi` is
/// mlp; with phi = linear / mlp the weights are random f32 and their gradients are compared too.
/// Each softmax row's dS sums to zero, so colsum(dKcmp) = 0: the key phi's linear `pe` and mlp
/// `b2` gradients are exactly 0 and its mlp `pe` and `b1` gradients (the same sum weighted by
/// silu'(A), which varies little) cancel for the most part. Rounding leaves each row's dS sum
/// near, not at, 0 (the saved o_b is bf16), so these four are compared in absolute terms: error
/// RMS below 5e-3 of the scale of the terms they sum (the root-sum-square of the per
/// (compressed token, KV head) contributions, from the reference).
#[allow(clippy::too_many_arguments)]
fn run_case_with(
    name: &str,
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    shared: bool,
    mode: BwdMode,
    hidden: usize,
) {
    run_case_path(name, cfg, seqlens, dk, dv, shared, mode, hidden, None)
}

/// [`run_case_with`] with the selection dQ on `path` (None: as `NSA_SEL_DQ_PATH` and the default
/// say).
#[allow(clippy::too_many_arguments)]
fn run_case_path(
    name: &str,
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    shared: bool,
    mode: BwdMode,
    hidden: usize,
    path: Option<SelDqPath>,
) {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let sd = seed();
    let x = NsaInputs::random(cfg, seqlens, dk, dv, shared, sd).map(bf16);
    let phi = PhiParams::random(cfg, dk, dv, hidden, sd ^ 0xf1);
    let d_o = random_do(x.num_tokens() * cfg.heads * dv, sd ^ 0x5eed);
    let got = match path {
        Some(p) => cuda::backward::backward_with_path(&ctx, cfg, &x, &phi, &d_o, mode, p),
        None => cuda::backward::backward_with(&ctx, cfg, &x, &phi, &d_o, mode),
    }
    .unwrap();
    let fwd = cuda::forward(&ctx, cfg, &x, &phi).unwrap();
    let x64 = x.map(|v| v as f64);
    let d_o64: Vec<f64> = d_o.iter().map(|&v| v as f64).collect();
    let (want, differing, terms) =
        reference_with_selection_phi(cfg, &x64, &phi.map(f64::from), &d_o64, &fwd.sel_idx);
    // per phi gradient: RMS over its elements of the root-sum-square of the contributions
    let term_scale: Vec<(String, f64)> = terms
        .named_tensors(cfg, dk, dv)
        .into_iter()
        .map(|(n, _, t)| (n, (t.iter().sum::<f64>() / t.len().max(1) as f64).sqrt()))
        .collect();
    let rows = x.num_tokens() * cfg.kv_heads;
    println!(
        "{name} ({}): selection differs from the reference (near-ties) in {differing} of {rows} rows",
        mode.name()
    );
    assert!(
        differing * 10 <= rows,
        "{name}: {differing} of {rows} selections differ: not near-ties"
    );
    let want32 = want.map(|v| v as f32);
    let (g_all, w_all) = (
        named_all(&got, cfg, dk, dv),
        named_all(&want32, cfg, dk, dv),
    );
    assert_eq!(g_all.len(), w_all.len(), "{name}: gradient kinds");
    let rms = |v: &[f32]| {
        (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
    };
    let mut worst = 0.0f64;
    let mut failures = Vec::new();
    for ((tn, g), (wn, w)) in g_all.iter().zip(&w_all) {
        assert_eq!(tn, wn);
        assert_eq!(g.len(), w.len(), "{name}: {tn} size");
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{name}: {tn} has non-finite values (unwritten?)"
        );
        // sums over the compressed tokens of dKcmp-driven terms that cancel: exactly (linear
        // pe, mlp b2: colsum(dKcmp) = 0) or for the most part (mlp pe, b1: silu'(A) varies
        // little between tokens)
        let exact_zero = (tn == "phi_k.pe" && cfg.phi == PhiKind::Linear)
            || (tn == "phi_k.b2" && cfg.phi == PhiKind::Mlp);
        let cancelling = cfg.phi == PhiKind::Mlp && (tn == "phi_k.pe" || tn == "phi_k.b1");
        if exact_zero || cancelling {
            let scale = term_scale.iter().find(|(n, _)| n == tn).unwrap().1;
            let diff: Vec<f32> = g.iter().zip(w.iter()).map(|(a, b)| a - b).collect();
            let (er, wr) = (rms(&diff), rms(w));
            println!(
                "{name}: {tn:>10} sum that cancels: error rms {er:.3e} = {:.3e} of its terms' scale {scale:.3e} (reference rms {wr:.3e}, rel RMS {:.3e})",
                er / scale,
                er / wr.max(f64::MIN_POSITIVE)
            );
            if exact_zero && wr >= 1e-6 * scale {
                failures.push(format!("reference {tn} not ~0"));
            }
            if er >= GRAD_TOL * scale {
                failures.push(format!(
                    "{tn} error rms {er} over {GRAD_TOL} x the terms' scale {scale}"
                ));
            }
            continue;
        }
        let err = rel_rms(g, w);
        println!(
            "{name}: {tn:>10} rel RMS {err:.3e}, max abs {:.3e}",
            max_abs(g, w)
        );
        worst = worst.max(err);
        if err >= GRAD_TOL {
            failures.push(format!("{tn} relative RMS {err} over {GRAD_TOL}"));
        }
    }
    assert!(failures.is_empty(), "{name}: {failures:?}");
    println!(
        "{name}: seqlens {seqlens:?} HQ {} HKV {} dk {dk} dv {dv} shared {shared} phi {:?} mode {}: worst rel RMS {worst:.3e}",
        cfg.heads, cfg.kv_heads, cfg.phi, mode.name()
    );
}

fn cfg(hq: usize, hkv: usize) -> nsa::NsaConfigBuilder {
    NsaConfig::builder().heads(hq).kv_heads(hkv)
}

#[test]
fn bwd_group16_independent_kv_split_lists() {
    // block 0 is chosen by all 1100 tokens: its list spans two segments (16384 / G = 1024)
    let c = cfg(32, 2).build().unwrap();
    run_case("g16", &c, &[1100], 128, 128, false);
}

#[test]
fn bwd_recompute_low_memory_group16_and_varlen() {
    // the opt-in low-memory mode: nothing saved by the forward, the backward recomputes o_b and
    // lse_b in its statistics pass
    let rc = BwdMode::Recompute;
    let c = cfg(32, 2).build().unwrap();
    run_case_with("g16-recompute", &c, &[1100], 128, 128, false, rc, 0);
    let c = cfg(8, 2).build().unwrap();
    run_case_with("g4-recompute", &c, &[700, 31, 5], 192, 128, true, rc, 0);
    let c = cfg(8, 2).build().unwrap();
    run_case_with("short-recompute", &c, &[5, 17, 31, 1], 64, 64, false, rc, 0);
}

#[test]
fn bwd_phi_linear_group4() {
    // gradients through phi = linear: raw K/V of the compressed branch, pe and w of both phis
    let c = cfg(8, 2).phi(PhiKind::Linear).build().unwrap();
    run_case_with(
        "phi-linear",
        &c,
        &[600, 45, 20],
        64,
        64,
        false,
        BwdMode::default(),
        0,
    );
}

#[test]
fn bwd_phi_mlp_group2_dk_ne_dv() {
    // phi = mlp (hidden 48), dk != dv
    let c = cfg(4, 2).phi(PhiKind::Mlp).build().unwrap();
    run_case_with(
        "phi-mlp",
        &c,
        &[500, 77],
        128,
        64,
        false,
        BwdMode::default(),
        48,
    );
}

#[test]
fn bwd_phi_mlp_recompute_shared_kv() {
    // phi = mlp in the low-memory mode, K/V shared between the branches
    let c = cfg(4, 2).phi(PhiKind::Mlp).build().unwrap();
    run_case_with(
        "phi-mlp-recompute",
        &c,
        &[300],
        128,
        64,
        true,
        BwdMode::Recompute,
        48,
    );
}

#[test]
fn bwd_varlen_group4_dk192_dv128_shared_kv() {
    let c = cfg(8, 2).build().unwrap();
    run_case("g4-varlen", &c, &[1100, 31, 300, 65], 192, 128, true);
}

#[test]
fn bwd_mha_group1_odd_length() {
    let c = cfg(2, 2).build().unwrap();
    run_case("g1", &c, &[1299], 64, 64, false);
}

#[test]
fn bwd_group2_other_block_geometry() {
    // l = 48, d = 16, l' = 96 (two key tiles per selection block), w = 100, n = 8
    let c = cfg(4, 2)
        .cmp_block(48)
        .cmp_stride(16)
        .sel_block(96)
        .sel_count(8)
        .init_blocks(2)
        .local_blocks(1)
        .window(100)
        .build()
        .unwrap();
    run_case("g2-48/16/96", &c, &[1000, 257], 64, 64, false);
}

#[test]
fn bwd_group8_l_equals_d_shared_kv() {
    let c = cfg(16, 2)
        .cmp_block(32)
        .cmp_stride(32)
        .sel_block(64)
        .window(256)
        .build()
        .unwrap();
    run_case("g8-32/32/64", &c, &[1201], 128, 128, true);
}

#[test]
fn bwd_group64_many_segments() {
    // G = 64: segments of 256 tokens, so the forced and local blocks' lists are split
    let c = cfg(64, 1).window(128).build().unwrap();
    run_case("g64", &c, &[600, 200], 64, 64, false);
}

#[test]
fn bwd_sequences_shorter_than_a_compression_block() {
    // t < l - 1 everywhere: the compressed branch is empty, its gradients exactly 0, no NaN
    let c = cfg(8, 2).build().unwrap();
    run_case("short", &c, &[5, 17, 31, 1], 64, 64, false);
}

#[test]
fn bwd_head_dim_256_group32() {
    let c = cfg(32, 1)
        .sel_block(32)
        .cmp_block(32)
        .cmp_stride(8)
        .window(128)
        .build()
        .unwrap();
    run_case("g32-d256", &c, &[300], 256, 256, false);
}

/// Deterministic mode: two runs on the same inputs give bitwise-identical gradients (a case
/// with split lists, so the partial reduction is exercised, in both statistics modes; and a
/// phi = mlp case, every parameter gradient included).
#[test]
fn bwd_is_bitwise_repeatable() {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let sd = seed();
    let mean = cfg(32, 2).build().unwrap();
    let mlp = cfg(8, 2).phi(PhiKind::Mlp).build().unwrap();
    for (c, lens, hidden, mode) in [
        (&mean, &[1500, 333][..], 0, BwdMode::SavedStats),
        (&mean, &[1500, 333][..], 0, BwdMode::Recompute),
        (&mlp, &[700, 90][..], 40, BwdMode::SavedStats),
    ] {
        let x = NsaInputs::random(c, lens, 128, 128, false, sd).map(bf16);
        let phi = PhiParams::random(c, 128, 128, hidden, sd ^ 0xf1);
        let d_o = random_do(x.num_tokens() * c.heads * 128, sd ^ 0x5eed);
        let a = cuda::backward::backward_with(&ctx, c, &x, &phi, &d_o, mode).unwrap();
        let b = cuda::backward::backward_with(&ctx, c, &x, &phi, &d_o, mode).unwrap();
        let (na, nb) = (named_all(&a, c, 128, 128), named_all(&b, c, 128, 128));
        assert_eq!(na.len(), nb.len());
        for ((name, ga), (_, gb)) in na.iter().zip(&nb) {
            let same = ga
                .iter()
                .zip(gb.iter())
                .all(|(u, v)| u.to_bits() == v.to_bits());
            assert!(
                same,
                "{:?} {}: {name} differs between two runs",
                c.phi,
                mode.name()
            );
        }
        println!(
            "repeatable ({:?}, {}): all {} gradients bitwise equal",
            c.phi,
            mode.name(),
            na.len()
        );
    }
}

/// The fused selection pass (dQ partials written by the dK/dV kernel, merged in rank
/// order): against the reference at G = 16 with lists split over segments, G = 4 varlen with
/// shared K/V and odd lengths, G = 1, dk = dv = 64 and l' = 32; bitwise repeatable; and a typed
/// error where it is not built (dk 192).
#[test]
fn bwd_fused_selection_path() {
    let fused = Some(SelDqPath::Fused);
    let (sv, ph) = (BwdMode::SavedStats, 0);
    let c = cfg(32, 2).build().unwrap();
    run_case_path("g16-fused", &c, &[1100], 128, 128, false, sv, ph, fused);
    let c = cfg(8, 2).build().unwrap();
    run_case_path(
        "g4-fused-varlen",
        &c,
        &[700, 31, 5],
        128,
        64,
        true,
        sv,
        ph,
        fused,
    );
    let c = cfg(4, 4).build().unwrap();
    run_case_path("g1-fused", &c, &[333], 64, 64, false, sv, ph, fused);
    let c = cfg(16, 2)
        .cmp_block(32)
        .cmp_stride(16)
        .sel_block(32)
        .build()
        .unwrap();
    run_case_path("g8-fused-l32", &c, &[901], 128, 128, false, sv, ph, fused);

    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let sd = seed();
    let c = cfg(32, 2).build().unwrap();
    let x = NsaInputs::random(&c, &[1500, 333], 128, 128, false, sd).map(bf16);
    let phi = PhiParams::random(&c, 128, 128, 0, sd ^ 0xf1);
    let d_o = random_do(x.num_tokens() * c.heads * 128, sd ^ 0x5eed);
    let fused = SelDqPath::Fused;
    let run = || cuda::backward::backward_with_path(&ctx, &c, &x, &phi, &d_o, sv, fused);
    let (a, b) = (run().unwrap(), run().unwrap());
    for ((name, ga), (_, gb)) in named_all(&a, &c, 128, 128)
        .iter()
        .zip(&named_all(&b, &c, 128, 128))
    {
        let same = ga
            .iter()
            .zip(gb.iter())
            .all(|(u, v)| u.to_bits() == v.to_bits());
        assert!(same, "fused: {name} differs between two runs");
    }
    let x = NsaInputs::random(&c, &[300], 192, 128, false, sd).map(bf16);
    let phi = PhiParams::random(&c, 192, 128, 0, sd ^ 0xf1);
    let d_o = random_do(x.num_tokens() * c.heads * 128, sd ^ 0x5eed);
    let err = cuda::backward::backward_with_path(&ctx, &c, &x, &phi, &d_o, sv, fused);
    assert!(
        matches!(err, Err(nsa::NsaError::Unsupported(_))),
        "dk 192 fused: {:?}",
        err.map(|_| ())
    );
}

/// The overlapped backward (selection stages on a second stream, cuda/backward/stages.rs)
/// gives the same bits as the sequential one: rows path (G = 16, split lists), block-outer dQ
/// (G = 4, varlen), fused selection (G = 16), and the recompute mode.
#[test]
fn bwd_overlapped_is_bitwise_the_sequential_one() {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let sd = seed();
    for (c, lens, mode, path) in [
        (
            cfg(32, 2).build().unwrap(),
            vec![1500, 333],
            BwdMode::SavedStats,
            SelDqPath::Rows,
        ),
        (
            cfg(8, 2).build().unwrap(),
            vec![700, 31, 5],
            BwdMode::SavedStats,
            SelDqPath::Block,
        ),
        (
            cfg(32, 2).build().unwrap(),
            vec![1100],
            BwdMode::SavedStats,
            SelDqPath::Fused,
        ),
        (
            cfg(32, 2).build().unwrap(),
            vec![900, 65],
            BwdMode::Recompute,
            SelDqPath::Auto,
        ),
    ] {
        let x = NsaInputs::random(&c, &lens, 128, 128, false, sd).map(bf16);
        let d_o = random_do(x.num_tokens() * c.heads * 128, sd ^ 0x5eed);
        let run = |overlap: bool| {
            let mut dev = cuda::DeviceInputs::upload(&ctx, &c, &x).unwrap();
            dev.set_phi(&ctx, &PhiParams::mean()).unwrap();
            if mode.saves_stats() {
                dev.enable_saving(&ctx).unwrap();
            }
            let mut b = bwd::DeviceBackward::new(&ctx, &dev, &x.cu_seqlens).unwrap();
            b.set_sel_dq_path(&ctx, path).unwrap();
            b.set_overlap(&ctx, overlap).unwrap();
            b.upload_do(&ctx, &d_o).unwrap();
            b.poison(&ctx).unwrap();
            cuda::forward_device(&ctx, &mut dev, None).unwrap();
            bwd::backward_device_with(&ctx, &dev, &mut b, mode.saves_stats(), None).unwrap();
            b.download(&ctx).unwrap()
        };
        let (a, o) = (run(false), run(true));
        for ((name, ga), (_, go)) in named_all(&a, &c, 128, 128)
            .iter()
            .zip(&named_all(&o, &c, 128, 128))
        {
            assert!(
                ga.iter().all(|v| v.is_finite()),
                "{lens:?}: {name} unwritten"
            );
            let same = ga
                .iter()
                .zip(go.iter())
                .all(|(u, v)| u.to_bits() == v.to_bits());
            assert!(
                same,
                "{lens:?} {path:?} {}: overlapped {name} differs",
                mode.name()
            );
        }
        println!(
            "overlapped backward {lens:?} {path:?} {}: bitwise equal",
            mode.name()
        );
    }
}

#[test]
fn bwd_unsupported_inputs_are_typed_errors() {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let s = seed();
    let lin = cfg(4, 2).phi(PhiKind::Linear).build().unwrap();
    let x = NsaInputs::random(&lin, &[70], 64, 64, false, s);
    let d_o = random_do(70 * 4 * 64, s);
    // phi weights of another kind than the config's
    match cuda::backward::backward(&ctx, &lin, &x, &PhiParams::mean(), &d_o) {
        Err(NsaError::Unsupported(m)) => println!("linear config, mean weights: {m}"),
        other => panic!("expected Unsupported, got {:?}", other.map(|_| ())),
    }
    let c = cfg(4, 2).build().unwrap();
    let x = NsaInputs::random(&c, &[70], 64, 64, false, s);
    assert!(matches!(
        cuda::backward::backward(&ctx, &c, &x, &PhiParams::mean(), &d_o[1..]),
        Err(NsaError::ShapeMismatch { .. })
    ));
    // the public op routes Device::Cuda to the same kernels
    let via_op = nsa::backward(&nsa::Device::Cuda(0), &c, &x, &PhiParams::mean(), &d_o).unwrap();
    let direct = cuda::backward::backward(&ctx, &c, &x, &PhiParams::mean(), &d_o).unwrap();
    assert_eq!(via_op.dq, direct.dq);
}

/// f16 inputs: `half::f16` on the host (uploaded bit for bit, kernels built with `-DELEM_F16`),
/// `d_o` rounded to f16 as the upload does; the float64 reference runs on exactly those values
/// with the GPU's selection.
fn run_case_f16(
    name: &str,
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    shared: bool,
) {
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let sd = seed();
    let x = NsaInputs::random(cfg, seqlens, dk, dv, shared, sd).map(f16);
    let d_o: Vec<f32> = random_do(x.num_tokens() * cfg.heads * dv, sd ^ 0x5eed)
        .into_iter()
        .map(f16)
        .collect();
    let x16 = x.map(half::f16::from_f32);
    let got = cuda::backward::backward(&ctx, cfg, &x16, &PhiParams::mean(), &d_o).unwrap();
    let fwd = cuda::forward(&ctx, cfg, &x16, &PhiParams::mean()).unwrap();
    let x64 = x.map(|v| v as f64);
    let d_o64: Vec<f64> = d_o.iter().map(|&v| v as f64).collect();
    let (want, differing) = reference_with_selection(cfg, &x64, &d_o64, &fwd.sel_idx);
    let rows = x.num_tokens() * cfg.kv_heads;
    println!("{name}: f16, selection differs (near-ties) in {differing} of {rows} rows");
    assert!(
        differing * 10 <= rows,
        "{name}: {differing} of {rows} selections differ: not near-ties"
    );
    let want32 = want.map(|v| v as f32);
    let mut worst = 0.0f64;
    for ((tn, g), (_, w)) in named(&got).into_iter().zip(named(&want32)) {
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{name}: {tn} has non-finite values (unwritten?)"
        );
        let err = rel_rms(g, w);
        println!(
            "{name}: f16 {tn:>6} rel RMS {err:.3e}, max abs {:.3e}",
            max_abs(g, w)
        );
        worst = worst.max(err);
        assert!(
            err < GRAD_TOL,
            "{name}: {tn} relative RMS {err} over {GRAD_TOL}"
        );
    }
    println!(
        "{name}: f16 seqlens {seqlens:?} HQ {} HKV {} dk {dk} dv {dv} shared {shared}: worst rel RMS {worst:.3e}",
        cfg.heads, cfg.kv_heads
    );
}

#[test]
fn bwd_f16_group16_varlen_and_group4_dk192() {
    let c = cfg(32, 2).build().unwrap();
    run_case_f16("f16-g16", &c, &[1100, 300, 45], 128, 128, false);
    let c = cfg(8, 2).build().unwrap();
    run_case_f16("f16-g4", &c, &[700, 31, 5], 192, 128, true);
}
