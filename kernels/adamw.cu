// adamw.cu: one fused AdamW step over a parameter's f32 master weights and f32 moments, with
// decoupled weight decay, reading an f32 or bf16 gradient and optionally writing a bf16 copy
// of the updated weights (the copy the bf16 forward reads). One pass over memory: read p, g, m,
// v; write p, m, v (and the copy).
//
// Reference: the CPU's AdamW (crates/tensor/src/cpu/vec/simd.rs `adamw_update`, the path every
// AVX2 or AVX-512 host runs), instruction for instruction, with the same per-step constants
// (cpu/vec/mod.rs `AdamCoeffs`, computed in f64 on the host and rounded to f32):
//   decayed = p · decay                                  decay     = 1 - lr·wd
//   m = fma(β1, m, (1 - β1) · g)
//   v = fma(β2, v, ((1 - β2) · g) · g)
//   denom = fma(sqrt(v), inv_bc2_sqrt, eps)              inv_bc2_sqrt = 1 / sqrt(1 - β2^step)
//   p = fma(-step_size, m / denom, decayed)              step_size = lr / (1 - β1^step)
// Products that the CPU rounds on their own use __fmul_rn (which the compiler never contracts
// into an FMA), the fused steps fmaf, and sqrt and division are the correctly rounded
// __fsqrt_rn and __fdiv_rn, so the result equals the CPU's SIMD path bit for bit (its scalar
// path rounds the fused steps twice and differs by an ulp or so).
//
// Layouts: p_in, p_out, m, v [n] f32; g [n] f32 or bf16; p_bf16 [n] bf16 or null (no copy-out).
// p_out may be p_in (an in-place update of master weights): each element is read and then
// written by the same thread, so those two pointers are not __restrict__.
//
// Gradient clipping folded in: `clip` (null: none) points at [norm, scale] in device memory,
// written by adamw_clip_scale from the gradients' sum of squares, so clipping needs no host
// round trip and no pass of its own. Each gradient element is read as g · scale (scale = 1
// when the norm is within the bound: g · 1 is g exactly, so unclipped steps are bitwise the
// unfused ones). A non-finite norm skips the update: p_out and the bf16 copy get the old
// value, m and v are left alone.
//   adamw_clip_scale: norm = sqrt(sumsq) (correctly rounded, as the host's f64 sqrt rounded to
//   f32), scale = max_norm / norm when norm is finite, positive and above max_norm, else 1:
//   the numbers crates/tensor/src/optim.rs clip_grad_norm computes on the host.
//
// Launch: blockDim.x = 256, gridDim.x = min(ceil(n / 256), 65535), grid-stride loop;
// adamw_clip_scale: one thread.
//
// Entry points: adamw_f32(n, p_in, p_out, g, m, v, p_bf16, clip, decay, beta1,
//                         one_minus_beta1, beta2, one_minus_beta2, inv_bc2_sqrt, eps, step_size)
//               adamw_bf16grad(same, with g bf16)
//               adamw_clip_scale(sumsq, max_norm, clip)

template <typename G>
__device__ __forceinline__ void adamw_body(i64 n, const float* p_in, float* p_out,
                                           const G* __restrict__ g, float* __restrict__ m,
                                           float* __restrict__ v, bf16* __restrict__ p_bf16,
                                           const float* __restrict__ clip, float decay, float beta1,
                                           float one_minus_beta1, float beta2, float one_minus_beta2,
                                           float inv_bc2_sqrt, float eps, float step_size) {
    float gscale = 1.0f;
    if (clip) {
        if (!isfinite(clip[0])) {
            for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
                const float pi = p_in[i];
                p_out[i] = pi;
                if (p_bf16) p_bf16[i] = f32_to_bf16(pi);
            }
            return;
        }
        gscale = clip[1];
    }
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float gi = __fmul_rn(load_f32(g + i), gscale);
        const float decayed = __fmul_rn(p_in[i], decay);
        const float mi = fmaf(beta1, m[i], __fmul_rn(one_minus_beta1, gi));
        const float vi = fmaf(beta2, v[i], __fmul_rn(__fmul_rn(one_minus_beta2, gi), gi));
        const float denom = fmaf(__fsqrt_rn(vi), inv_bc2_sqrt, eps);
        const float pi = fmaf(-step_size, __fdiv_rn(mi, denom), decayed);
        p_out[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (p_bf16) p_bf16[i] = f32_to_bf16(pi);
    }
}

#define ADAMW_KERNEL(name, G)                                                                      \
    extern "C" __global__ void name(i64 n, const float* p_in, float* p_out, const G* __restrict__ g, \
                                    float* __restrict__ m, float* __restrict__ v,                  \
                                    bf16* __restrict__ p_bf16, const float* __restrict__ clip,     \
                                    float decay, float beta1, float one_minus_beta1, float beta2,  \
                                    float one_minus_beta2, float inv_bc2_sqrt, float eps,          \
                                    float step_size) {                                             \
        adamw_body<G>(n, p_in, p_out, g, m, v, p_bf16, clip, decay, beta1, one_minus_beta1, beta2, \
                      one_minus_beta2, inv_bc2_sqrt, eps, step_size);                              \
    }

ADAMW_KERNEL(adamw_f32, float)
ADAMW_KERNEL(adamw_bf16grad, bf16)

extern "C" __global__ void adamw_clip_scale(const float* __restrict__ sumsq, float max_norm,
                                            float* __restrict__ clip) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const float norm = __fsqrt_rn(sumsq[0]);
    clip[0] = norm;
    clip[1] = isfinite(norm) && norm > max_norm && norm > 0.0f ? __fdiv_rn(max_norm, norm) : 1.0f;
}
