//! `nsa forward` and `nsa backward`: file in, file out.

use crate::problem::{read_grad_out, read_problem, write_grads, write_output, Problem};
use crate::tensors::{OutFile, TensorFile};
use clap::Args;
use nsa::{Device, NsaConfig, NsaError, Result};
use std::path::PathBuf;

/// Options shared by forward and backward.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// NsaConfig as JSON (keys heads, kv_heads, cmp_block, cmp_stride, sel_block, sel_count,
    /// init_blocks, local_blocks, window, optional scale and phi).
    #[arg(long)]
    pub config: PathBuf,
    /// Input safetensors file (q, k/v per branch or shared k, v, gates, phi parameters).
    #[arg(long)]
    pub input: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    pub output: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Use the float64 reference instead of the fastest implementation for the device.
    #[arg(long)]
    pub reference: bool,
}

#[derive(Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Prefill tokens [0, P) of each sequence, then decode the rest one token at a time
    /// through the cache (the output must equal the plain forward).
    #[arg(long, value_name = "P")]
    pub decode_from: Option<usize>,
}

#[derive(Args, Debug)]
pub struct BackwardArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

fn load(common: &CommonArgs) -> Result<(NsaConfig, TensorFile, Problem)> {
    let text = std::fs::read_to_string(&common.config)
        .map_err(|e| NsaError::Io(format!("cannot read {}: {e}", common.config.display())))?;
    let cfg = NsaConfig::from_json(&text)
        .map_err(|e| NsaError::Format(format!("{}: {e}", common.config.display())))?;
    let file = TensorFile::load(&common.input)?;
    let problem = read_problem(&cfg, &file)?;
    Ok((cfg, file, problem))
}

pub fn forward(a: &ForwardArgs) -> Result<()> {
    let (cfg, _file, p) = load(&a.common)?;
    let out = match (a.decode_from, a.common.reference) {
        (Some(prefill), true) => nsa::reference_decode_replay(&cfg, &p.inputs, &p.phi, prefill)?,
        (Some(prefill), false) => {
            nsa::decode_replay(&a.common.device, &cfg, &p.inputs, &p.phi, prefill)?
        }
        (None, true) => nsa::reference_forward(&cfg, &p.inputs, &p.phi)?,
        (None, false) => nsa::forward(&a.common.device, &cfg, &p.inputs, &p.phi)?,
    };
    let mut f = OutFile::default();
    write_output(&cfg, &p, &out, &mut f);
    f.save(&a.common.output)
}

pub fn backward(a: &BackwardArgs) -> Result<()> {
    let (cfg, file, p) = load(&a.common)?;
    let d_o = read_grad_out(&cfg, &file, &p)?;
    let grads = if a.common.reference {
        nsa::reference_backward(&cfg, &p.inputs, &p.phi, &d_o)?
    } else {
        nsa::backward(&a.common.device, &cfg, &p.inputs, &p.phi, &d_o)?
    };
    let mut f = OutFile::default();
    write_grads(&cfg, &p, &grads, &mut f);
    f.save(&a.common.output)
}
