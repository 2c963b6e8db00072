// cross_entropy.cu: cross-entropy fused with log_softmax, with an ignore index and per-token
// weights (SFT masks prompt tokens this way), and its gradient, never materialising the
// log-probabilities. f32 and bf16 logits; f32 arithmetic and outputs.
//
// Reference: crates/tensor/src/ops/cross_entropy.rs:
//   loss = Σ_i w_i · (lse_i - x_i[t_i]) / Σ_i w_i       (0 when Σ w = 0, not NaN)
//   dx_i = (softmax(x_i) - onehot(t_i)) · w_i / Σ w · dloss
// where w_i = 0 for ignored targets, else weights[i] (1 without weights).
//
// Layouts: logits, dlogits [rows, vocab] contiguous; targets [rows] int64; weights [rows] f32
// or null; w, lse, loss_rows [rows] f32; inv_total, dloss: one f32 each in device memory (so a
// whole step stays on the GPU with no host round trip).
//
// Sequence (the host chains these on one stream):
//   1. cross_entropy_weights: w_i, inv_total = 1 / Σ w (0 if Σ w = 0), and `bad`: the first
//      row whose target (not ignored) lies outside 0..vocab (host sets *bad = ~0 before; an
//      atomicMin, so the reported row is deterministic). Such a row gets w_i = 0.
//   2. cross_entropy_fwd_T: lse_i and loss_rows_i = w_i · (lse_i - x_i[t_i]) · inv_total.
//      The loss is Σ loss_rows (reduce.cu, deterministic).
//   3. cross_entropy_bwd_T: dlogits from logits, lse and *dloss.
//   Training uses cross_entropy_fused_T instead of 2 + 3: one launch writes lse, loss_rows and
//   dlogits for dloss = 1 (the backward then scales by the upstream gradient if it is not 1).
//
// Launch:
// - cross_entropy_weights: one block, blockDim.x = 1024 (multiple of 32), gridDim.x = 1.
// - the others: one block per row, blockDim.x = 256..1024 (multiple of 32; 1024 suits a 50257
//   vocab), gridDim.x = min(rows, 65535); blocks loop over rows. Shared memory: 32 floats.
//
// Entry points (T = f32 | bf16):
//   cross_entropy_weights(rows, vocab, targets, weights, ignore_index, has_ignore, w,
//                         inv_total, bad)
//   cross_entropy_fwd_T(rows, vocab, logits, targets, w, inv_total, lse, loss_rows)
//   cross_entropy_bwd_T(rows, vocab, logits, targets, w, inv_total, lse, dloss, dlogits)
//   cross_entropy_fused_T(rows, vocab, logits, targets, w, inv_total, lse, loss_rows, dlogits)

extern "C" __global__ void cross_entropy_weights(i64 rows, i64 vocab, const i64* __restrict__ targets,
                                                 const float* __restrict__ weights, i64 ignore_index,
                                                 int has_ignore, float* __restrict__ w,
                                                 float* __restrict__ inv_total,
                                                 unsigned long long* __restrict__ bad) {
    __shared__ float scratch[32];
    float total = 0.0f;
    for (i64 i = threadIdx.x; i < rows; i += blockDim.x) {
        const i64 t = targets[i];
        float wi = weights ? weights[i] : 1.0f;
        if (has_ignore && t == ignore_index) {
            wi = 0.0f;
        } else if (t < 0 || t >= vocab) {
            atomicMin(bad, (unsigned long long)i);
            wi = 0.0f;
        }
        w[i] = wi;
        total += wi;
    }
    total = block_sum(total, scratch);
    if (threadIdx.x == 0) *inv_total = total != 0.0f ? 1.0f / total : 0.0f;
}

// Row maximum and log-sum-exp of one row, over the whole block.
template <typename T>
__device__ __forceinline__ float row_lse(const T* __restrict__ xr, i64 vocab, float* scratch) {
    float m = neg_inf();
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, load_f32(xr + c));
    m = block_max(m, scratch);
    float s = 0.0f;
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) s += expf(load_f32(xr + c) - m);
    return m + logf(block_sum(s, scratch));
}

// The target's logit, guarded: an out-of-range target has w = 0 and is never read.
template <typename T>
__device__ __forceinline__ float target_logit(const T* xr, i64 t, i64 vocab) {
    return (t >= 0 && t < vocab) ? load_f32(xr + t) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void ce_fwd_body(i64 rows, i64 vocab, const T* __restrict__ logits,
                                            const i64* __restrict__ targets,
                                            const float* __restrict__ w,
                                            const float* __restrict__ inv_total,
                                            float* __restrict__ lse, float* __restrict__ loss_rows) {
    __shared__ float scratch[32];
    const float scale = *inv_total;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = logits + r * vocab;
        const float l = row_lse(xr, vocab, scratch);
        if (threadIdx.x == 0) {
            const float wr = w[r];
            lse[r] = l;
            loss_rows[r] = wr != 0.0f ? wr * (l - target_logit(xr, targets[r], vocab)) * scale : 0.0f;
        }
    }
}

// dlogits for one row given its lse, scaled by `coef` = w · inv_total · dloss.
template <typename T>
__device__ __forceinline__ void ce_grad_row(const T* __restrict__ xr, T* __restrict__ dr, i64 vocab,
                                            i64 t, float l, float coef) {
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float p = expf(load_f32(xr + c) - l);
        store_f32(dr + c, coef != 0.0f ? (p - (c == t ? 1.0f : 0.0f)) * coef : 0.0f);
    }
}

template <typename T>
__device__ __forceinline__ void ce_bwd_body(i64 rows, i64 vocab, const T* __restrict__ logits,
                                            const i64* __restrict__ targets,
                                            const float* __restrict__ w,
                                            const float* __restrict__ inv_total,
                                            const float* __restrict__ lse,
                                            const float* __restrict__ dloss,
                                            T* __restrict__ dlogits) {
    const float scale = *inv_total * *dloss;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x)
        ce_grad_row(logits + r * vocab, dlogits + r * vocab, vocab, targets[r], lse[r], w[r] * scale);
}

template <typename T>
__device__ __forceinline__ void ce_fused_body(i64 rows, i64 vocab, const T* __restrict__ logits,
                                              const i64* __restrict__ targets,
                                              const float* __restrict__ w,
                                              const float* __restrict__ inv_total,
                                              float* __restrict__ lse, float* __restrict__ loss_rows,
                                              T* __restrict__ dlogits) {
    __shared__ float scratch[32];
    const float scale = *inv_total;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = logits + r * vocab;
        const float l = row_lse(xr, vocab, scratch);
        const float wr = w[r];
        const i64 t = targets[r];
        if (threadIdx.x == 0) {
            lse[r] = l;
            loss_rows[r] = wr != 0.0f ? wr * (l - target_logit(xr, t, vocab)) * scale : 0.0f;
        }
        ce_grad_row(xr, dlogits + r * vocab, vocab, t, l, wr * scale);
    }
}

#define CROSS_ENTROPY(T, tname)                                                                  \
    extern "C" __global__ void cross_entropy_fwd_##tname(                                        \
        i64 rows, i64 vocab, const T* __restrict__ logits, const i64* __restrict__ targets,      \
        const float* __restrict__ w, const float* __restrict__ inv_total, float* __restrict__ lse, \
        float* __restrict__ loss_rows) {                                                         \
        ce_fwd_body<T>(rows, vocab, logits, targets, w, inv_total, lse, loss_rows);              \
    }                                                                                            \
    extern "C" __global__ void cross_entropy_bwd_##tname(                                        \
        i64 rows, i64 vocab, const T* __restrict__ logits, const i64* __restrict__ targets,      \
        const float* __restrict__ w, const float* __restrict__ inv_total,                        \
        const float* __restrict__ lse, const float* __restrict__ dloss, T* __restrict__ dlogits) { \
        ce_bwd_body<T>(rows, vocab, logits, targets, w, inv_total, lse, dloss, dlogits);         \
    }                                                                                            \
    extern "C" __global__ void cross_entropy_fused_##tname(                                      \
        i64 rows, i64 vocab, const T* __restrict__ logits, const i64* __restrict__ targets,      \
        const float* __restrict__ w, const float* __restrict__ inv_total, float* __restrict__ lse, \
        float* __restrict__ loss_rows, T* __restrict__ dlogits) {                                \
        ce_fused_body<T>(rows, vocab, logits, targets, w, inv_total, lse, loss_rows, dlogits);   \
    }

CROSS_ENTROPY(float, f32)
CROSS_ENTROPY(bf16, bf16)
