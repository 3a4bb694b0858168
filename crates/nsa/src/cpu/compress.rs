//! Compression branch (SPEC.md, "Compression branch"): attention over the compressed tokens
//! `phi` made ([`super::phi`]). Compressed block `i` is visible to the query at `t` iff
//! `i*d + l - 1 <= t` (`blocks::cmp_visible`), so a row sees a prefix of the compressed keys;
//! with none visible its output is exactly 0 (lse `-inf`) and it contributes no gradient.

use super::attend::Seg;
use super::phi::{BlockLayout, Compressed};
use super::tile::MatRef;
use super::Dims;
use crate::blocks;

/// The compressed K/V of the whole batch, head-major `[HKV, nb_total, D]`.
#[derive(Clone, Copy)]
pub(crate) struct CmpKv<'a> {
    pub lay: &'a BlockLayout,
    pub k: &'a [f32],
    pub v: &'a [f32],
}

impl<'a> CmpKv<'a> {
    pub fn new(lay: &'a BlockLayout, k: &'a Compressed, v: &'a Compressed) -> Self {
        CmpKv {
            lay,
            k: &k.out,
            v: &v.out,
        }
    }

    /// Compressed tokens `i0..i1` of sequence `b`, head `g`.
    pub fn seg(&self, dims: &Dims, b: usize, g: usize, i0: usize, i1: usize) -> Seg<'a> {
        let total = self.lay.total();
        let row = g * total + self.lay.offsets[b] + i0;
        let nk = i1 - i0;
        let view = |x: &'a [f32], dim: usize| {
            if nk == 0 {
                MatRef::new(&x[..0], 0, dim, dim, 1)
            } else {
                MatRef::rows(&x[row * dim..], nk, dim)
            }
        };
        Seg {
            k: view(self.k, dims.dk),
            v: view(self.v, dims.dv),
        }
    }
}

/// Row ranges of a tile of tokens `t0..t1` (rows `(t - t0) * G + hh`) over the compressed keys
/// `i0..`: row sees `[0, min(cmp_visible(t), i1) - i0)`.
pub(crate) fn ranges(
    dims: &Dims,
    t0: usize,
    t1: usize,
    i0: usize,
    i1: usize,
    out: &mut Vec<(usize, usize)>,
) {
    out.clear();
    for t in t0..t1 {
        let vis = blocks::cmp_visible(t, dims.l, dims.d)
            .min(i1)
            .saturating_sub(i0);
        out.extend(std::iter::repeat_n((0, vis), dims.g));
    }
}
