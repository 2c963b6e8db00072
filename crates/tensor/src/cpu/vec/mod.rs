//! Elementwise, reduction and row-wise kernels on contiguous f32 slices.
//!
//! These are the leaf kernels the tensor ops call once they have contiguous data: arithmetic,
//! activations (GELU as GPT-2 has it), reductions, softmax / log-softmax over rows, layer norm
//! over rows (forward and backward) and the AdamW update.
//!
//! Every `f(..)` runs on [`cpu::isa()`](super::isa) and has a twin `f_with(isa, ..)`. The
//! `Isa::Scalar` path (`scalar.rs`) is the reference: plain loops and the standard library's
//! transcendentals. The AVX2+FMA and AVX-512 paths share one generic implementation
//! (`simd.rs`) over a small vector trait implemented in `x86.rs`; their exp is a range-reduced
//! polynomial (2^n p(r), within a few ulp of the library's), and tanh, sigmoid and GELU are built
//! on it in forms that stay finite and accurate at large |x|.
//!
//! Callers guarantee the lengths (equal lengths; whole rows); they are checked with `assert!`
//! because a mismatch is a bug in the engine, not bad user input. `f_with` also asserts that
//! the CPU supports `isa` ([`Isa::available`] lists those that it does).
//!
//! Threads and determinism:
//! - Reductions (`sum`, `max`, `dot`) run on the calling thread in a fixed order per isa.
//! - Elementwise ops and `adamw` split long slices across rayon threads in blocks whose size is a
//!   multiple of every vector width; SIMD tails use masked loads, so each element is computed by
//!   the same instructions wherever it sits and the result is the same for any thread count.
//! - Row kernels hand whole rows to threads; every row is computed start to end by one thread.
//!   `layer_norm_backward_rows` sums dgamma/dbeta over row chunks whose boundaries depend only on
//!   the shape, then adds the chunk partials in chunk order, so it too is independent of the
//!   thread count.
//!
//! Results differ slightly between isas (FMA contraction, summation order, polynomial exp); the
//! tests bound those differences per function.

mod scalar;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use rayon::prelude::*;

use super::{isa, Isa};

/// Elementwise blocks handed to one rayon task: large enough to amortise scheduling, and a
/// multiple of every vector width (see the module docs on determinism).
const ELEMWISE_BLOCK: usize = 1 << 14;
/// Row kernels: aim for about this many elements per rayon task.
const ROW_TASK_ELEMS: usize = 1 << 14;
/// layer_norm backward: at most this many dgamma/dbeta partial sums (bounds the scratch memory at
/// `2 * MAX_LN_CHUNKS * cols` floats while leaving enough tasks for many cores).
const MAX_LN_CHUNKS: usize = 256;

/// Checks that `isa` can run here (an unavailable one would execute illegal instructions).
#[inline]
fn checked(isa: Isa) -> Isa {
    assert!(
        isa.is_available(),
        "cpu::vec: instruction set {isa:?} is not supported by this CPU"
    );
    isa
}

/// Calls `scalar::$f`, or the AVX2 / AVX-512 entry point of the same name.
macro_rules! dispatch {
    ($isa:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match checked($isa) {
            Isa::Scalar => scalar::$f($($arg),*),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` asserted that this CPU has AVX2 and FMA; lengths were checked by
            // the public function that expanded this macro.
            Isa::Avx2 => unsafe { x86::avx2::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` asserted that this CPU has AVX-512F; lengths checked as above.
            Isa::Avx512 => unsafe { x86::avx512::$f($($arg),*) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("checked() admits only Scalar off x86_64"),
        }
    };
}

fn assert_same_len(op: &str, what: &str, expected: usize, got: usize) {
    assert!(
        expected == got,
        "cpu::vec::{op}: {what} has length {got}, expected {expected}"
    );
}

/// Number of rows in `len` elements of `cols`-wide rows; asserts whole rows.
fn rows_of(op: &str, len: usize, cols: usize) -> usize {
    assert!(cols > 0, "cpu::vec::{op}: cols must be positive");
    assert!(
        len.is_multiple_of(cols),
        "cpu::vec::{op}: length {len} is not a whole number of rows of {cols}"
    );
    len / cols
}

/// Runs `f` on matching blocks of `out` and `ins` (all of equal length), in parallel when long.
fn par_elementwise<const N: usize>(
    out: &mut [f32],
    ins: [&[f32]; N],
    f: impl Fn(&mut [f32], [&[f32]; N]) + Sync,
) {
    let n = out.len();
    if n < 2 * ELEMWISE_BLOCK || rayon::current_num_threads() < 2 {
        f(out, ins);
        return;
    }
    out.par_chunks_mut(ELEMWISE_BLOCK)
        .enumerate()
        .for_each(|(k, o)| {
            let start = k * ELEMWISE_BLOCK;
            let blocks = ins.map(|s| &s[start..start + o.len()]);
            f(o, blocks)
        });
}

/// Rows per rayon task for a row kernel, or `None` to stay on this thread.
fn row_task_rows(rows: usize, cols: usize) -> Option<usize> {
    if rows < 2 || rows * cols < 2 * ROW_TASK_ELEMS || rayon::current_num_threads() < 2 {
        None
    } else {
        Some(ROW_TASK_ELEMS.div_ceil(cols).max(1))
    }
}

macro_rules! binary {
    ($(#[$doc:meta])* $name:ident, $with:ident) => {
        $(#[$doc])*
        pub fn $name(a: &[f32], b: &[f32], out: &mut [f32]) {
            $with(isa(), a, b, out)
        }
        #[doc = concat!("[`", stringify!($name), "`] on an explicit instruction set.")]
        pub fn $with(isa: Isa, a: &[f32], b: &[f32], out: &mut [f32]) {
            assert_same_len(stringify!($name), "b", a.len(), b.len());
            assert_same_len(stringify!($name), "out", a.len(), out.len());
            par_elementwise(out, [a, b], |o, [a, b]| dispatch!(isa, $name(a, b, o)));
        }
    };
}

macro_rules! unary {
    ($(#[$doc:meta])* $name:ident, $with:ident) => {
        $(#[$doc])*
        pub fn $name(a: &[f32], out: &mut [f32]) {
            $with(isa(), a, out)
        }
        #[doc = concat!("[`", stringify!($name), "`] on an explicit instruction set.")]
        pub fn $with(isa: Isa, a: &[f32], out: &mut [f32]) {
            assert_same_len(stringify!($name), "out", a.len(), out.len());
            par_elementwise(out, [a], |o, [a]| dispatch!(isa, $name(a, o)));
        }
    };
}

macro_rules! with_scalar {
    ($(#[$doc:meta])* $name:ident, $with:ident) => {
        $(#[$doc])*
        pub fn $name(a: &[f32], s: f32, out: &mut [f32]) {
            $with(isa(), a, s, out)
        }
        #[doc = concat!("[`", stringify!($name), "`] on an explicit instruction set.")]
        pub fn $with(isa: Isa, a: &[f32], s: f32, out: &mut [f32]) {
            assert_same_len(stringify!($name), "out", a.len(), out.len());
            par_elementwise(out, [a], |o, [a]| dispatch!(isa, $name(a, s, o)));
        }
    };
}

binary!(
    /// out = a + b.
    add,
    add_with
);
binary!(
    /// out = a - b.
    sub,
    sub_with
);
binary!(
    /// out = a * b.
    mul,
    mul_with
);
binary!(
    /// out = a / b.
    div,
    div_with
);
with_scalar!(
    /// out = a + s.
    add_scalar,
    add_scalar_with
);
with_scalar!(
    /// out = a * s.
    mul_scalar,
    mul_scalar_with
);
unary!(
    /// out = e^a. +inf -> +inf, -inf and a < -104 -> 0, NaN -> NaN; subnormal results kept.
    exp,
    exp_with
);
unary!(
    /// out = tanh(a), computed from expm1(-2|a|): exact ±1 at large |a|, relative precision
    /// near 0.
    tanh,
    tanh_with
);
unary!(
    /// out = 1 / (1 + e^-a), computed from e^-|a| so that it never overflows.
    sigmoid,
    sigmoid_with
);
binary!(
    /// dx = dy * gelu'(x) (dx overwritten), for the GELU of [`gelu`].
    gelu_backward,
    gelu_backward_with
);

unary!(
    /// GELU, tanh approximation as in GPT-2: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    /// Evaluated as the identical x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), which has no
    /// cancellation for negative x. gelu(-inf) = -0, gelu(+inf) = +inf.
    gelu,
    gelu_with
);

/// out = ln(a) (NaN for a < 0, -inf at 0).
pub fn log(a: &[f32], out: &mut [f32]) {
    log_with(isa(), a, out)
}

/// [`log`] on an explicit instruction set. Not on any hot path, so every isa runs the scalar
/// loop (the library's `ln`); the parameter keeps the API uniform.
pub fn log_with(isa: Isa, a: &[f32], out: &mut [f32]) {
    checked(isa);
    assert_same_len("log", "out", a.len(), out.len());
    par_elementwise(out, [a], |o, [a]| scalar::log(a, o));
}

/// Sum of `a` (0 when empty).
pub fn sum(a: &[f32]) -> f32 {
    sum_with(isa(), a)
}

/// [`sum`] on an explicit instruction set. Scalar: left to right. SIMD: four vector
/// accumulators, then a fixed pairwise reduction.
pub fn sum_with(isa: Isa, a: &[f32]) -> f32 {
    dispatch!(isa, sum(a))
}

/// Largest element of `a`; NEG_INFINITY when empty. NaN elements are ignored, as by `f32::max`.
pub fn max(a: &[f32]) -> f32 {
    max_with(isa(), a)
}

/// [`max`] on an explicit instruction set.
pub fn max_with(isa: Isa, a: &[f32]) -> f32 {
    dispatch!(isa, max(a))
}

/// Σ a[i] b[i].
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(isa(), a, b)
}

/// [`dot`] on an explicit instruction set (SIMD: fused multiply-adds into four accumulators).
pub fn dot_with(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_same_len("dot", "b", a.len(), b.len());
    dispatch!(isa, dot(a, b))
}

/// y += alpha * x.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    axpy_with(isa(), alpha, x, y)
}

/// [`axpy`] on an explicit instruction set.
pub fn axpy_with(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_same_len("axpy", "y", x.len(), y.len());
    par_elementwise(y, [x], |y, [x]| dispatch!(isa, axpy(alpha, x, y)));
}

/// Runs a row kernel over row blocks of `out` (and the matching rows of `ins`), in parallel when
/// there is enough work.
fn par_rows<const N: usize>(
    cols: usize,
    out: &mut [f32],
    ins: [&[f32]; N],
    f: impl Fn(&mut [f32], [&[f32]; N]) + Sync,
) {
    let rows = out.len() / cols;
    match row_task_rows(rows, cols) {
        None => f(out, ins),
        Some(task_rows) => {
            let block = task_rows * cols;
            out.par_chunks_mut(block).enumerate().for_each(|(k, o)| {
                let start = k * block;
                f(o, ins.map(|s| &s[start..start + o.len()]))
            });
        }
    }
}

/// Softmax of each row of `cols` elements: out = exp(x - max) / Σ exp(x - max). A row whose max
/// is -inf (all -inf) gives NaN, as in PyTorch.
pub fn softmax_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    softmax_rows_with(isa(), x, cols, out)
}

/// [`softmax_rows`] on an explicit instruction set.
pub fn softmax_rows_with(isa: Isa, x: &[f32], cols: usize, out: &mut [f32]) {
    rows_of("softmax_rows", x.len(), cols);
    assert_same_len("softmax_rows", "out", x.len(), out.len());
    par_rows(cols, out, [x], |o, [x]| {
        dispatch!(isa, softmax_rows(x, cols, o))
    });
}

/// Log-softmax of each row: out = (x - max) - ln Σ exp(x - max).
pub fn log_softmax_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    log_softmax_rows_with(isa(), x, cols, out)
}

/// [`log_softmax_rows`] on an explicit instruction set.
pub fn log_softmax_rows_with(isa: Isa, x: &[f32], cols: usize, out: &mut [f32]) {
    rows_of("log_softmax_rows", x.len(), cols);
    assert_same_len("log_softmax_rows", "out", x.len(), out.len());
    par_rows(cols, out, [x], |o, [x]| {
        dispatch!(isa, log_softmax_rows(x, cols, o))
    });
}

/// Softmax backward per row, from the forward output `y`: dx = y (dy - Σ dy y) (dx overwritten).
pub fn softmax_backward_rows(y: &[f32], dy: &[f32], cols: usize, dx: &mut [f32]) {
    softmax_backward_rows_with(isa(), y, dy, cols, dx)
}

/// [`softmax_backward_rows`] on an explicit instruction set.
pub fn softmax_backward_rows_with(isa: Isa, y: &[f32], dy: &[f32], cols: usize, dx: &mut [f32]) {
    rows_of("softmax_backward_rows", y.len(), cols);
    assert_same_len("softmax_backward_rows", "dy", y.len(), dy.len());
    assert_same_len("softmax_backward_rows", "dx", y.len(), dx.len());
    par_rows(cols, dx, [y, dy], |o, [y, dy]| {
        dispatch!(isa, softmax_backward_rows(y, dy, cols, o))
    });
}

/// Log-softmax backward per row, from the forward output `y`: dx = dy - exp(y) Σ dy
/// (dx overwritten).
pub fn log_softmax_backward_rows(y: &[f32], dy: &[f32], cols: usize, dx: &mut [f32]) {
    log_softmax_backward_rows_with(isa(), y, dy, cols, dx)
}

/// [`log_softmax_backward_rows`] on an explicit instruction set.
pub fn log_softmax_backward_rows_with(
    isa: Isa,
    y: &[f32],
    dy: &[f32],
    cols: usize,
    dx: &mut [f32],
) {
    rows_of("log_softmax_backward_rows", y.len(), cols);
    assert_same_len("log_softmax_backward_rows", "dy", y.len(), dy.len());
    assert_same_len("log_softmax_backward_rows", "dx", y.len(), dx.len());
    par_rows(cols, dx, [y, dy], |o, [y, dy]| {
        dispatch!(isa, log_softmax_backward_rows(y, dy, cols, o))
    });
}

/// Layer norm over each row of `cols`: out = (x - mean) * rstd * gamma + beta, with the biased
/// variance (divide by `cols`, as PyTorch) and rstd = 1 / sqrt(var + eps). `mean` and `rstd`
/// receive one value per row, for the backward pass. The variance is computed in a second pass
/// over the row (no E[x²] - E[x]² cancellation).
#[allow(clippy::too_many_arguments)]
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
    layer_norm_rows_with(isa(), x, gamma, beta, cols, eps, out, mean, rstd)
}

/// [`layer_norm_rows`] on an explicit instruction set.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_rows_with(
    isa: Isa,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    cols: usize,
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    const OP: &str = "layer_norm_rows";
    let rows = rows_of(OP, x.len(), cols);
    assert_same_len(OP, "gamma", cols, gamma.len());
    assert_same_len(OP, "beta", cols, beta.len());
    assert_same_len(OP, "out", x.len(), out.len());
    assert_same_len(OP, "mean", rows, mean.len());
    assert_same_len(OP, "rstd", rows, rstd.len());
    let run = |x: &[f32], out: &mut [f32], mean: &mut [f32], rstd: &mut [f32]| {
        dispatch!(
            isa,
            layer_norm_rows(x, gamma, beta, cols, eps, out, mean, rstd)
        )
    };
    match row_task_rows(rows, cols) {
        None => run(x, out, mean, rstd),
        Some(task_rows) => out
            .par_chunks_mut(task_rows * cols)
            .zip(x.par_chunks(task_rows * cols))
            .zip(mean.par_chunks_mut(task_rows))
            .zip(rstd.par_chunks_mut(task_rows))
            .for_each(|(((o, x), m), r)| run(x, o, m, r)),
    }
}

/// Rows per dgamma/dbeta chunk in layer-norm backward: a function of the shape only, so the
/// summation order (and the result) does not depend on the number of threads.
fn layer_norm_chunk_rows(rows: usize, cols: usize) -> usize {
    rows.div_ceil(MAX_LN_CHUNKS)
        .max(ROW_TASK_ELEMS.div_ceil(cols))
        .max(1)
}

/// Layer norm backward per row, from the forward's saved `mean` and `rstd`:
/// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy gamma and xhat = (x - mean) rstd
/// (dx overwritten); dgamma += Σ_rows dy xhat and dbeta += Σ_rows dy (accumulated, so
/// gradients add up across calls).
///
/// The sums over rows run in fixed chunks of rows (each chunk row by row, from zero), then
/// the chunk partials are added in chunk order and the total added to dgamma/dbeta: the same
/// bits for any number of threads.
#[allow(clippy::too_many_arguments)]
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
    layer_norm_backward_rows_with(isa(), x, gamma, mean, rstd, dy, cols, dx, dgamma, dbeta)
}

/// [`layer_norm_backward_rows`] on an explicit instruction set.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward_rows_with(
    isa: Isa,
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
    const OP: &str = "layer_norm_backward_rows";
    let rows = rows_of(OP, x.len(), cols);
    assert_same_len(OP, "gamma", cols, gamma.len());
    assert_same_len(OP, "mean", rows, mean.len());
    assert_same_len(OP, "rstd", rows, rstd.len());
    assert_same_len(OP, "dy", x.len(), dy.len());
    assert_same_len(OP, "dx", x.len(), dx.len());
    assert_same_len(OP, "dgamma", cols, dgamma.len());
    assert_same_len(OP, "dbeta", cols, dbeta.len());
    if rows == 0 {
        return;
    }
    let chunk_rows = layer_norm_chunk_rows(rows, cols);
    let chunks = rows.div_ceil(chunk_rows);
    // partial[k] = [dgamma partial (cols) | dbeta partial (cols)] of chunk k, from zero.
    let mut partial = super::pool::zeroed(chunks * 2 * cols);
    let block = chunk_rows * cols;
    let run = |k: usize, dx: &mut [f32], part: &mut [f32]| {
        let r0 = k * chunk_rows;
        let r1 = r0 + dx.len() / cols;
        let (e0, e1) = (r0 * cols, r1 * cols);
        let (pg, pb) = part.split_at_mut(cols);
        dispatch!(
            isa,
            layer_norm_backward_rows(
                &x[e0..e1],
                gamma,
                &mean[r0..r1],
                &rstd[r0..r1],
                &dy[e0..e1],
                cols,
                dx,
                pg,
                pb,
            )
        )
    };
    if chunks > 1 && rayon::current_num_threads() > 1 {
        dx.par_chunks_mut(block)
            .zip(partial.par_chunks_mut(2 * cols))
            .enumerate()
            .for_each(|(k, (dx, part))| run(k, dx, part));
    } else {
        for (k, (dx, part)) in dx
            .chunks_mut(block)
            .zip(partial.chunks_mut(2 * cols))
            .enumerate()
        {
            run(k, dx, part);
        }
    }
    // Chunk partials in chunk order, then into the caller's accumulators. Plain scalar adds:
    // this is chunks * cols work against rows * cols above.
    let (first, rest) = partial.split_at_mut(2 * cols);
    for part in rest.chunks_exact(2 * cols) {
        for (t, &p) in first.iter_mut().zip(part) {
            *t += p;
        }
    }
    for (d, &t) in dgamma.iter_mut().zip(&first[..cols]) {
        *d += t;
    }
    for (d, &t) in dbeta.iter_mut().zip(&first[cols..]) {
        *d += t;
    }
}

/// Per-step AdamW constants, computed once in f64 from the hyperparameters.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamCoeffs {
    /// 1 - lr * weight_decay.
    decay: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// 1 / sqrt(1 - beta2^step).
    inv_bias_correction2_sqrt: f32,
    eps: f32,
    /// lr / (1 - beta1^step).
    step_size: f32,
}

impl AdamCoeffs {
    #[allow(clippy::too_many_arguments)]
    fn new(lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, step: u64) -> AdamCoeffs {
        let (lr64, b1, b2) = (lr as f64, beta1 as f64, beta2 as f64);
        let t = step as f64;
        AdamCoeffs {
            decay: (1.0 - lr64 * weight_decay as f64) as f32,
            beta1,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2,
            one_minus_beta2: (1.0 - b2) as f32,
            inv_bias_correction2_sqrt: (1.0 / (1.0 - b2.powf(t)).sqrt()) as f32,
            eps,
            step_size: (lr64 / (1.0 - b1.powf(t))) as f32,
        }
    }
}

/// One AdamW step in place (Loshchilov & Hutter; the update of PyTorch's `torch.optim.AdamW`
/// without amsgrad, up to rounding):
///
/// ```text
/// p ← p (1 - lr wd)                                   decoupled weight decay
/// m ← β1 m + (1 - β1) g,   v ← β2 v + (1 - β2) g²
/// p ← p - lr / (1 - β1^step) · m / (sqrt(v) / sqrt(1 - β2^step) + eps)
/// ```
///
/// `step` counts from 1 (the first update).
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
    adamw_with(
        isa(),
        param,
        grad,
        m,
        v,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
    )
}

/// [`adamw`] on an explicit instruction set.
#[allow(clippy::too_many_arguments)]
pub fn adamw_with(
    isa: Isa,
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
    assert!(step >= 1, "cpu::vec::adamw: step counts from 1, got 0");
    assert_same_len("adamw", "grad", param.len(), grad.len());
    assert_same_len("adamw", "m", param.len(), m.len());
    assert_same_len("adamw", "v", param.len(), v.len());
    let c = AdamCoeffs::new(lr, beta1, beta2, eps, weight_decay, step);
    let n = param.len();
    if n < 2 * ELEMWISE_BLOCK || rayon::current_num_threads() < 2 {
        dispatch!(isa, adamw(param, grad, m, v, &c));
        return;
    }
    param
        .par_chunks_mut(ELEMWISE_BLOCK)
        .zip(grad.par_chunks(ELEMWISE_BLOCK))
        .zip(m.par_chunks_mut(ELEMWISE_BLOCK))
        .zip(v.par_chunks_mut(ELEMWISE_BLOCK))
        .for_each(|(((p, g), m), v)| dispatch!(isa, adamw(p, g, m, v, &c)));
}
