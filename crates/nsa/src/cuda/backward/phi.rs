//! Backward of `phi` = linear / mlp on the GPU (`kernels/phi_bwd.cu` has the algebra): from the
//! gradients of the compressed K/V (`dKcmp`, `dVcmp`, `[M, HKV, D]` f32) to the gradients of the
//! raw compression-branch K/V and of every `phi` parameter, per KV head, for K (`D = dk`) and V
//! (`D = dv`). The MLP's pre-activation is recomputed (one GEMM). Every reduction over the
//! compressed tokens runs in a fixed order inside one thread (no atomics): bitwise repeatable.
//!
//! The kernel sequence of one `phi` is data ([`steps`]): the GPU runs it, and a host-side test
//! runs the same steps in float64 against the reference's `phi` backward (strides and algebra
//! checked without a GPU).
//!
//! Scratch: `dZ` `[HKV, M, l*max(dk, dv)]` f32 (shared by K and V; 2 x N x HKV x D x l/d f32),
//! for the MLP also the pre-activation and its gradient `[HKV, M, H]`.

use super::{alloc, grid, BwdKernels};
use crate::cuda::{driver_err, CudaContext, DeviceInputs};
use crate::error::{NsaError, Result};
use crate::inputs::{PhiParams, PhiWeights};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// The parameter tensors of one `phi` (K or V) in [`PhiWeights`] order, with their lengths.
pub(super) fn param_lens(mlp: bool, hkv: usize, l: usize, d: usize, h: usize) -> Vec<usize> {
    if mlp {
        vec![hkv * l * d, hkv * l * d * h, hkv * h, hkv * h * d, hkv * d]
    } else {
        vec![hkv * l * d, hkv * l * d * d]
    }
}

/// A tensor one step reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Buf {
    /// none (a null pointer)
    Null,
    /// `dKcmp` or `dVcmp`, `[M, HKV, D]`
    Dc,
    /// weight `i` of the `phi`, in [`PhiWeights`] order
    W(usize),
    /// gradient of weight `i`
    Grad(usize),
    /// `dZ` `[HKV, M, l*D]`
    Dz,
    /// MLP pre-activation `A` `[HKV, M, H]`
    Pre,
    /// its gradient `dA` `[HKV, M, H]`
    Da,
}

/// One kernel launch of the `phi` backward (per KV head `g`, every index below is of head `g`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Step {
    /// `phi_bwd_gemm`: `C(i, j) = sum_r A(i, r) B(r, j)` for `i < m`, `j < n`, `r < k`, plus
    /// `bias[g*n + j]`, times `silu'(pre)` at C's position. `a_mode` 0: `A = a[g*s0 + i*s1 +
    /// r*s2]`; 1: `Z[i][r]`; 2: `Z[r][i]`; 3: `silu` of the dense value. `B = b[g*s0 + r*s1 +
    /// j*s2]`, `C` at `g*c_s[0] + i*c_s[1] + j`.
    Gemm {
        m: usize,
        n: usize,
        k: usize,
        a_mode: i32,
        a: Buf,
        a_s: [i64; 3],
        b: Buf,
        b_s: [i64; 3],
        bias: Buf,
        pre: Buf,
        c: Buf,
        c_s: [i64; 2],
    },
    /// `phi_bwd_colsum`: `out[g*cols + j] = sum_{i < rows} a[g*sg + i*sm + j]`.
    Colsum {
        a: Buf,
        sg: i64,
        sm: i64,
        rows: usize,
        cols: usize,
        out: Buf,
    },
    /// `phi_bwd_scatter`: the raw dK / dV from `dZ`.
    Scatter,
}

/// The steps of one `phi` backward: `m` compressed tokens, block length `l`, dim `d`, MLP width
/// `h` (see `kernels/phi_bwd.cu` for the algebra).
pub(super) fn steps(mlp: bool, m: usize, hkv: usize, l: usize, d: usize, h: usize) -> Vec<Step> {
    let kd = l * d;
    let (mi, di, kdi, hi, hk) = (m as i64, d as i64, kd as i64, h as i64, hkv as i64);
    // dC as a dense operand: row i, column j at dc[(i*HKV + g)*D + j]
    let dc_s = [di, hk * di, 1];
    let gemm = |(m, n, k): (usize, usize, usize),
                (a_mode, a, a_s): (i32, Buf, [i64; 3]),
                (b, b_s): (Buf, [i64; 3]),
                bias: Buf,
                pre: Buf,
                (c, c_s): (Buf, [i64; 2])| Step::Gemm {
        m,
        n,
        k,
        a_mode,
        a,
        a_s,
        b,
        b_s,
        bias,
        pre,
        c,
        c_s,
    };
    let z = (1, Buf::Null, [0; 3]);
    let zt = (2, Buf::Null, [0; 3]);
    let dz = (Buf::Dz, [mi * kdi, kdi]);
    let mut v = Vec::new();
    if !mlp {
        // dW = Z^T dC [Kd, D]; dZ = dC W^T [M, Kd]
        v.push(gemm(
            (kd, d, m),
            zt,
            (Buf::Dc, dc_s),
            Buf::Null,
            Buf::Null,
            (Buf::Grad(1), [kdi * di, di]),
        ));
        v.push(gemm(
            (m, kd, d),
            (0, Buf::Dc, dc_s),
            (Buf::W(1), [kdi * di, 1, di]),
            Buf::Null,
            Buf::Null,
            dz,
        ));
    } else {
        let hid = [mi * hi, hi];
        // A = Z W1 + b1 [M, H] (the pre-activation, recomputed)
        v.push(gemm(
            (m, h, kd),
            z,
            (Buf::W(1), [kdi * hi, hi, 1]),
            Buf::W(2),
            Buf::Null,
            (Buf::Pre, hid),
        ));
        // db2 = colsum(dC)
        v.push(Step::Colsum {
            a: Buf::Dc,
            sg: di,
            sm: hk * di,
            rows: m,
            cols: d,
            out: Buf::Grad(4),
        });
        // dW2 = silu(A)^T dC [H, D]
        v.push(gemm(
            (h, d, m),
            (3, Buf::Pre, [mi * hi, 1, hi]),
            (Buf::Dc, dc_s),
            Buf::Null,
            Buf::Null,
            (Buf::Grad(3), [hi * di, di]),
        ));
        // dA = (dC W2^T) * silu'(A) [M, H]
        v.push(gemm(
            (m, h, d),
            (0, Buf::Dc, dc_s),
            (Buf::W(3), [hi * di, 1, di]),
            Buf::Null,
            Buf::Pre,
            (Buf::Da, hid),
        ));
        // db1 = colsum(dA)
        v.push(Step::Colsum {
            a: Buf::Da,
            sg: mi * hi,
            sm: hi,
            rows: m,
            cols: h,
            out: Buf::Grad(2),
        });
        // dW1 = Z^T dA [Kd, H]; dZ = dA W1^T [M, Kd]
        v.push(gemm(
            (kd, h, m),
            zt,
            (Buf::Da, [mi * hi, hi, 1]),
            Buf::Null,
            Buf::Null,
            (Buf::Grad(1), [kdi * hi, hi]),
        ));
        v.push(gemm(
            (m, kd, h),
            (0, Buf::Da, [mi * hi, hi, 1]),
            (Buf::W(1), [kdi * hi, 1, hi]),
            Buf::Null,
            Buf::Null,
            dz,
        ));
    }
    // dpe = colsum(dZ); then the raw dK / dV
    v.push(Step::Colsum {
        a: Buf::Dz,
        sg: mi * kdi,
        sm: kdi,
        rows: m,
        cols: kd,
        out: Buf::Grad(0),
    });
    v.push(Step::Scatter);
    v
}

/// Gradient buffers and scratch of the `phi` backward.
pub(super) struct PhiBwd {
    mlp: bool,
    hidden: usize,
    l: usize,
    /// Compressed tokens of the batch.
    m: usize,
    /// `dZ`, `A`, `dA` (taken out while a step writes them)
    scratch: [Option<CudaSlice<f32>>; 3],
    /// Parameter gradients of K's and V's `phi`, in [`PhiWeights`] order.
    k: Vec<Option<CudaSlice<f32>>>,
    v: Vec<Option<CudaSlice<f32>>>,
}

fn scratch_index(b: Buf) -> Option<usize> {
    match b {
        Buf::Dz => Some(0),
        Buf::Pre => Some(1),
        Buf::Da => Some(2),
        _ => None,
    }
}

impl PhiBwd {
    /// Allocates gradients and scratch for the `phi` of `x` (linear or mlp, weights uploaded).
    pub fn new(ctx: &CudaContext, x: &DeviceInputs) -> Result<Self> {
        let ph = x.phi.as_ref().ok_or_else(|| {
            NsaError::MissingTensor(
                "phi weights (DeviceInputs::set_phi before DeviceBackward::new)".into(),
            )
        })?;
        let mlp = ph.k.len() == 5;
        let sh = &x.shape;
        let (hkv, l, h) = (sh.hkv, sh.cmp_l, ph.hidden);
        let m = x.plan.n_compress;
        let f = |len: usize| alloc::<f32>(ctx, len).map(Some);
        let grads = |d: usize| -> Result<Vec<Option<CudaSlice<f32>>>> {
            param_lens(mlp, hkv, l, d, h).into_iter().map(f).collect()
        };
        let hid = if mlp { hkv * m * h } else { 1 };
        Ok(PhiBwd {
            mlp,
            hidden: h,
            l,
            m,
            scratch: [f(hkv * m * l * sh.dk.max(sh.dv))?, f(hid)?, f(hid)?],
            k: grads(sh.dk)?,
            v: grads(sh.dv)?,
        })
    }

    fn all(&self) -> impl Iterator<Item = &CudaSlice<f32>> {
        self.scratch
            .iter()
            .chain(&self.k)
            .chain(&self.v)
            .filter_map(|b| b.as_ref())
    }

    /// Bytes of device memory held.
    pub fn device_bytes(&self) -> usize {
        4 * self.all().map(|b| b.len()).sum::<usize>()
    }

    /// Every gradient buffer (for poisoning).
    pub fn grads_mut(&mut self) -> impl Iterator<Item = &mut CudaSlice<f32>> {
        self.k
            .iter_mut()
            .chain(self.v.iter_mut())
            .filter_map(|b| b.as_mut())
    }

    /// Copies the parameter gradients back as [`PhiParams`] (same shapes as the weights).
    pub fn download(&self, ctx: &CudaContext) -> Result<PhiParams<f32>> {
        let get = |bufs: &[Option<CudaSlice<f32>>]| -> Result<PhiWeights<f32>> {
            let mut v = bufs
                .iter()
                .map(|b| match b {
                    Some(b) => ctx.stream.clone_dtoh(b).map_err(driver_err),
                    None => Err(NsaError::Cuda("phi gradient buffer missing".into())),
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter();
            let mut next = || v.next().unwrap_or_default();
            Ok(if self.mlp {
                PhiWeights::Mlp {
                    pe: next(),
                    w1: next(),
                    b1: next(),
                    w2: next(),
                    b2: next(),
                }
            } else {
                PhiWeights::Linear {
                    pe: next(),
                    w: next(),
                }
            })
        };
        Ok(PhiParams {
            hidden: if self.mlp { self.hidden } else { 0 },
            k: get(&self.k)?,
            v: get(&self.v)?,
        })
    }

    /// From `dkc` / `dvc` (`[M, HKV, dk|dv]`) to the raw `dk` / `dv` (`[N, HKV, dk|dv]`, every
    /// element written) and the parameter gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        ctx: &CudaContext,
        kernels: &BwdKernels,
        x: &DeviceInputs,
        dkc: &CudaSlice<f32>,
        dvc: &CudaSlice<f32>,
        seqs: &CudaSlice<i32>,
        nseq: usize,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let s = &ctx.stream;
        let ph = x
            .phi
            .as_ref()
            .ok_or_else(|| NsaError::MissingTensor("phi weights (DeviceInputs::set_phi)".into()))?;
        let m = self.m;
        if m == 0 {
            // no complete compression block: every gradient of the branch is exactly 0
            for b in self.grads_mut() {
                s.memset_zeros(b).map_err(driver_err)?;
            }
            s.memset_zeros(dk).map_err(driver_err)?;
            return s.memset_zeros(dv).map_err(driver_err);
        }
        let sh = &x.shape;
        let (hkv, l, h, mlp) = (sh.hkv, self.l, self.hidden, self.mlp);
        for part in 0..2 {
            let (src, w, dc, d) = if part == 0 {
                (&x.k[0], &ph.k, dkc, sh.dk)
            } else {
                (&x.v[0], &ph.v, dvc, sh.dv)
            };
            let missing = || NsaError::Cuda("phi backward: buffer in use".into());
            for step in steps(mlp, m, hkv, l, d, h) {
                // the written buffer is taken out so the others can be read meanwhile
                let out_buf = match step {
                    Step::Gemm { c, .. } => c,
                    Step::Colsum { out, .. } => out,
                    Step::Scatter => Buf::Null,
                };
                let mut taken = match out_buf {
                    Buf::Grad(i) => {
                        let g = if part == 0 { &mut self.k } else { &mut self.v };
                        Some(g[i].take().ok_or_else(missing)?)
                    }
                    b => match scratch_index(b) {
                        Some(i) => Some(self.scratch[i].take().ok_or_else(missing)?),
                        None => None,
                    },
                };
                let scratch = &self.scratch;
                let read = |b: Buf| -> Option<&CudaSlice<f32>> {
                    match b {
                        Buf::Dc => Some(dc),
                        Buf::W(i) => w.get(i),
                        b => scratch_index(b).and_then(|i| scratch[i].as_ref()),
                    }
                };
                let dx = if part == 0 { &mut *dk } else { &mut *dv };
                let launched = launch_step(
                    ctx,
                    kernels,
                    step,
                    StepArgs {
                        hkv,
                        d,
                        m,
                        nseq,
                        ntok: x.n_tokens,
                        src,
                        pe: &w[0],
                        items: &x.plan.compress,
                        seqs,
                    },
                    &read,
                    taken.as_mut(),
                    dx,
                );
                // put the written buffer back before any error returns
                if let Some(t) = taken {
                    match out_buf {
                        Buf::Grad(i) => {
                            let g = if part == 0 { &mut self.k } else { &mut self.v };
                            g[i] = Some(t);
                        }
                        b => {
                            if let Some(i) = scratch_index(b) {
                                self.scratch[i] = Some(t);
                            }
                        }
                    }
                }
                launched?;
            }
        }
        Ok(())
    }
}

/// What every step of one `phi` (K or V) shares.
struct StepArgs<'a> {
    hkv: usize,
    d: usize,
    m: usize,
    nseq: usize,
    ntok: usize,
    /// the raw K or V (16-bit)
    src: &'a CudaSlice<u16>,
    pe: &'a CudaSlice<f32>,
    /// `(src, dst)` per compressed token
    items: &'a CudaSlice<i32>,
    seqs: &'a CudaSlice<i32>,
}

/// Launches one [`Step`]; `read` resolves the tensors it reads, `out` is the one it writes
/// (`dx`, the raw dK or dV, for the scatter).
#[allow(clippy::too_many_arguments)]
fn launch_step<'a>(
    ctx: &CudaContext,
    kernels: &BwdKernels,
    step: Step,
    a: StepArgs<'a>,
    read: &dyn Fn(Buf) -> Option<&'a CudaSlice<f32>>,
    out: Option<&mut CudaSlice<f32>>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    let s = &ctx.stream;
    let null = 0u64;
    let missing = |what: &str| NsaError::Cuda(format!("phi backward: no {what} buffer"));
    match step {
        Step::Gemm {
            m,
            n,
            k,
            a_mode,
            a: ab,
            a_s,
            b,
            b_s,
            bias,
            pre,
            c_s,
            ..
        } => {
            let gy = m.div_ceil(64);
            if gy > 65535 {
                return Err(NsaError::Unsupported(format!(
                    "phi backward GEMM with {m} rows (at most {})",
                    65535 * 64
                )));
            }
            let out = out.ok_or_else(|| missing("output"))?;
            let (mi, ni, ki, di) = (m as i32, n as i32, k as i32, a.d as i32);
            let mut lb = s.launch_builder(kernels.get("phi_bwd_gemm")?);
            lb.arg(&mi).arg(&ni).arg(&ki).arg(&a_mode);
            match read(ab) {
                Some(t) => lb.arg(t),
                None => lb.arg(&null),
            };
            lb.arg(&a_s[0]).arg(&a_s[1]).arg(&a_s[2]);
            lb.arg(read(b).ok_or_else(|| missing("B"))?);
            lb.arg(&b_s[0]).arg(&b_s[1]).arg(&b_s[2]);
            lb.arg(a.src).arg(a.pe).arg(a.items).arg(&di);
            match read(bias) {
                Some(t) => lb.arg(t),
                None => lb.arg(&null),
            };
            match read(pre) {
                Some(t) => lb.arg(t),
                None => lb.arg(&null),
            };
            lb.arg(out).arg(&c_s[0]).arg(&c_s[1]);
            // SAFETY: matches `phi_bwd_gemm`; the grid covers the m x n outputs of every KV
            // head; the strides come from `steps` (run in float64 by the host-side test).
            unsafe {
                lb.launch(LaunchConfig {
                    grid_dim: (n.div_ceil(64) as u32, gy as u32, a.hkv as u32),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map(|_| ())
            .map_err(driver_err)
        }
        Step::Colsum {
            a: ab,
            sg,
            sm,
            rows,
            cols,
            ..
        } => {
            let out = out.ok_or_else(|| missing("output"))?;
            let (ri, ci) = (rows as i32, cols as i32);
            let mut lb = s.launch_builder(kernels.get("phi_bwd_colsum")?);
            lb.arg(read(ab).ok_or_else(|| missing("column-sum input"))?)
                .arg(&sg)
                .arg(&sm)
                .arg(&ri)
                .arg(&ci)
                .arg(out);
            // SAFETY: matches `phi_bwd_colsum`; one thread per (column, KV head).
            unsafe { lb.launch(grid(cols.div_ceil(256), a.hkv, 256, 0)) }
                .map(|_| ())
                .map_err(driver_err)
        }
        Step::Scatter => {
            let items = a.ntok * a.hkv * a.d;
            let (nseq_i, ntok_i, m_i, d_i) = (a.nseq as i32, a.ntok as i32, a.m as i32, a.d as i32);
            let mut lb = s.launch_builder(kernels.get("phi_bwd_scatter")?);
            lb.arg(read(Buf::Dz).ok_or_else(|| missing("dZ"))?)
                .arg(a.seqs)
                .arg(&nseq_i)
                .arg(&ntok_i)
                .arg(&m_i)
                .arg(&d_i)
                .arg(dx);
            // SAFETY: matches `phi_bwd_scatter`; one thread per (token, KV head, element).
            unsafe { lb.launch(grid(items.div_ceil(256), 1, 256, 0)) }
                .map(|_| ())
                .map_err(driver_err)
        }
    }
}

/// The steps run in float64 on the host, with the kernels' indexing, against the reference's
/// `phi` backward (no GPU needed).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NsaConfig, PhiKind};
    use crate::reference::phi::Phi;

    fn sigmoid(a: f64) -> f64 {
        1.0 / (1.0 + (-a).exp())
    }

    struct Host<'a> {
        hkv: usize,
        l: usize,
        stride: usize,
        d: usize,
        m: usize,
        /// raw `[N, HKV, D]`
        x: &'a [f64],
        /// `(seq start, len, first compressed token)`
        seqs: &'a [(usize, usize, usize)],
        /// source token of each compressed token
        src: &'a [usize],
        w: &'a [Vec<f64>],
        dc: &'a [f64],
    }

    impl Host<'_> {
        fn z(&self, g: usize, i: usize, k: usize) -> f64 {
            let (r, c) = (k / self.d, k % self.d);
            self.x[((self.src[i] + r) * self.hkv + g) * self.d + c]
                + self.w[0][g * self.l * self.d + k]
        }

        /// Runs the steps; returns the gradients (weight order) and the raw dx.
        fn run(
            &self,
            steps: &[Step],
            lens: &[usize],
            scratch: [usize; 3],
        ) -> (Vec<Vec<f64>>, Vec<f64>) {
            let mut grads: Vec<Vec<f64>> = lens.iter().map(|&n| vec![f64::NAN; n]).collect();
            let mut sc: Vec<Vec<f64>> = scratch.iter().map(|&n| vec![f64::NAN; n]).collect();
            let ntok = self.x.len() / (self.hkv * self.d);
            let mut dx = vec![f64::NAN; self.x.len()];
            for &st in steps {
                let get = |b: Buf, grads: &Vec<Vec<f64>>, sc: &Vec<Vec<f64>>| -> Vec<f64> {
                    match b {
                        Buf::Null => vec![],
                        Buf::Dc => self.dc.to_vec(),
                        Buf::W(i) => self.w[i].clone(),
                        Buf::Grad(i) => grads[i].clone(),
                        b => sc[scratch_index(b).unwrap()].clone(),
                    }
                };
                let (out, vals) = match st {
                    Step::Gemm {
                        m,
                        n,
                        k,
                        a_mode,
                        a,
                        a_s,
                        b,
                        b_s,
                        bias,
                        pre,
                        c,
                        c_s,
                    } => {
                        let (av, bv) = (get(a, &grads, &sc), get(b, &grads, &sc));
                        let (biasv, prev) = (get(bias, &grads, &sc), get(pre, &grads, &sc));
                        let mut cv = get(c, &grads, &sc);
                        for g in 0..self.hkv {
                            for i in 0..m {
                                for j in 0..n {
                                    let mut acc = 0.0;
                                    for r in 0..k {
                                        let dense = |i: usize, r: usize| {
                                            av[(g as i64 * a_s[0]
                                                + i as i64 * a_s[1]
                                                + r as i64 * a_s[2])
                                                as usize]
                                        };
                                        let av_ir = match a_mode {
                                            0 => dense(i, r),
                                            1 => self.z(g, i, r),
                                            2 => self.z(g, r, i),
                                            _ => {
                                                let v = dense(i, r);
                                                v * sigmoid(v)
                                            }
                                        };
                                        let bv_rj = bv[(g as i64 * b_s[0]
                                            + r as i64 * b_s[1]
                                            + j as i64 * b_s[2])
                                            as usize];
                                        acc += av_ir * bv_rj;
                                    }
                                    let at = (g as i64 * c_s[0] + i as i64 * c_s[1]) as usize + j;
                                    if !biasv.is_empty() {
                                        acc += biasv[g * n + j];
                                    }
                                    if !prev.is_empty() {
                                        let (a, s) = (prev[at], sigmoid(prev[at]));
                                        acc *= s + a * s * (1.0 - s);
                                    }
                                    cv[at] = acc;
                                }
                            }
                        }
                        (c, cv)
                    }
                    Step::Colsum {
                        a,
                        sg,
                        sm,
                        rows,
                        cols,
                        out,
                    } => {
                        let av = get(a, &grads, &sc);
                        let mut ov = get(out, &grads, &sc);
                        for g in 0..self.hkv {
                            for c in 0..cols {
                                ov[g * cols + c] = (0..rows)
                                    .map(|i| av[(g as i64 * sg + i as i64 * sm) as usize + c])
                                    .sum();
                            }
                        }
                        (out, ov)
                    }
                    Step::Scatter => {
                        let dz = &sc[0];
                        let kd = self.l * self.d;
                        for tok in 0..ntok {
                            let &(start, len, cstart) =
                                self.seqs.iter().rfind(|s| s.0 <= tok).unwrap();
                            let s = tok - start;
                            let ncmp = if len >= self.l {
                                (len - self.l) / self.stride + 1
                            } else {
                                0
                            };
                            let ilo = if s >= self.l {
                                (s - self.l + self.stride) / self.stride
                            } else {
                                0
                            };
                            let ihi = (s / self.stride).min(ncmp.wrapping_sub(1));
                            for g in 0..self.hkv {
                                for c in 0..self.d {
                                    let mut acc = 0.0;
                                    if ncmp > 0 {
                                        for i in ilo..=ihi {
                                            acc += dz[(g * self.m + cstart + i) * kd
                                                + (s - i * self.stride) * self.d
                                                + c];
                                        }
                                    }
                                    dx[(tok * self.hkv + g) * self.d + c] = acc;
                                }
                            }
                        }
                        (Buf::Null, vec![])
                    }
                };
                match out {
                    Buf::Grad(i) => grads[i] = vals,
                    Buf::Null => {}
                    b => sc[scratch_index(b).unwrap()] = vals,
                }
            }
            (grads, dx)
        }
    }

    fn lcg(seed: u64, len: usize) -> Vec<f64> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn check(phi: PhiKind, hidden: usize) {
        let (hkv, l, stride, d) = (2, 4, 2, 3);
        let cfg = NsaConfig::builder()
            .heads(2)
            .kv_heads(hkv)
            .cmp_block(l)
            .cmp_stride(stride)
            .sel_block(8)
            .sel_count(4)
            .phi(phi)
            .build()
            .unwrap();
        let params = PhiParams::random(&cfg, d, d, hidden, 7).map(f64::from);
        let mlp = phi == PhiKind::Mlp;
        let w: Vec<Vec<f64>> = match &params.k {
            PhiWeights::Linear { pe, w } => vec![pe.clone(), w.clone()],
            PhiWeights::Mlp { pe, w1, b1, w2, b2 } => {
                vec![pe.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone()]
            }
            PhiWeights::Mean => unreachable!(),
        };
        // two sequences (11 and 3 tokens: the second holds no complete block) and a third
        let lens_seq = [11usize, 3, 6];
        let mut seqs = Vec::new();
        let mut src = Vec::new();
        let (mut start, mut cstart) = (0, 0);
        for &len in &lens_seq {
            seqs.push((start, len, cstart));
            let ncmp = if len >= l { (len - l) / stride + 1 } else { 0 };
            for i in 0..ncmp {
                src.push(start + i * stride);
            }
            start += len;
            cstart += ncmp;
        }
        let (ntok, m) = (start, cstart);
        let x = lcg(1, ntok * hkv * d);
        let dc = lcg(2, m * hkv * d);
        let host = Host {
            hkv,
            l,
            stride,
            d,
            m,
            x: &x,
            seqs: &seqs,
            src: &src,
            w: &w,
            dc: &dc,
        };
        let lens = param_lens(mlp, hkv, l, d, hidden);
        let hid = if mlp { hkv * m * hidden } else { 1 };
        let (grads, dx) = host.run(
            &steps(mlp, m, hkv, l, d, hidden),
            &lens,
            [hkv * m * l * d, hid, hid],
        );
        // the reference: phi backward per (compressed token, head), scattered to the raw tokens
        let p = Phi {
            weights: &params.k,
            l,
            dim: d,
            hidden,
        };
        let mut dw = crate::reference::phi::zeros_like(&params.k);
        let mut want_dx = vec![0.0; x.len()];
        for (i, &s0) in src.iter().enumerate() {
            for g in 0..hkv {
                let block: Vec<f64> = (0..l * d)
                    .map(|k| x[((s0 + k / d) * hkv + g) * d + k % d])
                    .collect();
                let mut db = vec![0.0; l * d];
                p.backward(
                    g,
                    &block,
                    &dc[(i * hkv + g) * d..(i * hkv + g + 1) * d],
                    &mut db,
                    &mut dw,
                );
                for (k, v) in db.iter().enumerate() {
                    want_dx[((s0 + k / d) * hkv + g) * d + k % d] += v;
                }
            }
        }
        let want: Vec<&Vec<f64>> = match &dw {
            PhiWeights::Linear { pe, w } => vec![pe, w],
            PhiWeights::Mlp { pe, w1, b1, w2, b2 } => vec![pe, w1, b1, w2, b2],
            PhiWeights::Mean => unreachable!(),
        };
        let close = |name: &str, got: &[f64], want: &[f64]| {
            assert_eq!(got.len(), want.len(), "{name} length");
            for (j, (a, b)) in got.iter().zip(want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                    "{phi:?} {name}[{j}]: {a} vs {b}"
                );
            }
        };
        for (i, (g, w)) in grads.iter().zip(want).enumerate() {
            close(&format!("grad {i}"), g, w);
        }
        close("dx", &dx, &want_dx);
        assert!(want_dx.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn linear_steps_match_the_reference_phi_backward() {
        check(PhiKind::Linear, 0);
    }

    #[test]
    fn mlp_steps_match_the_reference_phi_backward() {
        check(PhiKind::Mlp, 5);
    }

    #[test]
    fn parameter_lengths_match_the_weights() {
        for (phi, h) in [(PhiKind::Linear, 0), (PhiKind::Mlp, 24)] {
            let cfg = NsaConfig::builder().phi(phi).build().unwrap();
            let p = PhiParams::random(&cfg, 192, 128, h, 1);
            for (w, d) in [(&p.k, 192), (&p.v, 128)] {
                let got: Vec<usize> = w
                    .named(
                        "x",
                        crate::inputs::PhiShapes {
                            hkv: 4,
                            l: 32,
                            d,
                            hidden: h,
                        },
                    )
                    .iter()
                    .map(|t| t.2.len())
                    .collect();
                assert_eq!(got, param_lens(phi == PhiKind::Mlp, 4, 32, d, h));
            }
        }
    }
}
