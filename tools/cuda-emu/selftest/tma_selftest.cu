// tma_selftest.cu: the kernel side of the emulator's TMA / mbarrier self-test (run.sh,
// tma_main.cpp). Compiled only by the emulated NVRTC; it uses the interface kernels/common.cuh
// provides on a GPU (RLHF_DYNAMIC_SMEM, smem_u32, TmaMap, mbar_*, tma_load_3d, setmaxnreg_*,
// the wgmma wrappers, cp_async16).
//
//   tma_box     one TMA box into dynamic shared memory, copied out raw: the host compares the
//               bytes with its own reading of the tiled-mode and swizzle rules;
//   tma_ring    a warp-specialised ring: warpgroup 0 (one thread) produces tiles by TMA into
//               kStages stages with full/empty mbarriers, warpgroups 1 and 2 consume them; the
//               modes break one rule each;
//   tma_wgmma   A (K-major, 128B swizzle) and B (N-major, 128B swizzle, 64-column panels) by
//               TMA, one m64n128k16 wgmma per k16 step, no fence.proxy.async; or A by cp.async.

enum RingMode {
    RingGood = 0,
    RingReadEarly,     // consumers read the stage before waiting on its full barrier
    RingNoEmptyWait,   // the producer refills stages without waiting on their empty barrier
    RingExpectLess,    // expect_tx announces 16 bytes too few
    RingExpectMore,    // ... 16 bytes too many
    RingUninit,        // the empty barriers are never initialised
    RingDeadlock,      // full barriers expect 2 arrivals, only the producer arrives
    RingNoFence,       // no fence.mbarrier_init after the inits
    RingNoSync,        // no __syncthreads between the inits and their use by other threads
    RingExtraArrive,   // the producer arrives on a full barrier besides its arrive.expect_tx
    RingInFlightAtExit,  // the producer issues one more copy that nobody waits for
    RingSetmaxDiverge,   // one warp of a consumer warpgroup asks for another register count
    RingStaticBar,       // a barrier in a static __shared__ variable
    RingMisalignedBar,   // a barrier at a 4-byte offset
};

constexpr int kStages = 4;
constexpr int kStageBytes = 8 * 32 * 4;  // a tile: 8 rows of 32 f32, 128-byte rows (128B swizzle)

// The .shared byte address of logical byte `o` of a box whose first byte is at window address
// `base`, under CuTe's Swizzle<b,4,3> (bits [4, 4+b) ^= bits [7, 7+b)).
__device__ u32 swizzled(u32 base, u32 o, int b) {
    const u32 a = base + o, mask = ((1u << b) - 1) << 7;
    return a ^ ((a & mask) >> 3);
}

extern "C" __global__ void tma_box(const RLHF_GRID_CONSTANT TmaMap map, int c0, int c1, int c2, unsigned bytes,
                                   unsigned dst_off, unsigned char* out) {
    RLHF_DYNAMIC_SMEM(smem);
    u64* bar = (u64*)smem;
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        fence_mbar_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_arrive_expect_tx(bar, bytes);
        tma_load_3d(smem + dst_off, &map, c0, c1, c2, bar);
    }
    mbar_wait(bar, 0);
    for (unsigned i = threadIdx.x; i < bytes; i += blockDim.x) out[i] = smem[dst_off + i];
}

extern "C" __global__ void tma_ring(const RLHF_GRID_CONSTANT TmaMap map, int iters, int mode, float* out) {
    RLHF_DYNAMIC_SMEM(smem);
    u64* full = (u64*)smem;
    u64* empty = full + kStages;
    if (mode == RingMisalignedBar) full = (u64*)(smem + 4);
    __shared__ u64 static_bar;
    if (mode == RingStaticBar) full = &static_bar;
    const u32 stage0 = 1024;  // stage s at dynamic offset 1024 * (s + 1): 1024-aligned in the window too
    const int tid = threadIdx.x, wg = tid / 128;
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&full[s], mode == RingDeadlock ? 2 : 1);
            if (mode != RingUninit) mbar_init(&empty[s], 256);
        }
        if (mode != RingNoFence) fence_mbar_init();
    }
    if (mode != RingNoSync) __syncthreads();
    if (wg == 0) {
        setmaxnreg_dec<40>();
        if (tid != 0) return;
        for (int k = 0; k < iters; ++k) {
            const int s = k % kStages;
            // Round r = k / kStages waits for the consumers' release of round r - 1: the phase of
            // parity (r - 1) & 1, which for r = 0 is the phase before the first (complete).
            if (mode != RingNoEmptyWait) mbar_wait(&empty[s], ((k / kStages) & 1) ^ 1);
            const int delta = mode == RingExpectLess ? -16 : mode == RingExpectMore ? 16 : 0;
            mbar_arrive_expect_tx(&full[s], (u32)(kStageBytes + delta));
            if (mode == RingExtraArrive) mbar_arrive(&full[s]);
            tma_load_3d(smem + stage0 * (s + 1), &map, 0, 0, k, &full[s]);
        }
        if (mode == RingInFlightAtExit) {
            const int s = iters % kStages;
            mbar_wait(&empty[s], ((iters / kStages) & 1) ^ 1);
            mbar_arrive_expect_tx(&full[s], kStageBytes);
            tma_load_3d(smem + stage0 * (s + 1), &map, 0, 0, 0, &full[s]);
        }
        return;
    }
    if (mode == RingSetmaxDiverge && tid / 32 == 5)
        setmaxnreg_inc<240>();
    else
        setmaxnreg_inc<232>();
    const int j = tid - 128;  // element (row j / 32, column j % 32) of every tile
    const u32 win = smem_u32(smem);
    for (int k = 0; k < iters; ++k) {
        const int s = k % kStages;
        const u32 at = swizzled(win + stage0 * (s + 1), (u32)j * 4, 3) - win;
        float early = 0.0f;
        if (mode == RingReadEarly) early = *(const float*)(smem + at);
        mbar_wait(&full[s], (k / kStages) & 1);
        const float v = mode == RingReadEarly ? early : *(const float*)(smem + at);
        out[k * 256 + j] = v;
        mbar_arrive(&empty[s]);
    }
}

enum WgmmaMode { WgTma = 0, WgCpAsyncNoFence, WgCpAsyncFence };

// D (64 x 128) = A (64 x 64) · B (64 x 128): A is the box at (k 64, row 0) of a [64][128] bf16
// matrix, B the two 64-column boxes at (column 0 / 64, k 64) of a [128][128] one.
extern "C" __global__ void tma_wgmma(const RLHF_GRID_CONSTANT TmaMap map_a, const RLHF_GRID_CONSTANT TmaMap map_b,
                                     const bf16* a_global, int mode, float* D) {
    RLHF_DYNAMIC_SMEM(smem);
    u64* bar = (u64*)smem;
    const u32 a_off = 1024, b_off = a_off + 8192;  // window 2048 and 10240: 1024-aligned
    const int tid = threadIdx.x;
    const u32 win = smem_u32(smem);
    if (tid == 0) {
        mbar_init(bar, 1);
        fence_mbar_init();
    }
    __syncthreads();
    if (mode != WgTma) {
        // A by cp.async into the same swizzled K-major layout: row m is 128 bytes (k 64..127).
        for (int i = tid; i < 64 * 8; i += 128) {
            const int m = i / 8, c = i % 8;
            const u32 at = swizzled(win + a_off, (u32)(m * 128 + c * 16), 3) - win;
            cp_async16(smem + at, a_global + m * 128 + 64 + c * 8);
        }
        cp_async_commit();
        cp_async_wait<0>();
        if (mode == WgCpAsyncFence) fence_proxy_async_smem();
    }
    if (tid == 0) {
        mbar_arrive_expect_tx(bar, (mode == WgTma ? 8192u : 0u) + 16384u);
        if (mode == WgTma) tma_load_3d(smem + a_off, &map_a, 64, 0, 0, bar);
        tma_load_3d(smem + b_off, &map_b, 0, 64, 0, bar);
        tma_load_3d(smem + b_off + 8192, &map_b, 64, 64, 0, bar);
    }
    __syncthreads();
    mbar_wait(bar, 0);
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    float d[64];
    for (int i = 0; i < 64; ++i) d[i] = 0.0f;
    wgmma_fence();
    for (int kk = 0; kk < 4; ++kk) {
        // A K-major, 128B swizzle: 8-row groups 1024 bytes apart (SBO), the k16 slice 32 bytes on.
        const u64 da = (u64)(((win + a_off + 32 * kk) & 0x3ffff) >> 4) | (1ull << 16) | ((u64)(1024 >> 4) << 32) |
                       (1ull << 62);
        // B N-major, 128B swizzle: k rows 128 bytes apart, 8-k groups 1024 apart (SBO), 64-column
        // panels 8192 apart (LBO), the k16 slice 2048 bytes on.
        const u64 db = (u64)(((win + b_off + 2048 * kk) & 0x3ffff) >> 4) | ((u64)(8192 >> 4) << 16) |
                       ((u64)(1024 >> 4) << 32) | (1ull << 62);
        wgmma_m64k16_bf16<128, 0, 1>(d, da, db);
        wgmma_commit();
        wgmma_wait<0>();
    }
    const int w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    for (int i = 0; i < 64; ++i)
        D[(16 * w + g + 8 * ((i % 4) / 2)) * 128 + 8 * (i / 4) + 2 * t + i % 2] = d[i];
#endif
}
