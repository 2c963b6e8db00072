// emu.h: the device side of the CUDA emulator (tools/cuda-emu/README.md).
//
// The emulator's NVRTC (nvrtc.cpp) compiles a kernel file with the host C++ compiler, this
// header forced in front (-include) and RLHF_CUDA_EMU defined, into a shared library that its
// driver (driver.cpp) loads as the "module". Everything a kernel needs from the device lives
// here:
//   - the CUDA keywords (__global__, __shared__, __launch_bounds__ ...) as plain C++;
//   - threadIdx/blockIdx/blockDim/gridDim, per emulated thread;
//   - a block scheduler: each CUDA thread of a block is a fiber with its own stack;
//     a fiber runs until it reaches __syncthreads or a warp collective, where it waits until
//     every live thread of its block (or warp) has arrived. Threads of one block interleave at
//     exactly the points CUDA makes them meet, and nowhere else, so a missing __syncthreads
//     shows up as a wrong result (thread 0 runs ahead and reads what the others have not
//     written yet), and a barrier that some threads never reach is reported as a deadlock;
//   - warp shuffles, and C++ models of the PTX in kernels/common.cuh (cvt to bf16, ldmatrix,
//     mma.sync m16n8k16, cp.async), written from the PTX ISA's fragment layouts. A cp.async
//     poisons its destination when issued and lands at the cp.async.wait_group that covers
//     it, so reading too early and overwriting too early both show up as NaN;
//   - dynamic shared memory (NaN at the start of every block) mapped into an emulated .shared
//     window, and Hopper's wgmma.mma_async m64nNk16 bf16 with its matrix descriptors,
//     canonical shared-memory layouts and swizzles, run at the wgmma.wait_group that covers it
//     (README.md, "Dynamic shared memory and wgmma");
//   - mbarriers (phases, arrival and tx counts; a wait blocks the fiber until its phase
//     completes), TMA tiled tensor loads (cp.async.bulk.tensor.3d: out-of-bounds zeros, the
//     swizzle modes, poisoned at the issue and landing as late as possible) and setmaxnreg's
//     rules (README.md, "mbarrier, TMA and setmaxnreg").
//
// Blocks of one launch run one after another on the launching host thread, and launches of one
// module take its lock, so one block of a module runs at a time: __shared__ variables are plain
// `static`s, and the scheduler's state is plain globals (no thread-local lookups on the hot
// path).
//
// What it cannot show: timing, memory-model races between blocks, bank conflicts, register or
// shared-memory limits (tools/check-kernels reports those from ptxas), and the exact rounding
// of the hardware's mma accumulation order. It checks semantics, not speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sys/mman.h>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>

#include "tensormap.h"  // the CUtensorMap encoding shared with driver.cpp

#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#ifdef RLHF_EMU_SCAN
// Only while nvrtc.cpp preprocesses a file to list its kernels: the mark survives the
// preprocessor and names every `extern "C" __global__` function, macro-generated ones included.
#define __global__ RLHF_EMU_KERNEL_MARK
#else
#define __global__
#endif

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
struct float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct int2 { int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace rlhf_emu {

// Where the emulator is, for the driver's fault report: the driver passes a pointer to its
// copy at each launch and reads it from its SIGSEGV handler.
struct Where {
    const char* kernel;
    unsigned block[3];
    unsigned thread[3];
};

enum class State { Runnable, AtBarrier, AtWarp, AtMbar, Done };

// Fiber switching. On x86-64 a hand-written switch that saves only the callee-saved registers
// (ucontext's swapcontext makes a sigprocmask system call on every switch, which made the
// emulator spend half its time in the kernel); elsewhere, ucontext.
#if defined(__x86_64__)
extern "C" void rlhf_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .hidden rlhf_emu_switch
    .globl rlhf_emu_switch
    .type rlhf_emu_switch,@function
rlhf_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size rlhf_emu_switch, .-rlhf_emu_switch
)");
struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

struct Thread {
    Context ctx;
    uint3 tid;
    int linear;  // threadIdx in row-major x-fastest order
    State state;
    unsigned exchanges;  // warp exchanges done: picks the slot buffer (see warp_exchange)
    // cp.async: copies issued but not yet committed, and committed groups not yet waited.
    struct Copy { void* dst; unsigned char bytes[16]; };
    std::vector<Copy> open_group;
    std::vector<std::vector<Copy>> groups;
    // wgmma.mma_async (see "wgmma" below): ops issued but not yet committed, committed groups
    // not yet waited, and the accumulators those ops will write.
    // fenced: the block had executed fence.proxy.async when the op was issued (else it may
    // read only shared memory that TMA copies wrote, see run_wgmma).
    struct WgOp { float* d; int nn, ta, tb; uint64_t da, db; bool fenced; };
    struct WgAcc {
        float* d;
        int nn;
        int pending;        // ops in flight that accumulate into d
        float snap[128];    // d as the thread must leave it until they land (NN/2 <= 128)
    };
    std::vector<WgOp> wg_open;
    std::vector<std::vector<WgOp>> wg_groups;
    std::vector<WgAcc> wg_accs;
    bool wg_fenced;        // has executed wgmma.fence (needed before its first mma_async)
    unsigned wg_cursor;    // wgmma instructions executed (index into its warpgroup's log)
    // While state == AtMbar: the mbarrier (index into Block::mbars) and the phase parity it
    // waits for; wait_bar is -1 once a completed phase released it.
    int wait_bar;
    unsigned wait_parity;
};

// One wgmma instruction as the first thread of a warpgroup to reach it executed it: every
// thread of the warpgroup must execute the same sequence (.aligned), with the same operands.
struct WgLog {
    enum Kind { Fence, Mma, Commit, Wait, SetmaxInc, SetmaxDec } kind;
    int nn, ta, tb;
    uint64_t da, db;
    int n;  // wait_group N, setmaxnreg R
    bool operator==(const WgLog& o) const {
        return kind == o.kind && nn == o.nn && ta == o.ta && tb == o.tb && da == o.da && db == o.db && n == o.n;
    }
};

constexpr int kSlotBytes = 64;
constexpr size_t kStackBytes = 64 * 1024;  // per thread (see stack_of)
constexpr int kMaxThreads = 1024;          // per block, as on every CUDA GPU

struct Warp {
    int size = 0;     // lanes that exist (fewer than 32 in a partial last warp)
    int live = 0;     // lanes that exist and have not returned
    int arrived = 0;  // lanes waiting at the current collective
    unsigned char slot[2][32][kSlotBytes];
    // Lanes ready to run, first in first out (each lane is in it at most once).
    int ready[32];
    unsigned ready_head = 0, ready_len = 0;
};

// An mbarrier object (PTX ISA "Parallel Synchronization and Communication Instructions:
// mbarrier"). Its state lives here; the 8 bytes of shared memory it occupies hold a tag and its
// index (see mbar_lookup), so a barrier never initialised, or overwritten since, is recognised.
struct Mbar {
    uint32_t off;        // byte offset in the dynamic shared memory
    int expected;        // arrivals per phase (mbarrier.init's count)
    int pending;         // arrivals still missing in the current phase
    long long tx;        // tx-count of the current phase, bytes
    unsigned phase;      // phases completed so far (the current phase's parity is phase & 1)
    int init_thread;     // linear index of the thread that initialised it
    unsigned init_gen;   // Block::sync_gen at the init
    bool fenced;         // init_thread has executed fence.mbarrier_init since the init
    unsigned fence_gen;  // Block::sync_gen at that fence
};

// A cp.async.bulk.tensor copy in flight: the bytes it will write into the dynamic shared
// memory (gathered from global memory at the issue, swizzle applied) and the mbarrier whose
// tx-count it completes when it lands.
struct TmaCopy {
    uint32_t off, bytes;
    int bar;
    int thread;  // the issuing thread (linear index), for messages
    std::vector<unsigned char> image;
};

struct Block {
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    int live = 0;
    int at_barrier = 0;
    Context scheduler;
    std::vector<char*> stacks;  // kStackBytes each
    // Bit w: warp w has ready lanes. The lowest such warp runs first (see next_context).
    uint32_t ready_warps = 0;
    bool failed = false;  // a thread broke CUDA's rules (see fail)
    std::vector<std::vector<WgLog>> wg_log;  // per warpgroup: its wgmma instructions so far
    int proxy_fences = 0;  // fence.proxy.async.shared::cta executed in this block so far
    unsigned sync_gen = 0;  // __syncthreads completed in this block so far
    std::vector<Mbar> mbars;  // every mbarrier initialised in this block
    std::vector<TmaCopy> tma;  // TMA copies issued and not yet landed, oldest first
    // Per 16 bytes of dynamic shared memory: last written by a TMA copy (the async proxy), so
    // wgmma may read it without a fence.proxy.async (see run_wgmma).
    std::vector<unsigned char> async_chunk;
};

inline Thread* cur = nullptr;
inline Block* block = nullptr;
inline uint3 block_idx{0, 0, 0};
inline uint3 block_dim{1, 1, 1};
inline uint3 grid_dim{1, 1, 1};
inline Where* where = nullptr;
inline void (*entry_fn)(void**) = nullptr;
inline void** entry_params = nullptr;
inline const char* failure = nullptr;

// Dynamic shared memory of the running launch: `dyn_smem_bytes` bytes at `dyn_smem` (null when
// the launch asked for none), refilled with 0xff at the start of every block. Its .shared
// window address (what cvta.to.shared gives, see smem_u32) starts at kDynSmemWindow, not 0: on
// sm_90 the first kilobyte of the window is reserved, and a kernel must not assume either.
// The host address is 1024-byte aligned, so host and window addresses agree modulo 1024 (what
// the swizzle patterns and any alignment a kernel does depend on).
constexpr uint32_t kDynSmemWindow = 1024;
constexpr uint32_t kMaxDynSmem = 227 * 1024;  // an H100's opt-in limit per block
inline unsigned char* dyn_smem = nullptr;
inline uint32_t dyn_smem_bytes = 0;

[[noreturn]] inline void fatal(const char* what) {
    std::fprintf(stderr, "cuda-emu: %s in kernel %s, block (%u,%u,%u), thread (%u,%u,%u)\n", what,
                 where ? where->kernel : "?", block_idx.x, block_idx.y, block_idx.z,
                 cur ? cur->tid.x : 0u, cur ? cur->tid.y : 0u, cur ? cur->tid.z : 0u);
    std::abort();
}

inline void note_where() {
    if (!where) return;
    where->block[0] = block_idx.x, where->block[1] = block_idx.y, where->block[2] = block_idx.z;
    where->thread[0] = cur->tid.x, where->thread[1] = cur->tid.y, where->thread[2] = cur->tid.z;
}

inline void switch_to(Context& save, Context& load) {
#if defined(__x86_64__)
    rlhf_emu_switch(&save.sp, load.sp);
#else
    swapcontext(&save.uc, &load.uc);
#endif
}

inline void make_ready(Block& b, Thread& t) {
    t.state = State::Runnable;
    const int wi = t.linear >> 5;
    Warp& w = b.warps[wi];
    w.ready[(w.ready_head + w.ready_len++) & 31] = t.linear;
    b.ready_warps |= 1u << wi;
}

// The context to run next, else the scheduler's. Warps are independent between block
// barriers, so any order is a legal schedule; this one runs the lowest-numbered warp with a
// ready lane, so warp 0 gets as far ahead of the others as a barrier allows. That is the order
// that exposes a missing __syncthreads: warp 0 refills or reads shared memory while the other
// warps have not yet read or written it. Within a warp, lanes run in the order they became
// ready.
inline Context& next_context() {
    Block& b = *block;
    if (b.ready_warps == 0) return b.scheduler;
    const int wi = __builtin_ctz(b.ready_warps);
    Warp& w = b.warps[wi];
    Thread& t = b.threads[w.ready[w.ready_head]];
    w.ready_head = (w.ready_head + 1) & 31;
    if (--w.ready_len == 0) b.ready_warps &= ~(1u << wi);
    cur = &t;
    note_where();
    return t.ctx;
}

// Blocks the current thread (its state already says where it waits) and runs the next ready
// one directly, without a detour through the scheduler; returns when it is released.
inline void suspend() {
    Thread* me = cur;
    Context& next = next_context();
    if (&next != &me->ctx) switch_to(me->ctx, next);
    cur = me;
    note_where();
}

inline void release_barrier(Block& b) {
    ++b.sync_gen;
    for (auto& t : b.threads)
        if (t.state == State::AtBarrier) make_ready(b, t);
    b.at_barrier = 0;
}

// Ends the block: a thread did something CUDA leaves undefined. The launch fails with `what`;
// the block's fibers are abandoned where they stand.
[[noreturn]] inline void fail(const char* what) {
    static char msg[900];
    std::snprintf(msg, sizeof msg, "%s (thread (%u,%u,%u))", what, cur->tid.x, cur->tid.y, cur->tid.z);
    failure = msg;
    block->failed = true;
    Context dead;
    switch_to(dead, block->scheduler);
    __builtin_unreachable();
}

// fail() with a formatted message.
template <typename... A>
[[noreturn]] inline void failf(const char* fmt, A... a) {
    static char msg[800];
    std::snprintf(msg, sizeof msg, fmt, a...);
    fail(msg);
}

// Barriers and warp collectives must be reached by every thread of the block (warp): one that
// some threads skip by returning early is undefined behaviour in CUDA even where a GPU happens
// to let it pass (compute-sanitizer's synccheck reports it as well), so here it fails the launch.
inline void syncthreads() {
    Block& b = *block;
    if (b.live != (int)b.threads.size())
        fail("divergent __syncthreads: some threads of the block have already returned");
    cur->state = State::AtBarrier;
    if (++b.at_barrier == b.live) {
        // The releasing thread queues like the others (all leave the barrier at once).
        release_barrier(b);
    }
    suspend();
}

inline int lane() { return cur->linear & 31; }
inline Warp& my_warp() { return block->warps[cur->linear >> 5]; }

inline void release_warp(Block& b, Warp& w, int base) {
    for (int l = 0; l < 32 && base + l < (int)b.threads.size(); ++l) {
        Thread& t = b.threads[base + l];
        if (t.state == State::AtWarp) make_ready(b, t);
    }
    w.arrived = 0;
}

// Waits until every live lane of this thread's warp is here. (Masks are not tracked: every
// collective in the kernels is warp-wide, and a partial one deadlocks here, reported.)
inline void warp_sync() {
    Warp& w = my_warp();
    if (w.live != w.size) fail("divergent warp collective: some lanes of the warp have already returned");
    cur->state = State::AtWarp;
    if (++w.arrived == w.live) {
        // The last lane to arrive continues at once; the others follow in lane order.
        cur->state = State::Runnable;
        release_warp(*block, w, cur->linear & ~31);
        return;
    }
    suspend();
}

// All lanes publish `bytes` of their own; after the sync each may read any lane's. One sync
// is enough because consecutive exchanges alternate between two slot buffers: a lane can
// start exchange k+1 early, but cannot pass its sync, and so cannot reach exchange k+2 and
// overwrite buffer k, before every lane has finished reading exchange k.
template <typename F>
inline void warp_exchange(const void* mine, size_t bytes, F&& read) {
    Warp& w = my_warp();
    const unsigned buf = cur->exchanges++ & 1;
    std::memcpy(w.slot[buf][lane()], mine, bytes);
    warp_sync();
    read(w.slot[buf]);
}

template <typename T>
inline T shfl_from(T v, int src) {
    static_assert(sizeof(T) <= kSlotBytes, "shuffle of a type wider than a slot");
    T r = v;
    warp_exchange(&v, sizeof(T), [&](unsigned char (*slot)[kSlotBytes]) {
        if (src >= 0 && src < 32) std::memcpy(&r, slot[src], sizeof(T));
    });
    return r;
}


// ---- mbarrier phases and TMA landing (the scheduler's part; the instructions are below) -----
//
// PTX ISA, mbarrier: a phase completes when its pending arrivals and its tx-count are both 0;
// the barrier then moves to the next phase and the pending count is reset to the expected one.
// try_wait.parity P holds once the phase of parity P has completed, i.e. while the current
// phase's parity differs from P. A TMA copy lands (writes its bytes, then performs complete-tx
// with its byte count) as late as the emulator can make it: when a thread waits on its barrier
// and the phase is not yet complete, or when every live thread of the block is blocked.

inline bool mbar_done(const Mbar& m, unsigned parity) { return (m.phase & 1u) != parity; }

inline void mbar_complete_phase_if_done(Block& b, int id) {
    Mbar& m = b.mbars[id];
    if (m.pending != 0 || m.tx != 0) return;
    ++m.phase;
    m.pending = m.expected;
    for (auto& t : b.threads)
        if (t.state == State::AtMbar && t.wait_bar == id && mbar_done(m, t.wait_parity)) {
            t.wait_bar = -1;
            make_ready(b, t);
        }
}

// complete-tx of `bytes` on barrier `id`. Returns an error message, or null.
inline const char* mbar_complete_tx(Block& b, int id, uint32_t bytes) {
    Mbar& m = b.mbars[id];
    m.tx -= bytes;
    if (m.tx < 0) {
        // The PTX ISA allows a transiently negative tx-count (a copy completing before the
        // expect-tx that announces it). Here copies land as late as possible, after every
        // expect-tx their issuer made before blocking, so a negative count means the phase
        // announced fewer bytes than its copies bring.
        static char msg[400];
        std::snprintf(msg, sizeof msg,
                      "mbarrier at dynamic shared memory +0x%x: tx-count went negative (%lld) when a TMA copy of %u "
                      "bytes completed in phase %u: arrive.expect_tx announced fewer bytes than the copies bring",
                      m.off, m.tx, bytes, m.phase);
        return msg;
    }
    mbar_complete_phase_if_done(b, id);
    return nullptr;
}

// Lands copy `i` of the block's copies in flight. Returns an error message, or null.
inline const char* tma_land(Block& b, size_t i) {
    TmaCopy c = std::move(b.tma[i]);
    b.tma.erase(b.tma.begin() + (long)i);
    std::memcpy(dyn_smem + c.off, c.image.data(), c.bytes);
    for (uint32_t k = c.off / 16; k < (c.off + c.bytes + 15) / 16; ++k) b.async_chunk[k] = 1;
    return mbar_complete_tx(b, c.bar, c.bytes);
}

// What a block that cannot go on is waiting for: "N threads wait on the mbarrier at +0x..
// for parity P (current phase ..., A of E arrivals pending, tx-count T bytes)" for up to three
// barriers, appended to `out`.
inline void describe_mbar_waits(const Block& b, char* out, size_t len) {
    size_t used = std::strlen(out);
    int shown = 0;
    std::vector<int> seen;
    for (const auto& t : b.threads) {
        if (t.state != State::AtMbar) continue;
        const int id = t.wait_bar;
        bool dup = false;
        for (int s : seen) dup |= s == id * 2 + (int)t.wait_parity;
        if (dup) continue;
        seen.push_back(id * 2 + (int)t.wait_parity);
        if (shown++ == 3) {
            std::snprintf(out + used, len - used, "; ...");
            return;
        }
        int n = 0;
        for (const auto& u : b.threads) n += u.state == State::AtMbar && u.wait_bar == id && u.wait_parity == t.wait_parity;
        const Mbar& m = b.mbars[id];
        const int w = std::snprintf(out + used, len - used,
                                    "; %d wait on the mbarrier at +0x%x for the phase of parity %u (it is in phase %u "
                                    "with %d of %d arrivals pending and tx-count %lld bytes%s)",
                                    n, m.off, t.wait_parity, m.phase, m.pending, m.expected, m.tx,
                                    m.tx > 0 ? ": arrive.expect_tx announced more bytes than the copies brought" : "");
        if (w < 0 || (size_t)w >= len - used) return;
        used += (size_t)w;
    }
}

inline void thread_main() {
    entry_fn(entry_params);
    Block& b = *block;
    if (b.at_barrier > 0) fail("divergent __syncthreads: a thread returned while others wait at one");
    if (b.warps[cur->linear >> 5].arrived > 0)
        fail("divergent warp collective: a lane returned while others of its warp wait at one");
    // The accumulator registers of an op still in flight belong to a frame that is gone: on a
    // GPU the results are lost (or land in registers reused since).
    if (!cur->wg_open.empty()) fail("thread returned with wgmma.mma_async ops never committed (wgmma.commit_group)");
    if (!cur->wg_groups.empty()) fail("thread returned with wgmma groups never waited for (wgmma.wait_group)");
    cur->state = State::Done;
    --b.live;
    --b.warps[cur->linear >> 5].live;
}

// A fiber's first frame. It never returns: when the kernel function has returned, it hands
// over to the next ready thread (or the scheduler) for good.
inline void fiber_entry() {
    thread_main();
    Context dead;
    switch_to(dead, next_context());
    __builtin_unreachable();
}

inline void start_fiber(Thread& t, char* stack, size_t bytes, Context& scheduler) {
#if defined(__x86_64__)
    // The stack rlhf_emu_switch's pops and `ret` expect: six callee-saved registers, then the
    // address to return to (fiber_entry), then a dummy return address for fiber_entry, so that
    // it starts with rsp = 8 (mod 16) as after a call.
    uintptr_t top = ((uintptr_t)(stack + bytes)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;
    *--sp = (void*)&fiber_entry;
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    t.ctx.sp = sp;
    (void)scheduler;
#else
    getcontext(&t.ctx.uc);
    t.ctx.uc.uc_stack.ss_sp = stack;
    t.ctx.uc.uc_stack.ss_size = bytes;
    t.ctx.uc.uc_link = &scheduler.uc;
    makecontext(&t.ctx.uc, (void (*)())fiber_entry, 0);
#endif
}

// Fiber stacks: one region of kMaxThreads stacks of kStackBytes, made once per module. They
// sit close together (on transparent huge pages where the kernel allows) because a block's
// threads switch constantly: with 256 KB guarded stacks, TLB and cache misses on the stack tops
// made every switch cost several times more. A canary at the bottom of each stack, checked
// after every block, catches a thread that used more than its stack.
constexpr uint64_t kCanary = 0x5a17ca9a5a17ca9aull;
inline char* stack_region = nullptr;

inline char* stack_of(int i) {
    if (!stack_region) {
        const size_t huge = 2u << 20, bytes = kStackBytes * kMaxThreads;
        char* p = (char*)mmap(nullptr, bytes + huge, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return nullptr;
        p = (char*)(((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1));
        madvise(p, bytes, MADV_HUGEPAGE);
        stack_region = p;
    }
    return stack_region + (size_t)i * kStackBytes;
}

// Runs one block to completion. Returns false (with `failure` set) on a deadlock.
inline bool run_block(Block& b) {
    const int n = (int)b.threads.size();
    b.live = n;
    b.at_barrier = 0;
    for (auto& w : b.warps) w.size = w.live = 0, w.arrived = 0, w.ready_head = w.ready_len = 0;
    b.ready_warps = 0;
    b.failed = false;
    b.wg_log.assign((n + 127) / 128, {});
    b.proxy_fences = 0;
    b.sync_gen = 0;
    b.mbars.clear();
    b.tma.clear();
    b.async_chunk.assign((dyn_smem_bytes + 15) / 16, 0);
    // Every block starts with its dynamic shared memory unwritten: NaN (0xff bytes), so a read
    // before the block's own write shows, whatever an earlier block left there.
    if (dyn_smem) std::memset(dyn_smem, 0xff, dyn_smem_bytes);
    for (int i = 0; i < n; ++i) {
        Thread& t = b.threads[i];
        t.open_group.clear();
        t.groups.clear();
        t.wg_open.clear();
        t.wg_groups.clear();
        t.wg_accs.clear();
        t.wg_fenced = false;
        t.wg_cursor = 0;
        t.wait_bar = -1;
        t.exchanges = 0;
        ++b.warps[i >> 5].live;
        ++b.warps[i >> 5].size;
        std::memcpy(b.stacks[i], &kCanary, sizeof kCanary);
        start_fiber(t, b.stacks[i], kStackBytes, b.scheduler);
        make_ready(b, t);
    }
    // Threads hand over to each other; control comes back here only when none is ready. Then,
    // while threads are still live (blocked), the oldest TMA copy in flight lands: the latest
    // moment it can, and perhaps what releases some of them.
    for (;;) {
        if (b.ready_warps) switch_to(b.scheduler, next_context());
        if (b.failed || b.live == 0 || b.tma.empty()) break;
        if (const char* e = tma_land(b, 0)) {
            failure = e;
            b.failed = true;
        }
    }
    for (int i = 0; i < n; ++i)
        if (std::memcmp(b.stacks[i], &kCanary, sizeof kCanary) != 0) {
            cur = &b.threads[i];
            fatal("fiber stack overflow (a thread used more than 64 KB of stack)");
        }
    if (b.failed) return false;
    if (b.live == 0 && !b.tma.empty()) {
        static char msg[400];
        const TmaCopy& c = b.tma.front();
        const Thread& t = b.threads[c.thread];
        std::snprintf(msg, sizeof msg,
                      "the block ended with %zu TMA copies still in flight (the oldest: %u bytes into dynamic shared "
                      "memory +0x%x, issued by thread (%u,%u,%u), on the mbarrier at +0x%x): no thread waited for them",
                      b.tma.size(), c.bytes, c.off, t.tid.x, t.tid.y, t.tid.z, b.mbars[c.bar].off);
        failure = msg;
        return false;
    }
    if (b.live == 0) {
        // .aligned: every thread of a warpgroup executes the same wgmma instructions. One that
        // skipped some (or all) of what its warpgroup executed is reported here, once the
        // whole block has run.
        for (int i = 0; i < n; ++i) {
            const auto& log = b.wg_log[i / 128];
            if (b.threads[i].wg_cursor != log.size()) {
                static char msg[300];
                std::snprintf(msg, sizeof msg,
                              "wgmma instructions not executed by the whole warpgroup: thread (%u,%u,%u) "
                              "executed %u of the %zu that warpgroup %d executed",
                              b.threads[i].tid.x, b.threads[i].tid.y, b.threads[i].tid.z, b.threads[i].wg_cursor,
                              log.size(), i / 128);
                failure = msg;
                return false;
            }
        }
        return true;
    }
    int at_barrier = 0, at_warp = 0, at_mbar = 0;
    for (auto& t : b.threads) {
        at_barrier += t.state == State::AtBarrier;
        at_warp += t.state == State::AtWarp;
        at_mbar += t.state == State::AtMbar;
    }
    static char msg[700];
    std::snprintf(msg, sizeof msg,
                  "deadlock: %d threads wait at __syncthreads, %d at a warp collective, %d on an mbarrier, %d have "
                  "returned, no TMA copy is in flight",
                  at_barrier, at_warp, at_mbar, n - b.live);
    describe_mbar_waits(b, msg, sizeof msg);
    failure = msg;
    return false;
}


}  // namespace rlhf_emu

#define threadIdx (rlhf_emu::cur->tid)
#define blockIdx (rlhf_emu::block_idx)
#define blockDim (rlhf_emu::block_dim)
#define gridDim (rlhf_emu::grid_dim)
#define warpSize 32

inline void __syncthreads() { rlhf_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { rlhf_emu::warp_sync(); }

template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    const int l = rlhf_emu::lane();
    return rlhf_emu::shfl_from(v, (l & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    const int l = rlhf_emu::lane(), s = l ^ mask;
    return rlhf_emu::shfl_from(v, (s & ~(width - 1)) == (l & ~(width - 1)) ? s : l);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    const int l = rlhf_emu::lane(), s = l + (int)delta;
    return rlhf_emu::shfl_from(v, (s & ~(width - 1)) == (l & ~(width - 1)) ? s : l);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    const int l = rlhf_emu::lane(), s = l - (int)delta;
    return rlhf_emu::shfl_from(v, s >= (l & ~(width - 1)) ? s : l);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned r = 0;
    const int p = pred != 0;
    rlhf_emu::warp_exchange(&p, sizeof p, [&](unsigned char (*slot)[rlhf_emu::kSlotBytes]) {
        const int base = rlhf_emu::cur->linear & ~31;
        for (int l = 0; l < 32 && base + l < (int)rlhf_emu::block->threads.size(); ++l) {
            int v;
            std::memcpy(&v, slot[l], sizeof v);
            if (rlhf_emu::block->threads[base + l].state != rlhf_emu::State::Done && v) r |= 1u << l;
        }
    });
    return r;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) {
    const int base = rlhf_emu::cur->linear & ~31;
    unsigned live = 0;
    for (int l = 0; l < 32 && base + l < (int)rlhf_emu::block->threads.size(); ++l)
        if (rlhf_emu::block->threads[base + l].state != rlhf_emu::State::Done) live |= 1u << l;
    return __ballot_sync(m, pred) == live;
}

// ---- arithmetic intrinsics ----------------------------------------------------------------

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// CUDA's math API classifies floats with unqualified isfinite / isnan / isinf.
using std::isfinite;
using std::isinf;
using std::isnan;
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// Blocks run one at a time and fibers switch only at barriers and collectives, so these are
// atomic already; the builtins keep them so should the driver ever run blocks in parallel.
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

[[noreturn]] inline void __trap() { rlhf_emu::fatal("__trap()"); }

// ---- models of the PTX in kernels/common.cuh (which skips its asm under RLHF_CUDA_EMU) ------

typedef unsigned short bf16;
typedef unsigned int u32;

// cvt.rn.bf16.f32: round to nearest even; every NaN becomes the canonical NaN 0x7fff (seen on
// an H200: f32::NAN, 0x7fc00000, converts to 0x7fff, where the CPU's cast keeps 0x7fc0).
inline bf16 f32_to_bf16(float f) {
    const u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fffu;
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// cvt.rn.bf16x2.f32 d, hi, lo: `lo` in the low half.
inline u32 pack_bf16x2(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

inline void cp_async16(void* smem_dst, const void* gmem_src) {
    if (((uintptr_t)smem_dst | (uintptr_t)gmem_src) & 15)
        rlhf_emu::fatal("cp.async 16: address not 16-byte aligned");
    rlhf_emu::Thread::Copy c;
    c.dst = smem_dst;
    std::memcpy(c.bytes, gmem_src, 16);
    // On a GPU the bytes land at some moment between the issue and the wait that covers them.
    // Both ends are made visible: the destination turns to 0xff (NaN) now, so a thread still
    // reading the old contents (a missing barrier before the refill) sees NaN, and the data
    // lands only at the wait, so a read before it sees NaN too.
    std::memset(smem_dst, 0xff, 16);
    rlhf_emu::cur->open_group.push_back(c);
}
inline void cp_async_commit() {
    auto& t = *rlhf_emu::cur;
    t.groups.push_back(std::move(t.open_group));
    t.open_group.clear();
}
// cp.async.wait_group N: every committed group but the newest N has landed.
template <int N>
inline void cp_async_wait() {
    auto& g = rlhf_emu::cur->groups;
    while ((int)g.size() > N) {
        for (auto& c : g.front()) {
            std::memcpy(c.dst, c.bytes, 16);
            // cp.async writes through the generic proxy: a wgmma reading them needs a fence.
            const uintptr_t o = (uintptr_t)c.dst - (uintptr_t)rlhf_emu::dyn_smem;
            if (rlhf_emu::dyn_smem && (uintptr_t)c.dst >= (uintptr_t)rlhf_emu::dyn_smem && o < rlhf_emu::dyn_smem_bytes)
                rlhf_emu::block->async_chunk[o / 16] = 0;
        }
        g.erase(g.begin());
    }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// 8x8 matrix i; register i of lane l gets row l/4, columns 2(l%4)..+1 of matrix i (.trans:
// rows 2(l%4)..+1 of column l/4).
template <bool TRANS>
inline void ldmatrix_x4(u32 (&r)[4], const bf16* p) {
    if ((uintptr_t)p & 15) rlhf_emu::fatal("ldmatrix: row address not 16-byte aligned");
    const int l = rlhf_emu::lane(), g = l >> 2, t = l & 3;
    rlhf_emu::warp_exchange(&p, sizeof p, [&](unsigned char (*slot)[rlhf_emu::kSlotBytes]) {
        for (int i = 0; i < 4; ++i) {
            bf16 lo, hi;
            if (TRANS) {
                const bf16 *r0, *r1;
                std::memcpy(&r0, slot[8 * i + 2 * t], sizeof r0);
                std::memcpy(&r1, slot[8 * i + 2 * t + 1], sizeof r1);
                lo = r0[g], hi = r1[g];
            } else {
                const bf16* row;
                std::memcpy(&row, slot[8 * i + g], sizeof row);
                lo = row[2 * t], hi = row[2 * t + 1];
            }
            r[i] = (u32)lo | ((u32)hi << 16);
        }
    });
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, D = A·B + C, with the fragment layouts
// of the PTX ISA (g = lane / 4, t = lane % 4):
//   A regs: (row g, k 2t..2t+1), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..)
//   B regs: (k 2t..2t+1, col g), (k 2t+8.., col g)
//   C: (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t), (row g+8, col 2t+1)
// Products of bf16 values are exact in f32; the sum runs in k order (the hardware's order and
// internal precision differ slightly: the tests' bf16 tolerances cover it).
inline void mma_bf16_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    struct Frag { u32 a[4], b[2]; };
    const Frag mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
    float A[16][16], B[16][8];
    rlhf_emu::warp_exchange(&mine, sizeof mine, [&](unsigned char (*slot)[rlhf_emu::kSlotBytes]) {
        auto half = [](u32 r, int hi) { return __uint_as_float((hi ? r >> 16 : r & 0xffffu) << 16); };
        for (int l = 0; l < 32; ++l) {
            Frag f;
            std::memcpy(&f, slot[l], sizeof f);
            const int g = l >> 2, t = l & 3;
            for (int j = 0; j < 2; ++j) {
                A[g][2 * t + j] = half(f.a[0], j);
                A[g + 8][2 * t + j] = half(f.a[1], j);
                A[g][2 * t + 8 + j] = half(f.a[2], j);
                A[g + 8][2 * t + 8 + j] = half(f.a[3], j);
                B[2 * t + j][g] = half(f.b[0], j);
                B[2 * t + 8 + j][g] = half(f.b[1], j);
            }
        }
    });
    const int l = rlhf_emu::lane(), g = l >> 2, t = l & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
        float s = c[i];
        for (int k = 0; k < 16; ++k) s += A[rows[i]][k] * B[k][cols[i]];
        c[i] = s;
    }
}

// ---- dynamic shared memory and the Hopper wgmma (sm_90a) models --------------------------
//
// Written from the PTX ISA, sections "Asynchronous Warpgroup Level Matrix Multiply-Accumulate
// Instructions" (wgmma.fence, wgmma.mma_async, commit_group, wait_group) and "Register
// Fragments and Shared Memory Matrix Layouts" (canonical layouts, matrix descriptor).

typedef unsigned long long u64;

// `unsigned char* name` for the launch's dynamic shared memory (the GPU version is
// `extern __shared__ __align__(16) unsigned char name[]`). A reference to the emulator's
// pointer, so it follows the launch even where declared once at file scope.
#define RLHF_DYNAMIC_SMEM(name) unsigned char* const& name = rlhf_emu::dyn_smem

namespace rlhf_emu {

// One wgmma (or setmaxnreg) instruction of the current thread, checked against what its
// warpgroup executed.
inline void wg_log(const WgLog& e, const char* what) {
    static const char* const kind_names[] = {"wgmma.fence", "wgmma.mma_async", "wgmma.commit_group",
                                             "wgmma.wait_group", "setmaxnreg.inc", "setmaxnreg.dec"};
    const int n = (int)block->threads.size(), wg = cur->linear / 128;
    if ((wg + 1) * 128 > n)
        failf("%s in a partial warpgroup: a warpgroup is 128 consecutive threads, the block has %d", what, n);
    auto& log = block->wg_log[wg];
    if (cur->wg_cursor < log.size()) {
        const WgLog& first = log[cur->wg_cursor];
        if (!(first == e))
            failf("wgmma instructions diverge within warpgroup %d: instruction #%u is %s (n%d trans %d,%d, "
                  "descriptors 0x%llx, 0x%llx, wait/R %d) here but %s (n%d trans %d,%d, descriptors 0x%llx, "
                  "0x%llx, wait/R %d) in a thread that got there first (the descriptors must be the same across "
                  "the warpgroup)",
                  wg, cur->wg_cursor, what, e.nn, e.ta, e.tb, (unsigned long long)e.da, (unsigned long long)e.db,
                  e.n, kind_names[first.kind], first.nn, first.ta, first.tb, (unsigned long long)first.da,
                  (unsigned long long)first.db, first.n);
    } else {
        log.push_back(e);
    }
    ++cur->wg_cursor;
}

// A decoded matrix descriptor (PTX ISA "Matrix Descriptor Format"): byte addresses and offsets
// in the .shared window, and the swizzle width in 16-byte units (1: no swizzle).
struct Desc {
    uint32_t start, lbo, sbo;
    int chunks;
};

inline Desc decode_desc(u64 d, const char* which) {
    // Bits 13-0 start address, 29-16 leading byte offset, 45-32 stride byte offset, each
    // (x & 0x3ffff) >> 4; 51-49 base offset; 63-62 swizzle mode. The rest is reserved.
    const u64 reserved = (3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3ffull << 52);
    if (d & reserved)
        failf("wgmma: matrix descriptor %s = 0x%llx has reserved bits set (0x%llx)", which, d, d & reserved);
    const unsigned base_offset = (unsigned)(d >> 49) & 7;
    if (base_offset != 0)
        failf("wgmma: matrix descriptor %s = 0x%llx has base offset %u; the emulator models only base offset 0 "
              "(swizzle patterns starting at the mode's 1024/512/256-byte boundary of the window address)",
              which, d, base_offset);
    Desc r;
    r.start = (uint32_t)(d & 0x3fff) << 4;
    r.lbo = (uint32_t)((d >> 16) & 0x3fff) << 4;
    r.sbo = (uint32_t)((d >> 32) & 0x3fff) << 4;
    static const int chunks[4] = {1, 8, 4, 2};  // none, 128B, 64B, 32B
    r.chunks = chunks[d >> 62];
    return r;
}

// The .shared window address of bf16 element (mn, k) of a 64x16 (A: mn = row) or 16xN (B: mn =
// column) operand, from the canonical layouts of the PTX ISA, in 16-byte units T = 8 elements
// and swizzle width S = `chunks` 16-byte units:
//   K-major,  no swizzle: ((8,m),(T,2k)) : ((1T,SBO),(1,LBO))
//   K-major,  swizzled:   ((8,m),(T,2k)) : ((S*T,SBO),(1,T))          (LBO unused)
//   MN-major, no swizzle: ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))
//   MN-major, swizzled:   ((T,S,m),(8,k)) : ((1,T,LBO),(S*T,SBO))
// then Swizzle<log2 S, 4, 3> on the byte address: bits [4, 4+log2 S) ^= bits [7, 7+log2 S),
// i.e. the 16-byte chunk within a swizzle row is XORed with the row's index within its
// 1024/512/256-byte pattern. The XOR uses the address itself (base offset 0): a kernel that
// advances the start address within a pattern (K-major, the next k16 slice of a 128-byte row)
// gets the same chunk permutation as the rows it reads.
inline uint32_t operand_addr(const Desc& d, bool mn_major, int mn, int k) {
    uint32_t off;
    const uint32_t S = (uint32_t)d.chunks;
    if (!mn_major) {
        const uint32_t row = (uint32_t)mn, c = (uint32_t)k / 8, e = (uint32_t)k % 8;
        if (S == 1)
            off = (row % 8) * 16 + (row / 8) * d.sbo + c * d.lbo + e * 2;
        else
            off = (row % 8) * (16 * S) + (row / 8) * d.sbo + c * 16 + e * 2;
    } else {
        const uint32_t e = (uint32_t)mn % 8, c = (uint32_t)mn / 8, kr = (uint32_t)k % 8, kg = (uint32_t)k / 8;
        if (S == 1)
            off = e * 2 + c * d.sbo + kr * 16 + kg * d.lbo;
        else
            off = e * 2 + (c % S) * 16 + (c / S) * d.lbo + kr * (16 * S) + kg * d.sbo;
    }
    uint32_t a = d.start + off;
    if (S > 1) a ^= ((a >> 7) & (S - 1)) << 4;
    return a;
}

inline float load_operand(const Desc& d, bool mn_major, int mn, int k, const Thread::WgOp& op, char which) {
    const uint32_t a = operand_addr(d, mn_major, mn, k);
    if (a < kDynSmemWindow || a + 2 > kDynSmemWindow + dyn_smem_bytes)
        failf("wgmma m64n%dk16: %c element (%s %d, k %d) at shared address 0x%x is outside the launch's dynamic "
              "shared memory [0x%x, 0x%x) (descriptors a 0x%llx, b 0x%llx)",
              op.nn, which, which == 'A' ? "row" : "col", mn, k, a, kDynSmemWindow, kDynSmemWindow + dyn_smem_bytes,
              op.da, op.db);
    // Shared memory written by threads (the generic proxy) must be ordered before the async
    // proxy's reads by a fence.proxy.async; what TMA copies wrote is in the async proxy already.
    if (!op.fenced && !block->async_chunk[(a - kDynSmemWindow) / 16])
        failf("wgmma m64n%dk16 reads shared memory (%c element at 0x%x) that no TMA copy wrote, and no thread of the "
              "block had executed fence.proxy.async when it was issued (the generic-proxy writes that filled it are "
              "not ordered before the async proxy's reads)",
              op.nn, which, a);
    bf16 h;
    std::memcpy(&h, dyn_smem + (a - kDynSmemWindow), 2);
    return __uint_as_float((u32)h << 16);
}

inline Thread::WgAcc* find_acc(float* d) {
    for (auto& a : cur->wg_accs)
        if (a.d == d) return &a;
    return nullptr;
}

// Runs one mma_async now: reads A and B from shared memory as they are at this moment (the
// wait that covers the op), and adds A·B into this thread's accumulator fragment: in warp w of
// the warpgroup, lane l (g = l/4, t = l%4) holds, for each 8-column chunk j,
//   d[4j+0] = (row 16w+g, col 8j+2t), d[4j+1] = (16w+g, 8j+2t+1),
//   d[4j+2] = (16w+g+8, 8j+2t),       d[4j+3] = (16w+g+8, 8j+2t+1).
// Products of bf16 are exact in f32; the sum runs in k order.
inline void run_wgmma(const Thread::WgOp& op) {
    Thread::WgAcc* acc = find_acc(op.d);
    if (std::memcmp(acc->snap, op.d, sizeof(float) * (size_t)(op.nn / 2)) != 0)
        failf("wgmma m64n%dk16: the accumulator registers were written while the op was in flight (between "
              "wgmma.mma_async and the wgmma.wait_group that covers it)",
              op.nn);
    const Desc da = decode_desc(op.da, "a"), db = decode_desc(op.db, "b");
    const int l = cur->linear & 31, w = (cur->linear & 127) >> 5, g = l >> 2, t = l & 3;
    float a[2][16];
    for (int r = 0; r < 2; ++r)
        for (int k = 0; k < 16; ++k) a[r][k] = load_operand(da, op.ta != 0, 16 * w + g + 8 * r, k, op, 'A');
    for (int j = 0; j < op.nn / 8; ++j)
        for (int c = 0; c < 2; ++c) {
            float b[16];
            for (int k = 0; k < 16; ++k) b[k] = load_operand(db, op.tb != 0, 8 * j + 2 * t + c, k, op, 'B');
            for (int r = 0; r < 2; ++r) {
                float s = op.d[4 * j + 2 * r + c];
                for (int k = 0; k < 16; ++k) s += a[r][k] * b[k];
                op.d[4 * j + 2 * r + c] = s;
            }
        }
    if (--acc->pending > 0) {
        std::memcpy(acc->snap, op.d, sizeof(float) * (size_t)(op.nn / 2));
    } else {
        *acc = cur->wg_accs.back();
        cur->wg_accs.pop_back();
    }
}

inline void wgmma_issue(float* d, int nn, int ta, int tb, u64 da, u64 db) {
    char what[64];
    std::snprintf(what, sizeof what, "wgmma.mma_async m64n%dk16", nn);
    wg_log(WgLog{WgLog::Mma, nn, ta, tb, da, db, 0}, what);
    if (!cur->wg_fenced) fail("wgmma.mma_async before this thread's first wgmma.fence (PTX: a wgmma.fence must come first)");
    (void)decode_desc(da, "a");  // reject bad descriptors at the issue
    (void)decode_desc(db, "b");
    Thread::WgAcc* acc = find_acc(d);
    if (!acc) {
        cur->wg_accs.push_back({});
        acc = &cur->wg_accs.back();
        acc->d = d, acc->nn = nn, acc->pending = 0;
        std::memcpy(acc->snap, d, sizeof(float) * (size_t)(nn / 2));
    } else if (acc->nn != nn) {
        failf("wgmma: accumulator used by an m64n%dk16 and an m64n%dk16 op in flight at once", acc->nn, nn);
    }
    ++acc->pending;
    cur->wg_open.push_back(Thread::WgOp{d, nn, ta, tb, da, db, block->proxy_fences > 0});
}

}  // namespace rlhf_emu

// cvta.to.shared: the .shared window address of a generic pointer into shared memory. Only the
// dynamic shared memory is mapped into the emulated window; a static __shared__ array is not.
inline u32 smem_u32(const void* p) {
    using namespace rlhf_emu;
    const uintptr_t a = (uintptr_t)p, b = (uintptr_t)dyn_smem;
    if (!dyn_smem || a < b || a > b + dyn_smem_bytes)
        failf("smem_u32: %p is not in the launch's dynamic shared memory (%u bytes at %p); the emulator maps only "
              "dynamic shared memory (RLHF_DYNAMIC_SMEM) into the .shared window, not static __shared__ arrays",
              p, dyn_smem_bytes, (void*)dyn_smem);
    return kDynSmemWindow + (u32)(a - b);
}

// fence.proxy.async.shared::cta: orders this thread's generic-proxy shared-memory writes before
// later async-proxy (wgmma) reads. Counted only: the emulator cannot see which writes a fence
// covers, so it checks only that the block executed one before a wgmma was issued, unless
// everything that wgmma reads was written by TMA copies (the async proxy itself).
inline void fence_proxy_async_smem() { ++rlhf_emu::block->proxy_fences; }

// wgmma.fence.sync.aligned
inline void wgmma_fence() {
    rlhf_emu::wg_log(rlhf_emu::WgLog{rlhf_emu::WgLog::Fence, 0, 0, 0, 0, 0, 0}, "wgmma.fence");
    rlhf_emu::cur->wg_fenced = true;
}

// wgmma.commit_group.sync.aligned: the ops issued since the last commit become one group (an
// empty one if none were).
inline void wgmma_commit() {
    using namespace rlhf_emu;
    wg_log(WgLog{WgLog::Commit, 0, 0, 0, 0, 0, 0}, "wgmma.commit_group");
    cur->wg_groups.push_back(std::move(cur->wg_open));
    cur->wg_open.clear();
}

// wgmma.wait_group.sync.aligned N: every committed group but the newest N completes. This is
// where the emulator runs them, so a kernel that refills their shared memory or reads their
// accumulators before this wait gets the wrong numbers, as it may on a GPU.
template <int N>
inline void wgmma_wait() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group N: N in 0..7");
    using namespace rlhf_emu;
    wg_log(WgLog{WgLog::Wait, 0, 0, 0, 0, 0, N}, "wgmma.wait_group");
    auto& g = cur->wg_groups;
    while ((int)g.size() > N) {
        const std::vector<Thread::WgOp> ops = std::move(g.front());
        g.erase(g.begin());
        for (const auto& op : ops) run_wgmma(op);
    }
}

// wgmma.mma_async.sync.aligned.m64n{NN}k16.f32.bf16.bf16 {d}, da, db, 1, 1, 1, TA, TB:
// D += A·B, A (64x16) and B (16xNN) bf16 in shared memory through the matrix descriptors
// (TA: 0 A K-major, 1 M-major; TB: 0 B K-major, 1 N-major). Issued here, run at the wait.
template <int NN, int TA, int TB>
inline void wgmma_m64k16_bf16(float (&d)[NN / 2], u64 da, u64 db) {
    static_assert(NN % 8 == 0 && NN >= 8 && NN <= 256, "wgmma m64nNk16: N a multiple of 8 in 8..256");
    static_assert((TA == 0 || TA == 1) && (TB == 0 || TB == 1), "wgmma: imm-trans-a/b are 0 or 1");
    rlhf_emu::wgmma_issue(d, NN, TA, TB, da, db);
}

// ---- mbarrier, TMA tensor copies and setmaxnreg (sm_90) ------------------------------------
//
// Written from the PTX ISA, sections "mbarrier" (init, arrive, expect-tx, complete-tx, phase
// completion, try_wait.parity, fence.mbarrier_init), "cp.async.bulk.tensor", "Tensors" (tiled
// mode, bounding box, out-of-bound access, swizzling) and "setmaxnreg"; the tensor map comes
// from the emulated cuTensorMapEncodeTiled (driver.cpp, tensormap.h).

// A CUtensorMap as a kernel parameter (passed by value; __grid_constant__ on a GPU).
struct __align__(64) TmaMap {
    u64 opaque[16];
};
#define RLHF_GRID_CONSTANT

namespace rlhf_emu {

constexpr uint64_t kMbarTag = 0x6d626172ull;  // "mbar", the upper half of an initialised barrier's word

inline uint32_t dyn_offset_of(const void* p, uint32_t bytes, const char* what, const char* obj) {
    const uintptr_t a = (uintptr_t)p, b0 = (uintptr_t)dyn_smem;
    if (!dyn_smem || a < b0 || a + bytes > b0 + dyn_smem_bytes)
        failf("%s: the %s at %p is not in the launch's dynamic shared memory (%u bytes at %p)", what, obj, p,
              dyn_smem_bytes, (void*)dyn_smem);
    return (uint32_t)(a - b0);
}

// The barrier at `bar`: in dynamic shared memory, 8-byte aligned, initialised, and not
// overwritten since.
inline int mbar_lookup(const u64* bar, const char* what) {
    const uint32_t off = dyn_offset_of(bar, 8, what, "mbarrier");
    if (off % 8) failf("%s: the mbarrier at dynamic shared memory +0x%x is not 8-byte aligned", what, off);
    u64 v;
    std::memcpy(&v, bar, 8);
    const uint64_t id = v & 0xffffffffu;
    Block& b = *block;
    if ((v >> 32) != kMbarTag || id >= b.mbars.size() || b.mbars[id].off != off) {
        for (const auto& m : b.mbars)
            if (m.off == off)
                failf("%s: the mbarrier at dynamic shared memory +0x%x was overwritten while in use (a store or a "
                      "TMA copy into its 8 bytes)",
                      what, off);
        failf("%s on the mbarrier at dynamic shared memory +0x%x, which was never initialised (mbarrier.init) in "
              "this block",
              what, off);
    }
    return (int)id;
}

// A barrier as an arrive, wait or TMA copy uses it. Another thread than the initialising one
// sees the init only after a __syncthreads that follows it; a TMA copy (the async proxy)
// needs the init made visible by fence.mbarrier_init in the initialising thread (and, when
// another thread issues the copy, a __syncthreads after that fence).
inline int mbar_use(const u64* bar, const char* what, bool tma) {
    const int id = mbar_lookup(bar, what);
    Block& b = *block;
    const Mbar& m = b.mbars[id];
    const uint3 it = b.threads[m.init_thread].tid;
    const bool other = cur->linear != m.init_thread;
    if (other && b.sync_gen == m.init_gen)
        failf("%s on the mbarrier at +0x%x, which thread (%u,%u,%u) initialised with no __syncthreads between that "
              "mbarrier.init and this use (the init is not guaranteed visible to this thread)",
              what, m.off, it.x, it.y, it.z);
    if (tma && !m.fenced)
        failf("%s on the mbarrier at +0x%x: thread (%u,%u,%u) initialised it but has not executed "
              "fence.mbarrier_init (fence_mbar_init) since, so the init is not visible to the async proxy",
              what, m.off, it.x, it.y, it.z);
    if (tma && other && b.sync_gen == m.fence_gen)
        failf("%s on the mbarrier at +0x%x: no __syncthreads between thread (%u,%u,%u)'s fence.mbarrier_init and "
              "this use",
              what, m.off, it.x, it.y, it.z);
    return id;
}

// arrive-on: one of the current phase's expected arrivals.
inline void mbar_arrive_on(int id, const char* what) {
    Block& b = *block;
    Mbar& m = b.mbars[id];
    if (m.pending == 0)
        failf("%s on the mbarrier at +0x%x: all %d expected arrivals of phase %u have arrived already (tx-count %lld "
              "bytes pending): more arrivals than the count given to mbarrier.init",
              what, m.off, m.expected, m.phase, m.tx);
    --m.pending;
    mbar_complete_phase_if_done(b, id);
}

}  // namespace rlhf_emu

// mbarrier.init.shared::cta.b64 [bar], count: phase 0, `count` arrivals expected, tx-count 0.
inline void mbar_init(u64* bar, u32 count) {
    using namespace rlhf_emu;
    const char* what = "mbarrier.init";
    const uint32_t off = dyn_offset_of(bar, 8, what, "mbarrier");
    if (off % 8) failf("%s: the mbarrier at dynamic shared memory +0x%x is not 8-byte aligned", what, off);
    if (count < 1 || count > (1u << 20) - 1)
        failf("%s: count %u is outside 1..2^20-1 (the expected arrival count's range)", what, count);
    Block& b = *block;
    for (const auto& c : b.tma)
        if (off < c.off + c.bytes && c.off < off + 8)
            failf("%s at +0x%x: a TMA copy still in flight writes there", what, off);
    int id = -1;
    for (size_t i = 0; i < b.mbars.size(); ++i)
        if (b.mbars[i].off == off) id = (int)i;
    if (id >= 0) {
        // Initialising it again is fine only when nothing is under way on it.
        const Mbar& m = b.mbars[id];
        bool busy = m.pending != m.expected || m.tx != 0;
        for (const auto& t : b.threads) busy |= t.state == State::AtMbar && t.wait_bar == id;
        for (const auto& c : b.tma) busy |= c.bar == id;
        if (busy)
            failf("%s at +0x%x: the barrier is in use (phase %u with %d of %d arrivals pending, tx-count %lld, or "
                  "threads or copies waiting on it)",
                  what, off, m.phase, m.pending, m.expected, m.tx);
    } else {
        id = (int)b.mbars.size();
        b.mbars.push_back({});
    }
    Mbar& m = b.mbars[id];
    m.off = off;
    m.expected = m.pending = (int)count;
    m.tx = 0;
    m.phase = 0;
    m.init_thread = cur->linear;
    m.init_gen = b.sync_gen;
    m.fenced = false;
    m.fence_gen = 0;
    const u64 v = (kMbarTag << 32) | (u64)id;
    std::memcpy(bar, &v, 8);
}

// fence.mbarrier_init.release.cluster: makes this thread's earlier mbarrier.init visible (to
// the async proxy, and to other threads after a barrier). Recorded per barrier, see mbar_use.
inline void fence_mbar_init() {
    using namespace rlhf_emu;
    for (auto& m : block->mbars)
        if (m.init_thread == cur->linear && !m.fenced) m.fenced = true, m.fence_gen = block->sync_gen;
}

// mbarrier.arrive.shared::cta.b64 _, [bar]
inline void mbar_arrive(u64* bar) {
    using namespace rlhf_emu;
    mbar_arrive_on(mbar_use(bar, "mbarrier.arrive", false), "mbarrier.arrive");
}

// mbarrier.arrive.expect_tx.shared::cta.b64 _, [bar], bytes: expect-tx (tx-count += bytes),
// then arrive-on.
inline void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
    using namespace rlhf_emu;
    const char* what = "mbarrier.arrive.expect_tx";
    const int id = mbar_use(bar, what, false);
    Mbar& m = block->mbars[id];
    m.tx += bytes;
    if (m.tx > (1 << 20) - 1)
        failf("%s on the mbarrier at +0x%x: tx-count %lld exceeds 2^20-1 (the PTX ISA's range)", what, m.off, m.tx);
    mbar_arrive_on(id, what);
}

// Loops on mbarrier.try_wait.parity.shared::cta.b64 until the phase of parity `parity` has
// completed. The copies in flight on this barrier land first, oldest first, as long as the
// phase is not complete; if it still is not, the thread blocks until it is.
inline void mbar_wait(u64* bar, u32 parity) {
    using namespace rlhf_emu;
    const char* what = "mbarrier.try_wait.parity";
    if (parity > 1) failf("%s: phaseParity %u (it is 0 or 1)", what, parity);
    const int id = mbar_use(bar, what, false);
    Block& b = *block;
    for (size_t i = 0; i < b.tma.size() && !mbar_done(b.mbars[id], parity);) {
        if (b.tma[i].bar != id) {
            ++i;
            continue;
        }
        if (const char* e = tma_land(b, i)) fail(e);
    }
    if (mbar_done(b.mbars[id], parity)) return;
    cur->state = State::AtMbar;
    cur->wait_bar = id;
    cur->wait_parity = parity;
    suspend();  // made ready only by the completion of the phase it waits for
}

// cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes
//     [dst], [map, {c0, c1, c2}], [bar]
// Copies the box at (c0 innermost, c1, c2) into dst in box order (innermost fastest), zeros for
// elements outside the tensor (coordinates may be negative or past the end), with the map's
// swizzle applied to each byte's .shared window address: bits [4, 4+log2(span/16)) ^= bits
// [7, 7+log2(span/16)), span 128, 64 or 32 bytes (the wgmma canonical layouts' Swizzle<3|2|1,4,3>).
// At the issue dst turns to 0xff (NaN); the data lands later (see mbar_wait and run_block) and
// then performs complete-tx of the box's bytes on `bar`.
inline void tma_load_3d(void* dst, const TmaMap* map, int c0, int c1, int c2, u64* bar) {
    using namespace rlhf_emu;
    namespace tm = rlhf_emu_tmap;
    const char* what = "cp.async.bulk.tensor.3d";
    tm::Encoded e;
    std::memcpy(&e, map, sizeof e);
    if (e.magic != tm::kMagic) failf("%s: the tensor map was not made by cuTensorMapEncodeTiled", what);
    if (e.rank != 3) failf("%s with a rank-%u tensor map (the instruction's dimension must be the map's rank)", what, e.rank);
    for (int i = 0; i < 3; ++i)
        if (e.elem_stride[i] != 1)
            failf("%s: elementStrides[%d] = %u; the emulator models only traversal stride 1", what, i, e.elem_stride[i]);
    if (e.oob_fill != 0) failf("%s: the emulator models only CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE (zeros)", what);
    if (e.data_type >= 10)
        failf("%s: data type %u (FLOAT32_FTZ / TFLOAT32 conversions) is not modelled", what, e.data_type);
    const uint32_t es = e.elem_bytes, span = tm::swizzle_span(e.swizzle), inner = e.box[0] * es;
    if (span && inner != span)
        failf("%s: the inner box extent is %u bytes with a %u-byte swizzle; the emulator models swizzled boxes only "
              "with the inner extent equal to the swizzle span",
              what, inner, span);
    const uint32_t bytes = e.box[0] * e.box[1] * e.box[2] * es;
    const uint32_t off = dyn_offset_of(dst, bytes, what, "destination box");
    const uint32_t win = kDynSmemWindow + off, align = span ? span * 8 : 128;
    if (win % align)
        failf("%s: the destination (.shared 0x%x) is not %u-byte aligned (%s)", what, win, align,
              span ? "the swizzle pattern's repeat" : "cp.async.bulk.tensor's shared-memory alignment");
    const int id = mbar_use(bar, what, true);
    Block& b = *block;
    for (const auto& m : b.mbars)
        if (m.off < off + bytes && off < m.off + 8)
            failf("%s: the destination [+0x%x, +0x%x) covers the mbarrier at +0x%x", what, off, off + bytes, m.off);
    for (const auto& c : b.tma)
        if (c.off < off + bytes && off < c.off + c.bytes)
            failf("%s: the destination [+0x%x, +0x%x) overlaps a TMA copy still in flight into [+0x%x, +0x%x) (issued "
                  "before anyone waited for it: a stage refilled before it was released?)",
                  what, off, off + bytes, c.off, c.off + c.bytes);
    TmaCopy c;
    c.off = off, c.bytes = bytes, c.bar = id, c.thread = cur->linear;
    c.image.assign(bytes, 0);
    const char* base = (const char*)(uintptr_t)e.global_address;
    const long long at[3] = {c0, c1, c2};
    uint32_t o = 0;
    for (uint32_t i2 = 0; i2 < e.box[2]; ++i2)
        for (uint32_t i1 = 0; i1 < e.box[1]; ++i1)
            for (uint32_t i0 = 0; i0 < e.box[0]; ++i0, o += es) {
                const long long g[3] = {at[0] + i0, at[1] + i1, at[2] + i2};
                uint32_t a = win + o;
                if (span) a ^= ((a >> 7) & (span / 16 - 1)) << 4;
                bool inside = true;
                for (int d = 0; d < 3; ++d) inside &= g[d] >= 0 && (unsigned long long)g[d] < e.dim[d];
                if (!inside) continue;  // out of bounds: zero
                const char* src = base + g[0] * es + g[1] * (long long)e.stride[0] + g[2] * (long long)e.stride[1];
                std::memcpy(&c.image[a - win], src, es);
            }
    std::memset(dyn_smem + off, 0xff, bytes);
    b.tma.push_back(std::move(c));
}

// setmaxnreg.{inc,dec}.sync.aligned.u32 R: a hint about registers, nothing to model but its
// rules: R a multiple of 8 in 24..256 (checked when compiled) and executed by every thread of
// the warpgroup alike (.sync.aligned; checked with the wgmma instructions' sequence).
template <u32 R>
inline void setmaxnreg_inc() {
    static_assert(R % 8 == 0 && R >= 24 && R <= 256, "setmaxnreg: R must be a multiple of 8 in 24..256");
    rlhf_emu::wg_log(rlhf_emu::WgLog{rlhf_emu::WgLog::SetmaxInc, 0, 0, 0, 0, 0, (int)R}, "setmaxnreg.inc");
}
template <u32 R>
inline void setmaxnreg_dec() {
    static_assert(R % 8 == 0 && R >= 24 && R <= 256, "setmaxnreg: R must be a multiple of 8 in 24..256");
    rlhf_emu::wg_log(rlhf_emu::WgLog{rlhf_emu::WgLog::SetmaxDec, 0, 0, 0, 0, 0, (int)R}, "setmaxnreg.dec");
}

// ---- launching: the entry point the driver calls -------------------------------------------

template <typename... A, size_t... I>
inline void rlhf_emu_invoke(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
template <typename... A>
inline void rlhf_emu_invoke(void (*f)(A...), void** p) {
    rlhf_emu_invoke(f, p, std::index_sequence_for<A...>{});
}
// nvrtc.cpp appends one of these per kernel it found: `__emu_entry_<name>` unpacks the
// driver's kernelParams (an array of pointers to each argument) into a call.
#define RLHF_EMU_REGISTER(name) \
    extern "C" __attribute__((visibility("default"))) void __emu_entry_##name(void** p) { rlhf_emu_invoke(&name, p); }

namespace rlhf_emu {
// Places `bytes` of dynamic shared memory for a launch: the buffer ends at a page boundary
// followed by an inaccessible page (reading or writing past its end, rounded up to 1024 bytes,
// faults), and starts 1024-byte aligned. One region per module, made once.
inline bool place_dyn_smem(uint32_t bytes) {
    static char* region = nullptr;
    const size_t page = 4096, data = (kMaxDynSmem + page - 1) / page * page;
    if (!region) {
        void* m = mmap(nullptr, data + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return false;
        region = (char*)m;
        mprotect(region + data, page, PROT_NONE);
    }
    dyn_smem_bytes = bytes;
    dyn_smem = bytes ? (unsigned char*)region + data - (bytes + 1023) / 1024 * 1024 : nullptr;
    return true;
}
}  // namespace rlhf_emu

// Runs a whole grid with `smem` bytes of dynamic shared memory. Returns 0, or -1 with a message
// in `err` (a deadlock, a broken rule). (Named _v2 since it took `smem`: a driver never calls a
// module built for the other signature.)
extern "C" __attribute__((visibility("default"))) int __emu_launch_v2(
    void (*entry)(void**), const char* name, const unsigned grid[3], const unsigned blk[3], unsigned smem,
    void** params, rlhf_emu::Where* where, char* err, size_t err_len) {
    using namespace rlhf_emu;
    static std::mutex launch_lock;  // one block of this module at a time (see the top)
    std::lock_guard<std::mutex> hold(launch_lock);
    if (smem > kMaxDynSmem) {
        std::snprintf(err, err_len, "%u bytes of dynamic shared memory (the limit is %u)", smem, kMaxDynSmem);
        return -1;
    }
    if (!place_dyn_smem(smem)) {
        std::snprintf(err, err_len, "out of memory for %u bytes of dynamic shared memory", smem);
        return -1;
    }
    const int n = (int)(blk[0] * blk[1] * blk[2]);
    Block b;
    b.threads.resize(n);
    b.warps.resize((n + 31) / 32);
    if (n > kMaxThreads) {
        std::snprintf(err, err_len, "%d threads per block (the limit is %d)", n, kMaxThreads);
        return -1;
    }
    for (int i = 0; i < n; ++i) {
        char* s = stack_of(i);
        if (!s) {
            std::snprintf(err, err_len, "out of memory for %d fiber stacks", n);
            return -1;
        }
        b.stacks.push_back(s);
    }
    for (int i = 0; i < n; ++i) {
        Thread& t = b.threads[i];
        t.linear = i;
        t.tid = {(unsigned)(i % blk[0]), (unsigned)((i / blk[0]) % blk[1]), (unsigned)(i / (blk[0] * blk[1]))};
    }
    rlhf_emu::where = where;
    where->kernel = name;
    block = &b;
    block_dim = {blk[0], blk[1], blk[2]};
    grid_dim = {grid[0], grid[1], grid[2]};
    entry_fn = entry;
    entry_params = params;
    int rc = 0;
    for (unsigned z = 0; z < grid[2] && rc == 0; ++z)
        for (unsigned y = 0; y < grid[1] && rc == 0; ++y)
            for (unsigned x = 0; x < grid[0] && rc == 0; ++x) {
                block_idx = {x, y, z};
                if (!run_block(b)) {
                    std::snprintf(err, err_len, "kernel %s, block (%u,%u,%u): %s", name, x, y, z, failure);
                    rc = -1;
                }
            }
    block = nullptr;
    cur = nullptr;
    rlhf_emu::where = nullptr;
    dyn_smem = nullptr;
    dyn_smem_bytes = 0;
    return rc;
}
