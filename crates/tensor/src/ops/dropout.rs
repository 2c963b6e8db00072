//! Dropout from an explicit seed: the same seed drops the same elements, so runs replay exactly.
//!
//! Which elements drop is a counter-based hash, not a stream: element `i` (row-major over the
//! tensor's shape) takes 32 bits of SplitMix64's output number `i / 2 + 1` for the seed (the
//! low half for even `i`, the high half for odd), and survives when they are at least
//! `threshold = p · 2³²`; survivors are scaled by `1/(1-p)` (an f32, rounded once on the host)
//! in f32 and rounded once to the tensor's dtype. Any element's fate is computed on its own:
//! the CPU does it in parallel chunks, the CUDA kernel (kernels/elementwise.cu `dropout_T`)
//! per thread, with no mask drawn on the host or copied to the device, and both drop exactly
//! the same elements (the f32 results agree bit for bit). The backward is the same map
//! applied to the incoming gradient: the same seed and shape give the same factors.
//!
//! (Attention dropout inside the fused attention kernels hashes (head, query, key) instead,
//! since those kernels never see a row-major element index: cpu/attention/dropout.rs.)

use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// SplitMix64's increment.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// One dropout: who drops (seed, threshold) and the survivors' factor.
#[derive(Clone, Copy, Debug)]
struct Mask {
    seed: u64,
    threshold: u32,
    scale: f32,
}

impl Mask {
    fn new(p: f32, seed: u64) -> Mask {
        Mask {
            seed,
            threshold: crate::cpu::attention::drop_threshold(p),
            scale: 1.0 / (1.0 - p),
        }
    }

    /// The hash bits of elements 2k and 2k + 1 (SplitMix64's output k + 1).
    #[inline]
    fn pair_bits(&self, k: u64) -> (u32, u32) {
        let mut z = self
            .seed
            .wrapping_add(k.wrapping_add(1).wrapping_mul(GOLDEN));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z as u32, (z >> 32) as u32)
    }

    /// A dropped element is multiplied by 0, not replaced by it: NaN and ±inf stay NaN,
    /// as they would through `x * mask` (and as in the attention kernels).
    #[inline]
    fn apply(&self, bits: u32, x: f32) -> f32 {
        x * if bits >= self.threshold {
            self.scale
        } else {
            0.0
        }
    }

    /// `out[j] = x[j]`'s dropped value for elements `start..start + x.len()`; `start` even.
    fn apply_run(&self, start: usize, x: &[f32], out: &mut [f32]) {
        debug_assert!(start.is_multiple_of(2));
        for (j, (o, x)) in out.chunks_mut(2).zip(x.chunks(2)).enumerate() {
            let (lo, hi) = self.pair_bits((start / 2 + j) as u64);
            o[0] = self.apply(lo, x[0]);
            if let (Some(o1), Some(&x1)) = (o.get_mut(1), x.get(1)) {
                *o1 = self.apply(hi, x1);
            }
        }
    }

    /// The dropped tensor, untracked: the CUDA kernel for a GPU tensor, else the CPU map.
    fn run(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.cuda_storage().is_some() {
            return dropout_cuda(x, self);
        }
        let data = x.f32_data()?;
        let mut out = crate::cpu::pool::for_overwrite(data.len());
        // Fixed chunks of an even length: each element's value depends only on its index.
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(data.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (o, x))| self.apply_run(c * CHUNK, x, o));
        Ok(Tensor::f32_owned(out, x.shape()))
    }
}

impl Tensor {
    /// Zeroes each element with probability `p` and scales survivors by 1/(1-p); the module
    /// docs say which elements drop for a given seed (the same on every device).
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
        let mask = Mask::new(p, seed);
        let out = mask.run(self)?;
        Ok(Tensor::record(out, "dropout", &[self], move |g| {
            Ok(vec![Some(mask.run(g)?)])
        }))
    }
}

/// kernels/elementwise.cu `dropout_T(n, x_layout, x, out, seed, threshold, scale)`: x read
/// through its layout, row-major element indices, contiguous output.
#[cfg(feature = "cuda")]
fn dropout_cuda(x: &Tensor, m: &Mask) -> Result<Tensor> {
    const OP: &str = "dropout";
    let entry = format!("dropout_{}", super::tname(OP, x.dtype())?);
    // SAFETY: dropout_T(i64 n, Strided lx, const T* x, T* out, u64 seed, u32 threshold,
    // float scale).
    unsafe {
        super::cuda_map(
            OP,
            x,
            x.dtype(),
            &entry,
            false,
            (m.seed, m.threshold, m.scale),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Mask;
    use crate::{Parameter, Tensor};

    #[test]
    fn dropout_is_seeded_and_unbiased() {
        let x = Tensor::ones(&[10_000]);
        let a = x.dropout(0.25, 3).unwrap();
        assert_eq!(a.to_f64_vec(), x.dropout(0.25, 3).unwrap().to_f64_vec());
        assert_ne!(a.to_f64_vec(), x.dropout(0.25, 4).unwrap().to_f64_vec());
        let mean = a.mean_all().unwrap().item().unwrap();
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        assert!(x.dropout(1.0, 0).is_err());
        assert!(x.dropout(-0.1, 0).is_err());
        // Dropped elements are multiplied by zero: a NaN stays NaN wherever it is.
        let nan = Tensor::from_vec(vec![f32::NAN; 64], &[64]).unwrap();
        assert!(nan
            .dropout(0.5, 1)
            .unwrap()
            .to_f64_vec()
            .iter()
            .all(|x| x.is_nan()));
    }

    /// The hash is SplitMix64's stream: outputs pinned from the published generator
    /// (seed 0: 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4), halves in element order.
    #[test]
    fn element_bits_are_splitmix64_outputs() {
        let m = Mask::new(0.5, 0);
        assert_eq!(m.pair_bits(0), (0x7b1d_cdaf, 0xe220_a839));
        assert_eq!(m.pair_bits(1), (0xa1b9_65f4, 0x6e78_9e6a));
        // Elements 0..4 of a tensor follow those bits: kept iff bits ≥ 2³¹.
        let x = Tensor::ones(&[4]).dropout(0.5, 0).unwrap().to_f64_vec();
        assert_eq!(x, [0.0, 2.0, 2.0, 0.0]);
    }

    #[test]
    fn drop_rate_and_independence_of_neighbours() {
        let n = 200_000usize;
        for p in [0.1f32, 0.5, 0.9] {
            let d = Tensor::ones(&[n]).dropout(p, 17).unwrap().to_f64_vec();
            let dropped = d.iter().filter(|&&x| x == 0.0).count();
            let both = d.windows(2).filter(|w| w[0] == 0.0 && w[1] == 0.0).count();
            let pf = f64::from(p);
            let within = |count: usize, q: f64, m: usize| {
                let (mean, sd) = (m as f64 * q, (m as f64 * q * (1.0 - q)).sqrt());
                (count as f64 - mean).abs() < 5.0 * sd
            };
            assert!(within(dropped, pf, n), "p {p}: {dropped} of {n}");
            assert!(
                within(both, pf * pf, n - 1),
                "p {p}: {both} neighbouring pairs"
            );
        }
    }

    /// The parallel chunked map equals a plain per-element loop (odd lengths, several chunks,
    /// strided input), and the backward applies the forward's factors to the gradient.
    #[test]
    fn matches_the_per_element_definition_and_its_backward() {
        let m = Mask::new(0.3, 99);
        let x = Tensor::randn(&[3, 11_001], 0.0, 1.0, 5);
        for x in [x.clone(), x.t().unwrap()] {
            let xs = x.to_f64_vec();
            let want: Vec<f64> = xs
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let (lo, hi) = m.pair_bits(i as u64 / 2);
                    m.apply(if i % 2 == 0 { lo } else { hi }, v as f32) as f64
                })
                .collect();
            assert_eq!(x.dropout(0.3, 99).unwrap().to_f64_vec(), want);
        }
        let p = Parameter::new(x.clone());
        let g = Tensor::randn(&[3, 11_001], 0.0, 1.0, 6);
        p.tensor()
            .dropout(0.3, 99)
            .unwrap()
            .backward_with(g.clone())
            .unwrap();
        let factors = Tensor::ones(&[3, 11_001]).dropout(0.3, 99).unwrap();
        assert_eq!(
            p.grad().unwrap().to_f64_vec(),
            g.mul(&factors).unwrap().to_f64_vec()
        );
    }
}
