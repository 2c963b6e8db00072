// flash_attention.cu: causal scaled-dot-product attention, forward and backward, in the
// flash-attention manner: keys and values stream through shared memory in tiles with an online
// softmax, so no T × T score matrix ever exists, in memory or anywhere else. f32 and bf16
// storage, f32 arithmetic; head dims 32, 64 and 128 (template instances).
//
// Reference: crates/tensor/src/ops/attention.rs (causal_attention and the composed
// causal_attention_reference) and cpu/attention.rs:
//   S = scale · Q·Kᵀ, query i (of Tq) at absolute position Tk - Tq + i sees keys 0..=that
//   position (Tq < Tk when decoding with a KV cache); P = softmax(S); O = P·V;
//   lse_i = log Σ_j exp(S_ij) is saved for the backward.
//   Backward: δ_i = Σ_d dO_id · O_id;  dP = dO·Vᵀ;  dS = P ∘ (dP - δ);
//             dQ = scale · dS·K;  dK = scale · dSᵀ·Q;  dV = Pᵀ·dO.
//
// Layouts: q, k, v, o, do are [B, H, T, D] tensors given by element strides over batch, head
// and time (AttnParams; d contiguous), so head-split views of a packed [B, T, 3, H, D] QKV
// activation need no copy. dq, dk, dv are written with the strides of q, k, v (a packed dQKV
// buffer with the QKV layout works). lse and delta are [B·H, Tq] f32, contiguous.
//
// This is the straightforward SIMT formulation (FMA units, not tensor cores): the reference
// the GPU tests hold a future mma.sync/wgmma version to. Thread layout: each query (forward,
// dQ) or key (dK/dV) row is owned by D/16 consecutive lanes, each holding 16 of its D values
// in registers; row dot products are finished with butterfly shuffles among those lanes.
//
// The backward is deterministic with no atomics: one kernel owns key tiles and accumulates
// dK, dV over queries; a second owns query tiles and accumulates dQ over keys (recomputing P,
// which costs one extra Q·Kᵀ and dO·Vᵀ pass instead of f32 atomics on dQ).
//
// Launch (R = rows per block = 64 for D ≤ 64, 32 for D = 128; threads = R · D / 16):
//   flash_attn_fwd_T_dD:      gridDim = (ceil(Tq / R), B·H), blockDim.x = R · D / 16
//   flash_attn_bwd_delta_T:   blockDim.x = 256 (8 warps, one row each),
//                             gridDim.x = ceil(B·H·Tq / 8)
//   flash_attn_bwd_dkdv_T_dD: gridDim = (ceil(Tk / R), B·H), blockDim.x = R · D / 16
//   flash_attn_bwd_dq_T_dD:   gridDim = (ceil(Tq / R), B·H), blockDim.x = R · D / 16
//   Static shared memory: 2 · R · D · 4 bytes (32 KB for D = 64 and 128) plus 2 · R floats.
//   B·H ≤ 65535 (gridDim.y). Tq ≤ Tk (the host checks).
//
// Entry points (T = f32 | bf16, D = 32 | 64 | 128):
//   flash_attn_fwd_T_dD(AttnParams p, q, k, v, o, lse)
//   flash_attn_bwd_delta_T(AttnParams p, D, o, do, delta)
//   flash_attn_bwd_dkdv_T_dD(AttnParams p, q, k, v, do, lse, delta, dk, dv)
//   flash_attn_bwd_dq_T_dD(AttnParams p, q, k, v, do, lse, delta, dq)

struct AttnParams {
    int B, H, Tq, Tk;
    i64 q_sb, q_sh, q_st;
    i64 k_sb, k_sh, k_st;
    i64 v_sb, v_sh, v_st;
    i64 o_sb, o_sh, o_st;     // o in the forward and the delta kernel
    i64 do_sb, do_sh, do_st;  // dO in the backward
    float scale;
};
static_assert(sizeof(AttnParams) == 144,
              "AttnParams must match crates/tensor/src/cuda/params.rs");

#define FA_DPT 16   // head-dim values per thread
#define FA_CHUNK 16 // keys per online-softmax update in the forward
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

template <int D>
struct FaCfg {
    static constexpr int TPR = D / FA_DPT;       // lanes per row
    static constexpr int R = D <= 64 ? 64 : 32;  // rows per block, and rows per streamed tile
    static constexpr int THREADS = R * TPR;
};

// Sum over the TPR consecutive lanes that share a row (TPR divides 32, so they share a warp).
template <int TPR>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <int N>
__device__ __forceinline__ float dot_n(const float* a, const float* b) {
    float s = 0.0f;
#pragma unroll
    for (int d = 0; d < N; ++d) s = fmaf(a[d], b[d], s);
    return s;
}

// Loads rows [row0, row0 + R) of one head ([T, D] with row stride st) into shared memory as
// f32 [R][D]; rows at or past `t_lim` read as zeros.
template <int D, int R, int THREADS, typename T>
__device__ __forceinline__ void load_rows(float* dst, const T* __restrict__ src, i64 st, int row0,
                                          int t_lim) {
    for (int e = threadIdx.x; e < R * D; e += THREADS) {
        const int r = e / D, c = e % D;
        const int t = row0 + r;
        dst[e] = t < t_lim ? load_f32(src + (i64)t * st + c) : 0.0f;
    }
}

// ---- forward --------------------------------------------------------------------------------

template <int D, typename T>
__device__ __forceinline__ void fa_fwd_body(const AttnParams& p, const T* __restrict__ q,
                                            const T* __restrict__ k, const T* __restrict__ v,
                                            T* __restrict__ o, float* __restrict__ lse) {
    using C = FaCfg<D>;
    constexpr int R = C::R, TPR = C::TPR;
    __shared__ __align__(16) float Ks[R * D];
    __shared__ __align__(16) float Vs[R * D];

    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
    const int row = threadIdx.x / TPR, d0 = (threadIdx.x % TPR) * FA_DPT;
    const int i0 = blockIdx.x * R, i = i0 + row;
    const bool active = i < p.Tq;
    const int shift = p.Tk - p.Tq;  // absolute position of query i is i + shift
    const T* kb = k + b * p.k_sb + h * p.k_sh;
    const T* vb = v + b * p.v_sb + h * p.v_sh;

    // The query slice, pre-scaled so that scores come out in log2 units (exp2 below).
    float qr[FA_DPT], acc[FA_DPT];
    const T* qp = q + b * p.q_sb + h * p.q_sh + (i64)i * p.q_st + d0;
#pragma unroll
    for (int d = 0; d < FA_DPT; ++d) {
        qr[d] = active ? load_f32(qp + d) * (p.scale * LOG2E) : 0.0f;
        acc[d] = 0.0f;
    }
    float m = neg_inf(), l = 0.0f;

    // Keys up to the last position any row of this block can see.
    const int last_key = min(i0 + R, p.Tq) - 1 + shift;
    for (int j0 = 0; j0 <= last_key; j0 += R) {
        __syncthreads();  // the previous tile is no longer read
        load_rows<D, R, C::THREADS>(Ks, kb, p.k_st, j0, p.Tk);
        load_rows<D, R, C::THREADS>(Vs, vb, p.v_st, j0, p.Tk);
        __syncthreads();

        // The tile in chunks of FA_CHUNK keys, each with its own online-softmax update: a
        // score array of FA_CHUNK registers instead of R keeps the kernel at two blocks per SM.
#pragma unroll 1
        for (int c0 = 0; c0 < R; c0 += FA_CHUNK) {
            float s[FA_CHUNK];
            float m_chunk = neg_inf();
#pragma unroll
            for (int j = 0; j < FA_CHUNK; ++j) {
                float x = row_sum<TPR>(dot_n<FA_DPT>(qr, Ks + (c0 + j) * D + d0));
                const int key = j0 + c0 + j;
                x = (key <= i + shift && key < p.Tk) ? x : neg_inf();
                s[j] = x;
                m_chunk = fmaxf(m_chunk, x);
            }
            // The first chunk holds key 0, which every query sees, so m is finite from then
            // on and exp2(m - m_new) never meets inf - inf.
            const float m_new = fmaxf(m, m_chunk);
            const float alpha = exp2f(m - m_new);
            l *= alpha;
#pragma unroll
            for (int d = 0; d < FA_DPT; ++d) acc[d] *= alpha;
#pragma unroll
            for (int j = 0; j < FA_CHUNK; ++j) {
                const float pj = exp2f(s[j] - m_new);
                l += pj;
                const float* vr = Vs + (c0 + j) * D + d0;
#pragma unroll
                for (int d = 0; d < FA_DPT; ++d) acc[d] = fmaf(pj, vr[d], acc[d]);
            }
            m = m_new;
        }
    }

    if (active) {
        const float inv = 1.0f / l;
        T* op = o + b * p.o_sb + h * p.o_sh + (i64)i * p.o_st + d0;
#pragma unroll
        for (int d = 0; d < FA_DPT; ++d) store_f32(op + d, acc[d] * inv);
        if (d0 == 0) lse[(i64)bh * p.Tq + i] = (m + log2f(l)) * LN2;
    }
}

// ---- backward: delta = rowsum(dO ∘ O) ------------------------------------------------------

template <typename T>
__device__ __forceinline__ void fa_delta_body(const AttnParams& p, int D, const T* __restrict__ o,
                                              const T* __restrict__ dout, float* __restrict__ delta) {
    const i64 rows = (i64)p.B * p.H * p.Tq;
    const i64 r = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;  // whole warps exit together
    const int lane = threadIdx.x & 31;
    const int i = (int)(r % p.Tq);
    const int bh = (int)(r / p.Tq), b = bh / p.H, h = bh % p.H;
    const T* op = o + b * p.o_sb + h * p.o_sh + (i64)i * p.o_st;
    const T* gp = dout + b * p.do_sb + h * p.do_sh + (i64)i * p.do_st;
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += load_f32(op + d) * load_f32(gp + d);
    s = warp_sum(s);
    if (lane == 0) delta[r] = s;
}

// ---- backward: dK, dV (one block per key tile) ----------------------------------------------

template <int D, typename T>
__device__ __forceinline__ void fa_dkdv_body(const AttnParams& p, const T* __restrict__ q,
                                             const T* __restrict__ k, const T* __restrict__ v,
                                             const T* __restrict__ dout, const float* __restrict__ lse,
                                             const float* __restrict__ delta, T* __restrict__ dk,
                                             T* __restrict__ dv) {
    using C = FaCfg<D>;
    constexpr int R = C::R, TPR = C::TPR;
    __shared__ __align__(16) float Qs[R * D];
    __shared__ __align__(16) float Gs[R * D];  // dO tile
    __shared__ float Ls[R], Ds[R];

    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
    const int row = threadIdx.x / TPR, d0 = (threadIdx.x % TPR) * FA_DPT;
    const int j0 = blockIdx.x * R, j = j0 + row;
    const bool active = j < p.Tk;
    const int shift = p.Tk - p.Tq;
    const T* qb = q + b * p.q_sb + h * p.q_sh;
    const T* gb = dout + b * p.do_sb + h * p.do_sh;
    const float* lb = lse + (i64)bh * p.Tq;
    const float* db = delta + (i64)bh * p.Tq;

    float kr[FA_DPT], vr[FA_DPT], dkr[FA_DPT], dvr[FA_DPT];
    const i64 koff = b * p.k_sb + h * p.k_sh + (i64)j * p.k_st + d0;
    const i64 voff = b * p.v_sb + h * p.v_sh + (i64)j * p.v_st + d0;
#pragma unroll
    for (int d = 0; d < FA_DPT; ++d) {
        kr[d] = active ? load_f32(k + koff + d) : 0.0f;
        vr[d] = active ? load_f32(v + voff + d) : 0.0f;
        dkr[d] = 0.0f;
        dvr[d] = 0.0f;
    }

    // The first query that sees key j0 sits at position j0: query index j0 - shift.
    const int i_first = max(0, j0 - shift);
    for (int i0 = i_first; i0 < p.Tq; i0 += R) {
        __syncthreads();
        load_rows<D, R, C::THREADS>(Qs, qb, p.q_st, i0, p.Tq);
        load_rows<D, R, C::THREADS>(Gs, gb, p.do_st, i0, p.Tq);
        for (int e = threadIdx.x; e < R; e += C::THREADS) {
            const bool in = i0 + e < p.Tq;
            Ls[e] = in ? lb[i0 + e] : 0.0f;
            Ds[e] = in ? db[i0 + e] : 0.0f;
        }
        __syncthreads();
        // Unrolling this loop further only raises register pressure (each step holds a Q row
        // and a dO row slice); two steps let loads of the next overlap the current.
#pragma unroll 2
        for (int r = 0; r < R; ++r) {
            const int i = i0 + r;
            const float* qi = Qs + r * D + d0;
            const float* gi = Gs + r * D + d0;
            // Every lane of the row computes the same full dot products, so the branch below
            // is uniform within the row.
            const float sdot = row_sum<TPR>(dot_n<FA_DPT>(qi, kr));
            const float dpv = row_sum<TPR>(dot_n<FA_DPT>(gi, vr));
            const bool visible = active && i < p.Tq && j <= i + shift;
            const float pij = visible ? expf(sdot * p.scale - Ls[r]) : 0.0f;
            const float ds = pij * (dpv - Ds[r]);
#pragma unroll
            for (int d = 0; d < FA_DPT; ++d) {
                dvr[d] = fmaf(pij, gi[d], dvr[d]);
                dkr[d] = fmaf(ds, qi[d], dkr[d]);
            }
        }
    }
    if (active) {
#pragma unroll
        for (int d = 0; d < FA_DPT; ++d) {
            store_f32(dk + koff + d, dkr[d] * p.scale);
            store_f32(dv + voff + d, dvr[d]);
        }
    }
}

// ---- backward: dQ (one block per query tile) -----------------------------------------------

template <int D, typename T>
__device__ __forceinline__ void fa_dq_body(const AttnParams& p, const T* __restrict__ q,
                                           const T* __restrict__ k, const T* __restrict__ v,
                                           const T* __restrict__ dout, const float* __restrict__ lse,
                                           const float* __restrict__ delta, T* __restrict__ dq) {
    using C = FaCfg<D>;
    constexpr int R = C::R, TPR = C::TPR;
    __shared__ __align__(16) float Ks[R * D];
    __shared__ __align__(16) float Vs[R * D];

    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
    const int row = threadIdx.x / TPR, d0 = (threadIdx.x % TPR) * FA_DPT;
    const int i0 = blockIdx.x * R, i = i0 + row;
    const bool active = i < p.Tq;
    const int shift = p.Tk - p.Tq;
    const T* kb = k + b * p.k_sb + h * p.k_sh;
    const T* vb = v + b * p.v_sb + h * p.v_sh;

    float qr[FA_DPT], gr[FA_DPT], dqr[FA_DPT];
    const i64 qoff = b * p.q_sb + h * p.q_sh + (i64)i * p.q_st + d0;
    const i64 goff = b * p.do_sb + h * p.do_sh + (i64)i * p.do_st + d0;
#pragma unroll
    for (int d = 0; d < FA_DPT; ++d) {
        qr[d] = active ? load_f32(q + qoff + d) : 0.0f;
        gr[d] = active ? load_f32(dout + goff + d) : 0.0f;
        dqr[d] = 0.0f;
    }
    const float li = active ? lse[(i64)bh * p.Tq + i] : 0.0f;
    const float di = active ? delta[(i64)bh * p.Tq + i] : 0.0f;

    const int last_key = min(i0 + R, p.Tq) - 1 + shift;
    for (int j0 = 0; j0 <= last_key; j0 += R) {
        __syncthreads();
        load_rows<D, R, C::THREADS>(Ks, kb, p.k_st, j0, p.Tk);
        load_rows<D, R, C::THREADS>(Vs, vb, p.v_st, j0, p.Tk);
        __syncthreads();
#pragma unroll 2
        for (int jj = 0; jj < R; ++jj) {
            const int j = j0 + jj;
            const float* kj = Ks + jj * D + d0;
            const float sdot = row_sum<TPR>(dot_n<FA_DPT>(qr, kj));
            const float dpv = row_sum<TPR>(dot_n<FA_DPT>(gr, Vs + jj * D + d0));
            const bool visible = active && j < p.Tk && j <= i + shift;
            const float pij = visible ? expf(sdot * p.scale - li) : 0.0f;
            const float ds = pij * (dpv - di);
#pragma unroll
            for (int d = 0; d < FA_DPT; ++d) dqr[d] = fmaf(ds, kj[d], dqr[d]);
        }
    }
    if (active) {
#pragma unroll
        for (int d = 0; d < FA_DPT; ++d) store_f32(dq + qoff + d, dqr[d] * p.scale);
    }
}

// ---- entry points ---------------------------------------------------------------------------

#define FA_KERNELS(T, tname, D)                                                                    \
    extern "C" __global__ void __launch_bounds__(FaCfg<D>::THREADS) flash_attn_fwd_##tname##_d##D(  \
        AttnParams p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,    \
        T* __restrict__ o, float* __restrict__ lse) {                                              \
        fa_fwd_body<D, T>(p, q, k, v, o, lse);                                                     \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(FaCfg<D>::THREADS) flash_attn_bwd_dkdv_##tname##_d##D( \
        AttnParams p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,    \
        const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, \
        T* __restrict__ dk, T* __restrict__ dv) {                                                  \
        fa_dkdv_body<D, T>(p, q, k, v, dout, lse, delta, dk, dv);                                  \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(FaCfg<D>::THREADS) flash_attn_bwd_dq_##tname##_d##D( \
        AttnParams p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,    \
        const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, \
        T* __restrict__ dq) {                                                                      \
        fa_dq_body<D, T>(p, q, k, v, dout, lse, delta, dq);                                        \
    }

#define FA_ALL_D(T, tname) FA_KERNELS(T, tname, 32) FA_KERNELS(T, tname, 64) FA_KERNELS(T, tname, 128)

FA_ALL_D(float, f32)
FA_ALL_D(bf16, bf16)

// The delta kernel reads D at run time (it is a plain row dot product).
extern "C" __global__ void flash_attn_bwd_delta_f32(AttnParams p, int D, const float* __restrict__ o,
                                                    const float* __restrict__ dout,
                                                    float* __restrict__ delta) {
    fa_delta_body<float>(p, D, o, dout, delta);
}
extern "C" __global__ void flash_attn_bwd_delta_bf16(AttnParams p, int D, const bf16* __restrict__ o,
                                                     const bf16* __restrict__ dout,
                                                     float* __restrict__ delta) {
    fa_delta_body<bf16>(p, D, o, dout, delta);
}
