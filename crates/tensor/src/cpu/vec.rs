//! TEMPORARY scalar placeholders with the agreed kernel API (replaced by the SIMD branch on merge).
#![allow(clippy::too_many_arguments)]
#![allow(missing_docs)]
use super::Isa;
pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
    for i in 0..out.len() {
        out[i] = a[i] + b[i];
    }
}
pub fn sub(a: &[f32], b: &[f32], out: &mut [f32]) {
    for i in 0..out.len() {
        out[i] = a[i] - b[i];
    }
}
pub fn mul(a: &[f32], b: &[f32], out: &mut [f32]) {
    for i in 0..out.len() {
        out[i] = a[i] * b[i];
    }
}
pub fn div(a: &[f32], b: &[f32], out: &mut [f32]) {
    for i in 0..out.len() {
        out[i] = a[i] / b[i];
    }
}
pub fn add_scalar(a: &[f32], s: f32, out: &mut [f32]) {
    for i in 0..out.len() {
        out[i] = a[i] + s;
    }
}
pub fn mul_scalar(a: &[f32], s: f32, out: &mut [f32]) {
    for i in 0..out.len() {
        out[i] = a[i] * s;
    }
}
pub fn exp(a: &[f32], out: &mut [f32]) {
    for i in 0..out.len() {
        out[i] = a[i].exp();
    }
}
pub fn log(a: &[f32], out: &mut [f32]) {
    for i in 0..out.len() {
        out[i] = a[i].ln();
    }
}
pub fn tanh(a: &[f32], out: &mut [f32]) {
    for i in 0..out.len() {
        out[i] = a[i].tanh();
    }
}
pub fn sigmoid(a: &[f32], out: &mut [f32]) {
    for i in 0..out.len() {
        out[i] = 1.0 / (1.0 + (-a[i]).exp());
    }
}
const C: f32 = 0.797_884_6;
pub fn gelu(a: &[f32], out: &mut [f32]) {
    for i in 0..out.len() {
        let x = a[i];
        out[i] = 0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh());
    }
}
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for i in 0..dx.len() {
        let x = x[i];
        let u = C * (x + 0.044715 * x * x * x);
        let t = u.tanh();
        let du = C * (1.0 + 3.0 * 0.044715 * x * x);
        dx[i] = dy[i] * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
    }
}
pub fn sum(a: &[f32]) -> f32 {
    a.iter().sum()
}
pub fn max(a: &[f32]) -> f32 {
    a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for i in 0..y.len() {
        y[i] += alpha * x[i];
    }
}
pub fn softmax_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    for (r, o) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let m = max(r);
        let mut s = 0.0;
        for i in 0..cols {
            o[i] = (r[i] - m).exp();
            s += o[i];
        }
        for v in o.iter_mut() {
            *v /= s;
        }
    }
}
pub fn log_softmax_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    for (r, o) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let m = max(r);
        let s: f32 = r.iter().map(|v| (v - m).exp()).sum();
        let l = m + s.ln();
        for i in 0..cols {
            o[i] = r[i] - l;
        }
    }
}
pub fn softmax_backward_rows(y: &[f32], dy: &[f32], cols: usize, dx: &mut [f32]) {
    for ((y, dy), dx) in y.chunks(cols).zip(dy.chunks(cols)).zip(dx.chunks_mut(cols)) {
        let s = dot(y, dy);
        for i in 0..cols {
            dx[i] = y[i] * (dy[i] - s);
        }
    }
}
pub fn log_softmax_backward_rows(y: &[f32], dy: &[f32], cols: usize, dx: &mut [f32]) {
    for ((y, dy), dx) in y.chunks(cols).zip(dy.chunks(cols)).zip(dx.chunks_mut(cols)) {
        let s = sum(dy);
        for i in 0..cols {
            dx[i] = dy[i] - y[i].exp() * s;
        }
    }
}
pub fn layer_norm_rows(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    cols: usize,
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    for (r, (xr, o)) in x.chunks(cols).zip(out.chunks_mut(cols)).enumerate() {
        let mu = sum(xr) / cols as f32;
        let var = xr.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / cols as f32;
        let rs = 1.0 / (var + eps).sqrt();
        mean[r] = mu;
        rstd[r] = rs;
        for i in 0..cols {
            o[i] = (xr[i] - mu) * rs * gamma[i] + beta[i];
        }
    }
}
pub fn layer_norm_backward_rows(
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
    for r in 0..x.len() / cols {
        let xr = &x[r * cols..(r + 1) * cols];
        let dyr = &dy[r * cols..(r + 1) * cols];
        let (mu, rs) = (mean[r], rstd[r]);
        let mut a = 0.0;
        let mut b = 0.0;
        for i in 0..cols {
            let xh = (xr[i] - mu) * rs;
            let g = dyr[i] * gamma[i];
            a += g;
            b += g * xh;
            dgamma[i] += dyr[i] * xh;
            dbeta[i] += dyr[i];
        }
        for i in 0..cols {
            let xh = (xr[i] - mu) * rs;
            let g = dyr[i] * gamma[i];
            dx[r * cols + i] = rs * (g - a / cols as f32 - xh * b / cols as f32);
        }
    }
}
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step: u64,
) {
    let bc1 = 1.0 - beta1.powi(step as i32);
    let bc2 = 1.0 - beta2.powi(step as i32);
    for i in 0..param.len() {
        param[i] -= lr * weight_decay * param[i];
        m[i] = beta1 * m[i] + (1.0 - beta1) * grad[i];
        v[i] = beta2 * v[i] + (1.0 - beta2) * grad[i] * grad[i];
        param[i] -= lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
    }
}
pub fn _unused(_: Isa) {}
