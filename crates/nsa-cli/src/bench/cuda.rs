//! `nsa bench --device cuda`: the CUDA forward, backward and decode step timed with CUDA events
//! (median of `reps` after warm-ups), per kernel and in total, on random inputs generated on
//! the device ([`run_cuda`], [`run_cuda_backward`], [`run_cuda_decode`]).
//! Flops are counted as for the CPU sweep ([`super::cpu::nsa_forward_flops`]: QK and PV of the
//! keys each branch attends to), so records of both devices compare; the per-kernel times go
//! into the record's extra fields (`compress_ms`, `cmp_ms`, `topn_ms`, `selected_ms`,
//! `window_ms`).

use super::cpu::nsa_forward_flops;
use super::records::{today, BenchRecord};
use nsa::cuda::{bench, CudaContext};
use nsa::NsaConfig;
use serde_json::Value;
use std::collections::BTreeMap;

/// One head configuration of the CUDA sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub dk: usize,
    pub dv: usize,
}

/// What the CUDA sweep measures.
#[derive(Debug, Clone)]
pub struct CudaBenchArgs {
    /// Sequence lengths (batch 1).
    pub lengths: Vec<usize>,
    /// Head configurations, each run at every length.
    pub shapes: Vec<CudaShape>,
    /// Group sizes swept at `g_sweep_length` with HQ = 64, dk = dv = 128 (HKV = 64 / G).
    pub g_sweep: Vec<usize>,
    pub g_sweep_length: usize,
    /// Decode contexts and batch sizes (every shape of `shapes`).
    pub decode_lengths: Vec<usize>,
    pub decode_batches: Vec<usize>,
    /// Timed repetitions (median) and untimed warm-ups.
    pub reps: usize,
    pub warmup: usize,
    /// The NSA hyper-parameters other than the heads (paper defaults).
    pub nsa: NsaConfig,
    pub device_ordinal: usize,
    /// Backward sweep in the low-memory mode (statistics recomputed by the backward) instead of
    /// the default (statistics saved by the forward).
    pub recompute: bool,
}

impl Default for CudaBenchArgs {
    /// The sweep: HQ 64, HKV 4, dk = dv = 128 and dk 192 / dv 128 at 8k..128k, and
    /// G = 1, 2, 4, 8 at 64k.
    fn default() -> Self {
        CudaBenchArgs {
            lengths: vec![8192, 16384, 32768, 65536, 131072],
            shapes: vec![
                CudaShape {
                    heads: 64,
                    kv_heads: 4,
                    dk: 128,
                    dv: 128,
                },
                CudaShape {
                    heads: 64,
                    kv_heads: 4,
                    dk: 192,
                    dv: 128,
                },
            ],
            g_sweep: vec![1, 2, 4, 8],
            g_sweep_length: 65536,
            decode_lengths: vec![8192, 16384, 32768, 65536, 131072],
            decode_batches: vec![1, 32],
            reps: 7,
            warmup: 2,
            nsa: NsaConfig::default(),
            device_ordinal: 0,
            recompute: false,
        }
    }
}

/// The (length, shape) points of the forward and backward sweeps: every shape at every length,
/// then the G sweep (HQ 64, HKV 64 / G, dk = dv = 128) at `g_sweep_length`.
fn sweep_points(args: &CudaBenchArgs) -> Vec<(usize, CudaShape)> {
    let mut runs: Vec<(usize, CudaShape)> = Vec::new();
    for s in &args.shapes {
        for &t in &args.lengths {
            runs.push((t, *s));
        }
    }
    for &g in &args.g_sweep {
        runs.push((
            args.g_sweep_length,
            CudaShape {
                heads: 64,
                kv_heads: 64 / g.max(1),
                dk: 128,
                dv: 128,
            },
        ));
    }
    runs
}

/// Runs the sweep; one `forward` record per (shape, length), `impl` = `nsa-cuda`.
pub fn run_cuda(args: &CudaBenchArgs) -> nsa::Result<Vec<BenchRecord>> {
    let ctx = CudaContext::new(args.device_ordinal)?;
    let machine = format!("{} ({})", ctx.device_name()?, ctx.arch());
    let switches = nsa::cuda::experiment_switches();
    let mut out = Vec::new();
    for (t, s) in sweep_points(args) {
        let cfg = config_for(args, s)?;
        let k = bench::time_forward(
            &ctx,
            &cfg,
            &[t],
            s.dk,
            s.dv,
            args.warmup,
            args.reps,
            t as u64,
        )?;
        let ms = k.total as f64;
        let flops = nsa_forward_flops(&cfg, 1, t, s.dk, s.dv);
        let tflops = flops / (ms * 1e-3) / 1e12;
        eprintln!(
            "cuda forward T={t} HQ={} HKV={} dk={} dv={}: {ms:.3} ms (compress {:.3}, cmp {:.3}, topn {:.3}, selected {:.3}, window {:.3})",
            s.heads, s.kv_heads, s.dk, s.dv, k.compress, k.cmp, k.topn, k.selected, k.window
        );
        let mut r = record(&machine, "forward", 1, t, s, ms);
        r.tflops = Some((tflops * 1e3).round() / 1e3);
        r.flops = Some(flops);
        r.notes = vec![format!(
            "l/d/l' {}/{}/{}, n {}, w {}, phi mean, bf16 in, f32 out, median of {}",
            cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.sel_count, cfg.window, args.reps
        )];
        r.notes.extend(switches.iter().cloned());
        for (name, v) in [
            ("compress_ms", k.compress),
            ("cmp_ms", k.cmp),
            ("topn_ms", k.topn),
            ("selected_ms", k.selected),
            ("window_ms", k.window),
        ] {
            r.extra.insert(name.into(), num(v as f64));
        }
        out.push(r);
    }
    Ok(out)
}

/// `dk:dv` (or one `d` for both) -> the HQ 64 / HKV 4 shape of the sweeps.
pub fn parse_head_dims(s: &str) -> nsa::Result<CudaShape> {
    let bad =
        || nsa::NsaError::Unsupported(format!("--head-dims `{s}` (expected dk:dv, e.g. 192:128)"));
    let (dk, dv) = match s.split_once(':') {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let d = s.trim().parse().map_err(|_| bad())?;
            (d, d)
        }
    };
    if dk == 0 || dv == 0 {
        return Err(bad());
    }
    Ok(CudaShape {
        heads: 64,
        kv_heads: 4,
        dk,
        dv,
    })
}

/// A value rounded to 4 decimals for the JSON.
fn num(v: f64) -> Value {
    Value::from((v * 1e4).round() / 1e4)
}

/// A record of `impl` `nsa-cuda` with the common fields filled in.
fn record(machine: &str, op: &str, batch: usize, t: usize, s: CudaShape, ms: f64) -> BenchRecord {
    BenchRecord {
        date: today(),
        machine: machine.to_string(),
        op: op.into(),
        impl_: "nsa-cuda".into(),
        batch,
        t,
        heads: s.heads,
        kv_heads: s.kv_heads,
        dk: s.dk,
        dv: s.dv,
        threads: None,
        ms: (ms * 1e4).round() / 1e4,
        tflops: None,
        gflops: None,
        flops: None,
        speedup: None,
        notes: Vec::new(),
        extra: BTreeMap::from([
            ("device".to_string(), Value::String("cuda".into())),
            ("dtype".to_string(), Value::String("bfloat16".into())),
        ]),
    }
}

fn config_for(args: &CudaBenchArgs, s: CudaShape) -> nsa::Result<NsaConfig> {
    let mut cfg = args.nsa.clone();
    cfg.heads = s.heads;
    cfg.kv_heads = s.kv_heads;
    cfg.validate()?;
    Ok(cfg)
}

/// The backward sweep (the forward's points: every shape of `shapes` at every length, batch 1,
/// then the G sweep): one `backward` record (the backward
/// kernels alone, per-kernel medians and peak memory of forward+backward as extras) and one
/// `forward_backward` record (forward median + backward median of the same run) per length.
/// Default mode: the forward saves the branch statistics; `recompute`: the low-memory mode.
/// The records name the mode (`bwd_mode` extra and the notes).
pub fn run_cuda_backward(args: &CudaBenchArgs) -> nsa::Result<Vec<BenchRecord>> {
    use nsa::cuda::backward::{bench::time_backward, BwdMode};
    let mode = if args.recompute {
        BwdMode::Recompute
    } else {
        BwdMode::SavedStats
    };
    let how = match mode {
        BwdMode::SavedStats => "branch statistics saved by the forward",
        BwdMode::Recompute => "low-memory mode: branch statistics recomputed by the backward",
    };
    let ctx = CudaContext::new(args.device_ordinal)?;
    let machine = format!("{} ({})", ctx.device_name()?, ctx.arch());
    let switches = nsa::cuda::experiment_switches();
    let mut out = Vec::new();
    for (t, s) in sweep_points(args) {
        let cfg = config_for(args, s)?;
        let b = time_backward(
            &ctx,
            &cfg,
            &[t],
            s.dk,
            s.dv,
            args.warmup,
            args.reps,
            t as u64,
            mode,
        )?;
        let k = b.times;
        eprintln!(
            "cuda backward ({}) T={t} HQ={} HKV={} dk={} dv={}: {:.3} ms (forward {:.3} ms), peak {:.2} GiB",
            mode.name(),
            s.heads,
            s.kv_heads,
            s.dk,
            s.dv,
            k.total,
            b.forward_ms,
            b.peak_bytes as f64 / (1u64 << 30) as f64
        );
        let peak = num(b.peak_bytes as f64 / (1u64 << 30) as f64);
        let mut r = record(&machine, "backward", 1, t, s, k.total as f64);
        r.notes = vec![format!(
            "deterministic (no float atomics), {how}, median of {}",
            args.reps
        )];
        r.notes.extend(switches.iter().cloned());
        r.extra
            .insert("bwd_mode".into(), Value::String(mode.name().into()));
        for (name, v) in [
            ("cmp_dq_ms", k.cmp_dq),
            ("cmp_dkdv_ms", k.cmp_dkdv),
            ("cmp_mean_ms", k.cmp_mean),
            ("win_dq_ms", k.win_dq),
            ("win_dkdv_ms", k.win_dkdv),
            ("sel_index_ms", k.sel_index),
            ("sel_dq_ms", k.sel_dq),
            ("sel_dkdv_ms", k.sel_dkdv),
        ] {
            r.extra.insert(name.into(), num(v as f64));
        }
        r.extra.insert("peak_mem_gib".into(), peak.clone());
        out.push(r);
        let mut fb = record(
            &machine,
            "forward_backward",
            1,
            t,
            s,
            (b.forward_ms + k.total) as f64,
        );
        fb.notes = vec![format!(
            "forward median + backward median of the same run ({how})"
        )];
        fb.notes.extend(switches.iter().cloned());
        fb.extra
            .insert("bwd_mode".into(), Value::String(mode.name().into()));
        fb.extra.insert("peak_mem_gib".into(), peak);
        out.push(fb);
    }
    Ok(out)
}

/// The decode sweep (`shapes` x `decode_lengths` x `decode_batches`): one `decode` record per
/// point, `ms` per step from CUDA-graph replays (host-launched steps when the capture fails),
/// with the bytes a step moves and the achieved share of the measured copy bandwidth.
pub fn run_cuda_decode(args: &CudaBenchArgs) -> nsa::Result<Vec<BenchRecord>> {
    use nsa::cuda::decode::bench::{copy_bandwidth, time_steps};
    let ctx = CudaContext::new(args.device_ordinal)?;
    let machine = format!("{} ({})", ctx.device_name()?, ctx.arch());
    let copy = copy_bandwidth(&ctx, 1 << 30, 10)?;
    let mut out = Vec::new();
    for &s in &args.shapes {
        let cfg = config_for(args, s)?;
        for &len in &args.decode_lengths {
            for &b in &args.decode_batches {
                let st = time_steps(
                    &ctx,
                    &cfg,
                    b,
                    len,
                    s.dk,
                    s.dv,
                    args.reps.max(10),
                    10,
                    len as u64 ^ b as u64,
                )?;
                let us = st.graph_us.unwrap_or(st.eager_us);
                let moved = st.bytes.kv + st.bytes.other;
                let gbps = moved / (us * 1e-6) / 1e9;
                eprintln!("cuda decode ctx={len} B={b}: {us:.1} us/step, {gbps:.0} GB/s");
                let mut r = record(&machine, "decode", b, len, s, us / 1e3);
                r.notes = vec![
                "per step; kv_mb = K/V the branches read, bound_mb = (T/d + n*l' + w) tokens per group".into(),
            ];
                r.notes.extend(nsa::cuda::experiment_switches());
                for (name, v) in [
                    ("eager_ms", st.eager_us / 1e3),
                    ("kv_mb", st.bytes.kv / 1e6),
                    ("bound_mb", st.bytes.bound / 1e6),
                    ("other_mb", st.bytes.other / 1e6),
                    ("dense_kv_mb", st.bytes.dense / 1e6),
                    ("gbps", gbps),
                    ("copy_gbps", copy / 1e9),
                    ("pct_copy_bw", 100.0 * gbps * 1e9 / copy),
                    ("tokens_per_s", b as f64 / (us * 1e-6)),
                ] {
                    r.extra.insert(name.into(), num(v));
                }
                r.extra
                    .insert("cuda_graph".into(), Value::Bool(st.graph_us.is_some()));
                out.push(r);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dims_parse_to_the_paper_heads() {
        let s = parse_head_dims("192:128").unwrap();
        assert_eq!((s.heads, s.kv_heads, s.dk, s.dv), (64, 4, 192, 128));
        let s = parse_head_dims(" 64 ").unwrap();
        assert_eq!((s.dk, s.dv), (64, 64));
        for bad in ["", "x:1", "128:", "0:128", "128:128:1"] {
            assert!(
                matches!(parse_head_dims(bad), Err(nsa::NsaError::Unsupported(_))),
                "{bad}"
            );
        }
    }
}
