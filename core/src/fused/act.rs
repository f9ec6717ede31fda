//! Vectorised `exp`, `sigmoid` and `tanh` for f32: over every one of the 2^32 inputs (checked
//! exhaustively by an ignored test that CI runs), `exp` and `tanh` are within 1 ulp of the
//! correctly rounded value and `sigmoid` within 2, including saturation, denormal inputs and
//! outputs, ±0 and ±inf; NaN stays NaN.
//!
//! Each scalar function is branch-free straight-line arithmetic, so a loop over a slice
//! vectorises; the kernels that call them, and the slice functions here, are compiled for
//! AVX-512, AVX2 and the baseline target and the best one is picked at run time
//! (`multiversion`). No fused multiply-add is used, so the activations are bit-identical on
//! every target (the matrix products, from the gemm crate, are not).
//!
//! The polynomial coefficients are least-squares fits on Chebyshev nodes, iterated towards
//! minimax relative error; `core/tools/fit_activations.py` refits them and simulates the f32
//! arithmetic against mpmath.

use multiversion::multiversion;

/// `exp(r) = 1 + r + r^2 (c2 + r (c3 + r (c4 + r (c5 + r c6))))` on `|r| <= ln 2 / 2`.
const EXP_C: [f32; 5] = [
    0.499_999_94,
    0.166_665_21,
    0.041_668_39,
    0.008_368_711,
    0.001_381_451,
];
/// `tanh(x) = x + x^3 (t0 + x^2 (t1 + ...))` on `|x| < TANH_POLY_BELOW`.
const TANH_C: [f32; 5] = [
    -0.333_332_8,
    0.133_314_43,
    -0.053_739_73,
    0.020_639_127,
    -0.005_705_027_4,
];
const TANH_POLY_BELOW: f32 = 0.625;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for every `n` the clamp allows.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding this rounds a float below 2^22 in magnitude to an integer (round to nearest even).
const ROUND: f32 = 12_582_912.0;

/// `2^k` for an integral `k` in `[-126, 127]`, built from its exponent bits.
#[inline(always)]
fn pow2i(k: f32) -> f32 {
    // k + 127 + 2^23 has k + 127 in its low mantissa bits; shifting them into the exponent
    // field drops everything above.
    f32::from_bits((k + (127.0 + 8_388_608.0)).to_bits() << 23)
}

/// `e^x`; 0 below -104, +inf above 88.73, denormal results rounded once.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Comparisons that are false for NaN keep NaN flowing through.
    let x = if x < -104.0 { -104.0 } else { x };
    let x = if x > 89.0 { 89.0 } else { x };
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = (((EXP_C[4] * r + EXP_C[3]) * r + EXP_C[2]) * r + EXP_C[1]) * r + EXP_C[0];
    let p = (p * r) * r + r + 1.0;
    // n is in [-150, 129]; two factors keep each power of two normal, and the second product
    // rounds once into the denormal range (or overflows to +inf).
    let n1 = (n * 0.5).floor();
    (p * pow2i(n1)) * pow2i(n - n1)
}

/// `1 / (1 + e^-x)`, computed from `e^-|x|` so that neither side loses precision:
/// `1 / (1 + e)` for `x >= 0`, `e / (1 + e)` below.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = exp(-x.abs());
    let num = if x >= 0.0 { 1.0 } else { e };
    num / (1.0 + e)
}

/// `tanh(x)`: an odd polynomial near 0, `1 - 2 / (e^2|x| + 1)` elsewhere, sign restored.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let a2 = a * a;
    let q = (((TANH_C[4] * a2 + TANH_C[3]) * a2 + TANH_C[2]) * a2 + TANH_C[1]) * a2 + TANH_C[0];
    let small = a + a * (a2 * q);
    let large = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    let y = if a < TANH_POLY_BELOW { small } else { large };
    y.copysign(x)
}

/// `e^x` for every element, in place.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn exp_in_place(xs: &mut [f32]) {
    for x in xs {
        *x = exp(*x);
    }
}

/// `sigmoid(x)` for every element, in place.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn sigmoid_in_place(xs: &mut [f32]) {
    for x in xs {
        *x = sigmoid(*x);
    }
}

/// `tanh(x)` for every element, in place.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn tanh_in_place(xs: &mut [f32]) {
    for x in xs {
        *x = tanh(*x);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Distance in representable floats; +0 and -0 are the same point.
    fn ulps(a: f32, b: f32) -> u64 {
        let key = |v: f32| {
            let bits = v.to_bits() as i64;
            if bits < 0 {
                -(bits & 0x7fff_ffff)
            } else {
                bits
            }
        };
        key(a).abs_diff(key(b))
    }

    fn sigmoid64(x: f64) -> f64 {
        if x >= 0.0 {
            1.0 / (1.0 + (-x).exp())
        } else {
            let e = x.exp();
            e / (1.0 + e)
        }
    }

    /// Checks one function against its f64 value rounded to f32, through both the dispatched
    /// slice version and the scalar one, which must agree bit for bit.
    fn check(
        name: &str,
        xs: &[f32],
        scalar: fn(f32) -> f32,
        slice: fn(&mut [f32]),
        reference: fn(f64) -> f64,
        max_ulps: u64,
    ) {
        let mut ys = xs.to_vec();
        slice(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let s = scalar(x);
            assert!(
                y.to_bits() == s.to_bits() || (y.is_nan() && s.is_nan()),
                "{name}({x:e}): dispatched {y:e} differs from scalar {s:e}"
            );
            let want = reference(x as f64) as f32;
            if want.is_nan() {
                assert!(y.is_nan(), "{name}({x:e}) = {y:e}, expected NaN");
            } else {
                let d = ulps(y, want);
                assert!(
                    d <= max_ulps,
                    "{name}({x:e}) = {y:e}, correctly rounded {want:e}: {d} ulps"
                );
            }
        }
    }

    fn check_all(xs: &[f32]) {
        check("exp", xs, exp, exp_in_place, f64::exp, 1);
        check("sigmoid", xs, sigmoid, sigmoid_in_place, sigmoid64, 2);
        check("tanh", xs, tanh, tanh_in_place, f64::tanh, 1);
    }

    /// Every `stride`-th bit pattern from `first`, in blocks.
    fn sweep(first: u64, stride: u64, end: u64) {
        let mut xs = Vec::with_capacity(1 << 16);
        let mut bits = first;
        while bits < end {
            xs.push(f32::from_bits(bits as u32));
            if xs.len() == xs.capacity() {
                check_all(&xs);
                xs.clear();
            }
            bits += stride;
        }
        check_all(&xs);
    }

    /// A systematic pass over the whole float range, every 4093rd bit pattern.
    #[test]
    fn the_whole_range_in_steps() {
        sweep(0, 4093, 1 << 32);
    }

    /// Every f32 there is, on two threads; a few minutes in release builds.
    #[test]
    #[ignore = "exhaustive over 2^32 inputs (minutes): run explicitly, as .ci/run does"]
    fn every_float() {
        std::thread::scope(|s| {
            s.spawn(|| sweep(0, 1, 1 << 31));
            sweep(1 << 31, 1, 1 << 32);
        });
    }

    #[test]
    fn special_values() {
        let mut xs = vec![
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-45,
            -1e-45,
            3e-39,
            -3e-39,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN,
            TANH_POLY_BELOW,
            -TANH_POLY_BELOW,
            88.72,
            88.73,
            -87.33,
            -103.9,
            -104.0,
            -150.0,
            9.01,
            16.7,
        ];
        // Around the switch points, one float at a time.
        for centre in [
            TANH_POLY_BELOW,
            88.72f32,
            -87.33,
            -103.97,
            0.5 * std::f32::consts::LN_2,
        ] {
            let mut v = centre;
            for _ in 0..64 {
                v = f32::from_bits(v.to_bits() + 1);
                xs.push(v);
                xs.push(-v);
            }
        }
        check_all(&xs);
        assert_eq!(tanh(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn dense_grid_where_recurrent_cells_live() {
        let xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-4).collect();
        check_all(&xs);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every float bit pattern is equally likely: most are huge or tiny, which covers
        /// saturation, overflow and denormals.
        #[test]
        fn any_float(bits in proptest::collection::vec(any::<u32>(), 1..512)) {
            let xs: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
            check_all(&xs);
        }

        /// Uniform over the range that matters, with odd slice lengths for the vector tails.
        #[test]
        fn working_range(xs in proptest::collection::vec(-110.0f32..100.0, 1..777)) {
            check_all(&xs);
        }
    }
}
