//! The portable reference path: plain loops in the order a reader would write them.
//!
//! Every SIMD path is tested against these functions, and the tests check these against f64
//! math. Transcendentals use the standard library (correctly rounded or nearly so), written in the
//! same numerically stable forms as the SIMD code so that both agree at large |x| too. Lengths
//! were checked by the caller in `mod.rs`.

use super::AdamCoeffs;

pub(super) fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

pub(super) fn sub(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x - y;
    }
}

pub(super) fn mul(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x * y;
    }
}

pub(super) fn div(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x / y;
    }
}

pub(super) fn add_scalar(a: &[f32], s: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(a) {
        *o = x + s;
    }
}

pub(super) fn mul_scalar(a: &[f32], s: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(a) {
        *o = x * s;
    }
}

pub(super) fn exp(a: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(a) {
        *o = x.exp();
    }
}

pub(super) fn tanh(a: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(a) {
        *o = x.tanh();
    }
}

/// Sigmoid through `e = exp(-|x|)`, which never overflows: 1/(1+e) for x >= 0 and e/(1+e) for
/// x < 0, so tiny results for very negative x keep their relative accuracy.
#[inline]
pub(super) fn sigmoid_one(x: f32) -> f32 {
    let e = (-x.abs()).exp();
    let r = 1.0 / (1.0 + e);
    if x < 0.0 {
        e * r
    } else {
        r
    }
}

pub(super) fn sigmoid(a: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(a) {
        *o = sigmoid_one(x);
    }
}

pub(super) fn log(a: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(a) {
        *o = x.ln();
    }
}

/// sqrt(2/pi): the GPT-2 GELU constant.
pub(super) const GELU_C: f32 = 0.797_884_6;
/// The cubic coefficient of the GPT-2 GELU.
pub(super) const GELU_A: f32 = 0.044715;
/// Below this, GELU and its derivative are 0 in f32 (gelu(-20) ~ -20 e^-603); clamping here keeps
/// x = -inf from producing -inf * 0 = NaN.
pub(super) const GELU_LO: f32 = -20.0;
/// Above this the GELU derivative is exactly 1 in f32; clamping keeps x*gelu'' terms finite.
pub(super) const GELU_HI: f32 = 20.0;

/// GELU, tanh approximation, written as x * sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3).
/// This equals 0.5 x (1 + tanh(u)) exactly in real arithmetic but has no cancellation in
/// 1 + tanh(u) for negative x.
#[inline]
fn gelu_one(x: f32) -> f32 {
    let x = if x < GELU_LO { GELU_LO } else { x };
    let v = 2.0 * GELU_C * x * (1.0 + GELU_A * x * x);
    x * sigmoid_one(v)
}

pub(super) fn gelu(a: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(a) {
        *o = gelu_one(x);
    }
}

/// d/dx [x s(v)] = s + x v' s (1 - s), with v = 2u and s (1 - s) = e / (1 + e)^2, e = exp(-|v|).
#[inline]
fn gelu_grad_one(x: f32) -> f32 {
    let x = x.clamp(GELU_LO, GELU_HI); // NaN stays NaN
    let x2 = x * x;
    let v = 2.0 * GELU_C * x * (1.0 + GELU_A * x2);
    let dv = 2.0 * GELU_C * (1.0 + 3.0 * GELU_A * x2);
    let e = (-v.abs()).exp();
    let r = 1.0 / (1.0 + e);
    let s = if v < 0.0 { e * r } else { r };
    s + x * dv * (e * r * r)
}

pub(super) fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((o, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
        *o = g * gelu_grad_one(x);
    }
}

pub(super) fn sum(a: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &x in a {
        s += x;
    }
    s
}

pub(super) fn max(a: &[f32]) -> f32 {
    // f32::max ignores NaN, as the SIMD paths do.
    a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for (&x, &y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

pub(super) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

pub(super) fn softmax_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    for (x, out) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let m = max(x);
        let mut s = 0.0f32;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v - m).exp();
            s += *o;
        }
        let inv = 1.0 / s;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

pub(super) fn log_softmax_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    for (x, out) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let m = max(x);
        let mut s = 0.0f32;
        for &v in x {
            s += (v - m).exp();
        }
        let log_s = s.ln();
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v - m) - log_s;
        }
    }
}

pub(super) fn softmax_backward_rows(y: &[f32], dy: &[f32], cols: usize, dx: &mut [f32]) {
    for ((y, dy), dx) in y
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
    {
        let d = dot(dy, y);
        for ((o, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
            *o = y * (g - d);
        }
    }
}

pub(super) fn log_softmax_backward_rows(y: &[f32], dy: &[f32], cols: usize, dx: &mut [f32]) {
    for ((y, dy), dx) in y
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
    {
        let s = sum(dy);
        for ((o, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
            *o = g - y.exp() * s;
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm_rows(
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
    for (((x, out), mu), rs) in x
        .chunks_exact(cols)
        .zip(out.chunks_exact_mut(cols))
        .zip(mean.iter_mut())
        .zip(rstd.iter_mut())
    {
        // Two passes (mean, then squared deviations): no cancellation when |mean| >> std.
        let m = sum(x) / n;
        let mut ss = 0.0f32;
        for &v in x {
            let d = v - m;
            ss += d * d;
        }
        let r = 1.0 / (ss / n + eps).sqrt();
        for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
            *o = (v - m) * r * g + b;
        }
        *mu = m;
        *rs = r;
    }
}

/// One chunk of rows: dx overwritten, dgamma/dbeta accumulated row after row.
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm_backward_rows(
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
    for ((((x, dy), dx), &m), &r) in x
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
        .zip(mean)
        .zip(rstd)
    {
        // With xhat = (x - m) r and g = dy * gamma:
        // dx = r (g - mean(g) - xhat mean(g xhat)).
        let mut sum_g = 0.0f32;
        let mut sum_gx = 0.0f32;
        for ((((&v, &d), &w), dg), db) in x
            .iter()
            .zip(dy)
            .zip(gamma)
            .zip(dgamma.iter_mut())
            .zip(dbeta.iter_mut())
        {
            let xhat = (v - m) * r;
            let g = d * w;
            sum_g += g;
            sum_gx += g * xhat;
            *dg += d * xhat;
            *db += d;
        }
        let a = sum_g / n;
        let b = sum_gx / n;
        for (((o, &v), &d), &w) in dx.iter_mut().zip(x).zip(dy).zip(gamma) {
            let xhat = (v - m) * r;
            *o = r * (d * w - a - xhat * b);
        }
    }
}

pub(super) fn adamw(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamCoeffs) {
    for (((p, &g), m), v) in param
        .iter_mut()
        .zip(grad)
        .zip(m.iter_mut())
        .zip(v.iter_mut())
    {
        let decayed = *p * c.decay;
        *m = c.beta1 * *m + c.one_minus_beta1 * g;
        *v = c.beta2 * *v + c.one_minus_beta2 * g * g;
        let denom = v.sqrt() * c.inv_bias_correction2_sqrt + c.eps;
        *p = decayed - c.step_size * (*m / denom);
    }
}
