//! Dropout on the attention probabilities, from a counter-based hash instead of a stream.
//!
//! A fused attention kernel never holds the probability matrix, so it cannot take a mask drawn
//! up front the way [`crate::Tensor::dropout`] does; and the backward must drop exactly the
//! forward's elements without a stored mask. So whether element (head `bh`, query row `i`,
//! key `j`) survives is a pure function of the seed and those three indices: every kernel
//! (the CPU's fused and reference paths, the CUDA SIMT and tensor-core kernels) evaluates the
//! same function wherever it meets the element, in any order, and all agree bit for bit.
//!
//! The function (kernels/flash_attention.cu `fa_drop_row` / `fa_drop_bits` mirror it):
//!
//! ```text
//! row  = mix64(seed ^ mix64(bh << 32 | i))          once per query row
//! bits = fmix32(lo32(row) ^ fmix32(j ^ hi32(row)))  per element
//! keep ⇔ bits ≥ threshold,   threshold = ⌊p · 2³²⌋
//! ```
//!
//! `mix64` is the SplitMix64 finaliser and `fmix32` MurmurHash3's; both are bijections, so
//! distinct rows get unrelated 64-bit keys and, within a row, distinct keys get unrelated bits.
//! A survivor is scaled by `1/(1 − p)` (rounded to f32 once, on the host, and passed to every
//! kernel), so the expected output is the undropped one. The softmax normaliser (and the
//! saved logsumexp) are those of the undropped probabilities: dropout applies to `P` after
//! normalisation, exactly as `softmax(S).dropout(p)` would.
//!
//! `i` is the query's row in this call (0..Tq), not its absolute position Tk − Tq + i: the
//! same position gets another mask in a call with another Tq. Training (the only user of
//! dropout) always has Tq = Tk.

use crate::{Error, Result};

/// Dropout with probability `p` on attention probabilities, keyed by `seed`; see the module
/// docs for which elements it drops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDropout {
    p: f32,
    seed: u64,
    threshold: u32,
    scale: f32,
}

impl AttentionDropout {
    /// Dropout with probability `p` ∈ [0, 1) keyed by `seed`; an error for any other `p`.
    pub fn new(p: f32, seed: u64) -> Result<AttentionDropout> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(
                "attention dropout",
                format!("p = {p} is not in [0, 1)"),
            ));
        }
        Ok(AttentionDropout {
            p,
            seed,
            threshold: drop_threshold(p),
            scale: 1.0 / (1.0 - p),
        })
    }

    /// The drop probability.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Elements whose hash bits fall below this are dropped (0 drops nothing).
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// The factor survivors are scaled by, `1/(1 − p)` in f32.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Whether any element can be dropped.
    pub fn is_active(&self) -> bool {
        self.threshold != 0
    }

    /// The per-row key of head `bh`, query row `i`.
    pub fn row(&self, bh: usize, i: usize) -> DropRow {
        debug_assert!(bh <= u32::MAX as usize && i <= u32::MAX as usize);
        let key = mix64(self.seed ^ mix64(((bh as u64) << 32) | i as u64));
        DropRow {
            lo: key as u32,
            hi: (key >> 32) as u32,
            threshold: self.threshold,
            scale: self.scale,
        }
    }

    /// The factor of element (`bh`, `i`, `j`): 0 if dropped, else [`Self::scale`].
    pub fn factor(&self, bh: usize, i: usize, j: usize) -> f32 {
        self.row(bh, i).factor(j)
    }
}

/// The hash key of one query row; [`DropRow::factor`] gives its elements.
#[derive(Clone, Copy, Debug)]
pub struct DropRow {
    lo: u32,
    hi: u32,
    threshold: u32,
    scale: f32,
}

impl DropRow {
    /// The 32 hash bits of key `j` in this row.
    #[inline]
    pub fn bits(&self, j: usize) -> u32 {
        debug_assert!(j <= u32::MAX as usize);
        fmix32(self.lo ^ fmix32(j as u32 ^ self.hi))
    }

    /// Whether key `j` survives.
    #[inline]
    pub fn keeps(&self, j: usize) -> bool {
        self.bits(j) >= self.threshold
    }

    /// 0 if key `j` is dropped, else the survivors' scale.
    #[inline]
    pub fn factor(&self, j: usize) -> f32 {
        if self.keeps(j) {
            self.scale
        } else {
            0.0
        }
    }
}

/// The 32-bit hash threshold below which an element drops with probability `p` ∈ [0, 1):
/// ⌊p · 2³²⌋. Shared with the element dropout (ops/dropout.rs).
pub(crate) fn drop_threshold(p: f32) -> u32 {
    // Exact in f64 (p has 24 significant bits), truncated to an integer below 2⁻⁸; the
    // largest f32 below 1 is 1 − 2⁻²⁴, so the product is at most 2³² − 256: a u32.
    (f64::from(p) * 4_294_967_296.0) as u32
}

/// The SplitMix64 finaliser.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// MurmurHash3's 32-bit finaliser.
#[inline]
fn fmix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^ (x >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_p_outside_the_unit_interval() {
        for p in [-0.1, 1.0, 1.5, f32::NAN] {
            assert!(AttentionDropout::new(p, 0).is_err(), "{p}");
        }
        let d = AttentionDropout::new(0.0, 7).unwrap();
        assert!(!d.is_active());
        assert_eq!(d.factor(3, 4, 5), 1.0);
        let top = AttentionDropout::new(1.0f32.next_down(), 7).unwrap();
        assert_eq!(top.threshold(), u32::MAX - 255);
        assert_eq!(AttentionDropout::new(0.25, 0).unwrap().threshold(), 1 << 30);
    }

    /// Pinned values: the CUDA kernels implement the same function, so a change here must be
    /// made there too (the GPU tests compare the two; this catches an accidental edit).
    #[test]
    fn hash_is_pinned() {
        let d = AttentionDropout::new(0.5, 0x0123_4567_89ab_cdef).unwrap();
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        assert_eq!(fmix32(1), 0x514e_28b7);
        // Computed independently (Python, from the formula in the module docs).
        let r = d.row(3, 17);
        let bits: Vec<u32> = (0..4).map(|j| r.bits(j)).collect();
        assert_eq!(bits, [0x3d36_cbce, 0x03c0_b738, 0x260e_9849, 0x2dc5_9ce8]);
        assert_ne!(d.row(3, 17).bits(0), d.row(17, 3).bits(0));
        assert_ne!(d.row(3, 17).bits(0), d.row(3, 18).bits(0));
    }

    /// The drop rate matches p, independently across rows, keys and heads (counts within
    /// five standard deviations of the binomial mean).
    #[test]
    fn drop_rate_matches_p() {
        for (p, seed) in [(0.1f32, 1u64), (0.5, 2), (0.9, 3)] {
            let d = AttentionDropout::new(p, seed).unwrap();
            let (mut dropped, mut both, mut n) = (0usize, 0usize, 0usize);
            for bh in 0..4 {
                for i in 0..64 {
                    let (r, next) = (d.row(bh, i), d.row(bh, i + 1));
                    for j in 0..256 {
                        let a = !r.keeps(j);
                        dropped += a as usize;
                        both += (a && !next.keeps(j)) as usize;
                        n += 1;
                    }
                }
            }
            let pf = f64::from(p);
            let within = |count: usize, q: f64| {
                let (mean, sd) = (n as f64 * q, (n as f64 * q * (1.0 - q)).sqrt());
                (count as f64 - mean).abs() < 5.0 * sd
            };
            assert!(within(dropped, pf), "p {p}: {dropped} of {n} dropped");
            // Neighbouring rows drop independently: both dropped at rate p².
            assert!(
                within(both, pf * pf),
                "p {p}: {both} of {n} dropped in both rows"
            );
        }
    }
}
