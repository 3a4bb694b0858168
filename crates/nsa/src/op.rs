//! The one public op with its backends behind it: the caller picks a device and gets the same
//! function (SPEC.md) and the same errors. Inputs are f32 (bf16/f16 files are widened on load).
//! The CUDA kernels compute in a 16-bit type ([`Elem`]): bf16 by default, f16 through the `_as`
//! variants; f32 inputs are rounded to it once (no tf32 path). The CPU path computes in f32.

use crate::config::NsaConfig;
use crate::elem::Elem;
use crate::error::{NsaError, Result};
use crate::inputs::{NsaGrads, NsaInputs, NsaOutput, PhiParams};
use std::str::FromStr;

/// Where the fast path runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The multi-threaded f32 CPU path.
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl FromStr for Device {
    type Err = NsaError;
    /// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    NsaError::Unsupported(format!("device `{s}` (use cpu, cuda or cuda:N)"))
                }),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda<T>() -> Result<T> {
    Err(NsaError::CudaUnavailable(
        "this build has no CUDA support (rebuild with `--features cuda`)".into(),
    ))
}

/// NSA forward on `device` (CUDA: in bf16).
pub fn forward(
    device: &Device,
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<NsaOutput<f32>> {
    forward_as(device, Elem::Bf16, cfg, x, phi)
}

/// [`forward`] with the CUDA kernels computing in `elem` (the inputs rounded to it once, to
/// nearest even); the CPU path computes in f32 and ignores `elem`.
pub fn forward_as(
    device: &Device,
    elem: Elem,
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<NsaOutput<f32>> {
    #[cfg(not(feature = "cuda"))]
    let _ = elem;
    match device {
        Device::Cpu => crate::cpu::forward(cfg, x, phi),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let ctx = crate::cuda::CudaContext::new(*ordinal)?;
            crate::cuda::forward_as(&ctx, cfg, x, phi, elem)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => no_cuda(),
    }
}

/// NSA backward on `device`: gradients of `sum(o * d_o)` with respect to every input and the
/// `phi` parameters (CUDA: in bf16). On CUDA the forward it runs first saves each branch's
/// output and lse for the backward (`cuda::backward::BwdMode::SavedStats`, the fast default);
/// the low-memory mode that recomputes them is `nsa::cuda::backward::backward_recompute`.
pub fn backward(
    device: &Device,
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
    d_o: &[f32],
) -> Result<NsaGrads<f32>> {
    backward_as(device, Elem::Bf16, cfg, x, phi, d_o)
}

/// [`backward`] with the CUDA kernels computing in `elem` (inputs and `d_o` rounded to it once;
/// gradients come back in f32); the CPU path computes in f32 and ignores `elem`.
pub fn backward_as(
    device: &Device,
    elem: Elem,
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
    d_o: &[f32],
) -> Result<NsaGrads<f32>> {
    #[cfg(not(feature = "cuda"))]
    let _ = elem;
    match device {
        Device::Cpu => crate::cpu::backward(cfg, x, phi, d_o),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let ctx = crate::cuda::CudaContext::new(*ordinal)?;
            match elem {
                Elem::Bf16 => crate::cuda::backward::backward(&ctx, cfg, x, phi, d_o),
                Elem::F16 => {
                    let x16 = x.map(half::f16::from_f32);
                    crate::cuda::backward::backward(&ctx, cfg, &x16, phi, d_o)
                }
            }
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => no_cuda(),
    }
}

/// The float64 reference on f32 inputs (widened, then rounded back).
pub fn reference_forward(
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
) -> Result<NsaOutput<f32>> {
    let out = crate::reference::forward(cfg, &x.map(f64::from), &phi.map(f64::from))?;
    Ok(out.map(|v| v as f32))
}

/// The float64 reference backward on f32 inputs.
pub fn reference_backward(
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
    d_o: &[f32],
) -> Result<NsaGrads<f32>> {
    let d_o: Vec<f64> = d_o.iter().map(|&v| v as f64).collect();
    let g = crate::reference::backward(cfg, &x.map(f64::from), &phi.map(f64::from), &d_o)?;
    Ok(g.map(|v| v as f32))
}

/// Prefill `[0, prefill)` of every sequence, then decode the rest token by token through the
/// cache of `device`'s backend; the rows equal [`forward`]'s (CUDA: in bf16).
pub fn decode_replay(
    device: &Device,
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
    prefill: usize,
) -> Result<NsaOutput<f32>> {
    decode_replay_as(device, Elem::Bf16, cfg, x, phi, prefill)
}

/// [`decode_replay`] with the CUDA cache and kernels in `elem` (inputs rounded to it once); the
/// CPU path computes in f32 and ignores `elem`.
pub fn decode_replay_as(
    device: &Device,
    elem: Elem,
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
    prefill: usize,
) -> Result<NsaOutput<f32>> {
    #[cfg(not(feature = "cuda"))]
    let _ = elem;
    match device {
        Device::Cpu => crate::replay::replay(
            cfg,
            x,
            prefill,
            |c, cache, b, xs| crate::cpu::decode::prefill(c, cache, b, xs, phi),
            |c, cache, xs| crate::cpu::decode::step(c, cache, xs, phi),
        ),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let ctx = crate::cuda::CudaContext::new(*ordinal)?;
            match elem {
                Elem::Bf16 => crate::cuda::decode::replay(&ctx, cfg, x, phi, prefill),
                Elem::F16 => {
                    let x16 = x.map(half::f16::from_f32);
                    crate::cuda::decode::replay(&ctx, cfg, &x16, phi, prefill)
                }
            }
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => no_cuda(),
    }
}

/// [`decode_replay`] through the float64 reference's cache.
pub fn reference_decode_replay(
    cfg: &NsaConfig,
    x: &NsaInputs<f32>,
    phi: &PhiParams<f32>,
    prefill: usize,
) -> Result<NsaOutput<f32>> {
    let phi = phi.map(f64::from);
    let out = crate::replay::replay(
        cfg,
        &x.map(f64::from),
        prefill,
        |c, cache, b, xs| crate::reference::decode::prefill(c, cache, b, xs, &phi),
        |c, cache, xs| crate::reference::decode::step(c, cache, xs, &phi),
    )?;
    Ok(out.map(|v| v as f32))
}
