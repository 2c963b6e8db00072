// host.h: what the emulator's self-test host programs (main.cpp, tma_main.cpp) share: the
// emulated libcuda/libnvrtc entry points they call, the pass/fail tally, and compiling,
// uploading and launching through the emulated NVRTC and driver as the engine does.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

extern "C" {
int cuInit(unsigned);
int cuMemAlloc_v2(unsigned long long*, size_t);
int cuMemcpyHtoD_v2(unsigned long long, const void*, size_t);
int cuMemcpyDtoH_v2(void*, unsigned long long, size_t);
int cuModuleLoadData(void**, const void*);
int cuModuleGetFunction(void**, void*, const char*);
int cuFuncSetAttribute(void*, int, int);
int cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                   void**);
int cuTensorMapEncodeTiled(void*, unsigned, unsigned, void*, const unsigned long long*, const unsigned long long*,
                           const unsigned*, const unsigned*, unsigned, unsigned, unsigned, unsigned);
int nvrtcCreateProgram(void**, const char*, const char*, int, const char* const*, const char* const*);
int nvrtcCompileProgram(void*, int, const char* const*);
int nvrtcGetPTXSize(void*, size_t*);
int nvrtcGetPTX(void*, char*);
int nvrtcGetProgramLogSize(void*, size_t*);
int nvrtcGetProgramLog(void*, char*);
}

namespace selftest {

constexpr int kLaunchFailed = 719, kInvalidValue = 1;  // CUDA_ERROR_LAUNCH_FAILED, _INVALID_VALUE

inline int failures = 0;

inline void check(bool ok, const std::string& what) {
    std::printf("%s  %s\n", ok ? "ok    " : "FAILED", what.c_str());
    if (!ok) ++failures;
}

inline std::string read_text(const std::string& path) {
    std::ifstream f(path);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// Compiles `src` (named `name`) with the emulated NVRTC for `arch_option` and loads it: the
// module, or null when the driver refuses it (a compile error ends the program).
inline void* compile_module(const std::string& src, const char* name, const char* arch_option) {
    void* prog = nullptr;
    nvrtcCreateProgram(&prog, src.c_str(), name, 0, nullptr, nullptr);
    const char* opts[] = {arch_option, "--std=c++17"};
    if (nvrtcCompileProgram(prog, 2, opts) != 0) {
        size_t n = 0;
        nvrtcGetProgramLogSize(prog, &n);
        std::string log(n, '\0');
        nvrtcGetProgramLog(prog, &log[0]);
        std::fprintf(stderr, "compile failed:\n%s\n", log.c_str());
        std::exit(1);
    }
    size_t n = 0;
    nvrtcGetPTXSize(prog, &n);
    std::string ptx(n, '\0');
    nvrtcGetPTX(prog, &ptx[0]);
    void* mod = nullptr;
    if (cuModuleLoadData(&mod, ptx.c_str()) != 0) return nullptr;
    return mod;
}

inline unsigned long long upload(const void* p, size_t bytes) {
    unsigned long long d = 0;
    cuMemAlloc_v2(&d, bytes);
    cuMemcpyHtoD_v2(d, p, bytes);
    return d;
}

inline float bf16_value(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Launches `fn` on `blocks` blocks of `threads` with stderr captured; returns the launch's
// result and what it printed.
inline int launch_captured(void* fn, unsigned blocks, unsigned threads, unsigned smem, void** args,
                           std::string& err) {
    char path[] = "/tmp/cuda-emu-selftest-XXXXXX";
    const int fd = mkstemp(path);
    std::fflush(stderr);
    const int saved = dup(2);
    dup2(fd, 2);
    const int rc = cuLaunchKernel(fn, blocks, 1, 1, threads, 1, 1, smem, nullptr, args, nullptr);
    std::fflush(stderr);
    dup2(saved, 2);
    close(saved);
    close(fd);
    err = read_text(path);
    unlink(path);
    return rc;
}

}  // namespace selftest
