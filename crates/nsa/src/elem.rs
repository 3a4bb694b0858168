//! The 16-bit element types the CUDA kernels compute in: bfloat16 (the default) or IEEE half
//! (f16). Q, K and V are stored on the GPU in the chosen type and multiplied on the tensor
//! cores with f32 accumulation; gates, `phi` weights, outputs and gradients stay f32.
//!
//! f32 inputs are accepted and rounded to the chosen type once, to nearest even (the `half`
//! crate's conversion, the same as the device's `cvt.rn`): there is no tf32 or f32 path on the
//! GPU, so an f32 caller gets bf16 (or f16) precision. f16 keeps 3 more mantissa bits than bf16
//! (errors ~8x smaller per rounding) but overflows above 65504 (to infinity) and loses precision
//! below 6.1e-5 (subnormals); bf16 has the range of f32.
//!
//! This module needs no GPU (the CPU path computes in f32 and ignores the choice).

use crate::error::{NsaError, Result};
use std::str::FromStr;

/// The 16-bit element type of the CUDA kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Elem {
    /// bfloat16: 8 exponent bits (the range of f32), 7 stored mantissa bits.
    #[default]
    Bf16,
    /// IEEE binary16: 5 exponent bits (largest finite 65504), 10 stored mantissa bits.
    F16,
}

impl Elem {
    /// Both types.
    pub const ALL: [Elem; 2] = [Elem::Bf16, Elem::F16];

    /// `"bf16"` or `"f16"`.
    pub fn name(self) -> &'static str {
        match self {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
        }
    }

    /// The bits of `x` rounded to this type (round to nearest, ties to even).
    pub fn bits(self, x: f32) -> u16 {
        match self {
            Elem::Bf16 => half::bf16::from_f32(x).to_bits(),
            Elem::F16 => half::f16::from_f32(x).to_bits(),
        }
    }

    /// The value of the bits `b` of this type, as f32 (exact).
    pub fn value(self, b: u16) -> f32 {
        match self {
            Elem::Bf16 => half::bf16::from_bits(b).to_f32(),
            Elem::F16 => half::f16::from_bits(b).to_f32(),
        }
    }

    /// `x` rounded to this type and widened back: what the kernels read for an f32 input (tests
    /// round the reference's inputs with it).
    pub fn round(self, x: f32) -> f32 {
        self.value(self.bits(x))
    }

    /// Every element of `x` rounded to this type, as bits (multi-threaded: uploads are large).
    pub fn bits_of<T: HostElem>(self, x: &[T]) -> Vec<u16> {
        use rayon::prelude::*;
        x.par_iter().map(|&v| v.elem_bits(self)).collect()
    }
}

impl std::fmt::Display for Elem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Elem {
    type Err = NsaError;
    /// `bf16` or `f16` (`fp16`, `half` accepted).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(Elem::Bf16),
            "f16" | "fp16" | "half" | "float16" => Ok(Elem::F16),
            _ => Err(NsaError::Unsupported(format!(
                "element type `{s}` (use bf16 or f16)"
            ))),
        }
    }
}

/// Host element types the CUDA upload takes: `f32` (rounded to the chosen type), and
/// `half::bf16` / `half::f16` (copied bit for bit when they are the chosen type, otherwise
/// widened to f32, exactly, and rounded once).
pub trait HostElem: Copy + Send + Sync + 'static {
    /// The bits of `self` in `elem`.
    fn elem_bits(self, elem: Elem) -> u16;
    /// The value as f32 (exact for every implementor).
    fn to_f32(self) -> f32;
    /// The 16-bit type whose bits `self` already is, if any.
    const NATIVE: Option<Elem>;
}

impl HostElem for f32 {
    fn elem_bits(self, elem: Elem) -> u16 {
        elem.bits(self)
    }
    fn to_f32(self) -> f32 {
        self
    }
    const NATIVE: Option<Elem> = None;
}

impl HostElem for half::bf16 {
    fn elem_bits(self, elem: Elem) -> u16 {
        match elem {
            Elem::Bf16 => self.to_bits(),
            Elem::F16 => elem.bits(self.to_f32()),
        }
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    const NATIVE: Option<Elem> = Some(Elem::Bf16);
}

impl HostElem for half::f16 {
    fn elem_bits(self, elem: Elem) -> u16 {
        match elem {
            Elem::F16 => self.to_bits(),
            Elem::Bf16 => elem.bits(self.to_f32()),
        }
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    const NATIVE: Option<Elem> = Some(Elem::F16);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rounds_to_nearest_even() {
        // 1 + 2^-11 lies halfway between 1 and 1 + 2^-10 (f16 keeps 10 mantissa bits): even wins
        assert_eq!(Elem::F16.round(1.0 + 1.0 / 2048.0), 1.0);
        // 1 + 3 * 2^-11 lies halfway between 1 + 2^-10 and 1 + 2^-9: even (1 + 2^-9) wins
        assert_eq!(Elem::F16.round(1.0 + 3.0 / 2048.0), 1.0 + 2.0 / 1024.0);
        // just above halfway rounds up
        assert_eq!(
            Elem::F16.round(1.0 + 1.0 / 2048.0 + 1.0 / 65536.0),
            1.0 + 1.0 / 1024.0
        );
        // the same values in bf16 (7 mantissa bits) all round to 1
        assert_eq!(Elem::Bf16.round(1.0 + 3.0 / 2048.0), 1.0);
        // bf16 ties to even too: 1 + 2^-8 is halfway between 1 and 1 + 2^-7
        assert_eq!(Elem::Bf16.round(1.0 + 1.0 / 256.0), 1.0);
        // range: f16 overflows to infinity above 65504 (+ half an ulp), bf16 does not
        assert_eq!(Elem::F16.round(65504.0), 65504.0);
        assert_eq!(Elem::F16.round(65520.0), f32::INFINITY);
        assert_eq!(Elem::F16.round(-1e6), f32::NEG_INFINITY);
        assert!((Elem::Bf16.round(1e6) - 1e6).abs() < 1e6 / 128.0);
        // f16 subnormals: 2^-24 is the smallest; below half of it rounds to 0
        assert_eq!(Elem::F16.round(2f32.powi(-24)), 2f32.powi(-24));
        assert_eq!(Elem::F16.round(2f32.powi(-26)), 0.0);
        assert!(Elem::F16.round(f32::NAN).is_nan());
        // the bits are the IEEE half encoding
        assert_eq!(Elem::F16.bits(1.0), 0x3c00);
        assert_eq!(Elem::F16.bits(-2.0), 0xc000);
        assert_eq!(Elem::Bf16.bits(1.0), 0x3f80);
    }

    #[test]
    fn relative_rounding_error_is_bounded_by_half_an_ulp() {
        // random values over a wide range: |round(x) - x| <= 2^-(p+1) |x| with p stored bits
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..10_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let m = (s >> 40) as f32 / (1u64 << 24) as f32 + 0.5; // [0.5, 1.5)
            let e = ((s >> 8) % 20) as i32 - 10; // 2^-10 .. 2^9: normal in both types
            let x = m * 2f32.powi(e) * if s & 1 == 0 { 1.0 } else { -1.0 };
            for (elem, p) in [(Elem::F16, 10), (Elem::Bf16, 7)] {
                let r = elem.round(x);
                assert!(
                    ((r - x) / x).abs() <= 2f32.powi(-(p + 1)) * 1.0001,
                    "{elem} {x} -> {r}"
                );
                // rounding is idempotent: a value of the type uploads unchanged
                assert_eq!(elem.round(r), r);
            }
        }
    }

    #[test]
    fn host_halves_upload_bit_for_bit_or_round_once() {
        let xs = [0.1f32, -3.75, 1.0 + 3.0 / 2048.0, 1e-5, 300.0];
        for &x in &xs {
            let h = half::f16::from_f32(x);
            let b = half::bf16::from_f32(x);
            // native type: the bits themselves
            assert_eq!(h.elem_bits(Elem::F16), h.to_bits());
            assert_eq!(b.elem_bits(Elem::Bf16), b.to_bits());
            // the other type: one rounding of the exact value
            assert_eq!(h.elem_bits(Elem::Bf16), Elem::Bf16.bits(h.to_f32()));
            assert_eq!(b.elem_bits(Elem::F16), Elem::F16.bits(b.to_f32()));
            // f32 input: rounded to nearest even
            assert_eq!(x.elem_bits(Elem::F16), h.to_bits());
            assert_eq!(x.elem_bits(Elem::Bf16), b.to_bits());
        }
        assert_eq!(
            Elem::F16.bits_of(&xs),
            xs.iter().map(|&x| Elem::F16.bits(x)).collect::<Vec<_>>()
        );
        assert_eq!(<half::f16 as HostElem>::NATIVE, Some(Elem::F16));
        assert_eq!(<f32 as HostElem>::NATIVE, None);
    }

    #[test]
    fn names_parse_and_print() {
        for e in Elem::ALL {
            assert_eq!(e.to_string().parse::<Elem>().unwrap(), e);
        }
        assert_eq!("FP16".parse::<Elem>().unwrap(), Elem::F16);
        assert_eq!(Elem::default(), Elem::Bf16);
        assert!(matches!(
            "tf32".parse::<Elem>(),
            Err(NsaError::Unsupported(_))
        ));
    }
}
