//! `nsa forward` and `nsa backward`: file in, file out.

use crate::problem::{read_grad_out, read_problem, write_grads, write_output, Problem};
use crate::tensors::{OutFile, TensorFile};
use clap::Args;
use nsa::{Device, Elem, NsaConfig, NsaError, Result};
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
    /// The 16-bit type the CUDA kernels compute in: `bf16` or `f16`. Default: `f16` when the
    /// file's `q` is F16, else `bf16` (BF16 and F32 files; F32 values are rounded to it, there
    /// is no tf32 path). The CPU path and the reference compute in f32 / f64 and ignore it.
    #[arg(long, value_name = "bf16|f16")]
    pub elem: Option<Elem>,
}

/// The element type of a CUDA run: `--elem`, else the dtype of the file's `q`.
pub fn elem_for(choice: Option<Elem>, file: &TensorFile) -> Elem {
    choice.unwrap_or_else(|| match file.floats.get("q").map(|t| t.dtype) {
        Some(safetensors::Dtype::F16) => Elem::F16,
        _ => Elem::Bf16,
    })
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
    let (cfg, file, p) = load(&a.common)?;
    let (dev, elem) = (&a.common.device, elem_for(a.common.elem, &file));
    let out = match (a.decode_from, a.common.reference) {
        (Some(prefill), true) => nsa::reference_decode_replay(&cfg, &p.inputs, &p.phi, prefill)?,
        (Some(prefill), false) => {
            nsa::decode_replay_as(dev, elem, &cfg, &p.inputs, &p.phi, prefill)?
        }
        (None, true) => nsa::reference_forward(&cfg, &p.inputs, &p.phi)?,
        (None, false) => nsa::forward_as(dev, elem, &cfg, &p.inputs, &p.phi)?,
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
        let elem = elem_for(a.common.elem, &file);
        nsa::backward_as(&a.common.device, elem, &cfg, &p.inputs, &p.phi, &d_o)?
    };
    let mut f = OutFile::default();
    write_grads(&cfg, &p, &grads, &mut f);
    f.save(&a.common.output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::Tensor;
    use safetensors::Dtype;

    fn file_with_q(dtype: Dtype) -> TensorFile {
        let mut f = TensorFile::default();
        let t = Tensor {
            shape: vec![1, 1, 2],
            data: vec![0.5, -1.0],
            dtype,
        };
        f.floats.insert("q".into(), t);
        f
    }

    #[test]
    fn element_type_follows_the_file_unless_chosen() {
        assert_eq!(elem_for(None, &file_with_q(Dtype::F16)), Elem::F16);
        assert_eq!(elem_for(None, &file_with_q(Dtype::BF16)), Elem::Bf16);
        // f32 files compute in bf16 (rounded once) unless --elem says otherwise
        assert_eq!(elem_for(None, &file_with_q(Dtype::F32)), Elem::Bf16);
        assert_eq!(
            elem_for(Some(Elem::F16), &file_with_q(Dtype::F32)),
            Elem::F16
        );
        assert_eq!(
            elem_for(Some(Elem::Bf16), &file_with_q(Dtype::F16)),
            Elem::Bf16
        );
        assert_eq!(elem_for(None, &TensorFile::default()), Elem::Bf16);
    }

    #[test]
    fn elem_flag_parses() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            c: CommonArgs,
        }
        let base = ["t", "--config", "c", "--input", "i", "--output", "o"];
        let t = T::try_parse_from(base.iter().chain(&["--elem", "f16"])).unwrap();
        assert_eq!(t.c.elem, Some(Elem::F16));
        let t = T::try_parse_from(base).unwrap();
        assert_eq!(t.c.elem, None);
        assert!(T::try_parse_from(base.iter().chain(&["--elem", "tf32"])).is_err());
    }
}
