// softmax.cu: softmax and log_softmax over the last dim, forward and backward. f32 and bf16
// storage, f32 arithmetic; the row maximum is subtracted before exponentiating.
//
// Reference: crates/tensor/src/cpu/vec.rs softmax_rows, log_softmax_rows and their backward
// (the op moves any dim last before calling these, and so will the CUDA dispatch).
//
// Layout: x, y, dy, dx are [rows, cols] contiguous.
//   softmax:           y = exp(x - m) / Σ exp(x - m)                 (m = row max)
//   log_softmax:       y = x - (m + log Σ exp(x - m))
//   softmax bwd:       dx = y · (dy - Σ y·dy)                         (y = softmax output)
//   log_softmax bwd:   dx = dy - exp(y) · Σ dy                        (y = log_softmax output)
// A row of all -inf gives NaN, as on the CPU.
//
// Launch: one block per row, blockDim.x = 256 (any multiple of 32 up to 1024 is correct;
// 1024 suits vocab-sized rows), gridDim.x = min(rows, 65535); blocks loop over rows.
// Shared memory: 32 floats (static).
//
// Entry points (T = f32 | bf16):
//   softmax_fwd_T(rows, cols, x, y)        log_softmax_fwd_T(rows, cols, x, y)
//   softmax_bwd_T(rows, cols, y, dy, dx)   log_softmax_bwd_T(rows, cols, y, dy, dx)

template <typename T, bool LOG>
__device__ __forceinline__ void softmax_fwd_body(i64 rows, i64 cols, const T* __restrict__ x,
                                                 T* __restrict__ y) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * cols;
        T* yr = y + r * cols;
        float m = neg_inf();
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, load_f32(xr + c));
        m = block_max(m, scratch);
        float s = 0.0f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += expf(load_f32(xr + c) - m);
        s = block_sum(s, scratch);
        if (LOG) {
            const float lse = m + logf(s);
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) store_f32(yr + c, load_f32(xr + c) - lse);
        } else {
            const float inv = 1.0f / s;
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x)
                store_f32(yr + c, expf(load_f32(xr + c) - m) * inv);
        }
    }
}

template <typename T, bool LOG>
__device__ __forceinline__ void softmax_bwd_body(i64 rows, i64 cols, const T* __restrict__ y,
                                                 const T* __restrict__ dy, T* __restrict__ dx) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* yr = y + r * cols;
        const T* gr = dy + r * cols;
        T* dr = dx + r * cols;
        float s = 0.0f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x)
            s += LOG ? load_f32(gr + c) : load_f32(yr + c) * load_f32(gr + c);
        s = block_sum(s, scratch);
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float yv = load_f32(yr + c), g = load_f32(gr + c);
            store_f32(dr + c, LOG ? g - expf(yv) * s : yv * (g - s));
        }
    }
}

#define SOFTMAX(T, tname)                                                                        \
    extern "C" __global__ void softmax_fwd_##tname(i64 rows, i64 cols, const T* __restrict__ x,  \
                                                   T* __restrict__ y) {                          \
        softmax_fwd_body<T, false>(rows, cols, x, y);                                            \
    }                                                                                            \
    extern "C" __global__ void log_softmax_fwd_##tname(i64 rows, i64 cols,                       \
                                                       const T* __restrict__ x,                  \
                                                       T* __restrict__ y) {                      \
        softmax_fwd_body<T, true>(rows, cols, x, y);                                             \
    }                                                                                            \
    extern "C" __global__ void softmax_bwd_##tname(i64 rows, i64 cols, const T* __restrict__ y,  \
                                                   const T* __restrict__ dy,                     \
                                                   T* __restrict__ dx) {                         \
        softmax_bwd_body<T, false>(rows, cols, y, dy, dx);                                       \
    }                                                                                            \
    extern "C" __global__ void log_softmax_bwd_##tname(i64 rows, i64 cols,                       \
                                                       const T* __restrict__ y,                  \
                                                       const T* __restrict__ dy,                 \
                                                       T* __restrict__ dx) {                     \
        softmax_bwd_body<T, true>(rows, cols, y, dy, dx);                                        \
    }

SOFTMAX(float, f32)
SOFTMAX(bf16, bf16)
