//! Host-built work lists of the backward kernels for one batch layout (`cu_seqlens`); every entry
//! is an `int4` the kernels read by block index. Token counts are checked to fit `i32` upstream.

use crate::blocks;
use crate::config::NsaConfig;

/// Rows per row-major CTA of the compressed and window dQ kernels (`BQ_ROWS` in the `.cu`).
pub const BQ_ROWS: usize = 64;
/// Keys per key-major CTA (`KT`).
pub const KT: usize = 64;

/// The work lists (host side).
pub struct BwdPlan {
    /// `(start, len, t0, cstart)` per 64 / G positions (cmp_bwd_dq, win_bwd_dq).
    pub rows64: Vec<i32>,
    /// `(start, len, t0, 0)` per `sel_positions` positions (sel_bwd_dq).
    pub rows_sel: Vec<i32>,
    /// `(start, len, c0, cstart, p0, np, slot, 0)` per (64 compressed tokens, chunk of the
    /// positions that see them) (cmp_bwd_dkdv); slot -1: the tile's only chunk.
    pub cmp_kv: Vec<i32>,
    /// `(first compressed token, nk, first slot, chunks)` per tile cut into chunks (cmp_dkdv_reduce).
    pub cmp_reduce: Vec<i32>,
    /// Partial-sum slots of the compressed key tiles (each `HKV x 64` keys).
    pub cmp_slots: usize,
    /// `(start, len, k0, 0)` per 64 raw tokens (win_bwd_dkdv).
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

/// Positions per CTA of `sel_bwd_dq` (`BS_P`).
pub fn sel_positions(g: usize) -> usize {
    if g >= 16 {
        1
    } else {
        16 / g
    }
}

/// Builds the lists. `g` is the group size (<= 64).
pub fn build(cfg: &NsaConfig, cu: &[usize]) -> BwdPlan {
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
        // A compressed key tile [c0, c0 + 64) is seen by the positions t >= c0*d + l - 1: cut
        // them into chunks of max(16384 / G, len / 8) positions (at most 8 per tile, so the
        // partial sums stay O(T)); early tiles (most positions) first.
        let chunk = (16384 / g).max(len.div_ceil(8)).max(1);
        for c0 in (0..ncmp).step_by(KT) {
            let npos = len.saturating_sub(c0 * d + l - 1);
            let nchunks = npos.div_ceil(chunk).max(1);
            let nk = KT.min(ncmp - c0);
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
        for k0 in (0..len).step_by(KT) {
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
