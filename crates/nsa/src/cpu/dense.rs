//! Dense causal attention with GQA on f32: the baseline NSA is measured against (benchmark and
//! demo). Same layout as NSA (`q` `[N, HQ, dk]`, `k` `[N, HKV, dk]`, `v` `[N, HKV, dv]`, packed
//! with `cu_seqlens`), same building blocks: query tiles of `64 / G` tokens with the `G` heads
//! of a group as the rows of one matrix, key blocks of [`KEY_BLOCK`] through GEMMs with an
//! online softmax (FlashAttention), rayon over tiles.
//!
//! - [`forward`]: `o` and the log-sum-exp per (token, head);
//! - [`backward`]: FlashAttention-2 shaped and deterministic: `dq` by query tiles, `dk`/`dv` by
//!   key chunks, each task owning its output;
//! - [`decode_step`]: one query per sequence against cached K/V, split over key chunks
//!   (flash-decoding) whose partial results are merged in a fixed order.

use super::attend::{self, gather_heads, gather_rows, Seg};
use super::tile::{ensure, exp1, exp_shift_sum, gemm, max_of, MatMut, MatRef};
use super::{head_chunks, kv_rows, split_tiles, tiles, to_token_major};
use crate::error::{NsaError, Result};
use crate::inputs::validate_cu_seqlens;
use rayon::prelude::*;

/// Keys per block of the online softmax (and per split of a decode step).
pub const KEY_BLOCK: usize = 256;
/// Keys per key-major backward task.
const KV_CHUNK: usize = 64;

/// Head counts and dims of a dense call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DenseShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub dk: usize,
    pub dv: usize,
    /// `None`: `1/sqrt(dk)`.
    pub scale: Option<f32>,
}

impl DenseShape {
    fn g(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.dk as f32).sqrt())
    }

    fn tile_tokens(&self) -> usize {
        (64 / self.g()).clamp(1, 64)
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("dk", self.dk),
            ("dv", self.dv),
        ] {
            if v == 0 {
                return Err(NsaError::ZeroSize(name));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(NsaError::HeadsNotDivisible {
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        Ok(())
    }
}

fn check_len(name: &str, got: usize, shape: &[usize]) -> Result<()> {
    if got != shape.iter().product::<usize>() {
        return Err(NsaError::ShapeMismatch {
            name: name.into(),
            expected: shape.to_vec(),
            got: vec![got],
        });
    }
    Ok(())
}

fn check(sh: &DenseShape, cu: &[usize], q: &[f32], k: &[f32], v: &[f32]) -> Result<usize> {
    sh.validate()?;
    let n = *cu.last().unwrap_or(&0);
    validate_cu_seqlens(cu, n)?;
    check_len("q", q.len(), &[n, sh.heads, sh.dk])?;
    check_len("k", k.len(), &[n, sh.kv_heads, sh.dk])?;
    check_len("v", v.len(), &[n, sh.kv_heads, sh.dv])?;
    Ok(n)
}

/// Running state of an online softmax over key blocks for `rows` rows.
struct Online<'a> {
    m: &'a mut [f32],
    l: &'a mut [f32],
    /// `rows x dv`, unnormalised.
    o: &'a mut [f32],
}

/// Folds one key block into the running state; row `r` sees the block's first `vis[r]` keys.
fn online_block(
    q: MatRef<'_>,
    k: MatRef<'_>,
    v: MatRef<'_>,
    vis: &[usize],
    s: &mut Vec<f32>,
    st: &mut Online<'_>,
) {
    let (rows, nk, dv) = (q.rows, k.rows, v.cols);
    ensure(s, rows * nk);
    gemm(1.0, q, k.t(), 0.0, MatMut::rows(s, rows, nk));
    for r in 0..rows {
        let row = &mut s[r * nk..(r + 1) * nk];
        let h = vis[r].min(nk);
        row[h..].fill(0.0);
        if h == 0 {
            continue;
        }
        let kept = &mut row[..h];
        let m_new = st.m[r].max(max_of(kept));
        let sum = exp_shift_sum(kept, m_new);
        let alpha = if st.m[r] == f32::NEG_INFINITY {
            0.0
        } else {
            exp1(st.m[r] - m_new)
        };
        st.l[r] = st.l[r] * alpha + sum;
        st.m[r] = m_new;
        st.o[r * dv..(r + 1) * dv]
            .iter_mut()
            .for_each(|x| *x *= alpha);
    }
    gemm(
        1.0,
        MatRef::rows(s, rows, nk),
        v,
        1.0,
        MatMut::rows(st.o, rows, dv),
    );
}

/// Causal forward: `(o [N, HQ, dv], lse [N, HQ])`.
pub fn forward(
    sh: &DenseShape,
    cu: &[usize],
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = check(sh, cu, q, k, v)?;
    let (hq, hkv, gs, dk, dv) = (sh.heads, sh.kv_heads, sh.g(), sh.dk, sh.dv);
    let mut o = vec![0.0f32; n * hq * dv];
    let mut lse = vec![0.0f32; n * hq];
    let tl = tiles(cu, sh.tile_tokens());
    let parts: Vec<_> = tl
        .iter()
        .copied()
        .zip(
            split_tiles(&mut o, hq * dv, &tl)
                .into_iter()
                .zip(split_tiles(&mut lse, hq, &tl)),
        )
        .collect();
    #[derive(Default)]
    struct Scr {
        q: Vec<f32>,
        s: Vec<f32>,
        m: Vec<f32>,
        l: Vec<f32>,
        o: Vec<f32>,
        vis: Vec<usize>,
    }
    parts
        .into_par_iter()
        .for_each_init(Scr::default, |scr, ((b, t0, t1), (out, lout))| {
            let s0 = cu[b];
            let rows = (t1 - t0) * gs;
            for g in 0..hkv {
                gather_rows(q, hq, gs, dk, s0, g, t0..t1, &mut scr.q, sh.scale());
                scr.m.clear();
                scr.m.resize(rows, f32::NEG_INFINITY);
                scr.l.clear();
                scr.l.resize(rows, 0.0);
                scr.o.clear();
                scr.o.resize(rows * dv, 0.0);
                let mut k0 = 0;
                while k0 < t1 {
                    let k1 = (k0 + KEY_BLOCK).min(t1);
                    scr.vis.clear();
                    for t in t0..t1 {
                        scr.vis
                            .extend(std::iter::repeat_n((t + 1).saturating_sub(k0), gs));
                    }
                    let mut st = Online {
                        m: &mut scr.m,
                        l: &mut scr.l,
                        o: &mut scr.o,
                    };
                    online_block(
                        MatRef::rows(&scr.q, rows, dk),
                        kv_rows(k, hkv, dk, g, s0 + k0, k1 - k0),
                        kv_rows(v, hkv, dv, g, s0 + k0, k1 - k0),
                        &scr.vis,
                        &mut scr.s,
                        &mut st,
                    );
                    k0 = k1;
                }
                for t in t0..t1 {
                    for hh in 0..gs {
                        let r = (t - t0) * gs + hh;
                        let h = (t - t0) * hq + g * gs + hh;
                        let inv = 1.0 / scr.l[r];
                        for (d, &x) in out[h * dv..(h + 1) * dv]
                            .iter_mut()
                            .zip(&scr.o[r * dv..(r + 1) * dv])
                        {
                            *d = x * inv;
                        }
                        lout[h] = scr.m[r] + scr.l[r].ln();
                    }
                }
            }
        });
    Ok((o, lse))
}

/// Causal backward from the forward's `o` and `lse`: `(dq, dk, dv)`. Deterministic.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    sh: &DenseShape,
    cu: &[usize],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let n = check(sh, cu, q, k, v)?;
    let (hq, hkv, gs, dk, dv) = (sh.heads, sh.kv_heads, sh.g(), sh.dk, sh.dv);
    check_len("o", o.len(), &[n, hq, dv])?;
    check_len("d_o", d_o.len(), &[n, hq, dv])?;
    check_len("lse", lse.len(), &[n, hq])?;
    let scale = sh.scale();
    // delta = rowsum(dO * O)
    let delta: Vec<f32> = (0..n * hq)
        .into_par_iter()
        .map(|r| super::tile::dot(&d_o[r * dv..(r + 1) * dv], &o[r * dv..(r + 1) * dv]))
        .collect();
    #[derive(Default)]
    struct Scr {
        q: Vec<f32>,
        dob: Vec<f32>,
        lse: Vec<f32>,
        delta: Vec<f32>,
        s: Vec<f32>,
        dp: Vec<f32>,
        dq: Vec<f32>,
        ranges: Vec<(usize, usize)>,
    }
    let gather = |b: usize, g: usize, toks: std::ops::Range<usize>, scr: &mut Scr| {
        let s0 = cu[b];
        gather_rows(q, hq, gs, dk, s0, g, toks.clone(), &mut scr.q, scale);
        gather_rows(d_o, hq, gs, dv, s0, g, toks.clone(), &mut scr.dob, 1.0);
        gather_heads(lse, hq, gs, s0, g, toks.clone(), &mut scr.lse);
        gather_heads(&delta, hq, gs, s0, g, toks, &mut scr.delta);
    };
    // dq by query tiles, key blocks in order.
    let mut dq = vec![0.0f32; n * hq * dk];
    let tl = tiles(cu, sh.tile_tokens());
    let parts: Vec<_> = tl
        .iter()
        .copied()
        .zip(split_tiles(&mut dq, hq * dk, &tl))
        .collect();
    parts
        .into_par_iter()
        .for_each_init(Scr::default, |scr, ((b, t0, t1), out)| {
            let s0 = cu[b];
            let rows = (t1 - t0) * gs;
            for g in 0..hkv {
                gather(b, g, t0..t1, scr);
                ensure(&mut scr.dq, rows * dk);
                let mut k0 = 0;
                while k0 < t1 {
                    let k1 = (k0 + KEY_BLOCK).min(t1);
                    scr.ranges.clear();
                    for t in t0..t1 {
                        scr.ranges.extend(std::iter::repeat_n(
                            (0, (t + 1).saturating_sub(k0).min(k1 - k0)),
                            gs,
                        ));
                    }
                    let seg = Seg {
                        k: kv_rows(k, hkv, dk, g, s0 + k0, k1 - k0),
                        v: kv_rows(v, hkv, dv, g, s0 + k0, k1 - k0),
                    };
                    let beta = if k0 == 0 { 0.0 } else { 1.0 };
                    attend::backward_q(
                        MatRef::rows(&scr.q, rows, dk),
                        MatRef::rows(&scr.dob, rows, dv),
                        &[seg],
                        &scr.ranges,
                        &scr.lse,
                        &scr.delta,
                        scale,
                        &mut scr.s,
                        &mut scr.dp,
                        &mut scr.dq,
                        beta,
                    );
                    k0 = k1;
                }
                for t in t0..t1 {
                    let (r0, h0) = ((t - t0) * gs, (t - t0) * hq + g * gs);
                    out[h0 * dk..(h0 + gs) * dk].copy_from_slice(&scr.dq[r0 * dk..(r0 + gs) * dk]);
                }
            }
        });
    // dk, dv by key chunks; queries from the chunk's first key to the end.
    let mut dkh = vec![0.0f32; hkv * n * dk];
    let mut dvh = vec![0.0f32; hkv * n * dv];
    let tasks: Vec<_> = head_chunks(&mut dkh, hkv, cu, dk, KV_CHUNK)
        .into_iter()
        .zip(head_chunks(&mut dvh, hkv, cu, dv, KV_CHUNK))
        .collect();
    let tq = sh.tile_tokens();
    tasks
        .into_par_iter()
        .for_each_init(Scr::default, |scr, ((g, b, k0, dkp), (_, _, _, dvp))| {
            dkp.fill(0.0);
            dvp.fill(0.0);
            let s0 = cu[b];
            let len = cu[b + 1] - s0;
            let k1 = k0 + dkp.len() / dk;
            let seg = Seg {
                k: kv_rows(k, hkv, dk, g, s0 + k0, k1 - k0),
                v: kv_rows(v, hkv, dv, g, s0 + k0, k1 - k0),
            };
            let mut ta = k0;
            while ta < len {
                let tb = (ta + tq).min(len);
                gather(b, g, ta..tb, scr);
                scr.ranges.clear();
                for t in ta..tb {
                    scr.ranges
                        .extend(std::iter::repeat_n((0, (t + 1 - k0).min(k1 - k0)), gs));
                }
                let rows = (tb - ta) * gs;
                attend::backward_kv(
                    MatRef::rows(&scr.q, rows, dk),
                    MatRef::rows(&scr.dob, rows, dv),
                    seg,
                    &scr.ranges,
                    &scr.lse,
                    &scr.delta,
                    &mut scr.s,
                    &mut scr.dp,
                    dkp,
                    dvp,
                );
                ta = tb;
            }
        });
    Ok((
        dq,
        to_token_major(&dkh, hkv, n, dk),
        to_token_major(&dvh, hkv, n, dv),
    ))
}

/// One decode step: query `q` `[B, HQ, dk]` (one token per sequence) against each sequence's
/// cached keys/values (`k_cache[b]` `[len_b, HKV, dk]`, `v_cache[b]` `[len_b, HKV, dv]`, the
/// new token included). Returns `o` `[B, HQ, dv]`. Parallel over (sequence, group, key block);
/// the blocks' partial results are merged in key order (deterministic).
pub fn decode_step(
    sh: &DenseShape,
    q: &[f32],
    k_cache: &[&[f32]],
    v_cache: &[&[f32]],
) -> Result<Vec<f32>> {
    sh.validate()?;
    let (hq, hkv, gs, dk, dv) = (sh.heads, sh.kv_heads, sh.g(), sh.dk, sh.dv);
    let bsz = k_cache.len();
    check_len("q", q.len(), &[bsz, hq, dk])?;
    if v_cache.len() != bsz {
        return Err(NsaError::Decode(format!(
            "{} key caches but {} value caches",
            bsz,
            v_cache.len()
        )));
    }
    let mut lens = Vec::with_capacity(bsz);
    for (b, (kc, vc)) in k_cache.iter().zip(v_cache).enumerate() {
        let len = kc.len() / (hkv * dk);
        check_len(&format!("k_cache[{b}]"), kc.len(), &[len, hkv, dk])?;
        check_len(&format!("v_cache[{b}]"), vc.len(), &[len, hkv, dv])?;
        if len == 0 {
            return Err(NsaError::EmptySequence(format!(
                "decode cache {b} is empty"
            )));
        }
        lens.push(len);
    }
    // Partial (m, l, o) of each (b, g, block).
    let mut jobs: Vec<(usize, usize, usize)> = Vec::new();
    for (b, &len) in lens.iter().enumerate() {
        for g in 0..hkv {
            jobs.extend((0..len.div_ceil(KEY_BLOCK)).map(|c| (b, g, c)));
        }
    }
    let scale = sh.scale();
    let partials: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = jobs
        .par_iter()
        .map_init(Vec::new, |s, &(b, g, c)| {
            let qs: Vec<f32> = q[(b * hq + g * gs) * dk..(b * hq + (g + 1) * gs) * dk]
                .iter()
                .map(|&x| x * scale)
                .collect();
            let (k0, k1) = (c * KEY_BLOCK, ((c + 1) * KEY_BLOCK).min(lens[b]));
            let (mut m, mut l, mut o) = (
                vec![f32::NEG_INFINITY; gs],
                vec![0.0f32; gs],
                vec![0.0f32; gs * dv],
            );
            let vis = vec![k1 - k0; gs];
            let mut st = Online {
                m: &mut m,
                l: &mut l,
                o: &mut o,
            };
            online_block(
                MatRef::rows(&qs, gs, dk),
                kv_rows(k_cache[b], hkv, dk, g, k0, k1 - k0),
                kv_rows(v_cache[b], hkv, dv, g, k0, k1 - k0),
                &vis,
                s,
                &mut st,
            );
            (m, l, o)
        })
        .collect();
    let mut out = vec![0.0f32; bsz * hq * dv];
    let mut at = 0;
    for b in 0..bsz {
        for g in 0..hkv {
            let nb = lens[b].div_ceil(KEY_BLOCK);
            let group = &partials[at..at + nb];
            at += nb;
            for hh in 0..gs {
                let m = group
                    .iter()
                    .map(|p| p.0[hh])
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut l = 0.0f32;
                let dst = &mut out[(b * hq + g * gs + hh) * dv..][..dv];
                dst.fill(0.0);
                for p in group {
                    let a = exp1(p.0[hh] - m);
                    l += a * p.1[hh];
                    for (d, &x) in dst.iter_mut().zip(&p.2[hh * dv..(hh + 1) * dv]) {
                        *d += a * x;
                    }
                }
                dst.iter_mut().for_each(|x| *x /= l);
            }
        }
    }
    Ok(out)
}
