//! Timing of GPU decode steps (examples/cuda_bench_decode.rs), with the bytes a step must move
//! counted first (METHOD.md): per (sequence, KV group) the visible compressed tokens, the
//! selected blocks' tokens and the window, each key and value read once in bf16.

use super::{GpuDecodeCache, Splits};
use crate::blocks;
use crate::config::NsaConfig;
use crate::cuda::{driver_err, CudaContext};
use crate::error::{NsaError, Result};
use cudarc::driver::sys;

/// Bytes of one decode step (every sequence at context `len`, its new token at `len - 1`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepBytes {
    /// K/V the branches read: visible compressed + selected + window tokens, bf16.
    pub kv: f64,
    /// The same with the "5632 tokens per group at 64k" bound: (len/d + n*l' + w) tokens.
    pub bound: f64,
    /// Everything else the kernels move: q, gates, appended token, partials (written + read),
    /// top-n scores, output.
    pub other: f64,
    /// A dense decode's K/V read at the same context (all `len` tokens, one K/V set).
    pub dense: f64,
}

/// Counts [`StepBytes`] for `batch` sequences of context `len` under the split plan `sp`.
pub fn step_bytes(
    cfg: &NsaConfig,
    batch: usize,
    len: usize,
    dk: usize,
    dv: usize,
    sp: &Splits,
) -> StepBytes {
    let (hq, hkv, g) = (
        cfg.heads as f64,
        cfg.kv_heads as f64,
        cfg.group_size() as f64,
    );
    let (b, kvrow) = (batch as f64, ((dk + dv) * 2) as f64);
    let t = len - 1;
    let nvis = blocks::cmp_visible(t, cfg.cmp_block, cfg.cmp_stride);
    let nblk = blocks::sel_admissible(t, cfg.sel_block).min(cfg.sel_count);
    let own = t / cfg.sel_block;
    let sel_tokens = (nblk - 1) * cfg.sel_block + (t - own * cfg.sel_block + 1);
    let win = len.min(cfg.window);
    let tokens = (nvis + sel_tokens + win) as f64;
    let bound_tokens = (len / cfg.cmp_stride + cfg.sel_count * cfg.sel_block + cfg.window) as f64;
    let ns = sp.ns() as f64;
    let part = hkv * ns * g * (dv as f64 * 4.0 + 8.0) * 2.0 // partials written and read
        + hkv * sp.sc as f64 * g * sp.uj as f64 * 4.0 * 2.0; // Eq. 9 partial scores
    let per_seq = hq * dk as f64 * 2.0 // q
        + 3.0 * hq * 4.0 // gates
        + 3.0 * hkv * kvrow * 2.0 // new token read + written
        + hq * dv as f64 * 4.0 // output
        + part;
    StepBytes {
        kv: b * hkv * tokens * kvrow,
        bound: b * hkv * bound_tokens * kvrow,
        other: b * per_seq,
        dense: b * hkv * len as f64 * kvrow,
    }
}

/// Device-to-device copy bandwidth (bytes read + written per second) of a `bytes` buffer,
/// median of `reps` copies.
pub fn copy_bandwidth(ctx: &CudaContext, bytes: usize, reps: usize) -> Result<f64> {
    let s = &ctx.stream;
    let src = s.alloc_zeros::<u8>(bytes).map_err(driver_err)?;
    let mut dst = s.alloc_zeros::<u8>(bytes).map_err(driver_err)?;
    let ev = || {
        ctx.ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_err)
    };
    let (a, z) = (ev()?, ev()?);
    s.memcpy_dtod(&src, &mut dst).map_err(driver_err)?;
    let mut v = Vec::new();
    for _ in 0..reps.max(1) {
        a.record(s).map_err(driver_err)?;
        s.memcpy_dtod(&src, &mut dst).map_err(driver_err)?;
        z.record(s).map_err(driver_err)?;
        z.synchronize().map_err(driver_err)?;
        v.push(a.elapsed_ms(&z).map_err(driver_err)? as f64);
    }
    v.sort_by(|x, y| x.total_cmp(y));
    Ok(2.0 * bytes as f64 / (v[v.len() / 2] * 1e-3))
}

/// Per-step times of one shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTimes {
    /// median over single steps launched from the host (six launches each), microseconds
    pub eager_us: f64,
    /// median per step of CUDA-graph replays (`steps_per_graph` steps per graph), microseconds;
    /// `None` if the capture failed
    pub graph_us: Option<f64>,
    pub splits: Splits,
    pub bytes: StepBytes,
    /// medians of the kernels of host-launched steps (us): write, compressed, top-n,
    /// selected + window, combine
    pub kernels: [f64; 5],
}

/// Times decode steps of `batch` sequences at context `len` on random cache content.
#[allow(clippy::too_many_arguments)]
pub fn time_steps(
    ctx: &CudaContext,
    cfg: &NsaConfig,
    batch: usize,
    len: usize,
    dk: usize,
    dv: usize,
    reps: usize,
    steps_per_graph: usize,
    seed: u64,
) -> Result<StepTimes> {
    // room for: warm-up, eager steps, graph capture (not run), replays
    let extra = 8 + 2 * reps + steps_per_graph * (reps + 2) + 8;
    let pool = batch * (len + extra).next_multiple_of(super::PAGE);
    let mut cache = GpuDecodeCache::new(ctx, cfg, batch, dk, dv, len + extra, pool)?;
    let start = len - 1; // the first step's token sits at position len - 1
    cache.fill_random(ctx, &vec![start; batch], extra, seed)?;
    let sp = cache.plan(batch, len + extra)?;
    cache.prepare_steps(ctx, &sp)?;
    let s = ctx.stream.clone();
    let ev = || {
        ctx.ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_err)
    };
    for _ in 0..3 {
        cache.step_launch(ctx, &s, &sp)?;
    }
    s.synchronize().map_err(driver_err)?;
    let mut eager = Vec::new();
    let (a, z) = (ev()?, ev()?);
    for _ in 0..reps.max(1) {
        a.record(&s).map_err(driver_err)?;
        cache.step_launch(ctx, &s, &sp)?;
        z.record(&s).map_err(driver_err)?;
        z.synchronize().map_err(driver_err)?;
        eager.push(a.elapsed_ms(&z).map_err(driver_err)? as f64 * 1e3);
    }
    eager.sort_by(|x, y| x.total_cmp(y));
    let eager_us = eager[eager.len() / 2];
    // the outputs of the last step are finite (every row written, no NaN from the math)
    let o = s.clone_dtoh(&cache.work.out).map_err(driver_err)?;
    let rows = batch * cfg.heads * dv;
    if o[..rows].iter().any(|v| !v.is_finite()) {
        return Err(NsaError::Cuda(
            "non-finite decode output in the benchmark".into(),
        ));
    }
    cache.set_kernel_timing(ctx, true)?;
    let mut per: Vec<[f32; 5]> = Vec::new();
    for _ in 0..reps.max(1) {
        cache.step_launch(ctx, &s, &sp)?;
        per.push(cache.kernel_times()?);
    }
    cache.set_kernel_timing(ctx, false)?;
    let mut kernels = [0f64; 5];
    for (k, v) in kernels.iter_mut().enumerate() {
        let mut col: Vec<f32> = per.iter().map(|p| p[k]).collect();
        col.sort_by(|x, y| x.total_cmp(y));
        *v = col[col.len() / 2] as f64 * 1e3;
    }
    let graph_us = match time_graph(ctx, &mut cache, &sp, reps, steps_per_graph) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("graph capture failed: {e}");
            None
        }
    };
    Ok(StepTimes {
        eager_us,
        graph_us,
        splits: sp,
        bytes: step_bytes(cfg, batch, len, dk, dv, &sp),
        kernels,
    })
}

/// Captures `steps` decode steps on a stream of its own into a CUDA graph and returns the median
/// time per step over `reps` replays (microseconds).
fn time_graph(
    ctx: &CudaContext,
    cache: &mut GpuDecodeCache,
    sp: &Splits,
    reps: usize,
    steps: usize,
) -> Result<f64> {
    ctx.stream.synchronize().map_err(driver_err)?;
    // SAFETY: single-threaded benchmark; every launch below goes to `stream` alone, which is
    // synchronised before any buffer is touched by another stream (no cross-stream events
    // needed, and events are not allowed to cross a capture boundary).
    unsafe { ctx.ctx.disable_event_tracking() };
    let stream = ctx.ctx.new_stream().map_err(driver_err)?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(driver_err)?;
    let mut launched = Ok(());
    for _ in 0..steps.max(1) {
        launched = cache.step_launch(ctx, &stream, sp);
        if launched.is_err() {
            break;
        }
    }
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(driver_err)?;
    launched?;
    let graph = graph.ok_or_else(|| NsaError::Cuda("empty graph".into()))?;
    graph.upload().map_err(driver_err)?;
    graph.launch().map_err(driver_err)?;
    stream.synchronize().map_err(driver_err)?;
    let ev = || {
        ctx.ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_err)
    };
    let (a, z) = (ev()?, ev()?);
    let mut v = Vec::new();
    for _ in 0..reps.max(1) {
        a.record(&stream).map_err(driver_err)?;
        graph.launch().map_err(driver_err)?;
        z.record(&stream).map_err(driver_err)?;
        z.synchronize().map_err(driver_err)?;
        v.push(a.elapsed_ms(&z).map_err(driver_err)? as f64 * 1e3 / steps.max(1) as f64);
    }
    stream.synchronize().map_err(driver_err)?;
    cache.advance_host(steps.max(1) * (reps.max(1) + 1));
    v.sort_by(|x, y| x.total_cmp(y));
    Ok(v[v.len() / 2])
}
