//! Sliding-window branch (SPEC.md, "Sliding window branch"): the query at `t` sees keys
//! `max(0, t - w + 1) ..= t`. A tile of tokens `t0..t1` reads one key span
//! `window_start(t0) .. t1` and gives each row its own range inside it.

use super::Dims;
use crate::blocks;

/// Key span of a tile of query tokens `t0..t1`.
pub(crate) fn span(dims: &Dims, t0: usize, t1: usize) -> (usize, usize) {
    (blocks::window_start(t0, dims.w), t1)
}

/// Row ranges (rows `(t - t0) * G + hh`) relative to a key span `[k0, k1)`, for query tokens
/// `t0..t1`: `[max(ws(t), k0), min(t + 1, k1))` minus `k0` (empty when they do not meet).
pub(crate) fn ranges(
    dims: &Dims,
    t0: usize,
    t1: usize,
    k0: usize,
    k1: usize,
    out: &mut Vec<(usize, usize)>,
) {
    out.clear();
    for t in t0..t1 {
        let lo = blocks::window_start(t, dims.w).max(k0);
        let hi = (t + 1).min(k1);
        let r = if hi > lo { (lo - k0, hi - k0) } else { (0, 0) };
        out.extend(std::iter::repeat_n(r, dims.g));
    }
}
