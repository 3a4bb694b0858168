#![cfg(feature = "cuda")]
//! CUDA backward pass against the float64 reference (run on the GPU machine; see
//! scripts/pack_gpu.sh). Inputs and the upstream gradient are rounded to bf16 once (the kernels'
//! operand type) and the reference runs on exactly those values. The reference takes the GPU's
//! block selection (SPEC: the choice is not differentiated; bf16 scoring may swap near-tied
//! blocks, which the forward tests check tie-aware), so both differentiate the same function.

use nsa::cuda::backward::{self as bwd, BwdFamily};
use nsa::cuda::{self, Shape};
use nsa::reference::{attend, compress, phi::Phi, row, select};
use nsa::testing::{max_abs, rel_rms};
use nsa::{NsaConfig, NsaError, NsaGrads, NsaInputs, PhiKind, PhiParams};
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

/// reference::backward with the selection taken from `sel` (`[N, HKV, n]`, the GPU's): the same
/// loop over rows as the reference, with the selected branch of each (token, group) whose choice
/// differs re-attended over the given blocks. Returns the gradients and the number of rows
/// whose selection differed.
fn reference_with_selection(
    cfg: &NsaConfig,
    x: &NsaInputs<f64>,
    d_o: &[f64],
    sel: &[i32],
) -> (NsaGrads<f64>, usize) {
    let dims = row::Dims::new(cfg, x.dk, x.dv);
    let (hq, hkv, dk, dv, n) = (dims.hq, dims.hkv, dims.dk, dims.dv, cfg.sel_count);
    let phi = PhiParams::<f64>::mean();
    let phi_k = Phi {
        weights: &phi.k,
        l: cfg.cmp_block,
        dim: dk,
        hidden: 0,
    };
    let phi_v = Phi {
        weights: &phi.v,
        l: cfg.cmp_block,
        dim: dv,
        hidden: 0,
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
        dphi: PhiParams::mean(),
    };
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
                    if gpu == rw.sel[g] {
                        continue;
                    }
                    differing += 1;
                    let keys = select::selected_keys(cfg, t, &gpu);
                    let head_kv = attend::HeadKv {
                        k: kv.slc_k,
                        v: kv.slc_v,
                        hkv,
                        h: g,
                        dk,
                        dv,
                    };
                    for h in g * dims.group..(g + 1) * dims.group {
                        let q = &q_row[h * dk..(h + 1) * dk];
                        rw.heads[h].att[1] = attend::attend(q, dims.scale, &head_kv, &keys);
                        rw.heads[h].keys[1] = keys.clone();
                    }
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
        let mut dphi_k = PhiParams::<f64>::mean().k;
        let mut dphi_v = PhiParams::<f64>::mean().v;
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
            &mut dphi_k,
            &mut dphi_v,
        );
    }
    (gr, differing)
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

fn run_case(name: &str, cfg: &NsaConfig, seqlens: &[usize], dk: usize, dv: usize, shared: bool) {
    run_case_with(name, cfg, seqlens, dk, dv, shared, false)
}

/// `save_stats`: the forward saves the branch outputs and lse and the backward uses them;
/// else (the default of `cuda::backward::backward`) the backward recomputes them.
fn run_case_with(
    name: &str,
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    shared: bool,
    save_stats: bool,
) {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let sd = seed();
    let x = NsaInputs::random(cfg, seqlens, dk, dv, shared, sd).map(bf16);
    let d_o = random_do(x.num_tokens() * cfg.heads * dv, sd ^ 0x5eed);
    let got =
        cuda::backward::backward_with(&ctx, cfg, &x, &PhiParams::mean(), &d_o, save_stats).unwrap();
    let fwd = cuda::forward(&ctx, cfg, &x, &PhiParams::mean()).unwrap();
    let x64 = x.map(|v| v as f64);
    let d_o64: Vec<f64> = d_o.iter().map(|&v| v as f64).collect();
    let (want, differing) = reference_with_selection(cfg, &x64, &d_o64, &fwd.sel_idx);
    let rows = x.num_tokens() * cfg.kv_heads;
    println!(
        "{name}: selection differs from the reference (near-ties) in {differing} of {rows} rows"
    );
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
            "{name}: {tn:>6} rel RMS {err:.3e}, max abs {:.3e}",
            max_abs(g, w)
        );
        worst = worst.max(err);
        assert!(
            err < GRAD_TOL,
            "{name}: {tn} relative RMS {err} over {GRAD_TOL}"
        );
    }
    println!(
        "{name}: seqlens {seqlens:?} HQ {} HKV {} dk {dk} dv {dv} shared {shared}: worst rel RMS {worst:.3e}",
        cfg.heads, cfg.kv_heads
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
fn bwd_saved_statistics_group16_and_varlen() {
    // the forward saves o_b and lse_b, the backward skips its statistics pass
    let c = cfg(32, 2).build().unwrap();
    run_case_with("g16-saved", &c, &[1100], 128, 128, false, true);
    let c = cfg(8, 2).build().unwrap();
    run_case_with("g4-saved", &c, &[700, 31, 5], 192, 128, true, true);
    let c = cfg(8, 2).build().unwrap();
    run_case_with("short-saved", &c, &[5, 17, 31, 1], 64, 64, false, true);
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
/// with split lists, so the partial reduction is exercised).
#[test]
fn bwd_is_bitwise_repeatable() {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let c = cfg(32, 2).build().unwrap();
    let sd = seed();
    let x = NsaInputs::random(&c, &[1500, 333], 128, 128, false, sd).map(bf16);
    let d_o = random_do(x.num_tokens() * c.heads * 128, sd ^ 0x5eed);
    let a = cuda::backward::backward(&ctx, &c, &x, &PhiParams::mean(), &d_o).unwrap();
    let b = cuda::backward::backward(&ctx, &c, &x, &PhiParams::mean(), &d_o).unwrap();
    for ((name, ga), (_, gb)) in named(&a).into_iter().zip(named(&b)) {
        let same = ga.iter().zip(gb).all(|(u, v)| u.to_bits() == v.to_bits());
        assert!(same, "{name} differs between two runs");
    }
    println!("repeatable: all 10 gradients bitwise equal");
}

#[test]
fn bwd_unsupported_inputs_are_typed_errors() {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let s = seed();
    let lin = cfg(4, 2).phi(PhiKind::Linear).build().unwrap();
    let x = NsaInputs::random(&lin, &[70], 64, 64, false, s);
    let phi = PhiParams::random(&lin, 64, 64, 0, s);
    let d_o = random_do(70 * 4 * 64, s);
    match cuda::backward::backward(&ctx, &lin, &x, &phi, &d_o) {
        Err(NsaError::Unsupported(m)) => println!("linear phi: {m}"),
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
