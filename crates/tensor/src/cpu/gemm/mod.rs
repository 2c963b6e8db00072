//! f32 matrix multiply, `C = alpha·A·B + beta·C`, written BLIS style.
//!
//! The work is split in three cache levels and one register level:
//!
//! * `NC` columns of B and `KC` of the shared dimension form a packed B panel (`KC × NC`, meant for
//!   L3 / L2), stored as `NR`-wide micro-panels so the microkernel reads it with unit stride;
//! * `MC` rows of A and the same `KC` form a packed A block (`MC × KC`, meant for L2), stored as
//!   `MR`-tall micro-panels; each thread packs its own;
//! * the microkernel keeps an `MR × NR` tile of C in vector registers for the whole `KC` loop
//!   (AVX-512: 14 × 32 in 28 zmm registers; AVX2: 6 × 16 in 12 ymm registers; scalar: 4 × 8).
//!
//! Packing reads A and B through arbitrary strides, so a transposed operand is just a view with
//! swapped strides and costs no extra copy. When A has only a few micro-panels of rows (m ≤ 56
//! for AVX-512), a row-major B is read in place instead of packed, since each B micro-panel would
//! be used too few times to repay its copy. Edge tiles (fewer than `MR` rows or `NR` columns left)
//! are packed with zero padding and computed into a small buffer that is copied back, so the
//! kernels only ever see full tiles.
//!
//! Determinism: the shared dimension is always cut into the same `KC` blocks (they depend on `k`
//! only), each C element is produced by exactly one thread, and every element's sum runs in the
//! same k order whatever tile it sits in. Results are therefore bitwise independent of the number
//! of threads. Threads come from the current rayon pool; problems under [`PARALLEL_MIN_FLOPS`]
//! run on the calling thread alone because forking would cost more than it saves.
//!
//! Matrix-vector shapes (m = 1 or n = 1) skip all this and stream the matrix once (`gemv`).
//!
//! [`sgemm_reference`] is the naive triple loop every path is tested against.

mod driver;
mod gemv;
mod kernels;
#[cfg(test)]
mod tests;

use super::Isa;
use crate::{Error, Result};

/// Problems with fewer flops than this (2·m·n·k) run single-threaded: about 20 µs of work on one
/// core, the point where a rayon fork/join stops being noise.
pub const PARALLEL_MIN_FLOPS: usize = 1 << 22;

/// A read-only strided matrix: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `rows × cols` view of `data`.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed view (swapped shape and strides); nothing is copied.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Element (i, j); panics when out of bounds (test and reference use only).
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// A writable row-major matrix with leading dimension `row_stride` (column stride 1).
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl<'a> MatMut<'a> {
    /// A dense row-major `rows × cols` view of `data`.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            row_stride: cols,
        }
    }
}

/// `C = alpha·A·B + beta·C` with the instruction set [`super::isa()`] picks.
///
/// When `beta == 0`, C is only written (NaNs already in C do not propagate). `alpha == 0` still
/// forms A·B, so NaN or infinity in A or B does reach C. Errors when the shapes disagree or a
/// strided extent runs past its slice.
pub fn sgemm(alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut) -> Result<()> {
    sgemm_with(super::isa(), alpha, a, b, beta, c)
}

/// [`sgemm`] on an explicit instruction set; errors when this CPU cannot run `isa`.
pub fn sgemm_with(isa: Isa, alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut) -> Result<()> {
    sgemm_bias_with(isa, alpha, a, b, beta, None, c)
}

/// `C = (alpha·A·B + beta·C) + bias` with `bias` (length n) added to every row: a linear
/// layer in one pass over C. Bitwise equal to [`sgemm`] followed by adding the bias.
pub fn sgemm_bias(
    alpha: f32,
    a: MatRef,
    b: MatRef,
    beta: f32,
    bias: &[f32],
    c: MatMut,
) -> Result<()> {
    sgemm_bias_with(super::isa(), alpha, a, b, beta, Some(bias), c)
}

/// [`sgemm_bias`] (or, without a bias, [`sgemm`]) on an explicit instruction set.
pub fn sgemm_bias_with(
    isa: Isa,
    alpha: f32,
    a: MatRef,
    b: MatRef,
    beta: f32,
    bias: Option<&[f32]>,
    c: MatMut,
) -> Result<()> {
    validate(&a, &b, &c)?;
    if let Some(v) = bias {
        if v.len() != b.cols {
            return Err(Error::invalid(
                "sgemm",
                format!("bias has {} values for {} columns", v.len(), b.cols),
            ));
        }
    }
    if !isa.is_available() {
        return Err(Error::invalid(
            "sgemm",
            format!("instruction set {isa:?} is not supported by this CPU"),
        ));
    }
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let mut c = c;
    if k == 0 {
        // A·B is all zeros: only the beta term remains.
        scale_c(beta, &mut c);
        add_bias(bias, &mut c);
        return Ok(());
    }
    if gemv::try_gemv(isa, alpha, &a, &b, beta, &mut c) {
        add_bias(bias, &mut c);
        return Ok(());
    }
    match isa {
        Isa::Scalar => driver::gemm::<kernels::Scalar>(alpha, a, b, beta, bias, c),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => driver::gemm::<kernels::Avx2>(alpha, a, b, beta, bias, c),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => driver::gemm::<kernels::Avx512>(alpha, a, b, beta, bias, c),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("is_available() is false for SIMD levels off x86_64"),
    }
    Ok(())
}

/// The naive triple loop (f32 accumulation in k order): the reference every fast path is tested
/// against. Same contract and errors as [`sgemm`].
pub fn sgemm_reference(alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut) -> Result<()> {
    validate(&a, &b, &c)?;
    for i in 0..c.rows {
        for j in 0..c.cols {
            let mut acc = 0.0f32;
            for p in 0..a.cols {
                acc += a.at(i, p) * b.at(p, j);
            }
            let dst = &mut c.data[i * c.row_stride + j];
            *dst = if beta == 0.0 {
                alpha * acc
            } else {
                alpha * acc + beta * *dst
            };
        }
    }
    Ok(())
}

/// Adds `bias` to every row of C (the paths that do not run the microkernels).
fn add_bias(bias: Option<&[f32]>, c: &mut MatMut) {
    if let Some(bias) = bias {
        for i in 0..c.rows {
            let row = &mut c.data[i * c.row_stride..][..c.cols];
            row.iter_mut().zip(bias).for_each(|(x, &b)| *x += b);
        }
    }
}

/// `C = beta·C` (C zeroed, not read, when beta is 0).
fn scale_c(beta: f32, c: &mut MatMut) {
    for i in 0..c.rows {
        let row = &mut c.data[i * c.row_stride..][..c.cols];
        if beta == 0.0 {
            row.fill(0.0);
        } else {
            row.iter_mut().for_each(|x| *x *= beta);
        }
    }
}

/// Checks shapes and that every strided element lies inside its slice, so the kernels can use
/// unchecked pointer arithmetic afterwards.
fn validate(a: &MatRef, b: &MatRef, c: &MatMut) -> Result<()> {
    if a.cols != b.rows {
        return Err(Error::ShapeMismatch {
            op: "sgemm (A·B inner dimension)",
            lhs: vec![a.rows, a.cols],
            rhs: vec![b.rows, b.cols],
        });
    }
    if c.rows != a.rows || c.cols != b.cols {
        return Err(Error::ShapeMismatch {
            op: "sgemm (C must be rows(A) × cols(B))",
            lhs: vec![c.rows, c.cols],
            rhs: vec![a.rows, b.cols],
        });
    }
    check_extent(
        "A",
        a.data.len(),
        a.rows,
        a.cols,
        a.row_stride,
        a.col_stride,
    )?;
    check_extent(
        "B",
        b.data.len(),
        b.rows,
        b.cols,
        b.row_stride,
        b.col_stride,
    )?;
    check_extent("C", c.data.len(), c.rows, c.cols, c.row_stride, 1)?;
    // Rows of C written by different threads must not overlap.
    if c.rows > 1 && c.row_stride < c.cols {
        return Err(Error::invalid(
            "sgemm",
            format!(
                "C: row stride {} is smaller than its {} columns, so rows would overlap",
                c.row_stride, c.cols
            ),
        ));
    }
    Ok(())
}

fn check_extent(
    name: &str,
    len: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1)
        .checked_mul(row_stride)
        .zip((cols - 1).checked_mul(col_stride))
        .and_then(|(r, c)| r.checked_add(c));
    match last {
        Some(last) if last < len => Ok(()),
        _ => Err(Error::invalid(
            "sgemm",
            format!(
                "{name}: {rows}×{cols} with strides ({row_stride}, {col_stride}) needs element {} \
                 but its slice holds {len}",
                last.map_or_else(|| "beyond usize::MAX".to_string(), |l| l.to_string())
            ),
        )),
    }
}
