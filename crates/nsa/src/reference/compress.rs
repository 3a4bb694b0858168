//! Compression branch (SPEC.md, "Compression branch"): the compressed keys/values of one
//! sequence, made by `phi` from every complete block `[i*d, i*d + l)`, and the list of
//! compressed tokens a query sees. The attention itself is [`super::attend::attend`] over
//! that list; its probabilities are `p_cmp` (input of the selection, Eq. 8).

use super::phi::Phi;
use crate::blocks;
use crate::config::NsaConfig;
use crate::inputs::PhiWeights;

/// Compressed K/V of one sequence, `[num, HKV, dk]` and `[num, HKV, dv]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Compressed {
    pub num: usize,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
}

/// The `l` raw tokens of block `i` of head `h`, gathered `[l, D]` from a `[len, HKV, D]` tensor.
fn gather_block(raw: &[f64], hkv: usize, h: usize, dim: usize, first: usize, l: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(l * dim);
    for r in 0..l {
        let o = ((first + r) * hkv + h) * dim;
        out.extend_from_slice(&raw[o..o + dim]);
    }
    out
}

/// Compressed tokens visible to the query at `t`: `0 .. cmp_visible(t)` (empty for `t < l-1`).
pub fn visible_keys(cfg: &NsaConfig, t: usize) -> Vec<usize> {
    (0..blocks::cmp_visible(t, cfg.cmp_block, cfg.cmp_stride)).collect()
}

/// Compresses the whole sequence (`k_raw` `[len, HKV, dk]`, `v_raw` `[len, HKV, dv]`).
pub fn compress_sequence(
    cfg: &NsaConfig,
    phi_k: &Phi<'_>,
    phi_v: &Phi<'_>,
    k_raw: &[f64],
    v_raw: &[f64],
    len: usize,
) -> Compressed {
    let (hkv, l, d) = (cfg.kv_heads, cfg.cmp_block, cfg.cmp_stride);
    let num = blocks::cmp_blocks_in(len, l, d);
    let (dk, dv) = (phi_k.dim, phi_v.dim);
    let mut k = vec![0.0; num * hkv * dk];
    let mut v = vec![0.0; num * hkv * dv];
    for i in 0..num {
        for h in 0..hkv {
            let bk = gather_block(k_raw, hkv, h, dk, i * d, l);
            phi_k.forward(h, &bk, &mut k[(i * hkv + h) * dk..(i * hkv + h + 1) * dk]);
            let bv = gather_block(v_raw, hkv, h, dv, i * d, l);
            phi_v.forward(h, &bv, &mut v[(i * hkv + h) * dv..(i * hkv + h + 1) * dv]);
        }
    }
    Compressed { num, k, v }
}

/// Backward of [`compress_sequence`]: from the gradients of the compressed K/V (`dkc`, `dvc`,
/// shaped like [`Compressed`]) **adds** to the raw gradients (`[len, HKV, D]`) and to the
/// `phi` weight gradients.
pub fn compress_backward(
    cfg: &NsaConfig,
    phi_k: &Phi<'_>,
    phi_v: &Phi<'_>,
    k_raw: &[f64],
    v_raw: &[f64],
    len: usize,
    dkc: &[f64],
    dvc: &[f64],
    dk_raw: &mut [f64],
    dv_raw: &mut [f64],
    dphi_k: &mut PhiWeights<f64>,
    dphi_v: &mut PhiWeights<f64>,
) {
    let (hkv, l, d) = (cfg.kv_heads, cfg.cmp_block, cfg.cmp_stride);
    let num = blocks::cmp_blocks_in(len, l, d);
    for (phi, raw, dc, draw, dphi) in [
        (phi_k, k_raw, dkc, &mut *dk_raw, &mut *dphi_k),
        (phi_v, v_raw, dvc, &mut *dv_raw, &mut *dphi_v),
    ] {
        let dim = phi.dim;
        for i in 0..num {
            for h in 0..hkv {
                let block = gather_block(raw, hkv, h, dim, i * d, l);
                let mut d_block = vec![0.0; l * dim];
                let d_out = &dc[(i * hkv + h) * dim..(i * hkv + h + 1) * dim];
                phi.backward(h, &block, d_out, &mut d_block, dphi);
                // Scatter back: blocks overlap when d < l, so gradients add up.
                for r in 0..l {
                    let o = ((i * d + r) * hkv + h) * dim;
                    for c in 0..dim {
                        draw[o + c] += d_block[r * dim + c];
                    }
                }
            }
        }
    }
}
