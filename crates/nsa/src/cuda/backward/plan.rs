//! Host-built work lists of the backward kernels for one batch layout (`cu_seqlens`); every entry
//! is an `int4` the kernels read by block index. Token counts are checked to fit `i32` upstream.

use crate::blocks;
use crate::config::NsaConfig;

/// Rows per row-major CTA of the compressed and window dQ kernels (`BQ_ROWS` in the `.cu`).
pub const BQ_ROWS: usize = 64;
/// Keys per key tile (`KT`): the selection kernels' key-major CTAs and every row-major tile.
pub const KT: usize = 64;

/// The work lists (host side).
pub struct BwdPlan {
    /// `(start, len, t0, cstart)` per 64 / G positions (cmp_bwd_dq, win_bwd_dq).
    pub rows64: Vec<i32>,
    /// `(start, len, t0, 0)` per `sel_positions` positions (sel_bwd_dq).
    pub rows_sel: Vec<i32>,
    /// `(start, len, c0, cstart, p0, np, slot, 0)` per (key-major tile of compressed tokens,
    /// chunk of the positions that see them) (cmp_bwd_dkdv); slot -1: the tile's only chunk.
    pub cmp_kv: Vec<i32>,
    /// `(first compressed token, nk, first slot, chunks)` per tile cut into chunks (cmp_dkdv_reduce).
    pub cmp_reduce: Vec<i32>,
    /// Partial-sum slots of the compressed key tiles (each `HKV x km_keys` keys).
    pub cmp_slots: usize,
    /// `(start, len, k0, 0)` per key-major tile of raw tokens (win_bwd_dkdv).
    pub win_kv: Vec<i32>,
    /// `(start, len, cstart, first selection block)` per sequence.
    pub seqs: Vec<i32>,
    /// `(start, len, j, 0)` per selection block of the batch.
    pub blocks: Vec<i32>,
    /// Compressed tokens of the batch.
    pub n_cmp: usize,
    /// Selection blocks of the batch.
    pub n_blocks: usize,
}

/// Whether `sel_bwd_dq` runs its one-warp layout at group size `g` (kernels/sel_bwd.cu): by
/// default at G >= 16, at every G with `-DSEL_DQ_ONE_WARP`, at none with `-DSEL_DQ_PACKED`
/// (`NSA_CUDA_DEFINES`).
pub fn sel_one_warp(g: usize) -> bool {
    use crate::cuda::module::define_set;
    define_set("-DSEL_DQ_ONE_WARP") || (g >= 16 && !define_set("-DSEL_DQ_PACKED"))
}

/// Positions per CTA of `sel_bwd_dq` (`BS_P` in kernels/sel_bwd.cu): one warp's 16 rows
/// (`16 / G`, one position at G >= 16) in the one-warp layout ([`sel_one_warp`]), else the
/// forward's packing `min(32, R / G)` with `R = 64` (`-DSEL_DQ_ROWS=R` overrides).
pub fn sel_positions(g: usize) -> usize {
    use crate::cuda::module::define_value;
    sel_positions_of(
        g,
        sel_one_warp(g),
        define_value("SEL_DQ_ROWS").unwrap_or(64),
    )
}

/// [`sel_positions`] for an explicit layout (`one_warp`: see [`sel_one_warp`]; `rows`: the
/// rows aimed at by the packing, `SEL_DQ_ROWS`).
pub fn sel_positions_of(g: usize, one_warp: bool, rows: usize) -> usize {
    let g = g.max(1);
    match (one_warp, g) {
        (true, g) if g >= 16 => 1,
        (true, g) => 16 / g,
        (false, g) if g >= rows => 1,
        (false, g) => (rows / g).min(32),
    }
}

/// K/V tile buffers of `sel_bwd_dq` (`BS_STAGES`): one in the one-warp layout, else two when
/// dk + dv <= 256 (`-DSEL_DQ_STAGES=N` overrides).
pub fn sel_stages(g: usize, dk: usize, dv: usize) -> usize {
    sel_stages_of(
        dk,
        dv,
        sel_one_warp(g),
        crate::cuda::module::define_value("SEL_DQ_STAGES"),
    )
}

/// [`sel_stages`] for an explicit layout and `SEL_DQ_STAGES` override.
pub fn sel_stages_of(dk: usize, dv: usize, one_warp: bool, stages: Option<usize>) -> usize {
    match (one_warp, stages) {
        (true, _) => 1,
        (false, Some(s)) => s,
        (false, None) if dk + dv <= 256 => 2,
        (false, None) => 1,
    }
}

/// Builds the lists. `g` is the group size (<= 64); `km_keys` the keys per CTA of the compressed
/// and window key-major kernels (`BW_KM_KEYS`: 64, or 128 with two key warpgroups).
pub fn build(cfg: &NsaConfig, cu: &[usize], km_keys: usize) -> BwdPlan {
    let g = cfg.group_size();
    let (l, d, lp) = (cfg.cmp_block, cfg.cmp_stride, cfg.sel_block);
    let p64 = BQ_ROWS / g;
    let psel = sel_positions(g);
    let mut p = BwdPlan {
        rows64: Vec::new(),
        rows_sel: Vec::new(),
        cmp_kv: Vec::new(),
        cmp_reduce: Vec::new(),
        cmp_slots: 0,
        win_kv: Vec::new(),
        seqs: Vec::new(),
        blocks: Vec::new(),
        n_cmp: 0,
        n_blocks: 0,
    };
    for w in cu.windows(2) {
        let (start, len) = (w[0], w[1] - w[0]);
        let ncmp = blocks::cmp_blocks_in(len, l, d);
        let nb = len.div_ceil(lp);
        let cstart = p.n_cmp;
        p.seqs
            .extend([start, len, cstart, p.n_blocks].map(|v| v as i32));
        // heavy tiles (late positions: more keys) first
        for t0 in (0..len).step_by(p64).rev() {
            p.rows64.extend([start, len, t0, cstart].map(|v| v as i32));
        }
        for t0 in (0..len).step_by(psel).rev() {
            p.rows_sel.extend([start, len, t0, 0].map(|v| v as i32));
        }
        // A compressed key tile [c0, c0 + km_keys) is seen by the positions t >= c0*d + l - 1: cut
        // them into chunks of max(16384 / G, len / 8) positions (at most 8 per tile, so the
        // partial sums stay O(T)); early tiles (most positions) first.
        let chunk = (16384 / g).max(len.div_ceil(8)).max(1);
        for c0 in (0..ncmp).step_by(km_keys) {
            let npos = len.saturating_sub(c0 * d + l - 1);
            let nchunks = npos.div_ceil(chunk).max(1);
            let nk = km_keys.min(ncmp - c0);
            if nchunks > 1 {
                p.cmp_reduce
                    .extend([cstart + c0, nk, p.cmp_slots, nchunks].map(|v| v as i32));
            }
            for k in 0..nchunks {
                let p0 = k * chunk;
                let np = chunk.min(npos - p0.min(npos));
                let slot = if nchunks > 1 {
                    (p.cmp_slots + k) as i32
                } else {
                    -1
                };
                p.cmp_kv
                    .extend([start, len, c0, cstart, p0, np].map(|v| v as i32));
                p.cmp_kv.extend([slot, 0]);
            }
            if nchunks > 1 {
                p.cmp_slots += nchunks;
            }
        }
        for k0 in (0..len).step_by(km_keys) {
            p.win_kv.extend([start, len, k0, 0].map(|v| v as i32));
        }
        for j in 0..nb {
            p.blocks.extend([start, len, j, 0].map(|v| v as i32));
        }
        p.n_cmp += ncmp;
        p.n_blocks += nb;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sel_positions_fill_at_most_four_warps_and_one_lane_each() {
        for g in 1..=64usize {
            for one_warp in [false, true] {
                let p = sel_positions_of(g, one_warp, 64);
                // the union merge holds one position per lane, `chose` is a 32-bit mask
                assert!((1..=32).contains(&p), "G {g}: {p} positions");
                let warps = (p * g).div_ceil(16);
                if one_warp {
                    assert!(
                        p * g <= 16 || p == 1,
                        "G {g}: one-warp layout has {p} positions"
                    );
                } else {
                    assert!(warps <= 4, "G {g}: {warps} warps");
                    // as many positions as fit 64 rows (or 32 positions)
                    assert!(p == 32 || (p + 1) * g > 64, "G {g}: only {p} positions");
                }
            }
        }
        assert_eq!(sel_positions_of(16, false, 64), 4);
        assert_eq!(sel_positions_of(16, true, 64), 1);
        assert_eq!(sel_positions_of(1, false, 64), 32);
        assert_eq!(sel_positions_of(64, false, 64), 1);
        // SEL_DQ_ROWS = 32: two warps
        assert_eq!(sel_positions_of(16, false, 32), 2);
        assert_eq!(sel_positions_of(32, false, 32), 1);
        assert_eq!(sel_positions_of(64, false, 32), 1);
    }

    #[test]
    fn sel_stages_follow_the_row_kernels_rule() {
        assert_eq!(sel_stages_of(128, 128, false, None), 2);
        assert_eq!(sel_stages_of(192, 128, false, None), 1);
        assert_eq!(sel_stages_of(192, 128, false, Some(2)), 2);
        assert_eq!(sel_stages_of(128, 128, true, Some(2)), 1);
    }

    #[test]
    fn sel_rows_cover_every_position_once() {
        // varlen batch at several group sizes: the items step by sel_positions within each
        // sequence, heavy (late) ones first, and together hold every position exactly once
        for (hq, hkv) in [(64, 4), (16, 2), (8, 8), (64, 1), (12, 4)] {
            let cfg = NsaConfig::builder()
                .heads(hq)
                .kv_heads(hkv)
                .build()
                .unwrap();
            let cu = [0usize, 37, 38, 300, 1301];
            let p = build(&cfg, &cu, 64);
            let psel = sel_positions(cfg.group_size());
            let mut seen = vec![0u32; *cu.last().unwrap()];
            for it in p.rows_sel.chunks(4) {
                let (start, len, t0) = (it[0] as usize, it[1] as usize, it[2] as usize);
                assert_eq!(t0 % psel, 0);
                for t in t0..(t0 + psel).min(len) {
                    seen[start + t] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "HQ {hq} HKV {hkv}");
        }
    }

    #[test]
    fn key_major_tiles_cover_every_key_and_position_once() {
        // varlen batch, both tile widths: the compressed tiles (chunked) see every (compressed
        // token, position that sees it) pair exactly once, the window tiles every raw token once,
        // and the partial slots of chunked tiles are numbered without gaps
        let cfg = NsaConfig::builder().heads(64).kv_heads(4).build().unwrap();
        let (l, d) = (cfg.cmp_block, cfg.cmp_stride);
        let cu = [0usize, 37, 38, 3000, 70_001];
        for km in [64usize, 128] {
            let p = build(&cfg, &cu, km);
            let mut slots = Vec::new();
            let mut cover = std::collections::HashMap::new();
            for it in p.cmp_kv.chunks(8) {
                let (start, len, c0, p0, np, slot) = (it[0], it[1], it[2], it[4], it[5], it[6]);
                let ncmp = crate::blocks::cmp_blocks_in(len as usize, l, d) as i32;
                let nk = (km as i32).min(ncmp - c0);
                assert!(nk > 0 && c0 % km as i32 == 0, "km {km}: tile at {c0}");
                let tlo = c0 * d as i32 + l as i32 - 1 + p0;
                *cover.entry((start, c0)).or_insert(0) += np;
                assert!(tlo + np <= len, "km {km}: chunk past the sequence");
                if slot >= 0 {
                    slots.push(slot);
                }
            }
            for w in cu.windows(2) {
                let len = (w[1] - w[0]) as i32;
                let ncmp = crate::blocks::cmp_blocks_in(len as usize, l, d) as i32;
                for c0 in (0..ncmp).step_by(km) {
                    let want = (len - (c0 * d as i32 + l as i32 - 1)).max(0);
                    assert_eq!(
                        cover.get(&(w[0] as i32, c0)),
                        Some(&want),
                        "km {km}: tile {c0}"
                    );
                }
            }
            slots.sort_unstable();
            assert!(slots.iter().enumerate().all(|(i, &s)| s == i as i32));
            assert_eq!(slots.len(), p.cmp_slots);
            let mut seen = vec![0u32; *cu.last().unwrap()];
            for it in p.win_kv.chunks(4) {
                let (start, len, k0) = (it[0] as usize, it[1] as usize, it[2] as usize);
                assert_eq!(k0 % km, 0);
                for s in k0..(k0 + km).min(len) {
                    seen[start + s] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "km {km}");
        }
    }
}
