// gemm.cu: batched matrix multiplication C = alpha · A·B + beta · C.
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
// Entry points:
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
