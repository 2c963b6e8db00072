//! gather along the last dim: out[..., j] = x[..., idx[..., j]]. With one index per row this
//! picks per-token log-probabilities from a [.., vocab] tensor. The backward scatter-adds.
//!
//! On CUDA (x on a GPU; kernels/gather.cu) the indices follow embedding's rule: on the host
//! (checked there) or on x's GPU (checked by the kernel's flag); see ops/embedding.rs. The
//! backward accumulates each row's gradients in index order into an f32 buffer (bitwise the
//! CPU's sum for f32), cast once to a bf16 input's dtype.

use super::embedding::checked_indices;
use crate::{Error, Result, Tensor};

impl Tensor {
    /// Selects along the last dim: `idx` has self's shape except the last dim (any size K).
    pub fn gather_last(&self, idx: &Tensor) -> Result<Tensor> {
        let r = self.rank();
        if r == 0 || idx.rank() != r || idx.shape()[..r - 1] != self.shape()[..r - 1] {
            return Err(Error::ShapeMismatch {
                op: "gather_last",
                lhs: self.shape().to_vec(),
                rhs: idx.shape().to_vec(),
            });
        }
        let v = self.shape()[r - 1];
        let k = idx.shape()[r - 1];
        #[cfg(feature = "cuda")]
        if let Some(dev) = self.cuda_storage().map(|s| s.device().clone()) {
            return gather_last_cuda(&dev, self, idx, v, k);
        }
        super::indices_on_host("gather_last", idx)?;
        let ids = checked_indices("gather_last", idx, v)?;
        let x = self.f32_data()?;
        let rows = ids.len().checked_div(k).unwrap_or(0);
        let mut out = crate::cpu::pool::zeroed(ids.len());
        for row in 0..rows {
            for j in 0..k {
                out[row * k + j] = x[row * v + ids[row * k + j]];
            }
        }
        let out = Tensor::f32_owned(out, idx.shape());
        let in_shape = self.shape().to_vec();
        Ok(Tensor::record(out, "gather_last", &[self], move |g| {
            let gv = g.f32_data()?;
            let mut gx = crate::cpu::pool::zeroed(rows * v);
            for row in 0..rows {
                for j in 0..k {
                    gx[row * v + ids[row * k + j]] += gv[row * k + j];
                }
            }
            Ok(vec![Some(Tensor::f32_owned(gx, &in_shape))])
        }))
    }
}

/// kernels/gather.cu: `gather_last_fwd_T` and, in the backward, `gather_last_bwd_T` into a
/// zeroed f32 [rows, v] buffer (cast to x's dtype after).
#[cfg(feature = "cuda")]
fn gather_last_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    x: &Tensor,
    idx: &Tensor,
    v: usize,
    k: usize,
) -> Result<Tensor> {
    use super::embedding::{bad_index_error, check_index_values};
    use crate::cuda::storage::elementwise_config;
    use crate::DType;
    use cudarc::driver::PushKernelArg;
    const OP: &str = "gather_last";
    let dtype = x.dtype();
    let tn = super::tname(OP, dtype)?;
    let (idt, host) = super::cuda_index_tensor(OP, idx, dev)?;
    if let Some(vals) = &host {
        check_index_values(OP, vals, v)?;
    }
    let rows: usize = x.shape()[..x.rank() - 1].iter().product();
    let out = super::cuda_uninit(dev, dtype, idx.shape())?;
    if rows * k > 0 {
        let xd = super::dense(x)?;
        let bad = super::cuda_bad_flag(dev)?;
        let entry = format!("gather_last_fwd_{tn}");
        let (r64, v64, k64) = (rows as i64, v as i64, k as i64);
        let (px, pi, po, pb) = (
            super::ptr(&xd)?,
            super::ptr(&idt)?,
            super::ptr(&out)?,
            super::ptr(&bad)?,
        );
        let f = dev.function("gather", &entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&r64)
            .arg(&v64)
            .arg(&k64)
            .arg(&px)
            .arg(&pi)
            .arg(&po)
            .arg(&pb);
        // SAFETY: gather_last_fwd_T(i64 rows, i64 v, i64 k, const T* x, const i64* idx, T*
        // out, u64* bad): x a contiguous [rows, v] buffer of T (each index bounds-checked by
        // the kernel before the read), idx contiguous [rows, k] i64, out a fresh [rows, k]
        // buffer, bad one u64 (an i64 buffer of -1).
        unsafe { super::launch(OP, &entry, l, elementwise_config(rows * k))? };
        if host.is_none() {
            if let Some(pos) = super::read_bad_flag(&bad)? {
                return Err(bad_index_error(OP, &idt, pos, v));
            }
        }
    }
    let dev = dev.clone();
    let in_shape = x.shape().to_vec();
    Ok(Tensor::record(out, OP, &[x], move |g| {
        if g.dtype() != dtype {
            return Err(Error::DTypeMismatch {
                op: OP,
                expected: dtype,
                got: g.dtype(),
            });
        }
        let dx = super::cuda_zeros(&dev, DType::F32, &in_shape)?;
        if rows * k > 0 {
            let g = super::dense(g)?;
            let bad = super::cuda_bad_flag(&dev)?;
            let entry = format!("gather_last_bwd_{tn}");
            let (r64, v64, k64) = (rows as i64, v as i64, k as i64);
            let (pi, pg, pd, pb) = (
                super::ptr(&idt)?,
                super::ptr(&g)?,
                super::ptr(&dx)?,
                super::ptr(&bad)?,
            );
            let f = dev.function("gather", &entry)?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(&r64)
                .arg(&v64)
                .arg(&k64)
                .arg(&pi)
                .arg(&pg)
                .arg(&pd)
                .arg(&pb);
            // SAFETY: gather_last_bwd_T(i64 rows, i64 v, i64 k, const i64* idx, const T* dout,
            // float* dx, u64* bad): idx and dout contiguous [rows, k] (i64, T), dx a zeroed
            // [rows, v] f32 buffer (indices bounds-checked by the kernel), bad one u64.
            unsafe { super::launch(OP, &entry, l, elementwise_config(rows))? };
        }
        Ok(vec![Some(dx.to_dtype(dtype)?)])
    }))
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_gradients;
    use crate::Tensor;

    #[test]
    fn gathers_and_scatters() {
        let x = Tensor::randn(&[2, 3, 5], 0.0, 1.0, 1);
        let idx =
            Tensor::from_vec(vec![4i64, 0, 1, 1, 2, 3, 0, 0, 4, 2, 2, 1], &[2, 3, 2]).unwrap();
        let g = x.gather_last(&idx).unwrap().to_f64_vec();
        let xv = x.to_f64_vec();
        assert_eq!(g[0], xv[4]);
        assert_eq!(g[11], xv[5 * 5 + 1]);
        let err = check_gradients(&[x], |t| t[0].gather_last(&idx), 1e-3).unwrap();
        assert!(err < 1e-3);
        assert!(Tensor::zeros(&[2, 3])
            .gather_last(&Tensor::from_vec(vec![0i64], &[1, 1]).unwrap())
            .is_err());
    }
}
