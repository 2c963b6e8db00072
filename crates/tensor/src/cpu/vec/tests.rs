//! Every SIMD path against the scalar reference (random lengths 0..300 to hit every tail, random
//! values including large magnitudes), the scalar path against f64 math and finite differences,
//! special values, and thread-count independence. Seeded loops keep the run short and
//! reproducible; a failure message names the isa, the case and the index.

// Index loops read best when several arrays are compared element by element.
#![allow(clippy::needless_range_loop)]

use super::*;

/// SplitMix64: small, seeded, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f32 {
        (lo + (hi - lo) * self.unit()) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize
    }
    /// Mostly moderate values, with a share of large and tiny magnitudes (up to 1e30).
    fn value(&mut self) -> f32 {
        let k = self.below(10);
        match k {
            0..=3 => self.uniform(-1.0, 1.0),
            4..=5 => self.uniform(-10.0, 10.0),
            6 => self.uniform(-100.0, 100.0),
            7 => self.uniform(-1e4, 1e4),
            _ => {
                let mag = 10f64.powf(self.unit() * 60.0 - 30.0);
                let s = if self.below(2) == 0 { -1.0 } else { 1.0 };
                (s * mag) as f32
            }
        }
    }
    /// Values of at most `bound` in magnitude, spread over scales.
    fn moderate(&mut self, bound: f64) -> f32 {
        let mag = bound * 10f64.powf(-4.0 * self.unit());
        let s = if self.below(2) == 0 { -1.0 } else { 1.0 };
        (s * mag * self.unit()) as f32
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }
    fn vec_in(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// Lengths 0..=40 (every tail of both widths, and short full vectors), then random up to 300.
fn lengths(rng: &mut Rng, random: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..=40).collect();
    v.extend((0..random).map(|_| rng.below(300)));
    v
}

fn simd_isas() -> Vec<Isa> {
    Isa::available()
        .into_iter()
        .filter(|&i| i != Isa::Scalar)
        .collect()
}

/// NaN matches NaN, infinities match themselves, finite values within abs + rel * max(|a|,|b|).
fn close(a: f32, b: f32, rel: f64, abs: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a == b {
        return true;
    }
    if a.is_infinite() || b.is_infinite() {
        return false;
    }
    let (a, b) = (a as f64, b as f64);
    (a - b).abs() <= abs + rel * a.abs().max(b.abs())
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Distance in units in the last place between two finite f32 of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    if a == b {
        return 0;
    }
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        if i < 0 {
            i32::MIN - i
        } else {
            i
        }
    };
    (key(a) as i64 - key(b) as i64).unsigned_abs() as u32
}

const EPS: f64 = f32::EPSILON as f64;
/// Below the smallest normal, allow a couple of subnormal steps (results there carry few bits).
const SUBNORMAL_ABS: f64 = 3e-45;

// --------------------------------------------------------------------------------------------
// Elementwise: SIMD vs scalar.

#[test]
fn arithmetic_matches_scalar_bitwise() {
    // One IEEE operation per element: every path must give identical bits.
    let mut rng = Rng(1);
    for isa in simd_isas() {
        for n in lengths(&mut rng, 40) {
            let (a, b) = (rng.vec(n), rng.vec(n));
            let s = rng.value();
            type Bin = fn(Isa, &[f32], &[f32], &mut [f32]);
            let bins: [(&str, Bin); 4] = [
                ("add", add_with),
                ("sub", sub_with),
                ("mul", mul_with),
                ("div", div_with),
            ];
            for (name, f) in bins {
                let (mut want, mut got) = (vec![0.0; n], vec![0.0; n]);
                f(Isa::Scalar, &a, &b, &mut want);
                f(isa, &a, &b, &mut got);
                assert!(same_bits(&got, &want), "{name} {isa:?} n={n}");
            }
            type WithS = fn(Isa, &[f32], f32, &mut [f32]);
            let withs: [(&str, WithS); 2] = [
                ("add_scalar", add_scalar_with),
                ("mul_scalar", mul_scalar_with),
            ];
            for (name, f) in withs {
                let (mut want, mut got) = (vec![0.0; n], vec![0.0; n]);
                f(Isa::Scalar, &a, s, &mut want);
                f(isa, &a, s, &mut got);
                assert!(same_bits(&got, &want), "{name} {isa:?} n={n}");
            }
            let (mut want, mut got) = (vec![0.0; n], vec![0.0; n]);
            log_with(Isa::Scalar, &a, &mut want);
            log_with(isa, &a, &mut got);
            assert!(same_bits(&got, &want), "log {isa:?} n={n}");
        }
    }
}

#[test]
fn tails_leave_memory_past_the_end_alone() {
    // Write into the front of a longer buffer: masked stores must not touch the rest.
    let mut rng = Rng(2);
    for isa in Isa::available() {
        for n in 0..=40 {
            let a = rng.vec(n);
            let mut out = vec![7.0f32; n + 20];
            exp_with(isa, &a, &mut out[..n]);
            gelu_with(isa, &a, &mut out[..n]);
            axpy_with(isa, 0.5, &a, &mut out[..n]);
            assert!(out[n..].iter().all(|&v| v == 7.0), "{isa:?} n={n}");
        }
    }
}

/// Checks a unary SIMD function against its scalar twin with a per-element tolerance.
fn check_unary(
    name: &str,
    f: fn(Isa, &[f32], &mut [f32]),
    inputs: &[f32],
    tol: impl Fn(f32) -> (f64, f64),
) -> u32 {
    let n = inputs.len();
    let mut want = vec![0.0; n];
    f(Isa::Scalar, inputs, &mut want);
    let mut worst = 0;
    for isa in simd_isas() {
        let mut got = vec![0.0; n];
        f(isa, inputs, &mut got);
        for i in 0..n {
            let (rel, abs) = tol(inputs[i]);
            assert!(
                close(got[i], want[i], rel, abs),
                "{name} {isa:?}: x={:e} got {:e} want {:e}",
                inputs[i],
                got[i],
                want[i]
            );
            if want[i].is_finite() && want[i].abs() >= f32::MIN_POSITIVE {
                worst = worst.max(ulps(got[i], want[i]));
            }
        }
    }
    worst
}

/// Inputs for the transcendental tests: random lengths (tails) of mixed-scale values, a dense
/// sweep over the interesting range, and the edges.
fn transcendental_inputs(rng: &mut Rng) -> Vec<f32> {
    let mut x = Vec::new();
    for n in lengths(rng, 20) {
        x.extend(rng.vec(n));
    }
    x.extend(rng.vec_in(20_000, -110.0, 95.0));
    x.extend(rng.vec_in(5_000, -1.0, 1.0));
    x.extend((0..2_000).map(|_| rng.moderate(1e-3)));
    x.extend([
        0.0,
        -0.0,
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE,
        88.72,
        88.7228,
        88.73,
        89.0,
        -87.33,
        -87.34,
        -103.9,
        -103.97,
        -104.0,
        -150.0,
        1e3,
        -1e3,
        f32::MAX,
        f32::MIN,
    ]);
    x
}

#[test]
fn exp_matches_scalar_within_a_few_ulp() {
    let mut rng = Rng(3);
    let x = transcendental_inputs(&mut rng);
    let worst = check_unary("exp", exp_with, &x, |_| (4.0 * EPS, SUBNORMAL_ABS));
    eprintln!(
        "exp: worst {worst} ulp against the library exp over {} inputs",
        x.len()
    );
    assert!(worst <= 4, "exp: worst {worst} ulp");
}

#[test]
fn tanh_and_sigmoid_match_scalar() {
    let mut rng = Rng(4);
    let x = transcendental_inputs(&mut rng);
    check_unary("tanh", tanh_with, &x, |_| (8.0 * EPS, 0.0));
    check_unary("sigmoid", sigmoid_with, &x, |_| (8.0 * EPS, SUBNORMAL_ABS));
}

/// The GELU exponent v = 2 sqrt(2/pi) (x + 0.044715 x^3): an error of one rounding in v becomes
/// a relative error of |v| eps in e^v, so GELU tolerances grow with |v|.
fn gelu_v(x: f32) -> f64 {
    let x = (x as f64).clamp(-20.0, 20.0);
    2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x)
}

#[test]
fn gelu_matches_scalar() {
    let mut rng = Rng(5);
    let x = transcendental_inputs(&mut rng);
    check_unary("gelu", gelu_with, &x, |x| {
        let ax = x.abs().min(20.0) as f64;
        (
            8.0 * EPS + 4.0 * EPS * gelu_v(x).abs(),
            SUBNORMAL_ABS * (1.0 + ax),
        )
    });
}

#[test]
fn gelu_backward_matches_scalar() {
    let mut rng = Rng(6);
    let x = transcendental_inputs(&mut rng);
    let dy: Vec<f32> = (0..x.len()).map(|_| rng.moderate(10.0)).collect();
    let mut want = vec![0.0; x.len()];
    gelu_backward_with(Isa::Scalar, &x, &dy, &mut want);
    for isa in simd_isas() {
        let mut got = vec![0.0; x.len()];
        gelu_backward_with(isa, &x, &dy, &mut got);
        for i in 0..x.len() {
            // gelu' crosses zero near x = -0.75, so relative error is bounded against |dy|.
            let rel = 16.0 * EPS + 4.0 * EPS * gelu_v(x[i]).abs();
            let abs = rel * dy[i].abs() as f64 + 1e-38;
            assert!(
                close(got[i], want[i], rel, abs),
                "gelu_backward {isa:?}: x={:e} dy={:e} got {:e} want {:e}",
                x[i],
                dy[i],
                got[i],
                want[i]
            );
        }
    }
}

#[test]
fn special_values() {
    let inf = f32::INFINITY;
    let nan = f32::NAN;
    // (x, exp, tanh, sigmoid, gelu, gelu')
    let table = [
        (inf, inf, 1.0, 1.0, inf, 1.0),
        (-inf, 0.0, -1.0, 0.0, 0.0, 0.0),
        (nan, nan, nan, nan, nan, nan),
        (0.0, 1.0, 0.0, 0.5, 0.0, 0.5),
        (1e3, inf, 1.0, 1.0, 1e3, 1.0),
        (-1e3, 0.0, -1.0, 0.0, 0.0, 0.0),
        (f32::MAX, inf, 1.0, 1.0, f32::MAX, 1.0),
        (f32::MIN, 0.0, -1.0, 0.0, 0.0, 0.0),
    ];
    for isa in Isa::available() {
        // Lengths 1 and 33: one element through the tail path, and the same element in a
        // full vector.
        for rep in [1usize, 33] {
            for &(x, e, t, s, g, gd) in &table {
                let xs = vec![x; rep];
                let mut o = vec![0.0; rep];
                type Un = fn(Isa, &[f32], &mut [f32]);
                let cases: [(&str, Un, f32); 4] = [
                    ("exp", exp_with, e),
                    ("tanh", tanh_with, t),
                    ("sigmoid", sigmoid_with, s),
                    ("gelu", gelu_with, g),
                ];
                for (name, f, want) in cases {
                    f(isa, &xs, &mut o);
                    assert!(
                        o.iter().all(|&v| close(v, want, 0.0, 0.0)),
                        "{name}({x}) {isa:?} gave {:?}, want {want}",
                        o[0]
                    );
                }
                gelu_backward_with(isa, &xs, &vec![1.0; rep], &mut o);
                assert!(
                    o.iter().all(|&v| close(v, gd, 0.0, 0.0)),
                    "gelu'({x}) {isa:?} gave {:?}, want {gd}",
                    o[0]
                );
            }
        }
        // Signs kept at zero.
        let mut o = [0.0f32; 2];
        tanh_with(isa, &[0.0, -0.0], &mut o);
        assert!(
            o[0].to_bits() == 0 && o[1].to_bits() == (-0.0f32).to_bits(),
            "{isa:?} {o:?}"
        );
        // Finite inputs never give NaN.
        let x: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.1).collect();
        let mut o = vec![0.0; x.len()];
        for f in [exp_with, tanh_with, sigmoid_with, gelu_with] {
            f(isa, &x, &mut o);
            assert!(o.iter().all(|v| !v.is_nan()), "{isa:?}");
        }
    }
}

// --------------------------------------------------------------------------------------------
// Scalar path against f64 math.

#[test]
fn scalar_transcendentals_match_f64() {
    let mut rng = Rng(7);
    let x = transcendental_inputs(&mut rng);
    let n = x.len();
    let mut o = vec![0.0; n];
    type Case = (&'static str, fn(Isa, &[f32], &mut [f32]), fn(f64) -> f64);
    let refs: [Case; 5] = [
        ("exp", exp_with, f64::exp),
        ("tanh", tanh_with, f64::tanh),
        ("sigmoid", sigmoid_with, |x| 1.0 / (1.0 + (-x).exp())),
        ("gelu", gelu_with, gelu_f64),
        ("log", log_with, f64::ln),
    ];
    for (name, f, r) in refs {
        f(Isa::Scalar, &x, &mut o);
        for i in 0..n {
            let want = r(x[i] as f64) as f32;
            let (rel, abs) = if name == "gelu" {
                // A subnormal sigmoid times |x| carries |x| subnormal steps of error.
                let ax = x[i].abs().min(20.0) as f64;
                (
                    8.0 * EPS + 4.0 * EPS * gelu_v(x[i]).abs(),
                    SUBNORMAL_ABS * (1.0 + ax),
                )
            } else {
                (2.0 * EPS, SUBNORMAL_ABS)
            };
            assert!(
                close(o[i], want, rel, abs),
                "scalar {name}({:e}) = {:e}, f64 says {:e}",
                x[i],
                o[i],
                want
            );
        }
    }
}

/// GELU in f64 in the sigmoid form (x / (1 + e^-2u)), which does not cancel for negative x.
fn gelu_f64(x: f64) -> f64 {
    let u = 0.7978845608028654 * (x + 0.044715 * x * x * x);
    if x == f64::NEG_INFINITY {
        return 0.0;
    }
    x / (1.0 + (-2.0 * u).exp())
}

#[test]
fn gelu_sigmoid_form_is_the_gpt2_tanh_form() {
    // Where the tanh form does not cancel, the two agree to f64 rounding.
    let mut rng = Rng(8);
    for _ in 0..10_000 {
        let x = rng.uniform(-3.0, 8.0) as f64;
        let u = 0.7978845608028654 * (x + 0.044715 * x * x * x);
        let tanh_form = 0.5 * x * (1.0 + u.tanh());
        assert!(
            (gelu_f64(x) - tanh_form).abs() <= 1e-12 * (1.0 + x.abs()),
            "x={x}"
        );
    }
}

#[test]
fn scalar_gelu_backward_matches_f64_finite_differences() {
    let mut rng = Rng(9);
    let mut x: Vec<f32> = rng.vec_in(5_000, -12.0, 12.0);
    x.extend((0..500).map(|_| rng.moderate(1e-2)));
    let dy: Vec<f32> = (0..x.len()).map(|_| rng.uniform(-3.0, 3.0)).collect();
    let mut dx = vec![0.0; x.len()];
    gelu_backward_with(Isa::Scalar, &x, &dy, &mut dx);
    for i in 0..x.len() {
        let xi = x[i] as f64;
        let h = 1e-5 * (1.0 + xi.abs());
        let d = (gelu_f64(xi + h) - gelu_f64(xi - h)) / (2.0 * h);
        let want = dy[i] as f64 * d;
        let tol = 1e-6 * dy[i].abs() as f64 * (1.0 + gelu_v(x[i]).abs());
        assert!(
            (dx[i] as f64 - want).abs() <= tol,
            "gelu'({xi}) * {} = {}, finite differences say {want}",
            dy[i],
            dx[i]
        );
    }
}

// --------------------------------------------------------------------------------------------
// Reductions and axpy.

#[test]
fn reductions_match_scalar_and_f64() {
    let mut rng = Rng(10);
    let mut ns = lengths(&mut rng, 60);
    ns.extend([1000, 4097, 100_003]);
    for n in ns {
        let a = rng.vec(n);
        let b: Vec<f32> = (0..n).map(|_| rng.moderate(1e4)).collect();
        let c: Vec<f32> = (0..n).map(|_| rng.moderate(1e4)).collect();
        let abs_sum: f64 = a.iter().map(|&v| (v as f64).abs()).sum();
        let exact_sum: f64 = a.iter().map(|&v| v as f64).sum();
        let abs_dot: f64 = b
            .iter()
            .zip(&c)
            .map(|(&x, &y)| (x as f64 * y as f64).abs())
            .sum();
        let exact_dot: f64 = b.iter().zip(&c).map(|(&x, &y)| x as f64 * y as f64).sum();
        // Recursive summation error bound: (n - 1) eps sum|a| (+ one rounding per product).
        let bound_sum = n as f64 * EPS * abs_sum;
        let bound_dot = (n as f64 + 1.0) * EPS * abs_dot;
        let exact_max = a
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        for isa in Isa::available() {
            let s = sum_with(isa, &a) as f64;
            assert!(
                (s - exact_sum).abs() <= bound_sum,
                "sum {isa:?} n={n}: {s} vs {exact_sum}"
            );
            let d = dot_with(isa, &b, &c) as f64;
            assert!(
                (d - exact_dot).abs() <= bound_dot,
                "dot {isa:?} n={n}: {d} vs {exact_dot}"
            );
            assert_eq!(max_with(isa, &a), exact_max, "max {isa:?} n={n}");
            // Fixed order: the same call gives the same bits.
            assert_eq!(sum_with(isa, &a).to_bits(), sum_with(isa, &a).to_bits());
        }
    }
    for isa in Isa::available() {
        assert_eq!(sum_with(isa, &[]), 0.0);
        assert_eq!(dot_with(isa, &[], &[]), 0.0);
        assert_eq!(max_with(isa, &[]), f32::NEG_INFINITY);
        // NaN ignored, as f32::max does; the tail lane path too (len 3 and 35).
        for n in [3usize, 35] {
            let mut v = vec![-5.0f32; n];
            v[1] = f32::NAN;
            v[n - 1] = 2.0;
            assert_eq!(max_with(isa, &v), 2.0, "{isa:?} n={n}");
        }
        assert_eq!(max_with(isa, &[f32::NAN; 20]), f32::NEG_INFINITY);
        assert_eq!(max_with(isa, &[-1.0, f32::INFINITY, 3.0]), f32::INFINITY);
    }
}

#[test]
fn axpy_matches_scalar() {
    let mut rng = Rng(11);
    for n in lengths(&mut rng, 40) {
        let x = rng.vec(n);
        let y0: Vec<f32> = (0..n).map(|_| rng.moderate(1e3)).collect();
        let alpha = rng.uniform(-2.0, 2.0);
        let mut want = y0.clone();
        axpy_with(Isa::Scalar, alpha, &x, &mut want);
        for i in 0..n {
            let exact = y0[i] as f64 + alpha as f64 * x[i] as f64;
            let bound = 2.0 * EPS * (y0[i].abs() as f64 + (alpha * x[i]).abs() as f64);
            assert!(
                close(want[i], exact as f32, 0.0, bound),
                "scalar axpy i={i}"
            );
        }
        for isa in simd_isas() {
            let mut got = y0.clone();
            axpy_with(isa, alpha, &x, &mut got);
            for i in 0..n {
                let bound = 2.0 * EPS * (y0[i].abs() as f64 + (alpha * x[i]).abs() as f64);
                assert!(
                    close(got[i], want[i], 0.0, bound),
                    "axpy {isa:?} n={n} i={i}"
                );
            }
        }
    }
}

// --------------------------------------------------------------------------------------------
// Softmax family.

/// Random row shapes: rows 1..6, cols 1..300 (every small cols too).
fn row_shapes(rng: &mut Rng, random: usize) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = (1..=40).map(|c| (1 + c % 3, c)).collect();
    v.extend((0..random).map(|_| (1 + rng.below(6), 1 + rng.below(299))));
    v
}

/// Softmax logits: mostly moderate, some rows with huge spreads.
fn logits(rng: &mut Rng, n: usize) -> Vec<f32> {
    let scale = [1.0, 10.0, 100.0, 1e4][rng.below(4)];
    (0..n).map(|_| rng.uniform(-scale, scale)).collect()
}

fn softmax_f64(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[test]
fn softmax_rows_against_scalar_f64_and_sum_to_one() {
    let mut rng = Rng(12);
    for (rows, cols) in row_shapes(&mut rng, 60) {
        let x = logits(&mut rng, rows * cols);
        let mut want = vec![0.0; x.len()];
        softmax_rows_with(Isa::Scalar, &x, cols, &mut want);
        // Summation over cols dominates the error: a relative cols * eps.
        let rel = (cols as f64 + 8.0) * EPS;
        for (r, row) in x.chunks(cols).enumerate() {
            let exact = softmax_f64(row);
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            for j in 0..cols {
                let got = want[r * cols + j];
                // x - m is rounded once in f32; exp turns that into a relative |x - m| eps.
                let rel = rel + (row[j] - m).abs() as f64 * EPS;
                assert!(
                    close(got, exact[j] as f32, rel, SUBNORMAL_ABS),
                    "scalar softmax {rows}x{cols}: {got:e} vs {:e}, row {row:?}",
                    exact[j]
                );
            }
        }
        for isa in Isa::available() {
            let mut got = vec![0.0; x.len()];
            softmax_rows_with(isa, &x, cols, &mut got);
            for i in 0..x.len() {
                assert!(
                    close(got[i], want[i], 2.0 * rel, SUBNORMAL_ABS),
                    "softmax {isa:?} {rows}x{cols} i={i}"
                );
            }
            for row in got.chunks(cols) {
                let s: f64 = row.iter().map(|&v| v as f64).sum();
                assert!((s - 1.0).abs() <= rel, "softmax {isa:?} row sums to {s}");
            }
        }
    }
}

#[test]
fn log_softmax_is_log_of_softmax() {
    let mut rng = Rng(13);
    for (rows, cols) in row_shapes(&mut rng, 60) {
        let x = logits(&mut rng, rows * cols);
        let mut want = vec![0.0; x.len()];
        log_softmax_rows_with(Isa::Scalar, &x, cols, &mut want);
        for isa in Isa::available() {
            let mut ls = vec![0.0; x.len()];
            let mut sm = vec![0.0; x.len()];
            log_softmax_rows_with(isa, &x, cols, &mut ls);
            softmax_rows_with(isa, &x, cols, &mut sm);
            for i in 0..x.len() {
                // ln s carries a relative cols*eps; x - m is exact or one rounding of |x - m|.
                let tol = (cols as f64 + 8.0) * EPS * (1.0 + ls[i].abs() as f64);
                assert!(
                    close(ls[i], want[i], 0.0, tol),
                    "log_softmax {isa:?} vs scalar i={i}"
                );
                if sm[i] > 1e-30 {
                    let l = (sm[i] as f64).ln() as f32;
                    assert!(
                        close(ls[i], l, 0.0, 2.0 * tol),
                        "log_softmax {isa:?} {} vs ln softmax {l}",
                        ls[i]
                    );
                }
            }
            // And against f64.
            for (r, row) in x.chunks(cols).enumerate() {
                let exact = softmax_f64(row);
                for j in 0..cols {
                    let e = exact[j].ln();
                    let got = ls[r * cols + j] as f64;
                    if e.is_finite() {
                        let tol = (cols as f64 + 8.0) * EPS * (1.0 + e.abs());
                        assert!(
                            (got - e).abs() <= tol,
                            "log_softmax {isa:?} {got} vs f64 {e}"
                        );
                    }
                }
            }
        }
    }
}

/// L(x) = Σ dy · f(x) for a row function f, differentiated by central differences in f64.
fn finite_diff_row(x: &[f32], dy: &[f32], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let loss = |x: &[f64]| -> f64 { f(x).iter().zip(dy).map(|(a, &b)| a * b as f64).sum() };
    (0..x.len())
        .map(|i| {
            let h = 1e-6;
            let mut p = xd.clone();
            p[i] += h;
            let mut m = xd.clone();
            m[i] -= h;
            (loss(&p) - loss(&m)) / (2.0 * h)
        })
        .collect()
}

fn softmax_f64_of(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[test]
fn softmax_backwards_match_scalar_and_finite_differences() {
    let mut rng = Rng(14);
    for (rows, cols) in row_shapes(&mut rng, 40) {
        let n = rows * cols;
        let x: Vec<f32> = rng.vec_in(n, -4.0, 4.0);
        let dy: Vec<f32> = rng.vec_in(n, -2.0, 2.0);
        let (mut y, mut ly) = (vec![0.0; n], vec![0.0; n]);
        softmax_rows_with(Isa::Scalar, &x, cols, &mut y);
        log_softmax_rows_with(Isa::Scalar, &x, cols, &mut ly);
        let (mut dx, mut ldx) = (vec![0.0; n], vec![0.0; n]);
        softmax_backward_rows_with(Isa::Scalar, &y, &dy, cols, &mut dx);
        log_softmax_backward_rows_with(Isa::Scalar, &ly, &dy, cols, &mut ldx);
        // Scalar against finite differences of the f64 forward (small rows keep this cheap).
        if cols <= 40 {
            for r in 0..rows {
                let (xr, gr) = (&x[r * cols..][..cols], &dy[r * cols..][..cols]);
                let fd = finite_diff_row(xr, gr, softmax_f64_of);
                let lfd = finite_diff_row(xr, gr, |x| {
                    softmax_f64_of(x).iter().map(|v| v.ln()).collect()
                });
                for j in 0..cols {
                    let i = r * cols + j;
                    assert!(
                        (dx[i] as f64 - fd[j]).abs() <= 1e-5,
                        "softmax' {} vs fd {}",
                        dx[i],
                        fd[j]
                    );
                    assert!(
                        (ldx[i] as f64 - lfd[j]).abs() <= 1e-5 * cols as f64,
                        "log_softmax' {} vs fd {}",
                        ldx[i],
                        lfd[j]
                    );
                }
            }
        }
        for isa in simd_isas() {
            let (mut g, mut lg) = (vec![0.0; n], vec![0.0; n]);
            softmax_backward_rows_with(isa, &y, &dy, cols, &mut g);
            log_softmax_backward_rows_with(isa, &ly, &dy, cols, &mut lg);
            for r in 0..rows {
                let rg = r * cols..(r + 1) * cols;
                let sdy: f64 = dy[rg.clone()].iter().map(|v| v.abs() as f64).sum();
                let sdyy: f64 = dy[rg.clone()]
                    .iter()
                    .zip(&y[rg.clone()])
                    .map(|(a, b)| (a * b).abs() as f64)
                    .sum();
                for i in rg {
                    let tol = (cols as f64 + 8.0) * EPS * y[i] as f64 * (dy[i].abs() as f64 + sdyy);
                    assert!(
                        close(g[i], dx[i], 0.0, tol),
                        "softmax' {isa:?} {} vs {}",
                        g[i],
                        dx[i]
                    );
                    let ltol = (cols as f64 + 8.0)
                        * EPS
                        * (dy[i].abs() as f64 + (ly[i] as f64).exp() * sdy);
                    assert!(
                        close(lg[i], ldx[i], 0.0, ltol),
                        "log_softmax' {isa:?} {} vs {}",
                        lg[i],
                        ldx[i]
                    );
                }
            }
        }
    }
}

// --------------------------------------------------------------------------------------------
// Layer norm.

/// f64 layer norm of one row (biased variance).
fn layer_norm_f64(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n;
    let r = 1.0 / (var + eps).sqrt();
    x.iter()
        .zip(gamma)
        .zip(beta)
        .map(|((v, g), b)| (v - m) * r * g + b)
        .collect()
}

/// Rows with an offset (to exercise the two-pass variance) and a spread.
fn ln_rows(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let offset = rng.uniform(-100.0, 100.0);
        let spread = [0.1, 1.0, 10.0][rng.below(3)];
        x.extend((0..cols).map(|_| offset + rng.uniform(-spread, spread)));
    }
    x
}

#[test]
fn layer_norm_against_scalar_and_f64() {
    let mut rng = Rng(15);
    let eps = 1e-5f32;
    for (rows, cols) in row_shapes(&mut rng, 60) {
        let n = rows * cols;
        let x = ln_rows(&mut rng, rows, cols);
        let gamma = rng.vec_in(cols, -2.0, 2.0);
        let beta = rng.vec_in(cols, -1.0, 1.0);
        let (mut want, mut wm, mut wr) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
        layer_norm_rows_with(
            Isa::Scalar,
            &x,
            &gamma,
            &beta,
            cols,
            eps,
            &mut want,
            &mut wm,
            &mut wr,
        );
        let g64: Vec<f64> = gamma.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = beta.iter().map(|&v| v as f64).collect();
        for r in 0..rows {
            let xr: Vec<f64> = x[r * cols..][..cols].iter().map(|&v| v as f64).collect();
            let exact = layer_norm_f64(&xr, &g64, &b64, eps as f64);
            // Rounding of the mean is amplified by rstd: |mean| * rstd * eps per element.
            let amp = (wm[r].abs() * wr[r]) as f64;
            for j in 0..cols {
                let tol = (cols as f64 + 8.0)
                    * EPS
                    * (1.0 + amp)
                    * (1.0 + gamma[j].abs() as f64 + exact[j].abs());
                let got = want[r * cols + j] as f64;
                assert!(
                    (got - exact[j]).abs() <= tol,
                    "scalar layer_norm {rows}x{cols}: {got} vs {}",
                    exact[j]
                );
            }
        }
        for isa in simd_isas() {
            let (mut got, mut gm, mut gr) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
            layer_norm_rows_with(
                isa, &x, &gamma, &beta, cols, eps, &mut got, &mut gm, &mut gr,
            );
            for r in 0..rows {
                let amp = (wm[r].abs() * wr[r]) as f64;
                assert!(
                    close(gm[r], wm[r], (cols as f64 + 4.0) * EPS, 0.0),
                    "mean {isa:?}"
                );
                assert!(
                    close(gr[r], wr[r], (cols as f64 + 4.0) * EPS * (1.0 + amp), 0.0),
                    "rstd {isa:?}"
                );
                for j in 0..cols {
                    let i = r * cols + j;
                    let tol = 2.0
                        * (cols as f64 + 8.0)
                        * EPS
                        * (1.0 + amp)
                        * (1.0 + gamma[j].abs() as f64 + want[i].abs() as f64);
                    assert!(
                        close(got[i], want[i], 0.0, tol),
                        "layer_norm {isa:?} {rows}x{cols} i={i}: {} vs {}",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
}

#[test]
fn layer_norm_backward_matches_finite_differences_and_scalar() {
    let mut rng = Rng(16);
    let eps = 1e-5f32;
    for (rows, cols) in row_shapes(&mut rng, 30) {
        let n = rows * cols;
        let x: Vec<f32> = (0..n).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let gamma = rng.vec_in(cols, -2.0, 2.0);
        let beta = rng.vec_in(cols, -1.0, 1.0);
        let dy = rng.vec_in(n, -1.0, 1.0);
        let (mut out, mut mean, mut rstd) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
        layer_norm_rows_with(
            Isa::Scalar,
            &x,
            &gamma,
            &beta,
            cols,
            eps,
            &mut out,
            &mut mean,
            &mut rstd,
        );
        // dgamma/dbeta start non-zero: the kernel must add to them.
        let dg0 = rng.vec_in(cols, -1.0, 1.0);
        let db0 = rng.vec_in(cols, -1.0, 1.0);
        let (mut dx, mut dg, mut db) = (vec![0.0; n], dg0.clone(), db0.clone());
        layer_norm_backward_rows_with(
            Isa::Scalar,
            &x,
            &gamma,
            &mean,
            &rstd,
            &dy,
            cols,
            &mut dx,
            &mut dg,
            &mut db,
        );

        if cols <= 48 {
            // L = Σ dy · layer_norm(x, gamma, beta), central differences in f64.
            let to64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
            let (x64, g64, b64) = (to64(&x), to64(&gamma), to64(&beta));
            let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
                let mut l = 0.0;
                for r in 0..rows {
                    let o = layer_norm_f64(&x[r * cols..][..cols], g, b, eps as f64);
                    l += o
                        .iter()
                        .zip(&dy[r * cols..][..cols])
                        .map(|(a, &d)| a * d as f64)
                        .sum::<f64>();
                }
                l
            };
            let h = 1e-6;
            let fd = |v: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
                let (mut p, mut m) = (v.to_vec(), v.to_vec());
                p[i] += h;
                m[i] -= h;
                (f(&p) - f(&m)) / (2.0 * h)
            };
            // rstd can reach 1/sqrt(eps) for near-constant rows; scale tolerances with it.
            let rmax = rstd.iter().fold(1.0f32, |a, &b| a.max(b)) as f64;
            for i in 0..n {
                let want = fd(&x64, i, &|xv| loss(xv, &g64, &b64));
                let tol = 1e-4 * rmax * (1.0 + want.abs());
                assert!(
                    (dx[i] as f64 - want).abs() <= tol,
                    "dx[{i}] {rows}x{cols}: {} vs fd {want}",
                    dx[i]
                );
            }
            for j in 0..cols {
                let want_g = fd(&g64, j, &|gv| loss(&x64, gv, &b64)) + dg0[j] as f64;
                let want_b = fd(&b64, j, &|bv| loss(&x64, &g64, bv)) + db0[j] as f64;
                assert!(
                    (dg[j] as f64 - want_g).abs() <= 1e-4 * (1.0 + want_g.abs()),
                    "dgamma[{j}]: {} vs {want_g}",
                    dg[j]
                );
                assert!(
                    (db[j] as f64 - want_b).abs() <= 1e-4 * (1.0 + want_b.abs()),
                    "dbeta[{j}]: {} vs {want_b}",
                    db[j]
                );
            }
        }

        for isa in simd_isas() {
            let (mut sdx, mut sdg, mut sdb) = (vec![0.0; n], dg0.clone(), db0.clone());
            layer_norm_backward_rows_with(
                isa, &x, &gamma, &mean, &rstd, &dy, cols, &mut sdx, &mut sdg, &mut sdb,
            );
            let tol = 4.0 * (cols as f64 + 8.0) * EPS;
            for r in 0..rows {
                let scale: f64 = (0..cols)
                    .map(|j| (dy[r * cols + j] * gamma[j]).abs() as f64)
                    .sum::<f64>()
                    * rstd[r] as f64;
                for j in 0..cols {
                    let i = r * cols + j;
                    assert!(
                        close(sdx[i], dx[i], 0.0, tol * (1.0 + scale)),
                        "dx {isa:?} {rows}x{cols}: {} vs {}",
                        sdx[i],
                        dx[i]
                    );
                }
            }
            for j in 0..cols {
                let s: f64 = 1.0
                    + dg0[j].abs() as f64
                    + (0..rows)
                        .map(|r| (dy[r * cols + j] as f64 * 4.0).abs())
                        .sum::<f64>();
                assert!(
                    close(sdg[j], dg[j], 0.0, tol * s),
                    "dgamma {isa:?}: {} vs {}",
                    sdg[j],
                    dg[j]
                );
                assert!(
                    close(sdb[j], db[j], 0.0, tol * s),
                    "dbeta {isa:?}: {} vs {}",
                    sdb[j],
                    db[j]
                );
            }
        }
    }
}

#[test]
fn layer_norm_backward_many_rows_sums_across_chunks() {
    // Enough rows for several dgamma/dbeta chunks; compare the reduction with f64.
    let mut rng = Rng(17);
    let (rows, cols) = (2000usize, 37usize);
    assert!(rows.div_ceil(layer_norm_chunk_rows(rows, cols)) > 1);
    let n = rows * cols;
    let x = rng.vec_in(n, -2.0, 2.0);
    let gamma = rng.vec_in(cols, -2.0, 2.0);
    let beta = vec![0.0; cols];
    let dy = rng.vec_in(n, -1.0, 1.0);
    for isa in Isa::available() {
        let (mut out, mut mean, mut rstd) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
        layer_norm_rows_with(
            isa, &x, &gamma, &beta, cols, 1e-5, &mut out, &mut mean, &mut rstd,
        );
        let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; cols], vec![0.0; cols]);
        layer_norm_backward_rows_with(
            isa, &x, &gamma, &mean, &rstd, &dy, cols, &mut dx, &mut dg, &mut db,
        );
        for j in 0..cols {
            let (mut eg, mut eb, mut abs) = (0.0f64, 0.0f64, 0.0f64);
            for r in 0..rows {
                let xhat = (x[r * cols + j] as f64 - mean[r] as f64) * rstd[r] as f64;
                let d = dy[r * cols + j] as f64;
                eg += d * xhat;
                eb += d;
                abs += d.abs() * (1.0 + xhat.abs());
            }
            let bound = 2.0 * rows as f64 * EPS * abs;
            assert!(
                (dg[j] as f64 - eg).abs() <= bound,
                "dgamma {isa:?} j={j}: {} vs {eg}",
                dg[j]
            );
            assert!(
                (db[j] as f64 - eb).abs() <= bound,
                "dbeta {isa:?} j={j}: {} vs {eb}",
                db[j]
            );
        }
    }
}

// --------------------------------------------------------------------------------------------
// AdamW.

#[test]
fn adamw_matches_f64_formula() {
    let mut rng = Rng(18);
    for n in lengths(&mut rng, 30) {
        let p0: Vec<f32> = (0..n).map(|_| rng.moderate(3.0)).collect();
        let g: Vec<f32> = (0..n).map(|_| rng.moderate(10.0)).collect();
        let m0: Vec<f32> = (0..n).map(|_| rng.moderate(1.0)).collect();
        let v0: Vec<f32> = (0..n).map(|_| rng.moderate(1.0).abs()).collect();
        let lr = 10f64.powf(rng.uniform(-4.0, -1.0) as f64) as f32;
        let (b1, b2, eps) = (rng.uniform(0.8, 0.95), rng.uniform(0.95, 0.9999), 1e-8f32);
        let wd = rng.uniform(0.0, 0.2);
        let step = 1 + rng.below(2000) as u64;
        for isa in Isa::available() {
            let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
            adamw_with(isa, &mut p, &g, &mut m, &mut v, lr, b1, b2, eps, wd, step);
            for i in 0..n {
                let (lr, b1, b2, wd) = (lr as f64, b1 as f64, b2 as f64, wd as f64);
                let gi = g[i] as f64;
                let em = b1 * m0[i] as f64 + (1.0 - b1) * gi;
                let ev = b2 * v0[i] as f64 + (1.0 - b2) * gi * gi;
                let mhat = em / (1.0 - b1.powi(step as i32));
                let vhat = ev / (1.0 - b2.powi(step as i32));
                let denom = vhat.sqrt() + eps as f64;
                let upd = lr * mhat / denom;
                let ep = p0[i] as f64 * (1.0 - lr * wd) - upd;
                // m may cancel (b1 m0 against (1 - b1) g): bound by the magnitudes that enter it.
                let m_mag = b1 * (m0[i].abs() as f64) + (1.0 - b1) * gi.abs();
                let upd_mag = lr * m_mag / (1.0 - b1.powi(step as i32)) / denom;
                let tol_p = 8.0 * EPS * (p0[i].abs() as f64 + upd_mag);
                assert!(
                    (p[i] as f64 - ep).abs() <= tol_p,
                    "adamw p {isa:?} step={step}: {} vs {ep}",
                    p[i]
                );
                let tol_m = 4.0 * EPS * (m0[i].abs() as f64 + gi.abs());
                assert!(
                    (m[i] as f64 - em).abs() <= tol_m,
                    "adamw m {isa:?}: {} vs {em}",
                    m[i]
                );
                let tol_v = 4.0 * EPS * (v0[i] as f64 + gi * gi);
                assert!(
                    (v[i] as f64 - ev).abs() <= tol_v,
                    "adamw v {isa:?}: {} vs {ev}",
                    v[i]
                );
            }
        }
    }
}

// --------------------------------------------------------------------------------------------
// Thread-count independence and the plain (isa()) entry points.

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("build rayon pool")
        .install(f)
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Rng(19);
    // Long enough for the parallel paths (>= 2 blocks), with a ragged end.
    let n = 5 * ELEMWISE_BLOCK + 13;
    let a = rng.vec_in(n, -20.0, 20.0);
    let b = rng.vec_in(n, -2.0, 2.0);
    let (rows, cols) = (300, 257);
    let xr = ln_rows(&mut rng, rows, cols);
    let gamma = rng.vec_in(cols, -2.0, 2.0);
    let beta = rng.vec_in(cols, -1.0, 1.0);
    let dyr = rng.vec_in(rows * cols, -1.0, 1.0);
    let (lrows, lcols) = (3000, 40); // several layer-norm-backward chunks
    let xl = rng.vec_in(lrows * lcols, -2.0, 2.0);
    let gl = rng.vec_in(lcols, -2.0, 2.0);
    let dyl = rng.vec_in(lrows * lcols, -1.0, 1.0);
    for isa in Isa::available() {
        let run = || {
            let mut outs: Vec<Vec<f32>> = Vec::new();
            let mut o = vec![0.0; n];
            exp_with(isa, &a, &mut o);
            outs.push(o.clone());
            gelu_with(isa, &a, &mut o);
            outs.push(o.clone());
            add_with(isa, &a, &b, &mut o);
            outs.push(o.clone());
            let mut y = b.clone();
            axpy_with(isa, 0.3, &a, &mut y);
            outs.push(y);
            let (mut p, mut m, mut v) = (a.clone(), b.clone(), vec![0.5; n]);
            adamw_with(
                isa, &mut p, &b, &mut m, &mut v, 1e-3, 0.9, 0.999, 1e-8, 0.1, 7,
            );
            outs.extend([p, m, v]);
            let mut o = vec![0.0; rows * cols];
            softmax_rows_with(isa, &xr, cols, &mut o);
            outs.push(o.clone());
            log_softmax_rows_with(isa, &xr, cols, &mut o);
            outs.push(o.clone());
            softmax_backward_rows_with(isa, &outs[outs.len() - 2], &dyr, cols, &mut o);
            outs.push(o.clone());
            let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
            layer_norm_rows_with(
                isa, &xr, &gamma, &beta, cols, 1e-5, &mut o, &mut mean, &mut rstd,
            );
            outs.extend([o, mean, rstd]);
            let (mut mean, mut rstd) = (vec![0.0; lrows], vec![0.0; lrows]);
            let mut o = vec![0.0; lrows * lcols];
            layer_norm_rows_with(
                isa,
                &xl,
                &gl,
                &vec![0.0; lcols],
                lcols,
                1e-5,
                &mut o,
                &mut mean,
                &mut rstd,
            );
            let (mut dx, mut dg, mut db) =
                (vec![0.0; lrows * lcols], vec![0.0; lcols], vec![0.0; lcols]);
            layer_norm_backward_rows_with(
                isa, &xl, &gl, &mean, &rstd, &dyl, lcols, &mut dx, &mut dg, &mut db,
            );
            outs.extend([dx, dg, db]);
            outs
        };
        let one = in_pool(1, run);
        let two = in_pool(2, run);
        let three = in_pool(3, run);
        for (k, ((a1, a2), a3)) in one.iter().zip(&two).zip(&three).enumerate() {
            assert!(
                same_bits(a1, a2) && same_bits(a1, a3),
                "output {k} differs across thread counts on {isa:?}"
            );
        }
        // Element results do not depend on the position in the slice: one block on its own
        // gives the same bits as inside the long call.
        let mut whole = vec![0.0; n];
        let mut part = vec![0.0; 100];
        gelu_with(isa, &a, &mut whole);
        gelu_with(isa, &a[ELEMWISE_BLOCK + 5..ELEMWISE_BLOCK + 105], &mut part);
        assert!(
            same_bits(&part, &whole[ELEMWISE_BLOCK + 5..ELEMWISE_BLOCK + 105]),
            "{isa:?}"
        );
    }
}

#[test]
fn plain_entry_points_use_the_selected_isa() {
    let mut rng = Rng(20);
    let a = rng.vec_in(77, -5.0, 5.0);
    let (mut o1, mut o2, mut o3, mut o4) =
        (vec![0.0; 77], vec![0.0; 77], vec![0.0; 77], vec![0.0; 77]);
    // Another test may call force_isa meanwhile; compare only when the level held still.
    for _ in 0..100 {
        let before = isa();
        exp(&a, &mut o1);
        exp_with(before, &a, &mut o2);
        let s = (sum(&a), sum_with(before, &a));
        softmax_rows(&a, 11, &mut o3);
        softmax_rows_with(before, &a, 11, &mut o4);
        if isa() == before {
            assert!(same_bits(&o1, &o2) && same_bits(&o3, &o4), "{before:?}");
            assert_eq!(s.0.to_bits(), s.1.to_bits(), "{before:?}");
            return;
        }
    }
    panic!("cpu::isa() kept changing");
}

#[test]
#[should_panic(expected = "cpu::vec::add: out has length 2, expected 3")]
fn length_mismatch_is_reported() {
    add(&[1.0; 3], &[1.0; 3], &mut [0.0; 2]);
}

#[test]
#[should_panic(expected = "not a whole number of rows")]
fn ragged_rows_are_reported() {
    softmax_rows(&[1.0; 7], 3, &mut [0.0; 7]);
}
