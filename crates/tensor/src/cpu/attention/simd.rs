//! The vector operations the attention kernels are written in, one implementation per
//! instruction set.
//!
//! The tiled kernels in `fused.rs` are generic over [`Simd`] and marked `#[inline(always)]`; each
//! instruction set instantiates them inside one `#[target_feature]` function, so the intrinsics
//! below inline into code compiled for that set (a generic function compiled without the feature
//! would call every intrinsic out of line). Every method is `unsafe`: the caller promises the CPU
//! has the set ([`super::fused`] checks `Isa::is_available` before entering), and pointer methods
//! add the usual bounds promises.

/// A vector of `W` f32 lanes and the few operations the kernels need.
pub(super) trait Simd: Copy + Send + Sync + 'static {
    /// Lanes per vector.
    const W: usize;
    /// Rows per register tile in [`super::fused`]'s tile product (at most 6).
    const TILE_ROWS: usize;
    /// Vectors per row in that register tile (at most 4); `TILE_ROWS * TILE_VECS`
    /// accumulators must fit the register file with room for the operands.
    const TILE_VECS: usize;
    type V: Copy;

    unsafe fn splat(x: f32) -> Self::V;
    /// # Safety
    /// `p..p+W` must be readable.
    unsafe fn load(p: *const f32) -> Self::V;
    /// # Safety
    /// `p..p+W` must be writable.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c` (fused where the set has FMA).
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn reduce_max(v: Self::V) -> f32;
    unsafe fn reduce_add(v: Self::V) -> f32;
    /// `e^x` per lane, within about 2 ulp; 0 for `−inf` (masked scores), below `e^−87.3`
    /// (about 1.2e-38) for `x < −87.3` (the SIMD sets flush to exactly 0 there); NaN stays NaN.
    unsafe fn exp(x: Self::V) -> Self::V;

    /// The register-tiled product behind every block product; see [`super::fused::Gemm`].
    ///
    /// # Safety
    /// The CPU has this instruction set and `g` satisfies the bounds documented on `Gemm`.
    unsafe fn gemm(g: super::fused::Gemm);
}

/// Portable Rust, one lane: the reference path every SIMD path is tested against.
#[derive(Clone, Copy)]
pub(super) struct Scalar;

impl Simd for Scalar {
    const W: usize = 1;
    const TILE_ROWS: usize = 4;
    const TILE_VECS: usize = 4;
    type V = f32;

    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        // SAFETY: the caller promises `p` is readable.
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        // SAFETY: the caller promises `p` is writable.
        unsafe { *p = v }
    }
    #[inline(always)]
    unsafe fn fmadd(a: f32, b: f32, c: f32) -> f32 {
        // Not `mul_add`: without hardware FMA that is a slow libm call.
        a * b + c
    }
    #[inline(always)]
    unsafe fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    unsafe fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn sub(a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    unsafe fn max(a: f32, b: f32) -> f32 {
        a.max(b)
    }
    #[inline(always)]
    unsafe fn reduce_max(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn reduce_add(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn exp(x: f32) -> f32 {
        x.exp()
    }
    #[inline(always)]
    unsafe fn gemm(g: super::fused::Gemm) {
        // SAFETY: forwarded promise; the scalar path needs no CPU feature.
        unsafe { super::fused::gemm_impl::<Scalar>(g) }
    }
}

/// Constants of the vector `exp`: `e^x = 2^n · e^r` with `n = round(x·log2 e)` and
/// `r = x − n·ln 2` in `[−ln2/2, ln2/2]`, where `e^r` is its degree-6 Taylor polynomial (relative
/// error below 1.3e-7 on that interval, about one f32 ulp). `ln 2` is split into a part with few
/// mantissa bits (exact in `n·LN2_HI` for |n| < 2^15) and a correction, so `r` keeps its bits.
#[cfg(target_arch = "x86_64")]
mod exp_consts {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4; // 0.693359375 = 355/512
    pub const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    /// Below this, `e^x` is under f32's smallest normal; the kernels return exactly 0 there.
    pub const X_MIN: f32 = -87.3;
    /// Above this, `2^n` would overflow the exponent field; clamping keeps the result finite
    /// (the kernels only take `exp` of values ≤ about 0).
    pub const X_MAX: f32 = 88.3;
    /// 1/k! for k = 6 down to 2.
    pub const C6: f32 = 1.0 / 720.0;
    pub const C5: f32 = 1.0 / 120.0;
    pub const C4: f32 = 1.0 / 24.0;
    pub const C3: f32 = 1.0 / 6.0;
    pub const C2: f32 = 0.5;
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::exp_consts::*;
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX2 + FMA, 8 lanes. 16 ymm registers: a 6×2 tile takes 12 accumulators, 2 right
    /// operands and 1 broadcast (AVX2 has no broadcast memory operand); 4×4 would spill.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Avx2;

    // SAFETY (for every method of this impl): `Simd`'s contract says the caller has checked
    // that the CPU has AVX2 and FMA; pointer methods also carry the caller's bounds promise.
    impl Simd for Avx2 {
        const W: usize = 8;
        const TILE_ROWS: usize = 6;
        const TILE_VECS: usize = 2;
        type V = __m256;

        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: see the impl comment; unaligned load, `p..p+8` readable.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            // SAFETY: see the impl comment; unaligned store, `p..p+8` writable.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn reduce_max(v: __m256) -> f32 {
            // SAFETY: see the impl comment.
            unsafe {
                let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
                _mm_cvtss_f32(m)
            }
        }
        #[inline(always)]
        unsafe fn reduce_add(v: __m256) -> f32 {
            // SAFETY: see the impl comment.
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        unsafe fn exp(x: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe {
                // min/max return their second operand when either is NaN, so `x` goes second
                // to keep NaN; the comparison is false for NaN, so NaN is not zeroed below.
                let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(X_MIN));
                let x = _mm256_min_ps(_mm256_set1_ps(X_MAX), x);
                let x = _mm256_max_ps(_mm256_set1_ps(X_MIN), x);
                let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                );
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
                let p = _mm256_fmadd_ps(_mm256_set1_ps(C6), r, _mm256_set1_ps(C5));
                let p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C4));
                let p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C3));
                let p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C2));
                let p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
                let p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
                // 2^n built in the exponent field: n is in [-126, 127] after the clamps, so
                // n + 127 is a valid biased exponent.
                let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                    _mm256_cvtps_epi32(n),
                    _mm256_set1_epi32(127),
                ));
                let y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
                _mm256_andnot_ps(underflow, y)
            }
        }
        #[inline(always)]
        unsafe fn gemm(g: super::super::fused::Gemm) {
            // SAFETY: forwarded promises (CPU has AVX2+FMA, bounds of `g`).
            unsafe { gemm_avx2(g) }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemm_avx2(g: super::super::fused::Gemm) {
        // SAFETY: forwarded promises; this function is compiled for AVX2+FMA.
        unsafe { super::super::fused::gemm_impl::<Avx2>(g) }
    }

    /// AVX-512F, 16 lanes. 32 zmm registers: a 6×4 tile takes 24 accumulators and 4 right
    /// operands; the left operand is a broadcast memory operand of the FMA. Per step that is 10
    /// loads for 24 FMAs, where a 4×4 tile (8 loads for 16 FMAs) is bound by the load ports.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Avx512;

    // SAFETY (for every method of this impl): `Simd`'s contract says the caller has checked
    // that the CPU has AVX-512F; pointer methods also carry the caller's bounds promise.
    impl Simd for Avx512 {
        const W: usize = 16;
        const TILE_ROWS: usize = 6;
        const TILE_VECS: usize = 4;
        type V = __m512;

        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: see the impl comment; unaligned load, `p..p+16` readable.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: see the impl comment; unaligned store, `p..p+16` writable.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn reduce_max(v: __m512) -> f32 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_reduce_max_ps(v) }
        }
        #[inline(always)]
        unsafe fn reduce_add(v: __m512) -> f32 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        unsafe fn exp(x: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe {
                // Same scheme as the AVX2 version; `scalef` multiplies by 2^n directly.
                let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(X_MIN));
                let x = _mm512_min_ps(_mm512_set1_ps(X_MAX), x);
                let x = _mm512_max_ps(_mm512_set1_ps(X_MIN), x);
                let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                );
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
                let p = _mm512_fmadd_ps(_mm512_set1_ps(C6), r, _mm512_set1_ps(C5));
                let p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C4));
                let p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C3));
                let p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C2));
                let p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
                let p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
                // `keep` is false only for x < X_MIN (NaN compares unordered, so it is kept).
                _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n))
            }
        }
        #[inline(always)]
        unsafe fn gemm(g: super::super::fused::Gemm) {
            // SAFETY: forwarded promises (CPU has AVX-512F, bounds of `g`).
            unsafe { gemm_avx512(g) }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn gemm_avx512(g: super::super::fused::Gemm) {
        // SAFETY: forwarded promises; this function is compiled for AVX-512F.
        unsafe { super::super::fused::gemm_impl::<Avx512>(g) }
    }
}
