//! Standalone timing of the CUDA forward pass (until `nsa bench --device cuda` is wired):
//! `cargo run -p nsa --features cuda --release --example cuda_bench -- [T,...] [--g-sweep] [--dk192] [--g-list=16,4,1]`
//! (`--g-list`: those group sizes, HKV = 64 / G, at every T given, in place of G = 16)
//! Prints per-kernel medians (CUDA events) and the effective rates against the counted work.

#[cfg(feature = "cuda")]
fn main() -> nsa::Result<()> {
    use nsa::cuda::{bench, CudaContext};
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
    let ctx = CudaContext::new(0)?;
    println!("device: {} ({})", ctx.device_name()?, ctx.arch());
    let g_list: Vec<usize> = args
        .iter()
        .find_map(|a| a.strip_prefix("--g-list="))
        .map(|l| l.split(',').map(|s| s.parse().expect("G values")).collect())
        .unwrap_or_else(|| vec![16]);
    let mut shapes: Vec<(usize, usize, usize, usize, usize)> = Vec::new(); // T, HQ, HKV, dk, dv
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
            shapes.push((65536, 64, 64 / g, 128, 128));
        }
    }
    println!(
        "{:>7} {:>3} {:>3} {:>3} {:>3} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} | {:>6} {:>6} {:>6} {:>6} (TFLOP/s)",
        "T", "HQ", "HKV", "dk", "dv", "compress", "cmp", "topn", "selected", "window", "total ms", "cmp", "topn", "sel", "win"
    );
    for (t, hq, hkv, dk, dv) in shapes {
        let cfg = NsaConfig::builder().heads(hq).kv_heads(hkv).build()?;
        let w = bench::kernel_work(&cfg, &[t], dk, dv);
        let k = bench::time_forward(&ctx, &cfg, &[t], dk, dv, 2, 7, t as u64)?;
        let rate = |f: f64, ms: f32| f / (ms as f64 * 1e-3) / 1e12;
        println!(
            "{t:>7} {hq:>3} {hkv:>3} {dk:>3} {dv:>3} | {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} | {:>8.3} | {:>6.1} {:>6.1} {:>6.1} {:>6.1}",
            k.compress,
            k.cmp,
            k.topn,
            k.selected,
            k.window,
            k.total,
            rate(w.cmp_flops, k.cmp),
            rate(w.topn_flops, k.topn),
            rate(w.sel_flops, k.selected),
            rate(w.win_flops, k.window)
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cuda_bench needs `--features cuda`");
}
