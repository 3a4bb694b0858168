#![cfg(feature = "cuda")]
//! Layout check of the Hopper wgmma helpers (kernels/wgmma.cu) on the GPU: the `wgmma_selftest`
//! kernel computes S = Q K^T (both operands from 128B-swizzled shared memory, K-major
//! descriptors) and O = P V with P = S rounded to the element type, taken from the score
//! accumulators as register A fragments, and V read MN-major (transposed) through its
//! descriptor. Compared with float64 products of the same rounded values, this separates a
//! wrong descriptor or swizzle (S wrong) from a wrong register fragment or transposed-B
//! descriptor (S right, O wrong). Needs an sm_90 GPU (run on the GPU machine; see
//! scripts/pack_gpu.sh).

use cudarc::driver::{self, LaunchConfig, PushKernelArg};
use nsa::cuda::{self, Elem, Family, Shape};
use nsa::testing::{max_abs, rel_rms};
use rand::{Rng, SeedableRng};

fn shape(dk: usize, dv: usize, elem: Elem) -> Shape {
    Shape {
        dk,
        dv,
        hq: 16,
        hkv: 1,
        cmp_l: 32,
        cmp_d: 16,
        sel_l: 64,
        nsel: 16,
        ninit: 1,
        nlocal: 2,
        win: 512,
        scale: 1.0 / (dk as f64).sqrt(),
        mt: cuda::default_mt(dv),
        elem,
    }
}

/// Runs the self-test kernel for one shape; returns (rel RMS of S, rel RMS of O).
fn selftest(dk: usize, dv: usize, elem: Elem, seed: u64) -> (f64, f64) {
    let sh = shape(dk, dv, elem);
    let rows = 64 * sh.mt;
    let compiled = cuda::compile(Family::CmpAttn, &sh, "sm_90a", &["-DWGMMA_SELFTEST"])
        .unwrap_or_else(|e| panic!("compile: {e}"));
    let ctx = driver::CudaContext::new(0).expect("a CUDA device");
    let stream = ctx.default_stream();
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin))
        .expect("load module");
    let f = module.load_function("wgmma_selftest").expect("kernel");
    let smem = 1024 + (rows * dk + 64 * dk + 64 * dv) * 2;
    f.set_attribute(
        driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .expect("smem attribute");

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut gen = |n: usize| -> (Vec<u16>, Vec<f64>) {
        let bits: Vec<u16> = (0..n)
            .map(|_| elem.bits(rng.gen_range(-2.0f32..2.0)))
            .collect();
        let vals = bits.iter().map(|&b| elem.value(b) as f64).collect();
        (bits, vals)
    };
    let (qb, q) = gen(rows * dk);
    let (kb, k) = gen(64 * dk);
    let (vb, v) = gen(64 * dv);
    let dq = stream.clone_htod(&qb).unwrap();
    let dkk = stream.clone_htod(&kb).unwrap();
    let dvv = stream.clone_htod(&vb).unwrap();
    // poisoned outputs: every element must be written
    let mut ds = stream.clone_htod(&vec![f32::NAN; rows * 64]).unwrap();
    let mut d_o = stream.clone_htod(&vec![f32::NAN; rows * dv]).unwrap();
    let mut b = stream.launch_builder(&f);
    b.arg(&dq).arg(&dkk).arg(&dvv).arg(&mut ds).arg(&mut d_o);
    // SAFETY: the argument list matches `wgmma_selftest`; buffers have the sizes it reads/writes.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        })
    }
    .expect("launch");
    let s_gpu = stream.clone_dtoh(&ds).unwrap();
    let o_gpu = stream.clone_dtoh(&d_o).unwrap();

    let mut s_ref = vec![0f64; rows * 64];
    for r in 0..rows {
        for c in 0..64 {
            s_ref[r * 64 + c] = (0..dk).map(|i| q[r * dk + i] * k[c * dk + i]).sum();
        }
    }
    // O from the GPU's own scores, rounded as the kernel rounds P
    let p: Vec<f64> = s_gpu.iter().map(|&x| elem.round(x) as f64).collect();
    let mut o_ref = vec![0f64; rows * dv];
    for r in 0..rows {
        for c in 0..dv {
            o_ref[r * dv + c] = (0..64).map(|j| p[r * 64 + j] * v[j * dv + c]).sum();
        }
    }
    let s64: Vec<f64> = s_gpu.iter().map(|&x| x as f64).collect();
    let o64: Vec<f64> = o_gpu.iter().map(|&x| x as f64).collect();
    let (es, eo) = (rel_rms(&s64, &s_ref), rel_rms(&o64, &o_ref));
    println!(
        "wgmma selftest {elem} dk={dk} dv={dv} rows={rows}: S rel RMS {es:.2e} (max abs {:.2e}), O rel RMS {eo:.2e} (max abs {:.2e})",
        max_abs(&s64, &s_ref),
        max_abs(&o64, &o_ref)
    );
    (es, eo)
}

#[test]
fn wgmma_products_match_f64() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed = {seed}");
    let mut bad = Vec::new();
    for (i, (dk, dv, elem)) in [
        (128, 128, Elem::Bf16),
        (192, 128, Elem::Bf16),
        (64, 64, Elem::Bf16),
        (128, 128, Elem::F16),
    ]
    .into_iter()
    .enumerate()
    {
        let (es, eo) = selftest(dk, dv, elem, seed + i as u64);
        // f32 accumulation of exactly representable products: far under 1e-5
        if !(es < 1e-5 && eo < 1e-5) {
            bad.push(format!("{elem} dk={dk} dv={dv}: S {es:.2e}, O {eo:.2e}"));
        }
    }
    assert!(bad.is_empty(), "wgmma layout errors: {bad:?}");
}
