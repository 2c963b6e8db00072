// reduce.cu: sum, max and sum of squares over one dim, and over a whole tensor in two passes;
// max with its index (argmax) over one dim, and the backward of max. f32 and bf16 inputs; every
// accumulation is f32, combined in a fixed order (per-thread strided partial sums, then a fixed
// shuffle tree): the same launch gives bitwise-identical results.
//
// Reference: crates/tensor/src/ops/reduce.rs (sum, mean = sum · 1/n, max, argmax); sum of
// squares feeds the global gradient norm of optim.rs.
//
// Layouts (contiguous input; the host makes a strided view contiguous first):
// - *_rows: x [rows, cols], reduce the last dim: out[r] = scale · op(x[r, :]).
// - *_mid:  x [outer, len, inner], reduce the middle dim: out[o, i] = scale · op(x[o, :, i]).
//   Any dim of a contiguous tensor is such a middle dim (outer = product of the dims before,
//   inner = product of the dims after).
// - *_partial: x [n] flat; block b writes partial[b] (f32). A second *_rows launch with
//   rows = 1 over the partials finishes the reduction.
// - *_midsplit: x [outer, len, inner] with few outputs and a long middle dim (a bias gradient:
//   [B·T, n] summed over B·T gives only n outputs, too few threads for *_mid): blockIdx.y = s
//   owns rows s·chunk .. min(len, (s+1)·chunk) and writes partial[s, o, i] (f32, unscaled). A
//   second reduce_{sum,max}_mid_f32 over [1, S, outer·inner] finishes it (sumsq's partial sums
//   of squares add with sum), in a fixed order.
// `scale` multiplies sums (mean = sum with scale 1/n); max ignores it.
// Empty reductions give 0 for sums and -inf for max (as the CPU's fold does).
//
// Launch:
// - *_rows:    blockDim.x = 256, gridDim.x = min(rows, 65535); blocks loop over rows.
// - *_mid:     blockDim.x = 256, gridDim.x = min(ceil(outer·inner / 256), 65535).
// - *_midsplit: as *_mid, and gridDim.y = S = ceil(len / chunk) ≤ 65535 (chunk chosen from
//   len alone, so results do not depend on the card); partial holds S·outer·inner floats.
// - *_partial: blockDim.x = 256, gridDim.x = G chosen from n alone (e.g. min(ceil(n / 4096),
//   1024)) so the result does not depend on the card; `partial` holds G floats.
//
// Arg-max (the forward of max and argmax, and max's backward):
// - reduce_argmax_rows_T: x [rows, cols], out[r] = max of row r (T), idx[r] its index (i64).
// - reduce_argmax_mid_T: x [outer, len, inner], out / idx [outer, inner].
// - reduce_argmax_bwd_T: dx [outer, len, inner] (T, zero-filled by the host): for each (o, i),
//   dx[o, idx[o, i], i] = dout[o, i]. Each output element is written by one thread: no atomics.
// The index is the CPU's fold `if j == 0 || x[j] > best` exactly: the first maximal element; a
// NaN never wins except at index 0, where the fold starts (then the result is that NaN). The
// rows kernel combines per-thread candidates with a total order that gives the same answer in
// any combination order: a NaN at index 0 first, then numbers by value (ties: lower index),
// then other NaNs (by index). cols / len must be at least 1 (the host rejects empty dims).
// Launch: rows as *_rows, mid and bwd as *_mid (gridDim.x from outer·inner).
//
// Entry points (T = f32 | bf16, OP = sum | max | sumsq):
//   reduce_OP_rows_T(rows, cols, x, out, scale)      out: T
//   reduce_OP_mid_T(outer, len, inner, x, out, scale) out: T
//   reduce_OP_partial_T(n, x, partial)                partial: f32
//   reduce_OP_midsplit_T(outer, len, inner, chunk, x, partial)  partial: f32
//   reduce_argmax_rows_T(rows, cols, x, out, idx)     out: T, idx: i64
//   reduce_argmax_mid_T(outer, len, inner, x, out, idx)
//   reduce_argmax_bwd_T(outer, len, inner, idx, dout, dx)

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
__device__ __forceinline__ void reduce_midsplit_body(i64 outer, i64 len, i64 inner, i64 chunk,
                                                     const T* __restrict__ x,
                                                     float* __restrict__ partial) {
    const i64 n = outer * inner;
    const i64 l0 = (i64)blockIdx.y * chunk;
    const i64 l1 = l0 + chunk < len ? l0 + chunk : len;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        const i64 o = j / inner, i = j - o * inner;
        const T* p = x + o * len * inner + i;
        float acc = Op::init();
        for (i64 l = l0; l < l1; ++l) acc = Op::combine(acc, Op::lift(load_f32(p + l * inner)));
        partial[(i64)blockIdx.y * n + j] = acc;
    }
}

template <typename Op, typename T>
__device__ __forceinline__ void reduce_partial_body(i64 n, const T* __restrict__ x,
                                                    float* __restrict__ partial) {
    __shared__ float scratch[32];
    // Four accumulators over the grid-stride sequence (element i + k·stride into a[k]), so
    // that each thread has four loads in flight; then the rest into a[0], and the four
    // combined in a fixed order.
    float a[4] = {Op::init(), Op::init(), Op::init(), Op::init()};
    const i64 stride = (i64)gridDim.x * blockDim.x;
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
#pragma unroll
        for (int k = 0; k < 4; ++k) a[k] = Op::combine(a[k], Op::lift(load_f32(x + i + k * stride)));
    }
    for (; i < n; i += stride) a[0] = Op::combine(a[0], Op::lift(load_f32(x + i)));
    float acc = Op::combine(Op::combine(a[0], a[1]), Op::combine(a[2], a[3]));
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
    }                                                                                              \
    extern "C" __global__ void reduce_##opname##_midsplit_##tname(                                \
        i64 outer, i64 len, i64 inner, i64 chunk, const T* __restrict__ x,                         \
        float* __restrict__ partial) {                                                             \
        reduce_midsplit_body<Op, T>(outer, len, inner, chunk, x, partial);                         \
    }
#define REDUCE_BOTH(opname, Op) REDUCE(opname, Op, float, f32) REDUCE(opname, Op, bf16, bf16)

REDUCE_BOTH(sum, RSum)
REDUCE_BOTH(max, RMax)
REDUCE_BOTH(sumsq, RSumSq)

// ---- arg-max ---------------------------------------------------------------------------------

// Rank class of a candidate (value v at index j) in the total order described in the header.
__device__ __forceinline__ int argmax_class(float v, i64 j) {
    return v != v ? (j == 0 ? 2 : 0) : 1;
}

// Whether candidate a beats candidate b; j < 0 marks an empty candidate (no element seen).
__device__ __forceinline__ bool argmax_beats(float av, i64 aj, float bv, i64 bj) {
    if (aj < 0) return false;
    if (bj < 0) return true;
    const int ca = argmax_class(av, aj), cb = argmax_class(bv, bj);
    if (ca != cb) return ca > cb;
    if (ca == 1 && av != bv) return av > bv;
    return aj < bj;
}

__device__ __forceinline__ void warp_argmax(float& v, i64& j) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const i64 oj = __shfl_xor_sync(0xffffffffu, j, o);
        if (argmax_beats(ov, oj, v, j)) {
            v = ov;
            j = oj;
        }
    }
}

// The best candidate of the block; every thread gets it. The order is total over candidates
// with distinct indices, so the result does not depend on the tree's shape.
__device__ __forceinline__ void block_argmax(float& v, i64& j, float* sv, i64* sj) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    warp_argmax(v, j);
    __syncthreads();  // the scratch may still be read for the previous row
    if (lane == 0) {
        sv[warp] = v;
        sj[warp] = j;
    }
    __syncthreads();
    v = lane < nwarps ? sv[lane] : 0.0f;
    j = lane < nwarps ? sj[lane] : -1;
    warp_argmax(v, j);
}

template <typename T>
__device__ __forceinline__ void argmax_rows_body(i64 rows, i64 cols, const T* __restrict__ x,
                                                 T* __restrict__ out, i64* __restrict__ idx) {
    __shared__ float sv[32];
    __shared__ i64 sj[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = x + r * cols;
        float bv = 0.0f;
        i64 bj = -1;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float v = load_f32(row + c);
            if (argmax_beats(v, c, bv, bj)) {
                bv = v;
                bj = c;
            }
        }
        block_argmax(bv, bj, sv, sj);
        if (threadIdx.x == 0) {
            // bv is an element of x, so storing it back as T is exact.
            store_f32(out + r, bv);
            idx[r] = bj;
        }
    }
}

template <typename T>
__device__ __forceinline__ void argmax_mid_body(i64 outer, i64 len, i64 inner,
                                                const T* __restrict__ x, T* __restrict__ out,
                                                i64* __restrict__ idx) {
    const i64 n = outer * inner;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        const i64 o = j / inner, i = j - o * inner;
        const T* p = x + o * len * inner + i;
        // The CPU's fold, literally: the first element, then strictly greater ones.
        float bv = load_f32(p);
        i64 bl = 0;
        for (i64 l = 1; l < len; ++l) {
            const float v = load_f32(p + l * inner);
            if (v > bv) {
                bv = v;
                bl = l;
            }
        }
        store_f32(out + j, bv);
        idx[j] = bl;
    }
}

template <typename T>
__device__ __forceinline__ void argmax_bwd_body(i64 outer, i64 len, i64 inner,
                                                const i64* __restrict__ idx,
                                                const T* __restrict__ dout, T* __restrict__ dx) {
    const i64 n = outer * inner;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        const i64 o = j / inner, i = j - o * inner;
        dx[(o * len + idx[j]) * inner + i] = dout[j];
    }
}

#define ARGMAX(T, tname)                                                                           \
    extern "C" __global__ void reduce_argmax_rows_##tname(i64 rows, i64 cols,                     \
                                                          const T* __restrict__ x,                 \
                                                          T* __restrict__ out,                     \
                                                          i64* __restrict__ idx) {                 \
        argmax_rows_body<T>(rows, cols, x, out, idx);                                              \
    }                                                                                              \
    extern "C" __global__ void reduce_argmax_mid_##tname(i64 outer, i64 len, i64 inner,           \
                                                         const T* __restrict__ x,                  \
                                                         T* __restrict__ out,                      \
                                                         i64* __restrict__ idx) {                  \
        argmax_mid_body<T>(outer, len, inner, x, out, idx);                                        \
    }                                                                                              \
    extern "C" __global__ void reduce_argmax_bwd_##tname(i64 outer, i64 len, i64 inner,           \
                                                         const i64* __restrict__ idx,              \
                                                         const T* __restrict__ dout,               \
                                                         T* __restrict__ dx) {                     \
        argmax_bwd_body<T>(outer, len, inner, idx, dout, dx);                                      \
    }

ARGMAX(float, f32)
ARGMAX(bf16, bf16)
