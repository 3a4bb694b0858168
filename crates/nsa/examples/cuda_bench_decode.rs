//! Timing of GPU decode steps over the paged cache:
//! `cargo run -p nsa --features cuda --release --example cuda_bench_decode -- [ctx,...] [--batch 1,32] [--dk192] [--reps N]`
//! Per shape: per-step latency (host-launched steps and CUDA-graph replays), tokens/s, the bytes
//! a step must move (counted) and the achieved bandwidth against the measured device-to-device
//! copy bandwidth; the dense decode's K/V bytes at the same context for comparison.

#[cfg(feature = "cuda")]
fn main() -> nsa::Result<()> {
    use nsa::cuda::decode::bench;
    use nsa::cuda::CudaContext;
    use nsa::NsaConfig;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let list = |flag: &str| -> Option<Vec<usize>> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.split(',').map(|s| s.parse().expect("numbers")).collect())
    };
    let ctxs: Vec<usize> = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .map(|v| v.split(',').map(|s| s.parse().expect("contexts")).collect())
        .unwrap_or_else(|| vec![8192, 16384, 32768, 65536, 131072]);
    let batches = list("--batch").unwrap_or_else(|| vec![1, 32]);
    let reps = list("--reps").map_or(20, |v| v[0]);
    let mut dims = vec![(128, 128)];
    if args.iter().any(|a| a == "--dk192") {
        dims.push((192, 128));
    }
    let ctx = CudaContext::new(0)?;
    println!("device: {} ({})", ctx.device_name()?, ctx.arch());
    let bw = bench::copy_bandwidth(&ctx, 1 << 30, 10)?;
    println!("device-to-device copy: {:.0} GB/s (read + write)", bw / 1e9);
    let cfg = NsaConfig::builder().heads(64).kv_heads(4).build()?;
    println!(
        "HQ 64 HKV 4, l/d/l' {}/{}/{}, n {}, w {}, bf16, times per step",
        cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.sel_count, cfg.window
    );
    println!(
        "{:>7} {:>3} {:>3} {:>4} | {:>9} {:>9} {:>11} | {:>8} {:>8} {:>8} | {:>6} {:>6} | {:>8} | splits sc/cc sw/cw ss/spb | us: write cmp topn sel+win combine",
        "ctx", "dk", "dv", "B", "eager us", "graph us", "tokens/s", "kv MB", "bound MB", "other MB", "GB/s", "% bw", "dense MB"
    );
    for &(dk, dv) in &dims {
        for &len in &ctxs {
            for &b in &batches {
                match bench::time_steps(&ctx, &cfg, b, len, dk, dv, reps, 10, len as u64 ^ b as u64)
                {
                    Ok(t) => {
                        let best = t.graph_us.unwrap_or(t.eager_us).min(t.eager_us);
                        let moved = t.bytes.kv + t.bytes.other;
                        let gbs = moved / (best * 1e-6) / 1e9;
                        println!(
                            "{len:>7} {dk:>3} {dv:>3} {b:>4} | {:>9.1} {:>9} {:>11.0} | {:>8.1} {:>8.1} {:>8.1} | {:>6.0} {:>5.0}% | {:>8.0} | {}/{} {}/{} {}/{} | {:.1} {:.1} {:.1} {:.1} {:.1}",
                            t.eager_us,
                            t.graph_us.map_or("-".to_string(), |g| format!("{g:.1}")),
                            b as f64 / (best * 1e-6),
                            t.bytes.kv / 1e6,
                            t.bytes.bound / 1e6,
                            t.bytes.other / 1e6,
                            gbs,
                            100.0 * gbs * 1e9 / bw,
                            t.bytes.dense / 1e6,
                            t.splits.sc,
                            t.splits.cc,
                            t.splits.sw,
                            t.splits.cw,
                            t.splits.ss,
                            t.splits.spb,
                            t.kernels[0],
                            t.kernels[1],
                            t.kernels[2],
                            t.kernels[3],
                            t.kernels[4]
                        );
                    }
                    Err(e) => println!("{len:>7} {dk:>3} {dv:>3} {b:>4} | error: {e}"),
                }
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cuda_bench_decode needs `--features cuda`");
}
