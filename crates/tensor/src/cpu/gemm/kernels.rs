//! Microkernels: one `MR × NR` tile of C, accumulated over `kc` steps of packed A and B, held in
//! registers the whole time, then merged into C once (`C = alpha·acc + beta·C`).
//!
//! Packed layouts (see `driver`): an A micro-panel is `kc` groups of `MR` consecutive values
//! (`a[p * MR + i]`), a B micro-panel `kc` groups of `NR` (`b[p * NR + j]`).
//! Each C element's sum is one chain of multiply-adds in increasing p, the same in every tile, so a
//! result does not depend on where its tile lies.

/// One register-blocked kernel plus the cache-block sizes tuned for it.
pub(super) trait Microkernel {
    /// Rows of the C tile (height of an A micro-panel).
    const MR: usize;
    /// Columns of the C tile (width of a B micro-panel).
    const NR: usize;
    /// Largest block of the shared dimension; `KC × NR` of B should sit in L1.
    const KC: usize;
    /// Rows of A per packed block (a multiple of `MR`); `MC × KC` should sit in L2.
    const MC: usize;
    /// Columns of B per packed panel (a multiple of `NR`).
    const NC: usize;

    /// Computes one full tile: `C[i][j] = alpha·Σ_p a[p·MR+i]·b[p·NR+j] + beta·C[i][j]`, where
    /// C is not read when `beta == 0`.
    ///
    /// # Safety
    /// `a` must be valid for `kc·MR` reads, `b` for `kc·NR` reads, and `c` for reads and writes of
    /// `MR` rows of `NR` elements at row stride `ldc`, not aliased by `a` or `b`; `kc >= 1`; the
    /// CPU must support the kernel's instruction set (checked through [`super::Isa`]).
    unsafe fn run(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
    );
}

/// Portable kernel: plain Rust on small arrays, the reference path among the kernels.
pub(super) struct Scalar;

impl Scalar {
    const TILE_M: usize = 4;
    const TILE_N: usize = 8;
}

impl Microkernel for Scalar {
    const MR: usize = Self::TILE_M;
    const NR: usize = Self::TILE_N;
    const KC: usize = 256;
    const MC: usize = 128;
    const NC: usize = 2048;

    unsafe fn run(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
    ) {
        const MR: usize = Scalar::TILE_M;
        const NR: usize = Scalar::TILE_N;
        // SAFETY: the caller guarantees `a` and `b` hold `kc` full groups.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a, kc * MR),
                std::slice::from_raw_parts(b, kc * NR),
            )
        };
        let mut acc = [[0.0f32; NR]; MR];
        for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            for i in 0..MR {
                for j in 0..NR {
                    acc[i][j] += ap[i] * bp[j];
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: the caller guarantees MR rows of NR writable elements at stride ldc.
            let out = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) };
            for (o, &v) in out.iter_mut().zip(row) {
                *o = if beta == 0.0 {
                    alpha * v
                } else {
                    alpha * v + beta * *o
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Microkernel;
    use std::arch::x86_64::*;

    /// AVX-512F kernel: a 14 × 32 tile in 28 zmm accumulators (2 vectors per row), leaving 4
    /// registers for the two B vectors and broadcasts. Each k step is 2 vector loads of B and 14
    /// broadcast-FMAs per B vector (the broadcast folds into the FMA's memory operand).
    pub(in super::super) struct Avx512;

    const MR512: usize = 14;
    const NR512: usize = 32;

    impl Microkernel for Avx512 {
        const MR: usize = MR512;
        const NR: usize = NR512;
        const KC: usize = 256;
        const MC: usize = 14 * 24;
        const NC: usize = 32 * 128;

        unsafe fn run(
            kc: usize,
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            alpha: f32,
            beta: f32,
        ) {
            // SAFETY: forwarded contract; `Avx512` is only chosen after `Isa::Avx512` was found
            // available (avx512f).
            unsafe { kernel_14x32(kc, a, b, c, ldc, alpha, beta) }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn kernel_14x32(
        kc: usize,
        mut a: *const f32,
        mut b: *const f32,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR512];
        for _ in 0..kc {
            // SAFETY: the caller guarantees kc groups of NR512 floats at b and MR512 at a.
            unsafe {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*a.add(i));
                    row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
                }
                a = a.add(MR512);
                b = b.add(NR512);
            }
        }
        let va = _mm512_set1_ps(alpha);
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: the caller guarantees MR512 rows of NR512 elements at stride ldc.
            unsafe {
                let p = c.add(i * ldc);
                if beta == 0.0 {
                    _mm512_storeu_ps(p, _mm512_mul_ps(va, row[0]));
                    _mm512_storeu_ps(p.add(16), _mm512_mul_ps(va, row[1]));
                } else {
                    let vb = _mm512_set1_ps(beta);
                    let c0 = _mm512_mul_ps(vb, _mm512_loadu_ps(p));
                    let c1 = _mm512_mul_ps(vb, _mm512_loadu_ps(p.add(16)));
                    _mm512_storeu_ps(p, _mm512_fmadd_ps(va, row[0], c0));
                    _mm512_storeu_ps(p.add(16), _mm512_fmadd_ps(va, row[1], c1));
                }
            }
        }
    }

    /// AVX2+FMA kernel: a 6 × 16 tile in 12 ymm accumulators, 2 for B and 1 for the broadcast
    /// (15 of the 16 ymm registers).
    pub(in super::super) struct Avx2;

    const MR256: usize = 6;
    const NR256: usize = 16;

    impl Microkernel for Avx2 {
        const MR: usize = MR256;
        const NR: usize = NR256;
        const KC: usize = 256;
        const MC: usize = 6 * 32;
        const NC: usize = 16 * 256;

        unsafe fn run(
            kc: usize,
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            alpha: f32,
            beta: f32,
        ) {
            // SAFETY: forwarded contract; `Avx2` is only chosen after `Isa::Avx2` was found
            // available (avx2 and fma).
            unsafe { kernel_6x16(kc, a, b, c, ldc, alpha, beta) }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel_6x16(
        kc: usize,
        mut a: *const f32,
        mut b: *const f32,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR256];
        for _ in 0..kc {
            // SAFETY: the caller guarantees kc groups of NR256 floats at b and MR256 at a.
            unsafe {
                let b0 = _mm256_loadu_ps(b);
                let b1 = _mm256_loadu_ps(b.add(8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = _mm256_broadcast_ss(&*a.add(i));
                    row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
                }
                a = a.add(MR256);
                b = b.add(NR256);
            }
        }
        let va = _mm256_set1_ps(alpha);
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: the caller guarantees MR256 rows of NR256 elements at stride ldc.
            unsafe {
                let p = c.add(i * ldc);
                if beta == 0.0 {
                    _mm256_storeu_ps(p, _mm256_mul_ps(va, row[0]));
                    _mm256_storeu_ps(p.add(8), _mm256_mul_ps(va, row[1]));
                } else {
                    let vb = _mm256_set1_ps(beta);
                    let c0 = _mm256_mul_ps(vb, _mm256_loadu_ps(p));
                    let c1 = _mm256_mul_ps(vb, _mm256_loadu_ps(p.add(8)));
                    _mm256_storeu_ps(p, _mm256_fmadd_ps(va, row[0], c0));
                    _mm256_storeu_ps(p.add(8), _mm256_fmadd_ps(va, row[1], c1));
                }
            }
        }
    }
}
