//! `nsa bench --device cuda`: the CUDA forward pass timed with CUDA events (median of `reps`
//! after warm-ups), per kernel and in total, on random inputs generated on the device.
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
    /// Timed repetitions (median) and untimed warm-ups.
    pub reps: usize,
    pub warmup: usize,
    /// The NSA hyper-parameters other than the heads (paper defaults).
    pub nsa: NsaConfig,
    pub device_ordinal: usize,
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
            reps: 7,
            warmup: 2,
            nsa: NsaConfig::default(),
            device_ordinal: 0,
        }
    }
}

/// Runs the sweep; one `forward` record per (shape, length), `impl` = `nsa-cuda`.
pub fn run_cuda(args: &CudaBenchArgs) -> nsa::Result<Vec<BenchRecord>> {
    let ctx = CudaContext::new(args.device_ordinal)?;
    let machine = format!("{} ({})", ctx.device_name()?, ctx.arch());
    let date = today();
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
    let mut out = Vec::new();
    for (t, s) in runs {
        let mut cfg = args.nsa.clone();
        cfg.heads = s.heads;
        cfg.kv_heads = s.kv_heads;
        cfg.validate()?;
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
        let num = |v: f32| Value::from((v as f64 * 1e4).round() / 1e4);
        out.push(BenchRecord {
            date: date.clone(),
            machine: machine.clone(),
            op: "forward".into(),
            impl_: "nsa-cuda".into(),
            batch: 1,
            t,
            heads: s.heads,
            kv_heads: s.kv_heads,
            dk: s.dk,
            dv: s.dv,
            threads: None,
            ms: (ms * 1e4).round() / 1e4,
            tflops: Some((tflops * 1e3).round() / 1e3),
            gflops: None,
            flops: Some(flops),
            speedup: None,
            notes: vec![format!(
                "l/d/l' {}/{}/{}, n {}, w {}, phi mean, bf16 in, f32 out, median of {}",
                cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.sel_count, cfg.window, args.reps
            )],
            extra: BTreeMap::from([
                ("device".to_string(), Value::String("cuda".into())),
                ("dtype".to_string(), Value::String("bfloat16".into())),
                ("compress_ms".to_string(), num(k.compress)),
                ("cmp_ms".to_string(), num(k.cmp)),
                ("topn_ms".to_string(), num(k.topn)),
                ("selected_ms".to_string(), num(k.selected)),
                ("window_ms".to_string(), num(k.window)),
            ]),
        });
    }
    Ok(out)
}
