//! Matrix-vector products: the shapes where the blocked path wastes most of its work, a single
//! row of A (m = 1, e.g. generating one token) or a single column of B (n = 1, e.g. a scalar
//! value head). There the packed kernels would compute 14 rows (or 32 columns) for every useful
//! one, after first copying the whole matrix into panels; these loops instead stream the matrix
//! once, in its own layout, and are bound by memory bandwidth as a matrix-vector product is.
//!
//! Two loops cover the layouts where the matrix has a unit stride:
//! * `sum_rows`: `out[j] = Σ_p x[p]·M[p][j]` with rows of M contiguous (one chain of
//!   multiply-adds per element, in increasing p);
//! * `dots`: `out[j] = x·M[j]` with each M[j] contiguous (32 partial sums in a fixed lane
//!   order, then a fixed pairwise reduction).
//!
//! Each output element is computed by one thread, by code that depends on the shapes only, so
//! results are bitwise independent of the thread count. Other layouts use the blocked path.

use super::{MatMut, MatRef};
use crate::cpu::Isa;
use rayon::prelude::*;

/// Matrix elements (k · outputs) from which the work is split across threads: about 1 MiB of
/// matrix, some tens of microseconds of streaming on one core.
const PARALLEL_MIN_ELEMS: usize = 1 << 18;
/// Outputs per work item of `sum_rows` (their accumulators stay in L1).
const SUM_ROWS_CHUNK: usize = 1024;
/// Outputs per work item of `dots`.
const DOTS_CHUNK: usize = 64;

/// Computes `C = alpha·A·B + beta·C` here when it is a matrix-vector product in a layout these
/// loops handle; returns false (C untouched) otherwise. Operands are validated, m, n, k ≥ 1.
pub(super) fn try_gemv(
    isa: Isa,
    alpha: f32,
    a: &MatRef,
    b: &MatRef,
    beta: f32,
    c: &mut MatMut,
) -> bool {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    // The vector operand, gathered into a contiguous copy (k values), and the matrix as
    // (data, stride between the vectors it is made of, layout).
    let plan = if m == 1 {
        let x = (0..k).map(|p| a.at(0, p)).collect::<Vec<f32>>();
        if b.col_stride == 1 {
            Some((x, b.data, b.row_stride, Layout::SumRows, n))
        } else if b.row_stride == 1 {
            Some((x, b.data, b.col_stride, Layout::Dots, n))
        } else {
            None
        }
    } else if n == 1 {
        let x = (0..k).map(|p| b.at(p, 0)).collect::<Vec<f32>>();
        if a.col_stride == 1 {
            Some((x, a.data, a.row_stride, Layout::Dots, m))
        } else if a.row_stride == 1 {
            Some((x, a.data, a.col_stride, Layout::SumRows, m))
        } else {
            None
        }
    } else {
        None
    };
    let Some((x, mat, stride, layout, len)) = plan else {
        return false;
    };
    let mut out = vec![0.0f32; len];
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && k.saturating_mul(len) >= PARALLEL_MIN_ELEMS;
    let max_chunk = match layout {
        Layout::SumRows => SUM_ROWS_CHUNK,
        Layout::Dots => DOTS_CHUNK,
    };
    // Several chunks per thread when parallel, so the threads end together; the chunking does
    // not change any element's arithmetic.
    let chunk = if parallel {
        max_chunk.min(len.div_ceil(4 * threads).next_multiple_of(16))
    } else {
        max_chunk
    };
    let work = |(q, dst): (usize, &mut [f32])| {
        let start = q * chunk;
        match layout {
            Layout::SumRows => sum_rows(isa, &x, mat, stride, start, dst),
            Layout::Dots => dots(isa, &x, mat, stride, start, dst),
        }
    };
    if parallel {
        out.par_chunks_mut(chunk).enumerate().for_each(work);
    } else {
        out.chunks_mut(chunk).enumerate().for_each(work);
    }
    // C is one row (m = 1) or one column (n = 1).
    for (idx, &v) in out.iter().enumerate() {
        let at = if m == 1 { idx } else { idx * c.row_stride };
        let dst = &mut c.data[at];
        *dst = if beta == 0.0 {
            alpha * v
        } else {
            alpha * v + beta * *dst
        };
    }
    true
}

#[derive(Clone, Copy)]
enum Layout {
    SumRows,
    Dots,
}

/// `out[j] = Σ_p x[p]·mat[p·stride + start + j]`.
fn sum_rows(isa: Isa, x: &[f32], mat: &[f32], stride: usize, start: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only passed when avx512f was detected (every such CPU also
        // has FMA).
        Isa::Avx512 => unsafe { x86::sum_rows_avx512(x, mat, stride, start, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only passed when avx2 and fma were detected.
        Isa::Avx2 => unsafe { x86::sum_rows_avx2(x, mat, stride, start, out) },
        _ => sum_rows_body::<false>(x, mat, stride, start, out),
    }
}

/// `out[j] = Σ_p x[p]·mat[(start + j)·stride + p]`.
fn dots(isa: Isa, x: &[f32], mat: &[f32], stride: usize, start: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `sum_rows`.
        Isa::Avx512 => unsafe { x86::dots_avx512(x, mat, stride, start, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `sum_rows`.
        Isa::Avx2 => unsafe { x86::dots_avx2(x, mat, stride, start, out) },
        _ => dots_body::<false>(x, mat, stride, start, out),
    }
}

/// `acc + x·y`, fused (one rounding) where the instruction set has FMA.
#[inline(always)]
fn madd<const FMA: bool>(x: f32, y: f32, acc: f32) -> f32 {
    if FMA {
        x.mul_add(y, acc)
    } else {
        acc + x * y
    }
}

/// Element-wise over `out`, so it vectorises; each element's sum runs in increasing p.
#[inline(always)]
fn sum_rows_body<const FMA: bool>(
    x: &[f32],
    mat: &[f32],
    stride: usize,
    start: usize,
    out: &mut [f32],
) {
    out.fill(0.0);
    for (p, &xp) in x.iter().enumerate() {
        let row = &mat[p * stride + start..][..out.len()];
        for (o, &v) in out.iter_mut().zip(row) {
            *o = madd::<FMA>(xp, v, *o);
        }
    }
}

/// 32 independent partial sums (lane l takes p ≡ l mod 32), so the loop vectorises without
/// reassociating anything; then a fixed pairwise reduction and the ragged tail.
#[inline(always)]
fn dots_body<const FMA: bool>(
    x: &[f32],
    mat: &[f32],
    stride: usize,
    start: usize,
    out: &mut [f32],
) {
    const LANES: usize = 32;
    let k = x.len();
    let split = k / LANES * LANES;
    for (j, o) in out.iter_mut().enumerate() {
        let y = &mat[(start + j) * stride..][..k];
        let mut acc = [0.0f32; LANES];
        for (xs, ys) in x[..split]
            .chunks_exact(LANES)
            .zip(y[..split].chunks_exact(LANES))
        {
            for l in 0..LANES {
                acc[l] = madd::<FMA>(xs[l], ys[l], acc[l]);
            }
        }
        let mut width = LANES;
        while width > 1 {
            width /= 2;
            for l in 0..width {
                acc[l] += acc[l + width];
            }
        }
        let mut sum = acc[0];
        for (&xv, &yv) in x[split..].iter().zip(&y[split..]) {
            sum = madd::<FMA>(xv, yv, sum);
        }
        *o = sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{dots_body, sum_rows_body};

    /// # Safety
    /// The CPU must support avx512f (and therefore FMA).
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn sum_rows_avx512(
        x: &[f32],
        mat: &[f32],
        stride: usize,
        start: usize,
        out: &mut [f32],
    ) {
        sum_rows_body::<true>(x, mat, stride, start, out)
    }

    /// # Safety
    /// The CPU must support avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sum_rows_avx2(
        x: &[f32],
        mat: &[f32],
        stride: usize,
        start: usize,
        out: &mut [f32],
    ) {
        sum_rows_body::<true>(x, mat, stride, start, out)
    }

    /// # Safety
    /// The CPU must support avx512f (and therefore FMA).
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn dots_avx512(
        x: &[f32],
        mat: &[f32],
        stride: usize,
        start: usize,
        out: &mut [f32],
    ) {
        dots_body::<true>(x, mat, stride, start, out)
    }

    /// # Safety
    /// The CPU must support avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots_avx2(
        x: &[f32],
        mat: &[f32],
        stride: usize,
        start: usize,
        out: &mut [f32],
    ) {
        dots_body::<true>(x, mat, stride, start, out)
    }
}
