//! Cross-entropy fused with log_softmax, with an ignore index and per-token weights (SFT masks
//! prompt tokens this way). The backward is the familiar (softmax - onehot)·w / Σw.

use crate::cpu::vec;
use crate::{Error, Result, Tensor};

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
        super::cpu_only("cross_entropy", &[self, targets])?;
        if let Some(w) = weights {
            super::cpu_only("cross_entropy", &[w])?;
        }
        let r = self.rank();
        if r == 0 || targets.shape() != &self.shape()[..r - 1] {
            return Err(Error::ShapeMismatch {
                op: "cross_entropy",
                lhs: self.shape().to_vec(),
                rhs: targets.shape().to_vec(),
            });
        }
        let v = self.shape()[r - 1];
        let raw = targets.to_i64_vec()?;
        let n = raw.len();
        let mut w: Vec<f32> = match weights {
            Some(wt) if wt.shape() == targets.shape() => wt.f32_data()?.into_owned(),
            Some(wt) => {
                return Err(Error::ShapeMismatch {
                    op: "cross_entropy weights",
                    lhs: targets.shape().to_vec(),
                    rhs: wt.shape().to_vec(),
                })
            }
            None => vec![1.0; n],
        };
        let mut ids = vec![0usize; n];
        for i in 0..n {
            if Some(raw[i]) == ignore_index {
                w[i] = 0.0;
            } else if raw[i] < 0 || raw[i] as usize >= v {
                return Err(Error::invalid(
                    "cross_entropy",
                    format!("target {} at position {i} out of range 0..{v}", raw[i]),
                ));
            } else {
                ids[i] = raw[i] as usize;
            }
        }
        let total: f32 = w.iter().sum();
        let logits = self.f32_data()?;
        let mut logp = crate::cpu::pool::zeroed(logits.len());
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
