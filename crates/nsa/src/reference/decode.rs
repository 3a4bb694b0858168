//! Decoding with the reference (SPEC.md, "Decoding"): tokens are appended to a
//! [`DecodeCache`] and each new query reads the cache (raw selection/window K/V and the
//! incrementally compressed K/V), through the same [`row`] code as the forward. Row `t` of a
//! decode is therefore the same function as row `t` of a forward over the whole prefix; the
//! tests check that it is also the same number.

use super::phi::RefCompressor;
use super::row::{self, Dims, SeqKv};
use super::select;
use crate::cache::{DecodeCache, SeqCache, TokenKv};
use crate::config::NsaConfig;
use crate::error::Result;
use crate::inputs::{NsaInputs, NsaOutput, PhiParams};

/// The branches' view of one sequence's cache.
fn cache_kv(seq: &SeqCache<f64>) -> SeqKv<'_> {
    SeqKv {
        cmp_k: seq.k_cmp(),
        cmp_v: seq.v_cmp(),
        slc_k: seq.k_slc(),
        slc_v: seq.v_slc(),
        win_k: seq.k_win(),
        win_v: seq.v_win(),
    }
}

/// Output row of packed token `i` of `x`, which sits at position `t` of `seq` (already
/// appended), written into `out` at output row `o_row`.
fn emit_row(
    cfg: &NsaConfig,
    dims: &Dims,
    seq: &SeqCache<f64>,
    x: &NsaInputs<f64>,
    i: usize,
    t: usize,
    out: &mut NsaOutput<f64>,
    o_row: usize,
) {
    let (hq, hkv, n) = (dims.hq, dims.hkv, cfg.sel_count);
    let q_row = &x.q[i * hq * dims.dk..(i + 1) * hq * dims.dk];
    let r = row::row_forward(cfg, dims, t, q_row, &cache_kv(seq));
    let gates = [
        &x.g_cmp[i * hq..(i + 1) * hq],
        &x.g_slc[i * hq..(i + 1) * hq],
        &x.g_win[i * hq..(i + 1) * hq],
    ];
    let o = row::row_output(dims, &r, gates);
    out.o[o_row * hq * dims.dv..(o_row + 1) * hq * dims.dv].copy_from_slice(&o);
    for (g, chosen) in r.sel.iter().enumerate() {
        let at = (o_row * hkv + g) * n;
        out.sel_idx[at..at + n].copy_from_slice(&select::padded(cfg, chosen));
    }
}

/// Appends the tokens of `x` (exactly one sequence) to sequence `b` of the cache and returns
/// their output rows (`o` `[len, HQ, dv]`, `sel_idx` `[len, HKV, n]`). May be called several
/// times (chunked prefill) and between decode steps: the rows are those of a forward over the
/// whole prefix. Errors: `NsaError::Decode` for a batch index out of range, more than one
/// sequence in `x`, or dims that differ from the cache's; the usual validation errors for
/// malformed inputs. On error the cache is unchanged.
pub fn prefill(
    cfg: &NsaConfig,
    cache: &mut DecodeCache<f64>,
    b: usize,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
) -> Result<NsaOutput<f64>> {
    cache.check_prefill(cfg, b, x, phi)?;
    let dims = Dims::new(cfg, x.dk, x.dv);
    let comp = RefCompressor::new(phi, cfg.cmp_block, x.dk, x.dv);
    let len = x.num_tokens();
    let seq = &mut cache.seqs[b];
    let start = seq.len();
    seq.reserve(len);
    for i in 0..len {
        seq.append(TokenKv::from_inputs(x, dims.hkv, i), &comp)?;
    }
    let mut out = NsaOutput {
        o: vec![0.0; len * dims.hq * dims.dv],
        sel_idx: vec![-1; len * dims.hkv * cfg.sel_count],
    };
    for i in 0..len {
        emit_row(cfg, &dims, seq, x, i, start + i, &mut out, i);
    }
    Ok(out)
}

/// One decode step for the whole batch: `x` holds one token per sequence (`cu_seqlens =
/// [0, 1, .., B]`, `B` = the cache's batch); token `b` is appended to sequence `b` (which may
/// be empty or of any length) and the outputs `o` `[B, HQ, dv]`, `sel_idx` `[B, HKV, n]` are
/// returned. Errors: `NsaError::Decode` when the batch or the dims do not match the cache.
///
/// Every sequence advances by one token. To advance only some of them, call [`prefill`]
/// with a one-token input for each of those (it gives the same row).
pub fn step(
    cfg: &NsaConfig,
    cache: &mut DecodeCache<f64>,
    x: &NsaInputs<f64>,
    phi: &PhiParams<f64>,
) -> Result<NsaOutput<f64>> {
    cache.check_step(cfg, x, phi)?;
    let batch = cache.batch();
    let dims = Dims::new(cfg, x.dk, x.dv);
    let comp = RefCompressor::new(phi, cfg.cmp_block, x.dk, x.dv);
    let mut out = NsaOutput {
        o: vec![0.0; batch * dims.hq * dims.dv],
        sel_idx: vec![-1; batch * dims.hkv * cfg.sel_count],
    };
    for (b, seq) in cache.seqs.iter_mut().enumerate() {
        seq.append(TokenKv::from_inputs(x, dims.hkv, b), &comp)?;
        let t = seq.len() - 1;
        emit_row(cfg, &dims, seq, x, b, t, &mut out, b);
    }
    Ok(out)
}
