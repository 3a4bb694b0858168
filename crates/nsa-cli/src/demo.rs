//! `nsa demo`: the main job on a fresh machine. A realistic small problem end to end
//! (forward, backward, decoding), the fast CPU path checked against the float64 reference,
//! and its speed against dense causal attention on the same machine and threads.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nsa::cpu::dense::{self, DenseShape};
use nsa::testing::{check_selection_tie_aware, max_abs, rel_rms};
use nsa::{Device, NsaConfig, NsaError, NsaInputs, PhiKind, PhiParams, Result};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Smaller problem (a few seconds): for smoke tests.
    #[arg(long)]
    pub quick: bool,
    /// Context length of the speed comparison.
    #[arg(long)]
    pub speed_len: Option<usize>,
}

/// SPEC.md: f32 paths must be within 1e-5 relative RMS of the float64 reference.
const F32_TOL: f64 = 1e-5;

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("  {spinner} {msg} ({elapsed})").expect("template"));
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Runs `f` under a spinner and returns its value.
fn step<T>(msg: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let pb = spinner(msg);
    let r = f();
    pb.finish_and_clear();
    r
}

struct Checks {
    failed: usize,
}

impl Checks {
    fn rms(&mut self, what: &str, got: &[f32], want: &[f32]) {
        let e = rel_rms(got, want);
        let ok = e < F32_TOL;
        self.failed += usize::from(!ok);
        println!(
            "  {:<28} rel RMS {:>9.2e}  max |err| {:>9.2e}  {}",
            what,
            e,
            max_abs(got, want),
            if ok { "ok" } else { "FAIL" }
        );
    }

    fn flag(&mut self, what: &str, res: std::result::Result<(), String>) {
        match res {
            Ok(()) => println!("  {what:<28} ok"),
            Err(e) => {
                self.failed += 1;
                println!("  {what:<28} FAIL: {e}");
            }
        }
    }
}

fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    // A small model's attention layer: 16 query heads in 2 GQA groups of 8, head dim 64, the
    // paper's block sizes and its MLP compression.
    let cfg = NsaConfig::builder()
        .heads(16)
        .kv_heads(2)
        .phi(PhiKind::Mlp)
        .build()?;
    let (dk, dv, hidden) = (64, 64, 64);
    println!("nsa demo: Native Sparse Attention on the CPU ({threads} threads)");
    println!(
        "  config: HQ={} HKV={} dk={dk} dv={dv}, l={} d={} l'={} n={} w={}, phi=mlp",
        cfg.heads,
        cfg.kv_heads,
        cfg.cmp_block,
        cfg.cmp_stride,
        cfg.sel_block,
        cfg.sel_count,
        cfg.window
    );

    // 1. Correctness against the float64 reference, on a varlen batch of two sequences.
    let seqlens: &[usize] = if a.quick { &[300, 77] } else { &[1024, 333] };
    println!("\n1. fast CPU path vs float64 reference (sequences of {seqlens:?} tokens)");
    let seed = seed_from_clock();
    let x = NsaInputs::random(&cfg, seqlens, dk, dv, false, seed);
    let phi = PhiParams::random(&cfg, dk, dv, hidden, seed);
    let d_o = NsaInputs::random(&cfg, &[x.num_tokens()], dv, dv, true, seed ^ 1).q;
    let mut checks = Checks { failed: 0 };

    let want = step("reference forward", || {
        nsa::reference_forward(&cfg, &x, &phi)
    })?;
    let got = nsa::forward(&Device::Cpu, &cfg, &x, &phi)?;
    checks.rms("forward o", &got.o, &want.o);
    let (scores, max_blocks) = step("reference selection scores", || {
        nsa::reference::selection_scores(&cfg, &x.map(f64::from), &phi.map(f64::from))
    })?;
    checks.flag(
        "top-n (tie-aware)",
        check_selection_tie_aware(
            &cfg,
            &x.cu_seqlens,
            &want.sel_idx,
            &got.sel_idx,
            &scores,
            max_blocks,
        ),
    );

    let gwant = step("reference backward", || {
        nsa::reference_backward(&cfg, &x, &phi, &d_o)
    })?;
    let ggot = nsa::backward(&Device::Cpu, &cfg, &x, &phi, &d_o)?;
    for ((name, g), (_, w)) in ggot.named().into_iter().zip(gwant.named()) {
        checks.rms(&format!("backward {name}"), g, w);
    }
    for ((name, _, g), (_, _, w)) in ggot
        .dphi
        .named_tensors(&cfg, dk, dv)
        .into_iter()
        .zip(gwant.dphi.named_tensors(&cfg, dk, dv))
    {
        // pe_k and b2_k shift every compressed key equally: softmax ignores them and the true
        // gradient is 0, so compare those by absolute error.
        if w.iter().all(|v| v.abs() < 1e-6) {
            let m = max_abs(g, w);
            let ok = m < 1e-4;
            checks.failed += usize::from(!ok);
            println!(
                "  {:<28} max |err| {m:>9.2e} (true gradient 0)  {}",
                format!("backward d{name}"),
                if ok { "ok" } else { "FAIL" }
            );
        } else {
            checks.rms(&format!("backward d{name}"), g, w);
        }
    }

    let prefill = seqlens[1] / 2;
    let replayed = nsa::decode_replay(&Device::Cpu, &cfg, &x, &phi, prefill)?;
    checks.rms(
        &format!("decode from {prefill} vs fwd"),
        &replayed.o,
        &got.o,
    );
    checks.flag(
        "decode top-n (tie-aware)",
        check_selection_tie_aware(
            &cfg,
            &x.cu_seqlens,
            &want.sel_idx,
            &replayed.sel_idx,
            &scores,
            max_blocks,
        ),
    );

    // 2. Speed against dense causal attention (same machine, same threads).
    let t = a.speed_len.unwrap_or(if a.quick { 2048 } else { 8192 });
    let xs = NsaInputs::random(&cfg, &[t], dk, dv, true, seed ^ 2);
    let d_os = NsaInputs::random(&cfg, &[t], dv, dv, true, seed ^ 3).q;
    let sh = DenseShape {
        heads: cfg.heads,
        kv_heads: cfg.kv_heads,
        dk,
        dv,
        scale: None,
    };
    let cu = xs.cu_seqlens.clone();
    let reps = if a.quick { 1 } else { 3 };
    println!("\n2. speed at T = {t} (one sequence), {threads} threads: median of {reps} forward runs,\n   one forward+backward run, median of 21 decode steps");
    let bar = ProgressBar::new(6);
    bar.set_style(
        ProgressStyle::with_template("  [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("template"),
    );
    bar.set_message("NSA forward");
    let nsa_fwd = median_ms(reps, || {
        nsa::forward(&Device::Cpu, &cfg, &xs, &phi).map(|_| ())
    })?;
    bar.inc(1);
    bar.set_message("dense forward");
    let dense_fwd = median_ms(reps, || {
        dense::forward(&sh, &cu, &xs.q, &xs.k_slc, &xs.v_slc).map(|_| ())
    })?;
    bar.inc(1);
    bar.set_message("NSA forward+backward");
    // forward+backward once: dense backward at 8k is the longest step of the demo.
    let nsa_fb = median_ms(1, || {
        nsa::backward(&Device::Cpu, &cfg, &xs, &phi, &d_os).map(|_| ())
    })?;
    bar.inc(1);
    bar.set_message("dense forward+backward");
    let dense_fb = median_ms(1, || {
        let (o, lse) = dense::forward(&sh, &cu, &xs.q, &xs.k_slc, &xs.v_slc)?;
        dense::backward(&sh, &cu, &xs.q, &xs.k_slc, &xs.v_slc, &o, &lse, &d_os).map(|_| ())
    })?;
    bar.inc(1);
    bar.set_message("NSA decode step");
    // Decode one token at context t: prefill t-1 tokens, then time steps on the last token.
    let ctx = t - 1;
    let prompt = xs.gather(&(0..ctx).collect::<Vec<_>>(), vec![0, ctx]);
    let last = xs.gather(&[ctx], vec![0, 1]);
    let mut cache = nsa::cache::DecodeCache::new(&cfg, 1, dk, dv)?;
    nsa::cpu::decode::prefill(&cfg, &mut cache, 0, &prompt, &phi)?;
    // Each timed step appends the token again, so the context grows from t to t+20: the
    // same work as a step at t within 0.3%.
    let steps = 21;
    let nsa_dec = median_ms(steps, || {
        nsa::cpu::decode::step(&cfg, &mut cache, &last, &phi).map(|_| ())
    })?;
    bar.inc(1);
    bar.set_message("dense decode step");
    let dense_dec = median_ms(steps, || {
        dense::decode_step(&sh, &last.q, &[&xs.k_slc[..]], &[&xs.v_slc[..]]).map(|_| ())
    })?;
    bar.inc(1);
    bar.finish_and_clear();
    println!(
        "  {:<24} {:>12} {:>12} {:>9}",
        "op", "NSA ms", "dense ms", "speedup"
    );
    for (op, n, d) in [
        ("forward", nsa_fwd, dense_fwd),
        ("forward+backward", nsa_fb, dense_fb),
        (&*format!("decode step @{t}"), nsa_dec, dense_dec),
    ] {
        println!("  {op:<24} {n:>12.2} {d:>12.2} {:>8.2}x", d / n);
    }
    println!("  (dense = our blocked causal attention over all {t} keys with the same GQA layout)");

    if checks.failed > 0 {
        return Err(NsaError::Unsupported(format!(
            "{} correctness check(s) failed (seed {seed})",
            checks.failed
        )));
    }
    println!("\nall correctness checks passed (seed {seed})");
    Ok(())
}

fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
