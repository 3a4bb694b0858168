//! Prefill-then-decode replay: runs a batch through a decode cache exactly as a server would
//! (prompt of `P` tokens per sequence, then one token at a time) and reassembles the rows in
//! the forward's layout, so that `forward == replay` can be checked (SPEC.md, "Decoding").

use crate::cache::DecodeCache;
use crate::config::NsaConfig;
use crate::error::Result;
use crate::inputs::{NsaInputs, NsaOutput};

/// Prefills tokens `[0, min(prefill, len))` of every sequence, then decodes the rest one token
/// per step. While every sequence still has tokens, a step is one batched `step` call; once
/// some have run out, the others advance through one-token `prefill` calls (same rows).
pub fn replay<T, P, S>(
    cfg: &NsaConfig,
    x: &NsaInputs<T>,
    prefill_len: usize,
    prefill: P,
    step: S,
) -> Result<NsaOutput<T>>
where
    T: Copy + Default,
    P: Fn(&NsaConfig, &mut DecodeCache<T>, usize, &NsaInputs<T>) -> Result<NsaOutput<T>>,
    S: Fn(&NsaConfig, &mut DecodeCache<T>, &NsaInputs<T>) -> Result<NsaOutput<T>>,
{
    x.validate(cfg)?;
    let (hq, hkv, n, dv) = (cfg.heads, cfg.kv_heads, cfg.sel_count, x.dv);
    let batch = x.num_seqs();
    let mut cache = DecodeCache::new(cfg, batch, x.dk, x.dv)?;
    let mut out = NsaOutput {
        o: vec![T::default(); x.num_tokens() * hq * dv],
        sel_idx: vec![-1; x.num_tokens() * hkv * n],
    };
    let mut put = |rows: &[usize], part: &NsaOutput<T>| {
        for (i, &r) in rows.iter().enumerate() {
            out.o[r * hq * dv..(r + 1) * hq * dv]
                .copy_from_slice(&part.o[i * hq * dv..(i + 1) * hq * dv]);
            out.sel_idx[r * hkv * n..(r + 1) * hkv * n]
                .copy_from_slice(&part.sel_idx[i * hkv * n..(i + 1) * hkv * n]);
        }
    };
    // Prompt.
    for b in 0..batch {
        let r = x.seq_range(b);
        let p = prefill_len.min(r.len());
        if p > 0 {
            let rows: Vec<usize> = (r.start..r.start + p).collect();
            put(
                &rows,
                &prefill(cfg, &mut cache, b, &x.gather(&rows, vec![0, p]))?,
            );
        }
    }
    // Generation, one token per sequence per step.
    let longest = (0..batch).map(|b| x.seq_range(b).len()).max().unwrap_or(0);
    for pos in prefill_len..longest {
        let active: Vec<usize> = (0..batch).filter(|&b| x.seq_range(b).len() > pos).collect();
        let rows: Vec<usize> = active.iter().map(|&b| x.seq_range(b).start + pos).collect();
        if active.len() == batch {
            let one_each = (0..=batch).collect();
            put(&rows, &step(cfg, &mut cache, &x.gather(&rows, one_each))?);
        } else {
            for (&b, &r) in active.iter().zip(&rows) {
                put(
                    &[r],
                    &prefill(cfg, &mut cache, b, &x.gather(&[r], vec![0, 1]))?,
                );
            }
        }
    }
    Ok(out)
}
