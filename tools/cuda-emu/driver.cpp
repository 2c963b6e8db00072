// driver.cpp: the emulator's libcuda.so.1 (tools/cuda-emu/README.md).
//
// One emulated device ("rlhf cuda-emu", compute capability 9.0 unless RLHF_CUDA_EMU_ARCH says
// e.g. 80) behind the subset of the driver API that cudarc calls for the engine. Everything is
// synchronous on the calling thread: a copy or a launch has finished when its call returns, so
// streams and events only keep their bookkeeping.
//
// Device memory is host memory, laid out to catch the bugs a GPU would only show as garbage:
//   - each allocation ends at a page boundary followed by an inaccessible page (16-byte
//     granularity, so its start stays 16-aligned, all that vector loads and cp.async need):
//     reading or writing past the end faults at once, and the fault report names the kernel,
//     block and thread;
//   - cuMemAlloc fills new memory with 0xff bytes (NaN as f32 and bf16, -1 as integers), so a
//     kernel that reads memory nobody wrote produces NaN instead of a plausible zero;
//   - copies and memsets are checked against the allocation they touch;
//   - freed memory is unmapped, so a use after free faults;
//   - the total is capped (RLHF_CUDA_EMU_MEM_MB, default 8192): an allocation beyond it is
//     CUDA_ERROR_OUT_OF_MEMORY, as on a full GPU;
//   - the device has a default memory pool (cuMemAllocAsync / cuMemFreeAsync). With a release
//     threshold above zero, freed blocks stay in the pool up to that many bytes and still count
//     as used; an allocation reuses the smallest cached block at least its size, else takes new
//     memory, so a pool full of blocks too small for a request runs out of memory until
//     cuMemPoolTrimTo gives them back, as a real pool can.
// Launches are checked against the hardware's limits (block and grid dimensions, shared memory)
// and run by the module's own __emu_launch (emu.h). RLHF_CUDA_EMU_TRACE=1 prints every launch
// (kernel, grid, block, milliseconds) on stderr. RLHF_CUDA_EMU_STATS=FILE appends, at process
// exit, one line counting the driver calls the process made (allocations, frees, memsets,
// copies, launches, events created, function lookups); RLHF_CUDA_EMU_STATS=1 prints it on
// stderr.
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "tensormap.h"

namespace {

typedef int CUresult;
enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

typedef unsigned long long CUdeviceptr;

struct Where {
    const char* kernel;
    unsigned block[3];
    unsigned thread[3];
};

typedef int (*LaunchFn)(void (*)(void**), const char*, const unsigned*, const unsigned*, unsigned, void**,
                        Where*, char*, size_t);

struct Module {
    void* handle;
    LaunchFn launch;
};

struct Function {
    Module* module;
    void (*entry)(void**);
    std::string name;
    int max_dynamic_smem = 48 * 1024;
};

struct Event {
    double seconds = 0;
};

struct Alloc {
    char* base;      // start of the mapping
    size_t mapped;   // bytes mapped, guard page included
    size_t bytes;    // bytes asked for
};

std::mutex mu;
std::map<uintptr_t, Alloc> allocs;  // by the pointer handed out
size_t allocated = 0;               // bytes in use, the pool's cached blocks included
bool initialised = false;

// The default memory pool: its release threshold and the sizes of the freed blocks it keeps.
struct Pool {
    unsigned long long release_threshold = 0;
    std::multiset<size_t> cached;
    size_t cached_bytes = 0;
} pool;

// Driver calls made, for RLHF_CUDA_EMU_STATS.
struct Stats {
    std::atomic<unsigned long long> allocs{0}, frees{0}, memsets{0}, copies{0}, launches{0}, events{0},
        lookups{0};
    ~Stats() {
        const char* to = getenv("RLHF_CUDA_EMU_STATS");
        if (!to || !*to) return;
        FILE* f = strcmp(to, "1") == 0 ? stderr : fopen(to, "a");
        if (!f) return;
        fprintf(f, "cuda-emu stats: allocs %llu frees %llu memsets %llu copies %llu launches %llu events %llu lookups %llu\n",
                allocs.load(), frees.load(), memsets.load(), copies.load(), launches.load(), events.load(),
                lookups.load());
        if (f != stderr) fclose(f);
    }
} stats;
int dummy_context;
thread_local Where where_now{nullptr, {0, 0, 0}, {0, 0, 0}};
thread_local bool in_launch = false;

const size_t kPage = 4096;

int arch_code() {
    const char* a = getenv("RLHF_CUDA_EMU_ARCH");
    int v = a && *a ? atoi(a) : 90;
    return v >= 10 ? v : 90;
}

// The most dynamic shared memory a block may opt in to (cuFuncSetAttribute
// MAX_DYNAMIC_SHARED_SIZE_BYTES), and the shared memory of one multiprocessor: 227 KB and
// 228 KB on sm_90 (H100), 163 KB and 164 KB on sm_80 (A100), 99 KB and 100 KB on sm_86/89.
int max_optin_smem() {
    const int a = arch_code();
    return (a >= 90 ? 227 : (a == 80 || a == 87) ? 163 : 99) * 1024;
}

size_t mem_limit() {
    const char* m = getenv("RLHF_CUDA_EMU_MEM_MB");
    long long v = m && *m ? atoll(m) : 8192;
    return (size_t)(v > 0 ? v : 8192) << 20;
}

double now() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// The allocation that holds [p, p + n), or null.
const Alloc* find(uintptr_t p, size_t n) {
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return nullptr;
    --it;
    if (p < it->first || p + n > it->first + it->second.bytes) return nullptr;
    return &it->second;
}

bool device_range_ok(CUdeviceptr p, size_t n) {
    if (n == 0) return true;
    std::lock_guard<std::mutex> g(mu);
    if (find((uintptr_t)p, n)) return true;
    fprintf(stderr, "cuda-emu: a copy touches device bytes [0x%llx, +%zu) outside any allocation\n",
            (unsigned long long)p, n);
    return false;
}

void on_fault(int sig, siginfo_t* info, void*) {
    char msg[512];
    int len;
    if (in_launch && where_now.kernel)
        len = snprintf(msg, sizeof msg,
                       "cuda-emu: memory fault (signal %d) at %p in kernel %s, block (%u,%u,%u), "
                       "thread (%u,%u,%u): an access outside every allocation (past the end of a "
                       "buffer, or freed memory)\n",
                       sig, info->si_addr, where_now.kernel, where_now.block[0], where_now.block[1],
                       where_now.block[2], where_now.thread[0], where_now.thread[1], where_now.thread[2]);
    else
        len = snprintf(msg, sizeof msg, "cuda-emu: memory fault (signal %d) at %p outside a kernel\n", sig,
                       info->si_addr);
    if (len > 0) (void)!write(2, msg, (size_t)len < sizeof msg ? (size_t)len : sizeof msg - 1);
    signal(sig, SIG_DFL);
    raise(sig);
}

void install_fault_handler() {
    // Fibers run on their own small stacks: the handler gets an alternate stack of its own.
    static char alt[64 * 1024];
    stack_t ss{};
    ss.ss_sp = alt;
    ss.ss_size = sizeof alt;
    sigaltstack(&ss, nullptr);
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace

extern "C" {

typedef void* CUcontext;
typedef void* CUstream;
typedef Event* CUevent;
typedef Module* CUmodule;
typedef Function* CUfunction;
typedef int CUdevice;

CUresult cuInit(unsigned) {
    std::lock_guard<std::mutex> g(mu);
    if (!initialised) install_fault_handler();
    initialised = true;
    return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int* n) {
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    *n = 1;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "rlhf cuda-emu (CPU emulation, sm_%d)", arch_code());
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
        case 1: *v = 1024; break;                  // max threads per block
        case 2: case 3: *v = 1024; break;          // max block dim x, y
        case 4: *v = 64; break;                    // max block dim z
        case 5: *v = 2147483647; break;            // max grid dim x
        case 6: case 7: *v = 65535; break;         // max grid dim y, z
        case 8: *v = 48 * 1024; break;             // shared memory per block
        case 10: *v = 32; break;                   // warp size
        case 12: *v = 65536; break;                // registers per block
        case 13: *v = 1980000; break;              // clock rate, kHz
        case 16: *v = 132; break;                  // multiprocessors (an H100 SXM's count)
        case 38: *v = 50 * 1024 * 1024; break;     // L2 bytes
        case 75: *v = arch_code() / 10; break;     // compute capability major
        case 76: *v = arch_code() % 10; break;     // compute capability minor
        case 81: *v = max_optin_smem() + 1024; break;  // shared memory per multiprocessor
        case 97: *v = max_optin_smem(); break;     // opt-in shared memory per block
        case 115: *v = 1; break;                   // memory pools supported (cuMemAllocAsync)
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = mem_limit();
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *c = &dummy_context;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext* c) {
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    *c = &dummy_context;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }
CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) {
    if (lo) *lo = 0;
    if (hi) *hi = 0;
    return CUDA_SUCCESS;
}

CUresult cuStreamCreate(CUstream* s, unsigned) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = new int(0);
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(CUstream s) {
    delete (int*)s;
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
CUresult cuStreamIsCapturing(CUstream, int* status) {
    if (status) *status = 0;
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(CUevent* e, unsigned) {
    if (!e) return CUDA_ERROR_INVALID_VALUE;
    *e = new Event;
    ++stats.events;
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent e) {
    delete e;
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream) {
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    e->seconds = now();
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    if (!ms || !a || !b) return CUDA_ERROR_INVALID_VALUE;
    *ms = (float)((b->seconds - a->seconds) * 1e3);
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuMemAlloc_v2(CUdeviceptr* out, size_t bytes) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    const size_t body = (bytes + 15) & ~(size_t)15;
    const size_t data = (body + kPage - 1) & ~(kPage - 1);
    {
        std::lock_guard<std::mutex> g(mu);
        if (allocated + data > mem_limit()) return CUDA_ERROR_OUT_OF_MEMORY;
        allocated += data;
    }
    void* m = mmap(nullptr, data + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        std::lock_guard<std::mutex> g(mu);
        allocated -= data;
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    char* base = (char*)m;
    mprotect(base + data, kPage, PROT_NONE);
    char* p = base + data - body;
    memset(p, 0xff, body);
    {
        std::lock_guard<std::mutex> g(mu);
        allocs[(uintptr_t)p] = Alloc{base, data + kPage, bytes};
    }
    ++stats.allocs;
    *out = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    Alloc a;
    {
        std::lock_guard<std::mutex> g(mu);
        auto it = allocs.find((uintptr_t)p);
        if (it == allocs.end()) {
            fprintf(stderr, "cuda-emu: cuMemFree of 0x%llx, which is not an allocation\n", p);
            return CUDA_ERROR_INVALID_VALUE;
        }
        a = it->second;
        allocs.erase(it);
        allocated -= a.mapped - kPage;
    }
    munmap(a.base, a.mapped);
    ++stats.frees;
    return CUDA_SUCCESS;
}

size_t rounded(size_t bytes) { return (((bytes + 15) & ~(size_t)15) + kPage - 1) & ~(kPage - 1); }

CUresult cuMemAllocAsync(CUdeviceptr* out, size_t bytes, CUstream) {
    if (!out || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    {
        // A cached block at least this size serves the request (it leaves the cache; the
        // allocation below counts the bytes again).
        std::lock_guard<std::mutex> g(mu);
        auto it = pool.cached.lower_bound(rounded(bytes));
        if (it != pool.cached.end()) {
            pool.cached_bytes -= *it;
            allocated -= *it;
            pool.cached.erase(it);
        }
    }
    return cuMemAlloc_v2(out, bytes);
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) {
    size_t data = 0;
    {
        std::lock_guard<std::mutex> g(mu);
        auto it = allocs.find((uintptr_t)p);
        if (it != allocs.end()) data = it->second.mapped - kPage;
    }
    const CUresult r = cuMemFree_v2(p);
    if (r != CUDA_SUCCESS) return r;
    std::lock_guard<std::mutex> g(mu);
    if (pool.cached_bytes + data <= pool.release_threshold) {
        pool.cached.insert(data);
        pool.cached_bytes += data;
        allocated += data;
    }
    return CUDA_SUCCESS;
}

typedef Pool* CUmemoryPool;
CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* out, int d) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *out = &pool;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetMemPool(CUmemoryPool* out, int d) { return cuDeviceGetDefaultMemPool(out, d); }
CUresult cuMemPoolSetAttribute(CUmemoryPool p, int attr, void* value) {
    if (p != &pool || !value) return CUDA_ERROR_INVALID_VALUE;
    if (attr != 4) return CUDA_ERROR_NOT_SUPPORTED;  // only CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
    std::lock_guard<std::mutex> g(mu);
    pool.release_threshold = *(unsigned long long*)value;
    return CUDA_SUCCESS;
}
CUresult cuMemPoolGetAttribute(CUmemoryPool p, int attr, void* value) {
    if (p != &pool || !value) return CUDA_ERROR_INVALID_VALUE;
    if (attr != 4) return CUDA_ERROR_NOT_SUPPORTED;
    std::lock_guard<std::mutex> g(mu);
    *(unsigned long long*)value = pool.release_threshold;
    return CUDA_SUCCESS;
}
CUresult cuMemPoolTrimTo(CUmemoryPool p, size_t keep) {
    if (p != &pool) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(mu);
    while (pool.cached_bytes > keep && !pool.cached.empty()) {
        auto largest = std::prev(pool.cached.end());
        pool.cached_bytes -= *largest;
        allocated -= *largest;
        pool.cached.erase(largest);
    }
    return CUDA_SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> g(mu);
    if (free_bytes) *free_bytes = mem_limit() - allocated;
    if (total) *total = mem_limit();
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    ++stats.copies;
    if (!device_range_ok(dst, n)) return CUDA_ERROR_INVALID_VALUE;
    if (n) memcpy((void*)(uintptr_t)dst, src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    ++stats.copies;
    if (!device_range_ok(src, n)) return CUDA_ERROR_INVALID_VALUE;
    if (n) memcpy(dst, (const void*)(uintptr_t)src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    ++stats.copies;
    if (!device_range_ok(dst, n) || !device_range_ok(src, n)) return CUDA_ERROR_INVALID_VALUE;
    if (n) memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, CUstream) { return cuMemcpyHtoD_v2(d, s, n); }
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, CUstream) { return cuMemcpyDtoH_v2(d, s, n); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) { return cuMemcpyDtoD_v2(d, s, n); }

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    ++stats.memsets;
    if (!device_range_ok(dst, n)) return CUDA_ERROR_INVALID_VALUE;
    if (n) memset((void*)(uintptr_t)dst, v, n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) { return cuMemsetD8_v2(dst, v, n); }
CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) {
    ++stats.memsets;
    if (!device_range_ok(dst, n * 4)) return CUDA_ERROR_INVALID_VALUE;
    unsigned* p = (unsigned*)(uintptr_t)dst;
    for (size_t i = 0; i < n; ++i) p[i] = v;
    return CUDA_SUCCESS;
}
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, CUstream) { return cuMemsetD32_v2(dst, v, n); }

struct CUDA_MEMCPY2D {
    size_t srcXInBytes, srcY;
    int srcMemoryType;
    const void* srcHost;
    CUdeviceptr srcDevice;
    void* srcArray;
    size_t srcPitch;
    size_t dstXInBytes, dstY;
    int dstMemoryType;
    void* dstHost;
    CUdeviceptr dstDevice;
    void* dstArray;
    size_t dstPitch;
    size_t WidthInBytes, Height;
};

CUresult cuMemcpy2DAsync_v2(const CUDA_MEMCPY2D* p, CUstream) {
    ++stats.copies;
    enum { HOST = 1, DEVICE = 2 };
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    if ((p->srcMemoryType != HOST && p->srcMemoryType != DEVICE) ||
        (p->dstMemoryType != HOST && p->dstMemoryType != DEVICE))
        return CUDA_ERROR_NOT_SUPPORTED;
    if (p->Height == 0 || p->WidthInBytes == 0) return CUDA_SUCCESS;
    if (p->srcPitch < p->WidthInBytes || p->dstPitch < p->WidthInBytes) return CUDA_ERROR_INVALID_VALUE;
    const size_t src0 = p->srcY * p->srcPitch + p->srcXInBytes, dst0 = p->dstY * p->dstPitch + p->dstXInBytes;
    const size_t src_span = (p->Height - 1) * p->srcPitch + p->WidthInBytes;
    const size_t dst_span = (p->Height - 1) * p->dstPitch + p->WidthInBytes;
    const char* s = p->srcMemoryType == DEVICE ? (const char*)(uintptr_t)p->srcDevice : (const char*)p->srcHost;
    char* d = p->dstMemoryType == DEVICE ? (char*)(uintptr_t)p->dstDevice : (char*)p->dstHost;
    if (p->srcMemoryType == DEVICE && !device_range_ok((CUdeviceptr)(uintptr_t)(s + src0), src_span))
        return CUDA_ERROR_INVALID_VALUE;
    if (p->dstMemoryType == DEVICE && !device_range_ok((CUdeviceptr)(uintptr_t)(d + dst0), dst_span))
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t r = 0; r < p->Height; ++r)
        memmove(d + dst0 + r * p->dstPitch, s + src0 + r * p->srcPitch, p->WidthInBytes);
    return CUDA_SUCCESS;
}
CUresult cuMemcpy2D_v2(const CUDA_MEMCPY2D* p) { return cuMemcpy2DAsync_v2(p, nullptr); }

CUresult cuModuleLoadData(CUmodule* out, const void* image) {
    if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
    const char* text = (const char*)image;
    const char* head = "// rlhf-cuda-emu module\n//so ";
    if (strncmp(text, head, strlen(head)) != 0) {
        // Real PTX (from a cache filled by the real NVRTC): the engine then compiles again,
        // through the emulator's NVRTC.
        return CUDA_ERROR_INVALID_PTX;
    }
    const char* path = text + strlen(head);
    std::string so(path, strcspn(path, "\n"));
    // "//target 90a": PTX for compute_90 loads on 9.0 and newer; for the architecture-specific
    // compute_90a only on 9.0 itself.
    if (const char* t = strstr(text, "\n//target ")) {
        t += strlen("\n//target ");
        const std::string target(t, strcspn(t, "\n"));
        const int want = atoi(target.c_str());
        const bool specific = !target.empty() && target.back() == 'a';
        if (want > 0 && (want > arch_code() || (specific && want != arch_code()))) {
            fprintf(stderr, "cuda-emu: module built for compute_%s does not run on this sm_%d device\n",
                    target.c_str(), arch_code());
            return CUDA_ERROR_INVALID_PTX;
        }
    }
    void* h = dlopen(so.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "cuda-emu: cannot load module %s: %s\n", so.c_str(), dlerror());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    auto launch = (LaunchFn)dlsym(h, "__emu_launch_v2");
    if (!launch) {
        dlclose(h);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    *out = new Module{h, launch};
    return CUDA_SUCCESS;
}

CUresult cuModuleUnload(CUmodule m) {
    if (!m) return CUDA_ERROR_INVALID_HANDLE;
    // Functions handed out may still be called by a caller that leaked them; keep the code.
    delete m;
    return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction* out, CUmodule m, const char* name) {
    ++stats.lookups;
    if (!out || !m || !name) return CUDA_ERROR_INVALID_VALUE;
    const std::string sym = std::string("__emu_entry_") + name;
    auto entry = (void (*)(void**))dlsym(m->handle, sym.c_str());
    if (!entry) return CUDA_ERROR_NOT_FOUND;
    *out = new Function{m, entry, name};
    return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(CUfunction f, int attr, int value) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > max_optin_smem()) {
            fprintf(stderr, "cuda-emu: %s: MAX_DYNAMIC_SHARED_SIZE_BYTES %d is above this device's %d\n",
                    f->name.c_str(), value, max_optin_smem());
            return CUDA_ERROR_INVALID_VALUE;
        }
        f->max_dynamic_smem = value;
    }
    return CUDA_SUCCESS;
}

CUresult cuFuncGetAttribute(int* v, int attr, CUfunction f) {
    if (!v || !f) return CUDA_ERROR_INVALID_VALUE;
    *v = attr == 8 ? f->max_dynamic_smem : (attr == 0 ? 1024 : 0);
    return CUDA_SUCCESS;
}

CUresult cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, CUstream, void** params, void** extra) {
    ++stats.launches;
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) return CUDA_ERROR_NOT_SUPPORTED;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 || gy > 65535 || gz > 65535 ||
        gx > 2147483647u || bx > 1024 || by > 1024 || bz > 64 ||
        (unsigned long long)bx * by * bz > 1024) {
        fprintf(stderr, "cuda-emu: %s launched with grid (%u,%u,%u), block (%u,%u,%u): outside the limits\n",
                f->name.c_str(), gx, gy, gz, bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((int)smem > f->max_dynamic_smem) {
        fprintf(stderr, "cuda-emu: %s asks for %u bytes of dynamic shared memory (limit %d)\n", f->name.c_str(),
                smem, f->max_dynamic_smem);
        return CUDA_ERROR_INVALID_VALUE;
    }
    static const bool trace = getenv("RLHF_CUDA_EMU_TRACE") && *getenv("RLHF_CUDA_EMU_TRACE") == '1';
    const double t0 = trace ? now() : 0;
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    char err[1024] = {0};
    in_launch = true;
    const int rc =
        f->module->launch(f->entry, f->name.c_str(), grid, block, smem, params, &where_now, err, sizeof err);
    in_launch = false;
    if (trace)
        fprintf(stderr, "cuda-emu: launch %s grid (%u,%u,%u) block (%u,%u,%u): %.3f ms\n", f->name.c_str(), gx, gy,
                gz, bx, by, bz, (now() - t0) * 1e3);
    if (rc != 0) {
        fprintf(stderr, "cuda-emu: %s\n", err);
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    return CUDA_SUCCESS;
}

// cuTensorMapEncodeTiled: validates the parameters as the CUDA driver API documents them and
// stores them in the emulator's own format (tensormap.h) inside the 128 opaque bytes; the
// device model (emu.h, tma_load_3d) decodes them. Anything outside the documented bounds is
// CUDA_ERROR_INVALID_VALUE, with the reason on stderr; interleaved layouts, which the real
// driver accepts but the emulator does not model, are CUDA_ERROR_NOT_SUPPORTED.
CUresult cuTensorMapEncodeTiled(void* tensorMap, unsigned dataType, unsigned rank, void* globalAddress,
                                const unsigned long long* globalDim, const unsigned long long* globalStrides,
                                const unsigned* boxDim, const unsigned* elementStrides, unsigned interleave,
                                unsigned swizzle, unsigned l2Promotion, unsigned oobFill) {
    auto bad = [](const char* why, unsigned long long v) {
        fprintf(stderr, "cuda-emu: cuTensorMapEncodeTiled: %s (%llu)\n", why, v);
        return CUDA_ERROR_INVALID_VALUE;
    };
    namespace tm = rlhf_emu_tmap;
    if (!tensorMap || !globalDim || !boxDim || !elementStrides || (rank > 1 && !globalStrides))
        return bad("a null pointer argument", 0);
    if ((uintptr_t)tensorMap % 64) return bad("tensorMap is not 64-byte aligned", (uintptr_t)tensorMap % 64);
    const unsigned esize = tm::type_bytes(dataType);
    if (esize == 0) return bad("tensorDataType is not a CUtensorMapDataType this emulator knows", dataType);
    if (rank < 1 || rank > 5) return bad("tensorRank must be in 1..5", rank);
    if (interleave > 2) return bad("interleave is not a CUtensorMapInterleave", interleave);
    if (swizzle > 3) return bad("swizzle is not NONE, 32B, 64B or 128B (the sm_90 modes)", swizzle);
    if (l2Promotion > 3) return bad("l2Promotion is not a CUtensorMapL2promotion", l2Promotion);
    if (oobFill > 1) return bad("oobFill is not a CUtensorMapFloatOOBfill", oobFill);
    if (interleave != 0) {
        fprintf(stderr, "cuda-emu: cuTensorMapEncodeTiled: interleaved layouts are not modelled\n");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if ((uintptr_t)globalAddress % 16) return bad("globalAddress is not 16-byte aligned", (uintptr_t)globalAddress);
    tm::Encoded e{};
    e.magic = tm::kMagic;
    e.global_address = (uint64_t)(uintptr_t)globalAddress;
    for (unsigned i = 0; i < rank; ++i) {
        if (globalDim[i] == 0 || globalDim[i] > (1ull << 32)) return bad("globalDim[i] must be in 1..2^32", globalDim[i]);
        if (boxDim[i] == 0 || boxDim[i] > 256) return bad("boxDim[i] must be in 1..256", boxDim[i]);
        if (elementStrides[i] == 0 || elementStrides[i] > 8) return bad("elementStrides[i] must be in 1..8", elementStrides[i]);
        e.dim[i] = globalDim[i];
        e.box[i] = boxDim[i];
        e.elem_stride[i] = (uint8_t)elementStrides[i];
    }
    for (unsigned i = 0; i + 1 < rank; ++i) {
        if (globalStrides[i] % 16) return bad("globalStrides[i] must be a multiple of 16 bytes", globalStrides[i]);
        if (globalStrides[i] >= (1ull << 40)) return bad("globalStrides[i] must be below 2^40", globalStrides[i]);
        e.stride[i] = globalStrides[i];
    }
    const unsigned long long inner = (unsigned long long)boxDim[0] * esize;
    if (inner % 16) return bad("boxDim[0] * element size must be a multiple of 16 bytes", inner);
    if (swizzle != 0 && inner > tm::swizzle_span(swizzle))
        return bad("the inner box extent (boxDim[0] * element size) exceeds the swizzle span", inner);
    e.data_type = (uint8_t)dataType;
    e.rank = (uint8_t)rank;
    e.interleave = (uint8_t)interleave;
    e.swizzle = (uint8_t)swizzle;
    e.l2_promotion = (uint8_t)l2Promotion;
    e.oob_fill = (uint8_t)oobFill;
    e.elem_bytes = (uint8_t)esize;
    memset(tensorMap, 0, 128);
    memcpy(tensorMap, &e, sizeof e);
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult r, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    switch (r) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case CUDA_ERROR_INVALID_PTX: *s = "CUDA_ERROR_INVALID_PTX"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult r, const char** s) { return cuGetErrorName(r, s); }

}  // extern "C"
