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
    /// Largest block of the shared dimension. Larger means fewer passes over C (each pass
    /// reads and writes all of it); a `KC × NR` B micro-panel should stay in L1 or L2.
    const KC: usize;
    /// Rows of A per packed block (a multiple of `MR`); `MC × KC` should sit in L2.
    const MC: usize;
    /// Columns of B per packed panel (a multiple of `NR`).
    const NC: usize;

    /// Computes one full tile: `C[i][j] = alpha·Σ_p a[p·MR+i]·b[p·b_stride+j] + beta·C[i][j]`,
    /// where C is not read when `beta == 0`. `b_stride` is `NR` for a packed B micro-panel, or
    /// B's row stride when the kernel reads a row-major B in place.
    ///
    /// `bias` (or null) holds `NR` values added to every row last, as a separate rounding:
    /// `C[i][j] = (alpha·Σ + beta·C[i][j]) + bias[j]`, bitwise what a GEMM followed by a bias
    /// add gives (a linear layer's epilogue, saving a pass over C).
    ///
    /// `b_next` is the B micro-panel the following tiles will use (or null): a kernel may
    /// prefetch it into L2 while it computes, so the next column of tiles does not start by
    /// waiting on L3. It is only ever prefetched, never read.
    ///
    /// # Safety
    /// `a` must be valid for `kc·MR` reads, `b` for reads of `NR` elements at each
    /// `b + p·b_stride` (`p < kc`), and `c` for reads and writes of `MR` rows of `NR` elements at
    /// row stride `ldc`, not aliased by `a` or `b`; `bias`, when not null, valid for `NR` reads;
    /// `kc >= 1`; the CPU must support the kernel's
    /// instruction set (checked through [`super::Isa`]).
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        kc: usize,
        a: *const f32,
        b: *const f32,
        b_stride: usize,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
        bias: *const f32,
        b_next: *const f32,
    );

    /// Interleaves `lanes` strided streams into groups of `width >= lanes`:
    /// `dst[p * width + i] = src[i * stride + p]` for `p < kc`, `i < lanes` (other lanes
    /// untouched). This packs a panel of row-major A (`lanes <= MR`, stride = row stride) or of
    /// transposed B (`lanes <= NR`, stride = column stride), the two layouts where packing reads
    /// across the vector direction. The portable version is a plain loop; SIMD kernels may
    /// gather instead.
    fn interleave(
        src: &[f32],
        stride: usize,
        lanes: usize,
        width: usize,
        kc: usize,
        dst: &mut [f32],
    ) {
        interleave_portable(src, stride, lanes, width, kc, dst)
    }
}

/// The plain-loop [`Microkernel::interleave`]: reads each stream contiguously, writes it down one
/// lane of the panel.
pub(super) fn interleave_portable(
    src: &[f32],
    stride: usize,
    lanes: usize,
    width: usize,
    kc: usize,
    dst: &mut [f32],
) {
    for i in 0..lanes {
        let stream = &src[i * stride..][..kc];
        for (d, &v) in dst.chunks_exact_mut(width).zip(stream) {
            d[i] = v;
        }
    }
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
        b_stride: usize,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
        bias: *const f32,
        _b_next: *const f32,
    ) {
        const MR: usize = Scalar::TILE_M;
        const NR: usize = Scalar::TILE_N;
        // SAFETY: the caller guarantees `a` holds `kc` full groups.
        let a = unsafe { std::slice::from_raw_parts(a, kc * MR) };
        let mut acc = [[0.0f32; NR]; MR];
        for (p, ap) in a.chunks_exact(MR).enumerate() {
            // SAFETY: the caller guarantees NR readable elements at b + p·b_stride.
            let bp = unsafe { std::slice::from_raw_parts(b.add(p * b_stride), NR) };
            for i in 0..MR {
                for j in 0..NR {
                    acc[i][j] += ap[i] * bp[j];
                }
            }
        }
        // SAFETY: the caller guarantees NR readable elements at a non-null bias.
        let bias = (!bias.is_null()).then(|| unsafe { std::slice::from_raw_parts(bias, NR) });
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: the caller guarantees MR rows of NR writable elements at stride ldc.
            let out = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) };
            for (j, (o, &v)) in out.iter_mut().zip(row).enumerate() {
                let r = if beta == 0.0 {
                    alpha * v
                } else {
                    alpha * v + beta * *o
                };
                *o = match bias {
                    Some(bias) => r + bias[j],
                    None => r,
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
    /// registers for the two B vectors and the broadcast. Each k step is 2 vector loads of B,
    /// 14 broadcast loads of A and 28 FMAs; in L1/L2 it runs at about 94% of the FMA peak.
    pub(in super::super) struct Avx512;

    const MR512: usize = 14;
    const NR512: usize = 32;

    impl Microkernel for Avx512 {
        const MR: usize = MR512;
        const NR: usize = NR512;
        // Tuned on a Sapphire Rapids core (48 KiB L1d, 2 MiB L2) at m = n = k = 2048: a large KC
        // (fewer passes over C) with a small A block (344 KiB) beat the textbook "B micro-panel
        // in L1" choice (KC = 256) by about 10%. NC between 1024 and 2048 measured the same on
        // one core; 2048 halves the thread synchronisations (one per B panel and KC block) and
        // the repacking of A, which matters when the cores are shared.
        const KC: usize = 768;
        const MC: usize = 14 * 8;
        const NC: usize = 32 * 64;

        unsafe fn run(
            kc: usize,
            a: *const f32,
            b: *const f32,
            b_stride: usize,
            c: *mut f32,
            ldc: usize,
            alpha: f32,
            beta: f32,
            bias: *const f32,
            b_next: *const f32,
        ) {
            // SAFETY: forwarded contract; `Avx512` is only chosen after `Isa::Avx512` was found
            // available (avx512f).
            unsafe {
                if b_next.is_null() {
                    kernel_14x32::<false>(kc, a, b, b_stride, c, ldc, alpha, beta, bias, b)
                } else {
                    kernel_14x32::<true>(kc, a, b, b_stride, c, ldc, alpha, beta, bias, b_next)
                }
            }
        }

        fn interleave(
            src: &[f32],
            stride: usize,
            lanes: usize,
            width: usize,
            kc: usize,
            dst: &mut [f32],
        ) {
            // Gather offsets are i32: fall back when the streams are too far apart.
            let fits = stride <= (i32::MAX as usize) / 32;
            if lanes == 0 || kc == 0 || !fits {
                return super::interleave_portable(src, stride, lanes, width, kc, dst);
            }
            assert!(
                lanes <= width
                    && src.len() > (lanes - 1) * stride + kc - 1
                    && dst.len() >= width * kc,
                "interleave: slices too short for {lanes} lanes of {kc}"
            );
            // SAFETY: Avx512 is only used after avx512f was detected; the assert above bounds
            // every gathered element ((lanes-1)·stride + kc-1) and every stored one (width·kc).
            unsafe { interleave_gather(src.as_ptr(), stride, lanes, width, kc, dst.as_mut_ptr()) }
        }
    }

    /// One masked 16-lane gather per group of 16 streams and k step: reading 14 rows costs one
    /// instruction instead of 14 scalar loads and stores.
    #[target_feature(enable = "avx512f")]
    unsafe fn interleave_gather(
        src: *const f32,
        stride: usize,
        lanes: usize,
        width: usize,
        kc: usize,
        dst: *mut f32,
    ) {
        let step = _mm512_set1_epi32(stride as i32);
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for g in (0..lanes).step_by(16) {
            let count = (lanes - g).min(16);
            let mask: __mmask16 = ((1u32 << count) - 1) as __mmask16;
            let offsets = _mm512_mullo_epi32(lane, step);
            // SAFETY: the caller bounds src by (lanes-1)·stride + kc-1 and dst by width·kc with
            // lanes <= width (g < lanes, so this is inside src); masked-off lanes neither read
            // nor write.
            let base = unsafe { src.add(g * stride) };
            for p in 0..kc {
                // SAFETY: lane i reads base + i·stride + p <= src + (lanes-1)·stride + kc-1 and
                // the store covers dst[p·width + g..][..count], inside width·kc.
                unsafe {
                    let v = _mm512_mask_i32gather_ps::<4>(
                        _mm512_setzero_ps(),
                        mask,
                        offsets,
                        base.add(p),
                    );
                    _mm512_mask_storeu_ps(dst.add(p * width + g), mask, v);
                }
            }
        }
    }

    /// With `NEXT`, each k step also prefetches two lines of `b_next` into L2 (the whole next
    /// micro-panel over the call).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_14x32<const NEXT: bool>(
        kc: usize,
        mut a: *const f32,
        mut b: *const f32,
        bs: usize,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
        bias: *const f32,
        b_next: *const f32,
    ) {
        // b_next is only prefetched, so plain address arithmetic suffices.
        let next_off = (b_next as isize).wrapping_sub(b as isize) / 4;
        let mut acc = [[_mm512_setzero_ps(); 2]; MR512];
        // C's rows are far apart (often in L3 or memory); start fetching them into L2 now so
        // they have arrived when the k loop ends, instead of stalling on 28 misses then.
        for i in 0..MR512 {
            // SAFETY: prefetch never faults; the addresses are inside C's tile anyway.
            unsafe {
                _mm_prefetch::<_MM_HINT_T1>(c.add(i * ldc) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(c.add(i * ldc + 16) as *const i8);
            }
        }
        // Software prefetch distance in k steps (about 200 cycles): A and B stream from L2 (a
        // `KC` of 768 makes a B micro-panel 96 KiB, larger than L1), an in-place B even from L3
        // with a page-sized stride the hardware prefetchers do not follow, and without these
        // the kernel waited at the top of the loop.
        const D: usize = 16;
        // One k step: 2 B vectors times 14 broadcast A values.
        let step = |acc: &mut [[__m512; 2]; MR512], a: *const f32, b: *const f32| {
            // SAFETY: the caller guarantees NR512 floats at each b + p·bs and kc groups of MR512
            // at a; the prefetches may point past them, which is harmless (never faults).
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(bs * D) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(bs * D + 16) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(MR512 * D) as *const i8);
                if NEXT {
                    let bn = b.wrapping_offset(next_off);
                    _mm_prefetch::<_MM_HINT_T1>(bn as *const i8);
                    _mm_prefetch::<_MM_HINT_T1>(bn.wrapping_add(16) as *const i8);
                }
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*a.add(i));
                    row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
                }
            }
        };
        // Unrolled by 4 so the loop bookkeeping is spread over 112 FMAs.
        let mut left = kc;
        while left >= 4 {
            // SAFETY: 4 more groups remain at a and b.
            unsafe {
                step(&mut acc, a, b);
                step(&mut acc, a.add(MR512), b.add(bs));
                step(&mut acc, a.add(2 * MR512), b.add(2 * bs));
                step(&mut acc, a.add(3 * MR512), b.add(3 * bs));
                a = a.add(4 * MR512);
            }
            // Not `add`: past the last group of an in-place B this may leave B's slice.
            b = b.wrapping_add(4 * bs);
            left -= 4;
        }
        for _ in 0..left {
            step(&mut acc, a, b);
            // SAFETY: stays within (or one past) the kc groups. `wrapping_add` for B: one stride
            // past the last row of an in-place B may lie beyond its slice.
            unsafe {
                a = a.add(MR512);
            }
            b = b.wrapping_add(bs);
        }
        let va = _mm512_set1_ps(alpha);
        // The bias is added only when there is one: adding zeros would turn a -0 into +0.
        let (bias0, bias1) = if bias.is_null() {
            (_mm512_setzero_ps(), _mm512_setzero_ps())
        } else {
            // SAFETY: the caller guarantees NR512 readable elements at a non-null bias.
            unsafe { (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16))) }
        };
        let with_bias = !bias.is_null();
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: the caller guarantees MR512 rows of NR512 elements at stride ldc.
            unsafe {
                let p = c.add(i * ldc);
                let (mut r0, mut r1) = if beta == 0.0 {
                    (_mm512_mul_ps(va, row[0]), _mm512_mul_ps(va, row[1]))
                } else {
                    let vb = _mm512_set1_ps(beta);
                    let c0 = _mm512_mul_ps(vb, _mm512_loadu_ps(p));
                    let c1 = _mm512_mul_ps(vb, _mm512_loadu_ps(p.add(16)));
                    (
                        _mm512_fmadd_ps(va, row[0], c0),
                        _mm512_fmadd_ps(va, row[1], c1),
                    )
                };
                if with_bias {
                    r0 = _mm512_add_ps(r0, bias0);
                    r1 = _mm512_add_ps(r1, bias1);
                }
                _mm512_storeu_ps(p, r0);
                _mm512_storeu_ps(p.add(16), r1);
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
            b_stride: usize,
            c: *mut f32,
            ldc: usize,
            alpha: f32,
            beta: f32,
            bias: *const f32,
            _b_next: *const f32,
        ) {
            // SAFETY: forwarded contract; `Avx2` is only chosen after `Isa::Avx2` was found
            // available (avx2 and fma).
            unsafe { kernel_6x16(kc, a, b, b_stride, c, ldc, alpha, beta, bias) }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_6x16(
        kc: usize,
        mut a: *const f32,
        mut b: *const f32,
        bs: usize,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
        bias: *const f32,
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
                b = b.wrapping_add(bs);
            }
        }
        let va = _mm256_set1_ps(alpha);
        let with_bias = !bias.is_null();
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: the caller guarantees MR256 rows of NR256 elements at stride ldc, and
            // NR256 readable elements at a non-null bias.
            unsafe {
                let p = c.add(i * ldc);
                let (mut r0, mut r1) = if beta == 0.0 {
                    (_mm256_mul_ps(va, row[0]), _mm256_mul_ps(va, row[1]))
                } else {
                    let vb = _mm256_set1_ps(beta);
                    let c0 = _mm256_mul_ps(vb, _mm256_loadu_ps(p));
                    let c1 = _mm256_mul_ps(vb, _mm256_loadu_ps(p.add(8)));
                    (
                        _mm256_fmadd_ps(va, row[0], c0),
                        _mm256_fmadd_ps(va, row[1], c1),
                    )
                };
                if with_bias {
                    r0 = _mm256_add_ps(r0, _mm256_loadu_ps(bias));
                    r1 = _mm256_add_ps(r1, _mm256_loadu_ps(bias.add(8)));
                }
                _mm256_storeu_ps(p, r0);
                _mm256_storeu_ps(p.add(8), r1);
            }
        }
    }
}
