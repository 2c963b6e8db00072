//! AVX2+FMA and AVX-512F implementations of [`Simd`], and the `#[target_feature]` entry points
//! that instantiate the generic kernels of `simd.rs` for each.
//!
//! Only AVX-512F instructions are used on the 512-bit path (no DQ/BW/VL), so `Isa::Avx512`'s
//! check of `avx512f` is exactly what it needs; bitwise ops go through the integer domain for
//! that reason.
//!
//! SAFETY (for every `unsafe fn` of the two `Simd` impls): they only wrap intrinsics, so they are
//! sound when the CPU has the impl's features, which holds because they are reached only from
//! the entry points below, and those only after `mod.rs` checked the `Isa`. Pointer arguments
//! must be valid for `LANES` reads/writes (or for the live lanes of a tail mask); the generic
//! kernels only form pointers inside slices they were given.

use std::arch::x86_64::*;

use super::simd::Simd;

/// Marker type: 8 lanes, AVX2 + FMA.
#[derive(Clone, Copy)]
pub(super) struct Avx2;

/// Marker type: 16 lanes, AVX-512F.
#[derive(Clone, Copy)]
pub(super) struct Avx512;

const SIGN: i32 = i32::MIN; // 0x8000_0000
const ABS: i32 = i32::MAX; // 0x7fff_ffff
/// Rounding control for `round`: nearest-even, exceptions suppressed.
const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

impl Simd for Avx2 {
    const LANES: usize = 8;
    type V = __m256;
    type Mask = __m256;
    type Tail = __m256i;

    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn tail(n: usize) -> __m256i {
        // Lane i is live when i < n: all-ones in the live lanes (maskload/maskstore read the sign bit).
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }
    #[inline(always)]
    unsafe fn load_tail(p: *const f32, t: __m256i, fill: __m256) -> __m256 {
        // maskload does not touch memory in dead lanes (no fault past the slice end).
        let v = _mm256_maskload_ps(p, t);
        _mm256_blendv_ps(fill, v, _mm256_castsi256_ps(t))
    }
    #[inline(always)]
    unsafe fn store_tail(p: *mut f32, t: __m256i, v: __m256) {
        _mm256_maskstore_ps(p, t, v)
    }
    #[inline(always)]
    unsafe fn zero_dead(t: __m256i, v: __m256) -> __m256 {
        _mm256_and_ps(v, _mm256_castsi256_ps(t))
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: __m256, b: __m256) -> __m256 {
        _mm256_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn min(a: __m256, b: __m256) -> __m256 {
        _mm256_min_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sqrt(a: __m256) -> __m256 {
        _mm256_sqrt_ps(a)
    }
    #[inline(always)]
    unsafe fn abs(a: __m256) -> __m256 {
        _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(ABS)))
    }
    #[inline(always)]
    unsafe fn copysign(mag: __m256, sign: __m256) -> __m256 {
        let s = _mm256_and_ps(sign, _mm256_castsi256_ps(_mm256_set1_epi32(SIGN)));
        _mm256_or_ps(Self::abs(mag), s)
    }
    #[inline(always)]
    unsafe fn round(a: __m256) -> __m256 {
        _mm256_round_ps::<NEAREST>(a)
    }
    #[inline(always)]
    unsafe fn pow2(n: __m256) -> __m256 {
        let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
    }
    #[inline(always)]
    unsafe fn lt(a: __m256, b: __m256) -> __m256 {
        _mm256_cmp_ps::<_CMP_LT_OQ>(a, b)
    }
    #[inline(always)]
    unsafe fn select(m: __m256, a: __m256, b: __m256) -> __m256 {
        _mm256_blendv_ps(b, a, m)
    }
    #[inline(always)]
    unsafe fn to_array(v: __m256) -> [f32; 16] {
        let mut a = [0.0f32; 16];
        _mm256_storeu_ps(a.as_mut_ptr(), v);
        a
    }
}

impl Simd for Avx512 {
    const LANES: usize = 16;
    type V = __m512;
    type Mask = __mmask16;
    type Tail = __mmask16;

    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn tail(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }
    #[inline(always)]
    unsafe fn load_tail(p: *const f32, t: __mmask16, fill: __m512) -> __m512 {
        // Masked-off lanes are not accessed (fault suppression).
        _mm512_mask_loadu_ps(fill, t, p)
    }
    #[inline(always)]
    unsafe fn store_tail(p: *mut f32, t: __mmask16, v: __m512) {
        _mm512_mask_storeu_ps(p, t, v)
    }
    #[inline(always)]
    unsafe fn zero_dead(t: __mmask16, v: __m512) -> __m512 {
        _mm512_maskz_mov_ps(t, v)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: __m512, b: __m512) -> __m512 {
        _mm512_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn min(a: __m512, b: __m512) -> __m512 {
        _mm512_min_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sqrt(a: __m512) -> __m512 {
        _mm512_sqrt_ps(a)
    }
    #[inline(always)]
    unsafe fn abs(a: __m512) -> __m512 {
        _mm512_castsi512_ps(_mm512_and_epi32(
            _mm512_castps_si512(a),
            _mm512_set1_epi32(ABS),
        ))
    }
    #[inline(always)]
    unsafe fn copysign(mag: __m512, sign: __m512) -> __m512 {
        let s = _mm512_and_epi32(_mm512_castps_si512(sign), _mm512_set1_epi32(SIGN));
        _mm512_castsi512_ps(_mm512_or_epi32(_mm512_castps_si512(Self::abs(mag)), s))
    }
    #[inline(always)]
    unsafe fn round(a: __m512) -> __m512 {
        _mm512_roundscale_ps::<NEAREST>(a)
    }
    #[inline(always)]
    unsafe fn pow2(n: __m512) -> __m512 {
        let e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
    }
    #[inline(always)]
    unsafe fn lt(a: __m512, b: __m512) -> __mmask16 {
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b)
    }
    #[inline(always)]
    unsafe fn select(m: __mmask16, a: __m512, b: __m512) -> __m512 {
        _mm512_mask_blend_ps(m, b, a)
    }
    #[inline(always)]
    unsafe fn to_array(v: __m512) -> [f32; 16] {
        let mut a = [0.0f32; 16];
        _mm512_storeu_ps(a.as_mut_ptr(), v);
        a
    }
}

/// One module of entry points per instruction set. Each is an `unsafe fn` compiled with the
/// set's features; the generic kernel inlines into it.
macro_rules! entry_points {
    ($module:ident, $S:ty, $features:literal) => {
        pub(super) mod $module {
            use super::super::simd::{self, *};
            use super::super::AdamCoeffs;
            #[allow(unused_imports)]
            use super::*;

            // Every function below: the caller must have checked that the CPU supports
            // the features named in `$features`, and must pass slices of the lengths
            // `mod.rs` documents (equal lengths, whole rows).

            #[target_feature(enable = $features)]
            pub(crate) unsafe fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
                map2::<$S, _>(Add, a, b, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn sub(a: &[f32], b: &[f32], out: &mut [f32]) {
                map2::<$S, _>(Sub, a, b, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn mul(a: &[f32], b: &[f32], out: &mut [f32]) {
                map2::<$S, _>(Mul, a, b, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn div(a: &[f32], b: &[f32], out: &mut [f32]) {
                map2::<$S, _>(Div, a, b, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn add_scalar(a: &[f32], s: f32, out: &mut [f32]) {
                map1::<$S, _>(AddScalar(s), a, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn mul_scalar(a: &[f32], s: f32, out: &mut [f32]) {
                map1::<$S, _>(MulScalar(s), a, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn exp(a: &[f32], out: &mut [f32]) {
                map1::<$S, _>(Exp, a, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn tanh(a: &[f32], out: &mut [f32]) {
                map1::<$S, _>(Tanh, a, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn sigmoid(a: &[f32], out: &mut [f32]) {
                map1::<$S, _>(Sigmoid, a, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn gelu(a: &[f32], out: &mut [f32]) {
                map1::<$S, _>(Gelu, a, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
                map2::<$S, _>(GeluBackward, x, dy, dx)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn sum(a: &[f32]) -> f32 {
                simd::sum::<$S>(a)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn max(a: &[f32]) -> f32 {
                simd::max::<$S>(a)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
                simd::dot::<$S>(a, b)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
                simd::axpy::<$S>(alpha, x, y)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn softmax_rows(x: &[f32], cols: usize, out: &mut [f32]) {
                simd::softmax_rows::<$S>(x, cols, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn log_softmax_rows(x: &[f32], cols: usize, out: &mut [f32]) {
                simd::log_softmax_rows::<$S>(x, cols, out)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn softmax_backward_rows(
                y: &[f32],
                dy: &[f32],
                cols: usize,
                dx: &mut [f32],
            ) {
                simd::softmax_backward_rows::<$S>(y, dy, cols, dx)
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn log_softmax_backward_rows(
                y: &[f32],
                dy: &[f32],
                cols: usize,
                dx: &mut [f32],
            ) {
                simd::log_softmax_backward_rows::<$S>(y, dy, cols, dx)
            }
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn layer_norm_rows(
                x: &[f32],
                gamma: &[f32],
                beta: &[f32],
                cols: usize,
                eps: f32,
                out: &mut [f32],
                mean: &mut [f32],
                rstd: &mut [f32],
            ) {
                simd::layer_norm_rows::<$S>(x, gamma, beta, cols, eps, out, mean, rstd)
            }
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn layer_norm_backward_rows(
                x: &[f32],
                gamma: &[f32],
                mean: &[f32],
                rstd: &[f32],
                dy: &[f32],
                cols: usize,
                dx: &mut [f32],
                dgamma: &mut [f32],
                dbeta: &mut [f32],
            ) {
                simd::layer_norm_backward_rows::<$S>(
                    x, gamma, mean, rstd, dy, cols, dx, dgamma, dbeta,
                )
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn adamw(
                param: &mut [f32],
                grad: &[f32],
                m: &mut [f32],
                v: &mut [f32],
                c: &AdamCoeffs,
            ) {
                simd::adamw::<$S>(param, grad, m, v, c)
            }
        }
    };
}

entry_points!(avx2, Avx2, "avx2,fma");
entry_points!(avx512, Avx512, "avx512f");
