//! A register-blocked product for *thin* tiles: `C[m, 0..w] (+)= sum_k A[m, k] B[k, 0..w]`
//! with `A` any strided view read in place and `B`, `C` dense row-major `w` wide (`w` a
//! multiple of 8: the `G` query heads of one token, zero-padded).
//!
//! The selection branch multiplies only `G` query rows (16 in the paper's shape) by up to
//! `n l'` selected keys per token. A packed GEMM (`matrixmultiply`) re-packs those keys for every
//! token, which costs about as much as using them. Here the keys are the *long* side `A`, read
//! straight from the token-major `[N, HKV, D]` tensor, and the small query side is the one laid
//! out once (`B = Q^T`, `[dk, w]`):
//!
//! - logits: `S^T = K Q^T` (`A = K`, `[nk, dk]`);
//! - outputs: `O^T = V^T P^T` (`A = V^T`, a transposed view of `[nk, dv]`);
//! - backward: `dP^T = V dO^T`, `dQ^T = K^T dS^T`.
//!
//! Micro-kernel: `MR = 6` rows of `A` times 16 (or 8) columns of `B`, 12 (6) AVX2 accumulators,
//! one broadcast of `A` and two loads of `B` per six FMAs. Every output element is one fused
//! multiply-add chain over `k` in ascending order, in both the AVX2/FMA build and the portable
//! build (`f32::mul_add`), so the two compute bitwise the same values.

use super::tile::MatRef;

/// Rows of `A` per micro-tile.
const MR: usize = 6;
/// `k` per pass (keeps a pass's slices of `A` and `B` in L1/L2); passes accumulate into `C`
/// without changing the order of the chains.
const KC: usize = 256;

/// `C = A @ B` (`accumulate == false`) or `C += A @ B`, `A` `[m, kk]` strided, `B` `[kk, w]`
/// with row stride `ldb >= w`, `C` `[m, w]` row-major, `w % 8 == 0`.
pub(crate) fn gemm_thin(
    a: MatRef<'_>,
    b: &[f32],
    ldb: usize,
    w: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    let (m, kk) = (a.rows, a.cols);
    assert!(
        w.is_multiple_of(8) && ldb >= w,
        "gemm_thin: width {w} is not a multiple of 8 or exceeds the stride {ldb}"
    );
    assert!(
        (kk == 0 || b.len() >= (kk - 1) * ldb + w) && c.len() >= m * w,
        "gemm_thin: operand sizes"
    );
    if m == 0 || w == 0 {
        return;
    }
    if kk == 0 {
        if !accumulate {
            c[..m * w].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::tile::has_avx2_fma() {
        if has_avx512() {
            // SAFETY: AVX-512F, AVX2 and FMA are present (checked at run time); the bounds of
            // `a` were checked when the view was made and those of `b`, `c` just above.
            unsafe { drive_avx512(a, b, ldb, w, c, accumulate) };
            return;
        }
        // SAFETY: AVX2 and FMA are present (checked at run time); bounds as above.
        unsafe { drive_avx2(a, b, ldb, w, c, accumulate, 0) };
        return;
    }
    drive_portable(a, b, ldb, w, c, accumulate);
}

/// Whether [`gemm_thin`] runs its AVX-512 build here (16-lane vectors).
pub(crate) fn wide_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::tile::has_avx2_fma() && has_avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Portable build: the same chains as the AVX2 kernel (`acc = a * b + acc`, fused).
fn drive_portable(a: MatRef<'_>, b: &[f32], ldb: usize, w: usize, c: &mut [f32], accumulate: bool) {
    let (m, kk) = (a.rows, a.cols);
    let mut acc = vec![0.0f32; w];
    for i in 0..m {
        let crow = &mut c[i * w..(i + 1) * w];
        if accumulate {
            acc.copy_from_slice(crow);
        } else {
            acc.fill(0.0);
        }
        for k in 0..kk {
            let av = a.data[i * a.rs + k * a.cs];
            for (x, &bv) in acc.iter_mut().zip(&b[k * ldb..k * ldb + w]) {
                *x = av.mul_add(bv, *x);
            }
        }
        crow.copy_from_slice(&acc);
    }
}

/// Whether the AVX-512 build of the kernel may run (same values as the AVX2 one: the same
/// fused chains, only wider).
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Columns `col0..w` (`col0 % 8 == 0`) with the AVX2 micro-kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn drive_avx2(
    a: MatRef<'_>,
    b: &[f32],
    ldb: usize,
    w: usize,
    c: &mut [f32],
    accumulate: bool,
    col0: usize,
) {
    let (m, kk) = (a.rows, a.cols);
    let (ap, bp, cp) = (a.data.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut k0 = 0;
    while k0 < kk {
        let kn = (kk - k0).min(KC);
        let acc_in = accumulate || k0 > 0;
        // `A` the long side (logits: keys x dk): its rows outer, so `MR` rows of `A` stay in
        // L1 across the strips of the small `B`. Otherwise (outputs: dv x keys) a strip of `B`
        // outer, so it stays in L1 across the row blocks of `A`.
        let rows_outer = m > kn;
        let strips = (w - col0).div_ceil(16);
        let (no, ni) = if rows_outer {
            (m.div_ceil(MR), strips)
        } else {
            (strips, m.div_ceil(MR))
        };
        for oi in 0..no {
            for ii in 0..ni {
                let (bi, bc) = if rows_outer { (oi, ii) } else { (ii, oi) };
                let (i, col) = (bi * MR, col0 + bc * 16);
                let mr = (m - i).min(MR);
                let nv = if w - col >= 16 { 2 } else { 1 };
                let blk = Blk {
                    a: ap.add(i * a.rs + k0 * a.cs),
                    rs: a.rs,
                    cs: a.cs,
                    kn,
                    b: bp.add(k0 * ldb + col),
                    ldb,
                    w,
                    c: cp.add(i * w + col),
                    acc_in,
                };
                match (mr, nv) {
                    (6, 2) => blk.run::<6, 2>(),
                    (5, 2) => blk.run::<5, 2>(),
                    (4, 2) => blk.run::<4, 2>(),
                    (3, 2) => blk.run::<3, 2>(),
                    (2, 2) => blk.run::<2, 2>(),
                    (1, 2) => blk.run::<1, 2>(),
                    (6, _) => blk.run::<6, 1>(),
                    (5, _) => blk.run::<5, 1>(),
                    (4, _) => blk.run::<4, 1>(),
                    (3, _) => blk.run::<3, 1>(),
                    (2, _) => blk.run::<2, 1>(),
                    _ => blk.run::<1, 1>(),
                }
            }
        }
        k0 += kn;
    }
}

/// Rows of `A` per AVX-512 micro-tile (up to 24 accumulators of 32 registers).
#[cfg(target_arch = "x86_64")]
const MR512: usize = 12;

/// The multiple-of-16 columns with the AVX-512 micro-kernel, a last 8-wide strip with AVX2.
///
/// The AVX-512 intrinsics are stable since Rust 1.89, the workspace's `rust-version`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn drive_avx512(
    a: MatRef<'_>,
    b: &[f32],
    ldb: usize,
    w: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    let (m, kk) = (a.rows, a.cols);
    let w16 = w / 16 * 16;
    let (ap, bp, cp) = (a.data.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut k0 = 0;
    while k0 < kk && w16 > 0 {
        let kn = (kk - k0).min(KC);
        let acc_in = accumulate || k0 > 0;
        let rows_outer = m > kn;
        let strips = w16.div_ceil(32);
        let (no, ni) = if rows_outer {
            (m.div_ceil(MR512), strips)
        } else {
            (strips, m.div_ceil(MR512))
        };
        for oi in 0..no {
            for ii in 0..ni {
                let (bi, bc) = if rows_outer { (oi, ii) } else { (ii, oi) };
                let (i, col) = (bi * MR512, bc * 32);
                let mr = (m - i).min(MR512);
                let nv = if w16 - col >= 32 { 2 } else { 1 };
                let blk = Blk {
                    a: ap.add(i * a.rs + k0 * a.cs),
                    rs: a.rs,
                    cs: a.cs,
                    kn,
                    b: bp.add(k0 * ldb + col),
                    ldb,
                    w,
                    c: cp.add(i * w + col),
                    acc_in,
                };
                macro_rules! arms {
                    ($($r:literal)*) => {
                        match (mr, nv) {
                            $(($r, 2) => blk.run512::<$r, 2>(),)*
                            $(($r, _) => blk.run512::<$r, 1>(),)*
                            _ => unreachable!(),
                        }
                    };
                }
                arms!(1 2 3 4 5 6 7 8 9 10 11 12);
            }
        }
        k0 += kn;
    }
    if w16 < w {
        drive_avx2(a, b, ldb, w, c, accumulate, w16);
    }
}

/// One micro-tile: `MR` rows of `A` from `a` (strides `rs`, `cs`), `kn` steps of `k`, `8 NV`
/// columns of `B` (row stride `ldb`) into `C` (row stride `w`).
#[cfg(target_arch = "x86_64")]
struct Blk {
    a: *const f32,
    rs: usize,
    cs: usize,
    kn: usize,
    b: *const f32,
    ldb: usize,
    w: usize,
    c: *mut f32,
    acc_in: bool,
}

#[cfg(target_arch = "x86_64")]
impl Blk {
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn run<const R: usize, const NV: usize>(&self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); NV]; R];
        if self.acc_in {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(self.c.add(i * self.w + 8 * v));
                }
            }
        }
        let mut ak = self.a;
        let mut bk = self.b;
        for _ in 0..self.kn {
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(bk.add(8 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ak.add(i * self.rs));
                for (x, &bb) in row.iter_mut().zip(&bv) {
                    *x = _mm256_fmadd_ps(av, bb, *x);
                }
            }
            ak = ak.add(self.cs);
            bk = bk.add(self.ldb);
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm256_storeu_ps(self.c.add(i * self.w + 8 * v), *x);
            }
        }
    }

    /// [`Blk::run`] with 16-lane AVX-512 vectors: `16 NV` columns of `B` (Rust >= 1.89).
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn run512<const R: usize, const NV: usize>(&self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        if self.acc_in {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(self.c.add(i * self.w + 16 * v));
                }
            }
        }
        let mut ak = self.a;
        let mut bk = self.b;
        for _ in 0..self.kn {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(bk.add(16 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ak.add(i * self.rs));
                for (x, &bb) in row.iter_mut().zip(&bv) {
                    *x = _mm512_fmadd_ps(av, bb, *x);
                }
            }
            ak = ak.add(self.cs);
            bk = bk.add(self.ldb);
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm512_storeu_ps(self.c.add(i * self.w + 16 * v), *x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect()
    }

    #[test]
    fn matches_portable_build_bitwise_and_naive_closely() {
        // Odd sizes: remainders of MR, a width with one 8-wide strip, k past one KC pass.
        // (And, on AVX-512 machines, 12-row remainders and 32/16/8-wide strips.)
        for &(m, kk, w) in &[
            (13, 7, 24),
            (6, 300, 16),
            (1, 5, 8),
            (20, 64, 32),
            (25, 40, 56),
            (7, 70, 64),
        ] {
            // `B` dense (`ldb = w`) or a strided view (`ldb > w`, e.g. values `[nk, HKV, dv]`).
            for (ldb, (rs, cs, transposed)) in [w, w + 5]
                .into_iter()
                .flat_map(|ldb| [(ldb, (kk, 1, false)), (ldb, (1, m, true))])
            {
                let a = data(m * kk, 1.0);
                let av = MatRef::new(&a, m, kk, rs, cs);
                let b = data(kk * ldb, 2.0);
                let c0 = data(m * w, 3.0);
                for accumulate in [false, true] {
                    let mut fast = c0.clone();
                    gemm_thin(av, &b, ldb, w, &mut fast, accumulate);
                    let mut port = c0.clone();
                    drive_portable(av, &b, ldb, w, &mut port, accumulate);
                    #[cfg(target_arch = "x86_64")]
                    if crate::cpu::tile::has_avx2_fma() {
                        let mut v2 = c0.clone();
                        // SAFETY: AVX2/FMA checked; sizes as in `gemm_thin`.
                        unsafe { drive_avx2(av, &b, ldb, w, &mut v2, accumulate, 0) };
                        assert_eq!(
                            v2.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            port.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            "AVX2 build: m={m} k={kk} w={w} ldb={ldb}"
                        );
                    }
                    assert_eq!(
                        fast.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        port.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "m={m} k={kk} w={w} ldb={ldb} transposed={transposed} acc={accumulate}"
                    );
                    for i in 0..m {
                        for j in 0..w {
                            let mut want = if accumulate {
                                c0[i * w + j] as f64
                            } else {
                                0.0
                            };
                            for k in 0..kk {
                                want += a[i * rs + k * cs] as f64 * b[k * ldb + j] as f64;
                            }
                            let got = fast[i * w + j] as f64;
                            assert!((got - want).abs() < 1e-4, "({i},{j}) {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
