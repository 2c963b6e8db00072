//! gather along the last dim: out[..., j] = x[..., idx[..., j]]. With one index per row this
//! picks per-token log-probabilities from a [.., vocab] tensor. The backward scatter-adds.

use super::embedding::checked_indices;
use crate::{Error, Result, Tensor};

impl Tensor {
    /// Selects along the last dim: `idx` has self's shape except the last dim (any size K).
    pub fn gather_last(&self, idx: &Tensor) -> Result<Tensor> {
        super::cpu_only("gather_last", &[self, idx])?;
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
