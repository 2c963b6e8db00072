// main.cpp: the host side of the emulator's wgmma self-test (run.sh). It goes through the
// emulated libnvrtc and libcuda exactly as the engine does (compile with
// --gpu-architecture=compute_90a, load, cuFuncSetAttribute, cuLaunchKernel with dynamic shared
// memory), runs wgmma_selftest.cu on random bf16 inputs in several shared-memory layouts, and
// compares with a plain triple loop; then checks that each rule the model enforces fails the
// launch with its message, and the limits and architecture checks of the driver.
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "host.h"

namespace {

// The same two structs as wgmma_selftest.cu (kernel arguments are copied by value).
struct Tile {
    int mn_major, swz, lbo, sbo;
    int shp[2][3], str[2][3];
};
struct Case {
    int nn, ta, tb, kt, wgs, mode, a_slot;
    Tile a, b;
};
enum Mode {
    Plain = 0, Early, Refill, NanCheck, BadBaseOffset, OutOfBuffer, NoCommit, NoWait, DivergentDesc,
    DivergentWait, NoWgmmaFence, NoProxyFence, StaticSmem, TouchInFlight,
};

using namespace selftest;

// Canonical tiles (elements; T = 8 bf16 per 16 bytes) for an operand of extent `x` along MN
// and `kt` along K, from the PTX ISA's table:
//   K-major  none:     ((8,m),(T,2k)) : ((1T,SBO),(1,LBO))
//   K-major  swizzled: ((8,m),(T,2k)) : ((S*T,SBO),(1,T)), S 16-byte units per swizzle row;
//                      K beyond one row goes to the next atom column (stride `atom`)
//   MN-major none:     ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))
//   MN-major swizzled: ((T,S,m),(8,k)) : ((1,T,LBO),(S*T,SBO))
Tile k_major_none(int x, int kt, bool k_fast) {
    // k_fast: the core matrices of one row group lie next to each other along K.
    const int lbo = k_fast ? 64 : 64 * (x / 8), sbo = k_fast ? 64 * (kt / 8) : 64;
    return Tile{0, 0, 2 * lbo, 2 * sbo, {{8, x / 8, 1}, {8, kt / 8, 1}}, {{8, sbo, 0}, {1, lbo, 0}}};
}
Tile k_major_swz(int x, int kt, int swz) {
    const int s = 1 << swz, sbo = 8 * 8 * s, atom = sbo * (x / 8);
    const int atoms = kt / (8 * s) > 0 ? kt / (8 * s) : 1;
    const int within = kt < 8 * s ? kt / 8 : s;
    return Tile{0, swz, 16, 2 * sbo, {{8, x / 8, 1}, {8, within, atoms}}, {{8 * s, sbo, 0}, {1, 8, atom}}};
}
Tile mn_major_none(int x, int kt) {
    const int sbo = 64, lbo = 64 * (x / 8);
    return Tile{1, 0, 2 * lbo, 2 * sbo, {{8, x / 8, 1}, {8, kt / 8, 1}}, {{1, sbo, 0}, {8, lbo, 0}}};
}
Tile mn_major_swz(int x, int kt, int swz) {
    const int s = 1 << swz, sbo = 8 * 8 * s, lbo = sbo * (kt / 8);
    return Tile{1, swz, 2 * lbo, 2 * sbo, {{8, s, x / (8 * s)}, {8, kt / 8, 1}}, {{1, 8, lbo}, {8 * s, sbo, 0}}};
}
// The spec's worked examples for bf16, MN-major, with their exact strides and LBO/SBO (bytes).
Tile spec_mn_none() {  // Swizzle<0,4,3> o ((8,1,2),(8,2)):((1,8,64),(8,128)), LBO 128*2, SBO 64*2
    return Tile{1, 0, 256, 128, {{8, 1, 2}, {8, 2, 1}}, {{1, 8, 64}, {8, 128, 0}}};
}
Tile spec_mn_32b() {  // Swizzle<1,4,3> o ((8,2,2),(8,2)):((1,8,128),(16,256)), LBO 128*2, SBO 256*2
    return Tile{1, 1, 256, 512, {{8, 2, 2}, {8, 2, 1}}, {{1, 8, 128}, {16, 256, 0}}};
}
Tile spec_mn_64b() {  // Swizzle<2,4,3> o ((8,4,2),(8,2)):((1,8,256),(32,512)), LBO 256*2, SBO 512*2
    return Tile{1, 2, 512, 1024, {{8, 4, 2}, {8, 2, 1}}, {{1, 8, 256}, {32, 512, 0}}};
}

int layout_mode(const int (&shp)[3], const int (&str)[3], int x) {
    int off = 0;
    for (int i = 0; i < 3; ++i) off += (x % shp[i]) * str[i], x /= shp[i];
    return off;
}
// Bytes a tile spans (the furthest element's end).
unsigned tile_bytes(const Tile& t, int x, int kt) {
    unsigned end = 0;
    for (int mn = 0; mn < x; ++mn)
        for (int k = 0; k < kt; ++k) {
            const unsigned e = 2u * (unsigned)(layout_mode(t.shp[0], t.str[0], mn) + layout_mode(t.shp[1], t.str[1], k)) + 2;
            end = e > end ? e : end;
        }
    return end;
}

void* compile(const std::string& src, const char* arch_option) {
    void* mod = compile_module(src, "wgmma_selftest.cu", arch_option);
    if (!mod) return nullptr;
    void* fn = nullptr;
    if (cuModuleGetFunction(&fn, mod, "wgmma_selftest") != 0) return nullptr;
    return fn;
}

struct Result {
    int rc;
    std::string err;
    std::vector<float> d, early, want, want_early;
    int flag;
};

// One launch of case `c` (one block of c.wgs warpgroups unless `blocks`), with random inputs.
Result run_case(void* fn, const Case& c, std::mt19937& rng, unsigned blocks = 1) {
    const int rows = 64 * c.wgs, nn = c.nn, kt = c.kt;
    std::uniform_int_distribution<int> mant(0, 255), sgn(0, 1), ex(-3, 2);
    auto rand_bf16 = [&] {
        // bf16 values with few bits, so that wrong sums are not hidden by rounding
        const float f = (sgn(rng) ? -1.0f : 1.0f) * (1.0f + mant(rng) / 256.0f) * std::ldexp(1.0f, ex(rng));
        uint32_t u;
        std::memcpy(&u, &f, 4);
        return (uint16_t)(u >> 16);
    };
    std::vector<uint16_t> A(rows * kt), B(kt * nn), B2(kt * nn);
    for (auto& v : A) v = rand_bf16();
    for (auto& v : B) v = rand_bf16();
    for (auto& v : B2) v = rand_bf16();
    std::vector<float> C(rows * nn);
    for (auto& v : C) v = bf16_value(rand_bf16());
    std::vector<float> D(rows * nn, -7.0f), E(rows * nn, -7.0f);
    int flags[2 + 8] = {0};

    const unsigned a_bytes = (tile_bytes(c.a, 64, kt) + 1023) & ~1023u;
    const unsigned smem = a_bytes * c.wgs + tile_bytes(c.b, nn, kt);

    auto dA = upload(A.data(), A.size() * 2), dB = upload(B.data(), B.size() * 2), dB2 = upload(B2.data(), B2.size() * 2);
    auto dC = upload(C.data(), C.size() * 4), dD = upload(D.data(), D.size() * 4), dE = upload(E.data(), E.size() * 4);
    auto dF = upload(flags, sizeof flags);
    Case arg = c;
    arg.a_slot = (int)a_bytes;
    void* args[] = {&arg, &dA, &dB, &dB2, &dC, &dD, &dE, &dF};
    Result r;
    cuFuncSetAttribute(fn, 8, 227 * 1024);
    r.rc = launch_captured(fn, blocks, 128u * c.wgs, smem, args, r.err);
    cuMemcpyDtoH_v2(D.data(), dD, D.size() * 4);
    cuMemcpyDtoH_v2(E.data(), dE, E.size() * 4);
    cuMemcpyDtoH_v2(flags, dF, sizeof flags);
    r.flag = flags[0];
    r.d = D, r.early = E;
    // The reference: a plain triple loop, summing in k order from C (as the model does; each
    // product of two bf16 is exact in f32, so the two agree bit for bit).
    r.want.assign(rows * nn, 0.0f);
    r.want_early.assign(rows * nn, 0.0f);
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < nn; ++j) {
            float s = C[i * nn + j];
            for (int k = 0; k < kt; ++k) {
                if (k == kt - 16) r.want_early[i * nn + j] = s;
                const uint16_t b = c.mode == Refill && k >= kt - 16 ? B2[k * nn + j] : B[k * nn + j];
                s += bf16_value(A[i * kt + k]) * bf16_value(b);
            }
            r.want[i * nn + j] = s;
        }
    return r;
}

std::string describe(const Case& c) {
    static const char* swz[] = {"none", "32B", "64B", "128B"};
    char buf[200];
    std::snprintf(buf, sizeof buf, "m64n%dk16 x%d, %d warpgroup(s): A %s-major %s, B %s-major %s", c.nn, c.kt / 16,
                  c.wgs, c.a.mn_major ? "M" : "K", swz[c.a.swz], c.b.mn_major ? "N" : "K", swz[c.b.swz]);
    return buf;
}

bool same(const std::vector<float>& a, const std::vector<float>& b, double* max_diff) {
    bool eq = true;
    *max_diff = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        const double d = std::fabs((double)a[i] - b[i]);
        if (!(d <= *max_diff)) *max_diff = d;  // NaN counts
        eq &= std::memcmp(&a[i], &b[i], 4) == 0;
    }
    return eq;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string dir = argc > 1 ? argv[1] : ".";
    const std::string src = read_text(dir + "/wgmma_selftest.cu");
    cuInit(0);
    void* fn = compile(src, "--gpu-architecture=compute_90a");
    check(fn != nullptr, "compute_90a module loads on the emulated sm_90 device");
    if (!fn) return 1;
    std::mt19937 rng(20240601);

    // Layout cases: (nn, ta, tb, kt, wgs, mode, A tile, B tile).
    const std::vector<Case> cases = {
        {256, 0, 0, 64, 1, Plain, 0, k_major_swz(64, 64, 3), k_major_swz(256, 64, 3)},
        {128, 0, 0, 64, 2, Plain, 0, k_major_swz(64, 64, 3), k_major_swz(128, 64, 3)},
        {256, 1, 1, 64, 1, Plain, 0, mn_major_swz(64, 64, 3), mn_major_swz(256, 64, 3)},
        {128, 1, 1, 64, 2, Plain, 0, mn_major_swz(64, 64, 3), mn_major_swz(128, 64, 3)},
        {256, 0, 0, 64, 1, Plain, 0, k_major_none(64, 64, true), k_major_none(256, 64, false)},
        {128, 0, 0, 64, 2, Plain, 0, k_major_none(64, 64, false), k_major_none(128, 64, true)},
        {64, 0, 1, 64, 1, Plain, 0, k_major_swz(64, 64, 2), mn_major_swz(64, 64, 1)},
        {64, 1, 0, 64, 2, Plain, 0, mn_major_swz(64, 64, 2), k_major_swz(64, 64, 1)},
        {16, 0, 1, 16, 1, Plain, 0, k_major_swz(64, 16, 3), spec_mn_none()},
        {32, 1, 1, 16, 1, Plain, 0, mn_major_none(64, 16), spec_mn_32b()},
        {64, 0, 1, 16, 2, Plain, 0, k_major_none(64, 16, true), spec_mn_64b()},
        {8, 0, 0, 32, 1, Plain, 0, k_major_swz(64, 32, 1), k_major_none(8, 32, true)},
        {24, 1, 1, 32, 1, Plain, 0, mn_major_swz(64, 32, 3), mn_major_none(24, 32)},
    };
    for (const Case& c : cases) {
        Result r = run_case(fn, c, rng);
        double diff;
        const bool eq = same(r.d, r.want, &diff);
        check(r.rc == 0 && r.flag == 1 && eq,
              describe(c) + " == triple loop (max |diff| " + std::to_string(diff) + ")" +
                  (r.rc ? " launch failed: " + r.err : ""));
    }

    // The asynchrony: an accumulator read before the wait holds the value from before the op;
    // shared memory is read at the wait.
    {
        Case c = cases[0];
        c.mode = Early;
        Result r = run_case(fn, c, rng);
        double d1, d2;
        const bool ok = r.rc == 0 && same(r.early, r.want_early, &d1) && same(r.d, r.want, &d2);
        check(ok, "accumulator read before wgmma.wait_group: the value before the pending op");
        c = cases[2];
        c.mode = Refill;
        r = run_case(fn, c, rng);
        check(r.rc == 0 && same(r.d, r.want, &d1), "shared memory refilled before the wait: the op reads the new data");
    }

    // Dynamic shared memory starts as 0xff in every block.
    {
        Case c = cases[0];
        c.mode = NanCheck;
        int flags[10] = {0, 4096, 0, 0, 0, 0, 0, 0, 0, 0};
        auto dF = upload(flags, sizeof flags);
        unsigned long long z = 0;
        void* args[] = {&c, &z, &z, &z, &z, &z, &z, &dF};
        std::string err;
        const int rc = launch_captured(fn, 3, 128, 4096, args, err);
        cuMemcpyDtoH_v2(flags, dF, sizeof flags);
        check(rc == 0 && flags[2] == 1 && flags[3] == 1 && flags[4] == 1,
              "dynamic shared memory is 0xff at the start of every block (3 blocks)");
    }

    // Each rule the model enforces fails the launch, with its message.
    struct Bad {
        Mode mode;
        const char* message;
    };
    const Bad bad[] = {
        {BadBaseOffset, "base offset 1"},
        {OutOfBuffer, "outside the launch's dynamic shared memory"},
        {NoCommit, "never committed"},
        {NoWait, "never waited"},
        {DivergentDesc, "diverge within warpgroup"},
        {DivergentWait, "diverge within warpgroup"},
        {NoWgmmaFence, "first wgmma.fence"},
        {NoProxyFence, "fence.proxy.async"},
        {StaticSmem, "not in the launch's dynamic shared memory"},
        {TouchInFlight, "accumulator registers were written"},
    };
    for (const Bad& b : bad) {
        Case c = cases[1];
        c.mode = b.mode;
        Result r = run_case(fn, c, rng);
        const bool ok = r.rc == kLaunchFailed && r.err.find(b.message) != std::string::npos;
        check(ok, std::string("launch fails: \"") + b.message + "\"" + (ok ? "" : " (got rc " + std::to_string(r.rc) + ": " + r.err + ")"));
    }
    {
        // A block that is not a whole number of warpgroups.
        Case c = cases[0];
        c.mode = Plain;
        std::vector<float> dummy(64 * 256 * 2, 0.0f);
        auto dX = upload(dummy.data(), dummy.size() * 4);
        int flags[10] = {0};
        auto dF = upload(flags, sizeof flags);
        void* args[] = {&c, &dX, &dX, &dX, &dX, &dX, &dX, &dF};
        std::string err;
        const int rc = launch_captured(fn, 1, 96, 64 * 1024, args, err);
        check(rc == kLaunchFailed && err.find("partial warpgroup") != std::string::npos,
              "launch fails: wgmma in a partial warpgroup (96 threads)");
    }

    // Driver limits: an H100's 227 KB opt-in, and a launch above the function's attribute.
    check(cuFuncSetAttribute(fn, 8, 232448) == 0, "MAX_DYNAMIC_SHARED_SIZE_BYTES 232448 accepted");
    check(cuFuncSetAttribute(fn, 8, 232449) == kInvalidValue, "MAX_DYNAMIC_SHARED_SIZE_BYTES 232449 refused");
    {
        cuFuncSetAttribute(fn, 8, 64 * 1024);
        Case c = cases[0];
        c.mode = NanCheck;
        int flags[10] = {0, 16, 0};
        auto dF = upload(flags, sizeof flags);
        unsigned long long z = 0;
        void* args[] = {&c, &z, &z, &z, &z, &z, &z, &dF};
        std::string err;
        check(launch_captured(fn, 1, 128, 64 * 1024 + 16, args, err) == kInvalidValue,
              "launch with more dynamic shared memory than the function's attribute refused");
    }

    // The sm_90a feature macro: compiled out for compute_90, and a compute_90a module does not
    // load on an sm_80 device.
    {
        void* plain = compile(src, "--gpu-architecture=compute_90");
        Case c = cases[0];
        Result r = run_case(plain, c, rng);
        check(r.rc == 0 && r.flag == 0, "compute_90: __CUDA_ARCH_FEAT_SM90_ALL not defined (wgmma code compiled out)");
        setenv("RLHF_CUDA_EMU_ARCH", "80", 1);
        check(compile(src, "--gpu-architecture=compute_90a") == nullptr, "compute_90a module refused on sm_80");
        check(compile(src, "--gpu-architecture=compute_80") != nullptr, "compute_80 module loads on sm_80");
        unsetenv("RLHF_CUDA_EMU_ARCH");
    }

    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
