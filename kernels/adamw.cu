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
// Launch: blockDim.x = 256, gridDim.x = min(ceil(n / 1024), 65535) (about 4 elements a thread,
// the vector path's step; adamw_body), grid-stride loops, so any grid is correct;
// adamw_clip_scale: one thread.
//
// Entry points: adamw_f32(n, p_in, p_out, g, m, v, p_bf16, clip, decay, beta1,
//                         one_minus_beta1, beta2, one_minus_beta2, inv_bc2_sqrt, eps, step_size)
//               adamw_bf16grad(same, with g bf16)
//               adamw_clip_scale(sumsq, max_norm, clip)

struct AdamwCoeffs {
    float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc2_sqrt, eps, step_size;
};

// One element: the header's formulas; p, m, v updated in place.
__device__ __forceinline__ void adamw_one(const AdamwCoeffs& k, float gi, float& p, float& m, float& v) {
    const float decayed = __fmul_rn(p, k.decay);
    m = fmaf(k.beta1, m, __fmul_rn(k.one_minus_beta1, gi));
    v = fmaf(k.beta2, v, __fmul_rn(__fmul_rn(k.one_minus_beta2, gi), gi));
    const float denom = fmaf(__fsqrt_rn(v), k.inv_bc2_sqrt, k.eps);
    p = fmaf(-k.step_size, __fdiv_rn(m, denom), decayed);
}

// Four gradient elements as floats: one 16-byte load of f32, one 8-byte load of bf16.
__device__ __forceinline__ void adamw_load4(const float* g, float (&out)[4]) {
    const float4 q = *reinterpret_cast<const float4*>(g);
    out[0] = q.x, out[1] = q.y, out[2] = q.z, out[3] = q.w;
}
__device__ __forceinline__ void adamw_load4(const bf16* g, float (&out)[4]) {
    const uint2 q = *reinterpret_cast<const uint2*>(g);
    const bf16* e = reinterpret_cast<const bf16*>(&q);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = bf16_to_f32(e[k]);
}

__device__ __forceinline__ bool adamw_aligned(const void* p, unsigned bytes) {
    return ((unsigned long long)p & (bytes - 1)) == 0;
}

// The fast path: when p_in, p_out, m, v (and g) start 16-byte aligned (g bf16 and the bf16 copy:
// 8-byte), each step takes 4 elements through 16-byte loads and stores (the launch sizes the
// grid for about 4 elements a thread); the arithmetic per element is adamw_one's, so the
// results are bitwise the scalar loop's. The last n mod 4 elements, and misaligned buffers,
// take the scalar loop.
template <typename G>
__device__ __forceinline__ void adamw_body(i64 n, const float* p_in, float* p_out,
                                           const G* __restrict__ g, float* __restrict__ m,
                                           float* __restrict__ v, bf16* __restrict__ p_bf16,
                                           const float* __restrict__ clip, const AdamwCoeffs& k) {
    float gscale = 1.0f;
    const i64 stride = (i64)gridDim.x * blockDim.x, tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (clip) {
        if (!isfinite(clip[0])) {
            for (i64 i = tid; i < n; i += stride) {
                const float pi = p_in[i];
                p_out[i] = pi;
                if (p_bf16) p_bf16[i] = f32_to_bf16(pi);
            }
            return;
        }
        gscale = clip[1];
    }
    i64 done = 0;
    const bool vec = adamw_aligned(p_in, 16) && adamw_aligned(p_out, 16) && adamw_aligned(m, 16) &&
                     adamw_aligned(v, 16) && adamw_aligned(g, 4 * sizeof(G)) &&
                     (!p_bf16 || adamw_aligned(p_bf16, 8));
    if (vec) {
        const i64 nv = n / 4;
        for (i64 j = tid; j < nv; j += stride) {
            float gv[4];
            adamw_load4(g + 4 * j, gv);
            const float4 P = *reinterpret_cast<const float4*>(p_in + 4 * j);
            float4 M = *reinterpret_cast<const float4*>(m + 4 * j);
            float4 V = *reinterpret_cast<const float4*>(v + 4 * j);
            float pv[4] = {P.x, P.y, P.z, P.w}, mv[4] = {M.x, M.y, M.z, M.w}, vv[4] = {V.x, V.y, V.z, V.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) adamw_one(k, __fmul_rn(gv[e], gscale), pv[e], mv[e], vv[e]);
            *reinterpret_cast<float4*>(p_out + 4 * j) = make_float4(pv[0], pv[1], pv[2], pv[3]);
            *reinterpret_cast<float4*>(m + 4 * j) = make_float4(mv[0], mv[1], mv[2], mv[3]);
            *reinterpret_cast<float4*>(v + 4 * j) = make_float4(vv[0], vv[1], vv[2], vv[3]);
            if (p_bf16) {
                uint2 q;
                bf16* e = reinterpret_cast<bf16*>(&q);
#pragma unroll
                for (int c = 0; c < 4; ++c) e[c] = f32_to_bf16(pv[c]);
                *reinterpret_cast<uint2*>(p_bf16 + 4 * j) = q;
            }
        }
        done = nv * 4;
    }
    for (i64 i = done + tid; i < n; i += stride) {
        float pi = p_in[i], mi = m[i], vi = v[i];
        adamw_one(k, __fmul_rn(load_f32(g + i), gscale), pi, mi, vi);
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
        const AdamwCoeffs k = {decay, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc2_sqrt, \
                               eps, step_size};                                                    \
        adamw_body<G>(n, p_in, p_out, g, m, v, p_bf16, clip, k);                                   \
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
