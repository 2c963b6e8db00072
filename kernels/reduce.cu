// reduce.cu: sum, max and sum of squares over one dim, and over a whole tensor in two passes.
// f32 and bf16 inputs; every accumulation is f32, combined in a fixed order (per-thread strided
// partial sums, then a fixed shuffle tree): the same launch gives bitwise-identical results.
//
// Reference: crates/tensor/src/ops/reduce.rs (sum, mean = sum · 1/n, max); sum of squares feeds
// the global gradient norm of optim.rs.
//
// Layouts (contiguous input; the host makes a strided view contiguous first):
// - *_rows: x [rows, cols], reduce the last dim: out[r] = scale · op(x[r, :]).
// - *_mid:  x [outer, len, inner], reduce the middle dim: out[o, i] = scale · op(x[o, :, i]).
//   Any dim of a contiguous tensor is such a middle dim (outer = product of the dims before,
//   inner = product of the dims after).
// - *_partial: x [n] flat; block b writes partial[b] (f32). A second *_rows launch with
//   rows = 1 over the partials finishes the reduction.
// `scale` multiplies sums (mean = sum with scale 1/n); max ignores it.
// Empty reductions give 0 for sums and -inf for max (as the CPU's fold does).
//
// Launch:
// - *_rows:    blockDim.x = 256, gridDim.x = min(rows, 65535); blocks loop over rows.
// - *_mid:     blockDim.x = 256, gridDim.x = min(ceil(outer·inner / 256), 65535).
// - *_partial: blockDim.x = 256, gridDim.x = G chosen from n alone (e.g. min(ceil(n / 4096),
//   1024)) so the result does not depend on the card; `partial` holds G floats.
//
// Entry points (T = f32 | bf16, OP = sum | max | sumsq):
//   reduce_OP_rows_T(rows, cols, x, out, scale)      out: T
//   reduce_OP_mid_T(outer, len, inner, x, out, scale) out: T
//   reduce_OP_partial_T(n, x, partial)                partial: f32

struct RSum {
    __device__ static float init() { return 0.0f; }
    __device__ static float lift(float x) { return x; }
    __device__ static float combine(float a, float b) { return a + b; }
    __device__ static float block(float v, float* s) { return block_sum(v, s); }
    __device__ static float finish(float v, float scale) { return v * scale; }
};
struct RSumSq {
    __device__ static float init() { return 0.0f; }
    __device__ static float lift(float x) { return x * x; }
    __device__ static float combine(float a, float b) { return a + b; }
    __device__ static float block(float v, float* s) { return block_sum(v, s); }
    __device__ static float finish(float v, float scale) { return v * scale; }
};
struct RMax {
    __device__ static float init() { return neg_inf(); }
    __device__ static float lift(float x) { return x; }
    __device__ static float combine(float a, float b) { return fmaxf(a, b); }
    __device__ static float block(float v, float* s) { return block_max(v, s); }
    __device__ static float finish(float v, float) { return v; }
};

template <typename Op, typename T>
__device__ __forceinline__ void reduce_rows_body(i64 rows, i64 cols, const T* __restrict__ x,
                                                 T* __restrict__ out, float scale) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = x + r * cols;
        float acc = Op::init();
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) acc = Op::combine(acc, Op::lift(load_f32(row + c)));
        acc = Op::block(acc, scratch);
        if (threadIdx.x == 0) store_f32(out + r, Op::finish(acc, scale));
    }
}

template <typename Op, typename T>
__device__ __forceinline__ void reduce_mid_body(i64 outer, i64 len, i64 inner,
                                                const T* __restrict__ x, T* __restrict__ out,
                                                float scale) {
    const i64 n = outer * inner;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        const i64 o = j / inner, i = j - o * inner;
        const T* p = x + o * len * inner + i;
        float acc = Op::init();
        // Neighbouring threads read neighbouring `i`: coalesced.
        for (i64 l = 0; l < len; ++l) acc = Op::combine(acc, Op::lift(load_f32(p + l * inner)));
        store_f32(out + j, Op::finish(acc, scale));
    }
}

template <typename Op, typename T>
__device__ __forceinline__ void reduce_partial_body(i64 n, const T* __restrict__ x,
                                                    float* __restrict__ partial) {
    __shared__ float scratch[32];
    float acc = Op::init();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        acc = Op::combine(acc, Op::lift(load_f32(x + i)));
    acc = Op::block(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

#define REDUCE(opname, Op, T, tname)                                                               \
    extern "C" __global__ void reduce_##opname##_rows_##tname(i64 rows, i64 cols,                 \
                                                              const T* __restrict__ x,             \
                                                              T* __restrict__ out, float scale) {  \
        reduce_rows_body<Op, T>(rows, cols, x, out, scale);                                        \
    }                                                                                              \
    extern "C" __global__ void reduce_##opname##_mid_##tname(i64 outer, i64 len, i64 inner,       \
                                                             const T* __restrict__ x,              \
                                                             T* __restrict__ out, float scale) {   \
        reduce_mid_body<Op, T>(outer, len, inner, x, out, scale);                                  \
    }                                                                                              \
    extern "C" __global__ void reduce_##opname##_partial_##tname(i64 n, const T* __restrict__ x,  \
                                                                 float* __restrict__ partial) {    \
        reduce_partial_body<Op, T>(n, x, partial);                                                 \
    }
#define REDUCE_BOTH(opname, Op) REDUCE(opname, Op, float, f32) REDUCE(opname, Op, bf16, bf16)

REDUCE_BOTH(sum, RSum)
REDUCE_BOTH(max, RMax)
REDUCE_BOTH(sumsq, RSumSq)
