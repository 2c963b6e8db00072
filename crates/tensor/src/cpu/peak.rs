//! The f32 multiply-add peak of one core: a loop of independent FMAs whose operands never leave
//! the registers, so nothing but the FMA units limits it. `rlhf bench peak` runs one copy per
//! thread at once and divides the flops by the wall time; GEMM efficiency is quoted against it.

use super::Isa;
use std::hint::black_box;

/// Independent accumulator chains: more than FMA latency × FMA ports (4 × 2 on current x86
/// cores), so the units never wait for a previous result, and few enough to stay in registers
/// (AVX2 has 16 ymm registers, two of which hold the multiplier and addend).
const CHAINS: usize = 12;

/// Runs `iterations` rounds of `CHAINS` independent vector multiply-adds on the calling thread
/// and returns the flops performed (2 per multiply-add per lane). The caller times it.
///
/// A level this CPU lacks runs the scalar loop instead (its flops are what is returned).
pub fn fma_peak_flops(isa: Isa, iterations: u64) -> f64 {
    let flops_per_chain_step = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f was just checked.
        Isa::Avx512 if isa.is_available() => unsafe { x86::run_avx512(iterations) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx2 and fma were just checked.
        Isa::Avx2 if isa.is_available() => unsafe { x86::run_avx2(iterations) },
        _ => run_scalar(iterations),
    };
    iterations as f64 * CHAINS as f64 * flops_per_chain_step
}

/// Scalar multiply then add (no FMA instruction is assumed): 2 flops per chain step.
/// Returns flops per chain step.
fn run_scalar(iterations: u64) -> f64 {
    let mut acc = [0.0f32; CHAINS];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = i as f32 * 1e-3;
    }
    // black_box keeps the multiplier and addend opaque so the loop cannot be folded.
    let x = black_box(0.999_999f32);
    let y = black_box(1e-7f32);
    for _ in 0..iterations {
        for a in acc.iter_mut() {
            *a = *a * x + y;
        }
    }
    black_box(acc);
    2.0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// # Safety
    /// The CPU must support avx512f.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run_avx512(iterations: u64) -> f64 {
        let x = _mm512_set1_ps(black_box(0.999_999));
        let y = _mm512_set1_ps(black_box(1e-7));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iterations {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        black_box(acc);
        2.0 * 16.0
    }

    /// # Safety
    /// The CPU must support avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run_avx2(iterations: u64) -> f64 {
        let x = _mm256_set1_ps(black_box(0.999_999));
        let y = _mm256_set1_ps(black_box(1e-7));
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for _ in 0..iterations {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        black_box(acc);
        2.0 * 8.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn counts_flops_and_takes_time_proportional_to_work() {
        for isa in Isa::available() {
            let lanes = match isa {
                Isa::Scalar => 1.0,
                Isa::Avx2 => 8.0,
                Isa::Avx512 => 16.0,
            };
            assert_eq!(
                fma_peak_flops(isa, 1000),
                1000.0 * CHAINS as f64 * 2.0 * lanes
            );
            // The loop really runs: 100× the iterations must take clearly longer (best of five
            // short runs, so one preemption on a busy machine cannot fail the test).
            let short = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    fma_peak_flops(isa, 10_000);
                    t.elapsed()
                })
                .min()
                .unwrap();
            let t = Instant::now();
            fma_peak_flops(isa, 1_000_000);
            let long = t.elapsed();
            assert!(long > short * 10, "{isa:?}: {short:?} vs {long:?}");
        }
    }
}
