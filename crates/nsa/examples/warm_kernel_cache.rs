//! Fills the NVRTC disk cache (`NSA_KERNEL_CACHE`) with the sm_90a CUBINs that `cuda_bench` /
//! `cuda_bench_bwd` load for the default shape (HQ 64, dk = dv = 128, bf16, phi = mean) at the
//! group sizes given (default 16), so that a packed copy of the cache spares the GPU machine the
//! compilations: `NSA_KERNEL_CACHE=dir cargo run -p nsa --features cuda --release --example
//! warm_kernel_cache -- 16 8 4 2 1` (same NSA_CUDA_DEFINES as the run that will use it).
//! Needs only the NVRTC library. The decode family is left out (the benchmarks above do not use it).

#[cfg(feature = "cuda")]
fn main() -> nsa::Result<()> {
    use nsa::cuda::backward::{compile_bwd, BwdFamily};
    use nsa::cuda::{compile, shape_of, Family};
    let gs: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("group sizes"))
        .collect();
    let gs = if gs.is_empty() { vec![16] } else { gs };
    for g in gs {
        let cfg = nsa::NsaConfig::builder()
            .heads(64)
            .kv_heads(64 / g)
            .build()?;
        let shape = shape_of(&cfg, 128, 128);
        std::thread::scope(|s| -> nsa::Result<()> {
            let fwd = s.spawn(|| -> nsa::Result<()> {
                for fam in Family::ALL {
                    if fam != Family::Decode {
                        compile(fam, &shape, "sm_90a", &[])?;
                    }
                }
                Ok(())
            });
            for fam in BwdFamily::ALL {
                compile_bwd(fam, &shape, "sm_90a", &[])?;
            }
            fwd.join().expect("forward compile thread")
        })?;
        println!("G = {g}: cached");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("warm_kernel_cache needs `--features cuda`");
}
