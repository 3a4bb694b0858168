//! Block index arithmetic of SPEC.md, shared by every backend.
//!
//! These are the few integer facts that define which keys a query sees; keeping them in one
//! place means the reference, the CPU path and the CUDA launch code agree by construction on
//! the *geometry*, while each computes the attention itself.

use crate::config::NsaConfig;

/// Number of compressed blocks visible to the query at position `t` (0-based).
///
/// Block `i` covers `[i*d, i*d + l)` and is visible iff `i*d + l - 1 <= t`, so the count is
/// `floor((t + 1 - l) / d) + 1` for `t >= l - 1` and 0 before.
pub fn cmp_visible(t: usize, cmp_block: usize, cmp_stride: usize) -> usize {
    if t + 1 < cmp_block {
        0
    } else {
        (t + 1 - cmp_block) / cmp_stride + 1
    }
}

/// Number of compressed blocks that exist in a sequence of `len` tokens
/// (the blocks visible to its last token).
pub fn cmp_blocks_in(len: usize, cmp_block: usize, cmp_stride: usize) -> usize {
    if len == 0 {
        0
    } else {
        cmp_visible(len - 1, cmp_block, cmp_stride)
    }
}

/// Number of selection blocks admissible for the query at `t`: blocks `j` with `j*l' <= t`.
pub fn sel_admissible(t: usize, sel_block: usize) -> usize {
    t / sel_block + 1
}

/// Overlap of compressed block `i` with selection block `j`, in units of the stride `d`
/// (SPEC.md, Eq. 9 read as overlap weights): `|[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d`.
pub fn overlap_weight(i: usize, j: usize, cfg: &NsaConfig) -> usize {
    let (a0, a1) = (i * cfg.cmp_stride, i * cfg.cmp_stride + cfg.cmp_block);
    let (b0, b1) = (j * cfg.sel_block, (j + 1) * cfg.sel_block);
    let lo = a0.max(b0);
    let hi = a1.min(b1);
    if hi > lo {
        (hi - lo) / cfg.cmp_stride
    } else {
        0
    }
}

/// Range of compressed block indices that can overlap selection block `j` (half-open).
pub fn cmp_range_of_sel_block(j: usize, cfg: &NsaConfig) -> std::ops::Range<usize> {
    // i*d + l > j*l'  <=>  i > (j*l' - l)/d ;  i*d < (j+1)*l'  <=>  i < (j+1)*l'/d
    let lo = (j * cfg.sel_block + cfg.cmp_stride).saturating_sub(cfg.cmp_block) / cfg.cmp_stride;
    let hi = (j + 1) * cfg.sel_block / cfg.cmp_stride;
    lo..hi
}

/// The forced selection blocks of the query at `t`, ascending and without duplicates:
/// `0 .. n_init` and the `n_local` blocks ending at the query's own block `floor(t / l')`,
/// each only if admissible.
pub fn forced_blocks(t: usize, cfg: &NsaConfig) -> Vec<usize> {
    let own = t / cfg.sel_block;
    let mut out: Vec<usize> = (0..cfg.init_blocks).filter(|&j| j <= own).collect();
    let first_local = (own + 1).saturating_sub(cfg.local_blocks);
    for j in first_local..=own {
        if cfg.local_blocks > 0 && !out.contains(&j) {
            out.push(j);
        }
    }
    out.sort_unstable();
    out
}

/// First key of the sliding window of the query at `t`: `max(0, t - w + 1)`.
pub fn window_start(t: usize, window: usize) -> usize {
    (t + 1).saturating_sub(window)
}

/// Keys the query at `t` attends in each branch: `[compressed tokens, selected tokens, window
/// tokens]`. The selected count assumes the query's own block is among the `n` chosen (it is
/// forced whenever `local_blocks >= 1`): all `t + 1` tokens while at most `n` blocks are
/// admissible, else `n - 1` full blocks plus the own block's `t % l' + 1` tokens. This is the
/// work the benchmarks' flop counts use.
pub fn keys_per_branch(t: usize, cfg: &NsaConfig) -> [usize; 3] {
    let sel = if sel_admissible(t, cfg.sel_block) <= cfg.sel_count {
        t + 1
    } else {
        (cfg.sel_count - 1) * cfg.sel_block + t % cfg.sel_block + 1
    };
    [
        cmp_visible(t, cfg.cmp_block, cfg.cmp_stride),
        sel,
        cfg.window.min(t + 1),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paper() -> NsaConfig {
        NsaConfig::default()
    }

    #[test]
    fn keys_per_branch_counts_the_keys_each_branch_reads() {
        let cfg = NsaConfig::builder()
            .heads(2)
            .kv_heads(1)
            .cmp_block(8)
            .cmp_stride(4)
            .sel_block(16)
            .sel_count(3)
            .window(20)
            .build()
            .unwrap();
        for t in 0..200 {
            // the n highest admissible blocks (the own block, forced, among them)
            let adm = sel_admissible(t, cfg.sel_block);
            let chosen = adm.saturating_sub(cfg.sel_count)..adm;
            let sel: usize = chosen
                .map(|j| (t + 1).min((j + 1) * cfg.sel_block) - j * cfg.sel_block)
                .sum();
            let cmp = (0..).take_while(|i| i * 4 + 8 <= t + 1).count();
            let win = (window_start(t, cfg.window)..=t).count();
            assert_eq!(keys_per_branch(t, &cfg), [cmp, sel, win], "t = {t}");
        }
    }

    #[test]
    fn eq9_overlap_weights_32_16_64() {
        // SPEC.md: for l=32, d=16, l'=64 the five compressed blocks 4j-1 .. 4j+3
        // weigh 1, 2, 2, 2, 1 into selection block j.
        let cfg = paper();
        for j in 1..6usize {
            let got: Vec<usize> = (4 * j - 1..=4 * j + 3)
                .map(|i| overlap_weight(i, j, &cfg))
                .collect();
            assert_eq!(got, vec![1, 2, 2, 2, 1], "selection block {j}");
            // and nothing outside that range touches block j
            assert_eq!(overlap_weight(4 * j - 2, j, &cfg), 0);
            assert_eq!(overlap_weight(4 * j + 4, j, &cfg), 0);
            assert_eq!(cmp_range_of_sel_block(j, &cfg), 4 * j - 1..4 * j + 4);
        }
        // block 0 has no left neighbour: blocks 0,1,2,3 weigh 2,2,2,1
        let got: Vec<usize> = (0..4).map(|i| overlap_weight(i, 0, &cfg)).collect();
        assert_eq!(got, vec![2, 2, 2, 1]);
        assert_eq!(cmp_range_of_sel_block(0, &cfg), 0..4);
    }

    #[test]
    fn overlap_range_matches_weights_for_other_geometries() {
        for (l, d, lp) in [
            (32, 16, 64),
            (64, 64, 64),
            (16, 8, 64),
            (32, 32, 32),
            (48, 16, 96),
        ] {
            let cfg = NsaConfig::builder()
                .cmp_block(l)
                .cmp_stride(d)
                .sel_block(lp)
                .build()
                .unwrap();
            for j in 0..5 {
                let r = cmp_range_of_sel_block(j, &cfg);
                for i in 0..(r.end + 8) {
                    let w = overlap_weight(i, j, &cfg);
                    assert_eq!(w > 0, r.contains(&i), "l={l} d={d} l'={lp} i={i} j={j}");
                }
            }
        }
    }

    #[test]
    fn visibility_edges() {
        let (l, d) = (32, 16);
        assert_eq!(cmp_visible(l - 2, l, d), 0);
        assert_eq!(cmp_visible(l - 1, l, d), 1);
        assert_eq!(cmp_visible(l, l, d), 1);
        assert_eq!(cmp_visible(l + d - 2, l, d), 1);
        assert_eq!(cmp_visible(l + d - 1, l, d), 2);
        assert_eq!(cmp_blocks_in(0, l, d), 0);
        assert_eq!(cmp_blocks_in(l, l, d), 1);
        // brute force against the definition
        for t in 0..200 {
            let brute = (0..200).filter(|i| i * d + l - 1 <= t).count();
            assert_eq!(cmp_visible(t, l, d), brute, "t={t}");
        }
    }

    #[test]
    fn forced_blocks_rules() {
        let cfg = paper(); // n_init 1, n_local 2, l' 64
        assert_eq!(forced_blocks(0, &cfg), vec![0]);
        assert_eq!(forced_blocks(63, &cfg), vec![0]);
        assert_eq!(forced_blocks(64, &cfg), vec![0, 1]);
        assert_eq!(forced_blocks(128, &cfg), vec![0, 1, 2]);
        assert_eq!(forced_blocks(64 * 10 + 5, &cfg), vec![0, 9, 10]);
        let none = NsaConfig::builder()
            .init_blocks(0)
            .local_blocks(0)
            .build()
            .unwrap();
        assert!(forced_blocks(500, &none).is_empty());
    }

    #[test]
    fn window_has_exactly_w_tokens() {
        assert_eq!(window_start(0, 512), 0);
        assert_eq!(window_start(511, 512), 0);
        assert_eq!(window_start(512, 512), 1);
        assert_eq!(window_start(1000, 512), 489);
        assert_eq!(1000 - window_start(1000, 512) + 1, 512);
    }
}
