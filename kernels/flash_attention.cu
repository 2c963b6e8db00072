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
// Two formulations. The SIMT kernels (FMA units; f32 and bf16; forward and backward) are the
// straightforward one: each query (forward, dQ) or key (dK/dV) row is owned by D/16 consecutive
// lanes, each holding 16 of its D values in registers; row dot products are finished with
// butterfly shuffles among those lanes. flash_attn_fwd_mma_bf16_* is the forward on the tensor
// cores (mma.sync, described above its code); the GPU tests hold it to the SIMT forward and
// the CPU reference. flash_attn_bwd_{dkdv,dq}_mma_bf16_* are its backward (end of this file).
//
// Dropout on the probabilities (p.drop_threshold != 0) is fused into every kernel: element
// (head bh0 + bh, query i, key j; bh: blockIdx.y, blockIdx.x in the tensor-core kernels) survives iff its hash bits (fa_drop_bits, the function
// of crates/tensor/src/cpu/attention/dropout.rs, bit for bit) are ≥ drop_threshold, and is then
// scaled by drop_scale = 1/(1-p). The forward's running sum l takes the undropped P (the
// normaliser and lse are dropout-free) and O accumulates (P ∘ Z)·V; the backward re-derives Z:
// dV = (P ∘ Z)ᵀ·dO, dP = Z ∘ (dO·Vᵀ), dS = P ∘ (dP - δ) with δ = rowsum(dO ∘ O) unchanged.
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
//   flash_attn_fwd_mma_bf16_d{64,128}(AttnParams p, q, k, v, o, lse)   (launch: see its code)
//   flash_attn_bwd_delta_T(AttnParams p, D, o, do, delta)
//   flash_attn_bwd_dkdv_T_dD(AttnParams p, q, k, v, do, lse, delta, dk, dv)
//   flash_attn_bwd_dq_T_dD(AttnParams p, q, k, v, do, lse, delta, dq)
//   flash_attn_bwd_dkdv_mma_bf16_d{64,128}(AttnParams p, q, k, v, do, lse, delta, dk, dv)
//   flash_attn_bwd_dq_mma_bf16_d{64,128}(AttnParams p, q, k, v, do, lse, delta, dq)
//                                                                 (launch: see their code)

typedef unsigned long long u64;

struct AttnParams {
    int B, H, Tq, Tk;
    i64 q_sb, q_sh, q_st;
    i64 k_sb, k_sh, k_st;
    i64 v_sb, v_sh, v_st;
    i64 o_sb, o_sh, o_st;     // o in the forward and the delta kernel
    i64 do_sb, do_sh, do_st;  // dO in the backward
    float scale;
    u32 drop_threshold;       // dropout: hash bits below this drop the element; 0: no dropout
    u64 drop_seed;
    int bh0;                  // head index (b·H + h) of this launch's first head
    float drop_scale;         // 1/(1-p), the survivors' factor
};
static_assert(sizeof(AttnParams) == 160,
              "AttnParams must match crates/tensor/src/cuda/params.rs");

// ---- dropout hash (crates/tensor/src/cpu/attention/dropout.rs) ------------------------------

__device__ __forceinline__ u64 fa_mix64(u64 z) {  // SplitMix64's finaliser
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ u32 fa_fmix32(u32 x) {  // MurmurHash3's finaliser
    x ^= x >> 16;
    x *= 0x85ebca6bu;
    x ^= x >> 13;
    x *= 0xc2b2ae35u;
    return x ^ (x >> 16);
}

// The hash key of query row i of this launch's head `bh`: low and high words.
struct FaDropRow {
    u32 lo, hi;
};

__device__ __forceinline__ FaDropRow fa_drop_row(const AttnParams& p, int bh, int i) {
    const u64 head = (u64)(u32)(p.bh0 + bh);
    const u64 key = fa_mix64(p.drop_seed ^ fa_mix64((head << 32) | (u64)(u32)i));
    return {(u32)key, (u32)(key >> 32)};
}

// Whether element (row, key j) survives dropout.
__device__ __forceinline__ bool fa_drop_keeps(const AttnParams& p, FaDropRow r, int j) {
    return fa_fmix32(r.lo ^ fa_fmix32((u32)j ^ r.hi)) >= p.drop_threshold;
}

// Element (row, key j)'s dropout factor: 0 when dropped, else drop_scale. Callers skip it
// when p.drop_threshold == 0 (then nothing drops and no factor applies).
__device__ __forceinline__ float fa_drop_factor(const AttnParams& p, FaDropRow r, int j) {
    return fa_drop_keeps(p, r, j) ? p.drop_scale : 0.0f;
}

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
    const bool dropping = p.drop_threshold != 0;
    // Computed either way (once per thread): making it conditional made ptxas spill the
    // D = 32 instance on sm_90.
    const FaDropRow dr = fa_drop_row(p, bh, i);

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
                float pj = exp2f(s[j] - m_new);
                l += pj;
                if (dropping) pj *= fa_drop_factor(p, dr, j0 + c0 + j);
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

// ---- forward on the tensor cores (bf16) ------------------------------------------------------
//
// FlashAttention-2 style: 4 warps, each owning 16 of the block's 64 query rows. Q stays in
// registers as mma A fragments for the whole kernel; per key tile, S = Q·Kᵀ is computed with
// mma.sync into accumulator fragments (K from shared memory through ldmatrix, K stored [key][d]
// is the "col" operand directly), masked and exponentiated in registers with the online
// softmax, converted to bf16 and reused in place as the A fragments of O += P·V (V stored
// [key][d] is read with ldmatrix.trans). A C fragment of two adjacent n8 tiles has exactly the
// register layout of one m16k16 A fragment, which is what makes that reuse free.
// Each thread holds rows g and g + 8 of its warp's 16; a row's max and sum combine across the
// 4 lanes of a quad (shuffles xor 1 and 2).
//
// Requirements (the host checks them and otherwise uses the SIMT kernels): q, k, v, o
// 16-byte aligned with time strides and batch/head strides multiples of 8 elements.
// Launch: gridDim = (B·H, ceil(Tq / 64)) (fa_block), blockDim.x = 128; static shared memory: Q 64 × D,
// K and V BC × D bf16 (BC = 64 for D = 64, 32 for D = 128), rows padded by 16 bytes:
// 27 KB (D = 64) / 34 KB (D = 128).
// Entry points: flash_attn_fwd_mma_bf16_d{64,128}(AttnParams p, q, k, v, o, lse)

#define FAM_BR 64
#define FAM_THREADS 128

// The tile (of FAM_BR queries or keys) and the head (0..B·H of this launch) a block of the
// tensor-core kernels owns. Their grid is (B·H, tiles): blocks start in linear order
// (blockIdx.x fastest), so every head's tile of one rank starts before any head's next, and
// the tiles are counted from the last when `from_last`. Under the causal mask a query tile's
// work grows with its index (the forward, dQ: from_last) and a key tile's shrinks (dK/dV), so
// the heaviest tiles of all heads start first and the light ones fill the tail of the launch.
// Both come from special registers, which the compiler re-reads rather than keep in registers.
struct FaBlock {
    int tile, bh;
};
__device__ __forceinline__ FaBlock fa_block(bool from_last) {
    return {from_last ? (int)(gridDim.y - 1 - blockIdx.y) : (int)blockIdx.y, (int)blockIdx.x};
}

// Rows [row0, row0 + ROWS) of one head ([T, D] bf16, row stride st) into shared memory
// (row stride D + 8), 16 bytes per copy; rows at or past t_lim are zeros.
template <int D, int ROWS>
__device__ __forceinline__ void fam_load_rows(bf16* dst, const bf16* __restrict__ src, i64 st, int row0,
                                              int t_lim) {
    constexpr int CPR = D / 8, SLD = D + 8;
    for (int ch = threadIdx.x; ch < ROWS * CPR; ch += FAM_THREADS) {
        const int r = ch / CPR, c = (ch % CPR) * 8;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < t_lim) val = *reinterpret_cast<const uint4*>(src + (i64)(row0 + r) * st + c);
        *reinterpret_cast<uint4*>(dst + r * SLD + c) = val;
    }
}

// As fam_load_rows, through cp.async (16-byte copies land at the cp_async_wait that covers
// them); the zero rows past t_lim are plain stores, done at once.
template <int D, int ROWS>
__device__ __forceinline__ void fam_load_rows_async(bf16* dst, const bf16* __restrict__ src, i64 st, int row0,
                                                    int t_lim) {
    constexpr int CPR = D / 8, SLD = D + 8;
    for (int ch = threadIdx.x; ch < ROWS * CPR; ch += FAM_THREADS) {
        const int r = ch / CPR, c = (ch % CPR) * 8;
        if (row0 + r < t_lim)
            cp_async16(dst + r * SLD + c, src + (i64)(row0 + r) * st + c);
        else
            *reinterpret_cast<uint4*>(dst + r * SLD + c) = make_uint4(0u, 0u, 0u, 0u);
    }
}

template <int D>
__device__ __forceinline__ void fa_fwd_mma_body(const AttnParams& p, const bf16* __restrict__ q,
                                                const bf16* __restrict__ k, const bf16* __restrict__ v,
                                                bf16* __restrict__ o, float* __restrict__ lse) {
    constexpr int BC = D == 128 ? 32 : 64;  // keys per tile
    constexpr int SLD = D + 8;
    constexpr int KD = D / 16;   // k-steps over the head dim (Q·Kᵀ)
    constexpr int NS = BC / 8;   // n8 tiles of scores per warp
    constexpr int KS = BC / 16;  // k-steps over keys (P·V)
    constexpr int ND = D / 8;    // n8 tiles of the output per warp
    // K and V tiles in two stages (K rows, then V rows): the next tile's copies are in flight
    // while this one is multiplied. Stage 1 at D = 128 is the Q staging buffer, free once Q is
    // in registers (the first loop barrier sees every warp past its Q fragment loads); at
    // D = 64 it has its own array (45 KB in all).
    __shared__ __align__(16) bf16 Qs[FAM_BR * SLD];
    __shared__ __align__(16) bf16 KV0[2 * BC * SLD];
    __shared__ __align__(16) bf16 KV1[D == 128 ? 8 : 2 * BC * SLD];
    static_assert(D != 128 || FAM_BR * SLD == 2 * BC * SLD, "stage 1 is the Q buffer at D = 128");
    bf16* const stage1 = D == 128 ? Qs : KV1;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, mat = lane >> 3, r8 = lane & 7;
    const FaBlock blk = fa_block(true);
    const int bh = blk.bh, b = bh / p.H, h = bh % p.H;
    const int i0 = blk.tile * FAM_BR;
    const int shift = p.Tk - p.Tq;
    const bf16* kb = k + b * p.k_sb + h * p.k_sh;
    const bf16* vb = v + b * p.v_sb + h * p.v_sh;

    fam_load_rows<D, FAM_BR>(Qs, q + b * p.q_sb + h * p.q_sh, p.q_st, i0, p.Tq);
    __syncthreads();
    u32 qf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; ++kk)
        ldmatrix_x4<false>(qf[kk], Qs + (warp * 16 + (lane & 15)) * SLD + kk * 16 + (lane >> 4) * 8);

    // This thread's two rows (g and g + 8 of the warp's 16) as query indices.
    const int row_lo = i0 + warp * 16 + g, row_hi = row_lo + 8;
    const float sl2 = p.scale * LOG2E;  // scores in log2 units
    float m_lo = neg_inf(), m_hi = neg_inf(), l_lo = 0.0f, l_hi = 0.0f;
    const bool dropping = p.drop_threshold != 0;
    FaDropRow dr_lo = {0u, 0u}, dr_hi = {0u, 0u};
    if (dropping) dr_lo = fa_drop_row(p, bh, row_lo), dr_hi = fa_drop_row(p, bh, row_hi);
    float acc[ND][4];
#pragma unroll
    for (int j = 0; j < ND; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

    const int last_key = min(i0 + FAM_BR, p.Tq) - 1 + shift;
    const int n_tiles = last_key / BC + 1;
    auto issue = [&](int tile) {
        bf16* kv = (tile & 1) ? stage1 : KV0;
        fam_load_rows_async<D, BC>(kv, kb, p.k_st, tile * BC, p.Tk);
        fam_load_rows_async<D, BC>(kv + BC * SLD, vb, p.v_st, tile * BC, p.Tk);
    };
    issue(0);
    cp_async_commit();
    for (int it = 0; it < n_tiles; ++it) {
        const int j0 = it * BC;
        if (it + 1 < n_tiles) {
            __syncthreads();  // the stage tile it + 1 goes to (tile it - 1's, or Q's) is no longer read
            issue(it + 1);
        }
        cp_async_commit();  // possibly empty: keeps the wait count uniform
        cp_async_wait<1>(); // this thread's copies of tile it have landed
        __syncthreads();    // ... and every thread's
        const bf16* Ks = (it & 1) ? stage1 : KV0;
        const bf16* Vs = Ks + BC * SLD;

        // S = Q·Kᵀ for this warp's 16 rows and the tile's BC keys.
        float s[NS][4];
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
            for (int j = 0; j < NS; j += 2) {
                u32 r[4];
                ldmatrix_x4<false>(r, Ks + (j * 8 + r8 + (mat >> 1) * 8) * SLD + kk * 16 + (mat & 1) * 8);
                mma_bf16_16816(s[j], qf[kk], r[0], r[1]);
                mma_bf16_16816(s[j + 1], qf[kk], r[2], r[3]);
            }
        }

        // Mask (only a tile the block's first row cannot wholly see: the diagonal one; a tile
        // it sees ends at or before key i0 + shift < Tk), scale to log2 units, and the tile's
        // row maxima.
        if (j0 + BC - 1 > i0 + shift) {
#pragma unroll
            for (int j = 0; j < NS; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = j0 + j * 8 + 2 * t + (e & 1);
                    const int row = e < 2 ? row_lo : row_hi;
                    if (!(key <= row + shift && key < p.Tk)) s[j][e] = neg_inf();
                }
        }
        float mt_lo = neg_inf(), mt_hi = neg_inf();
#pragma unroll
        for (int j = 0; j < NS; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float x = s[j][e] * sl2;  // -inf stays -inf (sl2 > 0)
                s[j][e] = x;
                if (e < 2) mt_lo = fmaxf(mt_lo, x); else mt_hi = fmaxf(mt_hi, x);
            }
        }
        mt_lo = fmaxf(mt_lo, __shfl_xor_sync(0xffffffffu, mt_lo, 1));
        mt_lo = fmaxf(mt_lo, __shfl_xor_sync(0xffffffffu, mt_lo, 2));
        mt_hi = fmaxf(mt_hi, __shfl_xor_sync(0xffffffffu, mt_hi, 1));
        mt_hi = fmaxf(mt_hi, __shfl_xor_sync(0xffffffffu, mt_hi, 2));
        // Tile 0 holds key 0, visible to every query (rows past Tq have zero Q and see it too),
        // so the maxima are finite from the first tile on: no inf - inf below.
        const float mn_lo = fmaxf(m_lo, mt_lo), mn_hi = fmaxf(m_hi, mt_hi);
        const float a_lo = exp2f(m_lo - mn_lo), a_hi = exp2f(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        l_lo *= a_lo;
        l_hi *= a_hi;
#pragma unroll
        for (int j = 0; j < ND; ++j) {
            acc[j][0] *= a_lo;
            acc[j][1] *= a_lo;
            acc[j][2] *= a_hi;
            acc[j][3] *= a_hi;
        }

        // P = exp2(S - m), summed per thread (the quad sum waits until the end), packed as bf16
        // A fragments: keys 16kk..16kk+15 are score tiles 2kk (a0, a1) and 2kk + 1 (a2, a3).
        u32 pf[KS][4];
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const float* sj = s[2 * kk + half];
                float p0 = exp2f(sj[0] - m_lo), p1 = exp2f(sj[1] - m_lo);
                float p2 = exp2f(sj[2] - m_hi), p3 = exp2f(sj[3] - m_hi);
                l_lo += p0 + p1;
                l_hi += p2 + p3;
                if (dropping) {  // after the sums: the normaliser is the undropped one
                    const int key = j0 + (2 * kk + half) * 8 + 2 * t;
                    p0 *= fa_drop_factor(p, dr_lo, key);
                    p1 *= fa_drop_factor(p, dr_lo, key + 1);
                    p2 *= fa_drop_factor(p, dr_hi, key);
                    p3 *= fa_drop_factor(p, dr_hi, key + 1);
                }
                pf[kk][2 * half] = pack_bf16x2(p0, p1);
                pf[kk][2 * half + 1] = pack_bf16x2(p2, p3);
            }
        }

        // O += P·V.
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
            for (int j = 0; j < ND; j += 2) {
                u32 r[4];
                ldmatrix_x4<true>(r, Vs + (kk * 16 + r8 + (mat & 1) * 8) * SLD + j * 8 + (mat >> 1) * 8);
                mma_bf16_16816(acc[j], pf[kk], r[0], r[1]);
                mma_bf16_16816(acc[j + 1], pf[kk], r[2], r[3]);
            }
        }
    }

    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    const float inv_lo = 1.0f / l_lo, inv_hi = 1.0f / l_hi;
    bf16* ob = o + b * p.o_sb + h * p.o_sh;
#pragma unroll
    for (int j = 0; j < ND; ++j) {
        const int d = j * 8 + 2 * t;
        if (row_lo < p.Tq)
            *reinterpret_cast<u32*>(ob + (i64)row_lo * p.o_st + d) = pack_bf16x2(acc[j][0] * inv_lo, acc[j][1] * inv_lo);
        if (row_hi < p.Tq)
            *reinterpret_cast<u32*>(ob + (i64)row_hi * p.o_st + d) = pack_bf16x2(acc[j][2] * inv_hi, acc[j][3] * inv_hi);
    }
    if (t == 0) {
        if (row_lo < p.Tq) lse[(i64)bh * p.Tq + row_lo] = (m_lo + log2f(l_lo)) * LN2;
        if (row_hi < p.Tq) lse[(i64)bh * p.Tq + row_hi] = (m_hi + log2f(l_hi)) * LN2;
    }
}

extern "C" __global__ void __launch_bounds__(FAM_THREADS) flash_attn_fwd_mma_bf16_d64(
    AttnParams p, const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    bf16* __restrict__ o, float* __restrict__ lse) {
    fa_fwd_mma_body<64>(p, q, k, v, o, lse);
}
extern "C" __global__ void __launch_bounds__(FAM_THREADS) flash_attn_fwd_mma_bf16_d128(
    AttnParams p, const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    bf16* __restrict__ o, float* __restrict__ lse) {
    fa_fwd_mma_body<128>(p, q, k, v, o, lse);
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
    __shared__ FaDropRow Zs[R];  // the tile's query rows' dropout keys

    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
    const int row = threadIdx.x / TPR, d0 = (threadIdx.x % TPR) * FA_DPT;
    const int j0 = blockIdx.x * R, j = j0 + row;
    const bool dropping = p.drop_threshold != 0;
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
            if (dropping) Zs[e] = fa_drop_row(p, bh, i0 + e);
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
            const float z = dropping ? fa_drop_factor(p, Zs[r], j) : 1.0f;
            const float ds = pij * (z * dpv - Ds[r]);
            const float pz = pij * z;
#pragma unroll
            for (int d = 0; d < FA_DPT; ++d) {
                dvr[d] = fmaf(pz, gi[d], dvr[d]);
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
    const bool dropping = p.drop_threshold != 0;
    const FaDropRow dr = dropping ? fa_drop_row(p, bh, i) : FaDropRow{0u, 0u};

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
            const float z = dropping ? fa_drop_factor(p, dr, j) : 1.0f;
            const float ds = pij * (z * dpv - di);
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

// ---- backward on the tensor cores (bf16) ----------------------------------------------------
//
// The counterpart of flash_attn_fwd_mma_bf16_*: the SIMT backward's maths and split (one kernel
// owns key tiles and accumulates dK, dV over queries, a second owns query tiles and accumulates
// dQ over keys; no atomics), with every product on mma.sync m16n8k16 (bf16 operands, f32
// accumulators). P and dS are computed in f32 from lse (the forward's) and δ
// (flash_attn_bwd_delta_bf16, run first) and rounded to bf16 only where they become mma
// operands. Both kernels use 4 warps (128 threads), shared memory rows padded by 16 bytes (the
// forward's fam_load_rows), and the forward's fragment conventions: a C fragment of two
// adjacent n8 tiles is an m16k16 A fragment, so P and dS go from accumulators to operands
// without leaving registers.
//
// dK/dV (flash_attn_bwd_dkdv_mma_bf16_dD): a block owns 64 keys, each warp 16 of them; the
// block's K and V rows stay in shared memory for the whole kernel (each warp reads its 16 as A
// fragments). The warp works on the transposed problem, keys as rows: per chunk of QC queries
// of a BRQ-query tile (Q, dO, lse and δ of the tile in shared memory),
//   Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ      Q and dO, stored [query][d], are the "col" B operand as
//                                  they stand (ldmatrix);
//   Pᵀ = exp(scale·Sᵀ - lse), dSᵀ = Pᵀ ∘ (dPᵀ - δ)   in f32, lse and δ per column (query);
//   dV += Pᵀ·dO and dK += dSᵀ·Q     Pᵀ, dSᵀ reused as A fragments; dO and Q, stored
//                                  [query][d] = [k][n], through ldmatrix.trans.
// Keys as rows is what lets dK and dV accumulate in registers with no fragment transposes. A
// warp skips the chunks its keys cannot see (the causal triangle) and those past Tq. The query
// loop starts at the first query that sees the block's first key, as in the SIMT kernel.
// Registers: the dK and dV accumulators are D floats per thread (128 at D = 128). Holding K
// and V fragments in registers as well (another D/2) left ptxas spilling at D = 128, so they
// are read from shared memory per chunk (one ldmatrix.x4 each per 16 dims: about 1 in 5 of the
// kernel's ldmatrix at D = 64, 1 in 3 at D = 128), which costs the shared memory that limits
// the query tile to BRQ = 16 rows at D = 128. D = 64: BRQ = QC = 32 in two stages, the next
// tile's Q and dO copied with cp.async while this one is multiplied (K and V ride in the first
// tile's group); D = 128: BRQ = QC = 16 in one stage (a second does not fit the 48 KB of static
// shared memory): copied, waited for, multiplied.
//
// dQ (flash_attn_bwd_dq_mma_bf16_dD): the forward's shape. A block owns 64 queries, each warp
// 16, with Q and dO in registers as A fragments; per key tile of BC keys (K, V in shared memory)
//   S = Q·Kᵀ and dP = dO·Vᵀ         K, V stored [key][d]: B operands through ldmatrix;
//   P, dS as above, lse and δ per row (two rows per thread, held in registers);
//   dQ += dS·K                      dS reused as the A fragment, K ([key][d] = [k][n]) through
//                                  ldmatrix.trans.
// A warp skips the mma work of tiles past its last row's diagonal and of rows past Tq (it still
// loads its share of every tile and meets every barrier). BC = 64 (D = 64) or 32 (D = 128).
//
// Requirements: the mma forward's (the host checks every operand: q, k, v, o, dO, dq, dk, dv
// 16-byte aligned, batch/head/time strides multiples of 8 elements).
// Launch: blockDim.x = 128 for both;
//   flash_attn_bwd_dkdv_mma_bf16_dD: gridDim = (B·H, ceil(Tk / 64)) (fa_block)
//   flash_attn_bwd_dq_mma_bf16_dD:   gridDim = (B·H, ceil(Tq / 64))
// Static shared memory (bf16 rows of D + 8):
//   dK/dV: K and V 64 rows each, per stage Q and dO tiles BRQ rows each, lse and δ BRQ floats
//          each, the queries' dropout keys BRQ × 8 bytes: 37 KB (D = 64, two stages) /
//          42.8 KB (D = 128, one);
//   dQ:    K and V tiles BC rows each (together they stage Q, then dO, first):
//          18 KB (D = 64) / 17 KB (D = 128).
// Entry points:
//   flash_attn_bwd_dkdv_mma_bf16_d{64,128}(AttnParams p, q, k, v, do, lse, delta, dk, dv)
//   flash_attn_bwd_dq_mma_bf16_d{64,128}(AttnParams p, q, k, v, do, lse, delta, dq)

template <int D>
struct FabCfg {
    static constexpr int SLD = D + 8;              // shared row stride (bf16 elements)
    static constexpr int BRQ = D == 128 ? 16 : 32; // dK/dV: queries per shared tile
    static constexpr int QC = D == 128 ? 16 : 32;  // dK/dV: queries per register chunk
    static constexpr int STAGES = D == 128 ? 1 : 2; // dK/dV: query tiles in shared memory
    static constexpr int BC = D == 128 ? 32 : 64;  // dQ: keys per tile
};

template <int D, bool DROP>
__device__ __forceinline__ void fa_dkdv_mma_body(const AttnParams& p, const bf16* __restrict__ q,
                                                 const bf16* __restrict__ k, const bf16* __restrict__ v,
                                                 const bf16* __restrict__ dout,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ delta, bf16* __restrict__ dk,
                                                 bf16* __restrict__ dv) {
    constexpr int SLD = FabCfg<D>::SLD, BRQ = FabCfg<D>::BRQ, QC = FabCfg<D>::QC;
    constexpr int STAGES = FabCfg<D>::STAGES;
    constexpr int KD = D / 16;  // k-steps over the head dim (Sᵀ, dPᵀ)
    constexpr int ND = D / 8;   // n8 tiles of dK and dV per warp
    constexpr int NQ = QC / 8;  // n8 tiles of a score chunk
    constexpr int KQ = QC / 16; // k-steps over a chunk's queries (dV, dK)
    __shared__ __align__(16) bf16 Ks[FAM_BR * SLD];  // the block's K and V rows, for the
    __shared__ __align__(16) bf16 Vs[FAM_BR * SLD];  // whole kernel
    // Query tiles, STAGES of them: with two, the next tile's copies are in flight while this
    // one is multiplied.
    __shared__ __align__(16) bf16 Qss[STAGES][BRQ * SLD];
    __shared__ __align__(16) bf16 Gss[STAGES][BRQ * SLD];  // dO
    __shared__ __align__(16) float Lss[STAGES][BRQ];       // lse in log2 units
    __shared__ __align__(16) float Dss[STAGES][BRQ];       // δ
    __shared__ FaDropRow Zss[STAGES][BRQ];                 // the queries' dropout keys

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, mat = lane >> 3, r8 = lane & 7;
    const FaBlock blk = fa_block(false);
    const int bh = blk.bh, b = bh / p.H, h = bh % p.H;
    const int j0 = blk.tile * FAM_BR;  // the block's first key
    const int jw = j0 + warp * 16;       // the warp's first key
    const int shift = p.Tk - p.Tq;

    // The block's K and V rows stay in shared memory; each warp reads its 16 as A fragments.
    const int frag_off = (warp * 16 + (lane & 15)) * SLD + (lane >> 4) * 8;
    fam_load_rows_async<D, FAM_BR>(Ks, k + b * p.k_sb + h * p.k_sh, p.k_st, j0, p.Tk);
    fam_load_rows_async<D, FAM_BR>(Vs, v + b * p.v_sb + h * p.v_sh, p.v_st, j0, p.Tk);

    float dka[ND][4], dva[ND][4];
#pragma unroll
    for (int j = 0; j < ND; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[j][e] = dva[j][e] = 0.0f;

    // This thread's two keys (rows g and g + 8 of the warp's 16).
    const int key_lo = jw + g, key_hi = key_lo + 8;
    const float sl2 = p.scale * LOG2E;  // scores in log2 units
    const bf16* qb = q + b * p.q_sb + h * p.q_sh;
    const bf16* gb = dout + b * p.do_sb + h * p.do_sh;
    const float* lb = lse + (i64)bh * p.Tq;
    const float* db = delta + (i64)bh * p.Tq;

    // The first query that sees key j0 sits at position j0: query index j0 - shift.
    const int first = max(0, j0 - shift);
    const int n_tiles = first < p.Tq ? (p.Tq - first + BRQ - 1) / BRQ : 0;
    // Query tile `it` into stage it % STAGES: Q and dO by cp.async, lse, δ and the dropout
    // keys by plain stores (visible at the barrier that follows the tile's wait).
    auto issue = [&](int it) {
        const int st = it % STAGES, i0 = first + it * BRQ;
        fam_load_rows_async<D, BRQ>(Qss[st], qb, p.q_st, i0, p.Tq);
        fam_load_rows_async<D, BRQ>(Gss[st], gb, p.do_st, i0, p.Tq);
        for (int e = threadIdx.x; e < BRQ; e += FAM_THREADS) {
            const bool in = i0 + e < p.Tq;
            Lss[st][e] = in ? lb[i0 + e] * LOG2E : 0.0f;
            Dss[st][e] = in ? db[i0 + e] : 0.0f;
            if (DROP) Zss[st][e] = fa_drop_row(p, bh, i0 + e);
        }
    };
    if (n_tiles > 0) issue(0);
    cp_async_commit();  // K, V and query tile 0
    for (int it = 0; it < n_tiles; ++it) {
        const int i0 = first + it * BRQ, st = it % STAGES;
        // Two stages: tile it + 1 goes to the stage tile it - 1 used; one stage: tile it
        // replaces tile it - 1. Either way that tile's readers must be done.
        const int next = STAGES == 2 ? it + 1 : it;
        if (next > 0 && next < n_tiles) {
            __syncthreads();
            issue(next);
        }
        cp_async_commit();  // possibly empty: keeps the wait count uniform
        if (STAGES == 2)
            cp_async_wait<1>();  // this thread's copies of tile it (and K, V) have landed
        else
            cp_async_wait<0>();
        __syncthreads();  // ... and every thread's; also publishes K and V, on the first tile
        const bf16* Qs = Qss[st];
        const bf16* Gs = Gss[st];
        const float* Ls = Lss[st];
        const float* Ds = Dss[st];
        const FaDropRow* Zs = Zss[st];

#pragma unroll 1
        for (int c0 = 0; c0 < BRQ; c0 += QC) {
            // Warp-uniform: a warp whose keys all lie past Tk, a chunk wholly past Tq, or one
            // whose last query cannot see the warp's first key, adds nothing.
            if (jw >= p.Tk || i0 + c0 >= p.Tq || i0 + c0 + QC - 1 + shift < jw) continue;

            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for the warp's 16 keys and the chunk's QC queries.
            float s[NQ][4], dp[NQ][4];
#pragma unroll
            for (int j = 0; j < NQ; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                u32 kf[4], vf[4];
                ldmatrix_x4<false>(kf, Ks + frag_off + kk * 16);
                ldmatrix_x4<false>(vf, Vs + frag_off + kk * 16);
#pragma unroll
                for (int j = 0; j < NQ; j += 2) {
                    const int off = (c0 + j * 8 + r8 + (mat >> 1) * 8) * SLD + kk * 16 + (mat & 1) * 8;
                    u32 r[4];
                    ldmatrix_x4<false>(r, Qs + off);
                    mma_bf16_16816(s[j], kf, r[0], r[1]);
                    mma_bf16_16816(s[j + 1], kf, r[2], r[3]);
                    ldmatrix_x4<false>(r, Gs + off);
                    mma_bf16_16816(dp[j], vf, r[0], r[1]);
                    mma_bf16_16816(dp[j + 1], vf, r[2], r[3]);
                }
            }

            // Pᵀ and dSᵀ in f32 (masked: query past Tq, or key after the query's position),
            // packed as bf16 A fragments: queries 16kk..16kk+15 of the chunk are score tiles
            // 2kk (a0, a1) and 2kk + 1 (a2, a3).
            u32 pf[KQ][4], sf[KQ][4];
#pragma unroll
            for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int j = 2 * kk + half;
                    const int c = c0 + j * 8 + 2 * t;  // the tile column of elements 0 and 2
                    float pv[4], dsv[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int col = c + (e & 1), qi = i0 + col;
                        const int key = e < 2 ? key_lo : key_hi;
                        const bool seen = qi < p.Tq && key <= qi + shift;
                        pv[e] = seen ? exp2f(fmaf(s[j][e], sl2, -Ls[col])) : 0.0f;
                        // Dropout: dPᵀ takes Z, dV takes Pᵀ ∘ Z (the header's formulas).
                        if (DROP) {
                            const float z = fa_drop_factor(p, Zs[col], key);
                            dsv[e] = pv[e] * (z * dp[j][e] - Ds[col]);
                            pv[e] *= z;
                        } else {
                            dsv[e] = pv[e] * (dp[j][e] - Ds[col]);
                        }
                    }
                    pf[kk][2 * half] = pack_bf16x2(pv[0], pv[1]);
                    pf[kk][2 * half + 1] = pack_bf16x2(pv[2], pv[3]);
                    sf[kk][2 * half] = pack_bf16x2(dsv[0], dsv[1]);
                    sf[kk][2 * half + 1] = pack_bf16x2(dsv[2], dsv[3]);
                }
            }

            // dV += Pᵀ·dO and dK += dSᵀ·Q over the chunk's queries.
#pragma unroll
            for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
                for (int j = 0; j < ND; j += 2) {
                    const int off = (c0 + kk * 16 + r8 + (mat & 1) * 8) * SLD + j * 8 + (mat >> 1) * 8;
                    u32 r[4];
                    ldmatrix_x4<true>(r, Gs + off);
                    mma_bf16_16816(dva[j], pf[kk], r[0], r[1]);
                    mma_bf16_16816(dva[j + 1], pf[kk], r[2], r[3]);
                    ldmatrix_x4<true>(r, Qs + off);
                    mma_bf16_16816(dka[j], sf[kk], r[0], r[1]);
                    mma_bf16_16816(dka[j + 1], sf[kk], r[2], r[3]);
                }
            }
        }
    }

    bf16* dkb = dk + b * p.k_sb + h * p.k_sh;
    bf16* dvb = dv + b * p.v_sb + h * p.v_sh;
#pragma unroll
    for (int j = 0; j < ND; ++j) {
        const int d = j * 8 + 2 * t;
        if (key_lo < p.Tk) {
            *reinterpret_cast<u32*>(dkb + (i64)key_lo * p.k_st + d) =
                pack_bf16x2(dka[j][0] * p.scale, dka[j][1] * p.scale);
            *reinterpret_cast<u32*>(dvb + (i64)key_lo * p.v_st + d) = pack_bf16x2(dva[j][0], dva[j][1]);
        }
        if (key_hi < p.Tk) {
            *reinterpret_cast<u32*>(dkb + (i64)key_hi * p.k_st + d) =
                pack_bf16x2(dka[j][2] * p.scale, dka[j][3] * p.scale);
            *reinterpret_cast<u32*>(dvb + (i64)key_hi * p.v_st + d) = pack_bf16x2(dva[j][2], dva[j][3]);
        }
    }
}

template <int D, bool DROP>
__device__ __forceinline__ void fa_dq_mma_body(const AttnParams& p, const bf16* __restrict__ q,
                                               const bf16* __restrict__ k, const bf16* __restrict__ v,
                                               const bf16* __restrict__ dout,
                                               const float* __restrict__ lse,
                                               const float* __restrict__ delta, bf16* __restrict__ dq) {
    constexpr int SLD = FabCfg<D>::SLD, BC = FabCfg<D>::BC;
    constexpr int KD = D / 16;  // k-steps over the head dim (S, dP)
    constexpr int NS = BC / 8;  // n8 tiles of scores per warp
    constexpr int KS = BC / 16; // k-steps over keys (dQ)
    constexpr int ND = D / 8;   // n8 tiles of dQ per warp
    static_assert(2 * BC >= FAM_BR, "the K and V tiles stage the 64 Q and dO rows");
    // K and V tiles (K rows, then V rows). At D = 64 in two stages, the next tile's copies in
    // flight while this one is used: even tiles in KVb, odd ones in KVs, which first stages Q
    // and dO. At D = 128 the second stage's bookkeeping makes ptxas spill (tools/check-kernels),
    // so there every tile is loaded into KVs synchronously.
    constexpr bool PIPE = D == 64;
    __shared__ __align__(16) bf16 KVs[2 * BC * SLD];
    __shared__ __align__(16) bf16 KVb[PIPE ? 2 * BC * SLD : 8];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, mat = lane >> 3, r8 = lane & 7;
    const FaBlock blk = fa_block(true);
    const int bh = blk.bh, b = bh / p.H, h = bh % p.H;
    const int i0 = blk.tile * FAM_BR;
    const int shift = p.Tk - p.Tq;
    const bf16* kb = k + b * p.k_sb + h * p.k_sh;
    const bf16* vb = v + b * p.v_sb + h * p.v_sh;
    auto issue = [&](int tile) {
        bf16* kv = (tile & 1) ? KVs : KVb;
        fam_load_rows_async<D, BC>(kv, kb, p.k_st, tile * BC, p.Tk);
        fam_load_rows_async<D, BC>(kv + BC * SLD, vb, p.v_st, tile * BC, p.Tk);
    };
    if (PIPE) {
        issue(0);  // in flight while Q and dO are staged
        cp_async_commit();
    }

    // Q, then dO, staged through the K/V buffers, into A fragments.
    const int frag_off = (warp * 16 + (lane & 15)) * SLD + (lane >> 4) * 8;
    u32 qf[KD][4], gf[KD][4];
    fam_load_rows<D, FAM_BR>(KVs, q + b * p.q_sb + h * p.q_sh, p.q_st, i0, p.Tq);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) ldmatrix_x4<false>(qf[kk], KVs + frag_off + kk * 16);
    __syncthreads();
    fam_load_rows<D, FAM_BR>(KVs, dout + b * p.do_sb + h * p.do_sh, p.do_st, i0, p.Tq);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) ldmatrix_x4<false>(gf[kk], KVs + frag_off + kk * 16);

    // This thread's two rows (g and g + 8 of the warp's 16), their lse (log2 units) and δ.
    const int row_lo = i0 + warp * 16 + g, row_hi = row_lo + 8;
    const float* lb = lse + (i64)bh * p.Tq;
    const float* db = delta + (i64)bh * p.Tq;
    const float l_lo = row_lo < p.Tq ? lb[row_lo] * LOG2E : 0.0f;
    const float l_hi = row_hi < p.Tq ? lb[row_hi] * LOG2E : 0.0f;
    const float d_lo = row_lo < p.Tq ? db[row_lo] : 0.0f;
    const float d_hi = row_hi < p.Tq ? db[row_hi] : 0.0f;
    const float sl2 = p.scale * LOG2E;
    FaDropRow dr_lo = {0u, 0u}, dr_hi = {0u, 0u};
    if (DROP) dr_lo = fa_drop_row(p, bh, row_lo), dr_hi = fa_drop_row(p, bh, row_hi);
    float acc[ND][4];
#pragma unroll
    for (int j = 0; j < ND; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

    // Warp-uniform: whether the warp has rows before Tq, and the last key its last row sees.
    const bool warp_live = i0 + warp * 16 < p.Tq;
    const int warp_last_key = i0 + warp * 16 + 15 + shift;
    const int last_key = min(i0 + FAM_BR, p.Tq) - 1 + shift;
    const int n_tiles = last_key / BC + 1;
    for (int it = 0; it < n_tiles; ++it) {
        const int j0 = it * BC;
        if (PIPE) {
            if (it + 1 < n_tiles) {
                // The stage tile it + 1 goes to (tile it - 1's; at first the Q, dO staging) is
                // no longer read.
                __syncthreads();
                issue(it + 1);
            }
            cp_async_commit();  // possibly empty: keeps the wait count uniform
            cp_async_wait<1>(); // this thread's copies of tile it have landed
            __syncthreads();    // ... and every thread's
        } else {
            __syncthreads();  // the previous tile (at first: the Q, dO staging) is no longer read
            fam_load_rows<D, BC>(KVs, kb, p.k_st, j0, p.Tk);
            fam_load_rows<D, BC>(KVs + BC * SLD, vb, p.v_st, j0, p.Tk);
            __syncthreads();
        }
        const bf16* Ks = PIPE && !(it & 1) ? KVb : KVs;
        const bf16* Vs = Ks + BC * SLD;
        if (!warp_live || j0 > warp_last_key) continue;

        // Dropout: which of this thread's 4·NS elements survive, one bit each (j·4 + e),
        // hashed before the products so that the hashing does not compete with S and dP for
        // registers.
        static_assert(4 * NS <= 32, "one bit per element of the thread's score fragments");
        u32 keep = 0;
        if (DROP) {
#pragma unroll
            for (int j = 0; j < NS; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = j0 + j * 8 + 2 * t + (e & 1);
                    keep |= (u32)fa_drop_keeps(p, e < 2 ? dr_lo : dr_hi, key) << (j * 4 + e);
                }
        }

        // S = Q·Kᵀ and dP = dO·Vᵀ for the warp's 16 rows and the tile's BC keys.
        float s[NS][4], dp[NS][4];
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
            for (int j = 0; j < NS; j += 2) {
                const int off = (j * 8 + r8 + (mat >> 1) * 8) * SLD + kk * 16 + (mat & 1) * 8;
                u32 r[4];
                ldmatrix_x4<false>(r, Ks + off);
                mma_bf16_16816(s[j], qf[kk], r[0], r[1]);
                mma_bf16_16816(s[j + 1], qf[kk], r[2], r[3]);
                ldmatrix_x4<false>(r, Vs + off);
                mma_bf16_16816(dp[j], gf[kk], r[0], r[1]);
                mma_bf16_16816(dp[j + 1], gf[kk], r[2], r[3]);
            }
        }

        // dS = P ∘ (dP - δ) in f32 (masked: row past Tq, or key after the row's position),
        // packed as bf16 A fragments as in the forward.
        u32 sf[KS][4];
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int j = 2 * kk + half;
                float dsv[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = j0 + j * 8 + 2 * t + (e & 1);
                    const bool lo = e < 2;
                    const int row = lo ? row_lo : row_hi;
                    const bool seen = row < p.Tq && key <= row + shift;
                    const float pe = seen ? exp2f(fmaf(s[j][e], sl2, -(lo ? l_lo : l_hi))) : 0.0f;
                    const float z = !DROP ? 1.0f : (keep >> (j * 4 + e)) & 1u ? p.drop_scale : 0.0f;
                    dsv[e] = pe * (z * dp[j][e] - (lo ? d_lo : d_hi));
                }
                sf[kk][2 * half] = pack_bf16x2(dsv[0], dsv[1]);
                sf[kk][2 * half + 1] = pack_bf16x2(dsv[2], dsv[3]);
            }
        }

        // dQ += dS·K.
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
            for (int j = 0; j < ND; j += 2) {
                u32 r[4];
                ldmatrix_x4<true>(r, Ks + (kk * 16 + r8 + (mat & 1) * 8) * SLD + j * 8 + (mat >> 1) * 8);
                mma_bf16_16816(acc[j], sf[kk], r[0], r[1]);
                mma_bf16_16816(acc[j + 1], sf[kk], r[2], r[3]);
            }
        }
    }

    bf16* qdb = dq + b * p.q_sb + h * p.q_sh;
#pragma unroll
    for (int j = 0; j < ND; ++j) {
        const int d = j * 8 + 2 * t;
        if (row_lo < p.Tq)
            *reinterpret_cast<u32*>(qdb + (i64)row_lo * p.q_st + d) =
                pack_bf16x2(acc[j][0] * p.scale, acc[j][1] * p.scale);
        if (row_hi < p.Tq)
            *reinterpret_cast<u32*>(qdb + (i64)row_hi * p.q_st + d) =
                pack_bf16x2(acc[j][2] * p.scale, acc[j][3] * p.scale);
    }
}

// One instance per entry point (each has its own static shared memory): the dropout-free
// kernels carry no hashing code, so dropout costs them no registers; the _drop_ ones drop.
#define FAB_MMA_KERNELS(D, DROP, tag)                                                              \
    extern "C" __global__ void __launch_bounds__(FAM_THREADS) flash_attn_bwd_dkdv_mma##tag##_d##D( \
        AttnParams p, const bf16* __restrict__ q, const bf16* __restrict__ k,                      \
        const bf16* __restrict__ v, const bf16* __restrict__ dout, const float* __restrict__ lse,  \
        const float* __restrict__ delta, bf16* __restrict__ dk, bf16* __restrict__ dv) {           \
        fa_dkdv_mma_body<D, DROP>(p, q, k, v, dout, lse, delta, dk, dv);                           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(FAM_THREADS) flash_attn_bwd_dq_mma##tag##_d##D(   \
        AttnParams p, const bf16* __restrict__ q, const bf16* __restrict__ k,                      \
        const bf16* __restrict__ v, const bf16* __restrict__ dout, const float* __restrict__ lse,  \
        const float* __restrict__ delta, bf16* __restrict__ dq) {                                  \
        fa_dq_mma_body<D, DROP>(p, q, k, v, dout, lse, delta, dq);                                 \
    }

FAB_MMA_KERNELS(64, false, _bf16)
FAB_MMA_KERNELS(128, false, _bf16)
FAB_MMA_KERNELS(64, true, _drop_bf16)
FAB_MMA_KERNELS(128, true, _drop_bf16)
