//! Dropout from an explicit seed: the same seed drops the same elements, so runs replay exactly.
//! Composed from `mul`, so the backward (the same mask, scaled) comes for free.

use crate::rng::Rng;
use crate::{Error, Result, Tensor};

impl Tensor {
    /// Zeroes each element with probability `p` and scales survivors by 1/(1-p).
    pub fn dropout(&self, p: f32, seed: u64) -> Result<Tensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(
                "dropout",
                format!("p = {p} is not in [0, 1)"),
            ));
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        let mut rng = Rng::new(seed);
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..self.numel())
            .map(|_| if rng.next_f32() < p { 0.0 } else { keep })
            .collect();
        self.mul(&Tensor::f32_owned(mask, self.shape()))
    }
}

#[cfg(test)]
mod tests {
    use crate::Tensor;

    #[test]
    fn dropout_is_seeded_and_unbiased() {
        let x = Tensor::ones(&[10_000]);
        let a = x.dropout(0.25, 3).unwrap();
        assert_eq!(a.to_f64_vec(), x.dropout(0.25, 3).unwrap().to_f64_vec());
        assert_ne!(a.to_f64_vec(), x.dropout(0.25, 4).unwrap().to_f64_vec());
        let mean = a.mean_all().unwrap().item().unwrap();
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        assert!(x.dropout(1.0, 0).is_err());
    }
}
