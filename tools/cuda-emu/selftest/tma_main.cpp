// tma_main.cpp: the host side of the emulator's TMA / mbarrier self-test (run.sh). Through the
// emulated libnvrtc and libcuda, as the engine goes: cuTensorMapEncodeTiled's validation; TMA
// boxes of bf16 and f32 tensors in every swizzle mode, partial and out of bounds, compared
// byte for byte with the host's own reading of the tiled mode; a producer/consumer ring over
// full/empty mbarriers; TMA-fed wgmma against a triple loop; and every rule the models enforce
// failing its launch with its message.
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

enum { BF16 = 9, F32 = 7 };                   // CUtensorMapDataType
enum { SWZ_NONE = 0, SWZ_32 = 1, SWZ_64 = 2, SWZ_128 = 3 };  // CUtensorMapSwizzle

// The same mode numbers as tma_selftest.cu.
enum RingMode {
    RingGood = 0, RingReadEarly, RingNoEmptyWait, RingExpectLess, RingExpectMore, RingUninit, RingDeadlock,
    RingNoFence, RingNoSync, RingExtraArrive, RingInFlightAtExit, RingSetmaxDiverge, RingStaticBar,
    RingMisalignedBar,
};
enum WgmmaMode { WgTma = 0, WgCpAsyncNoFence, WgCpAsyncFence };

struct alignas(64) Map {
    unsigned long long opaque[16];
};

using namespace selftest;

void* load_module(const std::string& src) {
    return compile_module(src, "tma_selftest.cu", "--gpu-architecture=compute_90a");
}

void* function(void* mod, const char* name) {
    void* fn = nullptr;
    if (cuModuleGetFunction(&fn, mod, name) != 0) {
        std::fprintf(stderr, "no kernel %s\n", name);
        std::exit(1);
    }
    cuFuncSetAttribute(fn, 8, 227 * 1024);
    return fn;
}

int launch(void* fn, unsigned threads, unsigned smem, void** args, std::string& err) {
    return launch_captured(fn, 1, threads, smem, args, err);
}

// A rank-3 tensor in device memory: dims (innermost first), byte strides of dims 1 and 2.
struct Tensor {
    unsigned type, esize;
    unsigned long long dim[3], stride[2];
    std::vector<unsigned char> host;
    unsigned long long dev;
};

Tensor make_tensor(unsigned type, unsigned long long d0, unsigned long long d1, unsigned long long d2,
                   unsigned long long s1, unsigned long long s2, std::mt19937& rng) {
    Tensor t{type, type == BF16 ? 2u : 4u, {d0, d1, d2}, {s1, s2}, {}, 0};
    // Every byte random (padding included, so that a read of it instead of a zero shows).
    t.host.resize(s2 * d2);
    for (auto& b : t.host) b = (unsigned char)(rng() & 0x7f);  // no NaN patterns
    t.dev = upload(t.host.data(), t.host.size());
    return t;
}

int encode(Map& m, const Tensor& t, const unsigned (&box)[3], unsigned swizzle, unsigned rank = 3) {
    const unsigned es[3] = {1, 1, 1};
    return cuTensorMapEncodeTiled(&m, t.type, rank, (void*)(uintptr_t)t.dev, t.dim, t.stride, box, es, 0, swizzle,
                                  0, 0);
}

// The shared-memory bytes of a box, from the PTX ISA's tiled mode read independently: box
// element (i0, i1, i2) is tensor element (c0 + i0, c1 + i1, c2 + i2), zero when any coordinate
// is outside [0, dim); elements are stored in box order, innermost fastest; the swizzle modes
// permute 16-byte chunks within each `span`-byte row of the destination by XOR with the row's
// index within the 8-row pattern, rows counted on the absolute .shared address (span 128:
// chunk ^= (address / 128) % 8; 64: chunk ^= (address / 128) % 4; 32: chunk ^= (address / 128) % 2).
std::vector<unsigned char> expected_box(const Tensor& t, const unsigned (&box)[3], unsigned swizzle, const int (&c)[3],
                                        unsigned window) {
    const unsigned span = swizzle == SWZ_NONE ? 0 : 16u << swizzle;
    const unsigned bytes = box[0] * box[1] * box[2] * t.esize;
    std::vector<unsigned char> out(bytes, 0xee);
    unsigned linear = 0;
    for (unsigned i2 = 0; i2 < box[2]; ++i2)
        for (unsigned i1 = 0; i1 < box[1]; ++i1)
            for (unsigned i0 = 0; i0 < box[0]; ++i0, linear += t.esize) {
                const long long g[3] = {(long long)c[0] + i0, (long long)c[1] + i1, (long long)c[2] + i2};
                unsigned char v[4] = {0, 0, 0, 0};
                if (g[0] >= 0 && g[0] < (long long)t.dim[0] && g[1] >= 0 && g[1] < (long long)t.dim[1] && g[2] >= 0 &&
                    g[2] < (long long)t.dim[2])
                    std::memcpy(v, &t.host[g[0] * t.esize + g[1] * t.stride[0] + g[2] * t.stride[1]], t.esize);
                unsigned pos = linear;
                if (span) {
                    const unsigned address = window + linear;
                    const unsigned chunk = (address % 128) / 16, row = (address / 128) % (span / 16);
                    pos = linear - chunk * 16 + (chunk ^ row) * 16;
                }
                std::memcpy(&out[pos], v, t.esize);
            }
    return out;
}

struct BoxRun {
    int rc;
    std::string err;
    std::vector<unsigned char> got;
};

BoxRun run_box(void* fn, const Map& m, const int (&c)[3], unsigned bytes, unsigned dst_off) {
    std::vector<unsigned char> out(bytes, 0xcd);
    unsigned long long d_out = upload(out.data(), bytes);
    Map arg = m;
    int c0 = c[0], c1 = c[1], c2 = c[2];
    void* args[] = {&arg, &c0, &c1, &c2, &bytes, &dst_off, &d_out};
    BoxRun r;
    r.rc = launch(fn, 32, dst_off + bytes, args, r.err);
    cuMemcpyDtoH_v2(out.data(), d_out, bytes);
    r.got = out;
    return r;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string dir = argc > 1 ? argv[1] : ".";
    cuInit(0);
    void* mod = load_module(read_text(dir + "/tma_selftest.cu"));
    check(mod != nullptr, "tma_selftest.cu (compute_90a) loads");
    if (!mod) return 1;
    void* box_fn = function(mod, "tma_box");
    void* ring_fn = function(mod, "tma_ring");
    void* wgmma_fn = function(mod, "tma_wgmma");
    std::mt19937 rng(20240917);

    // ---- cuTensorMapEncodeTiled's validation --------------------------------------------------
    {
        Tensor t = make_tensor(BF16, 64, 32, 1, 128, 128 * 32, rng);
        Map m;
        const unsigned box[3] = {64, 8, 1}, es[3] = {1, 1, 1};
        check(encode(m, t, box, SWZ_128) == 0, "encode: bf16 64x8 box, 128B swizzle accepted");
        auto with = [&](auto change) {
            Tensor u = t;
            unsigned b[3] = {box[0], box[1], box[2]}, e[3] = {es[0], es[1], es[2]}, swz = SWZ_128, rank = 3;
            void* addr = (void*)(uintptr_t)u.dev;
            Map* where = &m;
            alignas(64) unsigned char raw[256];
            change(u, b, e, swz, rank, addr, where, raw);
            return cuTensorMapEncodeTiled(where, u.type, rank, addr, u.dim, u.stride, b, e, 0, swz, 0, 0);
        };
        using T = Tensor;
        using U = unsigned;
        struct Bad {
            const char* what;
            int rc;
        };
        const Bad bad[] = {
            {"a global stride not a multiple of 16 bytes", with([](T& u, U*, U*, U&, U&, void*&, Map*&, unsigned char*) { u.stride[0] = 120; })},
            {"a global stride of 2^40 bytes", with([](T& u, U*, U*, U&, U&, void*&, Map*&, unsigned char*) { u.stride[1] = 1ull << 40; })},
            {"a box dimension of 257", with([](T&, U* b, U*, U&, U&, void*&, Map*&, unsigned char*) { b[1] = 257; })},
            {"a box dimension of 0", with([](T&, U* b, U*, U&, U&, void*&, Map*&, unsigned char*) { b[2] = 0; })},
            {"a 256-byte inner box with the 128B swizzle", with([](T&, U* b, U*, U&, U&, void*&, Map*&, unsigned char*) { b[0] = 128; })},
            {"a 64-byte inner box with the 32B swizzle", with([](T&, U* b, U*, U& s, U&, void*&, Map*&, unsigned char*) { b[0] = 32, s = SWZ_32; })},
            {"an inner box of 8 bytes", with([](T&, U* b, U*, U& s, U&, void*&, Map*&, unsigned char*) { b[0] = 4, s = SWZ_NONE; })},
            {"an element stride of 9", with([](T&, U*, U* e, U&, U&, void*&, Map*&, unsigned char*) { e[1] = 9; })},
            {"rank 0", with([](T&, U*, U*, U&, U& r, void*&, Map*&, unsigned char*) { r = 0; })},
            {"rank 6", with([](T&, U*, U*, U&, U& r, void*&, Map*&, unsigned char*) { r = 6; })},
            {"a global dimension of 0", with([](T& u, U*, U*, U&, U&, void*&, Map*&, unsigned char*) { u.dim[1] = 0; })},
            {"a global dimension of 2^32 + 1", with([](T& u, U*, U*, U&, U&, void*&, Map*&, unsigned char*) { u.dim[0] = (1ull << 32) + 1; })},
            {"a global address 8 bytes off 16", with([](T&, U*, U*, U&, U&, void*& a, Map*&, unsigned char*) { a = (char*)a + 8; })},
            {"a tensor map 32 bytes off 64", with([](T&, U*, U*, U&, U&, void*&, Map*& w, unsigned char* raw) { w = (Map*)(raw + 32); })},
            {"swizzle mode 4 (an sm_100 mode)", with([](T&, U*, U*, U& s, U&, void*&, Map*&, unsigned char*) { s = 4; })},
        };
        for (const Bad& b : bad)
            check(b.rc == kInvalidValue, std::string("encode refuses ") + b.what + " (rc " + std::to_string(b.rc) + ")");
        check(with([](T&, U* b, U*, U& s, U&, void*&, Map*&, unsigned char*) { b[0] = 16, s = SWZ_32; }) == 0,
              "encode: bf16 16-wide box with the 32B swizzle accepted");
    }

    // ---- TMA boxes against the host's reading of the tiled mode ------------------------------
    {
        // bf16 "2-D" (rank 3, one plane): 70 x 33 elements, rows 144 bytes apart (72 elements:
        // the two past 70 are padding, which must read as zeros out of bounds).
        Tensor b16 = make_tensor(BF16, 70, 33, 1, 144, 144 * 33 + 16, rng);
        // f32 3-D: 40 x 6 x 5 elements, rows 192 bytes apart, planes 1216.
        Tensor f32 = make_tensor(F32, 40, 6, 5, 192, 1216, rng);
        struct BoxCase {
            Tensor* t;
            unsigned swz;
            unsigned box[3];
        };
        const BoxCase cases[] = {
            {&b16, SWZ_NONE, {24, 5, 1}}, {&b16, SWZ_32, {16, 9, 1}},  {&b16, SWZ_64, {32, 7, 1}},
            {&b16, SWZ_128, {64, 12, 1}}, {&f32, SWZ_NONE, {12, 3, 2}}, {&f32, SWZ_32, {8, 4, 3}},
            {&f32, SWZ_64, {16, 2, 2}},   {&f32, SWZ_128, {32, 5, 3}},
        };
        static const char* swz_name[] = {"none", "32B", "64B", "128B"};
        for (const BoxCase& bc : cases) {
            const Tensor& t = *bc.t;
            Map m;
            const int enc = encode(m, t, bc.box, bc.swz);
            const bool is3d = t.dim[2] > 1;
            // In bounds; partly past the ends; negative coordinates; almost entirely outside.
            std::vector<std::vector<int>> coords = {
                {0, 0, 0}, {(int)t.dim[0] - (int)bc.box[0] / 2, (int)t.dim[1] - 2, is3d ? (int)t.dim[2] - 1 : 0},
                {-5, -3, is3d ? -1 : 0}, {1 - (int)bc.box[0], 2, 0}};
            bool all = enc == 0;
            std::string note = enc ? " encode rc " + std::to_string(enc) : "";
            const unsigned bytes = bc.box[0] * bc.box[1] * bc.box[2] * t.esize;
            for (auto& cv : coords) {
                const int c[3] = {cv[0], cv[1], cv[2]};
                const unsigned dst_off = 1024;  // window 2048: 1024-aligned
                BoxRun r = run_box(box_fn, m, c, bytes, dst_off);
                const auto want = expected_box(t, bc.box, bc.swz, c, 1024 + dst_off);
                const bool ok = r.rc == 0 && r.got == want;
                if (!ok) note += " at (" + std::to_string(c[0]) + "," + std::to_string(c[1]) + "," + std::to_string(c[2]) + ")" + (r.rc ? ": " + r.err : ": bytes differ");
                all &= ok;
            }
            char what[160];
            std::snprintf(what, sizeof what, "TMA %s box %ux%ux%u, swizzle %s: in bounds, past the ends, negative, mostly outside",
                          t.type == BF16 ? "bf16" : "f32", bc.box[0], bc.box[1], bc.box[2], swz_name[bc.swz]);
            check(all, what + note);
        }
        // The destination alignment the swizzle needs, and the map's rank.
        Map m;
        const unsigned box[3] = {64, 8, 1};
        encode(m, b16, box, SWZ_128);
        const int c[3] = {0, 0, 0};
        BoxRun r = run_box(box_fn, m, c, 64 * 8 * 2, 512);
        check(r.rc == kLaunchFailed && r.err.find("not 1024-byte aligned") != std::string::npos,
              "launch fails: 128B-swizzled TMA into a destination 512 bytes off 1024" + (r.rc == kLaunchFailed ? "" : ": " + r.err));
        encode(m, b16, box, SWZ_128, 2);
        r = run_box(box_fn, m, c, 64 * 8 * 2, 1024);
        check(r.rc == kLaunchFailed && r.err.find("rank-2 tensor map") != std::string::npos,
              "launch fails: cp.async.bulk.tensor.3d with a rank-2 tensor map" + (r.rc == kLaunchFailed ? "" : ": " + r.err));
    }

    // ---- the producer/consumer ring ------------------------------------------------------------
    {
        const int iters = 22;  // 5.5 rounds of 4 stages: every parity flips several times
        std::vector<float> tiles(iters * 256);
        for (auto& v : tiles) v = (float)(int)(rng() % 2001) - 1000.0f;
        Tensor t{F32, 4, {32, 8, (unsigned long long)iters}, {128, 1024}, {}, 0};
        t.host.resize(tiles.size() * 4);
        std::memcpy(t.host.data(), tiles.data(), t.host.size());
        t.dev = upload(t.host.data(), t.host.size());
        Map m;
        const unsigned box[3] = {32, 8, 1};
        check(encode(m, t, box, SWZ_128) == 0, "encode: the ring's f32 32x8 box, 128B swizzle");
        auto run = [&](int mode, std::vector<float>& out, std::string& err) {
            out.assign(iters * 256, -7.0f);
            unsigned long long d_out = upload(out.data(), out.size() * 4);
            Map arg = m;
            int it = iters, md = mode;
            void* args[] = {&arg, &it, &md, &d_out};
            const int rc = launch(ring_fn, 384, 1024 * 5, args, err);
            cuMemcpyDtoH_v2(out.data(), d_out, out.size() * 4);
            return rc;
        };
        std::vector<float> out;
        std::string err;
        int rc = run(RingGood, out, err);
        check(rc == 0 && std::memcmp(out.data(), tiles.data(), tiles.size() * 4) == 0,
              "ring: 1 producer thread, 2 consumer warpgroups, 4 stages, 22 tiles through full/empty mbarriers" +
                  (rc ? ": " + err : ""));
        rc = run(RingReadEarly, out, err);
        int nans = 0;
        for (float v : out) nans += std::isnan(v);
        check(rc == 0 && nans > 0, "ring: a consumer reading a stage before waiting on its full barrier reads NaN (" +
                                       std::to_string(nans) + " NaN)");
        rc = run(RingNoEmptyWait, out, err);
        // Round 1's arrive.expect_tx lands on a full barrier whose round-0 phase still waits for
        // its copy (an arrival too many), or its copy on a stage whose copy is still in flight.
        check((rc == kLaunchFailed && (err.find("overlaps a TMA copy still in flight") != std::string::npos ||
                                       err.find("more arrivals than the count") != std::string::npos)) ||
                  (rc == 0 && std::memcmp(out.data(), tiles.data(), tiles.size() * 4) != 0),
              "ring: a producer refilling stages without waiting on the empty barriers fails (" +
                  err.substr(0, err.find('\n')) + ")");
        struct Bad {
            int mode;
            const char* message;
            const char* also;
        };
        const Bad bad[] = {
            {RingExpectLess, "tx-count went negative", "fewer bytes"},
            {RingExpectMore, "deadlock", "announced more bytes than the copies brought"},
            {RingUninit, "never initialised", "mbarrier"},
            {RingDeadlock, "deadlock", "1 of 2 arrivals pending"},
            {RingNoFence, "fence.mbarrier_init", "async proxy"},
            {RingNoSync, "no __syncthreads between", "mbarrier.init"},
            {RingExtraArrive, "more arrivals than the count", "mbarrier.arrive"},
            {RingInFlightAtExit, "ended with 1 TMA copies still in flight", "no thread waited"},
            {RingSetmaxDiverge, "diverge within warpgroup", "setmaxnreg.inc"},
            {RingStaticBar, "not in the launch's dynamic shared memory", "mbarrier"},
            {RingMisalignedBar, "not 8-byte aligned", "mbarrier"},
        };
        for (const Bad& b : bad) {
            rc = run(b.mode, out, err);
            const bool ok = rc == kLaunchFailed && err.find(b.message) != std::string::npos &&
                            err.find(b.also) != std::string::npos;
            check(ok, std::string("ring: launch fails: \"") + b.message + "\"" + (ok ? "" : " (got rc " + std::to_string(rc) + ": " + err + ")"));
        }
        {
            // The deadlock report names the barrier and what it waits for.
            run(RingExpectMore, out, err);
            std::printf("        (for instance: %s)\n", err.substr(0, err.find('\n')).c_str());
        }
    }

    // ---- TMA-fed wgmma --------------------------------------------------------------------------
    {
        std::uniform_int_distribution<int> mant(0, 255), sgn(0, 1), ex(-3, 2);
        auto rand_bf16 = [&] {
            const float f = (sgn(rng) ? -1.0f : 1.0f) * (1.0f + mant(rng) / 256.0f) * std::ldexp(1.0f, ex(rng));
            uint32_t u;
            std::memcpy(&u, &f, 4);
            return (uint16_t)(u >> 16);
        };
        std::vector<uint16_t> A(64 * 128), B(128 * 128);
        for (auto& v : A) v = rand_bf16();
        for (auto& v : B) v = rand_bf16();
        Tensor ta{BF16, 2, {128, 64, 1}, {256, 256 * 64}, {}, 0}, tb{BF16, 2, {128, 128, 1}, {256, 256 * 128}, {}, 0};
        ta.host.resize(A.size() * 2);
        std::memcpy(ta.host.data(), A.data(), ta.host.size());
        tb.host.resize(B.size() * 2);
        std::memcpy(tb.host.data(), B.data(), tb.host.size());
        ta.dev = upload(ta.host.data(), ta.host.size());
        tb.dev = upload(tb.host.data(), tb.host.size());
        Map ma, mb;
        const unsigned box[3] = {64, 64, 1};
        check(encode(ma, ta, box, SWZ_128) == 0 && encode(mb, tb, box, SWZ_128) == 0, "encode: wgmma operand maps");
        // D = A[:, 64:128] · B[64:128, :], summed in k order (bf16 products are exact in f32).
        std::vector<float> want(64 * 128);
        for (int i = 0; i < 64; ++i)
            for (int j = 0; j < 128; ++j) {
                float s = 0.0f;
                for (int k = 64; k < 128; ++k) s += bf16_value(A[i * 128 + k]) * bf16_value(B[k * 128 + j]);
                want[i * 128 + j] = s;
            }
        auto run = [&](int mode, std::vector<float>& D, std::string& err) {
            D.assign(64 * 128, -7.0f);
            unsigned long long dD = upload(D.data(), D.size() * 4);
            Map a = ma, b = mb;
            unsigned long long dA = ta.dev;
            int md = mode;
            void* args[] = {&a, &b, &dA, &md, &dD};
            const int rc = launch(wgmma_fn, 128, 1024 + 8192 + 16384, args, err);
            cuMemcpyDtoH_v2(D.data(), dD, D.size() * 4);
            return rc;
        };
        std::vector<float> D;
        std::string err;
        int rc = run(WgTma, D, err);
        check(rc == 0 && std::memcmp(D.data(), want.data(), D.size() * 4) == 0,
              "TMA-fed wgmma m64n128k16 x4 (A K-major 128B, B N-major 128B in 64-column panels), no "
              "fence.proxy.async == triple loop" + (rc ? ": " + err : ""));
        rc = run(WgCpAsyncFence, D, err);
        check(rc == 0 && std::memcmp(D.data(), want.data(), D.size() * 4) == 0,
              "cp.async-fed A with fence.proxy.async == triple loop" + (rc ? ": " + err : ""));
        rc = run(WgCpAsyncNoFence, D, err);
        check(rc == kLaunchFailed && err.find("fence.proxy.async") != std::string::npos,
              "launch fails: cp.async-fed A without fence.proxy.async" + (rc == kLaunchFailed ? "" : ": " + err));
    }

    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
