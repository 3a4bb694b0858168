#![cfg(feature = "cuda")]
//! CUDA forward pass against the float64 reference (run on the GPU machine; see
//! scripts/pack_gpu.sh). Inputs are rounded to the kernels' 16-bit type (bf16, or f16 in the
//! `f16_*` cases) once, and the reference runs on exactly those rounded values, so the
//! comparison measures the kernels' arithmetic alone.

mod gpu_common;
use gpu_common::*;
use nsa::cuda::{self, Elem, Family, Shape};

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

/// Every family compiles for sm_90a at the shapes the tests and benchmarks use (needs NVRTC
/// only, no GPU), and no kernel spills registers to local memory.
#[test]
fn every_kernel_variant_compiles() {
    let shapes = [
        shape(128, 128, 64, 4, 32, 16, 64),
        shape(192, 128, 64, 4, 32, 16, 64),
        shape(64, 64, 8, 8, 32, 16, 64),
        shape(256, 256, 16, 2, 16, 8, 32),
        shape(128, 128, 8, 2, 32, 16, 64),
        shape(64, 64, 8, 1, 32, 16, 64),
        shape(128, 128, 64, 2, 64, 64, 64),
        // the f16 element type (-DELEM_F16)
        shape(128, 128, 64, 4, 32, 16, 64).with_elem(Elem::F16),
        shape(192, 128, 8, 2, 32, 16, 64).with_elem(Elem::F16),
    ];
    for s in &shapes {
        for fam in Family::ALL {
            let c = cuda::compile(fam, s, "sm_90a", &["--ptxas-options=-v"])
                .unwrap_or_else(|e| panic!("{fam:?} {s:?}: {e}"));
            assert!(!c.cubin.is_empty());
            let report: Vec<&str> = c
                .log
                .lines()
                .filter(|l| l.contains("registers") || l.contains("spill"))
                .collect();
            println!(
                "{fam:?} {} dk={} dv={} G={}: {}",
                s.elem,
                s.dk,
                s.dv,
                s.hq / s.hkv,
                report.join(" | ")
            );
        }
    }
}

use nsa::reference;
use nsa::testing::{max_abs, rel_rms};
use nsa::{NsaConfig, NsaError, NsaInputs, PhiKind, PhiParams};

fn run_case(name: &str, cfg: &NsaConfig, seqlens: &[usize], dk: usize, dv: usize, shared: bool) {
    run_case_phi(name, cfg, seqlens, dk, dv, shared, 0);
}

/// `hidden` is the MLP width (used when `cfg.phi` is mlp); the phi weights are random f32 and
/// reach the reference unrounded (the kernels read them as f32 too).
fn run_case_phi(
    name: &str,
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    shared: bool,
    hidden: usize,
) {
    run_case_in(name, cfg, seqlens, dk, dv, shared, hidden, Elem::Bf16);
}

/// [`run_case_phi`] with the kernels computing in `elem`. f16 inputs go up as `half::f16`
/// (bit for bit); the same values as f32 through `forward_as` must give bitwise the same output.
#[allow(clippy::too_many_arguments)]
fn run_case_in(
    name: &str,
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    shared: bool,
    hidden: usize,
    elem: Elem,
) {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let sd = seed();
    let x = round_elem(&NsaInputs::random(cfg, seqlens, dk, dv, shared, sd), elem);
    let phi = PhiParams::random(cfg, dk, dv, hidden, sd);
    let got = match elem {
        Elem::Bf16 => cuda::forward(&ctx, cfg, &x, &phi).unwrap(),
        Elem::F16 => {
            let got = cuda::forward(&ctx, cfg, &x.map(half::f16::from_f32), &phi).unwrap();
            let via_f32 = cuda::forward_as(&ctx, cfg, &x, &phi, Elem::F16).unwrap();
            assert!(
                got.o
                    .iter()
                    .zip(&via_f32.o)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
                    && got.sel_idx == via_f32.sel_idx,
                "{name}: f16 host inputs and f32 inputs rounded to f16 differ"
            );
            got
        }
    };
    let x64 = x.map(|v| v as f64);
    let phi64 = phi.map(|v| v as f64);
    let want = reference::forward(cfg, &x64, &phi64).unwrap();
    assert!(
        got.o.iter().all(|v| v.is_finite()),
        "{name}: non-finite output (unwritten?)"
    );
    let differing = check_selection(cfg, &x64, &phi64, &want.sel_idx, &got.sel_idx);
    let want_o = reference_output(cfg, &x64, &phi64, &want, &differing, &got.sel_idx);
    let err = rel_rms(&got.o, &want_o);
    println!(
        "{name}: {elem} seqlens {seqlens:?} HQ {} HKV {} dk {dk} dv {dv} shared {shared}: rel RMS {err:.3e}, max abs {:.3e}",
        cfg.heads,
        cfg.kv_heads,
        max_abs(&got.o, &want_o)
    );
    assert!(err < OUT_TOL, "{name}: relative RMS {err} over {OUT_TOL}");
}

#[test]
fn paper_geometry_group16_independent_kv() {
    let c = cfg(32, 2).build().unwrap();
    run_case("g16", &c, &[777], 128, 128, false);
}

#[test]
fn varlen_group4_dk192_dv128_shared_kv() {
    let c = cfg(8, 2).build().unwrap();
    run_case("g4-varlen", &c, &[1100, 31, 300, 65], 192, 128, true);
}

#[test]
fn f16_group16_varlen_dk128() {
    let c = cfg(32, 2).build().unwrap();
    run_case_in(
        "f16-g16",
        &c,
        &[777, 300, 45],
        128,
        128,
        false,
        0,
        Elem::F16,
    );
}

#[test]
fn f16_group4_dk192_dv128_shared_kv() {
    let c = cfg(8, 2).build().unwrap();
    run_case_in("f16-g4", &c, &[1100, 31, 65], 192, 128, true, 0, Elem::F16);
}

#[test]
fn mha_group1_odd_length() {
    let c = cfg(2, 2).build().unwrap();
    run_case("g1", &c, &[1999], 64, 64, false);
}

#[test]
fn group2_other_block_geometry() {
    // l = 48, d = 16, l' = 96, w = 100, n = 8 with 2 initial and 1 local forced block
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
fn group8_l_equals_d() {
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
fn sequences_shorter_than_a_compression_block() {
    let c = cfg(8, 2).build().unwrap();
    run_case("short", &c, &[5, 17, 31, 1], 64, 64, false);
}

#[test]
fn head_dim_256_group32() {
    let c = cfg(32, 1)
        .sel_block(32)
        .cmp_block(32)
        .cmp_stride(8)
        .window(128)
        .build()
        .unwrap();
    run_case("g32-d256", &c, &[400], 256, 256, false);
}

#[test]
fn phi_linear_group4() {
    let c = cfg(8, 2).phi(PhiKind::Linear).build().unwrap();
    run_case_phi("phi-linear", &c, &[600, 45], 64, 64, false, 0);
}

#[test]
fn phi_mlp_group2_dk_ne_dv() {
    let c = cfg(4, 2).phi(PhiKind::Mlp).build().unwrap();
    run_case_phi("phi-mlp", &c, &[500], 64, 32, false, 48);
}

/// SPEC.md deterministic mode: the same inputs give bitwise-identical outputs (no atomics,
/// fixed reduction orders), run after run.
#[test]
fn repeated_runs_are_bitwise_identical() {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let c = cfg(32, 2).build().unwrap();
    let x = NsaInputs::random(&c, &[900, 133], 128, 128, false, seed());
    let a = cuda::forward(&ctx, &c, &x, &PhiParams::mean()).unwrap();
    let b = cuda::forward(&ctx, &c, &x, &PhiParams::mean()).unwrap();
    assert_eq!(a.sel_idx, b.sel_idx);
    let same =
        a.o.iter()
            .zip(&b.o)
            .all(|(p, q)| p.to_bits() == q.to_bits());
    assert!(same, "outputs differ between two runs on the same inputs");
}

/// The opt-in overlapped forward (two streams pipelining chunks of row tiles, cuda/overlap.rs)
/// computes every row exactly as the sequential one: outputs and selections bitwise equal, with
/// saved statistics too, for G = 16 / 32, varlen, dk 192, and more chunks than tiles; at G = 4
/// (block-outer selection) it falls back to the sequential forward.
#[test]
fn overlapped_forward_is_bitwise_the_sequential_one() {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let sd = seed();
    for (c, lens, dk, dv, chunks) in [
        (cfg(32, 2).build().unwrap(), vec![900, 133], 128, 128, 3),
        (cfg(32, 2).build().unwrap(), vec![2000], 192, 128, 7),
        (cfg(64, 2).build().unwrap(), vec![65, 1, 300], 128, 64, 50),
        (cfg(8, 2).build().unwrap(), vec![700, 31], 128, 128, 4),
    ] {
        let x = NsaInputs::random(&c, &lens, dk, dv, false, sd);
        let run = |chunks: usize| {
            let mut dev = cuda::DeviceInputs::upload(&ctx, &c, &x).unwrap();
            dev.set_phi(&ctx, &PhiParams::mean()).unwrap();
            dev.enable_saving(&ctx).unwrap();
            dev.set_overlap(&ctx, chunks).unwrap();
            dev.poison_outputs(&ctx).unwrap();
            cuda::forward_device(&ctx, &mut dev, None).unwrap();
            dev.download(&ctx).unwrap()
        };
        let (a, b) = (run(0), run(chunks));
        assert_eq!(a.sel_idx, b.sel_idx, "{lens:?}: selections differ");
        assert!(
            a.o.iter().all(|v| v.is_finite()),
            "{lens:?}: unwritten outputs"
        );
        let same =
            a.o.iter()
                .zip(&b.o)
                .all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(
            same,
            "{lens:?} G {}: overlapped output differs",
            c.heads / c.kv_heads
        );
        println!(
            "overlap {lens:?} G {} {chunks} chunks: bitwise equal",
            c.heads / c.kv_heads
        );
    }
}

#[test]
fn unsupported_shapes_are_typed_errors() {
    let ctx = cuda::CudaContext::new(0).expect("a CUDA device");
    let c = cfg(4, 2).build().unwrap();
    let s = seed();
    for (dk, dv) in [(512, 128), (128, 512), (100, 128)] {
        let x = NsaInputs::random(&c, &[70], dk, dv, false, s);
        match cuda::forward(&ctx, &c, &x, &PhiParams::mean()) {
            Err(NsaError::Unsupported(m)) => println!("dk {dk} dv {dv}: {m}"),
            other => panic!(
                "dk {dk} dv {dv}: expected Unsupported, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    let big_n = cfg(4, 2).sel_count(40).build().unwrap();
    let x = NsaInputs::random(&big_n, &[70], 64, 64, false, s);
    assert!(matches!(
        cuda::forward(&ctx, &big_n, &x, &PhiParams::mean()),
        Err(NsaError::Unsupported(_))
    ));
    // phi weights of the wrong kind for the configuration
    let lin = cfg(4, 2).phi(PhiKind::Linear).build().unwrap();
    let x = NsaInputs::random(&lin, &[70], 64, 64, false, s);
    assert!(matches!(
        cuda::forward(&ctx, &lin, &x, &PhiParams::mean()),
        Err(NsaError::Unsupported(_))
    ));
    // bad input is still rejected before any kernel runs
    let mut bad = NsaInputs::random(&c, &[70], 64, 64, false, s);
    bad.q.pop();
    assert!(matches!(
        cuda::forward(&ctx, &c, &bad, &PhiParams::mean()),
        Err(NsaError::ShapeMismatch { .. })
    ));
}
