// adamw.cu: one fused AdamW step over a parameter's f32 master weights and f32 moments, with
// decoupled weight decay, reading an f32 or bf16 gradient and optionally writing a bf16 copy
// of the updated weights (the copy the bf16 forward reads). One pass over memory: read p, g, m,
// v; write p, m, v (and the copy).
//
// Reference: crates/tensor/src/cpu/vec.rs adamw, operation for operation:
//   p -= lr · wd · p
//   m  = β1 · m + (1 - β1) · g
//   v  = β2 · v + (1 - β2) · g²
//   p -= lr · (m / bc1) / (sqrt(v / bc2) + eps)
// with bc1 = 1 - β1^step and bc2 = 1 - β2^step computed on the host in f32 as the CPU does
// (`beta.powi(step)`), so both sides use the same corrections. The GPU may contract a·b + c
// into one FMA where the CPU rounds twice: expect agreement to a few ulps, not bitwise.
//
// Layouts: p, m, v [n] f32; g [n] f32 or bf16; p_bf16 [n] bf16 or null (no copy-out).
//
// Launch: blockDim.x = 256, gridDim.x = min(ceil(n / 256), 65535), grid-stride loop.
//
// Entry points: adamw_f32(n, p, g, m, v, p_bf16, lr, beta1, beta2, eps, wd, bc1, bc2)
//               adamw_bf16grad(same, with g bf16)

template <typename G>
__device__ __forceinline__ void adamw_body(i64 n, float* __restrict__ p, const G* __restrict__ g,
                                           float* __restrict__ m, float* __restrict__ v,
                                           bf16* __restrict__ p_bf16, float lr, float beta1,
                                           float beta2, float eps, float wd, float bc1, float bc2) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float gi = load_f32(g + i);
        float pi = p[i];
        pi -= lr * wd * pi;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        pi -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (p_bf16) p_bf16[i] = f32_to_bf16(pi);
    }
}

extern "C" __global__ void adamw_f32(i64 n, float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v,
                                     bf16* __restrict__ p_bf16, float lr, float beta1, float beta2,
                                     float eps, float wd, float bc1, float bc2) {
    adamw_body<float>(n, p, g, m, v, p_bf16, lr, beta1, beta2, eps, wd, bc1, bc2);
}

extern "C" __global__ void adamw_bf16grad(i64 n, float* __restrict__ p, const bf16* __restrict__ g,
                                          float* __restrict__ m, float* __restrict__ v,
                                          bf16* __restrict__ p_bf16, float lr, float beta1,
                                          float beta2, float eps, float wd, float bc1, float bc2) {
    adamw_body<bf16>(n, p, g, m, v, p_bf16, lr, beta1, beta2, eps, wd, bc1, bc2);
}
