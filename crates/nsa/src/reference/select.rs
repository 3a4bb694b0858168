//! Selection branch (SPEC.md, "Selection branch"): block importance from the compressed
//! attention probabilities (paper Eq. 8-10), the group's shared top-n choice with the forced
//! blocks, and the token list the selected attention reads.

use crate::blocks;
use crate::config::NsaConfig;

/// Eq. 9 for one head: `p_slc[j] = sum_i p_cmp[i] * |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d`
/// for every admissible block `j < sel_admissible(t)`. `p_cmp[i]` is the probability of
/// compressed token `i` (`i < cmp_visible(t)`); every visible compressed block lies inside
/// `[0, t]`, so it only overlaps admissible selection blocks.
pub fn head_scores(cfg: &NsaConfig, t: usize, p_cmp: &[f64]) -> Vec<f64> {
    let nblk = blocks::sel_admissible(t, cfg.sel_block);
    (0..nblk)
        .map(|j| {
            p_cmp
                .iter()
                .enumerate()
                .map(|(i, &p)| p * blocks::overlap_weight(i, j, cfg) as f64)
                .sum()
        })
        .collect()
}

/// Eq. 10: the group's importance is the sum over its `G` heads of [`head_scores`].
pub fn group_scores(cfg: &NsaConfig, t: usize, p_cmp_heads: &[&[f64]]) -> Vec<f64> {
    let mut p = vec![0.0; blocks::sel_admissible(t, cfg.sel_block)];
    for p_cmp in p_cmp_heads {
        for (acc, s) in p.iter_mut().zip(head_scores(cfg, t, p_cmp)) {
            *acc += s;
        }
    }
    p
}

/// The selected blocks of the query at `t` given the group scores over the admissible blocks:
/// the forced blocks, then the `n - |forced|` highest-scoring other blocks (ties to the lower
/// index), returned ascending. With `n` or fewer admissible blocks all are selected.
pub fn top_n(cfg: &NsaConfig, t: usize, scores: &[f64]) -> Vec<usize> {
    let forced = blocks::forced_blocks(t, cfg);
    let mut free: Vec<usize> = (0..scores.len()).filter(|j| !forced.contains(j)).collect();
    // Descending score; equal scores keep ascending index (stable sort + explicit tiebreak).
    free.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let slots = cfg.sel_count.saturating_sub(forced.len());
    let mut out = forced;
    out.extend(free.into_iter().take(slots));
    out.sort_unstable();
    out
}

/// `[n]` row of `sel_idx`: the blocks ascending, padded with -1.
pub fn padded(cfg: &NsaConfig, sel: &[usize]) -> Vec<i32> {
    let mut row = vec![-1i32; cfg.sel_count];
    for (r, &j) in row.iter_mut().zip(sel) {
        *r = j as i32;
    }
    row
}

/// The tokens the selected attention of the query at `t` reads: every `s <= t` of the
/// selected blocks, ascending (token-level causal mask inside the query's own block).
pub fn selected_keys(cfg: &NsaConfig, t: usize, sel: &[usize]) -> Vec<usize> {
    let lp = cfg.sel_block;
    sel.iter()
        .flat_map(|&j| (j * lp)..((j + 1) * lp).min(t + 1))
        .collect()
}
