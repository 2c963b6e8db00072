//! Cross-entropy fused with log_softmax, with an ignore index and per-token weights (SFT masks
//! prompt tokens this way). The backward is the familiar (softmax - onehot)·w / Σw.
//!
//! On CUDA (logits on a GPU; kernels/cross_entropy.cu) the log-probabilities are never
//! materialised: one kernel turns targets, ignore index and weights into per-row weights and
//! 1/Σw on the device, one computes each row's log-sum-exp and weighted loss, and the loss is
//! their deterministic sum (reduce.cu); the backward recomputes softmax from the saved
//! log-sum-exp and reads the upstream gradient from device memory (no wait for the GPU).
//! Targets follow embedding's index rule (host or the logits' GPU, ops/embedding.rs); the
//! weights, being float data, must be on the logits' GPU (f32 or bf16). The loss is an f32
//! scalar whatever the logits' dtype; the logits' gradient has their dtype.

use crate::cpu::vec;
use crate::{Error, Result, Tensor};

/// The first target (not ignored) outside 0..v is an error naming its position and value.
fn check_targets(raw: &[i64], ignore_index: Option<i64>, v: usize) -> Result<()> {
    for (i, &t) in raw.iter().enumerate() {
        if Some(t) != ignore_index && (t < 0 || t as usize >= v) {
            return Err(Error::invalid(
                "cross_entropy",
                format!("target {t} at position {i} out of range 0..{v}"),
            ));
        }
    }
    Ok(())
}

/// Threads per block of the per-row cross-entropy kernels, from the vocabulary size alone
/// (the block's reduction order depends on it): 1024 for GPT-2-sized vocabularies.
#[cfg(feature = "cuda")]
fn ce_threads(v: usize) -> u32 {
    if v >= 4096 {
        1024
    } else {
        256
    }
}

/// kernels/cross_entropy.cu: `cross_entropy_weights` (per-row weights, 1/Σw and the bad-target
/// flag), `cross_entropy_fwd_T` (log-sum-exp and weighted loss per row), the sum of the row
/// losses (reduce.cu), and `cross_entropy_bwd_T` in the backward.
///
/// The fused kernel (loss and gradient in one pass) is not used: the backward's upstream
/// gradient lives on the device, so using it would cost a scaling pass over the whole
/// gradient, or a wait to learn that it is 1; and the forward + backward pair reads the logits
/// as often as the fused kernel does.
#[cfg(feature = "cuda")]
fn cross_entropy_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<i64>,
    weights: Option<&Tensor>,
    v: usize,
) -> Result<Tensor> {
    use crate::cuda::storage::rows_config;
    use crate::DType;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    const OP: &str = "cross_entropy";
    let dtype = logits.dtype();
    let tn = super::tname(OP, dtype)?;
    let (tgt, host) = super::cuda_index_tensor(OP, targets, dev)?;
    if let Some(vals) = &host {
        check_targets(vals, ignore_index, v)?;
    }
    let rows = targets.numel();
    // The weights as the kernel reads them: contiguous f32 on the device.
    let wts = match weights {
        None => None,
        Some(wt) => {
            super::tname(OP, wt.dtype())?;
            Some(super::dense(&wt.detach().to_dtype(DType::F32)?)?)
        }
    };
    let w = super::cuda_uninit(dev, DType::F32, &[rows])?;
    let inv_total = super::cuda_zeros(dev, DType::F32, &[])?;
    let lse = super::cuda_uninit(dev, DType::F32, &[rows])?;
    // Written by the forward kernel, which runs only for a non-empty vocabulary; with an empty
    // one (valid only when every target is ignored) the loss sums zeros.
    let loss_rows = if v > 0 {
        super::cuda_uninit(dev, DType::F32, &[rows])?
    } else {
        super::cuda_zeros(dev, DType::F32, &[rows])?
    };
    let threads = ce_threads(v);
    let (r64, v64) = (rows as i64, v as i64);
    if rows > 0 {
        let bad = super::cuda_bad_flag(dev)?;
        let entry = "cross_entropy_weights";
        let (pt, pw, pinv, pb) = (
            super::ptr(&tgt)?,
            super::ptr(&w)?,
            super::ptr(&inv_total)?,
            super::ptr(&bad)?,
        );
        // A null pointer means "no weights" to the kernel.
        let pwts = match &wts {
            Some(t) => super::ptr(t)?,
            None => 0u64,
        };
        let ignore = ignore_index.unwrap_or(0);
        let has_ignore = i32::from(ignore_index.is_some());
        let f = dev.function("cross_entropy", entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&r64)
            .arg(&v64)
            .arg(&pt)
            .arg(&pwts)
            .arg(&ignore)
            .arg(&has_ignore);
        l.arg(&pw).arg(&pinv).arg(&pb);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: cross_entropy_weights(i64 rows, i64 vocab, const i64* targets, const float*
        // weights, i64 ignore_index, int has_ignore, float* w, float* inv_total, u64* bad):
        // targets [rows] contiguous i64, weights [rows] contiguous f32 or null, w a fresh
        // [rows] f32 buffer, inv_total one f32, bad one u64; one block of 1024 threads.
        unsafe { super::launch(OP, entry, l, cfg)? };
        if host.is_none() {
            if let Some(pos) = super::read_bad_flag(&bad)? {
                let t = tgt.to_i64_vec()?;
                return Err(match t.get(pos) {
                    Some(&t) => Error::invalid(
                        OP,
                        format!("target {t} at position {pos} out of range 0..{v}"),
                    ),
                    None => Error::cuda(OP, format!("bad target flagged at position {pos}")),
                });
            }
        }
    }
    let xd = super::dense(logits)?;
    if rows > 0 && v > 0 {
        let entry = format!("cross_entropy_fwd_{tn}");
        let ptrs = [&xd, &tgt, &w, &inv_total, &lse, &loss_rows]
            .iter()
            .map(|t| super::ptr(t))
            .collect::<Result<Vec<u64>>>()?;
        let f = dev.function("cross_entropy", &entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&r64).arg(&v64);
        for p in &ptrs {
            l.arg(p);
        }
        // SAFETY: cross_entropy_fwd_T(i64 rows, i64 vocab, const T* logits, const i64*
        // targets, const float* w, const float* inv_total, float* lse, float* loss_rows):
        // logits a contiguous [rows, vocab] buffer of T, targets [rows] i64, w [rows] f32 and
        // inv_total from the weights kernel, lse and loss_rows fresh [rows] f32 buffers.
        unsafe { super::launch(OP, &entry, l, rows_config(rows, threads))? };
    }
    let loss = super::reduce::reduce_cuda(dev, OP, "sum", &loss_rows, None, &[], 1.0)?;
    let dev = dev.clone();
    let shape = logits.shape().to_vec();
    Ok(Tensor::record(loss, OP, &[logits], move |g| {
        let dlogits = super::cuda_uninit(&dev, dtype, &shape)?;
        if rows > 0 && v > 0 {
            // The upstream gradient as one f32 in device memory.
            let g = super::dense(&g.to_dtype(DType::F32)?)?;
            let entry = format!("cross_entropy_bwd_{tn}");
            let ptrs = [&xd, &tgt, &w, &inv_total, &lse, &g, &dlogits]
                .iter()
                .map(|t| super::ptr(t))
                .collect::<Result<Vec<u64>>>()?;
            let f = dev.function("cross_entropy", &entry)?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(&r64).arg(&v64);
            for p in &ptrs {
                l.arg(p);
            }
            // SAFETY: cross_entropy_bwd_T(i64 rows, i64 vocab, const T* logits, const i64*
            // targets, const float* w, const float* inv_total, const float* lse, const float*
            // dloss, T* dlogits): the forward's buffers, dloss one f32 (the scalar upstream
            // gradient), dlogits a fresh contiguous [rows, vocab] buffer of T.
            unsafe { super::launch(OP, &entry, l, rows_config(rows, threads))? };
        }
        Ok(vec![Some(dlogits)])
    }))
}

impl Tensor {
    /// Mean negative log-likelihood of `targets` under `self` (logits [..., V]).
    ///
    /// Targets equal to `ignore_index` count for nothing. With `weights` (one per target), the
    /// loss is Σ wᵢ·nllᵢ / Σ wᵢ over the counted targets; without, a plain mean. When nothing
    /// counts, the loss is 0 (not NaN).
    pub fn cross_entropy(
        &self,
        targets: &Tensor,
        ignore_index: Option<i64>,
        weights: Option<&Tensor>,
    ) -> Result<Tensor> {
        let r = self.rank();
        if r == 0 || targets.shape() != &self.shape()[..r - 1] {
            return Err(Error::ShapeMismatch {
                op: "cross_entropy",
                lhs: self.shape().to_vec(),
                rhs: targets.shape().to_vec(),
            });
        }
        if let Some(wt) = weights {
            if wt.shape() != targets.shape() {
                return Err(Error::ShapeMismatch {
                    op: "cross_entropy weights",
                    lhs: targets.shape().to_vec(),
                    rhs: wt.shape().to_vec(),
                });
            }
        }
        let v = self.shape()[r - 1];
        #[cfg(feature = "cuda")]
        {
            let mut floats = vec![self];
            floats.extend(weights);
            if let Some(dev) = super::cuda_inputs("cross_entropy", &floats)? {
                return cross_entropy_cuda(&dev, self, targets, ignore_index, weights, v);
            }
        }
        super::indices_on_host("cross_entropy", targets)?;
        let raw = targets.to_i64_vec()?;
        let n = raw.len();
        let mut w: Vec<f32> = match weights {
            Some(wt) => wt.f32_data()?.into_owned(),
            None => vec![1.0; n],
        };
        let mut ids = vec![0usize; n];
        check_targets(&raw, ignore_index, v)?;
        for i in 0..n {
            if Some(raw[i]) == ignore_index {
                w[i] = 0.0;
            } else {
                ids[i] = raw[i] as usize;
            }
        }
        let total: f32 = w.iter().sum();
        let logits = self.f32_data()?;
        // log_softmax_rows writes every element; pooled again when the graph is freed.
        let mut logp = crate::cpu::pool::Pooled(crate::cpu::pool::for_overwrite(logits.len()));
        if v > 0 {
            vec::log_softmax_rows(&logits, v, &mut logp);
        }
        let mut loss = 0.0f64;
        for i in 0..n {
            if w[i] != 0.0 {
                loss -= f64::from(w[i]) * f64::from(logp[i * v + ids[i]]);
            }
        }
        let scale = if total != 0.0 { 1.0 / total } else { 0.0 };
        let out = Tensor::scalar((loss * f64::from(scale)) as f32);
        let shape = self.shape().to_vec();
        Ok(Tensor::record(out, "cross_entropy", &[self], move |g| {
            let gs = g.item()? * scale;
            let mut dx = crate::cpu::pool::zeroed(logp.len());
            for i in 0..n {
                if w[i] == 0.0 {
                    continue;
                }
                let row = &mut dx[i * v..(i + 1) * v];
                vec::exp(&logp[i * v..(i + 1) * v], row);
                row[ids[i]] -= 1.0;
                let c = gs * w[i];
                for x in row.iter_mut() {
                    *x *= c;
                }
            }
            Ok(vec![Some(Tensor::f32_owned(dx, &shape))])
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_gradients;
    use crate::Tensor;

    #[test]
    fn matches_log_softmax_pick_and_ignores() {
        let x = Tensor::randn(&[4, 6], 0.0, 2.0, 1);
        let t = Tensor::from_vec(vec![1i64, -100, 5, 0], &[4]).unwrap();
        let loss = x
            .cross_entropy(&t, Some(-100), None)
            .unwrap()
            .item()
            .unwrap();
        let lp = x.log_softmax(-1).unwrap().to_f64_vec();
        let want = -(lp[1] + lp[2 * 6 + 5] + lp[3 * 6]) / 3.0;
        assert!((loss as f64 - want).abs() < 1e-5, "{loss} {want}");
        let all_ignored = Tensor::from_vec(vec![-100i64; 4], &[4]).unwrap();
        assert_eq!(
            x.cross_entropy(&all_ignored, Some(-100), None)
                .unwrap()
                .item()
                .unwrap(),
            0.0
        );
        assert!(x
            .cross_entropy(&Tensor::from_vec(vec![6i64; 4], &[4]).unwrap(), None, None)
            .is_err());
    }

    #[test]
    fn weighted_cross_entropy_gradient() {
        let x = Tensor::randn(&[2, 3, 5], 0.0, 1.0, 2);
        let t = Tensor::from_vec(vec![0i64, 4, -1, 2, 2, 1], &[2, 3]).unwrap();
        let w = Tensor::from_vec(vec![1.0f32, 0.5, 1.0, 2.0, 0.0, 1.0], &[2, 3]).unwrap();
        let err =
            check_gradients(&[x], |a| a[0].cross_entropy(&t, Some(-1), Some(&w)), 1e-3).unwrap();
        assert!(err < 1e-3, "{err}");
    }
}
