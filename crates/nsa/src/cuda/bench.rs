//! Timing of the CUDA forward pass (used by `nsa bench` and `examples/cuda_bench.rs`), with the
//! work each kernel must do, counted once per shape (METHOD.md: flops and bytes first).

use super::{forward_device, CudaContext, DeviceInputs, KernelTimes};
use crate::blocks;
use crate::config::NsaConfig;
use crate::error::Result;

/// Floating-point operations and the fewest device-memory bytes of each kernel for one shape
/// (matrix products only, 2 flops per multiply-add; bytes = each input read once, each output
/// written once, bf16 activations, f32 output).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernelWork {
    /// pass 1 (QK and PV) of the compressed attention
    pub cmp_flops: f64,
    /// pass 2 (QK again; the P x W scoring products are not counted)
    pub topn_flops: f64,
    pub sel_flops: f64,
    pub win_flops: f64,
    pub total_bytes: f64,
}

/// Counts [`KernelWork`] for a batch of sequences.
pub fn kernel_work(cfg: &NsaConfig, seqlens: &[usize], dk: usize, dv: usize) -> KernelWork {
    let (hq, hkv) = (cfg.heads as f64, cfg.kv_heads as f64);
    let (dkf, dvf) = (dk as f64, dv as f64);
    let mut w = KernelWork::default();
    let mut n_tok = 0f64;
    for &len in seqlens {
        n_tok += len as f64;
        for t in 0..len {
            let [ncmp, sel_tokens, win] = blocks::keys_per_branch(t, cfg).map(|k| k as f64);
            w.cmp_flops += hq * ncmp * (2.0 * dkf + 2.0 * dvf);
            w.topn_flops += hq * ncmp * 2.0 * dkf;
            w.sel_flops += hq * sel_tokens * 2.0 * (dkf + dvf);
            w.win_flops += hq * win * 2.0 * (dkf + dvf);
        }
    }
    // q, 3 x (k, v), gates read; o (f32) and sel_idx written
    w.total_bytes = n_tok
        * (hq * dkf * 2.0
            + 3.0 * hkv * (dkf + dvf) * 2.0
            + 3.0 * hq * 4.0
            + hq * dvf * 4.0
            + hkv * cfg.sel_count as f64 * 4.0);
    w
}

/// Median of each field over `reps` timed forward calls (after `warmup` untimed ones) on random
/// device-resident inputs.
#[allow(clippy::too_many_arguments)]
pub fn time_forward(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    warmup: usize,
    reps: usize,
    seed: u64,
) -> Result<KernelTimes> {
    let mut x = DeviceInputs::random(ctx, cfg, seqlens, dk, dv, false, seed)?;
    for _ in 0..warmup {
        forward_device(ctx, &mut x, None)?;
    }
    let mut all = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let mut t = KernelTimes::default();
        forward_device(ctx, &mut x, Some(&mut t))?;
        all.push(t);
    }
    let med = |f: fn(&KernelTimes) -> f32| {
        let mut v: Vec<f32> = all.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Ok(KernelTimes {
        compress: med(|t| t.compress),
        cmp: med(|t| t.cmp),
        topn: med(|t| t.topn),
        selected: med(|t| t.selected),
        window: med(|t| t.window),
        total: med(|t| t.total),
    })
}
