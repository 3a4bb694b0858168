//! Tile kernels shared by every branch of the CPU path: strided matrix views over
//! `matrixmultiply::sgemm`, a vectorisable `exp`, and the row-wise pieces of an attention tile
//! (masked softmax with its log-sum-exp, and the `dS = P * (dP - D)` of the backward pass).
//!
//! A tile is a set of query rows (the `G` heads of a KV group at one or more positions, already
//! multiplied by the softmax scale) against one or more *segments* of keys, each a strided
//! `[nk, D]` matrix. Row `r` sees the columns `ranges[r].0 .. ranges[r].1` of the concatenated
//! segments; everything else is hard-excluded (probability exactly 0), never a finite mask.

/// A read-only strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

/// A mutable strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

/// Number of elements a `rows x cols` view with strides `rs`, `cs` spans.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

impl<'a> MatRef<'a> {
    /// A strided view; panics if it would reach past `data` (an internal invariant).
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            extent(rows, cols, rs, cs) <= data.len(),
            "MatRef out of bounds"
        );
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A dense row-major `rows x cols` view of the start of `data`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

impl<'a> MatMut<'a> {
    /// A strided view; panics if it would reach past `data` (an internal invariant).
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            extent(rows, cols, rs, cs) <= data.len(),
            "MatMut out of bounds"
        );
        MatMut {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A dense row-major `rows x cols` view of the start of `data`.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
}

/// `C = alpha * A @ B + beta * C` through `matrixmultiply::sgemm` (runtime-selected AVX2/FMA or
/// AVX-512 micro-kernels, packed panels). With `beta == 0` the old `C` is not read.
pub(crate) fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) {
    assert_eq!(a.cols, b.rows, "gemm inner dimension");
    assert_eq!((a.rows, b.cols), (c.rows, c.cols), "gemm output shape");
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    // SAFETY: the three views were bounds-checked at construction (every element
    // `(i, j)` with `i < rows`, `j < cols` lies inside its slice); `c` is a unique borrow, so it
    // aliases neither `a` nor `b`; strides fit `isize` because they index existing slices.
    unsafe {
        matrixmultiply::sgemm(
            a.rows,
            a.cols,
            b.cols,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.data.as_mut_ptr(),
            c.rs as isize,
            c.cs as isize,
        );
    }
}

/// `e^x` in f32 for `x <= 88`, written so that the compiler vectorises loops over it:
/// `x = n ln2 + r`, `|r| <= ln2/2` (Cody-Waite, two fused steps), `e^r` by a degree-6
/// polynomial fitted for minimax *relative* error on that interval (Lawson iterations: 2e-9
/// in exact arithmetic, 7e-8 with the f32 Horner steps, ~1 ulp; degree 5, at 1.5e-7, left
/// the row sums of `dS` visibly biased), `2^n` from the
/// exponent field; the rounding to `n` uses the `1.5 * 2^23` trick instead of `floor`. Every
/// step is a fused multiply-add (`f32::mul_add`), so the portable, AVX2 and AVX-512 builds
/// compute bitwise the same value (a build without hardware FMA calls `fmaf`, same result).
/// Inputs below `-87.3` return `e^-87.3 ~ 1.2e-38` instead of a denormal: negligible next to
/// the row maximum's `1`.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const C: [f32; 6] = [
        1.0,
        0.499_999_94,
        0.166_664_32,
        0.041_668,
        0.008_374_155,
        0.001_384_365_1,
    ];
    let x = x.clamp(-87.3, 88.0);
    let big = x.mul_add(LOG2E, MAGIC);
    let n = big - MAGIC;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let p = C[5].mul_add(r, C[4]);
    let p = p.mul_add(r, C[3]);
    let p = p.mul_add(r, C[2]);
    let p = p.mul_add(r, C[1]);
    let p = p.mul_add(r, C[0]);
    let y = p.mul_add(r, 1.0);
    // n sits in the low mantissa bits of `big`; 2^n is built from the exponent field.
    let ni = (big.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    y * f32::from_bits(((ni + 127) << 23) as u32)
}

/// [`exp_f32`] of one value outside the vectorised kernels: the FMA build where the CPU has
/// it (in baseline x86-64 code each fused step would be a call to libm's `fmaf`). Same value.
#[inline]
pub(crate) fn exp1(x: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { exp1_fma(x) };
    }
    exp_f32(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp1_fma(x: f32) -> f32 {
    exp_f32(x)
}

/// Largest element (8 independent lanes so it vectorises); `-inf` for an empty slice.
#[inline(always)]
pub(crate) fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in it.remainder().iter().chain(acc.iter()) {
        m = if v > m { v } else { m };
    }
    m
}

/// Sum with 8 lanes (a fixed order, so the result is reproducible).
#[inline(always)]
pub(crate) fn sum_of(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = 0.0f32;
    for &v in it.remainder() {
        s += v;
    }
    let a = (acc[0] + acc[4]) + (acc[1] + acc[5]);
    let b = (acc[2] + acc[6]) + (acc[3] + acc[7]);
    s + (a + b)
}

/// Dot product with 8 lanes.
#[inline]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ix = x.chunks_exact(8);
    let mut iy = y.chunks_exact(8);
    for (a, b) in (&mut ix).zip(&mut iy) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    let mut s = 0.0f32;
    for (a, b) in ix.remainder().iter().zip(iy.remainder()) {
        s += a * b;
    }
    let a = (acc[0] + acc[4]) + (acc[1] + acc[5]);
    let b = (acc[2] + acc[6]) + (acc[3] + acc[7]);
    s + (a + b)
}

/// `y += a * x`
#[inline]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Backward of one tile, given the logits `s` (`rows x ld`), the forward's `lse` and
/// `delta[r] = dot(dO_r, O_r)`, and `dp = dO @ V^T` (same layout): turns `s` into
/// `P = exp(S - lse)` (0 outside `ranges[r]`) and `dp` into `dS = P * (dP - delta)`.
/// Rows with `lse = -inf` (nothing visible) become zeros.
pub(crate) fn probs_and_dscores(
    s: &mut [f32],
    dp: &mut [f32],
    ld: usize,
    ncols: usize,
    ranges: &[(usize, usize)],
    lse: &[f32],
    delta: &[f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { probs_and_dscores_avx2(s, dp, ld, ncols, ranges, lse, delta) };
    }
    probs_and_dscores_body(s, dp, ld, ncols, ranges, lse, delta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn probs_and_dscores_avx2(
    s: &mut [f32],
    dp: &mut [f32],
    ld: usize,
    ncols: usize,
    ranges: &[(usize, usize)],
    lse: &[f32],
    delta: &[f32],
) {
    probs_and_dscores_body(s, dp, ld, ncols, ranges, lse, delta)
}

#[inline(always)]
fn probs_and_dscores_body(
    s: &mut [f32],
    dp: &mut [f32],
    ld: usize,
    ncols: usize,
    ranges: &[(usize, usize)],
    lse: &[f32],
    delta: &[f32],
) {
    for (r, &(lo, hi)) in ranges.iter().enumerate() {
        let prow = &mut s[r * ld..r * ld + ncols];
        let drow = &mut dp[r * ld..r * ld + ncols];
        let (lo, hi) = (lo.min(ncols), hi.min(ncols));
        let (l, dl) = (lse[r], delta[r]);
        if lo >= hi || l == f32::NEG_INFINITY {
            prow.fill(0.0);
            drow.fill(0.0);
            continue;
        }
        prow[..lo].fill(0.0);
        prow[hi..].fill(0.0);
        drow[..lo].fill(0.0);
        drow[hi..].fill(0.0);
        for (p, d) in prow[lo..hi].iter_mut().zip(drow[lo..hi].iter_mut()) {
            let pv = exp_f32(*p - l);
            *p = pv;
            *d = pv * (*d - dl);
        }
    }
}

/// `x <- exp(x - m)` for every element; returns the sum (the online softmax of the dense
/// baseline).
pub(crate) fn exp_shift_sum(x: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { exp_shift_sum_avx2(x, m) };
    }
    exp_shift_sum_body(x, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shift_sum_avx2(x: &mut [f32], m: f32) -> f32 {
    exp_shift_sum_body(x, m)
}

#[inline(always)]
fn exp_shift_sum_body(x: &mut [f32], m: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp_f32(*v - m);
    }
    sum_of(x)
}

/// Whether the elementwise kernels may run their AVX2 build. The AVX2 and baseline builds
/// compute bitwise the same values: the code has no fused multiply-adds for the compiler to
/// form (Rust never contracts `a * b + c`) and every reduction has a fixed 8-lane order.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Grows `v` to at least `n` elements (contents unspecified: callers write before reading).
#[inline]
pub(crate) fn ensure(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 80.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        for x in [-80.5f32, -3.25, -0.1, 0.0, 0.3, 7.0] {
            assert_eq!(exp1(x).to_bits(), exp_f32(x).to_bits());
        }
        assert!(exp_f32(-1e30) < 1e-37);
    }

    #[test]
    fn gemm_strided_transposed_matches_naive() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        // b holds B^T row-major [n, k]; use the transposed view.
        let mut c = vec![1.0f32; m * n];
        gemm(
            2.0,
            MatRef::rows(&a, m, k),
            MatRef::rows(&b, n, k).t(),
            0.5,
            MatMut::rows(&mut c, m, n),
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 =
                    0.5 + 2.0 * (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-5, "({i},{j})");
            }
        }
    }
}
