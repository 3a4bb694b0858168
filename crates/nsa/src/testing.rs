//! Comparison helpers used by the test suites (CPU and GPU), the demo and the CLI.

/// Relative RMS error `||got - want|| / ||want||` (SPEC.md, "Numerics"). Returns +inf when
/// any element of `got` is NaN, so a NaN never passes a threshold.
pub fn rel_rms<A: Copy + Into<f64>, B: Copy + Into<f64>>(got: &[A], want: &[B]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_rms: length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w): (f64, f64) = (g.into(), w.into());
        if g.is_nan() || w.is_nan() {
            return f64::INFINITY;
        }
        num += (g - w) * (g - w);
        den += w * w;
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

/// Largest absolute difference (NaN gives +inf).
pub fn max_abs<A: Copy + Into<f64>, B: Copy + Into<f64>>(got: &[A], want: &[B]) -> f64 {
    assert_eq!(got.len(), want.len(), "max_abs: length mismatch");
    got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| {
        let d = (g.into() - w.into()).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    })
}

/// Parses one `sel_idx` row: the valid entries (a prefix of non-negative indices, strictly
/// ascending, each `< admissible`) followed only by `-1`.
fn parse_sel_row(row: &[i32], admissible: usize) -> std::result::Result<Vec<usize>, String> {
    let valid = row.iter().take_while(|&&j| j >= 0).count();
    if let Some(bad) = row[valid..].iter().find(|&&j| j != -1) {
        return Err(format!("{row:?}: entry {bad} after the padding"));
    }
    let blocks: Vec<usize> = row[..valid].iter().map(|&j| j as usize).collect();
    if blocks.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("{row:?}: not strictly ascending"));
    }
    if let Some(j) = blocks.iter().find(|&&j| j >= admissible) {
        return Err(format!(
            "{row:?}: block {j} is not admissible ({admissible} are)"
        ));
    }
    Ok(blocks)
}

/// SPEC.md "Top-n is compared tie-aware": forced blocks must match exactly; a differing free
/// block is accepted only when its score equals (within 1e-5 relative) that of the block it
/// replaced. Returns `Err(description)` on the first violation.
///
/// `want`/`got` are `sel_idx` tensors `[N, HKV, n]`; `scores` are the reference group scores
/// `[N, HKV, max_blocks]` (`reference::selection_scores`). Both rows must also be well formed
/// (ascending, admissible, `-1`-padded) and hold the same number of blocks. The blocks only in
/// `want` and those only in `got` are paired after sorting each by score, and each pair must
/// satisfy `|a - b| <= 1e-5 * max(|a|, |b|)` (relative to the larger of the two scores).
pub fn check_selection_tie_aware(
    cfg: &crate::NsaConfig,
    cu_seqlens: &[usize],
    want: &[i32],
    got: &[i32],
    scores: &[f64],
    max_blocks: usize,
) -> std::result::Result<(), String> {
    selection_differences(cfg, cu_seqlens, want, got, scores, max_blocks, 1e-5).map(|_| ())
}

/// One `(token, group)` row whose selection differs from the reference only by near-ties.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionDiff {
    /// Packed token index (into the whole batch).
    pub token: usize,
    /// KV group.
    pub group: usize,
    /// The blocks of `got`, ascending.
    pub got: Vec<usize>,
    /// Largest relative score gap of a swapped pair in this row.
    pub rel_gap: f64,
}

/// [`check_selection_tie_aware`] with a chosen relative tolerance `rel_tol` (bf16 paths score
/// with rounded operands and need a looser one than SPEC.md's 1e-5 for f32); returns every row
/// that differs (all within the tolerance), or `Err` on the first violation.
pub fn selection_differences(
    cfg: &crate::NsaConfig,
    cu_seqlens: &[usize],
    want: &[i32],
    got: &[i32],
    scores: &[f64],
    max_blocks: usize,
    rel_tol: f64,
) -> std::result::Result<Vec<SelectionDiff>, String> {
    let (hkv, n) = (cfg.kv_heads, cfg.sel_count);
    let ntok = cu_seqlens.last().copied().unwrap_or(0);
    if want.len() != ntok * hkv * n || got.len() != want.len() {
        return Err(format!(
            "sel_idx sizes: want {}, got {}, expected {} = {ntok} x {hkv} x {n}",
            want.len(),
            got.len(),
            ntok * hkv * n
        ));
    }
    if scores.len() != ntok * hkv * max_blocks {
        return Err(format!(
            "scores size {} != {ntok} x {hkv} x {max_blocks}",
            scores.len()
        ));
    }
    let mut diffs = Vec::new();
    for (b, seq) in cu_seqlens.windows(2).enumerate() {
        for i in seq[0]..seq[1] {
            let t = i - seq[0];
            let admissible = crate::blocks::sel_admissible(t, cfg.sel_block).min(max_blocks);
            for g in 0..hkv {
                let at = (i * hkv + g) * n;
                let here = format!("sequence {b}, token {t}, group {g}");
                let w = parse_sel_row(&want[at..at + n], admissible)
                    .map_err(|e| format!("{here}: want {e}"))?;
                let gt = parse_sel_row(&got[at..at + n], admissible)
                    .map_err(|e| format!("{here}: got {e}"))?;
                if w.len() != gt.len() {
                    return Err(format!("{here}: want {w:?}, got {gt:?} (different counts)"));
                }
                for f in crate::blocks::forced_blocks(t, cfg) {
                    if !gt.contains(&f) {
                        return Err(format!("{here}: forced block {f} missing from {gt:?}"));
                    }
                }
                if w == gt {
                    continue;
                }
                let score = |j: usize| scores[(i * hkv + g) * max_blocks + j];
                let by_score = |mut v: Vec<usize>| {
                    v.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
                    v
                };
                let only_w = by_score(w.iter().copied().filter(|j| !gt.contains(j)).collect());
                let only_g = by_score(gt.iter().copied().filter(|j| !w.contains(j)).collect());
                let mut rel_gap = 0.0f64;
                for (&a, &c) in only_w.iter().zip(&only_g) {
                    let (sa, sc) = (score(a), score(c));
                    let gap = if sa == sc {
                        0.0
                    } else {
                        (sa - sc).abs() / sa.abs().max(sc.abs())
                    };
                    if gap.is_nan() || gap > rel_tol {
                        return Err(format!(
                            "{here}: got block {c} (score {sc}) instead of {a} (score {sa}); \
                             want {w:?}, got {gt:?}"
                        ));
                    }
                    rel_gap = rel_gap.max(gap);
                }
                diffs.push(SelectionDiff {
                    token: i,
                    group: g,
                    got: gt,
                    rel_gap,
                });
            }
        }
    }
    Ok(diffs)
}
