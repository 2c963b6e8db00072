//! Layer normalisation over the last dim with weight and bias, as GPT-2's pre-LN blocks use it.
//!
//! On CUDA (kernels/layer_norm.cu) the forward saves each row's mean and 1/std in f32 for the
//! backward; the weight and bias gradients are summed over rows in f32 through per-block
//! partial rows added in a fixed order (no atomics: deterministic), and returned in the
//! parameters' dtype like every gradient of the engine (autograd adds gradients of one tensor
//! with `add`, which needs equal dtypes; a bf16 weight's gradient is rounded once, at the end).

use crate::cpu::vec;
use crate::{Error, Result, Tensor};

impl Tensor {
    /// (x - mean) / sqrt(var + eps) · weight + bias over the last dim (biased variance).
    pub fn layer_norm(&self, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
        let cols = *self
            .shape()
            .last()
            .ok_or_else(|| Error::invalid("layer_norm", "scalar input"))?;
        for p in [weight, bias] {
            if p.shape() != [cols] {
                return Err(Error::ShapeMismatch {
                    op: "layer_norm",
                    lhs: self.shape().to_vec(),
                    rhs: p.shape().to_vec(),
                });
            }
        }
        #[cfg(feature = "cuda")]
        if let Some(dev) = super::cuda_inputs("layer_norm", &[self, weight, bias])? {
            return layer_norm_cuda(&dev, self, weight, bias, cols, eps);
        }
        let x = self.f32_data()?;
        let rows = x.len().checked_div(cols).unwrap_or(0);
        // The row kernel writes every output, mean and rstd (all empty when there are no rows).
        let (mut out, mut mean, mut rstd) = (
            crate::cpu::pool::for_overwrite(x.len()),
            crate::cpu::pool::for_overwrite(rows),
            crate::cpu::pool::for_overwrite(rows),
        );
        let (w, b) = (weight.f32_data()?, bias.f32_data()?);
        if rows > 0 {
            vec::layer_norm_rows(&x, &w, &b, cols, eps, &mut out, &mut mean, &mut rstd);
        }
        let out = Tensor::f32_owned(out, self.shape());
        let (xs, ws) = (self.contiguous()?.detach(), weight.detach());
        Ok(Tensor::record(
            out,
            "layer_norm",
            &[self, weight, bias],
            move |g| {
                let g = g.contiguous()?;
                let (xv, wv, gv) = (xs.f32_data()?, ws.f32_data()?, g.f32_data()?);
                // Every dx element is written by the row kernel; dw and db accumulate.
                let mut dx = crate::cpu::pool::for_overwrite(xv.len());
                let (mut dw, mut db) = (
                    crate::cpu::pool::zeroed(cols),
                    crate::cpu::pool::zeroed(cols),
                );
                if rows > 0 {
                    vec::layer_norm_backward_rows(
                        &xv, &wv, &mean, &rstd, &gv, cols, &mut dx, &mut dw, &mut db,
                    );
                }
                Ok(vec![
                    Some(Tensor::f32_owned(dx, xs.shape())),
                    Some(Tensor::f32_owned(dw, &[cols])),
                    Some(Tensor::f32_owned(db, &[cols])),
                ])
            },
        ))
    }
}

/// Threads per block of every layer_norm.cu launch.
#[cfg(feature = "cuda")]
const LN_THREADS: u32 = 256;

/// Columns per lane of layer_norm.cu's one-warp-per-row kernels (`layer_norm_*_wCPL_T`): the
/// smallest instance that holds a row of `cols`, or None past 1024 columns (the block kernels).
#[cfg(feature = "cuda")]
fn warp_row_cpl(cols: usize) -> Option<usize> {
    [4, 8, 16, 24, 32].into_iter().find(|&k| cols <= 32 * k)
}

/// Rows per block of the one-warp-per-row kernels (one per warp of LN_THREADS).
#[cfg(feature = "cuda")]
const LN_WARPS: usize = LN_THREADS as usize / 32;

/// kernels/layer_norm.cu: `layer_norm_fwd_T` (saving mean and rstd, f32), and in the backward
/// `layer_norm_bwd_T` (dx, and per-block f32 partial sums of dgamma and dbeta over the rows a
/// block owns) then `layer_norm_bwd_params` (the partials added in block order).
#[cfg(feature = "cuda")]
fn layer_norm_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    cols: usize,
    eps: f32,
) -> Result<Tensor> {
    use crate::cuda::storage::rows_config;
    use crate::DType;
    use cudarc::driver::PushKernelArg;
    const OP: &str = "layer_norm";
    super::same_dtype(OP, x, weight)?;
    super::same_dtype(OP, x, bias)?;
    let dtype = x.dtype();
    let tn = super::tname(OP, dtype)?;
    let rows = x.numel().checked_div(cols).unwrap_or(0);
    let y = super::cuda_uninit(dev, dtype, x.shape())?;
    let mean = super::cuda_uninit(dev, DType::F32, &[rows])?;
    let rstd = super::cuda_uninit(dev, DType::F32, &[rows])?;
    let (xd, wd, bd) = (super::dense(x)?, super::dense(weight)?, super::dense(bias)?);
    let cpl = warp_row_cpl(cols);
    if rows > 0 {
        let (entry, cfg) = match cpl {
            Some(k) => (
                format!("layer_norm_fwd_w{k}_{tn}"),
                rows_config(rows.div_ceil(LN_WARPS), LN_THREADS),
            ),
            None => (
                format!("layer_norm_fwd_{tn}"),
                rows_config(rows, LN_THREADS),
            ),
        };
        let (r64, c64) = (rows as i64, cols as i64);
        let ptrs = [&xd, &wd, &bd, &y, &mean, &rstd]
            .iter()
            .map(|t| super::ptr(t))
            .collect::<Result<Vec<u64>>>()?;
        let f = dev.function("layer_norm", &entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&r64).arg(&c64);
        for p in &ptrs {
            l.arg(p);
        }
        l.arg(&eps);
        // SAFETY: layer_norm_fwd_T and layer_norm_fwd_wK_T (K · 32 ≥ cols) take (i64 rows,
        // i64 cols, const T* x, const T* gamma, const T* beta, T* y, float* mean, float* rstd,
        // float eps): x and y contiguous [rows, cols] of T, gamma and beta contiguous [cols]
        // of T, mean and rstd fresh [rows] f32 buffers; both loop over rows grid-stride.
        unsafe { super::launch(OP, &entry, l, cfg)? };
    }
    let dev = dev.clone();
    let shape = x.shape().to_vec();
    Ok(Tensor::record(y, OP, &[x, weight, bias], move |g| {
        super::same_dtype(OP, &xd, g)?;
        let dx = super::cuda_uninit(&dev, dtype, &shape)?;
        let dgamma = super::cuda_zeros(&dev, DType::F32, &[cols])?;
        let dbeta = super::cuda_zeros(&dev, DType::F32, &[cols])?;
        if rows > 0 && cols > 0 {
            let g = super::dense(g)?;
            // G blocks, from the row count alone, so the order of the dgamma/dbeta sums (and
            // so their bits) never depends on the card.
            let (parts, entry) = match cpl {
                Some(k) => (
                    rows.div_ceil(LN_WARPS).min(256),
                    format!("layer_norm_bwd_w{k}_{tn}"),
                ),
                None => (rows.min(256), format!("layer_norm_bwd_{tn}")),
            };
            let dg_part = super::cuda_uninit(&dev, DType::F32, &[parts, cols])?;
            let db_part = super::cuda_uninit(&dev, DType::F32, &[parts, cols])?;
            let (r64, c64) = (rows as i64, cols as i64);
            let ptrs = [&xd, &wd, &mean, &rstd, &g, &dx, &dg_part, &db_part]
                .iter()
                .map(|t| super::ptr(t))
                .collect::<Result<Vec<u64>>>()?;
            let f = dev.function("layer_norm", &entry)?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(&r64).arg(&c64);
            for p in &ptrs {
                l.arg(p);
            }
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (parts as u32, 1, 1),
                block_dim: (LN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: layer_norm_bwd_T and layer_norm_bwd_wK_T (K · 32 ≥ cols) take (i64 rows,
            // i64 cols, const T* x, const T* gamma, const float* mean, const float* rstd, const
            // T* dy, T* dx, float* dgamma_part, float* dbeta_part): x, dy, dx contiguous
            // [rows, cols] of T; gamma [cols] of T; mean, rstd [rows] f32 from the forward;
            // the partials [G, cols] f32 with G = gridDim.x, every element written.
            unsafe { super::launch(OP, &entry, l, cfg)? };
            let entry = "layer_norm_bwd_params";
            let p64 = parts as i64;
            let ptrs = [&dg_part, &db_part, &dgamma, &dbeta]
                .iter()
                .map(|t| super::ptr(t))
                .collect::<Result<Vec<u64>>>()?;
            let f = dev.function("layer_norm", entry)?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(&p64).arg(&c64);
            for p in &ptrs {
                l.arg(p);
            }
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (cols.div_ceil(32) as u32, 1, 1),
                block_dim: (LN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: layer_norm_bwd_params(i64 parts, i64 cols, const float* dgamma_part,
            // const float* dbeta_part, float* dgamma, float* dbeta) with blockDim 256 (8
            // slices of 32 columns) and a block per 32 columns: the [parts, cols] f32 partials
            // written above, dgamma and dbeta [cols] f32 buffers; columns past cols are
            // neither read nor written.
            unsafe { super::launch(OP, entry, l, cfg)? };
        }
        Ok(vec![
            Some(dx),
            Some(dgamma.to_dtype(dtype)?),
            Some(dbeta.to_dtype(dtype)?),
        ])
    }))
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_gradients;
    use crate::Tensor;

    #[test]
    fn normalises_rows() {
        let x = Tensor::randn(&[5, 16], 3.0, 2.0, 1);
        let y = x
            .layer_norm(&Tensor::ones(&[16]), &Tensor::zeros(&[16]), 1e-5)
            .unwrap();
        let m = y.mean(-1, false).unwrap().to_f64_vec();
        let v = y.var(-1, false, false).unwrap().to_f64_vec();
        for (m, v) in m.iter().zip(&v) {
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-3, "{m} {v}");
        }
    }

    #[test]
    fn layer_norm_gradients() {
        let x = Tensor::randn(&[2, 3, 6], 0.0, 1.0, 2);
        let w = Tensor::randn(&[6], 1.0, 0.3, 3);
        let b = Tensor::randn(&[6], 0.0, 0.3, 4);
        let err =
            check_gradients(&[x, w, b], |t| t[0].layer_norm(&t[1], &t[2], 1e-5), 1e-3).unwrap();
        assert!(err < 3e-3, "{err}");
    }
}
