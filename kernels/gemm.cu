// gemm.cu: batched matrix multiplication C = alpha · A·B + beta · C.
//   - gemm_tma_*: Hopper (sm_90a only), as gemm_wgmma_* but fed by the TMA unit from a
//     producer warpgroup through an mbarrier ring; described at its section below.
//   - gemm_wgmma_*: Hopper (sm_90a only) warpgroup MMA, operands read by the tensor cores from
//     128-byte-swizzled shared memory, four cp.async stages; described at its section below.
//   - gemm_bf16_*: tensor cores. bf16 A and B, f32 accumulation, mma.sync.m16n8k16 through
//     inline PTX, operands staged in shared memory with cp.async (double-buffered: the next
//     K tile loads while the current one is multiplied) and read with ldmatrix.
//   - gemm_simt_*: plain FMA kernels for any strides, dtypes and alignments: the f32 path and
//     the fallback for bf16 operands the tensor-core kernel cannot take.
//
// Reference: crates/tensor/src/cpu/gemm.rs sgemm (the CPU GEMM the tests compare against).
//
// Layouts (row-major C [M, N] with row stride ldc; element strides; pointers include offsets):
//   tensor-core kernels take each operand in one of two storage orders, named as in BLAS for
//   row-major matrices:
//     A 'n': A[m, k] at a[m·lda + k]   (stored [M, K])    A 't': at a[k·lda + m] (stored [K, M])
//     B 'n': B[k, n] at b[k·ldb + n]   (stored [K, N])    B 't': at b[n·ldb + k] (stored [N, K])
//   so x·Wᵀ with W [out, in] is A 'n', B 't', and the backward products dA = dC·Bᵀ and
//   dB = Aᵀ·dC are other letter pairs of the same kernel: no transposed copies.
//   Batch z (blockIdx.z) adds z·stride_{a,b,c} to each pointer (stride 0 broadcasts).
//   Requirements of gemm_bf16_* (the host checks them and otherwise calls gemm_simt_*):
//   a, b 16-byte aligned; lda, ldb, stride_a, stride_b multiples of 8 elements. M, N and K are
//   arbitrary: partial tiles are zero-filled in shared memory and stores are bounds-checked.
//   beta = 0 never reads C (C may hold garbage or NaN).
//   SIMT kernels take A[m, k] = a[m·sam + k·sak], B[k, n] = b[k·sbk + n·sbn]: any strides.
//
// Launch:
//   gemm_bf16_*: blockDim.x = 256 (8 warps, 2 × 4, each computing 64 × 32 of the 128 × 128
//     block tile), gridDim = (ceil(N / 128), ceil(M / 128), batch); static shared memory
//     ≤ 40 KB (two stages of a 128 × 32 A tile and a 32 × 128 B tile, rows padded by 16 bytes
//     so ldmatrix's eight 16-byte rows fall in distinct banks).
//   gemm_simt_*: blockDim.x = 256 (16 × 16 threads, 4 × 4 outputs each), gridDim =
//     (ceil(N / 64), ceil(M / 64), batch); static shared memory 8.5 KB.
//   batch ≤ 65535 (gridDim.z).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16; g = lane / 4, t = lane % 4):
//   A regs a0..a3: (row g, k 2t..2t+1), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..)
//   B regs b0, b1: (k 2t..2t+1, col g), (k 2t+8.., col g)
//   C regs c0..c3: (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t), (row g+8, col 2t+1)
//   ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8×8 matrix i; register i of lane l
//   holds row l/4, columns 2(l%4)..+1 of matrix i (with .trans: rows 2(l%4)..+1, column l/4).
//
// Entry points (BN: block tile width, 128 or 256):
//   gemm_tma_{nn,nt,tn,tt}_bf16_n{BN}(GemmParams p, map_a, map_b, c)  sm_90a only; C is bf16
//   gemm_wgmma_{nn,nt,tn,tt}_bf16_n{BN}(GemmParams p, a, b, c)        sm_90a only; C is bf16
//   gemm_bf16_{nn,nt,tn,tt}_{f32,bf16}(GemmParams p, a, b, c)   C is f32 or bf16
//   gemm_simt_f32(SimtParams p, a, b, c)            f32 → f32
//   gemm_simt_bf16(SimtParams p, a, b, c)           bf16 → bf16
//   gemm_simt_bf16_f32(SimtParams p, a, b, c)       bf16 → f32

struct GemmParams {
    int M, N, K;
    i64 lda, ldb, ldc;
    i64 stride_a, stride_b, stride_c;
    float alpha, beta;
};

struct SimtParams {
    int M, N, K;
    i64 sam, sak, sbk, sbn, ldc;
    i64 stride_a, stride_b, stride_c;
    float alpha, beta;
};

static_assert(sizeof(GemmParams) == 72,
              "GemmParams must match crates/tensor/src/cuda/params.rs");
static_assert(sizeof(SimtParams) == 88,
              "SimtParams must match crates/tensor/src/cuda/params.rs");

#define GEMM_BM 128
#define GEMM_BN 128
#define GEMM_BK 32
#define GEMM_THREADS 256
#define GEMM_PAD 8  // elements (16 bytes) of padding per shared-memory row

// ---- tensor-core kernel ---------------------------------------------------------------------

// Copies a ROWS × COLS tile whose columns are contiguous in global memory (row stride `ld`)
// into shared memory (row stride COLS + GEMM_PAD). Full 8-element chunks go through cp.async;
// chunks crossing the matrix edge are copied element by element with zeros outside.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_tile(const bf16* __restrict__ g, i64 ld, int row0, int row_lim,
                                          int col0, int col_lim, bf16* s, int tid) {
    constexpr int CPR = COLS / 8;  // chunks per row
    constexpr int SLD = COLS + GEMM_PAD;
#pragma unroll
    for (int ch = tid; ch < ROWS * CPR; ch += GEMM_THREADS) {
        const int r = ch / CPR, c = (ch % CPR) * 8;
        bf16* dst = s + r * SLD + c;
        const int gr = row0 + r, gc = col0 + c;
        if (gr < row_lim && gc + 8 <= col_lim) {
            cp_async16(dst, g + (i64)gr * ld + gc);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
                dst[e] = (gr < row_lim && gc + e < col_lim) ? g[(i64)gr * ld + gc + e] : (bf16)0;
        }
    }
}

// A_T: A stored [K, M] ('t'); B_T: B stored [N, K] ('t').
template <bool A_T, bool B_T, typename TC>
__device__ __forceinline__ void gemm_bf16_body(const GemmParams& p, const bf16* __restrict__ a,
                                               const bf16* __restrict__ b, TC* __restrict__ c) {
    // Shared-memory tile shapes per stage: rows × (cols + pad), cols the contiguous dim.
    constexpr int A_ROWS = A_T ? GEMM_BK : GEMM_BM, A_COLS = A_T ? GEMM_BM : GEMM_BK;
    constexpr int B_ROWS = B_T ? GEMM_BN : GEMM_BK, B_COLS = B_T ? GEMM_BK : GEMM_BN;
    constexpr int A_SLD = A_COLS + GEMM_PAD, B_SLD = B_COLS + GEMM_PAD;
    constexpr int A_STAGE = A_ROWS * A_SLD, B_STAGE = B_ROWS * B_SLD;
    __shared__ __align__(16) bf16 smem[2 * (A_STAGE + B_STAGE)];
    bf16* As = smem;
    bf16* Bs = smem + 2 * A_STAGE;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;  // this warp's corner in the block tile
    const int m0 = blockIdx.y * GEMM_BM, n0 = blockIdx.x * GEMM_BN;
    a += (i64)blockIdx.z * p.stride_a;
    b += (i64)blockIdx.z * p.stride_b;
    c += (i64)blockIdx.z * p.stride_c;

    auto load_stage = [&](int stage, int k0) {
        if (A_T)
            load_tile<A_ROWS, A_COLS>(a, p.lda, k0, p.K, m0, p.M, As + stage * A_STAGE, tid);
        else
            load_tile<A_ROWS, A_COLS>(a, p.lda, m0, p.M, k0, p.K, As + stage * A_STAGE, tid);
        if (B_T)
            load_tile<B_ROWS, B_COLS>(b, p.ldb, n0, p.N, k0, p.K, Bs + stage * B_STAGE, tid);
        else
            load_tile<B_ROWS, B_COLS>(b, p.ldb, k0, p.K, n0, p.N, Bs + stage * B_STAGE, tid);
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    const int k_tiles = (p.K + GEMM_BK - 1) / GEMM_BK;
    const int mat = lane >> 3, r8 = lane & 7;  // ldmatrix: which 8x8 matrix, which of its rows

    load_stage(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < k_tiles; ++kt) {
        // Start the next tile's copy before waiting for this one: copy and math overlap.
        if (kt + 1 < k_tiles) load_stage((kt + 1) & 1, (kt + 1) * GEMM_BK);
        cp_async_commit();  // possibly empty group: keeps the wait count below uniform
        cp_async_wait<1>(); // everything but the group just committed has landed
        __syncthreads();    // ... for every thread's copies, and the edge stores too

        const bf16* as = As + (kt & 1) * A_STAGE;
        const bf16* bs = Bs + (kt & 1) * B_STAGE;
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; kk += 16) {
            u32 af[4][4], bfr[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int mb = wm + i * 16;
                if (A_T)  // stored [k][m]: transposed 8x8 loads
                    ldmatrix_x4<true>(af[i], as + (kk + r8 + (mat >> 1) * 8) * A_SLD + mb + (mat & 1) * 8);
                else      // stored [m][k]
                    ldmatrix_x4<false>(af[i], as + (mb + (lane & 15)) * A_SLD + kk + (lane >> 4) * 8);
            }
#pragma unroll
            for (int j = 0; j < 4; j += 2) {
                const int nb = wn + j * 8;
                u32 r[4];
                if (B_T)  // stored [n][k]
                    ldmatrix_x4<false>(r, bs + (nb + r8 + (mat >> 1) * 8) * B_SLD + kk + (mat & 1) * 8);
                else      // stored [k][n]: transposed 8x8 loads
                    ldmatrix_x4<true>(r, bs + (kk + r8 + (mat & 1) * 8) * B_SLD + nb + (mat >> 1) * 8);
                bfr[j][0] = r[0];
                bfr[j][1] = r[1];
                bfr[j + 1][0] = r[2];
                bfr[j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
        }
        __syncthreads();  // all warps are done with this stage before it is refilled
    }

    // Epilogue straight from the accumulator fragments, bounds-checked.
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + wm + i * 16 + g + (e >> 1) * 8;
                const int n = n0 + wn + j * 8 + 2 * t + (e & 1);
                if (m < p.M && n < p.N) {
                    TC* dst = c + (i64)m * p.ldc + n;
                    float v = p.alpha * acc[i][j][e];
                    if (p.beta != 0.0f) v += p.beta * load_f32(dst);
                    store_f32(dst, v);
                }
            }
        }
    }
}

#define GEMM_BF16(ta, tb, A_T, B_T, TC, cname)                                                   \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_bf16_##ta##tb##_##cname(      \
        GemmParams p, const bf16* __restrict__ a, const bf16* __restrict__ b, TC* __restrict__ c) { \
        gemm_bf16_body<A_T, B_T, TC>(p, a, b, c);                                                \
    }
#define GEMM_BF16_OUTS(ta, tb, A_T, B_T) \
    GEMM_BF16(ta, tb, A_T, B_T, float, f32) GEMM_BF16(ta, tb, A_T, B_T, bf16, bf16)

GEMM_BF16_OUTS(n, n, false, false)
GEMM_BF16_OUTS(n, t, false, true)
GEMM_BF16_OUTS(t, n, true, false)
GEMM_BF16_OUTS(t, t, true, true)

// ---- Hopper kernel: wgmma (sm_90a) -----------------------------------------------------------
//
// gemm_wgmma_{nn,nt,tn,tt}_bf16_n{128,256}: the same GemmParams, layouts and operand
// requirements as gemm_bf16_*, compiled only for sm_90a (see common.cuh). Block tile
// 128 × BN × 64 (BN = 256 or 128) with two warpgroups (256 threads), each computing a 64 × BN
// half with wgmma.mma_async.m64nBNk16 (BN / 2 f32 accumulators per thread). Both operands are read by the tensor cores straight from
// shared memory, through matrix descriptors, in the 128-byte-swizzle layout; the transposed
// storage orders use wgmma's transpose bits (A 't' is M-major, B 'n' is N-major), so the four
// letter pairs are one kernel body.
//
// Shared memory (dynamic, 4 stages × (16 + BN / 8) KB + 1 KB to align the base to 1024 bytes,
// which the 128-byte swizzle pattern repeats on): per stage the A tile (16 KB) then the B tile
// (BN / 8 KB).
// A tile stored ROWS × COLS with COLS contiguous in global memory is kept as COLS / 64
// panels of ROWS rows of 128 bytes (64 elements); 16-byte chunk c of row r sits at chunk
// c ^ (r % 8) of its row. In descriptor terms (PTX ISA "Shared Memory Matrix Layout"):
//   K-major operand (rows = M or N, 64 k per row): SBO = 1024 (8 rows), LBO unused; the
//     k16 step of the MMA loop moves the start address by 32 bytes.
//   MN-major operand (rows = k, cols = M or N): LBO = panel size (64 rows × 128 bytes =
//     8 KB, the step between 64-element column panels), SBO = 1024 (8 k rows); the k16 step
//     moves the start address by 16 rows = 2 KB.
//   Warpgroup w's 64 rows of A start 8 KB into the A tile in both layouts (rows 64w.. of a
//   K-major tile, panel w of an M-major one).
//
// Tiles are assigned in grouped order (grouped_tile), for L2 reuse between resident blocks.
// Pipeline: tiles are copied with cp.async two ahead; the MMAs of a tile stay in flight while
// the next iteration waits for its copies (wgmma_wait<1>), so at any time one stage is being
// multiplied, one may still be read by the previous tile's MMAs and two are being filled.
//
// Launch: blockDim.x = 256, gridDim = (ceil(N / BN), ceil(M / 128), batch ≤ 65535), dynamic
// shared memory WG_SMEM_BYTES(BN) (the host raises the function's limit to it first).

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define WG_BM 128
#define WG_BK 64
#define WG_STAGES 4
#define WG_THREADS 256
#define WG_A_BYTES (WG_BM * WG_BK * 2)
// Bytes of one stage (the A tile, then the B tile) for block tiles BN columns wide, and the
// dynamic shared memory of gemm_wgmma_*: the stages and 1 KB to align the base.
#define WG_STAGE_BYTES(BN) (WG_A_BYTES + (BN) * WG_BK * 2)
#define WG_SMEM_BYTES(BN) (WG_STAGES * WG_STAGE_BYTES(BN) + 1024)

// Copies a ROWS × COLS tile whose columns are contiguous in global memory (row stride `ld`)
// into the swizzled panels described above, at `s` (1024-byte aligned). Full 8-element chunks
// go through cp.async; chunks crossing the matrix edge are stored element by element with
// zeros outside.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_tile_sw128(const bf16* __restrict__ g, i64 ld, int row0, int row_lim,
                                                int col0, int col_lim, unsigned char* s, int tid) {
    constexpr int CPR = COLS / 8;  // 16-byte chunks per row
    static_assert((ROWS * CPR) % WG_THREADS == 0, "whole chunks per thread");
#pragma unroll
    for (int i = 0; i < ROWS * CPR / WG_THREADS; ++i) {
        const int ch = tid + i * WG_THREADS;
        const int r = ch / CPR, c = ch % CPR;
        unsigned char* dst = s + (c >> 3) * (ROWS * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4);
        const int gr = row0 + r, gc = col0 + c * 8;
        if (gr < row_lim && gc + 8 <= col_lim) {
            cp_async16(dst, g + (i64)gr * ld + gc);
        } else {
            bf16* d = reinterpret_cast<bf16*>(dst);
#pragma unroll
            for (int e = 0; e < 8; ++e)
                d[e] = (gr < row_lim && gc + e < col_lim) ? g[(i64)gr * ld + gc + e] : (bf16)0;
        }
    }
}

// The block's output tile (row, column) in grouped order: blocks start in launch order (x
// fastest), and consecutive blocks walk down WG_GROUP_M tile rows of one tile column before
// moving right, so the blocks resident at one time share their A rows and B columns in L2
// instead of sweeping all of B once per tile row. A bijection of the grid onto the tiles.
#define WG_GROUP_M 8
__device__ __forceinline__ void grouped_tile(int& tile_m, int& tile_n) {
    const int tiles_n = gridDim.x, tiles_m = gridDim.y;
    const int lin = blockIdx.y * tiles_n + blockIdx.x;
    const int per_group = WG_GROUP_M * tiles_n;
    const int first_m = (lin / per_group) * WG_GROUP_M;
    const int rows = min(tiles_m - first_m, WG_GROUP_M);
    const int in_group = lin % per_group;
    tile_m = first_m + in_group % rows;
    tile_n = in_group / rows;
}

// A wgmma matrix descriptor: start address, leading and stride byte offsets, 128-byte swizzle.
__device__ __forceinline__ u64 wg_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo & 0x3FFFF) >> 4) << 16) |
           ((u64)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void store_pair(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void store_pair(bf16* p, float a, float b) {
    *reinterpret_cast<u32*>(p) = pack_bf16x2(a, b);
}

// One consumer warpgroup's view of the stage ring: the descriptors of its 64 rows of A and of
// all of B in stage 0 (a stage adds WG_STAGE_BYTES(BN); a k16 step the major-ness's step, see the
// layout notes above), and the MMAs of one stage.
template <bool A_T, bool B_T, int BN>
struct WgOperands {
    static constexpr u32 A_LBO = A_T ? WG_BK * 128 : 16, B_LBO = B_T ? 16 : WG_BK * 128;
    static constexpr u32 A_KSTEP = A_T ? 16 * 128 : 32, B_KSTEP = B_T ? 32 : 16 * 128;
    u64 desc_a0, desc_b0;

    // `sbase`: the ring's (1024-byte aligned) .shared address; `half`: rows 64·half.. of the
    // block tile.
    __device__ __forceinline__ WgOperands(u32 sbase, int half)
        : desc_a0(wg_desc(sbase + half * 8192, A_LBO, 1024)), desc_b0(wg_desc(sbase + WG_A_BYTES, B_LBO, 1024)) {}

    // acc += A · B over stage `stage`'s 64 k, issued and committed as one wgmma group.
    __device__ __forceinline__ void mma_stage(float (&acc)[BN / 2], int stage) const {
        const u64 stage_off = (u64)((stage * WG_STAGE_BYTES(BN)) >> 4);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < WG_BK / 16; ++kk)
            wgmma_m64k16_bf16<BN, A_T ? 1 : 0, B_T ? 0 : 1>(acc, desc_a0 + stage_off + (u64)((kk * A_KSTEP) >> 4),
                                                              desc_b0 + stage_off + (u64)((kk * B_KSTEP) >> 4));
        wgmma_commit();
    }
};

// The epilogue of a warpgroup's 64 × BN accumulator tile: this thread's values are rows
// `row` and row + 8, columns col + 8j and col + 8j + 1 (j < BN / 8; see wgmma_m64k16_bf16
// in common.cuh), scaled by alpha, plus beta · C, bounds-checked; neighbouring columns are
// stored as one pair when C's rows and batch offsets keep pairs aligned.
template <int BN, typename TC>
__device__ __forceinline__ void store_tile(const GemmParams& p, TC* __restrict__ c, const float (&acc)[BN / 2],
                                           int row, int col) {
    const bool pairs = ((p.ldc | p.stride_c) & 1) == 0 && ((unsigned long long)c % (2 * sizeof(TC))) == 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int m = row + h * 8;
        if (m >= p.M) continue;
        TC* out = c + (i64)m * p.ldc;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const int n = col + j * 8;
            float v0 = p.alpha * acc[4 * j + 2 * h], v1 = p.alpha * acc[4 * j + 2 * h + 1];
            if (pairs && n + 1 < p.N) {
                if (p.beta != 0.0f) {
                    v0 += p.beta * load_f32(out + n);
                    v1 += p.beta * load_f32(out + n + 1);
                }
                store_pair(out + n, v0, v1);
            } else {
                if (n < p.N) store_f32(out + n, p.beta != 0.0f ? v0 + p.beta * load_f32(out + n) : v0);
                if (n + 1 < p.N)
                    store_f32(out + n + 1, p.beta != 0.0f ? v1 + p.beta * load_f32(out + n + 1) : v1);
            }
        }
    }
}

// A_T: A stored [K, M] ('t', M-major); B_T: B stored [N, K] ('t', K-major).
template <bool A_T, bool B_T, int BN, typename TC>
__device__ __forceinline__ void gemm_wgmma_body(const GemmParams& p, const bf16* __restrict__ a,
                                                const bf16* __restrict__ b, TC* __restrict__ c) {
    RLHF_DYNAMIC_SMEM(smem_raw);
    const u32 raw = smem_u32(smem_raw);
    const u32 pad = (1024u - (raw & 1023u)) & 1023u;
    unsigned char* smem = smem_raw + pad;
    const u32 sbase = raw + pad;

    const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31, warp = (tid >> 5) & 3;
    int tile_m, tile_n;
    grouped_tile(tile_m, tile_n);
    const int m0 = tile_m * WG_BM, n0 = tile_n * BN;
    a += (i64)blockIdx.z * p.stride_a;
    b += (i64)blockIdx.z * p.stride_b;
    c += (i64)blockIdx.z * p.stride_c;

    auto load_stage = [&](int stage, int k0) {
        unsigned char* sa = smem + stage * WG_STAGE_BYTES(BN);
        unsigned char* sb = sa + WG_A_BYTES;
        if (A_T)
            load_tile_sw128<WG_BK, WG_BM>(a, p.lda, k0, p.K, m0, p.M, sa, tid);
        else
            load_tile_sw128<WG_BM, WG_BK>(a, p.lda, m0, p.M, k0, p.K, sa, tid);
        if (B_T)
            load_tile_sw128<BN, WG_BK>(b, p.ldb, n0, p.N, k0, p.K, sb, tid);
        else
            load_tile_sw128<WG_BK, BN>(b, p.ldb, k0, p.K, n0, p.N, sb, tid);
    };

    const WgOperands<A_T, B_T, BN> ops(sbase, wg);
    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;

    const int k_tiles = (p.K + WG_BK - 1) / WG_BK;
#pragma unroll
    for (int s = 0; s < WG_STAGES - 2; ++s) {
        if (s < k_tiles) load_stage(s, s * WG_BK);
        cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<WG_STAGES - 3>();  // this thread's copies of tile kt have landed
        fence_proxy_async_smem();        // ... and are visible to the tensor cores' reads
        // Every thread's copies and edge stores of tile kt are in, and every warpgroup has
        // retired the MMAs of tile kt - 2 (wgmma_wait<1> below), whose stage is refilled next.
        __syncthreads();
        const int nk = kt + WG_STAGES - 2;
        if (nk < k_tiles) load_stage(nk % WG_STAGES, nk * WG_BK);
        cp_async_commit();  // possibly empty: keeps the wait count above uniform

        ops.mma_stage(acc, kt % WG_STAGES);
        wgmma_wait<1>();  // tile kt - 1's MMAs are done; tile kt's may still run
    }
    wgmma_wait<0>();

    store_tile<BN>(p, c, acc, m0 + wg * 64 + warp * 16 + (lane >> 2), n0 + 2 * (lane & 3));
}

// Block tiles 128 × 256 (_n256) and 128 × 128 (_n128: twice the blocks, for products whose
// 256-wide tiles would not fill the card; the host picks). C in bf16 only: the engine's matmul
// writes its output in the operands' dtype.
#define GEMM_WGMMA(ta, tb, A_T, B_T, BN)                                                            \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) gemm_wgmma_##ta##tb##_bf16_n##BN(   \
        GemmParams p, const bf16* __restrict__ a, const bf16* __restrict__ b, bf16* __restrict__ c) { \
        gemm_wgmma_body<A_T, B_T, BN, bf16>(p, a, b, c);                                              \
    }
#define GEMM_WGMMA_TILES(ta, tb, A_T, B_T) GEMM_WGMMA(ta, tb, A_T, B_T, 128) GEMM_WGMMA(ta, tb, A_T, B_T, 256)

GEMM_WGMMA_TILES(n, n, false, false)
GEMM_WGMMA_TILES(n, t, false, true)
GEMM_WGMMA_TILES(t, n, true, false)
GEMM_WGMMA_TILES(t, t, true, true)

// ---- Hopper kernel: TMA-fed, warp-specialised wgmma (sm_90a) ----------------------------------
//
// gemm_tma_{nn,nt,tn,tt}_bf16_n{128,256}(GemmParams p, TmaMap map_a, TmaMap map_b, bf16* c):
// the wgmma kernel above with its copies moved to the TMA unit and onto a warpgroup of their
// own. 384 threads: warpgroup 0 is the producer (one thread issues every copy; setmaxnreg
// gives its registers away), warpgroups 1 and 2 are the consumers, each the same 64 × BN half
// of the 128 × BN block tile as in gemm_wgmma_*. The shared-memory layout of a stage, the
// descriptors, the grouped tile order and the epilogue are the same; the TMA unit writes the
// 128-byte swizzle itself (tensor maps encoded with CU_TENSOR_MAP_SWIZZLE_128B, boxes 64
// elements = 128 bytes wide) and fills out-of-bounds elements with zeros, so partial tiles
// need no code here; panels wholly past the edge are not copied at all (zeroed once instead).
//
// Tensor maps (host: crates/tensor/src/ops/matmul.rs), 3-D (contiguous dim, row dim, batch),
// bf16, boxes:
//   A 'n' [M, K]: (64, 128, 1) — the whole K-major A tile in one copy.
//   A 't' [K, M]: (64, 64, 1)  — one copy per 64-column panel (two).
//   B 't' [N, K]: (64, BN, 1)  — the whole K-major B tile in one copy.
//   B 'n' [K, N]: (64, 64, 1)  — one copy per 64-column panel (BN / 64).
// A batch stride of 0 (a broadcast operand) is encoded as a batch of 1 and read at batch 0.
//
// Ring of WG_STAGES stages with two mbarriers each: full[s] (the producer's arrival with the
// stage's byte count, completed by the copies) and empty[s] (an arrival from each of the 256
// consumer threads once its MMAs on the stage have retired). Use j of stage s (tile kt = j·S + s)
// waits for phase j of full[s] (parity j & 1); the producer refills it after phase j − 1 of
// empty[s]. A consumer keeps one tile's MMAs in flight (wgmma_wait<1>) and releases the stage
// of the tile before.
//
// Launch: blockDim.x = 384, grid as gemm_wgmma_*, dynamic shared memory TMA_SMEM_BYTES(BN).

#define TMA_THREADS 384
#define TMA_SMEM_BYTES(BN) (WG_STAGES * WG_STAGE_BYTES(BN) + 2 * WG_STAGES * 8 + 1024)

template <bool A_T, bool B_T, int BN>
__device__ __forceinline__ void gemm_tma_body(const GemmParams& p, const TmaMap* map_a, const TmaMap* map_b,
                                              bf16* __restrict__ c) {
    RLHF_DYNAMIC_SMEM(smem_raw);
    const u32 raw = smem_u32(smem_raw);
    const u32 pad = (1024u - (raw & 1023u)) & 1023u;
    unsigned char* smem = smem_raw + pad;
    const u32 sbase = raw + pad;
    u64* full = reinterpret_cast<u64*>(smem + WG_STAGES * WG_STAGE_BYTES(BN));
    u64* empty = full + WG_STAGES;

    const int tid = threadIdx.x, wg = tid >> 7;
    int tile_m, tile_n;
    grouped_tile(tile_m, tile_n);
    const int m0 = tile_m * WG_BM, n0 = tile_n * BN;
    const int k_tiles = (p.K + WG_BK - 1) / WG_BK;

    // 64-column panels lying wholly past the tensor's edge (A's second in a last tile row of
    // at most 64 rows, B's beyond N) are never copied, and the full barrier expects only the
    // bytes of the boxes issued, whatever the TMA unit would count for a box with no element
    // inside the tensor. Those panels are zeroed once here, in every stage, and made visible to
    // the tensor cores (they only reach accumulator rows or columns past the edge, which are
    // not stored, but zeros keep those finite).
    constexpr int A_PANELS = A_T ? WG_BM / 64 : 1, B_PANELS = B_T ? 1 : BN / 64;
    const int a_panels = A_T ? min(A_PANELS, (p.M - m0 + 63) / 64) : 1;
    const int b_panels = B_T ? 1 : min(B_PANELS, (p.N - n0 + 63) / 64);
    if (a_panels < A_PANELS || b_panels < B_PANELS) {
        const uint4 zero = make_uint4(0, 0, 0, 0);
        for (int s = 0; s < WG_STAGES; ++s) {
            unsigned char* sa = smem + s * WG_STAGE_BYTES(BN);
            for (int q = a_panels; q < A_PANELS; ++q)
                for (int i = tid; i < 8192 / 16; i += TMA_THREADS) reinterpret_cast<uint4*>(sa + q * 8192)[i] = zero;
            for (int q = b_panels; q < B_PANELS; ++q)
                for (int i = tid; i < 8192 / 16; i += TMA_THREADS)
                    reinterpret_cast<uint4*>(sa + WG_A_BYTES + q * 8192)[i] = zero;
        }
        fence_proxy_async_smem();
    }
    if (tid == 0) {
        for (int s = 0; s < WG_STAGES; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 2 * 128);
        }
        fence_mbar_init();
    }
    __syncthreads();

    if (wg == 0) {
        setmaxnreg_dec<40>();
        if (tid != 0) return;
        const int za = p.stride_a != 0 ? (int)blockIdx.z : 0, zb = p.stride_b != 0 ? (int)blockIdx.z : 0;
        const u32 bytes = (A_T ? a_panels * 8192 : WG_A_BYTES) + (B_T ? BN * WG_BK * 2 : b_panels * 8192);
        for (int kt = 0; kt < k_tiles; ++kt) {
            const int s = kt % WG_STAGES, k0 = kt * WG_BK;
            if (kt >= WG_STAGES) mbar_wait(&empty[s], ((kt / WG_STAGES) - 1) & 1);
            mbar_arrive_expect_tx(&full[s], bytes);
            unsigned char* sa = smem + s * WG_STAGE_BYTES(BN);
            unsigned char* sb = sa + WG_A_BYTES;
            if (A_T) {
                for (int q = 0; q < a_panels; ++q) tma_load_3d(sa + q * 8192, map_a, m0 + 64 * q, k0, za, &full[s]);
            } else {
                tma_load_3d(sa, map_a, k0, m0, za, &full[s]);
            }
            if (B_T) {
                tma_load_3d(sb, map_b, k0, n0, zb, &full[s]);
            } else {
                for (int q = 0; q < b_panels; ++q) tma_load_3d(sb + q * 8192, map_b, n0 + 64 * q, k0, zb, &full[s]);
            }
        }
        return;
    }

    setmaxnreg_inc<232>();
    const int cw = wg - 1, lane = tid & 31, warp = (tid >> 5) & 3;
    c += (i64)blockIdx.z * p.stride_c;
    const WgOperands<A_T, B_T, BN> ops(sbase, cw);
    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;

    for (int kt = 0; kt < k_tiles; ++kt) {
        const int s = kt % WG_STAGES;
        mbar_wait(&full[s], (kt / WG_STAGES) & 1);
        ops.mma_stage(acc, s);
        wgmma_wait<1>();  // tile kt - 1's MMAs have retired: its stage may be refilled
        // Every consumer thread releases: a warp's wgmma.wait_group says nothing about the
        // other warps of its warpgroup, which may not even have issued their MMAs yet.
        if (kt > 0) mbar_arrive(&empty[(kt - 1) % WG_STAGES]);
    }
    wgmma_wait<0>();
    store_tile<BN>(p, c, acc, m0 + cw * 64 + warp * 16 + (lane >> 2), n0 + 2 * (lane & 3));
}

#define GEMM_TMA(ta, tb, A_T, B_T, BN)                                                            \
    extern "C" __global__ void __launch_bounds__(TMA_THREADS, 1) gemm_tma_##ta##tb##_bf16_n##BN(     \
        GemmParams p, const RLHF_GRID_CONSTANT TmaMap map_a, const RLHF_GRID_CONSTANT TmaMap map_b, \
        bf16* __restrict__ c) {                                                                     \
        gemm_tma_body<A_T, B_T, BN>(p, &map_a, &map_b, c);                                          \
    }
#define GEMM_TMA_TILES(ta, tb, A_T, B_T) GEMM_TMA(ta, tb, A_T, B_T, 128) GEMM_TMA(ta, tb, A_T, B_T, 256)

GEMM_TMA_TILES(n, n, false, false)
GEMM_TMA_TILES(n, t, false, true)
GEMM_TMA_TILES(t, n, true, false)
GEMM_TMA_TILES(t, t, true, true)

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ---- SIMT kernel ----------------------------------------------------------------------------

#define SIMT_BM 64
#define SIMT_BN 64
#define SIMT_BK 16

template <typename TA, typename TC>
__device__ __forceinline__ void gemm_simt_body(const SimtParams& p, const TA* __restrict__ a,
                                               const TA* __restrict__ b, TC* __restrict__ c) {
    // Both tiles k-major in shared memory, so the inner loop reads 4 consecutive m (n) values.
    __shared__ __align__(16) float As[SIMT_BK][SIMT_BM + 4];
    __shared__ __align__(16) float Bs[SIMT_BK][SIMT_BN + 4];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int m0 = blockIdx.y * SIMT_BM, n0 = blockIdx.x * SIMT_BN;
    a += (i64)blockIdx.z * p.stride_a;
    b += (i64)blockIdx.z * p.stride_b;
    c += (i64)blockIdx.z * p.stride_c;
    // Coalesced tile loads: neighbouring threads take neighbouring addresses along whichever
    // dim has unit stride.
    const bool a_k_fast = p.sak == 1, b_n_fast = p.sbn == 1;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < p.K; k0 += SIMT_BK) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int idx = tid + q * 256;
            const int am = a_k_fast ? idx / SIMT_BK : idx % SIMT_BM;
            const int ak = a_k_fast ? idx % SIMT_BK : idx / SIMT_BM;
            const int gm = m0 + am, gk = k0 + ak;
            As[ak][am] = (gm < p.M && gk < p.K) ? load_f32(a + gm * p.sam + gk * p.sak) : 0.0f;
            const int bn = b_n_fast ? idx % SIMT_BN : idx / SIMT_BK;
            const int bk = b_n_fast ? idx / SIMT_BN : idx % SIMT_BK;
            const int gn = n0 + bn, gk2 = k0 + bk;
            Bs[bk][bn] = (gn < p.N && gk2 < p.K) ? load_f32(b + gk2 * p.sbk + gn * p.sbn) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < SIMT_BK; ++k) {
            const float4 av = *reinterpret_cast<const float4*>(&As[k][ty * 4]);
            const float4 bv = *reinterpret_cast<const float4*>(&Bs[k][tx * 4]);
            const float ar[4] = {av.x, av.y, av.z, av.w};
            const float br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
            if (m < p.M && n < p.N) {
                TC* dst = c + (i64)m * p.ldc + n;
                float v = p.alpha * acc[i][j];
                if (p.beta != 0.0f) v += p.beta * load_f32(dst);
                store_f32(dst, v);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) gemm_simt_f32(SimtParams p, const float* __restrict__ a,
                                                                const float* __restrict__ b,
                                                                float* __restrict__ c) {
    gemm_simt_body<float, float>(p, a, b, c);
}
extern "C" __global__ void __launch_bounds__(256) gemm_simt_bf16(SimtParams p, const bf16* __restrict__ a,
                                                                 const bf16* __restrict__ b,
                                                                 bf16* __restrict__ c) {
    gemm_simt_body<bf16, bf16>(p, a, b, c);
}
extern "C" __global__ void __launch_bounds__(256) gemm_simt_bf16_f32(SimtParams p,
                                                                     const bf16* __restrict__ a,
                                                                     const bf16* __restrict__ b,
                                                                     float* __restrict__ c) {
    gemm_simt_body<bf16, float>(p, a, b, c);
}
