//! A small, self-contained pseudo-random generator: xoshiro256** seeded through SplitMix64.
//!
//! Every random choice in this crate goes through [`Rng`], and the generator is written here
//! rather than taken from a crate so that a dependency update can never change a generated
//! dataset: the same seed gives byte-identical files on every version of this project that keeps
//! this module unchanged (the golden-value test below guards that).

/// SplitMix64 step: advances `state` and returns the next output. Used to expand a 64-bit seed
/// into xoshiro's 256-bit state (as its authors recommend) and as a stable 64-bit mixer.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes two 64-bit values into one well-scrambled value (one SplitMix64 step on `a ^ f(b)`).
/// Stable across versions; used to derive sub-seeds and the split of a prompt.
pub fn mix64(a: u64, b: u64) -> u64 {
    let mut s = a ^ b.rotate_left(17).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    splitmix64(&mut s)
}

/// 64-bit FNV-1a hash of bytes: a fixed, dependency-free string hash (std's `DefaultHasher` is
/// explicitly allowed to change between Rust releases, so it cannot decide dataset splits).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// xoshiro256** (Blackman and Vigna): fast, 256 bits of state, passes the usual statistical
/// batteries; far more than a data generator needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose whole stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        // SplitMix64 outputs are a bijection of distinct inputs, so four consecutive outputs are
        // never all zero (the one state xoshiro must avoid).
        debug_assert!(
            s.iter().any(|&x| x != 0),
            "xoshiro state must not be all zero"
        );
        Self { s }
    }

    /// An independent stream derived from `seed` and a label, so that e.g. the prompts and the
    /// labeler noise of one run do not share (and so perturb) each other's draws.
    pub fn derive(seed: u64, label: &str) -> Self {
        Self::new(mix64(seed, fnv1a64(label.as_bytes())))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform integer in `0..n` without modulo bias (Lemire's multiply-and-reject).
    /// `n == 0` is a caller bug.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below: empty range");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform index into a collection of length `len` (> 0).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// Uniform integer in the inclusive range `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "Rng::range: lo {lo} > hi {hi}");
        lo + self.below(hi - lo + 1)
    }

    /// Uniform float in `[0, 1)` with 53 random bits.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// A uniformly chosen element of a non-empty slice.
    pub fn choose<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    /// An index drawn with probability proportional to `weights` (all finite, >= 0, sum > 0).
    pub fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        assert!(
            total > 0.0 && total.is_finite(),
            "Rng::weighted: weights must sum to a positive finite value, got {total}"
        );
        let mut x = self.f64() * total;
        for (i, &w) in weights.iter().enumerate() {
            if x < w {
                return i;
            }
            x -= w;
        }
        // Rounding can leave x a hair above the last bucket; the last non-zero weight takes it.
        weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }

    /// A standard Gumbel draw, -ln(-ln U) with U in (0, 1). Adding independent Gumbel noise to
    /// log-weights and sorting samples a Plackett-Luce ranking exactly (the Gumbel-max trick).
    pub fn gumbel(&mut self) -> f64 {
        // (k + 0.5) / 2^53 lies strictly inside (0, 1), so both logarithms are finite.
        let u = ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
        -(-u.ln()).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_published_values() {
        // Reference outputs of SplitMix64 from seed 0 (Vigna's splitmix64.c).
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut s), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix64(&mut s), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn xoshiro_matches_a_plain_reimplementation() {
        // The reference algorithm written out with explicit temporaries, straight from the
        // paper's pseudo-code, against the in-place version above.
        let mut rng = Rng::new(42);
        let mut s = rng.s;
        for _ in 0..1000 {
            let out = (s[1].wrapping_mul(5)).rotate_left(7).wrapping_mul(9);
            let t = s[1] << 17;
            let (s0, s1, s2, s3) = (s[0], s[1], s[2] ^ s[0], s[3] ^ s[1]);
            let s1 = s1 ^ s2;
            let s0 = s0 ^ s3;
            let s2 = s2 ^ t;
            let s3 = s3.rotate_left(45);
            s = [s0, s1, s2, s3];
            assert_eq!(rng.next_u64(), out);
        }
    }

    #[test]
    fn stream_is_pinned() {
        // Golden values: if these change, every generated dataset changes. Do not update them
        // without saying so loudly in the changelog.
        let mut rng = Rng::new(7);
        let got: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        let mut again = Rng::new(7);
        let twice: Vec<u64> = (0..3).map(|_| again.next_u64()).collect();
        assert_eq!(got, twice);
        assert_eq!(got, GOLDEN_SEED_7.to_vec());
    }

    // Computed once from this implementation (seed 7) and pinned.
    const GOLDEN_SEED_7: [u64; 3] = [
        12923355070828475994,
        5142052590334782674,
        15488392906492639638,
    ];

    #[test]
    fn below_is_uniform_enough_and_in_range() {
        let mut rng = Rng::new(1);
        let mut counts = [0u32; 7];
        for _ in 0..70_000 {
            let x = rng.below(7);
            counts[x as usize] += 1;
        }
        for &c in &counts {
            // 10,000 expected, sd ~93: 6 sd is a generous bound that still catches bias.
            assert!((9_400..=10_600).contains(&c), "counts {counts:?}");
        }
    }

    #[test]
    fn f64_and_gumbel_are_finite_and_in_range() {
        let mut rng = Rng::new(3);
        let mut mean = 0.0;
        for _ in 0..20_000 {
            let u = rng.f64();
            assert!((0.0..1.0).contains(&u));
            let g = rng.gumbel();
            assert!(g.is_finite());
            mean += g;
        }
        mean /= 20_000.0;
        // Gumbel mean is the Euler-Mascheroni constant 0.5772; sd pi/sqrt(6) / sqrt(20000) ~ 0.009.
        assert!((mean - 0.5772).abs() < 0.05, "gumbel mean {mean}");
    }

    #[test]
    fn weighted_respects_zero_weights() {
        let mut rng = Rng::new(5);
        for _ in 0..1000 {
            let i = rng.weighted(&[0.0, 1.0, 0.0, 2.0]);
            assert!(i == 1 || i == 3);
        }
    }

    #[test]
    fn derive_gives_distinct_streams() {
        let a = Rng::derive(9, "prompts").next_u64();
        let b = Rng::derive(9, "labeler").next_u64();
        assert_ne!(a, b);
    }
}
