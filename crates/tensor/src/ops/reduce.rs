//! Reductions over one dimension, with `keepdim`: sum, mean, max and argmax (primitives), and
//! logsumexp and var (composed, so their gradients come from the primitives').

use crate::cpu::vec;
use crate::layout::resolve_dim;
use crate::{Result, Tensor};

/// Splits a shape around `dim` into (outer, n, inner) element counts.
fn split(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (
        shape[..dim].iter().product(),
        shape[dim],
        shape[dim + 1..].iter().product(),
    )
}

fn reduced_shape(shape: &[usize], dim: usize, keepdim: bool) -> Vec<usize> {
    let mut s = shape.to_vec();
    if keepdim {
        s[dim] = 1;
    } else {
        s.remove(dim);
    }
    s
}

impl Tensor {
    /// Sum over `dim` (negative counts from the end).
    pub fn sum(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = resolve_dim("sum", dim, self.shape())?;
        let (outer, n, inner) = split(self.shape(), d);
        let x = self.f32_data()?;
        let mut out = crate::cpu::pool::zeroed(outer * inner);
        if inner == 1 {
            for (o, row) in out.iter_mut().zip(x.chunks(n.max(1))) {
                *o = if n == 0 { 0.0 } else { vec::sum(row) };
            }
        } else if n > 0 && inner > 0 {
            // Accumulate whole inner rows with the SIMD axpy: fixed order, deterministic.
            // (An empty dim leaves the zeros; `chunks(0)` would panic.)
            for (o, block) in out.chunks_mut(inner).zip(x.chunks(n * inner)) {
                for row in block.chunks(inner) {
                    vec::axpy(1.0, row, o);
                }
            }
        }
        let keep_shape = reduced_shape(self.shape(), d, true);
        let out = Tensor::f32_owned(out, &reduced_shape(self.shape(), d, keepdim));
        let in_shape = self.shape().to_vec();
        Ok(Tensor::record(out, "sum", &[self], move |g| {
            Ok(vec![Some(
                g.reshape_to(&keep_shape)?
                    .broadcast_to(&in_shape)?
                    .contiguous()?,
            )])
        }))
    }

    /// Sum of all elements, as a 0-dimensional tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        let n = self.numel();
        self.reshape_to(&[n])?.sum(0, false)
    }

    /// Mean over `dim`.
    pub fn mean(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let n = self.dim(dim)?;
        self.sum(dim, keepdim)?.mul_scalar(1.0 / n as f32)
    }

    /// Mean of all elements.
    pub fn mean_all(&self) -> Result<Tensor> {
        let n = self.numel();
        self.sum_all()?.mul_scalar(1.0 / n as f32)
    }

    /// Variance over `dim`, with Bessel's correction when `unbiased` (PyTorch's default).
    pub fn var(&self, dim: isize, keepdim: bool, unbiased: bool) -> Result<Tensor> {
        let n = self.dim(dim)?;
        let centred = self.sub(&self.mean(dim, true)?)?;
        let denom = if unbiased { n.saturating_sub(1) } else { n };
        centred
            .square()?
            .sum(dim, keepdim)?
            .mul_scalar(1.0 / denom as f32)
    }

    /// Index of the largest element along `dim` (the first on ties), as i64.
    pub fn argmax(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = resolve_dim("argmax", dim, self.shape())?;
        let (idx, _) = self.max_with_index(d)?;
        Tensor::from_vec(
            idx.into_iter().map(|i| i as i64).collect(),
            &reduced_shape(self.shape(), d, keepdim),
        )
    }

    fn max_with_index(&self, d: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let (outer, n, inner) = split(self.shape(), d);
        if n == 0 {
            return Err(crate::Error::invalid(
                "max",
                format!("reduction over empty dim {d} of shape {:?}", self.shape()),
            ));
        }
        let x = self.f32_data()?;
        let mut idx = vec![0usize; outer * inner];
        let mut val = vec![f32::NEG_INFINITY; outer * inner];
        for o in 0..outer {
            for j in 0..n {
                let row = &x[(o * n + j) * inner..][..inner];
                for i in 0..inner {
                    // `>` keeps the first maximum; NaN compares false and is skipped.
                    if row[i] > val[o * inner + i] || j == 0 {
                        val[o * inner + i] = row[i];
                        idx[o * inner + i] = j;
                    }
                }
            }
        }
        Ok((idx, val))
    }

    /// Largest element along `dim`. The gradient flows to the first maximal element.
    pub fn max(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = resolve_dim("max", dim, self.shape())?;
        let (idx, val) = self.max_with_index(d)?;
        let out = Tensor::f32_owned(val, &reduced_shape(self.shape(), d, keepdim));
        let in_shape = self.shape().to_vec();
        Ok(Tensor::record(out, "max", &[self], move |g| {
            let (outer, n, inner) = split(&in_shape, d);
            let gv = g.f32_data()?;
            let mut gx = crate::cpu::pool::zeroed(outer * n * inner);
            for o in 0..outer {
                for i in 0..inner {
                    gx[(o * n + idx[o * inner + i]) * inner + i] = gv[o * inner + i];
                }
            }
            Ok(vec![Some(Tensor::f32_owned(gx, &in_shape))])
        }))
    }

    /// log Σ exp over `dim`, computed stably by shifting with the (detached) maximum.
    pub fn logsumexp(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let m = self.detach().max(dim, true)?;
        // A row of all -inf would give -inf - -inf = NaN; shift such rows by 0 instead.
        let m = m.clamp(f32::MIN, f32::MAX)?;
        let s = self.sub(&m)?.exp()?.sum(dim, true)?.log()?.add(&m)?;
        if keepdim {
            Ok(s)
        } else {
            s.squeeze(dim)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_gradients;
    use crate::Tensor;

    #[test]
    fn sums_over_each_dim() {
        let x = Tensor::arange(0.0, 24.0, 1.0)
            .unwrap()
            .reshape(&[2, 3, 4])
            .unwrap();
        assert_eq!(x.sum(1, false).unwrap().shape(), &[2, 4]);
        assert_eq!(x.sum(0, true).unwrap().to_f64_vec()[..2], [12.0, 14.0]);
        assert_eq!(x.sum(-1, false).unwrap().to_f64_vec()[0], 6.0);
        assert_eq!(x.sum_all().unwrap().item().unwrap(), 276.0);
    }

    #[test]
    fn max_argmax_and_ties() {
        let x = Tensor::from_vec(vec![1.0f32, 3.0, 3.0, 0.0], &[2, 2]).unwrap();
        assert_eq!(
            x.argmax(1, false).unwrap().to_i64_vec().unwrap(),
            vec![1, 0]
        );
        assert_eq!(x.max(1, false).unwrap().to_f64_vec(), vec![3.0, 3.0]);
    }

    #[test]
    fn reduction_gradients() {
        let x = Tensor::randn(&[3, 4, 2], 0.0, 1.0, 5);
        for (name, f) in [
            (
                "sum",
                (|x: &[Tensor]| x[0].sum(1, false)) as fn(&[Tensor]) -> crate::Result<Tensor>,
            ),
            ("mean", |x| x[0].mean(-1, true)),
            ("max", |x| x[0].max(0, false)),
            ("logsumexp", |x| x[0].logsumexp(1, false)),
            ("var", |x| x[0].var(1, false, true)),
        ] {
            let err = check_gradients(std::slice::from_ref(&x), f, 1e-3).unwrap();
            assert!(err < 2e-3, "{name}: {err}");
        }
    }
}
