//! `nsa bench`: timing sweeps of NSA against dense attention, written to
//! `bench/results/<device>-<date>.{md,json}` (see [`records`] for the schema, shared with the
//! Python peer script, and [`cpu`] for what is measured and how flops are counted).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod records;

use clap::{Args, ValueEnum};
use records::{fill_speedups, read_records, today, write_results, BenchRecord};
use std::path::PathBuf;

/// Where the benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDevice {
    Cpu,
    Cuda,
}

/// Arguments of `nsa bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Device to benchmark.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: BenchDevice,
    /// Where the `.md` and `.json` results go.
    #[arg(long, default_value = "bench/results")]
    pub out_dir: PathBuf,
    /// Sequence lengths for forward and forward+backward (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub lengths: Option<Vec<usize>>,
    /// Context lengths for the decode step (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub decode: Option<Vec<usize>>,
    /// Head configurations `HQxHKVxD` (comma separated), e.g. `16x1x64,32x2x128`.
    #[arg(long, value_delimiter = ',')]
    pub configs: Option<Vec<cpu::HeadConfig>>,
    /// Ops to run: forward, forward_backward, decode (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub ops: Option<Vec<String>>,
    /// Timed repetitions per measurement (median reported).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Batch size of forward/backward runs.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Sequences per decode step (comma separated; default 8 on the CPU, 1 and 32 on CUDA).
    #[arg(long, value_delimiter = ',')]
    pub decode_batch: Option<Vec<usize>>,
    /// Rayon threads (default: all logical CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Smoke-sized sweep (lengths 1k, 2k; decode 2k, 4k; 3 reps).
    #[arg(long)]
    pub quick: bool,
    /// Skip the dense baseline.
    #[arg(long)]
    pub no_dense: bool,
    /// JSON files of peer records (same schema, e.g. `impl: "torch-cpu"`) to merge into the table.
    #[arg(long)]
    pub peers: Vec<PathBuf>,
    /// Name prefix of the result files (default: the device).
    #[arg(long)]
    pub name: Option<String>,
    /// CUDA backward: the low-memory mode (statistics recomputed by the backward) instead of
    /// the default (statistics saved by the forward).
    #[arg(long)]
    pub recompute: bool,
    /// CUDA: head dimensions `dk:dv` of the HQ 64 / HKV 4 sweeps (comma separated; default
    /// `128:128,192:128`).
    #[arg(long, value_delimiter = ',')]
    pub head_dims: Option<Vec<String>>,
    /// Measures nothing: re-renders an existing `<name>-<date>.json` of results into
    /// `--out-dir` (the speedups recomputed, the table and comparison rebuilt; the title kept
    /// from the `.md` beside it).
    #[arg(long)]
    pub render: Option<PathBuf>,
}

impl BenchArgs {
    /// The CPU sweep these arguments ask for.
    pub fn cpu_args(&self) -> cpu::CpuBenchArgs {
        let mut a = cpu::CpuBenchArgs::default();
        if self.quick {
            a.lengths = vec![1024, 2048];
            a.decode_lengths = vec![2048, 4096];
            a.reps = 3;
        }
        if let Some(l) = &self.lengths {
            a.lengths = l.clone();
        }
        if let Some(l) = &self.decode {
            a.decode_lengths = l.clone();
        }
        if let Some(c) = &self.configs {
            a.configs = c.clone();
        }
        if let Some(o) = &self.ops {
            a.ops = o.clone();
        }
        if let Some(r) = self.reps {
            a.reps = r;
        }
        a.batch = self.batch;
        if let Some(b) = self.decode_batch.as_ref().and_then(|v| v.first()) {
            a.decode_batch = *b;
        }
        a.no_dense = self.no_dense;
        a
    }
}

fn check_ops(ops: &[String]) -> nsa::Result<()> {
    for o in ops {
        if !["forward", "forward_backward", "decode"].contains(&o.as_str()) {
            return Err(nsa::NsaError::Unsupported(format!(
                "bench op `{o}` (expected forward, forward_backward or decode)"
            )));
        }
    }
    Ok(())
}

/// Runs the benchmark, prints the table and writes the result files.
pub fn run(args: &BenchArgs) -> nsa::Result<()> {
    if let Some(path) = &args.render {
        return render(path, &args.out_dir);
    }
    if args.device == BenchDevice::Cuda {
        return run_cuda_forward(args);
    }
    let cargs = args.cpu_args();
    check_ops(&cargs.ops)?;
    for l in cargs.lengths.iter().chain(&cargs.decode_lengths) {
        if *l < 2 {
            return Err(nsa::NsaError::Unsupported(format!(
                "bench length {l} (need at least 2)"
            )));
        }
    }
    let mut peers: Vec<BenchRecord> = Vec::new();
    for p in &args.peers {
        peers.extend(read_records(p)?);
    }
    let summed = records::summed_forward_backward(&peers);
    peers.extend(summed);
    let mut records = match args.threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| nsa::NsaError::Unsupported(format!("thread pool: {e}")))?
            .install(|| cpu::run_cpu(&cargs))?,
        None => cpu::run_cpu(&cargs)?,
    };
    records.extend(peers);
    fill_speedups(&mut records, "dense-cpu");
    let date = today();
    let name = args.name.clone().unwrap_or_else(|| "cpu".into());
    let title = format!("NSA CPU benchmark, {date}");
    println!("{}", records::markdown(&title, &records, "nsa"));
    let (md, js) = write_results(&args.out_dir, &name, &date, &title, &records, "nsa")?;
    eprintln!("wrote {} and {}", md.display(), js.display());
    Ok(())
}

/// `nsa bench --render FILE.json`: the records of an earlier run, written again with speedups
/// recomputed (over `torch-sdpa-cudnn` when the file holds `nsa-cuda` records, else over
/// `dense-cpu`).
fn render(path: &std::path::Path, out_dir: &std::path::Path) -> nsa::Result<()> {
    let mut recs = read_records(path)?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    // `<name>-<YYYY-MM-DD>`
    let (name, date) = match stem.len().checked_sub(11) {
        Some(i) if stem.as_bytes()[i] == b'-' => (stem[..i].to_string(), stem[i + 1..].to_string()),
        _ => {
            return Err(nsa::NsaError::Format(format!(
                "{}: expected a file named <name>-<YYYY-MM-DD>.json",
                path.display()
            )))
        }
    };
    let cuda = recs.iter().any(|r| r.impl_ == "nsa-cuda");
    let (ours, baseline) = if cuda {
        ("nsa-cuda", "torch-sdpa-cudnn")
    } else {
        ("nsa", "dense-cpu")
    };
    for r in &mut recs {
        r.speedup = None;
    }
    fill_speedups(&mut recs, baseline);
    let title = std::fs::read_to_string(path.with_extension("md"))
        .ok()
        .and_then(|md| {
            md.lines()
                .next()
                .map(|l| l.trim_start_matches("# ").to_string())
        })
        .unwrap_or_else(|| format!("NSA benchmark, {date}"));
    let (md, js) = write_results(out_dir, &name, &date, &title, &recs, ours)?;
    eprintln!("wrote {} and {}", md.display(), js.display());
    Ok(())
}

/// `nsa bench --device cuda`: the sweeps of [`cuda`] for the ops asked (`--ops`, default
/// `forward`; also `backward` (which records forward+backward too) and `decode`), merged with
/// peer records of the same ops (`--peers`), written as `<name>-<date>.md/.json` (name default
/// `cuda-<ops>`). Speedups are over cuDNN's dense SDPA.
#[cfg(feature = "cuda")]
fn run_cuda_forward(args: &BenchArgs) -> nsa::Result<()> {
    let mut cargs = cuda::CudaBenchArgs::default();
    if let Some(l) = &args.lengths {
        cargs.lengths = l.clone();
    }
    if let Some(l) = &args.decode {
        cargs.decode_lengths = l.clone();
    }
    if let Some(b) = &args.decode_batch {
        cargs.decode_batches = b.clone();
    }
    if let Some(r) = args.reps {
        cargs.reps = r;
    }
    cargs.recompute = args.recompute;
    if let Some(dims) = &args.head_dims {
        cargs.shapes = dims
            .iter()
            .map(|d| cuda::parse_head_dims(d))
            .collect::<nsa::Result<_>>()?;
    }
    if args.quick {
        cargs.lengths = vec![8192];
        cargs.decode_lengths = vec![8192];
        cargs.g_sweep.clear();
    }
    let ops = args.ops.clone().unwrap_or_else(|| vec!["forward".into()]);
    let mut records = Vec::new();
    for op in &ops {
        records.extend(match op.as_str() {
            "forward" => cuda::run_cuda(&cargs)?,
            "backward" | "forward_backward" => cuda::run_cuda_backward(&cargs)?,
            "decode" => cuda::run_cuda_decode(&cargs)?,
            other => {
                return Err(nsa::NsaError::Unsupported(format!(
                    "cuda bench op `{other}` (expected forward, backward or decode)"
                )))
            }
        });
    }
    let wanted: Vec<String> = records.iter().map(|r| r.op.clone()).collect();
    let mut peers = Vec::new();
    for p in &args.peers {
        peers.extend(read_records(p)?);
    }
    // a peer file may hold forward and backward but no forward+backward: summed as for ours
    let summed = records::summed_forward_backward(&peers);
    peers.extend(summed);
    records.extend(peers.into_iter().filter(|r| wanted.contains(&r.op)));
    fill_speedups(&mut records, "torch-sdpa-cudnn");
    let date = today();
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("cuda-{}", ops.join("-")));
    let title = format!("NSA CUDA benchmark ({}), {date}", ops.join(", "));
    println!("{}", records::markdown(&title, &records, "nsa-cuda"));
    let (md, js) = write_results(&args.out_dir, &name, &date, &title, &records, "nsa-cuda")?;
    eprintln!("wrote {} and {}", md.display(), js.display());
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda_forward(_args: &BenchArgs) -> nsa::Result<()> {
    Err(nsa::NsaError::CudaUnavailable(
        "this build has no CUDA support (rebuild nsa-cli with `--features cuda`)".into(),
    ))
}
