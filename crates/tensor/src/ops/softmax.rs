//! softmax and log_softmax along any dim, numerically stable (the row maximum is subtracted),
//! with row-kernel backward rules.

use crate::cpu::vec;
use crate::layout::resolve_dim;
use crate::{Result, Tensor};

type RowKernel = fn(&[f32], usize, &mut [f32]);
type RowBackward = fn(&[f32], &[f32], usize, &mut [f32]);

/// Runs a row kernel along `dim` by moving that dim last (a copy only when it is not already).
fn along_dim(x: &Tensor, d: usize, kernel: impl Fn(&[f32], usize, &mut [f32])) -> Result<Tensor> {
    let last = x.rank() - 1;
    let moved = if d == last {
        x.detach()
    } else {
        x.detach().transpose(d as isize, -1)?
    };
    let cols = moved.shape()[last];
    let src = moved.f32_data()?;
    let mut out = crate::cpu::pool::zeroed(src.len());
    if cols > 0 {
        kernel(&src, cols, &mut out);
    }
    let out = Tensor::f32_owned(out, moved.shape());
    if d == last {
        Ok(out)
    } else {
        out.transpose(d as isize, -1)?.contiguous()
    }
}

fn softmax_like(
    x: &Tensor,
    dim: isize,
    op: &'static str,
    forward: RowKernel,
    backward: RowBackward,
) -> Result<Tensor> {
    if x.rank() == 0 {
        return Err(crate::Error::invalid(op, "needs at least one dimension"));
    }
    let d = resolve_dim(op, dim, x.shape())?;
    #[cfg(feature = "cuda")]
    if let Some(dev) = super::cuda_inputs(op, &[x])? {
        return softmax_cuda(&dev, x, d, op);
    }
    let out = along_dim(x, d, forward)?;
    let y = out.clone();
    Ok(Tensor::record(out, op, &[x], move |g| {
        let last = y.rank() - 1;
        let (ym, gm) = if d == last {
            (y.clone(), g.contiguous()?)
        } else {
            (
                y.transpose(d as isize, -1)?.contiguous()?,
                g.transpose(d as isize, -1)?.contiguous()?,
            )
        };
        let cols = ym.shape()[last];
        let (yv, gv) = (ym.f32_data()?, gm.f32_data()?);
        let mut dx = crate::cpu::pool::zeroed(yv.len());
        if cols > 0 {
            backward(&yv, &gv, cols, &mut dx);
        }
        let dx = Tensor::f32_owned(dx, ym.shape());
        let dx = if d == last {
            dx
        } else {
            dx.transpose(d as isize, -1)?.contiguous()?
        };
        Ok(vec![Some(dx)])
    }))
}

/// kernels/softmax.cu over rows of the tensor with `d` moved last (a dense copy on the device
/// when it is not last or not contiguous): `{op}_fwd_T` and, in the backward, `{op}_bwd_T`.
#[cfg(feature = "cuda")]
fn softmax_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    x: &Tensor,
    d: usize,
    op: &'static str,
) -> Result<Tensor> {
    let last = x.rank() - 1;
    let to_rows = move |t: &Tensor| -> Result<Tensor> {
        if d == last {
            super::dense(t)
        } else {
            super::dense(&t.detach().transpose(d as isize, -1)?)
        }
    };
    let from_rows = move |t: Tensor| -> Result<Tensor> {
        if d == last {
            Ok(t)
        } else {
            super::dense(&t.transpose(d as isize, -1)?)
        }
    };
    let xm = to_rows(x)?;
    let y = softmax_launch(dev, op, "fwd", &[&xm])?;
    let out = from_rows(y.clone())?;
    let dev = dev.clone();
    Ok(Tensor::record(out, op, &[x], move |g| {
        let gm = to_rows(g)?;
        super::same_dtype(op, &y, &gm)?;
        Ok(vec![Some(from_rows(softmax_launch(
            &dev,
            op,
            "bwd",
            &[&y, &gm],
        )?)?)])
    }))
}

/// One softmax.cu launch over contiguous [rows, cols] operands (x for fwd; y, dy for bwd):
/// one block of 256 threads per row, gridDim min(rows, 65535), as the file's header says.
#[cfg(feature = "cuda")]
fn softmax_launch(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    op: &'static str,
    dir: &str,
    ins: &[&Tensor],
) -> Result<Tensor> {
    use cudarc::driver::PushKernelArg;
    let x = ins[0];
    let entry = format!("{op}_{dir}_{}", super::tname(op, x.dtype())?);
    let out = super::cuda_uninit(dev, x.dtype(), x.shape())?;
    let cols = *x.shape().last().unwrap_or(&1);
    if out.numel() == 0 || cols == 0 {
        return Ok(out);
    }
    let rows = (x.numel() / cols) as i64;
    let cols = cols as i64;
    let ptrs: Vec<u64> = ins.iter().map(|t| super::ptr(t)).collect::<Result<_>>()?;
    let po = super::ptr(&out)?;
    let f = dev.function("softmax", &entry)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&rows).arg(&cols);
    for p in &ptrs {
        l.arg(p);
    }
    l.arg(&po);
    let cfg = crate::cuda::storage::rows_config(rows as usize, 256);
    // SAFETY: {op}_fwd_T(i64 rows, i64 cols, const T* x, T* y) and {op}_bwd_T(rows, cols,
    // const T* y, const T* dy, T* dx): every operand a contiguous [rows, cols] buffer of T
    // (made dense above), the output fresh.
    unsafe { super::launch(op, &entry, l, cfg)? };
    Ok(out)
}

impl Tensor {
    /// exp(x) / Σ exp(x) along `dim`.
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        softmax_like(
            self,
            dim,
            "softmax",
            vec::softmax_rows,
            vec::softmax_backward_rows,
        )
    }

    /// x - log Σ exp(x) along `dim`.
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        softmax_like(
            self,
            dim,
            "log_softmax",
            vec::log_softmax_rows,
            vec::log_softmax_backward_rows,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_gradients;
    use crate::Tensor;

    #[test]
    fn rows_sum_to_one_and_log_matches() {
        let x = Tensor::randn(&[4, 7, 3], 0.0, 3.0, 2);
        for dim in [0, 1, 2] {
            let s = x.softmax(dim).unwrap();
            for v in s.sum(dim, false).unwrap().to_f64_vec() {
                assert!((v - 1.0).abs() < 1e-5);
            }
            let ls = x.log_softmax(dim).unwrap().to_f64_vec();
            let l = s.log().unwrap().to_f64_vec();
            for (a, b) in ls.iter().zip(&l) {
                assert!((a - b).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn softmax_gradients() {
        let x = Tensor::randn(&[3, 5], 0.0, 1.0, 8);
        for dim in [0isize, 1] {
            let e1 =
                check_gradients(std::slice::from_ref(&x), |t| t[0].softmax(dim), 1e-3).unwrap();
            let e2 =
                check_gradients(std::slice::from_ref(&x), |t| t[0].log_softmax(dim), 1e-3).unwrap();
            assert!(e1 < 2e-3 && e2 < 2e-3, "{e1} {e2}");
        }
    }
}
