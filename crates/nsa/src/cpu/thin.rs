//! Attention of one token's `G` query rows against keys it sees in full (the selection branch,
//! SPEC.md "Selection branch", and decode chunks), in the *transposed* layout of
//! [`super::micro`]: the rows are the `w = ceil(G / 8) * 8` lanes of each key's row of
//! `S^T` (`[nk, w]`), so the softmax over the keys is a lane-wise running max and sum, and no
//! key or value is ever copied or packed.
//!
//! Forward: `S^T = K Q^T`, `P^T = exp(S^T - m)`, `O^T = V^T P^T`, then `o = O / sum` and
//! `lse = m + ln(sum)` per row. Backward (query side): `dP^T = V dO^T`,
//! `dS^T = P^T * (dP^T - delta)`, `dq += scale * (K^T dS^T)^T`.

use super::attend::Seg;
use super::micro::gemm_thin;
use super::tile::{ensure, exp_f32, MatRef};

/// Per-thread scratch of thin tiles (always written before read).
#[derive(Default)]
pub(crate) struct ThinScratch {
    qt: Vec<f32>,
    dot: Vec<f32>,
    st: Vec<f32>,
    dpt: Vec<f32>,
    outt: Vec<f32>,
    m: Vec<f32>,
    sum: Vec<f32>,
    lo: Vec<u32>,
    hi: Vec<u32>,
    /// Lanes and keys of the last forward.
    w: usize,
    ncols: usize,
}

/// Lanes of a tile of `rows` rows.
pub(crate) fn lanes(rows: usize) -> usize {
    rows.div_ceil(8) * 8
}

/// `out[c * w + r] = x[r, c]` for `r < rows`, zero for the padding lanes: `[cols, w]`.
fn pack_t(x: MatRef<'_>, w: usize, out: &mut Vec<f32>) {
    ensure(out, x.cols * w);
    let out = &mut out[..x.cols * w];
    out.fill(0.0);
    for r in 0..x.rows {
        for c in 0..x.cols {
            out[c * w + r] = x.data[r * x.rs + c * x.cs];
        }
    }
}

/// `S^T[off.., :] = K_seg Q^T` for every segment (`st` is `[ncols, w]`, `qt` `[dk, w]` with
/// row stride `ldq`).
fn logits_t(segs: &[Seg<'_>], qt: &[f32], ldq: usize, w: usize, st: &mut [f32]) {
    let mut off = 0;
    for seg in segs {
        gemm_thin(seg.k, qt, ldq, w, &mut st[off * w..], false);
        off += seg.len();
    }
}

/// Whether `P V` runs with the values as the dense side `B` of the kernel (`O = P V`,
/// `[rows, dv]`) rather than as the strided side (`O^T = V^T P^T`). Both are the same fused
/// chains (one per output, keys ascending), so bitwise the same outputs (unit-tested); the
/// choice is speed only. Row-major needs `dv` a multiple of 8 and contiguous value rows, and
/// is taken where the other form's `B` (`w` lanes) would fill only one vector of the
/// AVX-512 kernel: for `w = 16` (one token of `G = 16`) that form needs 13 loads per 12
/// FMAs (load-port bound), row-major 14 per 24. On AVX2 (two vectors either way) the
/// transposed form measured as fast or faster (2-core box), so it stays there.
fn pv_row_major(segs: &[Seg<'_>], dv: usize, w: usize) -> bool {
    w < 32
        && super::micro::wide_vectors()
        && dv.is_multiple_of(8)
        && segs.iter().all(|s| s.v.cs == 1)
}

/// `O (+)= P[:, seg] V_seg` over the segments, `O` `[rows, dv]` row-major (`p` is `P^T`,
/// `[ncols, w]`). Needs [`pv_row_major`].
fn times_v(segs: &[Seg<'_>], p: &[f32], w: usize, rows: usize, out: &mut [f32]) {
    let dv = segs[0].v.cols;
    let mut off = 0;
    let mut first = true;
    for seg in segs {
        let nk = seg.len();
        if nk > 0 {
            let pm = MatRef::new(&p[off * w..], rows, nk, 1, w);
            gemm_thin(pm, seg.v.data, seg.v.rs, dv, out, !first);
            first = false;
        }
        off += nk;
    }
    if first {
        out[..rows * dv].fill(0.0);
    }
}

/// `O^T (+)= X_seg^T M^T[seg rows]` over the segments (`m` is `[ncols, w]`, `out` `[D, w]`);
/// `X` is the values (`which_v`) or the keys.
fn times_t(segs: &[Seg<'_>], which_v: bool, m: &[f32], w: usize, out: &mut [f32]) {
    let mut off = 0;
    let mut first = true;
    for seg in segs {
        let x = if which_v { seg.v } else { seg.k };
        if seg.len() > 0 {
            gemm_thin(x.t(), &m[off * w..], w, w, out, !first);
            first = false;
        }
        off += seg.len();
    }
    if first {
        let d = if which_v {
            segs[0].v.cols
        } else {
            segs[0].k.cols
        };
        out[..d * w].fill(0.0);
    }
}

/// Forward for `q` (`[rows, dk]`, scaled) against the keys of `segs` (concatenated): row `r`
/// sees the keys `ranges[r]` (all of them with `None`), the others are hard-excluded. Writes
/// `o` (`[rows, dv]`) and `lse` (`[rows]`; `-inf` and a zero row when a row sees nothing).
/// With `keep_probs`, the probabilities stay in the scratch ([`ThinScratch::probs`]).
pub(crate) fn forward(
    q: MatRef<'_>,
    segs: &[Seg<'_>],
    ranges: Option<&[(usize, usize)]>,
    scr: &mut ThinScratch,
    o: &mut [f32],
    lse: &mut [f32],
    keep_probs: bool,
) {
    let mut qt = std::mem::take(&mut scr.qt);
    pack_query(q, &mut qt);
    forward_packed(&qt, q.rows, segs, ranges, scr, o, lse, keep_probs);
    scr.qt = qt;
}

/// `Q^T` of `q` (`[dk, w]`, zero padding lanes), for [`forward_packed`].
pub(crate) fn pack_query(q: MatRef<'_>, out: &mut Vec<f32>) {
    pack_t(q, lanes(q.rows), out);
}

/// [`forward`] from the packed `Q^T` of `rows` query rows ([`pack_query`]), when the same
/// rows meet several key lists (the chunks of a decode step).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_packed(
    qt: &[f32],
    rows: usize,
    segs: &[Seg<'_>],
    ranges: Option<&[(usize, usize)]>,
    scr: &mut ThinScratch,
    o: &mut [f32],
    lse: &mut [f32],
    keep_probs: bool,
) {
    forward_strided(qt, lanes(rows), rows, segs, ranges, scr, o, lse, keep_probs)
}

/// [`forward_packed`] from `Q^T` with row stride `ldq`: the rows can be a slice of the
/// lanes of a wider packed `Q^T` (one token of a tile, its first lane at `qt[0]`). Lanes
/// `rows..lanes(rows)` must lie inside that row (any finite values: they are excluded).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_strided(
    qt: &[f32],
    ldq: usize,
    rows: usize,
    segs: &[Seg<'_>],
    ranges: Option<&[(usize, usize)]>,
    scr: &mut ThinScratch,
    o: &mut [f32],
    lse: &mut [f32],
    keep_probs: bool,
) {
    let dv = segs.first().map_or(0, |s| s.v.cols);
    let ncols: usize = segs.iter().map(|s| s.len()).sum();
    scr.w = lanes(rows);
    scr.ncols = ncols;
    if ncols == 0 {
        o[..rows * dv].fill(0.0);
        lse[..rows].fill(f32::NEG_INFINITY);
        return;
    }
    let w = lanes(rows);
    ensure(&mut scr.st, ncols * w);
    ensure(&mut scr.outt, dv * w);
    scr.m.clear();
    scr.m.resize(w, f32::NEG_INFINITY);
    scr.sum.clear();
    scr.sum.resize(w, 0.0);
    // Per-lane key ranges (padding lanes see nothing).
    scr.lo.clear();
    scr.lo.resize(w, 0);
    scr.hi.clear();
    scr.hi.resize(w, 0);
    for r in 0..rows {
        let (a, e) = ranges.map_or((0, ncols), |rg| rg[r]);
        let e = e.min(ncols);
        scr.lo[r] = a.min(e) as u32;
        scr.hi[r] = e as u32;
    }
    logits_t(segs, qt, ldq, w, &mut scr.st);
    exp_lanes(
        &mut scr.st[..ncols * w],
        w,
        &scr.lo,
        &scr.hi,
        &mut scr.m,
        &mut scr.sum,
    );
    let row_major = pv_row_major(segs, dv, w);
    if row_major {
        // `O = P V` straight into `o` (`[rows, dv]`).
        times_v(segs, &scr.st, w, rows, o);
    } else {
        times_t(segs, true, &scr.st, w, &mut scr.outt);
    }
    for r in 0..rows {
        if scr.sum[r] == 0.0 {
            // Nothing visible: the branch contributes exactly 0.
            o[r * dv..(r + 1) * dv].fill(0.0);
            lse[r] = f32::NEG_INFINITY;
            continue;
        }
        let inv = 1.0 / scr.sum[r];
        if row_major {
            for d in o[r * dv..(r + 1) * dv].iter_mut() {
                *d *= inv;
            }
        } else {
            for (c, d) in o[r * dv..(r + 1) * dv].iter_mut().enumerate() {
                *d = scr.outt[c * w + r] * inv;
            }
        }
        lse[r] = scr.m[r] + scr.sum[r].ln();
        // `sum` now holds the inverse, for the probabilities.
        scr.sum[r] = inv;
    }
    if keep_probs {
        for row in scr.st[..ncols * w].chunks_exact_mut(w) {
            for (x, &inv) in row.iter_mut().zip(&scr.sum[..rows]) {
                *x *= inv;
            }
        }
    }
}

impl ThinScratch {
    /// The probabilities of the last [`forward`] with `keep_probs`: `(p, w)`, `p[i * w + r]`
    /// for key `i` and row `r` (`[ncols, w]`).
    pub fn probs(&self) -> (&[f32], usize) {
        (&self.st[..self.ncols * self.w], self.w)
    }
}

/// Query side of the backward for one token: `dq += scale * dS @ K` (`dq` `[G, dk]`), from the
/// branch's upstream gradient `dob` (`[G, dv]`), the forward's `lse` and
/// `delta[r] = dot(dob_r, o_r)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_q(
    q: MatRef<'_>,
    dob: MatRef<'_>,
    segs: &[Seg<'_>],
    lse: &[f32],
    delta: &[f32],
    scale: f32,
    scr: &mut ThinScratch,
    dq: &mut [f32],
) {
    let (rows, dk) = (q.rows, q.cols);
    let ncols: usize = segs.iter().map(|s| s.len()).sum();
    if ncols == 0 {
        return;
    }
    let w = lanes(rows);
    pack_t(q, w, &mut scr.qt);
    pack_t(dob, w, &mut scr.dot);
    ensure(&mut scr.st, ncols * w);
    ensure(&mut scr.dpt, ncols * w);
    ensure(&mut scr.outt, dk * w);
    logits_t(segs, &scr.qt, w, w, &mut scr.st);
    let mut off = 0;
    for seg in segs {
        gemm_thin(seg.v, &scr.dot, w, w, &mut scr.dpt[off * w..], false);
        off += seg.len();
    }
    // Padding lanes and rows that see nothing: lse = +inf gives P = 0 there.
    scr.m.clear();
    scr.m.resize(w, f32::INFINITY);
    scr.sum.clear();
    scr.sum.resize(w, 0.0);
    for r in 0..rows {
        if lse[r] != f32::NEG_INFINITY {
            scr.m[r] = lse[r];
            scr.sum[r] = delta[r];
        }
    }
    dscores_lanes(
        &mut scr.st[..ncols * w],
        &mut scr.dpt[..ncols * w],
        w,
        &scr.m,
        &scr.sum,
    );
    times_t(segs, false, &scr.dpt, w, &mut scr.outt);
    for r in 0..rows {
        for (c, d) in dq[r * dk..(r + 1) * dk].iter_mut().enumerate() {
            *d += scale * scr.outt[c * w + r];
        }
    }
}

/// Lane-wise softmax numerators of `st` (`[nk, w]`), lane `r` seeing keys `lo[r]..hi[r]`:
/// `m[r]` = max over its keys, `x <- e^{x - m}` there and exactly 0 elsewhere, `sum[r]` =
/// their sum (in key order; 0 for a lane that sees nothing).
fn exp_lanes(st: &mut [f32], w: usize, lo: &[u32], hi: &[u32], m: &mut [f32], sum: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::tile::has_avx2_fma() {
        if w.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked at run time).
            return unsafe { exp_lanes_avx512(st, w, lo, hi, m, sum) };
        }
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { exp_lanes_avx2(st, w, lo, hi, m, sum) };
    }
    exp_lanes_body::<8>(st, w, lo, hi, m, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_lanes_avx2(
    st: &mut [f32],
    w: usize,
    lo: &[u32],
    hi: &[u32],
    m: &mut [f32],
    sum: &mut [f32],
) {
    exp_lanes_body::<8>(st, w, lo, hi, m, sum)
}

/// The same lane-wise operations 16 lanes at a time (bitwise the same values: no operation
/// depends on the vector width).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_lanes_avx512(
    st: &mut [f32],
    w: usize,
    lo: &[u32],
    hi: &[u32],
    m: &mut [f32],
    sum: &mut [f32],
) {
    exp_lanes_body::<16>(st, w, lo, hi, m, sum)
}

#[inline(always)]
fn exp_lanes_body<const L: usize>(
    st: &mut [f32],
    w: usize,
    lo: &[u32],
    hi: &[u32],
    m: &mut [f32],
    sum: &mut [f32],
) {
    // Groups of `L` lanes (`L` divides `w`), the running max and sum held in registers across the keys.
    let nk = st.len() / w;
    for g in (0..w).step_by(L) {
        let l8: [u32; L] = lo[g..g + L].try_into().unwrap();
        let h8: [u32; L] = hi[g..g + L].try_into().unwrap();
        // Keys every lane of the group sees (no masking needed there).
        let clo = (*l8.iter().max().unwrap() as usize).min(nk);
        let chi = (*h8.iter().min().unwrap() as usize).clamp(clo, nk);
        let mut mx: [f32; L] = m[g..g + L].try_into().unwrap();
        for j in (0..clo).chain(chi..nk) {
            let x: &[f32; L] = st[j * w + g..j * w + g + L].try_into().unwrap();
            let ju = j as u32;
            for i in 0..L {
                let keep = (ju >= l8[i]) & (ju < h8[i]) & (x[i] > mx[i]);
                mx[i] = if keep { x[i] } else { mx[i] };
            }
        }
        for j in clo..chi {
            let x: &[f32; L] = st[j * w + g..j * w + g + L].try_into().unwrap();
            for i in 0..L {
                mx[i] = if x[i] > mx[i] { x[i] } else { mx[i] };
            }
        }
        // Sums in key order (the masked and unmasked parts in sequence).
        let mut acc: [f32; L] = sum[g..g + L].try_into().unwrap();
        let masked = |j: usize, st: &mut [f32], acc: &mut [f32; L]| {
            let x: &mut [f32; L] = (&mut st[j * w + g..j * w + g + L]).try_into().unwrap();
            let ju = j as u32;
            for i in 0..L {
                let inr = (ju >= l8[i]) & (ju < h8[i]);
                let e = exp_f32(x[i] - mx[i]);
                let e = if inr { e } else { 0.0 };
                x[i] = e;
                acc[i] += e;
            }
        };
        for j in 0..clo {
            masked(j, st, &mut acc);
        }
        for j in clo..chi {
            let x: &mut [f32; L] = (&mut st[j * w + g..j * w + g + L]).try_into().unwrap();
            for i in 0..L {
                let e = exp_f32(x[i] - mx[i]);
                x[i] = e;
                acc[i] += e;
            }
        }
        for j in chi..nk {
            masked(j, st, &mut acc);
        }
        m[g..g + L].copy_from_slice(&mx);
        sum[g..g + L].copy_from_slice(&acc);
    }
}

/// `P = e^{S - lse}` into `st`, `dS = P * (dP - delta)` into `dpt` (lane-wise `lse`, `delta`;
/// a lane with `lse = +inf` gets zeros).
fn dscores_lanes(st: &mut [f32], dpt: &mut [f32], w: usize, lse: &[f32], delta: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::tile::has_avx2_fma() {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked at run time).
            return unsafe { dscores_lanes_avx512(st, dpt, w, lse, delta) };
        }
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { dscores_lanes_avx2(st, dpt, w, lse, delta) };
    }
    dscores_lanes_body(st, dpt, w, lse, delta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dscores_lanes_avx2(
    st: &mut [f32],
    dpt: &mut [f32],
    w: usize,
    lse: &[f32],
    delta: &[f32],
) {
    dscores_lanes_body(st, dpt, w, lse, delta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dscores_lanes_avx512(
    st: &mut [f32],
    dpt: &mut [f32],
    w: usize,
    lse: &[f32],
    delta: &[f32],
) {
    dscores_lanes_body(st, dpt, w, lse, delta)
}

#[inline(always)]
fn dscores_lanes_body(st: &mut [f32], dpt: &mut [f32], w: usize, lse: &[f32], delta: &[f32]) {
    let (lse, delta) = (&lse[..w], &delta[..w]);
    for (srow, drow) in st.chunks_exact_mut(w).zip(dpt.chunks_exact_mut(w)) {
        for (((s, d), &l), &dl) in srow.iter_mut().zip(drow.iter_mut()).zip(lse).zip(delta) {
            let p = if l == f32::INFINITY {
                0.0
            } else {
                exp_f32(*s - l)
            };
            *s = p;
            *d = p * (*d - dl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_pv_forms_give_the_same_bits() {
        // Two segments of strided values (head 1 of `[nk, 2, dv]`), 13 rows in 16 lanes.
        let (rows, w, dv, dk) = (13, 16, 24, 8);
        let data = |n: usize, s: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 + s) * 0.377).sin()).collect()
        };
        let (n1, n2) = (37, 300);
        let (v1, v2) = (data(n1 * 2 * dv, 1.0), data(n2 * 2 * dv, 2.0));
        let (k1, k2) = (data(n1 * dk, 3.0), data(n2 * dk, 4.0));
        let segs = [
            Seg {
                k: MatRef::rows(&k1, n1, dk),
                v: MatRef::new(&v1[dv..], n1, dv, 2 * dv, 1),
            },
            Seg {
                k: MatRef::rows(&k2, n2, dk),
                v: MatRef::new(&v2[dv..], n2, dv, 2 * dv, 1),
            },
        ];
        let p = data((n1 + n2) * w, 5.0);
        let mut rm = vec![0.0f32; rows * dv];
        times_v(&segs, &p, w, rows, &mut rm);
        let mut tr = vec![0.0f32; dv * w];
        times_t(&segs, true, &p, w, &mut tr);
        for r in 0..rows {
            for c in 0..dv {
                assert_eq!(
                    rm[r * dv + c].to_bits(),
                    tr[c * w + r].to_bits(),
                    "({r},{c})"
                );
            }
        }
    }
}
