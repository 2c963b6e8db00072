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
// - layer_norm_bwd_params: blockDim.x = 256 (8 slices of 32 columns), gridDim.x = ceil(cols / 32).
// - rows of at most 1024 columns: the one-warp-per-row kernels below (their launch there).
//
// Entry points (T = f32 | bf16):
//   layer_norm_fwd_T(rows, cols, x, gamma, beta, y, mean, rstd, eps)
//   layer_norm_bwd_T(rows, cols, x, gamma, mean, rstd, dy, dx, dgamma_part, dbeta_part)
//   layer_norm_bwd_params(G, cols, dgamma_part, dbeta_part, dgamma, dbeta)
//   layer_norm_{fwd,bwd}_w{4,8,16,24,32}_T: as layer_norm_{fwd,bwd}_T

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

// Column block of 32 columns: thread (slice = threadIdx.x / 32, lane) sums the partial rows
// slice, slice + 8, ... of its column in order, then thread slice 0 adds the 8 slice sums in
// slice order: a fixed order, from the shapes alone.
#define LN_PARAM_SLICES 8
extern "C" __global__ void layer_norm_bwd_params(i64 parts, i64 cols,
                                                 const float* __restrict__ dgamma_part,
                                                 const float* __restrict__ dbeta_part,
                                                 float* __restrict__ dgamma,
                                                 float* __restrict__ dbeta) {
    __shared__ float sg[LN_PARAM_SLICES][32], sb[LN_PARAM_SLICES][32];
    const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
    const i64 c = (i64)blockIdx.x * 32 + lane;
    float g = 0.0f, b = 0.0f;
    if (c < cols)
        for (i64 p = slice; p < parts; p += LN_PARAM_SLICES) {
            g += dgamma_part[p * cols + c];
            b += dbeta_part[p * cols + c];
        }
    sg[slice][lane] = g;
    sb[slice][lane] = b;
    __syncthreads();
    if (slice != 0 || c >= cols) return;
    for (int s = 1; s < LN_PARAM_SLICES; ++s) {
        g += sg[s][lane];
        b += sb[s][lane];
    }
    dgamma[c] = g;
    dbeta[c] = b;
}

// ---- one warp per row (cols ≤ 32 · CPL) ------------------------------------------------------
//
// For rows of at most 1024 columns (GPT-2's 768 among them) a warp owns a row: lane l holds
// columns l, l + 32, ... (CPL of them, in registers), and the row sums are warp shuffles, with
// no block barrier per row. The backward keeps each lane's dgamma/dbeta sums over the warp's
// rows in registers, and the block adds its warps' sums in warp order into its partial row.
// Same formulas as the block kernels above (the reference path for wider rows).
//
// Launch (blockDim.x = 256, 8 warps; warp w of block b owns rows (8b + w) + 8·gridDim.x·k):
// - layer_norm_fwd_wCPL_T: gridDim.x = min(ceil(rows / 8), 65535).
// - layer_norm_bwd_wCPL_T: gridDim.x = G = min(ceil(rows / 8), 256) partial rows, from the row
//   count alone. Static shared memory: 2 · 32 · CPL floats.
// Entry points (CPL = 4 | 8 | 16 | 24 | 32, T = f32 | bf16): the block kernels' arguments.

template <typename T, int CPL>
__device__ __forceinline__ void layer_norm_fwd_warp(i64 rows, i64 cols, const T* __restrict__ x,
                                                    const T* __restrict__ gamma,
                                                    const T* __restrict__ beta, T* __restrict__ y,
                                                    float* __restrict__ mean,
                                                    float* __restrict__ rstd, float eps) {
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const float inv_cols = 1.0f / (float)cols;
    for (i64 r = (i64)blockIdx.x * nw + (threadIdx.x >> 5); r < rows; r += (i64)gridDim.x * nw) {
        const T* xr = x + r * cols;
        T* yr = y + r * cols;
        float v[CPL];
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
            const i64 c = lane + 32 * k;
            v[k] = c < cols ? load_f32(xr + c) : 0.0f;
            s += v[k];
        }
        const float mu = warp_sum(s) * inv_cols;
        float q = 0.0f;
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
            const float d = v[k] - mu;
            if (lane + 32 * k < cols) q += d * d;
        }
        const float rs = rsqrtf(warp_sum(q) * inv_cols + eps);
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
            const i64 c = lane + 32 * k;
            if (c < cols) {
                const float xh = (v[k] - mu) * rs;
                store_f32(yr + c, xh * load_f32(gamma + c) + load_f32(beta + c));
            }
        }
        if (lane == 0) {
            mean[r] = mu;
            rstd[r] = rs;
        }
    }
}

template <typename T, int CPL>
__device__ __forceinline__ void layer_norm_bwd_warp(
    i64 rows, i64 cols, const T* __restrict__ x, const T* __restrict__ gamma,
    const float* __restrict__ mean, const float* __restrict__ rstd, const T* __restrict__ dy,
    T* __restrict__ dx, float* __restrict__ dgamma_part, float* __restrict__ dbeta_part) {
    __shared__ float sdg[32 * CPL], sdb[32 * CPL];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float inv_cols = 1.0f / (float)cols;
    float adg[CPL], adb[CPL];
#pragma unroll
    for (int k = 0; k < CPL; ++k) adg[k] = adb[k] = 0.0f;
    for (i64 r = (i64)blockIdx.x * nw + warp; r < rows; r += (i64)gridDim.x * nw) {
        const T* xr = x + r * cols;
        const T* gr = dy + r * cols;
        T* dr = dx + r * cols;
        const float mu = mean[r], rs = rstd[r];
        float xh[CPL], g[CPL];
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
            const i64 c = lane + 32 * k;
            xh[k] = g[k] = 0.0f;
            if (c < cols) {
                xh[k] = (load_f32(xr + c) - mu) * rs;
                const float d = load_f32(gr + c);
                g[k] = d * load_f32(gamma + c);
                a += g[k];
                b += g[k] * xh[k];
                adg[k] += d * xh[k];
                adb[k] += d;
            }
        }
        a = warp_sum(a) * inv_cols;
        b = warp_sum(b) * inv_cols;
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
            const i64 c = lane + 32 * k;
            if (c < cols) store_f32(dr + c, rs * (g[k] - a - xh[k] * b));
        }
    }
    // The block's partial row: its warps' sums added in warp order.
    for (int w = 0; w < nw; ++w) {
        if (warp == w) {
#pragma unroll
            for (int k = 0; k < CPL; ++k) {
                const int c = lane + 32 * k;
                sdg[c] = w == 0 ? adg[k] : sdg[c] + adg[k];
                sdb[c] = w == 0 ? adb[k] : sdb[c] + adb[k];
            }
        }
        __syncthreads();
    }
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
        dgamma_part[(i64)blockIdx.x * cols + c] = sdg[c];
        dbeta_part[(i64)blockIdx.x * cols + c] = sdb[c];
    }
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

#define LAYER_NORM_WARP(T, tname, CPL)                                                            \
    extern "C" __global__ void layer_norm_fwd_w##CPL##_##tname(                                   \
        i64 rows, i64 cols, const T* __restrict__ x, const T* __restrict__ gamma,                 \
        const T* __restrict__ beta, T* __restrict__ y, float* __restrict__ mean,                  \
        float* __restrict__ rstd, float eps) {                                                    \
        layer_norm_fwd_warp<T, CPL>(rows, cols, x, gamma, beta, y, mean, rstd, eps);              \
    }                                                                                             \
    extern "C" __global__ void layer_norm_bwd_w##CPL##_##tname(                                   \
        i64 rows, i64 cols, const T* __restrict__ x, const T* __restrict__ gamma,                 \
        const float* __restrict__ mean, const float* __restrict__ rstd, const T* __restrict__ dy, \
        T* __restrict__ dx, float* __restrict__ dgamma_part, float* __restrict__ dbeta_part) {    \
        layer_norm_bwd_warp<T, CPL>(rows, cols, x, gamma, mean, rstd, dy, dx, dgamma_part,        \
                                    dbeta_part);                                                  \
    }
#define LAYER_NORM_WARP_ALL(CPL) LAYER_NORM_WARP(float, f32, CPL) LAYER_NORM_WARP(bf16, bf16, CPL)

LAYER_NORM_WARP_ALL(4)
LAYER_NORM_WARP_ALL(8)
LAYER_NORM_WARP_ALL(16)
LAYER_NORM_WARP_ALL(24)
LAYER_NORM_WARP_ALL(32)
