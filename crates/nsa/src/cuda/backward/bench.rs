//! Timing of the CUDA backward pass (`examples/cuda_bench_bwd.rs`), with the work each kernel
//! must do counted first (METHOD.md: flops and bytes before time).

use super::{backward_device, BwdMode, BwdTimes, DeviceBackward};
use crate::blocks;
use crate::config::NsaConfig;
use crate::cuda::{driver_err, forward_device, CudaContext, DeviceInputs};
use crate::error::Result;

/// Matrix flops of the backward kernels (2 per multiply-add) and the fewest bytes they must
/// move. Per (query row, key) pair of a branch: the row-major kernel recomputes S = QK^T and
/// O = PV (statistics) then S, dP = dO V^T and dQ = dS K: 2 (3 dk + 2 dv) flops; the key-major
/// kernel S^T, dP^T, dV += P^T dO, dK += dS^T Q: 4 (dk + dv) flops.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BwdWork {
    /// (row, key) pairs per branch: compressed, selected, window.
    pub pairs: [f64; 3],
    /// Row-major (statistics + dQ) flops per branch.
    pub dq_flops: [f64; 3],
    /// Key-major (dK, dV) flops per branch.
    pub dkdv_flops: [f64; 3],
    /// q, do (bf16), K/V (bf16) and gates read once; dq, dK, dV (f32) and dg written once.
    pub bytes: f64,
}

/// Counts [`BwdWork`] for a batch of sequences.
pub fn bwd_work(cfg: &NsaConfig, seqlens: &[usize], dk: usize, dv: usize) -> BwdWork {
    let (hq, hkv) = (cfg.heads as f64, cfg.kv_heads as f64);
    let (dkf, dvf) = (dk as f64, dv as f64);
    let mut w = BwdWork::default();
    let mut n = 0f64;
    for &len in seqlens {
        n += len as f64;
        for t in 0..len {
            for (p, keys) in w.pairs.iter_mut().zip(blocks::keys_per_branch(t, cfg)) {
                *p += hq * keys as f64;
            }
        }
    }
    for b in 0..3 {
        w.dq_flops[b] = w.pairs[b] * 2.0 * (3.0 * dkf + 2.0 * dvf);
        w.dkdv_flops[b] = w.pairs[b] * 4.0 * (dkf + dvf);
    }
    w.bytes = n
        * (hq * dkf * 2.0
            + hq * dvf * 2.0
            + 3.0 * hkv * (dkf + dvf) * 2.0
            + 3.0 * hq * 4.0
            + hq * dkf * 4.0
            + 3.0 * hkv * (dkf + dvf) * 4.0
            + 3.0 * hq * 4.0);
    w
}

/// One timed shape: per-kernel medians and the device memory of forward + backward.
#[derive(Debug, Clone, Copy, Default)]
pub struct BwdBench {
    pub times: BwdTimes,
    /// Median of a whole forward call on the same inputs (ms).
    pub forward_ms: f32,
    /// Device memory in use after allocating and running forward + backward, minus what was in
    /// use before (bytes; every buffer lives until the end, so this is the peak).
    pub peak_bytes: usize,
    /// Bytes the backward object holds (gradients + scratch).
    pub backward_bytes: usize,
    /// Inverse-index segments and partial slots of the last run.
    pub segments: usize,
    pub partial_slots: usize,
}

/// Median of each field over `reps` timed backward calls (after `warmup` untimed ones) on
/// random device-resident inputs and upstream gradient (B = 1 sequence per entry of `seqlens`)
/// in `mode` ([`BwdMode::SavedStats`]: the forward saves the branch outputs and lse, the
/// backward uses them; [`BwdMode::Recompute`]: the backward recomputes them).
#[allow(clippy::too_many_arguments)]
pub fn time_backward(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    seqlens: &[usize],
    dk: usize,
    dv: usize,
    warmup: usize,
    reps: usize,
    seed: u64,
    mode: BwdMode,
) -> Result<BwdBench> {
    ctx.stream.synchronize().map_err(driver_err)?;
    let (free0, _) = ctx.ctx.mem_get_info().map_err(driver_err)?;
    let mut x = DeviceInputs::random(ctx, cfg, seqlens, dk, dv, false, seed)?;
    let mut cu = vec![0usize];
    for &l in seqlens {
        cu.push(cu.last().unwrap() + l);
    }
    if mode.saves_stats() {
        x.enable_saving(ctx)?;
    }
    let mut b = DeviceBackward::new(ctx, &x, &cu)?;
    b.random_do(ctx, &x, seed ^ 0xd0)?;
    forward_device(ctx, &mut x, None)?;
    for _ in 0..warmup.max(1) {
        backward_device(ctx, &x, &mut b, None)?;
    }
    ctx.stream.synchronize().map_err(driver_err)?;
    let (free1, _) = ctx.ctx.mem_get_info().map_err(driver_err)?;
    let mut fwd = Vec::new();
    let mut all = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let mut ft = crate::cuda::KernelTimes::default();
        forward_device(ctx, &mut x, Some(&mut ft))?;
        fwd.push(ft.total);
        let mut t = BwdTimes::default();
        backward_device(ctx, &x, &mut b, Some(&mut t))?;
        all.push(t);
    }
    let med = |f: &dyn Fn(&BwdTimes) -> f32| {
        let mut v: Vec<f32> = all.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    fwd.sort_by(|a, b| a.total_cmp(b));
    Ok(BwdBench {
        times: BwdTimes {
            cmp_dq: med(&|t| t.cmp_dq),
            cmp_dkdv: med(&|t| t.cmp_dkdv),
            cmp_mean: med(&|t| t.cmp_mean),
            win_dq: med(&|t| t.win_dq),
            win_dkdv: med(&|t| t.win_dkdv),
            sel_index: med(&|t| t.sel_index),
            sel_dq: med(&|t| t.sel_dq),
            sel_dkdv: med(&|t| t.sel_dkdv),
            total: med(&|t| t.total),
        },
        forward_ms: fwd[fwd.len() / 2],
        peak_bytes: free0.saturating_sub(free1),
        backward_bytes: b.device_bytes(),
        segments: b.last_segments,
        partial_slots: b.last_partial_slots,
    })
}
