//! Dropout from an explicit seed: the same seed drops the same elements, so runs replay exactly.
//! Composed from `mul`, so the backward (the same mask, scaled) comes for free.
//!
//! On CUDA the mask is drawn on the host from the same generator, in the same order, and
//! copied up, so a GPU tensor loses exactly the elements a CPU tensor would for the same seed
//! (and so CPU and GPU runs of one model replay each other's dropout). f32: the mask holds
//! 0 or 1/(1-p) and one `mul` gives the CPU's result bit for bit. bf16: 1/(1-p) is not a bf16
//! value, so the mask holds 0 or 1 (exact) and `mul_scalar(1/(1-p))` scales in f32, rounding
//! once. Drawing the mask costs host time and a copy per call; a device generator replaying
//! the xoshiro stream (jump-ahead per block) would remove both.

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
        #[cfg(feature = "cuda")]
        if let Some(dev) = super::cuda_inputs("dropout", &[self])? {
            return dropout_cuda(&dev, self, &mut rng, p, keep);
        }
        let mask: Vec<f32> = (0..self.numel())
            .map(|_| if rng.next_f32() < p { 0.0 } else { keep })
            .collect();
        self.mul(&Tensor::f32_owned(mask, self.shape()))
    }
}

/// The mask drawn on the host exactly as the CPU path draws it (one `next_f32` per element in
/// row-major order), copied to x's GPU in x's dtype, then `mul` (and for bf16 `mul_scalar`)
/// on the device; the backward is theirs.
#[cfg(feature = "cuda")]
fn dropout_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    x: &Tensor,
    rng: &mut Rng,
    p: f32,
    keep: f32,
) -> Result<Tensor> {
    use crate::storage::Storage;
    use crate::DType;
    super::tname("dropout", x.dtype())?;
    let n = x.numel();
    if x.dtype() == DType::F32 {
        let mask: Vec<f32> = (0..n)
            .map(|_| if rng.next_f32() < p { 0.0 } else { keep })
            .collect();
        let mask = super::cuda_from_host(dev, &Storage::F32(mask), x.shape())?;
        return x.mul(&mask);
    }
    let (zero, one) = (half::bf16::ZERO, half::bf16::ONE);
    let mask: Vec<half::bf16> = (0..n)
        .map(|_| if rng.next_f32() < p { zero } else { one })
        .collect();
    let mask = super::cuda_from_host(dev, &Storage::BF16(mask), x.shape())?;
    x.mul(&mask)?.mul_scalar(keep)
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
