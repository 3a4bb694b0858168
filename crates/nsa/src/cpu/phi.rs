//! `phi` on f32 for whole batches: every compressed key/value of every sequence at once,
//! forward and backward (SPEC.md, "Compression branch"; formulas in `reference::phi`).
//!
//! Compressed block `i` of a sequence starting at packed token `s0` reads tokens
//! `s0 + i*d + r`, `r = 0..l`. For one KV head the token rows of a fixed `r` across all blocks
//! form a strided matrix `X_r` (`[nb, D]`, row stride `d * HKV * D`), so the block-linear map
//! `flatten(x + pe) @ W` is `sum_r X_r @ W_r + flatten(pe) @ W` with `W_r` the `r`-th `[D, E]`
//! slab of `W` (`[l*D, E]`): `l` GEMMs straight from the input tensor, no gather (`E = D` for
//! `Linear`, `E = H` for the MLP's first layer). The backward is the same with the roles of
//! the operands swapped.
//!
//! Layout of compressed tensors: `[HKV, nb_total, E]` (head-major, the blocks of all sequences
//! one after another: sequence `b` starts at row `offsets[b]`).
//!
//! Parallelism and determinism: forward tasks are (head, sequence, chunk of blocks); backward
//! tasks own disjoint outputs, (head, `r`) for weight gradients and (head, token chunk) for
//! input gradients, with every sum in a fixed order.

use super::tile::{axpy, gemm, MatMut, MatRef};
use super::{head_chunks, to_token_major};
use crate::blocks;
use crate::config::NsaConfig;
use crate::inputs::{PhiParams, PhiWeights};
use rayon::prelude::*;

/// Blocks per forward task.
const BLOCK_CHUNK: usize = 128;
/// Tokens per input-gradient task.
const TOKEN_CHUNK: usize = 256;

/// Where the compressed blocks of each sequence live.
#[derive(Debug, Clone)]
pub(crate) struct BlockLayout {
    /// `cu_seqlens` of the raw tokens.
    pub cu: Vec<usize>,
    /// `offsets[b]..offsets[b+1]`: compressed rows of sequence `b` (len `B + 1`).
    pub offsets: Vec<usize>,
    pub l: usize,
    pub d: usize,
    pub hkv: usize,
}

impl BlockLayout {
    pub fn new(cfg: &NsaConfig, cu: &[usize]) -> Self {
        let mut offsets = vec![0usize];
        for w in cu.windows(2) {
            let nb = blocks::cmp_blocks_in(w[1] - w[0], cfg.cmp_block, cfg.cmp_stride);
            offsets.push(offsets.last().unwrap() + nb);
        }
        BlockLayout {
            cu: cu.to_vec(),
            offsets,
            l: cfg.cmp_block,
            d: cfg.cmp_stride,
            hkv: cfg.kv_heads,
        }
    }

    pub fn total(&self) -> usize {
        *self.offsets.last().unwrap()
    }

    pub fn seqs(&self) -> usize {
        self.cu.len() - 1
    }

    pub fn tokens(&self) -> usize {
        *self.cu.last().unwrap()
    }

    /// `X_r` of sequence `b`, head `g`, blocks `i0 .. i0 + rows`: `[rows, D]` strided view.
    #[allow(clippy::too_many_arguments)]
    fn x_r<'a>(
        &self,
        x: &'a [f32],
        dim: usize,
        b: usize,
        g: usize,
        r: usize,
        i0: usize,
        rows: usize,
    ) -> MatRef<'a> {
        let tok = self.cu[b] + i0 * self.d + r;
        let rs = self.d * self.hkv * dim;
        if rows == 0 {
            return MatRef::new(&x[..0], 0, dim, rs, 1);
        }
        MatRef::new(&x[(tok * self.hkv + g) * dim..], rows, dim, rs, 1)
    }
}

/// One `phi` on f32 (K or V).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PhiF32<'a> {
    pub weights: &'a PhiWeights<f32>,
    pub l: usize,
    /// Token dim `D`.
    pub dim: usize,
    pub hidden: usize,
}

/// Compressed K or V of a batch, plus what the backward needs.
#[derive(Debug, Clone)]
pub(crate) struct Compressed {
    /// `[HKV, nb_total, D]`
    pub out: Vec<f32>,
    /// MLP pre-activations `[HKV, nb_total, H]` (empty for other kinds).
    pub z: Vec<f32>,
}

fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

fn silu_grad(a: f32) -> f32 {
    let s = 1.0 / (1.0 + (-a).exp());
    s + a * s * (1.0 - s)
}

impl<'a> PhiF32<'a> {
    pub fn new(weights: &'a PhiWeights<f32>, cfg: &NsaConfig, dim: usize, hidden: usize) -> Self {
        PhiF32 {
            weights,
            l: cfg.cmp_block,
            dim,
            hidden,
        }
    }

    /// `flatten(pe[g]) @ w[g] (+ bias[g])`: the constant part of the block-linear map, `[E]`.
    fn const_part(
        &self,
        pe: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        g: usize,
        e: usize,
    ) -> Vec<f32> {
        let ld = self.l * self.dim;
        let mut c = match bias {
            Some(b) => b[g * e..(g + 1) * e].to_vec(),
            None => vec![0.0; e],
        };
        gemm(
            1.0,
            MatRef::rows(&pe[g * ld..(g + 1) * ld], 1, ld),
            MatRef::rows(&w[g * ld * e..(g + 1) * ld * e], ld, e),
            1.0,
            MatMut::rows(&mut c, 1, e),
        );
        c
    }

    /// `out[i] = c + sum_r X_r[i] @ W_r` for the blocks `i0 .. i0 + rows` of (seq `b`, head `g`).
    #[allow(clippy::too_many_arguments)]
    fn block_linear(
        &self,
        lay: &BlockLayout,
        x: &[f32],
        w: &[f32],
        c: &[f32],
        e: usize,
        g: usize,
        b: usize,
        i0: usize,
        out: &mut [f32],
    ) {
        let (l, dim) = (self.l, self.dim);
        let rows = out.len() / e;
        for row in out.chunks_exact_mut(e) {
            row.copy_from_slice(c);
        }
        for r in 0..l {
            let wr = &w[(g * l + r) * dim * e..(g * l + r + 1) * dim * e];
            gemm(
                1.0,
                lay.x_r(x, dim, b, g, r, i0, rows),
                MatRef::rows(wr, dim, e),
                1.0,
                MatMut::rows(out, rows, e),
            );
        }
    }

    /// All compressed tokens of the batch for the raw tensor `x` (`[N, HKV, D]`).
    pub fn forward(&self, lay: &BlockLayout, x: &[f32]) -> Compressed {
        let (l, dim, hkv) = (self.l, self.dim, lay.hkv);
        let total = lay.total();
        let mut out = vec![0.0f32; hkv * total * dim];
        match self.weights {
            PhiWeights::Mean => {
                let inv = 1.0 / l as f32;
                head_chunks(&mut out, lay.hkv, &lay.offsets, dim, BLOCK_CHUNK)
                    .into_par_iter()
                    .for_each(|(g, b, i0, chunk)| {
                        for (k, row) in chunk.chunks_exact_mut(dim).enumerate() {
                            row.fill(0.0);
                            let tok0 = lay.cu[b] + (i0 + k) * lay.d;
                            for r in 0..l {
                                let src = &x[((tok0 + r) * hkv + g) * dim..][..dim];
                                axpy(1.0, src, row);
                            }
                            row.iter_mut().for_each(|v| *v *= inv);
                        }
                    });
                Compressed { out, z: Vec::new() }
            }
            PhiWeights::Linear { pe, w } => {
                let cs: Vec<Vec<f32>> = (0..hkv)
                    .map(|g| self.const_part(pe, w, None, g, dim))
                    .collect();
                head_chunks(&mut out, lay.hkv, &lay.offsets, dim, BLOCK_CHUNK)
                    .into_par_iter()
                    .for_each(|(g, b, i0, chunk)| {
                        self.block_linear(lay, x, w, &cs[g], dim, g, b, i0, chunk);
                    });
                Compressed { out, z: Vec::new() }
            }
            PhiWeights::Mlp { pe, w1, b1, w2, b2 } => {
                let hid = self.hidden;
                let cs: Vec<Vec<f32>> = (0..hkv)
                    .map(|g| self.const_part(pe, w1, Some(b1), g, hid))
                    .collect();
                let mut z = vec![0.0f32; hkv * total * hid];
                let zt = head_chunks(&mut z, lay.hkv, &lay.offsets, hid, BLOCK_CHUNK);
                let ot = head_chunks(&mut out, lay.hkv, &lay.offsets, dim, BLOCK_CHUNK);
                zt.into_par_iter()
                    .zip(ot)
                    .for_each(|((g, b, i0, zc), (_, _, _, oc))| {
                        self.block_linear(lay, x, w1, &cs[g], hid, g, b, i0, zc);
                        let act: Vec<f32> = zc.iter().map(|&a| silu(a)).collect();
                        let rows = act.len() / hid;
                        for row in oc.chunks_exact_mut(dim) {
                            row.copy_from_slice(&b2[g * dim..(g + 1) * dim]);
                        }
                        gemm(
                            1.0,
                            MatRef::rows(&act, rows, hid),
                            MatRef::rows(&w2[g * hid * dim..(g + 1) * hid * dim], hid, dim),
                            1.0,
                            MatMut::rows(oc, rows, dim),
                        );
                    });
                Compressed { out, z }
            }
        }
    }

    /// One compressed token of head `g` from one block (`[l, D]` token-major), for decoding.
    pub fn forward_block(&self, g: usize, block: &[f32], out: &mut [f32]) {
        let (l, dim) = (self.l, self.dim);
        let ld = l * dim;
        match self.weights {
            PhiWeights::Mean => {
                out.fill(0.0);
                for row in block.chunks_exact(dim) {
                    axpy(1.0, row, out);
                }
                let inv = 1.0 / l as f32;
                out.iter_mut().for_each(|v| *v *= inv);
            }
            PhiWeights::Linear { pe, w } => {
                let z: Vec<f32> = block
                    .iter()
                    .zip(&pe[g * ld..(g + 1) * ld])
                    .map(|(a, p)| a + p)
                    .collect();
                gemm(
                    1.0,
                    MatRef::rows(&z, 1, ld),
                    MatRef::rows(&w[g * ld * dim..(g + 1) * ld * dim], ld, dim),
                    0.0,
                    MatMut::rows(out, 1, dim),
                );
            }
            PhiWeights::Mlp { pe, w1, b1, w2, b2 } => {
                let hid = self.hidden;
                let z: Vec<f32> = block
                    .iter()
                    .zip(&pe[g * ld..(g + 1) * ld])
                    .map(|(a, p)| a + p)
                    .collect();
                let mut a = b1[g * hid..(g + 1) * hid].to_vec();
                gemm(
                    1.0,
                    MatRef::rows(&z, 1, ld),
                    MatRef::rows(&w1[g * ld * hid..(g + 1) * ld * hid], ld, hid),
                    1.0,
                    MatMut::rows(&mut a, 1, hid),
                );
                a.iter_mut().for_each(|v| *v = silu(*v));
                out.copy_from_slice(&b2[g * dim..(g + 1) * dim]);
                gemm(
                    1.0,
                    MatRef::rows(&a, 1, hid),
                    MatRef::rows(&w2[g * hid * dim..(g + 1) * hid * dim], hid, dim),
                    1.0,
                    MatMut::rows(out, 1, dim),
                );
            }
        }
    }

    /// Backward: from `dout` (`[HKV, nb_total, D]`, the gradient of the compressed tokens)
    /// to the raw tokens (`[N, HKV, D]`, returned) and the weights (returned, same kind).
    pub fn backward(
        &self,
        lay: &BlockLayout,
        x: &[f32],
        comp: &Compressed,
        dout: &[f32],
    ) -> (Vec<f32>, PhiWeights<f32>) {
        let (dim, hkv) = (self.dim, lay.hkv);
        match self.weights {
            PhiWeights::Mean => {
                let inv = 1.0 / self.l as f32;
                let dx = self.input_grad(lay, dout, dim, |gin, _r, dst| axpy(inv, gin, dst));
                (dx, PhiWeights::Mean)
            }
            PhiWeights::Linear { pe, w } => {
                let (dx, dw, dpe) = self.linear_backward(lay, x, pe, w, dout, dim);
                (dx, PhiWeights::Linear { pe: dpe, w: dw })
            }
            PhiWeights::Mlp { pe, w1, w2, .. } => {
                let hid = self.hidden;
                let total = lay.total();
                // dA = dOut @ W2^T; dZ = dA * silu'(z); dW2 = silu(z)^T dOut; db2 = colsum(dOut).
                let mut dz = vec![0.0f32; hkv * total * hid];
                let mut dw2 = vec![0.0f32; hkv * hid * dim];
                let mut db2 = vec![0.0f32; hkv * dim];
                dz.par_chunks_mut((total * hid).max(1))
                    .zip(dw2.par_chunks_mut(hid * dim))
                    .zip(db2.par_chunks_mut(dim))
                    .enumerate()
                    .for_each(|(g, ((dzg, dw2g), db2g))| {
                        if total == 0 {
                            return;
                        }
                        let dog = &dout[g * total * dim..(g + 1) * total * dim];
                        let zg = &comp.z[g * total * hid..(g + 1) * total * hid];
                        gemm(
                            1.0,
                            MatRef::rows(dog, total, dim),
                            MatRef::rows(&w2[g * hid * dim..(g + 1) * hid * dim], hid, dim).t(),
                            0.0,
                            MatMut::rows(dzg, total, hid),
                        );
                        let act: Vec<f32> = zg.iter().map(|&a| silu(a)).collect();
                        for (d, &a) in dzg.iter_mut().zip(zg) {
                            *d *= silu_grad(a);
                        }
                        gemm(
                            1.0,
                            MatRef::rows(&act, total, hid).t(),
                            MatRef::rows(dog, total, dim),
                            0.0,
                            MatMut::rows(dw2g, hid, dim),
                        );
                        db2g.fill(0.0);
                        for row in dog.chunks_exact(dim) {
                            axpy(1.0, row, db2g);
                        }
                    });
                let (dx, dw1, dpe) = self.linear_backward(lay, x, pe, w1, &dz, hid);
                let db1 = colsums(&dz, hkv, total, hid);
                (
                    dx,
                    PhiWeights::Mlp {
                        pe: dpe,
                        w1: dw1,
                        b1: db1,
                        w2: dw2,
                        b2: db2,
                    },
                )
            }
        }
    }

    /// Backward of the block-linear map `flatten(x + pe) @ W` for upstream `gout`
    /// (`[HKV, nb_total, e]`): returns `(dx [N, HKV, D], dW [HKV, l*D, e], dpe [HKV, l, D])`.
    fn linear_backward(
        &self,
        lay: &BlockLayout,
        x: &[f32],
        pe: &[f32],
        w: &[f32],
        gout: &[f32],
        e: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (l, dim, hkv) = (self.l, self.dim, lay.hkv);
        let total = lay.total();
        let col = colsums(gout, hkv, total, e);
        // dW_r = sum_b X_r^T G + pe_r (x) colsum(G);  dpe_r = colsum(G) @ W_r^T.
        let mut dw = vec![0.0f32; hkv * l * dim * e];
        let mut dpe = vec![0.0f32; hkv * l * dim];
        dw.par_chunks_mut(dim * e)
            .zip(dpe.par_chunks_mut(dim))
            .enumerate()
            .for_each(|(gr, (dwr, dper))| {
                let (g, r) = (gr / l, gr % l);
                let colg = &col[g * e..(g + 1) * e];
                let wr = &w[gr * dim * e..(gr + 1) * dim * e];
                let per = &pe[gr * dim..(gr + 1) * dim];
                for (c, row) in dwr.chunks_exact_mut(e).enumerate() {
                    row.iter_mut().zip(colg).for_each(|(v, &s)| *v = per[c] * s);
                }
                for b in 0..lay.seqs() {
                    let (o0, o1) = (lay.offsets[b], lay.offsets[b + 1]);
                    if o1 == o0 {
                        continue;
                    }
                    gemm(
                        1.0,
                        lay.x_r(x, dim, b, g, r, 0, o1 - o0).t(),
                        MatRef::rows(
                            &gout[(g * total + o0) * e..(g * total + o1) * e],
                            o1 - o0,
                            e,
                        ),
                        1.0,
                        MatMut::rows(dwr, dim, e),
                    );
                }
                for (c, v) in dper.iter_mut().enumerate() {
                    *v = super::tile::dot(&wr[c * e..(c + 1) * e], colg);
                }
            });
        // dx_t = sum over the blocks covering t of G_i @ W_{t - i d}^T.
        let dx = self.input_grad_gemm(lay, w, gout, e);
        (dx, dw, dpe)
    }

    /// `dx` for the block-linear map, by token chunks: for each `r`, the tokens `t = i d + r`
    /// of the chunk get `G_i @ W_r^T` (one strided GEMM per `r`, in the order `r = 0..l`).
    fn input_grad_gemm(&self, lay: &BlockLayout, w: &[f32], gout: &[f32], e: usize) -> Vec<f32> {
        let (l, d, dim, hkv) = (self.l, lay.d, self.dim, lay.hkv);
        let n = lay.tokens();
        let total = lay.total();
        let mut dxh = vec![0.0f32; hkv * n * dim];
        head_chunks(&mut dxh, lay.hkv, &lay.cu, dim, TOKEN_CHUNK)
            .into_par_iter()
            .for_each(|(g, b, a0, chunk)| {
                chunk.fill(0.0);
                let nb = lay.offsets[b + 1] - lay.offsets[b];
                let a1 = a0 + chunk.len() / dim;
                for r in 0..l {
                    // blocks i with a0 <= i d + r < a1 and i < nb
                    let i_lo = if a0 > r { (a0 - r).div_ceil(d) } else { 0 };
                    if a1 <= r {
                        continue;
                    }
                    let i_hi = ((a1 - 1 - r) / d + 1).min(nb);
                    if i_lo >= i_hi {
                        continue;
                    }
                    let rows = i_hi - i_lo;
                    let go = lay.offsets[b] + i_lo;
                    let wr = &w[(g * l + r) * dim * e..(g * l + r + 1) * dim * e];
                    let first = i_lo * d + r - a0;
                    gemm(
                        1.0,
                        MatRef::rows(
                            &gout[(g * total + go) * e..(g * total + go + rows) * e],
                            rows,
                            e,
                        ),
                        MatRef::rows(wr, dim, e).t(),
                        1.0,
                        MatMut::new(&mut chunk[first * dim..], rows, dim, d * dim, 1),
                    );
                }
            });
        to_token_major(&dxh, hkv, n, dim)
    }

    /// `dx` by token chunks for `Mean`: `f(gout_row_i, r, dx_row_t)` for every block `i`
    /// covering token `t = i d + r`, blocks in ascending order.
    fn input_grad(
        &self,
        lay: &BlockLayout,
        gout: &[f32],
        e: usize,
        f: impl Fn(&[f32], usize, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        let (l, d, dim, hkv) = (self.l, lay.d, self.dim, lay.hkv);
        let n = lay.tokens();
        let total = lay.total();
        let mut dxh = vec![0.0f32; hkv * n * dim];
        head_chunks(&mut dxh, lay.hkv, &lay.cu, dim, TOKEN_CHUNK)
            .into_par_iter()
            .for_each(|(g, b, a0, chunk)| {
                let nb = lay.offsets[b + 1] - lay.offsets[b];
                for (k, row) in chunk.chunks_exact_mut(dim).enumerate() {
                    row.fill(0.0);
                    let t = a0 + k;
                    let i_lo = (t + 1).saturating_sub(l).div_ceil(d);
                    let i_hi = (t / d + 1).min(nb);
                    for i in i_lo..i_hi {
                        let gi = (g * total + lay.offsets[b] + i) * e;
                        f(&gout[gi..gi + e], t - i * d, row);
                    }
                }
            });
        to_token_major(&dxh, hkv, n, dim)
    }
}

/// Column sums of each head's `[total, e]` matrix, in row order: `[HKV, e]`.
fn colsums(m: &[f32], hkv: usize, total: usize, e: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; hkv * e];
    for g in 0..hkv {
        let dst = &mut out[g * e..(g + 1) * e];
        for row in m[g * total * e..(g + 1) * total * e].chunks_exact(e) {
            axpy(1.0, row, dst);
        }
    }
    out
}

/// Both `phi` of a call.
pub(crate) fn phis<'a>(
    cfg: &NsaConfig,
    phi: &'a PhiParams<f32>,
    dk: usize,
    dv: usize,
) -> (PhiF32<'a>, PhiF32<'a>) {
    (
        PhiF32::new(&phi.k, cfg, dk, phi.hidden),
        PhiF32::new(&phi.v, cfg, dv, phi.hidden),
    )
}
