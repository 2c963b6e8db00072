//! Layer normalisation over the last dim with weight and bias, as GPT-2's pre-LN blocks use it.

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
        let x = self.f32_data()?;
        let rows = x.len().checked_div(cols).unwrap_or(0);
        let (mut out, mut mean, mut rstd) = (
            crate::cpu::pool::zeroed(x.len()),
            crate::cpu::pool::zeroed(rows),
            crate::cpu::pool::zeroed(rows),
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
                let mut dx = crate::cpu::pool::zeroed(xv.len());
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
