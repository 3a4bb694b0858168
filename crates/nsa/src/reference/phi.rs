//! `phi`: one block of `l` raw keys (or values) of one KV head -> one compressed key (value)
//! (SPEC.md, "Compression branch"), forward and backward, in float64.
//!
//! A block is `[l, D]` token-major: element (token `r`, dim `c`) is `x[r*D + c]`, the flatten
//! order of `PhiWeights`. With `z = flatten(x) + pe[h]` (`pe` is `[HKV, l, D]`, same order):
//!
//! - `Mean`:   `out[c] = (1/l) * sum_r x[r*D + c]`
//! - `Linear`: `out = z @ w[h]`                              (`w` is `[HKV, l*D, D]`)
//! - `Mlp`:    `out = silu(z @ w1[h] + b1[h]) @ w2[h] + b2[h]` (`w1` `[HKV, l*D, H]`, `w2` `[HKV, H, D]`)

use crate::cache::{BlockCompressor, KvPart};
use crate::inputs::{PhiParams, PhiWeights};

/// One `phi` (for K or for V) with the sizes needed to index its weights.
#[derive(Debug, Clone, Copy)]
pub struct Phi<'a> {
    pub weights: &'a PhiWeights<f64>,
    /// Block length `l`.
    pub l: usize,
    /// Token dimension `D` (`dk` or `dv`).
    pub dim: usize,
    /// MLP hidden size `H` (unused otherwise).
    pub hidden: usize,
}

fn sigmoid(a: f64) -> f64 {
    1.0 / (1.0 + (-a).exp())
}

fn silu(a: f64) -> f64 {
    a * sigmoid(a)
}

/// d silu(a) / da = s + a s (1 - s), s = sigmoid(a).
fn silu_grad(a: f64) -> f64 {
    let s = sigmoid(a);
    s + a * s * (1.0 - s)
}

impl<'a> Phi<'a> {
    /// `z = flatten(block) + pe[h]` (for Linear and Mlp).
    fn z(&self, pe: &[f64], h: usize, block: &[f64]) -> Vec<f64> {
        let ld = self.l * self.dim;
        let pe_h = &pe[h * ld..(h + 1) * ld];
        block.iter().zip(pe_h).map(|(x, p)| x + p).collect()
    }

    /// MLP pre-activation `a = z @ w1[h] + b1[h]`, length `H`.
    fn mlp_hidden(&self, w1: &[f64], b1: &[f64], h: usize, z: &[f64]) -> Vec<f64> {
        let (ld, hid) = (self.l * self.dim, self.hidden);
        (0..hid)
            .map(|k| {
                let mut a = b1[h * hid + k];
                for (i, zi) in z.iter().enumerate() {
                    a += zi * w1[(h * ld + i) * hid + k];
                }
                a
            })
            .collect()
    }

    /// Compressed token of KV head `h` from `block` (`[l, D]`), written to `out` (`[D]`).
    pub fn forward(&self, h: usize, block: &[f64], out: &mut [f64]) {
        let (l, dim) = (self.l, self.dim);
        let ld = l * dim;
        assert_eq!(block.len(), ld, "phi block size");
        assert_eq!(out.len(), dim, "phi output size");
        match self.weights {
            PhiWeights::Mean => {
                for (c, o) in out.iter_mut().enumerate() {
                    *o = (0..l).map(|r| block[r * dim + c]).sum::<f64>() / l as f64;
                }
            }
            PhiWeights::Linear { pe, w } => {
                let z = self.z(pe, h, block);
                for (c, o) in out.iter_mut().enumerate() {
                    *o = z
                        .iter()
                        .enumerate()
                        .map(|(i, zi)| zi * w[(h * ld + i) * dim + c])
                        .sum();
                }
            }
            PhiWeights::Mlp {
                pe, w1, b1, w2, b2, ..
            } => {
                let z = self.z(pe, h, block);
                let a = self.mlp_hidden(w1, b1, h, &z);
                let hid = self.hidden;
                for (c, o) in out.iter_mut().enumerate() {
                    *o = b2[h * dim + c]
                        + a.iter()
                            .enumerate()
                            .map(|(k, &ak)| silu(ak) * w2[(h * hid + k) * dim + c])
                            .sum::<f64>();
                }
            }
        }
    }

    /// Backward of [`Phi::forward`] for upstream gradient `d_out` (`[D]`): **adds** the
    /// gradient w.r.t. the block to `d_block` (`[l, D]`) and w.r.t. the weights to `d_w`
    /// (same kind and shapes as the weights).
    pub fn backward(
        &self,
        h: usize,
        block: &[f64],
        d_out: &[f64],
        d_block: &mut [f64],
        d_w: &mut PhiWeights<f64>,
    ) {
        let (l, dim) = (self.l, self.dim);
        let ld = l * dim;
        match (self.weights, d_w) {
            (PhiWeights::Mean, PhiWeights::Mean) => {
                for r in 0..l {
                    for c in 0..dim {
                        d_block[r * dim + c] += d_out[c] / l as f64;
                    }
                }
            }
            (PhiWeights::Linear { pe, w }, PhiWeights::Linear { pe: dpe, w: dw }) => {
                let z = self.z(pe, h, block);
                for i in 0..ld {
                    let mut dz = 0.0;
                    for c in 0..dim {
                        let wi = (h * ld + i) * dim + c;
                        dz += w[wi] * d_out[c];
                        dw[wi] += z[i] * d_out[c];
                    }
                    // z = x + pe: the same gradient reaches both.
                    d_block[i] += dz;
                    dpe[h * ld + i] += dz;
                }
            }
            (
                PhiWeights::Mlp { pe, w1, b1, w2, .. },
                PhiWeights::Mlp {
                    pe: dpe,
                    w1: dw1,
                    b1: db1,
                    w2: dw2,
                    b2: db2,
                },
            ) => {
                let hid = self.hidden;
                let z = self.z(pe, h, block);
                let a = self.mlp_hidden(w1, b1, h, &z);
                for c in 0..dim {
                    db2[h * dim + c] += d_out[c];
                }
                // da[k] = silu'(a[k]) * sum_c w2[k, c] d_out[c]
                let mut da = vec![0.0; hid];
                for k in 0..hid {
                    let s = silu(a[k]);
                    let mut ds = 0.0;
                    for c in 0..dim {
                        let wi = (h * hid + k) * dim + c;
                        ds += w2[wi] * d_out[c];
                        dw2[wi] += s * d_out[c];
                    }
                    da[k] = ds * silu_grad(a[k]);
                    db1[h * hid + k] += da[k];
                }
                for i in 0..ld {
                    let mut dz = 0.0;
                    for k in 0..hid {
                        let wi = (h * ld + i) * hid + k;
                        dz += w1[wi] * da[k];
                        dw1[wi] += z[i] * da[k];
                    }
                    d_block[i] += dz;
                    dpe[h * ld + i] += dz;
                }
            }
            _ => panic!("phi backward: gradient buffer kind differs from the weights' kind"),
        }
    }
}

/// Zero-filled weights of the same kind and shapes (a gradient accumulator).
pub fn zeros_like(w: &PhiWeights<f64>) -> PhiWeights<f64> {
    w.map(|_| 0.0)
}

/// The reference `phi` pair (K and V) as a [`BlockCompressor`] for the decode cache.
#[derive(Debug, Clone, Copy)]
pub struct RefCompressor<'a> {
    pub k: Phi<'a>,
    pub v: Phi<'a>,
}

impl<'a> RefCompressor<'a> {
    pub fn new(phi: &'a PhiParams<f64>, l: usize, dk: usize, dv: usize) -> Self {
        RefCompressor {
            k: Phi {
                weights: &phi.k,
                l,
                dim: dk,
                hidden: phi.hidden,
            },
            v: Phi {
                weights: &phi.v,
                l,
                dim: dv,
                hidden: phi.hidden,
            },
        }
    }
}

impl BlockCompressor<f64> for RefCompressor<'_> {
    fn compress(&self, part: KvPart, kv_head: usize, block: &[f64], out: &mut [f64]) {
        match part {
            KvPart::Key => self.k.forward(kv_head, block, out),
            KvPart::Value => self.v.forward(kv_head, block, out),
        }
    }
}
