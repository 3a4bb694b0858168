//! `nsa`: the command-line face of the library (README, "The CLI").

mod bench;
mod demo;
mod problem;
mod run;
mod tensors;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "nsa",
    version,
    about = "Native Sparse Attention: reference, fast CPU path and CUDA kernels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the NSA forward pass on a safetensors problem file.
    Forward(run::ForwardArgs),
    /// Run the NSA backward pass (needs `do` in the input file).
    Backward(run::BackwardArgs),
    /// A small end-to-end problem: correctness against the reference and speed against dense.
    Demo(demo::DemoArgs),
    /// Benchmarks against dense attention (and peers, through bench/peers.py results).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match &cli.cmd {
        Command::Forward(a) => run::forward(a),
        Command::Backward(a) => run::backward(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nsa: error: {e}");
            ExitCode::FAILURE
        }
    }
}
