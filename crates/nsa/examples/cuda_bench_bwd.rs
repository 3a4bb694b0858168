//! Standalone timing of the CUDA backward pass:
//! `cargo run -p nsa --features cuda --release --example cuda_bench_bwd -- [T,...] [--dk192] [--g-sweep] [--g-list=16,8,4,2,1] [--recompute]`
//! B = 1, HQ = 64, HKV = 4, dk = dv = 128 unless told (`--g-list`: those G at every T); per-kernel medians (CUDA events), the
//! effective rates against the counted work (`nsa::cuda::backward::bench::bwd_work`; the dQ
//! kernels' count leaves out the statistics pass in the default mode), and the device memory of
//! forward + backward. Default: the forward saves the branch statistics (`BwdMode::SavedStats`);
//! `--recompute` measures the low-memory mode (`BwdMode::Recompute`). The first line names the
//! mode.

#[cfg(feature = "cuda")]
fn main() -> nsa::Result<()> {
    use nsa::cuda::backward::{bench, BwdMode};
    use nsa::cuda::CudaContext;
    use nsa::NsaConfig;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ts: Vec<usize> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .flat_map(|a| a.split(',').map(|s| s.parse::<usize>().expect("T values")))
        .collect();
    let ts = if ts.is_empty() {
        vec![8192, 16384, 32768, 65536, 131072]
    } else {
        ts
    };
    // default: the forward saves the branch outputs and lse, the backward skips its statistics
    // pass; --recompute: the low-memory mode (`--saved`, the former opt-in, is still accepted)
    let mode = if args.iter().any(|a| a == "--recompute") {
        BwdMode::Recompute
    } else {
        BwdMode::SavedStats
    };
    let ctx = CudaContext::new(0)?;
    println!(
        "device: {} ({}), mode {}: statistics {}",
        ctx.device_name()?,
        ctx.arch(),
        mode.name(),
        match mode {
            BwdMode::SavedStats => "saved by the forward",
            BwdMode::Recompute => "recomputed by the backward",
        }
    );
    let mut shapes: Vec<(usize, usize, usize, usize, usize)> = Vec::new(); // T, HQ, HKV, dk, dv
                                                                           // --g-list=16,8,4,2,1: these group sizes (HKV = 64 / G) at every T given, in place of G = 16
    let g_list: Vec<usize> = args
        .iter()
        .find_map(|a| a.strip_prefix("--g-list="))
        .map(|l| l.split(',').map(|g| g.parse().expect("G values")).collect())
        .unwrap_or_else(|| vec![16]);
    for &t in &ts {
        for &g in &g_list {
            shapes.push((t, 64, 64 / g, 128, 128));
        }
    }
    if args.iter().any(|a| a == "--dk192") {
        for &t in &ts {
            shapes.push((t, 64, 4, 192, 128));
        }
    }
    if args.iter().any(|a| a == "--g-sweep") {
        for g in [1, 2, 4, 8] {
            shapes.push((32768, 64, 64 / g, 128, 128));
        }
    }
    println!(
        "{:>6} {:>3} {:>3} {:>3} {:>3} | {:>7} {:>7} {:>6} | {:>7} {:>7} | {:>6} {:>7} {:>7} | {:>8} {:>7} | {:>8} {:>8} | TFLOP/s dq/dkdv cmp, win, sel",
        "T", "HQ", "HKV", "dk", "dv", "cmp_dq", "cmp_kv", "mean", "win_dq", "win_kv", "index",
        "sel_dq", "sel_kv", "bwd ms", "fwd ms", "peak GiB", "bwd GiB"
    );
    for (t, hq, hkv, dk, dv) in shapes {
        let cfg = NsaConfig::builder().heads(hq).kv_heads(hkv).build()?;
        let w = bench::bwd_work(&cfg, &[t], dk, dv);
        let r = bench::time_backward(&ctx, &cfg, &[t], dk, dv, 1, 5, t as u64, mode)?;
        let k = r.times;
        let rate = |f: f64, ms: f32| f / (ms as f64 * 1e-3) / 1e12;
        // row-major flops: 2 (3 dk + 2 dv) per pair with the statistics pass, 2 (2 dk + dv)
        // without it
        let dqf = |b: usize| match mode {
            BwdMode::Recompute => w.dq_flops[b],
            BwdMode::SavedStats => w.pairs[b] * 2.0 * (2.0 * dk as f64 + dv as f64),
        };
        println!(
            "{t:>6} {hq:>3} {hkv:>3} {dk:>3} {dv:>3} | {:>7.2} {:>7.2} {:>6.2} | {:>7.2} {:>7.2} | {:>6.2} {:>7.2} {:>7.2} | {:>8.2} {:>7.2} | {:>8.2} {:>8.2} | {:.0}/{:.0}, {:.0}/{:.0}, {:.0}/{:.0}  (segments {}, partial slots {})",
            k.cmp_dq,
            k.cmp_dkdv,
            k.cmp_mean,
            k.win_dq,
            k.win_dkdv,
            k.sel_index,
            k.sel_dq,
            k.sel_dkdv,
            k.total,
            r.forward_ms,
            r.peak_bytes as f64 / (1u64 << 30) as f64,
            r.backward_bytes as f64 / (1u64 << 30) as f64,
            rate(dqf(0), k.cmp_dq),
            rate(w.dkdv_flops[0], k.cmp_dkdv),
            rate(dqf(2), k.win_dq),
            rate(w.dkdv_flops[2], k.win_dkdv),
            rate(dqf(1), k.sel_dq),
            rate(w.dkdv_flops[1], k.sel_dkdv),
            r.segments,
            r.partial_slots,
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cuda_bench_bwd needs `--features cuda`");
}
