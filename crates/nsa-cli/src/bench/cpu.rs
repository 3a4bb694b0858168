//! CPU benchmark: NSA (f32, [`nsa::cpu`]) against the blocked dense causal baseline
//! ([`nsa::cpu::dense`]) on the same rayon thread pool: forward, forward+backward, and one
//! decode step.
//!
//! # Flop counts (effective GFLOP/s)
//!
//! Two flops per multiply-add, counting only the attention products a method needs
//! (`QK^T` and `PV`, i.e. `2 (dk + dv)` flops per (query head, visible key) pair):
//!
//! - dense causal forward: `2 B HQ (T^2 / 2) (dk + dv)` (the convention of `bench/peers.py`);
//! - NSA forward: `2 B HQ (dk + dv) sum_t (c(t) + s(t) + w(t))` with `c(t) = cmp_visible(t)`
//!   compressed keys, `s(t)` = selected tokens `<= t` (`t + 1` while at most `n` blocks are
//!   admissible, else `(n - 1) l' + (t mod l') + 1`), `w(t) = min(w, t + 1)` window keys.
//!   `phi`, the importance scores and the top-n are not counted (they are O(T) or
//!   O(T^2 / (d l')) and small next to the attention);
//! - backward = 2.5 x forward, forward+backward = 3.5 x forward (as `bench/peers.py`);
//! - decode: the same per-token counts for the one new query (dense: `2 B HQ (dk + dv) T`).
//!
//! So NSA's GFLOP/s is the rate of *useful* sparse work, and its speedup over dense is the
//! ratio of times, not of rates.

use super::records::{machine_name, today, BenchRecord};
use nsa::cache::{DecodeCache, TokenKv};
use nsa::cpu::dense::{self, DenseShape};
use nsa::{blocks, NsaConfig, NsaInputs, PhiParams};
use std::collections::BTreeMap;
use std::time::Instant;

/// A head configuration `HQ x HKV x D` (dk = dv = D).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadConfig {
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

impl std::str::FromStr for HeadConfig {
    type Err = String;
    /// `"16x1x64"` = 16 query heads, 1 KV head, dk = dv = 64.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<usize> = s
            .split('x')
            .map(|p| p.trim().parse::<usize>().map_err(|e| format!("`{s}`: {e}")))
            .collect::<Result<_, _>>()?;
        match parts[..] {
            [heads, kv_heads, dim]
                if heads > 0 && kv_heads > 0 && dim > 0 && heads % kv_heads == 0 =>
            {
                Ok(HeadConfig {
                    heads,
                    kv_heads,
                    dim,
                })
            }
            _ => Err(format!(
                "`{s}`: expected HQxHKVxD with HQ a multiple of HKV, e.g. 16x1x64"
            )),
        }
    }
}

/// What [`run_cpu`] measures.
#[derive(Debug, Clone)]
pub struct CpuBenchArgs {
    /// Sequence lengths of the forward and forward+backward runs.
    pub lengths: Vec<usize>,
    /// Context lengths of the decode runs.
    pub decode_lengths: Vec<usize>,
    pub configs: Vec<HeadConfig>,
    /// Timed repetitions (the median is reported), after one warm-up run.
    pub reps: usize,
    pub batch: usize,
    pub decode_batch: usize,
    /// Which ops: any of `forward`, `forward_backward`, `decode`.
    pub ops: Vec<String>,
    /// Skip the dense baseline (e.g. at lengths where it is too slow).
    pub no_dense: bool,
    /// NSA hyper-parameters (the paper's block sizes by default).
    pub nsa: NsaConfig,
    /// Print each measurement as it is made.
    pub verbose: bool,
}

impl Default for CpuBenchArgs {
    fn default() -> Self {
        CpuBenchArgs {
            lengths: vec![2048, 4096, 8192, 16384, 32768],
            decode_lengths: vec![8192, 16384, 32768, 65536],
            configs: vec![
                HeadConfig {
                    heads: 16,
                    kv_heads: 1,
                    dim: 64,
                },
                HeadConfig {
                    heads: 32,
                    kv_heads: 2,
                    dim: 128,
                },
            ],
            reps: 5,
            batch: 1,
            decode_batch: 8,
            ops: vec!["forward".into(), "forward_backward".into(), "decode".into()],
            no_dense: false,
            nsa: NsaConfig::default(),
            verbose: true,
        }
    }
}

/// NSA's attention work per query head at position `t`: compressed + selected + window keys.
pub fn nsa_keys(cfg: &NsaConfig, t: usize) -> usize {
    blocks::keys_per_branch(t, cfg).iter().sum()
}

/// NSA forward flops (module docs).
pub fn nsa_forward_flops(cfg: &NsaConfig, batch: usize, t: usize, dk: usize, dv: usize) -> f64 {
    let keys: f64 = (0..t).map(|i| nsa_keys(cfg, i) as f64).sum();
    2.0 * batch as f64 * cfg.heads as f64 * (dk + dv) as f64 * keys
}

/// Dense causal forward flops (module docs).
pub fn dense_forward_flops(batch: usize, heads: usize, t: usize, dk: usize, dv: usize) -> f64 {
    2.0 * batch as f64 * heads as f64 * (t as f64 * t as f64 / 2.0) * (dk + dv) as f64
}

/// Median wall time in ms of `reps` runs of `f` after one warm-up.
fn time_ms(reps: usize, mut f: impl FnMut() -> nsa::Result<()>) -> nsa::Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        v.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

struct Ctx {
    date: String,
    machine: String,
    threads: usize,
}

impl Ctx {
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        op: &str,
        impl_: &str,
        batch: usize,
        t: usize,
        hc: HeadConfig,
        ms: f64,
        flops: f64,
        notes: Vec<String>,
    ) -> BenchRecord {
        let gflops = flops / (ms * 1e-3) / 1e9;
        BenchRecord {
            date: self.date.clone(),
            machine: self.machine.clone(),
            op: op.into(),
            impl_: impl_.into(),
            batch,
            t,
            heads: hc.heads,
            kv_heads: hc.kv_heads,
            dk: hc.dim,
            dv: hc.dim,
            threads: Some(self.threads),
            ms: (ms * 1e4).round() / 1e4,
            tflops: Some((gflops / 1e3 * 1e4).round() / 1e4),
            gflops: Some((gflops * 100.0).round() / 100.0),
            flops: Some(flops),
            speedup: None,
            notes,
            extra: BTreeMap::from([
                (
                    "device".to_string(),
                    serde_json::Value::String("cpu".into()),
                ),
                (
                    "dtype".to_string(),
                    serde_json::Value::String("float32".into()),
                ),
            ]),
        }
    }
}

/// Runs the sweep on the current rayon pool and returns one record per measurement.
pub fn run_cpu(args: &CpuBenchArgs) -> nsa::Result<Vec<BenchRecord>> {
    let threads = rayon::current_num_threads();
    let ctx = Ctx {
        date: today(),
        machine: machine_name(threads),
        threads,
    };
    let mut out = Vec::new();
    let want = |op: &str| args.ops.iter().any(|o| o == op);
    let mut push = |r: BenchRecord, out: &mut Vec<BenchRecord>| {
        if args.verbose {
            eprintln!(
                "  {:<17} {:<9} B={} T={:<6} {}x{}x{}  {:>10.3} ms  {:>8.1} GFLOP/s",
                r.op,
                r.impl_,
                r.batch,
                r.t,
                r.heads,
                r.kv_heads,
                r.dk,
                r.ms,
                r.gflops.unwrap_or(0.0)
            );
        }
        out.push(r);
    };
    for &hc in &args.configs {
        let cfg = NsaConfig {
            heads: hc.heads,
            kv_heads: hc.kv_heads,
            ..args.nsa.clone()
        };
        cfg.validate()?;
        let (d, b) = (hc.dim, args.batch);
        let nsa_note = format!(
            "l={} d={} l'={} n={} w={} phi={:?}, independent K/V per branch, f32",
            cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.sel_count, cfg.window, cfg.phi
        );
        for &t in &args.lengths {
            if !(want("forward") || want("forward_backward")) {
                break;
            }
            let x = NsaInputs::random(&cfg, &vec![t; b], d, d, false, 7);
            let phi = PhiParams::random(&cfg, d, d, 4 * d, 8);
            let n = x.num_tokens();
            let d_o: Vec<f32> =
                x.q.iter().map(|v| 0.1 * v).collect::<Vec<f32>>()[..n * cfg.heads * d].to_vec();
            let sh = DenseShape {
                heads: hc.heads,
                kv_heads: hc.kv_heads,
                dk: d,
                dv: d,
                scale: None,
            };
            let nf = nsa_forward_flops(&cfg, b, t, d, d);
            let df = dense_forward_flops(b, hc.heads, t, d, d);
            if want("forward") {
                let ms = time_ms(args.reps, || nsa::cpu::forward(&cfg, &x, &phi).map(|_| ()))?;
                push(
                    ctx.record("forward", "nsa", b, t, hc, ms, nf, vec![nsa_note.clone()]),
                    &mut out,
                );
                if !args.no_dense {
                    let ms = time_ms(args.reps, || {
                        dense::forward(&sh, &x.cu_seqlens, &x.q, &x.k_slc, &x.v_slc).map(|_| ())
                    })?;
                    push(
                        ctx.record(
                            "forward",
                            "dense-cpu",
                            b,
                            t,
                            hc,
                            ms,
                            df,
                            vec!["blocked causal GQA, online softmax, f32".into()],
                        ),
                        &mut out,
                    );
                }
            }
            if want("forward_backward") {
                let ms = time_ms(args.reps, || {
                    let (_, saved) = nsa::cpu::forward_saved(&cfg, &x, &phi)?;
                    nsa::cpu::backward_saved(&cfg, &x, &phi, &saved, &d_o).map(|_| ())
                })?;
                push(
                    ctx.record(
                        "forward_backward",
                        "nsa",
                        b,
                        t,
                        hc,
                        ms,
                        3.5 * nf,
                        vec![nsa_note.clone()],
                    ),
                    &mut out,
                );
                if !args.no_dense {
                    let ms = time_ms(args.reps, || {
                        let (o, lse) =
                            dense::forward(&sh, &x.cu_seqlens, &x.q, &x.k_slc, &x.v_slc)?;
                        dense::backward(
                            &sh,
                            &x.cu_seqlens,
                            &x.q,
                            &x.k_slc,
                            &x.v_slc,
                            &o,
                            &lse,
                            &d_o,
                        )
                        .map(|_| ())
                    })?;
                    push(
                        ctx.record(
                            "forward_backward",
                            "dense-cpu",
                            b,
                            t,
                            hc,
                            ms,
                            3.5 * df,
                            vec!["blocked causal GQA, online softmax, f32".into()],
                        ),
                        &mut out,
                    );
                }
            }
        }
        if want("decode") {
            for &t in &args.decode_lengths {
                out.extend(decode_pair(&ctx, args, &cfg, hc, t, &nsa_note, &mut push)?);
            }
        }
    }
    Ok(out)
}

/// One decode step at context `t` (the cache holds `t - 1` tokens, the step appends the
/// `t`-th): NSA over its cache vs dense over a plain K/V cache. Successive timed steps each
/// append one token (the context grows by `reps + 1`, negligible).
fn decode_pair(
    ctx: &Ctx,
    args: &CpuBenchArgs,
    cfg: &NsaConfig,
    hc: HeadConfig,
    t: usize,
    note: &str,
    push: &mut impl FnMut(BenchRecord, &mut Vec<BenchRecord>),
) -> nsa::Result<Vec<BenchRecord>> {
    let (d, bsz) = (hc.dim, args.decode_batch);
    let extra = args.reps + 2;
    // One sequence's raw tokens, shared by the batch (every sequence gets the same cache).
    let x = NsaInputs::random(cfg, &[t + extra], d, d, false, 17);
    let phi = PhiParams::random(cfg, d, d, 4 * d, 18);
    let comp = nsa::cpu::decode::CpuCompressor::new(cfg, &phi, d, d);
    let mut cache = DecodeCache::<f32>::new(cfg, 1, d, d)?;
    cache.seqs[0].reserve(t + extra);
    for i in 0..t - 1 {
        cache.seqs[0].append(TokenKv::from_inputs(&x, cfg.kv_heads, i), &comp)?;
    }
    let one = cache.seqs.pop().unwrap();
    cache.seqs = vec![one; bsz];
    let mut pos = t - 1;
    let ntok = x.num_tokens();
    let step_inputs = |i: usize| -> NsaInputs<f32> {
        let tok = &x;
        let pick = |v: &Vec<f32>| {
            let per = v.len() / ntok;
            v[i * per..(i + 1) * per].repeat(bsz)
        };
        NsaInputs {
            dk: d,
            dv: d,
            cu_seqlens: (0..=bsz).collect(),
            q: pick(&tok.q),
            k_cmp: pick(&tok.k_cmp),
            v_cmp: pick(&tok.v_cmp),
            k_slc: pick(&tok.k_slc),
            v_slc: pick(&tok.v_slc),
            k_win: pick(&tok.k_win),
            v_win: pick(&tok.v_win),
            g_cmp: pick(&tok.g_cmp),
            g_slc: pick(&tok.g_slc),
            g_win: pick(&tok.g_win),
        }
    };
    let mut recs = Vec::new();
    let ms = time_ms(args.reps, || {
        let xs = step_inputs(pos);
        pos += 1;
        nsa::cpu::decode::step(cfg, &mut cache, &xs, &phi).map(|_| ())
    })?;
    let nf = 2.0 * bsz as f64 * hc.heads as f64 * (2 * d) as f64 * nsa_keys(cfg, t - 1) as f64;
    push(
        ctx.record(
            "decode",
            "nsa",
            bsz,
            t,
            hc,
            ms,
            nf,
            vec![
                note.to_string(),
                "one token per sequence; ms per step".into(),
            ],
        ),
        &mut recs,
    );
    if !args.no_dense {
        let sh = DenseShape {
            heads: hc.heads,
            kv_heads: hc.kv_heads,
            dk: d,
            dv: d,
            scale: None,
        };
        let (rk, rv) = (cfg.kv_heads * d, cfg.kv_heads * d);
        let kc = &x.k_slc[..t * rk];
        let vc = &x.v_slc[..t * rv];
        let q: Vec<f32> = x.q[(t - 1) * cfg.heads * d..t * cfg.heads * d].repeat(bsz);
        let ks: Vec<&[f32]> = vec![kc; bsz];
        let vs: Vec<&[f32]> = vec![vc; bsz];
        let ms = time_ms(args.reps, || {
            dense::decode_step(&sh, &q, &ks, &vs).map(|_| ())
        })?;
        let df = 2.0 * bsz as f64 * hc.heads as f64 * (2 * d) as f64 * t as f64;
        push(
            ctx.record(
                "decode",
                "dense-cpu",
                bsz,
                t,
                hc,
                ms,
                df,
                vec!["split-key (flash-decoding) over the cached K/V, f32".into()],
            ),
            &mut recs,
        );
    }
    Ok(recs)
}
