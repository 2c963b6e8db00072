//! The SIMD kernels, written once over a small vector trait ([`Simd`]) and instantiated for
//! AVX2+FMA and AVX-512 in `x86.rs`.
//!
//! Everything here is `#[inline(always)]` and carries no target features of its own: it is only
//! ever inlined into the `#[target_feature]` entry points of `x86.rs`, where the intrinsics behind
//! the trait methods inline too. (A non-inlined call into this module would still be correct,
//! only slow; the benchmarks would show it.) Callers of every `unsafe fn` here must run on a CPU
//! with the features of `S`, and pass slices whose lengths `mod.rs` has checked.
//!
//! Tails (lengths not a multiple of the vector width) go through the same vector code with
//! masked loads and stores, so an element's result never depends on where it sits in a slice:
//! splitting an elementwise op across threads at any multiple of the width gives the same bits.

use super::scalar::{GELU_A, GELU_C, GELU_HI, GELU_LO};
use super::AdamCoeffs;

/// A vector of `LANES` f32 on one instruction set. Methods are thin wrappers over intrinsics.
///
/// `max`/`min` keep the x86 rule: when either operand is NaN the *second* is returned. The
/// clamps below pass the value being clamped second, so NaN flows through them.
pub(crate) trait Simd {
    const LANES: usize;
    type V: Copy;
    /// Per-lane result of a comparison.
    type Mask: Copy;
    /// Which lanes of a partial (tail) vector are live.
    type Tail: Copy;

    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `n` lanes, `0 < n < LANES`.
    unsafe fn tail(n: usize) -> Self::Tail;
    /// Loads the live lanes; dead lanes hold `fill`. Dead lanes are never read from memory.
    unsafe fn load_tail(p: *const f32, t: Self::Tail, fill: Self::V) -> Self::V;
    /// Stores the live lanes only.
    unsafe fn store_tail(p: *mut f32, t: Self::Tail, v: Self::V);
    /// Live lanes of `v`, zero in dead lanes (so a tail adds nothing from its dead lanes).
    unsafe fn zero_dead(t: Self::Tail, v: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// a * b + c, one rounding.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// c - a * b, one rounding.
    unsafe fn fnmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sqrt(a: Self::V) -> Self::V;
    unsafe fn abs(a: Self::V) -> Self::V;
    /// |mag| with the sign bit of `sign`.
    unsafe fn copysign(mag: Self::V, sign: Self::V) -> Self::V;
    /// Round to nearest, ties to even.
    unsafe fn round(a: Self::V) -> Self::V;
    /// 2^n for lanes holding integers in [-126, 127] (built from the exponent bits).
    unsafe fn pow2(n: Self::V) -> Self::V;
    unsafe fn lt(a: Self::V, b: Self::V) -> Self::Mask;
    /// `m ? a : b` per lane.
    unsafe fn select(m: Self::Mask, a: Self::V, b: Self::V) -> Self::V;
    /// The lanes in order; only the first `LANES` entries are meaningful.
    unsafe fn to_array(v: Self::V) -> [f32; 16];
}

// ---------------------------------------------------------------------------------------------
// Horizontal reductions, in a fixed order (pairwise halving) so results are reproducible.

#[inline(always)]
unsafe fn hsum<S: Simd>(v: S::V) -> f32 {
    let mut a = S::to_array(v);
    let mut w = S::LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            a[i] += a[i + w];
        }
    }
    a[0]
}

#[inline(always)]
unsafe fn hmax<S: Simd>(v: S::V) -> f32 {
    let a = S::to_array(v);
    a[..S::LANES]
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

// ---------------------------------------------------------------------------------------------
// Transcendentals on vectors.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two: `LN2_HI` has few significant bits, so n * LN2_HI is exact for the |n| <=
/// 150 used here and x - n ln2 keeps nearly full precision (Cody–Waite range reduction).
const LN2_HI: f32 = 0.693_359_4; // 355/512
const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 - 355/512
/// exp(x) is +inf above this (ln of f32::MAX is 88.72) and the clamp keeps n within the
/// two-factor scaling below.
const EXP_HI: f32 = 89.0;
/// exp(x) rounds to 0 below about -103.97 (half the smallest subnormal).
const EXP_LO: f32 = -104.0;

/// expm1(r) for |r| <= ln2/2 (+ a little): Taylor series to degree 7. The first omitted term,
/// r^8/8!, is below 6e-9 there, a small fraction of an ulp of exp(r); the form r * q(r) keeps
/// full relative precision as r -> 0, which tanh relies on.
#[inline(always)]
unsafe fn expm1_reduced<S: Simd>(r: S::V) -> S::V {
    let mut q = S::splat(1.0 / 5040.0);
    q = S::fmadd(q, r, S::splat(1.0 / 720.0));
    q = S::fmadd(q, r, S::splat(1.0 / 120.0));
    q = S::fmadd(q, r, S::splat(1.0 / 24.0));
    q = S::fmadd(q, r, S::splat(1.0 / 6.0));
    q = S::fmadd(q, r, S::splat(0.5));
    q = S::fmadd(q, r, S::splat(1.0));
    S::mul(q, r)
}

/// Splits x = n ln2 + r with n integral and |r| <= ln2/2; returns (n, r).
#[inline(always)]
unsafe fn reduce_ln2<S: Simd>(x: S::V) -> (S::V, S::V) {
    let n = S::round(S::mul(x, S::splat(LOG2E)));
    let r = S::fnmadd(n, S::splat(LN2_HI), x);
    let r = S::fnmadd(n, S::splat(LN2_LO), r);
    (n, r)
}

/// e^x = 2^n e^r. The scale is applied as two factors 2^n1 2^n2 (each within the normal range)
/// so that results in the subnormal range (x < -87.3) are rounded once from a full-precision
/// value, and overflow to +inf happens in the last multiply. -inf -> 0, +inf -> +inf, NaN -> NaN.
#[inline(always)]
pub(super) unsafe fn exp_v<S: Simd>(x: S::V) -> S::V {
    let x = S::min(S::splat(EXP_HI), S::max(S::splat(EXP_LO), x));
    let (n, r) = reduce_ln2::<S>(x);
    let p = expm1_reduced::<S>(r);
    let n1 = S::round(S::mul(n, S::splat(0.5)));
    let n2 = S::sub(n, n1);
    let s1 = S::pow2(n1);
    S::mul(S::fmadd(p, s1, s1), S::pow2(n2))
}

/// expm1(y) for y <= 0 (the only use is tanh): 2^n expm1(r) + (2^n - 1). For n = 0 this is the
/// polynomial itself, which keeps relative precision for tiny |y|.
#[inline(always)]
unsafe fn expm1_nonpositive<S: Simd>(y: S::V) -> S::V {
    // expm1(-20) is -1 in f32; the clamp keeps 2^n normal.
    let y = S::max(S::splat(-20.0), y);
    let (n, r) = reduce_ln2::<S>(y);
    let p = expm1_reduced::<S>(r);
    let s = S::pow2(n);
    S::fmadd(p, s, S::sub(s, S::splat(1.0)))
}

/// tanh|x| = -t / (t + 2) with t = expm1(-2|x|) in (-1, 0]: no overflow, -> 1 at large |x|,
/// and relative precision near 0; then the sign of x.
#[inline(always)]
pub(super) unsafe fn tanh_v<S: Simd>(x: S::V) -> S::V {
    let t = expm1_nonpositive::<S>(S::mul(S::abs(x), S::splat(-2.0)));
    let th = S::div(t, S::sub(S::splat(-2.0), t));
    S::copysign(th, x)
}

/// Same stable form as `scalar::sigmoid_one`.
#[inline(always)]
pub(super) unsafe fn sigmoid_v<S: Simd>(x: S::V) -> S::V {
    let e = exp_v::<S>(S::sub(S::splat(0.0), S::abs(x)));
    let r = S::div(S::splat(1.0), S::add(S::splat(1.0), e));
    S::select(S::lt(x, S::splat(0.0)), S::mul(e, r), r)
}

/// x * sigmoid(2u), as `scalar::gelu_one`.
#[inline(always)]
pub(super) unsafe fn gelu_v<S: Simd>(x: S::V) -> S::V {
    let x = S::max(S::splat(GELU_LO), x);
    let inner = S::fmadd(S::mul(x, x), S::splat(GELU_A), S::splat(1.0));
    let v = S::mul(S::mul(x, S::splat(2.0 * GELU_C)), inner);
    S::mul(x, sigmoid_v::<S>(v))
}

/// gelu'(x), as `scalar::gelu_grad_one`.
#[inline(always)]
unsafe fn gelu_grad_v<S: Simd>(x: S::V) -> S::V {
    let x = S::min(S::splat(GELU_HI), S::max(S::splat(GELU_LO), x));
    let x2 = S::mul(x, x);
    let v = S::mul(
        S::mul(x, S::splat(2.0 * GELU_C)),
        S::fmadd(x2, S::splat(GELU_A), S::splat(1.0)),
    );
    let dv = S::mul(
        S::splat(2.0 * GELU_C),
        S::fmadd(x2, S::splat(3.0 * GELU_A), S::splat(1.0)),
    );
    let e = exp_v::<S>(S::sub(S::splat(0.0), S::abs(v)));
    let r = S::div(S::splat(1.0), S::add(S::splat(1.0), e));
    let s = S::select(S::lt(v, S::splat(0.0)), S::mul(e, r), r);
    let ss = S::mul(S::mul(e, r), r); // s (1 - s)
    S::fmadd(S::mul(x, dv), ss, s)
}

// ---------------------------------------------------------------------------------------------
// Elementwise drivers. Ops are zero-sized (or small) structs with `#[inline(always)]` methods
// rather than closures, because closures cannot be forced inline and a non-inlined closure
// would call every intrinsic out of line.

pub(super) trait Unary {
    unsafe fn apply<S: Simd>(&self, x: S::V) -> S::V;
}

pub(super) trait Binary {
    unsafe fn apply<S: Simd>(&self, a: S::V, b: S::V) -> S::V;
}

#[inline(always)]
pub(super) unsafe fn map1<S: Simd, O: Unary>(op: O, a: &[f32], out: &mut [f32]) {
    let n = a.len();
    let (pa, po) = (a.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + S::LANES <= n {
        S::store(po.add(i), op.apply::<S>(S::load(pa.add(i))));
        i += S::LANES;
    }
    if i < n {
        let t = S::tail(n - i);
        let x = S::load_tail(pa.add(i), t, S::splat(0.0));
        S::store_tail(po.add(i), t, op.apply::<S>(x));
    }
}

#[inline(always)]
pub(super) unsafe fn map2<S: Simd, O: Binary>(op: O, a: &[f32], b: &[f32], out: &mut [f32]) {
    let n = a.len();
    let (pa, pb, po) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + S::LANES <= n {
        let r = op.apply::<S>(S::load(pa.add(i)), S::load(pb.add(i)));
        S::store(po.add(i), r);
        i += S::LANES;
    }
    if i < n {
        let t = S::tail(n - i);
        let z = S::splat(0.0);
        let r = op.apply::<S>(S::load_tail(pa.add(i), t, z), S::load_tail(pb.add(i), t, z));
        S::store_tail(po.add(i), t, r);
    }
}

macro_rules! binary_op {
    ($name:ident, $method:ident) => {
        pub(super) struct $name;
        impl Binary for $name {
            #[inline(always)]
            unsafe fn apply<S: Simd>(&self, a: S::V, b: S::V) -> S::V {
                S::$method(a, b)
            }
        }
    };
}
binary_op!(Add, add);
binary_op!(Sub, sub);
binary_op!(Mul, mul);
binary_op!(Div, div);

pub(super) struct AddScalar(pub f32);
impl Unary for AddScalar {
    #[inline(always)]
    unsafe fn apply<S: Simd>(&self, x: S::V) -> S::V {
        S::add(x, S::splat(self.0))
    }
}

pub(super) struct MulScalar(pub f32);
impl Unary for MulScalar {
    #[inline(always)]
    unsafe fn apply<S: Simd>(&self, x: S::V) -> S::V {
        S::mul(x, S::splat(self.0))
    }
}

macro_rules! unary_fn_op {
    ($name:ident, $f:ident) => {
        pub(super) struct $name;
        impl Unary for $name {
            #[inline(always)]
            unsafe fn apply<S: Simd>(&self, x: S::V) -> S::V {
                $f::<S>(x)
            }
        }
    };
}
unary_fn_op!(Exp, exp_v);
unary_fn_op!(Tanh, tanh_v);
unary_fn_op!(Sigmoid, sigmoid_v);
unary_fn_op!(Gelu, gelu_v);

/// dx = dy * gelu'(x).
pub(super) struct GeluBackward;
impl Binary for GeluBackward {
    #[inline(always)]
    unsafe fn apply<S: Simd>(&self, x: S::V, dy: S::V) -> S::V {
        S::mul(dy, gelu_grad_v::<S>(x))
    }
}

// ---------------------------------------------------------------------------------------------
// Reductions: four accumulators (hides add latency), then single vectors, then a masked tail,
// combined as (s0 + s1) + (s2 + s3) and reduced pairwise. Fixed order for a given length.

#[inline(always)]
pub(super) unsafe fn sum<S: Simd>(a: &[f32]) -> f32 {
    let n = a.len();
    let p = a.as_ptr();
    let w = S::LANES;
    let z = S::splat(0.0);
    let (mut s0, mut s1, mut s2, mut s3) = (z, z, z, z);
    let mut i = 0;
    while i + 4 * w <= n {
        s0 = S::add(s0, S::load(p.add(i)));
        s1 = S::add(s1, S::load(p.add(i + w)));
        s2 = S::add(s2, S::load(p.add(i + 2 * w)));
        s3 = S::add(s3, S::load(p.add(i + 3 * w)));
        i += 4 * w;
    }
    while i + w <= n {
        s0 = S::add(s0, S::load(p.add(i)));
        i += w;
    }
    if i < n {
        s1 = S::add(s1, S::load_tail(p.add(i), S::tail(n - i), z));
    }
    hsum::<S>(S::add(S::add(s0, s1), S::add(s2, s3)))
}

#[inline(always)]
pub(super) unsafe fn dot<S: Simd>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let w = S::LANES;
    let z = S::splat(0.0);
    let (mut s0, mut s1, mut s2, mut s3) = (z, z, z, z);
    let mut i = 0;
    while i + 4 * w <= n {
        s0 = S::fmadd(S::load(pa.add(i)), S::load(pb.add(i)), s0);
        s1 = S::fmadd(S::load(pa.add(i + w)), S::load(pb.add(i + w)), s1);
        s2 = S::fmadd(S::load(pa.add(i + 2 * w)), S::load(pb.add(i + 2 * w)), s2);
        s3 = S::fmadd(S::load(pa.add(i + 3 * w)), S::load(pb.add(i + 3 * w)), s3);
        i += 4 * w;
    }
    while i + w <= n {
        s0 = S::fmadd(S::load(pa.add(i)), S::load(pb.add(i)), s0);
        i += w;
    }
    if i < n {
        let t = S::tail(n - i);
        s1 = S::fmadd(
            S::load_tail(pa.add(i), t, z),
            S::load_tail(pb.add(i), t, z),
            s1,
        );
    }
    hsum::<S>(S::add(S::add(s0, s1), S::add(s2, s3)))
}

/// NaN lanes are ignored (the accumulator is the second operand of `max`), like `f32::max`.
#[inline(always)]
pub(super) unsafe fn max<S: Simd>(a: &[f32]) -> f32 {
    let n = a.len();
    let p = a.as_ptr();
    let w = S::LANES;
    let lo = S::splat(f32::NEG_INFINITY);
    let (mut m0, mut m1, mut m2, mut m3) = (lo, lo, lo, lo);
    let mut i = 0;
    while i + 4 * w <= n {
        m0 = S::max(S::load(p.add(i)), m0);
        m1 = S::max(S::load(p.add(i + w)), m1);
        m2 = S::max(S::load(p.add(i + 2 * w)), m2);
        m3 = S::max(S::load(p.add(i + 3 * w)), m3);
        i += 4 * w;
    }
    while i + w <= n {
        m0 = S::max(S::load(p.add(i)), m0);
        i += w;
    }
    if i < n {
        m1 = S::max(S::load_tail(p.add(i), S::tail(n - i), lo), m1);
    }
    hmax::<S>(S::max(S::max(m0, m1), S::max(m2, m3)))
}

#[inline(always)]
pub(super) unsafe fn axpy<S: Simd>(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let al = S::splat(alpha);
    let mut i = 0;
    while i + S::LANES <= n {
        S::store(
            py.add(i),
            S::fmadd(al, S::load(px.add(i)), S::load(py.add(i))),
        );
        i += S::LANES;
    }
    if i < n {
        let t = S::tail(n - i);
        let z = S::splat(0.0);
        let r = S::fmadd(
            al,
            S::load_tail(px.add(i), t, z),
            S::load_tail(py.add(i), t, z),
        );
        S::store_tail(py.add(i), t, r);
    }
}

// ---------------------------------------------------------------------------------------------
// Row kernels: `x` holds whole rows of `cols`; each row is done start to end by the calling
// thread. The row loops below all share one shape: full vectors, then one masked tail.

/// out = exp(x - m); returns the sum of out.
#[inline(always)]
unsafe fn exp_sub_store_sum<S: Simd>(x: &[f32], m: f32, out: &mut [f32]) -> f32 {
    let n = x.len();
    let (px, po) = (x.as_ptr(), out.as_mut_ptr());
    let mv = S::splat(m);
    let (mut s0, mut s1) = (S::splat(0.0), S::splat(0.0));
    let mut i = 0;
    while i + S::LANES <= n {
        let e = exp_v::<S>(S::sub(S::load(px.add(i)), mv));
        S::store(po.add(i), e);
        s0 = S::add(s0, e);
        i += S::LANES;
    }
    if i < n {
        let t = S::tail(n - i);
        let e = exp_v::<S>(S::sub(S::load_tail(px.add(i), t, mv), mv));
        S::store_tail(po.add(i), t, e);
        s1 = S::zero_dead(t, e);
    }
    hsum::<S>(S::add(s0, s1))
}

/// sum of exp(x - m), nothing stored.
#[inline(always)]
unsafe fn sum_exp_sub<S: Simd>(x: &[f32], m: f32) -> f32 {
    let n = x.len();
    let px = x.as_ptr();
    let mv = S::splat(m);
    let (mut s0, mut s1) = (S::splat(0.0), S::splat(0.0));
    let mut i = 0;
    while i + S::LANES <= n {
        s0 = S::add(s0, exp_v::<S>(S::sub(S::load(px.add(i)), mv)));
        i += S::LANES;
    }
    if i < n {
        let t = S::tail(n - i);
        s1 = S::zero_dead(t, exp_v::<S>(S::sub(S::load_tail(px.add(i), t, mv), mv)));
    }
    hsum::<S>(S::add(s0, s1))
}

#[inline(always)]
pub(super) unsafe fn softmax_rows<S: Simd>(x: &[f32], cols: usize, out: &mut [f32]) {
    for (x, out) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let m = max::<S>(x);
        let s = exp_sub_store_sum::<S>(x, m, out);
        let inv = 1.0 / s;
        let po = out.as_mut_ptr();
        // In place: out[i] *= inv. The row was just written, so this pass runs from L1/L2.
        let iv = S::splat(inv);
        let mut i = 0;
        while i + S::LANES <= cols {
            S::store(po.add(i), S::mul(S::load(po.add(i)), iv));
            i += S::LANES;
        }
        if i < cols {
            let t = S::tail(cols - i);
            S::store_tail(po.add(i), t, S::mul(S::load_tail(po.add(i), t, iv), iv));
        }
    }
}

#[inline(always)]
pub(super) unsafe fn log_softmax_rows<S: Simd>(x: &[f32], cols: usize, out: &mut [f32]) {
    for (x, out) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let m = max::<S>(x);
        let log_s = sum_exp_sub::<S>(x, m).ln();
        let (mv, lv) = (S::splat(m), S::splat(log_s));
        let (px, po) = (x.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i + S::LANES <= cols {
            S::store(po.add(i), S::sub(S::sub(S::load(px.add(i)), mv), lv));
            i += S::LANES;
        }
        if i < cols {
            let t = S::tail(cols - i);
            let v = S::load_tail(px.add(i), t, mv);
            S::store_tail(po.add(i), t, S::sub(S::sub(v, mv), lv));
        }
    }
}

#[inline(always)]
pub(super) unsafe fn softmax_backward_rows<S: Simd>(
    y: &[f32],
    dy: &[f32],
    cols: usize,
    dx: &mut [f32],
) {
    for ((y, dy), dx) in y
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
    {
        let d = S::splat(dot::<S>(dy, y));
        let (py, pg, po) = (y.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
        let mut i = 0;
        while i + S::LANES <= cols {
            let r = S::mul(S::load(py.add(i)), S::sub(S::load(pg.add(i)), d));
            S::store(po.add(i), r);
            i += S::LANES;
        }
        if i < cols {
            let t = S::tail(cols - i);
            let z = S::splat(0.0);
            let r = S::mul(
                S::load_tail(py.add(i), t, z),
                S::sub(S::load_tail(pg.add(i), t, z), d),
            );
            S::store_tail(po.add(i), t, r);
        }
    }
}

#[inline(always)]
pub(super) unsafe fn log_softmax_backward_rows<S: Simd>(
    y: &[f32],
    dy: &[f32],
    cols: usize,
    dx: &mut [f32],
) {
    for ((y, dy), dx) in y
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
    {
        let s = S::splat(sum::<S>(dy));
        let (py, pg, po) = (y.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
        let mut i = 0;
        while i + S::LANES <= cols {
            let e = exp_v::<S>(S::load(py.add(i)));
            S::store(po.add(i), S::fnmadd(e, s, S::load(pg.add(i))));
            i += S::LANES;
        }
        if i < cols {
            let t = S::tail(cols - i);
            let z = S::splat(0.0);
            let e = exp_v::<S>(S::load_tail(py.add(i), t, z));
            S::store_tail(po.add(i), t, S::fnmadd(e, s, S::load_tail(pg.add(i), t, z)));
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn layer_norm_rows<S: Simd>(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    cols: usize,
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let n = cols as f32;
    let (pgam, pbet) = (gamma.as_ptr(), beta.as_ptr());
    let z = S::splat(0.0);
    for (((x, out), mu), rs) in x
        .chunks_exact(cols)
        .zip(out.chunks_exact_mut(cols))
        .zip(mean.iter_mut())
        .zip(rstd.iter_mut())
    {
        let (px, po) = (x.as_ptr(), out.as_mut_ptr());
        // Two passes, as the scalar path: the deviations are summed after the mean is known.
        let m = sum::<S>(x) / n;
        let mv = S::splat(m);
        let (mut s0, mut s1) = (z, z);
        let mut i = 0;
        while i + 2 * S::LANES <= cols {
            let d0 = S::sub(S::load(px.add(i)), mv);
            let d1 = S::sub(S::load(px.add(i + S::LANES)), mv);
            s0 = S::fmadd(d0, d0, s0);
            s1 = S::fmadd(d1, d1, s1);
            i += 2 * S::LANES;
        }
        while i + S::LANES <= cols {
            let d = S::sub(S::load(px.add(i)), mv);
            s0 = S::fmadd(d, d, s0);
            i += S::LANES;
        }
        if i < cols {
            let t = S::tail(cols - i);
            let d = S::sub(S::load_tail(px.add(i), t, mv), mv);
            s1 = S::fmadd(d, d, s1);
        }
        let r = 1.0 / (hsum::<S>(S::add(s0, s1)) / n + eps).sqrt();
        let rv = S::splat(r);
        let mut i = 0;
        while i + S::LANES <= cols {
            let xhat = S::mul(S::sub(S::load(px.add(i)), mv), rv);
            let o = S::fmadd(xhat, S::load(pgam.add(i)), S::load(pbet.add(i)));
            S::store(po.add(i), o);
            i += S::LANES;
        }
        if i < cols {
            let t = S::tail(cols - i);
            let xhat = S::mul(S::sub(S::load_tail(px.add(i), t, mv), mv), rv);
            let o = S::fmadd(
                xhat,
                S::load_tail(pgam.add(i), t, z),
                S::load_tail(pbet.add(i), t, z),
            );
            S::store_tail(po.add(i), t, o);
        }
        *mu = m;
        *rs = r;
    }
}

/// One chunk of rows: dx overwritten, dgamma/dbeta accumulated row after row (as the scalar path).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn layer_norm_backward_rows<S: Simd>(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    cols: usize,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let n = cols as f32;
    let (pgam, pdg, pdb) = (gamma.as_ptr(), dgamma.as_mut_ptr(), dbeta.as_mut_ptr());
    let z = S::splat(0.0);
    for ((((x, dy), dx), &m), &r) in x
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
        .zip(mean)
        .zip(rstd)
    {
        let (px, pg, po) = (x.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
        let (mv, rv) = (S::splat(m), S::splat(r));
        // Pass 1: sums of g = dy*gamma and g*xhat; accumulate dgamma += dy*xhat, dbeta += dy.
        let (mut sg, mut sgx) = (z, z);
        let mut i = 0;
        while i + S::LANES <= cols {
            let xhat = S::mul(S::sub(S::load(px.add(i)), mv), rv);
            let d = S::load(pg.add(i));
            let g = S::mul(d, S::load(pgam.add(i)));
            sg = S::add(sg, g);
            sgx = S::fmadd(g, xhat, sgx);
            S::store(pdg.add(i), S::fmadd(d, xhat, S::load(pdg.add(i))));
            S::store(pdb.add(i), S::add(S::load(pdb.add(i)), d));
            i += S::LANES;
        }
        if i < cols {
            let t = S::tail(cols - i);
            let xhat = S::mul(S::sub(S::load_tail(px.add(i), t, mv), mv), rv);
            let d = S::load_tail(pg.add(i), t, z);
            let g = S::mul(d, S::load_tail(pgam.add(i), t, z));
            sg = S::add(sg, S::zero_dead(t, g));
            sgx = S::add(sgx, S::zero_dead(t, S::mul(g, xhat)));
            let dg = S::fmadd(d, xhat, S::load_tail(pdg.add(i), t, z));
            S::store_tail(pdg.add(i), t, dg);
            S::store_tail(pdb.add(i), t, S::add(S::load_tail(pdb.add(i), t, z), d));
        }
        let a = S::splat(hsum::<S>(sg) / n);
        let b = S::splat(hsum::<S>(sgx) / n);
        // Pass 2: dx = r (g - a - xhat b).
        let mut i = 0;
        while i + S::LANES <= cols {
            let xhat = S::mul(S::sub(S::load(px.add(i)), mv), rv);
            let g = S::mul(S::load(pg.add(i)), S::load(pgam.add(i)));
            S::store(po.add(i), S::mul(rv, S::fnmadd(xhat, b, S::sub(g, a))));
            i += S::LANES;
        }
        if i < cols {
            let t = S::tail(cols - i);
            let xhat = S::mul(S::sub(S::load_tail(px.add(i), t, mv), mv), rv);
            let g = S::mul(
                S::load_tail(pg.add(i), t, z),
                S::load_tail(pgam.add(i), t, z),
            );
            S::store_tail(po.add(i), t, S::mul(rv, S::fnmadd(xhat, b, S::sub(g, a))));
        }
    }
}

/// AdamW coefficients, broadcast once per call.
struct AdamVecs<V> {
    decay: V,
    beta1: V,
    one_minus_beta1: V,
    beta2: V,
    one_minus_beta2: V,
    inv_bias_correction2_sqrt: V,
    eps: V,
    step_size: V,
}

/// One vector of (p, g, m, v) -> (p, m, v), in the operation order of the scalar path.
#[inline(always)]
unsafe fn adamw_update<S: Simd>(
    k: &AdamVecs<S::V>,
    p: S::V,
    g: S::V,
    m: S::V,
    v: S::V,
) -> (S::V, S::V, S::V) {
    let decayed = S::mul(p, k.decay);
    let m = S::fmadd(k.beta1, m, S::mul(k.one_minus_beta1, g));
    let v = S::fmadd(k.beta2, v, S::mul(S::mul(k.one_minus_beta2, g), g));
    let denom = S::fmadd(S::sqrt(v), k.inv_bias_correction2_sqrt, k.eps);
    (S::fnmadd(k.step_size, S::div(m, denom), decayed), m, v)
}

#[inline(always)]
pub(super) unsafe fn adamw<S: Simd>(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    c: &AdamCoeffs,
) {
    let n = param.len();
    let (pp, pg, pm, pv) = (
        param.as_mut_ptr(),
        grad.as_ptr(),
        m.as_mut_ptr(),
        v.as_mut_ptr(),
    );
    let k = AdamVecs {
        decay: S::splat(c.decay),
        beta1: S::splat(c.beta1),
        one_minus_beta1: S::splat(c.one_minus_beta1),
        beta2: S::splat(c.beta2),
        one_minus_beta2: S::splat(c.one_minus_beta2),
        inv_bias_correction2_sqrt: S::splat(c.inv_bias_correction2_sqrt),
        eps: S::splat(c.eps),
        step_size: S::splat(c.step_size),
    };
    let mut i = 0;
    while i + S::LANES <= n {
        let (p, mn, vn) = adamw_update::<S>(
            &k,
            S::load(pp.add(i)),
            S::load(pg.add(i)),
            S::load(pm.add(i)),
            S::load(pv.add(i)),
        );
        S::store(pp.add(i), p);
        S::store(pm.add(i), mn);
        S::store(pv.add(i), vn);
        i += S::LANES;
    }
    if i < n {
        let t = S::tail(n - i);
        let z = S::splat(0.0);
        let (p, mn, vn) = adamw_update::<S>(
            &k,
            S::load_tail(pp.add(i), t, z),
            S::load_tail(pg.add(i), t, z),
            S::load_tail(pm.add(i), t, z),
            S::load_tail(pv.add(i), t, z),
        );
        S::store_tail(pp.add(i), t, p);
        S::store_tail(pm.add(i), t, mn);
        S::store_tail(pv.add(i), t, vn);
    }
}
