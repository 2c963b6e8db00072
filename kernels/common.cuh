// common.cuh: the prelude the kernel registry puts in front of every kernels/*.cu file before
// NVRTC compiles it (crates/tensor/src/cuda/kernels.rs; a `#line 1 "<file>.cu"` directive
// follows it, so compiler messages point at the right file and line).
//
// Kernels include no headers at all: NVRTC alone compiles them, so a machine needs only
// libnvrtc (or a PTX cache filled elsewhere) and no CUDA toolkit. That is why bf16 is handled
// here as raw 16-bit patterns instead of through cuda_bf16.h: the conversions are single PTX
// instructions on sm_80 and newer, which every kernel targets.
//
// Conventions shared by all kernels:
// - Element counts, offsets and strides are `long long` (64-bit): tensors over 2^31 elements
//   happen (a 50257 x 8192 logits matrix in f32 is 1.6 GB).
// - Strides are in elements, not bytes; a pointer argument already includes the tensor's offset.
// - Every reduction accumulates in f32, whatever the storage dtype.
// - Work that needs a combination across threads combines in a fixed order (fixed trees,
//   fixed per-thread ranges), never through floating-point atomics, so a launch with the same
//   inputs and the same launch configuration gives bitwise-identical results.

typedef unsigned short bf16;  // bfloat16 storage: the upper 16 bits of an IEEE f32
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define RLHF_MAX_DIMS 8
#define RLHF_WARP 32

// ---- bf16 <-> f32 ------------------------------------------------------------------------

__device__ __forceinline__ float bf16_to_f32(bf16 h) {
    return __uint_as_float(((u32)h) << 16);
}

#ifndef RLHF_CUDA_EMU  // the CPU emulator models these two (tools/cuda-emu/emu.h)
// Round to nearest even, NaN stays NaN (cvt.rn.bf16.f32, sm_80+).
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Two f32 into one register of two bf16: `lo` in the low half (the lower-indexed element, the
// order mma.sync and ldmatrix use).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#endif

// Loads and stores that convert through f32, so one template body serves f32 and bf16.
__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const bf16* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(bf16* p, float v) { *p = f32_to_bf16(v); }

// ---- warp and block reductions (fixed trees: deterministic) ---------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds 32 floats in shared
// memory. blockDim.x must be a multiple of 32. Contains __syncthreads: call from all threads.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -__int_as_float(0x7f800000);
    return warp_max(v);
}

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// ---- strided indexing -----------------------------------------------------------------------

// Shape and strides of up to RLHF_MAX_DIMS dims, passed by value as a kernel parameter.
// Dims beyond `rank` are ignored. A broadcast dim has stride 0.
struct Strided {
    int rank;
    i64 shape[RLHF_MAX_DIMS];
    i64 stride[RLHF_MAX_DIMS];
};
// Kernel parameter structs are filled by the host as #[repr(C)] Rust structs with the same
// fields in the same order (crates/tensor/src/cuda/params.rs). Both sides assert the size, so
// a field added or removed on one side only fails the build (NVRTC has no offsetof; the Rust
// tests also pin the offsets).
static_assert(sizeof(Strided) == 136,
              "Strided must match crates/tensor/src/cuda/params.rs");

// Storage offset of the i-th element in row-major order over `s.shape`.
__device__ __forceinline__ i64 strided_offset(const Strided& s, i64 i) {
    i64 off = 0;
    for (int d = s.rank - 1; d >= 0; --d) {
        const i64 n = s.shape[d];
        off += (i % n) * s.stride[d];
        i /= n;
    }
    return off;
}

// As strided_offset, for a layout of fewer than 2^32 elements (so every index and extent fits
// 32 bits): 32-bit divisions, several times cheaper than 64-bit ones, which the GPU emulates.
__device__ __forceinline__ i64 strided_offset32(const Strided& s, u32 i) {
    i64 off = 0;
    for (int d = s.rank - 1; d >= 0; --d) {
        const u32 n = (u32)s.shape[d];
        off += (i64)(i % n) * s.stride[d];
        i /= n;
    }
    return off;
}

// Everything below is inline PTX. The CPU emulator (tools/cuda-emu) compiles these files as
// C++ and brings its own models of these functions, written from the same PTX ISA layouts.
#ifndef RLHF_CUDA_EMU

// ---- shared-memory addresses for PTX ------------------------------------------------------

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// ---- tensor-core and async-copy PTX (sm_80+), shared by gemm.cu and flash_attention.cu ------

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const bf16* p) {
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_addr(p)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- Hopper warpgroup MMA (wgmma, sm_90a only) ----------------------------------------------
//
// Compiled only for the architecture-specific target (NVRTC --gpu-architecture=compute_90a
// defines __CUDA_ARCH_FEAT_SM90_ALL), which the engine picks on compute capability 9.0.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The .shared state-space address (what matrix descriptors hold) of a pointer into shared memory.
__device__ __forceinline__ u32 smem_u32(const void* p) { return smem_addr(p); }

// Dynamic shared memory of the launch (sized by the launch, beyond the 48 KB of static memory).
#define RLHF_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

// Orders this thread's earlier generic-proxy writes to shared memory (st.shared, cp.async)
// before later async-proxy reads of it (wgmma operands).
__device__ __forceinline__ void fence_proxy_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Orders the warpgroup's register accesses before the wgmma.mma_async that follow.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups are still pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// D[64, NN] += A[64, 16] · B[16, NN], bf16 operands in shared memory given by matrix
// descriptors, f32 accumulators in registers (scale-d = 1: always accumulate). TA = 1: A is
// M-major (imm-trans-a), else K-major; TB = 1: B is N-major, else K-major. Accumulator layout:
// warp w of the warpgroup holds rows 16w..16w+15; with g = lane / 4, t = lane % 4, n8 chunk j
// is d[4j..4j+3] = (g, 8j+2t), (g, 8j+2t+1), (g+8, 8j+2t), (g+8, 8j+2t+1).
#define RLHF_F8(i)                                                                             \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
        "+f"(d[i + 6]), "+f"(d[i + 7])
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], u64 da, u64 db) {
    asm volatile(
        "{ .reg .pred p; setp.ne.b32 p, %68, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, %66, %67; }\n"
        : RLHF_F8(0), RLHF_F8(8), RLHF_F8(16), RLHF_F8(24),
          RLHF_F8(32), RLHF_F8(40), RLHF_F8(48), RLHF_F8(56)
        : "l"(da), "l"(db), "n"(TA), "n"(TB), "r"(1));
}
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], u64 da, u64 db) {
    asm volatile(
        "{ .reg .pred p; setp.ne.b32 p, %132, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p, 1, 1, %130, %131; }\n"
        : RLHF_F8(0), RLHF_F8(8), RLHF_F8(16), RLHF_F8(24),
          RLHF_F8(32), RLHF_F8(40), RLHF_F8(48), RLHF_F8(56),
          RLHF_F8(64), RLHF_F8(72), RLHF_F8(80), RLHF_F8(88),
          RLHF_F8(96), RLHF_F8(104), RLHF_F8(112), RLHF_F8(120)
        : "l"(da), "l"(db), "n"(TA), "n"(TB), "r"(1));
}
#undef RLHF_F8

template <int NN, int TA, int TB>
__device__ __forceinline__ void wgmma_m64k16_bf16(float (&d)[NN / 2], u64 da, u64 db) {
    static_assert(NN == 128 || NN == 256, "wgmma_m64k16_bf16: instantiated for N = 128 and 256");
    if constexpr (NN == 128)
        wgmma_m64n128k16<TA, TB>(d, da, db);
    else
        wgmma_m64n256k16<TA, TB>(d, da, db);
}

// ---- Hopper tensor memory access (TMA) and mbarriers ------------------------------------------

// A tensor map (CUtensorMap): 128 opaque bytes the host encodes with cuTensorMapEncodeTiled,
// passed to the kernel by value as a __grid_constant__ parameter.
struct __align__(64) TmaMap {
    u64 opaque[16];
};
#define RLHF_GRID_CONSTANT __grid_constant__

// An mbarrier in shared memory: `count` arrivals (plus any expected transaction bytes) complete
// a phase; waiters name the phase by its parity.
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// Makes this thread's mbarrier initialisations visible to the other threads and to the TMA unit.
__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Expects `bytes` more transaction bytes (TMA copies completing on this barrier), then arrives.
__device__ __forceinline__ void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}
// Returns once the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    const u32 addr = smem_u32(bar);
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }\n"
            : "=r"(done)
            : "r"(addr), "r"(parity)
            : "memory");
    }
}
// Copies the box at coordinates (c0 innermost, c1, c2) of the tensor `map` describes into shared
// memory at `dst` (laid out, and swizzled, as the map says; out-of-bounds elements are zero);
// its bytes count as completed transactions on `bar`.
__device__ __forceinline__ void tma_load_3d(void* dst, const TmaMap* map, int c0, int c1, int c2, u64* bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
        : "memory");
}
// Warpgroup-wide register budget changes (warp-specialised kernels: the data-movement
// warpgroup gives registers to the MMA warpgroups).
template <u32 R>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <u32 R>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

#endif  // RLHF_CUDA_EMU
