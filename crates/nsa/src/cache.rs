//! Decoding cache: the per-sequence state that lets a new token be attended to without
//! re-reading or re-compressing the past (SPEC.md, "Decoding").
//!
//! One [`SeqCache`] holds, for one sequence:
//!
//! - the raw K/V of the **selection** and **window** branches, every token so far
//!   (`[len, HKV, D]`, token-major like [`NsaInputs`]);
//! - a **rolling buffer** of the last `l` raw K/V tokens of the **compression** branch
//!   (`[l, HKV, D]`, slot `pos % l`);
//! - the **compressed** K/V made so far (`[num_cmp, HKV, D]`).
//!
//! When appending token `t` completes a compression block (`t >= l - 1` and
//! `(t + 1 - l) % d == 0`, i.e. block `i = (t + 1 - l) / d` ends at `t`), one compressed key and
//! value are computed by `phi` from the last `l` raw tokens held in the rolling buffer and
//! appended; earlier compressed tokens are never recomputed. The number of compressed tokens
//! after `len` tokens is therefore always [`blocks::cmp_blocks_in`]`(len, l, d)`.
//!
//! The storage is generic over the element type (`T: Copy + Default`): the float64 reference
//! (`reference::decode`) and the fast f32 CPU path share it, each supplying its own `phi`
//! through the small [`BlockCompressor`] trait (any `Fn(KvPart, usize, &[T], &mut [T])`
//! closure implements it). This module does no attention math at all.
//!
//! Choice (not fixed by SPEC.md): the window branch keeps every raw token like the selection
//! branch, rather than a ring of the last `w`. It keeps the cache one simple append-only
//! layout; keys older than `t - w + 1` are simply never read.

use crate::blocks;
use crate::config::NsaConfig;
use crate::error::{NsaError, Result};
use crate::inputs::{NsaInputs, PhiParams};

/// Which of the two `phi` functions a compression is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPart {
    /// The key `phi` (`D = dk`).
    Key,
    /// The value `phi` (`D = dv`).
    Value,
}

/// Computes one compressed token (`phi`) from the `l` raw tokens of one block of one KV head.
///
/// `block` is `[l, D]` token-major: element (token `r`, dim `c`) is `block[r * D + c]`, the
/// same flatten order as `PhiWeights`. `out` has `D` elements and must be fully written.
pub trait BlockCompressor<T> {
    fn compress(&self, part: KvPart, kv_head: usize, block: &[T], out: &mut [T]);
}

impl<T, F> BlockCompressor<T> for F
where
    F: Fn(KvPart, usize, &[T], &mut [T]),
{
    fn compress(&self, part: KvPart, kv_head: usize, block: &[T], out: &mut [T]) {
        self(part, kv_head, block, out)
    }
}

/// The raw K/V of one new token for every branch, each `[HKV, D]` (D = `dk` for keys, `dv`
/// for values).
#[derive(Debug, Clone, Copy)]
pub struct TokenKv<'a, T> {
    pub k_cmp: &'a [T],
    pub v_cmp: &'a [T],
    pub k_slc: &'a [T],
    pub v_slc: &'a [T],
    pub k_win: &'a [T],
    pub v_win: &'a [T],
}

impl<'a, T: Copy> TokenKv<'a, T> {
    /// The K/V rows of packed token `i` (index into the whole batch) of `x`.
    /// Panics if `i` is out of range; call `x.validate(cfg)` first.
    pub fn from_inputs(x: &'a NsaInputs<T>, kv_heads: usize, i: usize) -> Self {
        let (rk, rv) = (kv_heads * x.dk, kv_heads * x.dv);
        TokenKv {
            k_cmp: &x.k_cmp[i * rk..(i + 1) * rk],
            v_cmp: &x.v_cmp[i * rv..(i + 1) * rv],
            k_slc: &x.k_slc[i * rk..(i + 1) * rk],
            v_slc: &x.v_slc[i * rv..(i + 1) * rv],
            k_win: &x.k_win[i * rk..(i + 1) * rk],
            v_win: &x.v_win[i * rv..(i + 1) * rv],
        }
    }
}

/// The decoding state of one sequence (see the module documentation for the layout).
#[derive(Debug, Clone, PartialEq)]
pub struct SeqCache<T> {
    hkv: usize,
    dk: usize,
    dv: usize,
    cmp_block: usize,
    cmp_stride: usize,
    len: usize,
    k_slc: Vec<T>,
    v_slc: Vec<T>,
    k_win: Vec<T>,
    v_win: Vec<T>,
    /// `[l, HKV, dk]`: raw compression-branch keys of tokens `len-l .. len`, slot `pos % l`.
    ring_k: Vec<T>,
    /// `[l, HKV, dv]`
    ring_v: Vec<T>,
    /// `[num_cmp, HKV, dk]` compressed keys.
    k_cmp: Vec<T>,
    /// `[num_cmp, HKV, dv]` compressed values.
    v_cmp: Vec<T>,
    /// Scratch for gathering one block of one head, `[l, max(dk, dv)]`.
    scratch: Vec<T>,
}

impl<T: Copy + Default> SeqCache<T> {
    /// An empty cache for one sequence.
    pub fn new(cfg: &NsaConfig, dk: usize, dv: usize) -> Result<Self> {
        cfg.validate()?;
        cfg.validate_dims(dk, dv)?;
        let (hkv, l) = (cfg.kv_heads, cfg.cmp_block);
        Ok(SeqCache {
            hkv,
            dk,
            dv,
            cmp_block: l,
            cmp_stride: cfg.cmp_stride,
            len: 0,
            k_slc: Vec::new(),
            v_slc: Vec::new(),
            k_win: Vec::new(),
            v_win: Vec::new(),
            ring_k: vec![T::default(); l * hkv * dk],
            ring_v: vec![T::default(); l * hkv * dv],
            k_cmp: Vec::new(),
            v_cmp: Vec::new(),
            scratch: vec![T::default(); l * dk.max(dv)],
        })
    }

    /// Reserves room for `additional` more tokens (avoids reallocations while decoding).
    pub fn reserve(&mut self, additional: usize) {
        let (rk, rv) = (self.hkv * self.dk, self.hkv * self.dv);
        self.k_slc.reserve(additional * rk);
        self.v_slc.reserve(additional * rv);
        self.k_win.reserve(additional * rk);
        self.v_win.reserve(additional * rv);
        let more_cmp = additional / self.cmp_stride + 1;
        self.k_cmp.reserve(more_cmp * rk);
        self.v_cmp.reserve(more_cmp * rv);
    }

    /// Appends one token. When it completes a compression block, one compressed K and V are
    /// computed from the last `l` raw tokens by `phi` and appended. Returns whether that
    /// happened. Errors (`NsaError::Decode`) if a row has the wrong length; then nothing changes.
    pub fn append(&mut self, tok: TokenKv<'_, T>, phi: &impl BlockCompressor<T>) -> Result<bool> {
        let (rk, rv) = (self.hkv * self.dk, self.hkv * self.dv);
        for (name, got, want) in [
            ("k_cmp", tok.k_cmp.len(), rk),
            ("v_cmp", tok.v_cmp.len(), rv),
            ("k_slc", tok.k_slc.len(), rk),
            ("v_slc", tok.v_slc.len(), rv),
            ("k_win", tok.k_win.len(), rk),
            ("v_win", tok.v_win.len(), rv),
        ] {
            if got != want {
                return Err(NsaError::Decode(format!(
                    "token row `{name}` has {got} elements, the cache expects {want} (HKV x D)"
                )));
            }
        }
        let t = self.len;
        self.k_slc.extend_from_slice(tok.k_slc);
        self.v_slc.extend_from_slice(tok.v_slc);
        self.k_win.extend_from_slice(tok.k_win);
        self.v_win.extend_from_slice(tok.v_win);
        let slot = t % self.cmp_block;
        self.ring_k[slot * rk..(slot + 1) * rk].copy_from_slice(tok.k_cmp);
        self.ring_v[slot * rv..(slot + 1) * rv].copy_from_slice(tok.v_cmp);
        self.len = t + 1;

        let completes =
            t + 1 >= self.cmp_block && (t + 1 - self.cmp_block).is_multiple_of(self.cmp_stride);
        if completes {
            self.compress_last_block(KvPart::Key, phi);
            self.compress_last_block(KvPart::Value, phi);
            debug_assert_eq!(
                self.num_cmp(),
                blocks::cmp_blocks_in(self.len, self.cmp_block, self.cmp_stride)
            );
        }
        Ok(completes)
    }

    /// Compresses tokens `len-l .. len` (all in the ring) for every KV head and appends them.
    fn compress_last_block(&mut self, part: KvPart, phi: &impl BlockCompressor<T>) {
        let (l, hkv) = (self.cmp_block, self.hkv);
        let (ring, dim) = match part {
            KvPart::Key => (&self.ring_k, self.dk),
            KvPart::Value => (&self.ring_v, self.dv),
        };
        let first = self.len - l;
        let mut row = vec![T::default(); hkv * dim];
        for h in 0..hkv {
            // Gather the block of head h in token order: token first + r lives in slot (first + r) % l.
            for r in 0..l {
                let slot = (first + r) % l;
                let src = &ring[(slot * hkv + h) * dim..(slot * hkv + h + 1) * dim];
                self.scratch[r * dim..(r + 1) * dim].copy_from_slice(src);
            }
            phi.compress(
                part,
                h,
                &self.scratch[..l * dim],
                &mut row[h * dim..(h + 1) * dim],
            );
        }
        match part {
            KvPart::Key => self.k_cmp.extend_from_slice(&row),
            KvPart::Value => self.v_cmp.extend_from_slice(&row),
        }
    }

    /// Tokens appended so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Compressed tokens made so far (`cmp_blocks_in(len, l, d)`).
    pub fn num_cmp(&self) -> usize {
        self.k_cmp.len() / (self.hkv * self.dk)
    }

    /// KV heads.
    pub fn kv_heads(&self) -> usize {
        self.hkv
    }

    /// Key head dimension.
    pub fn dk(&self) -> usize {
        self.dk
    }

    /// Value head dimension.
    pub fn dv(&self) -> usize {
        self.dv
    }

    /// Compression block length `l` the cache was made for.
    pub fn cmp_block(&self) -> usize {
        self.cmp_block
    }

    /// Compression stride `d` the cache was made for.
    pub fn cmp_stride(&self) -> usize {
        self.cmp_stride
    }

    /// `[len, HKV, dk]` raw keys of the selection branch.
    pub fn k_slc(&self) -> &[T] {
        &self.k_slc
    }

    /// `[len, HKV, dv]` raw values of the selection branch.
    pub fn v_slc(&self) -> &[T] {
        &self.v_slc
    }

    /// `[len, HKV, dk]` raw keys of the window branch.
    pub fn k_win(&self) -> &[T] {
        &self.k_win
    }

    /// `[len, HKV, dv]` raw values of the window branch.
    pub fn v_win(&self) -> &[T] {
        &self.v_win
    }

    /// `[num_cmp, HKV, dk]` compressed keys (after `phi`).
    pub fn k_cmp(&self) -> &[T] {
        &self.k_cmp
    }

    /// `[num_cmp, HKV, dv]` compressed values (after `phi`).
    pub fn v_cmp(&self) -> &[T] {
        &self.v_cmp
    }
}

/// The caches of a batch of sequences, which may have different lengths.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeCache<T> {
    /// One cache per sequence; `seqs[b]` is sequence `b`.
    pub seqs: Vec<SeqCache<T>>,
    dk: usize,
    dv: usize,
}

impl<T: Copy + Default> DecodeCache<T> {
    /// `batch` empty sequences.
    pub fn new(cfg: &NsaConfig, batch: usize, dk: usize, dv: usize) -> Result<Self> {
        if batch == 0 {
            return Err(NsaError::ZeroSize("decode batch"));
        }
        let one = SeqCache::new(cfg, dk, dv)?;
        Ok(DecodeCache {
            seqs: vec![one; batch],
            dk,
            dv,
        })
    }

    /// Number of sequences `B`.
    pub fn batch(&self) -> usize {
        self.seqs.len()
    }

    /// Key head dimension.
    pub fn dk(&self) -> usize {
        self.dk
    }

    /// Value head dimension.
    pub fn dv(&self) -> usize {
        self.dv
    }

    /// Current length of every sequence.
    pub fn lens(&self) -> Vec<usize> {
        self.seqs.iter().map(|s| s.len()).collect()
    }

    /// Checks the arguments of a prefill of sequence `b` (SPEC.md "Decoding"): valid inputs and
    /// phi, the cache's dims, exactly one sequence in `x`, `b` in range.
    pub fn check_prefill(
        &self,
        cfg: &NsaConfig,
        b: usize,
        x: &NsaInputs<T>,
        phi: &PhiParams<T>,
    ) -> Result<()> {
        self.check_call(cfg, x, phi)?;
        if x.num_seqs() != 1 {
            return Err(NsaError::Decode(format!(
                "prefill takes one sequence, got {}",
                x.num_seqs()
            )));
        }
        if b >= self.batch() {
            return Err(NsaError::Decode(format!(
                "sequence {b} out of range: the cache holds {}",
                self.batch()
            )));
        }
        Ok(())
    }

    /// Checks the arguments of a decode step: valid inputs and phi, the cache's dims, and one
    /// token for each cached sequence (`cu_seqlens = [0, 1, .., B]`).
    pub fn check_step(&self, cfg: &NsaConfig, x: &NsaInputs<T>, phi: &PhiParams<T>) -> Result<()> {
        self.check_call(cfg, x, phi)?;
        let batch = self.batch();
        if !x.cu_seqlens.iter().copied().eq(0..=batch) {
            return Err(NsaError::Decode(format!(
                "a step takes one token for each of the {batch} cached sequences \
                 (cu_seqlens [0, 1, .., {batch}]), got cu_seqlens {:?}",
                x.cu_seqlens
            )));
        }
        Ok(())
    }

    fn check_call(&self, cfg: &NsaConfig, x: &NsaInputs<T>, phi: &PhiParams<T>) -> Result<()> {
        x.validate(cfg)?;
        phi.validate(cfg, x.dk, x.dv)?;
        self.check_dims(cfg, x)
    }

    /// Checks that `x` has the cache's head dims and that `cfg` has its KV heads and
    /// compression geometry (errors are `NsaError::Decode`).
    pub fn check_dims(&self, cfg: &NsaConfig, x: &NsaInputs<T>) -> Result<()> {
        if x.dk != self.dk || x.dv != self.dv {
            return Err(NsaError::Decode(format!(
                "inputs have dk={}, dv={} but the cache was made for dk={}, dv={}",
                x.dk, x.dv, self.dk, self.dv
            )));
        }
        let hkv = self.seqs[0].kv_heads();
        if cfg.kv_heads != hkv {
            return Err(NsaError::Decode(format!(
                "config has {} KV heads but the cache was made for {hkv}",
                cfg.kv_heads
            )));
        }
        let s0 = &self.seqs[0];
        if (cfg.cmp_block, cfg.cmp_stride) != (s0.cmp_block(), s0.cmp_stride()) {
            return Err(NsaError::Decode(format!(
                "config has l={}, d={} but the cache was made for l={}, d={}",
                cfg.cmp_block,
                cfg.cmp_stride,
                s0.cmp_block(),
                s0.cmp_stride()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NsaConfig {
        NsaConfig::builder()
            .heads(2)
            .kv_heads(2)
            .cmp_block(4)
            .cmp_stride(2)
            .sel_block(8)
            .sel_count(3)
            .window(5)
            .build()
            .unwrap()
    }

    /// A `phi` that records the block it saw: sums token r with weight (r+1), per dim.
    fn weighted(_: KvPart, h: usize, block: &[f64], out: &mut [f64]) {
        let d = out.len();
        for (c, o) in out.iter_mut().enumerate() {
            *o = (0..block.len() / d)
                .map(|r| (r + 1) as f64 * block[r * d + c])
                .sum::<f64>()
                + 1000.0 * h as f64;
        }
    }

    #[test]
    fn compresses_each_completed_block_from_the_last_l_tokens() {
        let cfg = cfg();
        let (dk, dv, hkv) = (3, 2, 2);
        let mut c = SeqCache::<f64>::new(&cfg, dk, dv).unwrap();
        let val = |t: usize, h: usize, e: usize| (t * 100 + h * 10 + e) as f64;
        for t in 0..13 {
            let row =
                |d: usize| -> Vec<f64> { (0..hkv * d).map(|i| val(t, i / d, i % d)).collect() };
            let (rk, rv) = (row(dk), row(dv));
            let tok = TokenKv {
                k_cmp: &rk,
                v_cmp: &rv,
                k_slc: &rk,
                v_slc: &rv,
                k_win: &rk,
                v_win: &rv,
            };
            let made = c.append(tok, &weighted).unwrap();
            assert_eq!(made, t >= 3 && (t - 3) % 2 == 0, "t={t}");
            assert_eq!(c.num_cmp(), blocks::cmp_blocks_in(t + 1, 4, 2));
        }
        // Compressed block i covers tokens 2i .. 2i+4.
        for i in 0..c.num_cmp() {
            for h in 0..hkv {
                for e in 0..dk {
                    let want: f64 = (0..4)
                        .map(|r| (r + 1) as f64 * val(2 * i + r, h, e))
                        .sum::<f64>()
                        + 1000.0 * h as f64;
                    assert_eq!(c.k_cmp()[(i * hkv + h) * dk + e], want, "i={i} h={h} e={e}");
                }
            }
        }
        assert_eq!(c.len(), 13);
        assert_eq!(c.k_slc().len(), 13 * hkv * dk);
    }

    #[test]
    fn rejects_wrong_row_lengths() {
        let cfg = cfg();
        let mut c = SeqCache::<f32>::new(&cfg, 3, 2).unwrap();
        let k = vec![0.5f32; 6];
        let v = vec![0.5f32; 5];
        let tok = TokenKv {
            k_cmp: &k,
            v_cmp: &v,
            k_slc: &k,
            v_slc: &v,
            k_win: &k,
            v_win: &v,
        };
        let phi = |_: KvPart, _: usize, _: &[f32], out: &mut [f32]| out.fill(0.0);
        assert!(matches!(c.append(tok, &phi), Err(NsaError::Decode(_))));
        assert!(c.is_empty());
    }
}
