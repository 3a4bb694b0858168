//! TEMPORARY entry point (written by the CPU-path helper so that `nsa bench` can be built and
//! smoke-run); the lead engineer's CLI replaces it and dispatches `nsa bench` to `bench::run`.

mod bench;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "nsa", about = "Native Sparse Attention")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time NSA against dense attention and write bench/results/<device>-<date>.{md,json}.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Bench(a) => bench::run(&a),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
