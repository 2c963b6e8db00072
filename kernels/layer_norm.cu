// layer_norm.cu: layer normalisation over the last dim with weight (gamma) and bias (beta),
// forward and backward, as GPT-2's pre-LN blocks use it. f32 and bf16 storage; mean, variance
// and every gradient sum accumulate in f32.
//
// Reference: crates/tensor/src/cpu/vec.rs layer_norm_rows / layer_norm_backward_rows
// (biased variance, two-pass: mean first, then Σ(x - mean)²).
//
// Layouts: x, y, dy, dx [rows, cols] contiguous; gamma, beta [cols] (storage type T);
// mean, rstd [rows] f32, written by the forward and read by the backward.
//   y    = (x - mean) · rstd · gamma + beta,   rstd = 1 / sqrt(var + eps)
//   g    = dy · gamma,  x̂ = (x - mean) · rstd
//   dx   = rstd · (g - mean(g) - x̂ · mean(g · x̂))
//   dgamma = Σ_rows dy · x̂,  dbeta = Σ_rows dy                       (f32 outputs)
//
// The parameter gradients are deterministic without atomics: layer_norm_bwd_T block b owns
// rows b, b + G, b + 2G, ... and keeps its own running sums in row b of the f32 scratch arrays
// dgamma_part, dbeta_part [G, cols] (each thread only touches its own columns); then
// layer_norm_bwd_params sums the G rows of the scratch in order.
//
// Launch:
// - layer_norm_fwd_T: one block per row, blockDim.x = 256 (multiple of 32, ≤ 1024),
//   gridDim.x = min(rows, 65535); blocks loop over rows. Shared memory: 32 floats.
// - layer_norm_bwd_T: blockDim.x = 256, gridDim.x = G with 1 ≤ G ≤ rows, chosen from rows
//   alone (e.g. min(rows, 256)) so results do not depend on the card.
// - layer_norm_bwd_params: blockDim.x = 256, gridDim.x = ceil(cols / 256).
//
// Entry points (T = f32 | bf16):
//   layer_norm_fwd_T(rows, cols, x, gamma, beta, y, mean, rstd, eps)
//   layer_norm_bwd_T(rows, cols, x, gamma, mean, rstd, dy, dx, dgamma_part, dbeta_part)
//   layer_norm_bwd_params(G, cols, dgamma_part, dbeta_part, dgamma, dbeta)

template <typename T>
__device__ __forceinline__ void layer_norm_fwd_body(i64 rows, i64 cols, const T* __restrict__ x,
                                                    const T* __restrict__ gamma,
                                                    const T* __restrict__ beta, T* __restrict__ y,
                                                    float* __restrict__ mean,
                                                    float* __restrict__ rstd, float eps) {
    __shared__ float scratch[32];
    const float inv_cols = 1.0f / (float)cols;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * cols;
        T* yr = y + r * cols;
        float s = 0.0f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += load_f32(xr + c);
        const float mu = block_sum(s, scratch) * inv_cols;
        float v = 0.0f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float d = load_f32(xr + c) - mu;
            v += d * d;
        }
        const float rs = rsqrtf(block_sum(v, scratch) * inv_cols + eps);
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xh = (load_f32(xr + c) - mu) * rs;
            store_f32(yr + c, xh * load_f32(gamma + c) + load_f32(beta + c));
        }
        if (threadIdx.x == 0) {
            mean[r] = mu;
            rstd[r] = rs;
        }
    }
}

template <typename T>
__device__ __forceinline__ void layer_norm_bwd_body(
    i64 rows, i64 cols, const T* __restrict__ x, const T* __restrict__ gamma,
    const float* __restrict__ mean, const float* __restrict__ rstd, const T* __restrict__ dy,
    T* __restrict__ dx, float* __restrict__ dgamma_part, float* __restrict__ dbeta_part) {
    __shared__ float scratch[32];
    const float inv_cols = 1.0f / (float)cols;
    float* dg = dgamma_part + (i64)blockIdx.x * cols;
    float* db = dbeta_part + (i64)blockIdx.x * cols;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
        dg[c] = 0.0f;
        db[c] = 0.0f;
    }
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * cols;
        const T* gr = dy + r * cols;
        T* dr = dx + r * cols;
        const float mu = mean[r], rs = rstd[r];
        float a = 0.0f, b = 0.0f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xh = (load_f32(xr + c) - mu) * rs;
            const float d = load_f32(gr + c);
            const float g = d * load_f32(gamma + c);
            a += g;
            b += g * xh;
            // Only this thread touches column c of this block's scratch row.
            dg[c] += d * xh;
            db[c] += d;
        }
        a = block_sum(a, scratch) * inv_cols;
        b = block_sum(b, scratch) * inv_cols;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xh = (load_f32(xr + c) - mu) * rs;
            const float g = load_f32(gr + c) * load_f32(gamma + c);
            store_f32(dr + c, rs * (g - a - xh * b));
        }
    }
}

extern "C" __global__ void layer_norm_bwd_params(i64 parts, i64 cols,
                                                 const float* __restrict__ dgamma_part,
                                                 const float* __restrict__ dbeta_part,
                                                 float* __restrict__ dgamma,
                                                 float* __restrict__ dbeta) {
    const i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float g = 0.0f, b = 0.0f;
    for (i64 p = 0; p < parts; ++p) {
        g += dgamma_part[p * cols + c];
        b += dbeta_part[p * cols + c];
    }
    dgamma[c] = g;
    dbeta[c] = b;
}

#define LAYER_NORM(T, tname)                                                                      \
    extern "C" __global__ void layer_norm_fwd_##tname(                                            \
        i64 rows, i64 cols, const T* __restrict__ x, const T* __restrict__ gamma,                 \
        const T* __restrict__ beta, T* __restrict__ y, float* __restrict__ mean,                  \
        float* __restrict__ rstd, float eps) {                                                    \
        layer_norm_fwd_body<T>(rows, cols, x, gamma, beta, y, mean, rstd, eps);                   \
    }                                                                                             \
    extern "C" __global__ void layer_norm_bwd_##tname(                                            \
        i64 rows, i64 cols, const T* __restrict__ x, const T* __restrict__ gamma,                 \
        const float* __restrict__ mean, const float* __restrict__ rstd, const T* __restrict__ dy, \
        T* __restrict__ dx, float* __restrict__ dgamma_part, float* __restrict__ dbeta_part) {    \
        layer_norm_bwd_body<T>(rows, cols, x, gamma, mean, rstd, dy, dx, dgamma_part,             \
                               dbeta_part);                                                       \
    }

LAYER_NORM(float, f32)
LAYER_NORM(bf16, bf16)
