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
