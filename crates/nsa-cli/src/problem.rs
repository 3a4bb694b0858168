//! The CLI's file conventions: which tensors a problem file holds and how they map onto
//! [`nsa::NsaInputs`] (README, "File conventions").
//!
//! Dense layout: `q` is `[B, T, HQ, dk]`. Packed layout: `q` is `[N, HQ, dk]` with an
//! integer tensor `cu_seqlens` `[B+1]` (one sequence when absent). K/V are
//! `k_cmp, v_cmp, k_slc, v_slc, k_win, v_win` (`[.., HKV, dk|dv]`), each falling back to
//! the shared `k` / `v` when absent; gates `g_cmp, g_slc, g_win` are `[.., HQ]`; phi
//! parameters are `phi_k.*` / `phi_v.*` when `phi` is not `mean`.

use crate::tensors::{OutFile, TensorFile};
use nsa::{
    NsaConfig, NsaError, NsaGrads, NsaInputs, NsaOutput, PhiKind, PhiParams, PhiWeights, Result,
};

/// Token dimensions of the file: `[B, T]` (dense) or `[N]` (packed).
#[derive(Debug, Clone)]
pub struct Layout {
    pub token_dims: Vec<usize>,
}

impl Layout {
    /// Shape of a per-token tensor with trailing dims `rest`.
    pub fn shape(&self, rest: &[usize]) -> Vec<usize> {
        let mut s = self.token_dims.clone();
        s.extend_from_slice(rest);
        s
    }
}

/// Everything a forward or backward call needs, read from a file.
pub struct Problem {
    pub layout: Layout,
    pub inputs: NsaInputs<f32>,
    pub phi: PhiParams<f32>,
}

/// Reads the problem tensors of `file` for configuration `cfg`.
pub fn read_problem(cfg: &NsaConfig, file: &TensorFile) -> Result<Problem> {
    cfg.validate()?;
    let q = file.get("q")?;
    let (layout, cu_seqlens) = match q.shape.len() {
        4 => {
            let (b, t) = (q.shape[0], q.shape[1]);
            if b == 0 || t == 0 {
                return Err(NsaError::EmptySequence(format!(
                    "q has shape {:?}",
                    q.shape
                )));
            }
            let cu = (0..=b).map(|i| i * t).collect();
            (
                Layout {
                    token_dims: vec![b, t],
                },
                cu,
            )
        }
        3 => {
            let n = q.shape[0];
            let cu = match file.ints.get("cu_seqlens") {
                Some((_, v)) => v
                    .iter()
                    .map(|&x| {
                        usize::try_from(x).map_err(|_| {
                            NsaError::BadSeqLens(format!("negative entry {x} in cu_seqlens"))
                        })
                    })
                    .collect::<Result<Vec<usize>>>()?,
                None => vec![0, n],
            };
            (
                Layout {
                    token_dims: vec![n],
                },
                cu,
            )
        }
        _ => {
            return Err(NsaError::ShapeMismatch {
                name: "q".into(),
                expected: vec![0, 0, cfg.heads, 0],
                got: q.shape.clone(),
            })
        }
    };
    let dk = *q.shape.last().unwrap();
    if q.shape[q.shape.len() - 2] != cfg.heads {
        return Err(NsaError::ShapeMismatch {
            name: "q".into(),
            expected: layout.shape(&[cfg.heads, dk]),
            got: q.shape.clone(),
        });
    }
    // dv from whichever value tensor is present.
    let dv = ["v_cmp", "v"]
        .iter()
        .find_map(|n| file.floats.get(*n))
        .map(|t| *t.shape.last().unwrap_or(&0))
        .ok_or_else(|| NsaError::MissingTensor("v_cmp (or shared v)".into()))?;
    let hkv = cfg.kv_heads;
    let branch = |name: &str, shared: &str, d: usize| -> Result<Vec<f32>> {
        let shape = layout.shape(&[hkv, d]);
        let src = if file.floats.contains_key(name) {
            name
        } else {
            shared
        };
        if !file.floats.contains_key(src) {
            return Err(NsaError::MissingTensor(format!(
                "{name} (or shared {shared})"
            )));
        }
        Ok(file.get_shaped(src, &shape)?.data.clone())
    };
    let gate = |name: &str| -> Result<Vec<f32>> {
        Ok(file
            .get_shaped(name, &layout.shape(&[cfg.heads]))?
            .data
            .clone())
    };
    let inputs = NsaInputs {
        dk,
        dv,
        cu_seqlens,
        q: q.data.clone(),
        k_cmp: branch("k_cmp", "k", dk)?,
        v_cmp: branch("v_cmp", "v", dv)?,
        k_slc: branch("k_slc", "k", dk)?,
        v_slc: branch("v_slc", "v", dv)?,
        k_win: branch("k_win", "k", dk)?,
        v_win: branch("v_win", "v", dv)?,
        g_cmp: gate("g_cmp")?,
        g_slc: gate("g_slc")?,
        g_win: gate("g_win")?,
    };
    let phi = read_phi(cfg, file, dk, dv)?;
    inputs.validate(cfg)?;
    phi.validate(cfg, dk, dv)?;
    Ok(Problem {
        layout,
        inputs,
        phi,
    })
}

fn read_phi(cfg: &NsaConfig, file: &TensorFile, dk: usize, dv: usize) -> Result<PhiParams<f32>> {
    let (hkv, l) = (cfg.kv_heads, cfg.cmp_block);
    let hidden = match cfg.phi {
        PhiKind::Mlp => {
            let w1 = file.get("phi_k.w1")?;
            *w1.shape.last().unwrap_or(&0)
        }
        _ => 0,
    };
    let one = |prefix: &str, d: usize| -> Result<PhiWeights<f32>> {
        let get = |s: &str, shape: &[usize]| -> Result<Vec<f32>> {
            Ok(file
                .get_shaped(&format!("{prefix}.{s}"), shape)?
                .data
                .clone())
        };
        Ok(match cfg.phi {
            PhiKind::Mean => PhiWeights::Mean,
            PhiKind::Linear => PhiWeights::Linear {
                pe: get("pe", &[hkv, l, d])?,
                w: get("w", &[hkv, l * d, d])?,
            },
            PhiKind::Mlp => PhiWeights::Mlp {
                pe: get("pe", &[hkv, l, d])?,
                w1: get("w1", &[hkv, l * d, hidden])?,
                b1: get("b1", &[hkv, hidden])?,
                w2: get("w2", &[hkv, hidden, d])?,
                b2: get("b2", &[hkv, d])?,
            },
        })
    };
    Ok(PhiParams {
        hidden,
        k: one("phi_k", dk)?,
        v: one("phi_v", dv)?,
    })
}

/// Reads the output gradient `do` for a backward call.
pub fn read_grad_out(cfg: &NsaConfig, file: &TensorFile, p: &Problem) -> Result<Vec<f32>> {
    let shape = p.layout.shape(&[cfg.heads, p.inputs.dv]);
    Ok(file.get_shaped("do", &shape)?.data.clone())
}

/// Writes `o` and `sel_idx` in the file's layout.
pub fn write_output(cfg: &NsaConfig, p: &Problem, out: &NsaOutput<f32>, file: &mut OutFile) {
    file.f32("o", p.layout.shape(&[cfg.heads, p.inputs.dv]), &out.o);
    file.i32(
        "sel_idx",
        p.layout.shape(&[cfg.kv_heads, cfg.sel_count]),
        &out.sel_idx,
    );
}

/// Writes every gradient in the file's layout (phi gradients as `dphi_k.*`, `dphi_v.*`).
pub fn write_grads(cfg: &NsaConfig, p: &Problem, g: &NsaGrads<f32>, file: &mut OutFile) {
    let (hq, hkv, dk, dv) = (cfg.heads, cfg.kv_heads, p.inputs.dk, p.inputs.dv);
    let l = &p.layout;
    file.f32("dq", l.shape(&[hq, dk]), &g.dq);
    for (name, t, d) in [
        ("dk_cmp", &g.dk_cmp, dk),
        ("dv_cmp", &g.dv_cmp, dv),
        ("dk_slc", &g.dk_slc, dk),
        ("dv_slc", &g.dv_slc, dv),
        ("dk_win", &g.dk_win, dk),
        ("dv_win", &g.dv_win, dv),
    ] {
        file.f32(name, l.shape(&[hkv, d]), t);
    }
    for (name, t) in [
        ("dg_cmp", &g.dg_cmp),
        ("dg_slc", &g.dg_slc),
        ("dg_win", &g.dg_win),
    ] {
        file.f32(name, l.shape(&[hq]), t);
    }
    for (name, shape, t) in g.dphi.named_tensors(cfg, dk, dv) {
        file.f32(&format!("d{name}"), shape, t);
    }
}
