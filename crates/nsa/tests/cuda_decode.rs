#![cfg(feature = "cuda")]
//! GPU decoding (paged cache, split-K decode kernels) against the float64 reference forward on
//! the whole sequences (SPEC.md "Decoding": a decode row equals the forward's row). Inputs are
//! rounded to bf16 once and the reference runs on exactly those values. Outputs are poisoned
//! (NaN, i32::MIN) before every call; fresh random data each run (the seed is printed).

mod gpu_common;
use gpu_common::*;
use nsa::cuda::{self, decode, CudaContext, Elem, Family};
use nsa::reference;
use nsa::testing::{max_abs, rel_rms};
use nsa::{NsaConfig, NsaError, NsaInputs, PhiKind, PhiParams};

/// Replays `seqlens` through the GPU cache (prompt of `prefill` tokens in chunks of `chunk`,
/// then steps) and compares every row with the reference forward on the whole sequences; also
/// reports the error of the decoded rows alone (positions >= the first chunk).
#[allow(clippy::too_many_arguments)]
fn run_case(
    name: &str,
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    shared: bool,
    prefill: usize,
    chunk: usize,
) {
    run_case_in(
        name,
        cfg,
        seqlens,
        dk,
        dv,
        shared,
        prefill,
        chunk,
        Elem::Bf16,
    );
}

/// [`run_case`] with the cache and kernels in `elem` (f16: `half::f16` inputs, uploaded bit for
/// bit; the reference runs on the same f16 values).
#[allow(clippy::too_many_arguments)]
fn run_case_in(
    name: &str,
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    shared: bool,
    prefill: usize,
    chunk: usize,
    elem: Elem,
) {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let x = round_elem(
        &NsaInputs::random(cfg, seqlens, dk, dv, shared, seed()),
        elem,
    );
    let phi = PhiParams::mean();
    let got = match elem {
        Elem::Bf16 => decode::replay_with(&ctx, cfg, &x, &phi, prefill, chunk, true),
        Elem::F16 => {
            let x16 = x.map(half::f16::from_f32);
            decode::replay_with(&ctx, cfg, &x16, &phi, prefill, chunk, true)
        }
    }
    .unwrap();
    let x64 = x.map(|v| v as f64);
    let want = reference::forward(cfg, &x64, &PhiParams::mean()).unwrap();
    assert!(
        got.o.iter().all(|v| v.is_finite()),
        "{name}: non-finite output (unwritten?)"
    );
    assert!(
        got.sel_idx.iter().all(|&j| j >= -1),
        "{name}: unwritten selection"
    );
    let differing = check_selection(cfg, &x64, &PhiParams::mean(), &want.sel_idx, &got.sel_idx);
    let want_o = reference_output(
        cfg,
        &x64,
        &PhiParams::mean(),
        &want,
        &differing,
        &got.sel_idx,
    );
    let err = rel_rms(&got.o, &want_o);
    // rows produced by the decode kernels: positions >= the first prompt chunk
    let first = prefill.min(chunk);
    let (hq, mut dg, mut dw) = (cfg.heads, Vec::new(), Vec::new());
    for (b, w) in x.cu_seqlens.windows(2).enumerate() {
        let _ = b;
        for i in w[0] + first.min(w[1] - w[0])..w[1] {
            dg.extend_from_slice(&got.o[i * hq * dv..(i + 1) * hq * dv]);
            dw.extend_from_slice(&want_o[i * hq * dv..(i + 1) * hq * dv]);
        }
    }
    let derr = if dg.is_empty() {
        0.0
    } else {
        rel_rms(&dg, &dw)
    };
    println!(
        "{name}: {elem} seqlens {seqlens:?} HQ {} HKV {} dk {dk} dv {dv} shared {shared} prefill {prefill} chunk {chunk}: rel RMS {err:.3e} (decoded rows {} : {derr:.3e}), max abs {:.3e}",
        cfg.heads,
        cfg.kv_heads,
        dg.len() / (hq * dv),
        max_abs(&got.o, &want_o)
    );
    assert!(err < OUT_TOL, "{name}: relative RMS {err} over {OUT_TOL}");
    assert!(
        derr < OUT_TOL,
        "{name}: decoded rows relative RMS {derr} over {OUT_TOL}"
    );
}

/// The decode family (and the phi GEMM a learned phi adds to a step) compiles for sm_90a at the
/// shapes the tests and the benchmark use (NVRTC only); registers and spills are printed.
#[test]
fn decode_kernels_compile() {
    let shape = |dk: usize, dv: usize, hq: usize, hkv: usize| {
        let c = cfg(hq, hkv).build().unwrap();
        nsa::cuda::Shape {
            dk,
            dv,
            hq,
            hkv,
            cmp_l: c.cmp_block,
            cmp_d: c.cmp_stride,
            sel_l: c.sel_block,
            nsel: c.sel_count,
            ninit: c.init_blocks,
            nlocal: c.local_blocks,
            win: c.window,
            scale: c.softmax_scale(dk),
            mt: cuda::default_mt(dv),
            elem: cuda::Elem::Bf16,
        }
    };
    for s in [
        shape(128, 128, 64, 4),
        shape(192, 128, 64, 4),
        shape(64, 64, 2, 2),
        shape(128, 128, 8, 2),
        shape(64, 64, 64, 1),
        shape(256, 256, 32, 1),
    ] {
        let c = cuda::compile(Family::Decode, &s, "sm_90a", &["--ptxas-options=-v"])
            .unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert!(!c.cubin.is_empty());
        // a learned phi's GEMM (kernels/phi.cu) runs in the steps too
        let p = cuda::compile(Family::Phi, &s, "sm_90a", &[])
            .unwrap_or_else(|e| panic!("phi {s:?}: {e}"));
        assert!(!p.cubin.is_empty());
        let report: Vec<&str> = c
            .log
            .lines()
            .filter(|l| l.contains("registers") || l.contains("spill") || l.contains("Compiling"))
            .collect();
        println!(
            "decode dk={} dv={} G={}:\n  {}",
            s.dk,
            s.dv,
            s.hq / s.hkv,
            report.join("\n  ")
        );
    }
}

#[test]
fn group16_ragged_batch_steps() {
    // batched steps while all three are active, then one-token prefills of the longer ones
    let c = cfg(32, 2).build().unwrap();
    run_case(
        "g16-ragged",
        &c,
        &[1300, 450, 300],
        128,
        128,
        false,
        200,
        usize::MAX,
    );
}

#[test]
fn group4_dk192_dv128_topn_pressure() {
    // n = 6 of up to 12 admissible blocks: the top-n decides at every step
    let c = cfg(8, 2).sel_count(6).build().unwrap();
    run_case("g4-d192", &c, &[760, 257], 192, 128, true, 64, usize::MAX);
}

#[test]
fn f16_group16_ragged_and_group4_dk192_chunked() {
    let c = cfg(32, 2).build().unwrap();
    run_case_in(
        "f16-g16",
        &c,
        &[900, 450, 300],
        128,
        128,
        false,
        200,
        usize::MAX,
        Elem::F16,
    );
    // chunked prefill (rows of a non-empty cache through the decode kernels), then steps
    let c = cfg(8, 2).sel_count(6).build().unwrap();
    run_case_in(
        "f16-g4-d192",
        &c,
        &[700, 257],
        192,
        128,
        true,
        300,
        128,
        Elem::F16,
    );
}

#[test]
fn group1_from_empty_cache_and_shorter_than_l() {
    // no prompt: every row is decoded, including t < l - 1 (no compressed token visible)
    let c = cfg(2, 2).sel_count(4).build().unwrap();
    run_case(
        "g1-empty",
        &c,
        &[400, 31, 90, 5],
        64,
        64,
        false,
        0,
        usize::MAX,
    );
}

#[test]
fn chunked_prefill_then_steps() {
    // prompt of 500 in chunks of 150: the first chunk through the forward, the others through
    // the decode rows (chunk boundaries inside compression blocks); then steps
    let c = cfg(16, 4).sel_count(5).build().unwrap();
    run_case("g4-chunked", &c, &[620, 530], 128, 128, false, 500, 150);
}

#[test]
fn group64_other_geometry() {
    // l = 48, d = 16, l' = 96, w = 100, n = 5 with 2 initial and 1 local forced block
    let c = cfg(64, 1)
        .cmp_block(48)
        .cmp_stride(16)
        .sel_block(96)
        .sel_count(5)
        .init_blocks(2)
        .local_blocks(1)
        .window(100)
        .build()
        .unwrap();
    run_case("g64-48/16/96", &c, &[700, 150], 64, 64, false, 120, 70);
}

#[test]
fn cache_full_and_unsupported_are_typed_errors() {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let c = cfg(4, 2).build().unwrap();
    let s = seed();
    let phi = PhiParams::mean();
    // a sequence longer than max_len
    let mut cache = decode::GpuDecodeCache::new(&ctx, &c, 1, 64, 64, 100, 128).unwrap();
    let x = NsaInputs::random(&c, &[100], 64, 64, false, s);
    decode::prefill(&ctx, &mut cache, &[0], &x, &phi).unwrap();
    let one = NsaInputs::random(&c, &[1], 64, 64, false, s ^ 1);
    match decode::step(&ctx, &mut cache, &one, &phi) {
        Err(NsaError::CacheFull { capacity, needed }) => {
            println!("max_len: capacity {capacity}, needed {needed}")
        }
        other => panic!("expected CacheFull, got {:?}", other.map(|_| ())),
    }
    // a pool with no free page: two sequences of 128 max, 128 pooled tokens
    let mut cache = decode::GpuDecodeCache::new(&ctx, &c, 2, 64, 64, 128, 128).unwrap();
    let x = NsaInputs::random(&c, &[100], 64, 64, false, s ^ 2);
    decode::prefill(&ctx, &mut cache, &[0], &x, &phi).unwrap();
    let x1 = NsaInputs::random(&c, &[10], 64, 64, false, s ^ 3);
    assert!(matches!(
        decode::prefill(&ctx, &mut cache, &[1], &x1, &phi),
        Err(NsaError::CacheFull { .. })
    ));
    // after a reset the pages are free again
    cache.reset(&ctx, 0).unwrap();
    decode::prefill(&ctx, &mut cache, &[1], &x1, &phi).unwrap();
    assert_eq!(cache.lens(), &[0, 10]);
    // bad sequence ids and step shapes
    assert!(matches!(
        decode::prefill(&ctx, &mut cache, &[5], &x1, &phi),
        Err(NsaError::Decode(_))
    ));
    let three = NsaInputs::random(&c, &[1, 1, 1], 64, 64, false, s);
    assert!(matches!(
        decode::step(&ctx, &mut cache, &three, &phi),
        Err(NsaError::Decode(_))
    ));
    // phi = linear: the cache takes it, but only with linear weights
    let lin = cfg(4, 2).phi(PhiKind::Linear).build().unwrap();
    let mut cache = decode::GpuDecodeCache::new(&ctx, &lin, 1, 64, 64, 100, 128).unwrap();
    let x = NsaInputs::random(&lin, &[40], 64, 64, false, s ^ 4);
    assert!(matches!(
        decode::prefill(&ctx, &mut cache, &[0], &x, &phi),
        Err(NsaError::Unsupported(_))
    ));
    let mlp = PhiParams::random(&cfg(4, 2).phi(PhiKind::Mlp).build().unwrap(), 64, 64, 32, s);
    assert!(matches!(
        cache.set_phi(&ctx, &mlp),
        Err(NsaError::Unsupported(_))
    ));
    assert_eq!(cache.lens(), &[0]);
    // no weights uploaded yet: a step on the held weights is refused, the cache unchanged
    let one = NsaInputs::random(&lin, &[1], 64, 64, false, s ^ 5);
    assert!(matches!(
        decode::step_held_phi(&ctx, &mut cache, &one),
        Err(NsaError::Decode(_))
    ));
    let w = PhiParams::random(&lin, 64, 64, 0, s);
    decode::prefill(&ctx, &mut cache, &[0], &x, &w).unwrap();
    assert_eq!(cache.lens(), &[40]);
    decode::step_held_phi(&ctx, &mut cache, &one).unwrap();
    assert_eq!(cache.lens(), &[41]);
}

/// A learned `phi` through the cache with the sequences at different positions: prompts of
/// different lengths prefilled in chunks (the first through the forward, the others through
/// the decode rows), then `steps` batched steps, in which the sequences complete their
/// compression blocks at different steps (the device-side flags of the step's phi GEMMs). Every
/// row is compared with the float64 reference forward on the whole sequences.
#[allow(clippy::too_many_arguments)]
fn run_staggered(
    name: &str,
    cfg: &NsaConfig,
    prompts: &[usize],
    steps: usize,
    chunk: usize,
    dk: usize,
    dv: usize,
    hidden: usize,
) {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let sd = seed();
    let seqlens: Vec<usize> = prompts.iter().map(|p| p + steps).collect();
    let x = round_bf16(&NsaInputs::random(cfg, &seqlens, dk, dv, false, sd));
    let phi = PhiParams::random(cfg, dk, dv, hidden, sd ^ 7);
    let batch = prompts.len();
    let longest = *seqlens.iter().max().unwrap();
    let pool: usize = seqlens
        .iter()
        .map(|l| l.next_multiple_of(decode::PAGE))
        .sum();
    let mut cache = decode::GpuDecodeCache::new(&ctx, cfg, batch, dk, dv, longest, pool).unwrap();
    cache.set_poison(true);
    let (hq, hkv, n) = (cfg.heads, cfg.kv_heads, cfg.sel_count);
    let mut got_o = vec![f32::NAN; x.num_tokens() * hq * dv];
    let mut got_sel = vec![i32::MIN; x.num_tokens() * hkv * n];
    let mut put = |rows: &[usize], part: &nsa::NsaOutput<f32>| {
        for (i, &r) in rows.iter().enumerate() {
            got_o[r * hq * dv..(r + 1) * hq * dv]
                .copy_from_slice(&part.o[i * hq * dv..(i + 1) * hq * dv]);
            got_sel[r * hkv * n..(r + 1) * hkv * n]
                .copy_from_slice(&part.sel_idx[i * hkv * n..(i + 1) * hkv * n]);
        }
    };
    let longest_prompt = *prompts.iter().max().unwrap();
    for c0 in (0..longest_prompt).step_by(chunk) {
        let (mut rows, mut cu, mut ids) = (Vec::new(), vec![0], Vec::new());
        for (b, &p) in prompts.iter().enumerate() {
            let r = x.seq_range(b);
            if c0 < p {
                rows.extend(r.start + c0..r.start + (c0 + chunk).min(p));
                cu.push(rows.len());
                ids.push(b);
            }
        }
        let part = decode::prefill(&ctx, &mut cache, &ids, &x.gather(&rows, cu), &phi).unwrap();
        put(&rows, &part);
    }
    assert_eq!(cache.lens(), prompts);
    for i in 0..steps {
        let rows: Vec<usize> = (0..batch)
            .map(|b| x.seq_range(b).start + prompts[b] + i)
            .collect();
        let one_each = (0..=batch).collect();
        let xs = x.gather(&rows, one_each);
        // every other step with the weights the cache holds (no host comparison)
        let part = if i % 2 == 1 {
            decode::step_held_phi(&ctx, &mut cache, &xs)
        } else {
            decode::step(&ctx, &mut cache, &xs, &phi)
        }
        .unwrap();
        put(&rows, &part);
    }
    assert_eq!(cache.lens(), seqlens.as_slice());
    let x64 = x.map(|v| v as f64);
    let phi64 = phi.map(|v| v as f64);
    let want = reference::forward(cfg, &x64, &phi64).unwrap();
    assert!(
        got_o.iter().all(|v| v.is_finite()),
        "{name}: non-finite output (unwritten?)"
    );
    assert!(
        got_sel.iter().all(|&j| j >= -1),
        "{name}: unwritten selection"
    );
    let differing = check_selection(cfg, &x64, &phi64, &want.sel_idx, &got_sel);
    let want_o = reference_output(cfg, &x64, &phi64, &want, &differing, &got_sel);
    let err = rel_rms(&got_o, &want_o);
    // the rows of the steps alone, and those of each sequence's decoded prompt chunks
    let (mut sg, mut sw, mut cg, mut cw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (b, &p) in prompts.iter().enumerate() {
        let r = x.seq_range(b);
        for i in r.start + chunk.min(p)..r.end {
            let (g, w) = if i >= r.start + p {
                (&mut sg, &mut sw)
            } else {
                (&mut cg, &mut cw)
            };
            g.extend_from_slice(&got_o[i * hq * dv..(i + 1) * hq * dv]);
            w.extend_from_slice(&want_o[i * hq * dv..(i + 1) * hq * dv]);
        }
    }
    let serr = rel_rms(&sg, &sw);
    let cerr = if cg.is_empty() {
        0.0
    } else {
        rel_rms(&cg, &cw)
    };
    println!(
        "{name}: {:?} prompts {prompts:?} + {steps} steps, chunk {chunk}, HQ {hq} HKV {hkv} dk {dk} dv {dv} hidden {hidden}: rel RMS {err:.3e} (step rows {serr:.3e}, decoded prompt rows {cerr:.3e}), max abs {:.3e}",
        cfg.phi,
        max_abs(&got_o, &want_o)
    );
    assert!(err < OUT_TOL, "{name}: relative RMS {err} over {OUT_TOL}");
    assert!(
        serr < OUT_TOL,
        "{name}: step rows relative RMS {serr} over {OUT_TOL}"
    );
    assert!(
        cerr < OUT_TOL,
        "{name}: prompt rows relative RMS {cerr} over {OUT_TOL}"
    );
}

#[test]
fn phi_linear_group4_staggered_steps() {
    // G = 4, l = 32 / d = 16: the three sequences complete blocks at different steps
    let c = cfg(8, 2).phi(PhiKind::Linear).build().unwrap();
    run_staggered("linear-g4", &c, &[300, 237, 91], 70, 128, 128, 128, 0);
}

#[test]
fn phi_mlp_group2_dk128_dv64_staggered_steps() {
    // G = 2, dk != dv, l = 48 / d = 16, more than one chunk through the decode rows
    let c = cfg(4, 2)
        .phi(PhiKind::Mlp)
        .cmp_block(48)
        .cmp_stride(16)
        .sel_block(96)
        .sel_count(5)
        .window(128)
        .build()
        .unwrap();
    run_staggered("mlp-g2", &c, &[410, 170, 333, 60], 53, 100, 128, 64, 96);
}

#[test]
fn phi_mean_staggered_steps() {
    // the same driver with phi = mean (the write kernel's own path)
    let c = cfg(16, 4).sel_count(6).build().unwrap();
    run_staggered("mean-g4", &c, &[260, 199, 33], 45, 96, 64, 64, 0);
}

/// The facade's decode replay on the GPU equals its forward on the GPU (same bf16 kernels for
/// the prompt; decoded rows within the bf16 tolerance of each other).
#[test]
fn facade_decode_replay_matches_forward() {
    let c = cfg(8, 2).build().unwrap();
    let x = NsaInputs::random(&c, &[300, 170], 128, 128, false, seed());
    let phi = PhiParams::mean();
    let dev = nsa::Device::Cuda(0);
    let fwd = nsa::forward(&dev, &c, &x, &phi).unwrap();
    let rep = nsa::decode_replay(&dev, &c, &x, &phi, 100).unwrap();
    let err = rel_rms(&rep.o, &fwd.o);
    let same_sel = rep
        .sel_idx
        .iter()
        .zip(&fwd.sel_idx)
        .filter(|(a, b)| a == b)
        .count();
    println!(
        "facade: replay vs forward rel RMS {err:.3e}, selection rows equal {same_sel} of {}",
        fwd.sel_idx.len()
    );
    assert!(err < OUT_TOL);
}
