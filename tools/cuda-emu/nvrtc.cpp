// nvrtc.cpp: the emulator's libnvrtc.so.13 (tools/cuda-emu/README.md).
//
// It takes the calls the engine makes through cudarc (create, compile, get PTX, log, destroy)
// and, instead of PTX, builds the kernel source with the host C++ compiler into a shared
// library, emu.h forced in front:
//   1. preprocess with RLHF_EMU_SCAN defined, where `__global__` expands to a mark, and list
//      every `extern "C"` kernel name after the mark (macro-generated names included);
//   2. compile the source plus one RLHF_EMU_REGISTER(name) line per kernel into
//      `<cache>/<hash>.so`.
// What it hands back as "PTX" is a short text naming that library and its kernels (as
// `.entry` lines, so tools that list entry points still work); the emulator's driver loads it.
// Libraries are cached by a hash of the source, the options, emu.h and tensormap.h, so a second run
// compiles nothing.
//
// Environment: RLHF_CUDA_EMU_CXX (default g++), RLHF_CUDA_EMU_CACHE (default: a `modules`
// folder beside this library).
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

enum nvrtcResult {
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_OUT_OF_MEMORY = 1,
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_INVALID_OPTION = 5,
    NVRTC_ERROR_COMPILATION = 6,
    NVRTC_ERROR_INTERNAL_ERROR = 11,
};

struct Program {
    std::string source, name, log, ptx;
};

std::string here() {
    Dl_info info{};
    dladdr((void*)&here, &info);
    std::string p = info.dli_fname ? info.dli_fname : "./libnvrtc.so";
    return p.substr(0, p.rfind('/'));
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

bool write_file(const std::string& path, const std::string& text) {
    std::ofstream f(path, std::ios::binary);
    f << text;
    return bool(f);
}

uint64_t fnv1a(const std::string& s, uint64_t h = 0xcbf29ce484222325ull) {
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
    return h;
}

std::string shell_quote(const std::string& s) {
    std::string r = "'";
    for (char c : s) r += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return r + "'";
}

// Runs `cmd` with stderr folded into stdout; returns the exit status and the output.
int run(const std::string& cmd, std::string& out) {
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    if (!p) return -1;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    return pclose(p);
}

std::vector<std::string> kernel_names(const std::string& preprocessed) {
    std::vector<std::string> names;
    const std::string mark = "RLHF_EMU_KERNEL_MARK";
    for (size_t at = preprocessed.find(mark); at != std::string::npos;
         at = preprocessed.find(mark, at + mark.size())) {
        size_t i = at + mark.size();
        auto skip_space = [&] {
            while (i < preprocessed.size() && isspace((unsigned char)preprocessed[i])) ++i;
        };
        skip_space();
        if (preprocessed.compare(i, 4, "void") != 0) continue;
        i += 4;
        skip_space();
        size_t j = i;
        while (j < preprocessed.size() && (isalnum((unsigned char)preprocessed[j]) || preprocessed[j] == '_')) ++j;
        if (j > i) names.push_back(preprocessed.substr(i, j - i));
    }
    return names;
}

// The virtual architecture the options ask for (`--gpu-architecture=compute_90a`, `-arch sm_80`
// ...), without its prefix: "90a", "80", or "" when none is given.
std::string target_arch(const std::vector<std::string>& options) {
    std::string v;
    for (size_t i = 0; i < options.size(); ++i) {
        const std::string& o = options[i];
        for (const char* flag : {"--gpu-architecture", "-arch"}) {
            const std::string f = flag;
            if (o == f && i + 1 < options.size())
                v = options[i + 1];
            else if (o.compare(0, f.size() + 1, f + "=") == 0)
                v = o.substr(f.size() + 1);
        }
    }
    for (const char* prefix : {"compute_", "sm_"})
        if (v.compare(0, strlen(prefix), prefix) == 0) return v.substr(strlen(prefix));
    return v;
}

nvrtcResult compile(Program& p, const std::vector<std::string>& options) {
    const std::string dir = here();
    const std::string emu_h = dir + "/emu.h";
    // emu.h includes tensormap.h (the CUtensorMap encoding it shares with the driver): both
    // are part of the cache key.
    const std::string emu_text = read_file(emu_h), tmap_text = read_file(dir + "/tensormap.h");
    const std::string emu = emu_text + '\0' + tmap_text;
    if (emu_text.empty() || tmap_text.empty()) {
        p.log = "cuda-emu: cannot read " + emu_h + " or tensormap.h (tools/cuda-emu/build puts them beside this library)";
        return NVRTC_ERROR_COMPILATION;
    }
    const char* cxx_env = getenv("RLHF_CUDA_EMU_CXX");
    const std::string cxx = cxx_env && *cxx_env ? cxx_env : "g++";
    const char* cache_env = getenv("RLHF_CUDA_EMU_CACHE");
    const std::string cache = cache_env && *cache_env ? cache_env : dir + "/modules";
    mkdir(cache.c_str(), 0755);

    // -O1: the kernels run many small test shapes, and -O2 on the templated GEMM and attention
    // files costs more compile time than it saves. -g keeps fault backtraces readable in gdb.
    // Hidden visibility and no GNU-unique symbols keep every module's globals (the scheduler
    // state, __shared__ statics) its own: GCC otherwise binds `inline` variables process-wide,
    // across libraries loaded RTLD_LOCAL, and two modules launching on two host threads would
    // share one scheduler.
    const std::string build_flags =
        "-O1 -g -fPIC -shared -fvisibility=hidden -fno-gnu-unique -Wno-unknown-pragmas ";
    std::string key = p.source + '\0' + emu + '\0' + cxx + '\0' + build_flags;
    for (auto& o : options) key += '\0' + o;
    char hash[17];
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)fnv1a(key));
    const std::string base = cache + "/" + (p.name.empty() ? "kernels" : p.name) + "-" + hash;
    const std::string so = base + ".so", names_file = base + ".kernels";

    std::vector<std::string> names;
    if (access(so.c_str(), R_OK) == 0) {
        std::istringstream in(read_file(names_file));
        for (std::string n; std::getline(in, n);)
            if (!n.empty()) names.push_back(n);
    }
    if (names.empty()) {
        const std::string src = base + ".cu";
        if (!write_file(src, p.source)) {
            p.log = "cuda-emu: cannot write " + src;
            return NVRTC_ERROR_COMPILATION;
        }
        // An architecture-specific target (compute_90a) defines __CUDA_ARCH_FEAT_SM90_ALL, as
        // NVRTC does: kernels guard their sm_90a-only code (wgmma) with it.
        std::string feature;
        const std::string arch = target_arch(options);
        if (!arch.empty() && arch.back() == 'a')
            feature = "-D__CUDA_ARCH_FEAT_SM" + arch.substr(0, arch.size() - 1) + "_ALL ";
        const std::string flags =
            " -std=c++17 -x c++ -DRLHF_CUDA_EMU " + feature + "-include " + shell_quote(emu_h) + " ";
        std::string pre;
        if (run(cxx + flags + "-DRLHF_EMU_SCAN -E -P " + shell_quote(src), pre) != 0) {
            p.log = pre;
            return NVRTC_ERROR_COMPILATION;
        }
        names = kernel_names(pre);
        std::string with_entries = p.source + "\n";
        for (auto& n : names) with_entries += "RLHF_EMU_REGISTER(" + n + ")\n";
        const std::string full = base + ".entries.cu";
        write_file(full, with_entries);
        const std::string tmp = so + ".tmp" + std::to_string(getpid());
        std::string out;
        const int rc = run(cxx + flags + build_flags + shell_quote(full) + " -o " + shell_quote(tmp), out);
        if (rc != 0) {
            p.log = out;
            unlink(tmp.c_str());
            return NVRTC_ERROR_COMPILATION;
        }
        std::string list;
        for (auto& n : names) list += n + "\n";
        write_file(names_file, list);
        rename(tmp.c_str(), so.c_str());
        p.log = out;
    }
    // The target travels with the module: the driver refuses to load one built for an
    // architecture the device is not (compute_90a on an sm_80 device), as a GPU's would.
    std::string ptx = "// rlhf-cuda-emu module\n//so " + so + "\n//target " + target_arch(options) + "\n";
    for (auto& n : names) ptx += ".visible .entry " + n + "()\n";
    p.ptx = ptx;
    return NVRTC_SUCCESS;
}

}  // namespace

extern "C" {

typedef Program* nvrtcProgram;

const char* nvrtcGetErrorString(nvrtcResult r) {
    switch (r) {
        case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
        case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
        case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
        case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
        default: return "NVRTC_ERROR (cuda-emu)";
    }
}

nvrtcResult nvrtcVersion(int* major, int* minor) {
    if (!major || !minor) return NVRTC_ERROR_INVALID_INPUT;
    *major = 13, *minor = 0;
    return NVRTC_SUCCESS;
}

nvrtcResult nvrtcCreateProgram(nvrtcProgram* prog, const char* src, const char* name, int num_headers,
                               const char* const*, const char* const*) {
    if (!prog || !src) return NVRTC_ERROR_INVALID_INPUT;
    if (num_headers != 0) return NVRTC_ERROR_INVALID_INPUT;  // the engine passes none
    auto* p = new Program;
    p->source = src;
    if (name) {
        p->name = name;
        for (auto& c : p->name)
            if (!isalnum((unsigned char)c) && c != '_' && c != '-') c = '_';
    }
    *prog = p;
    return NVRTC_SUCCESS;
}

nvrtcResult nvrtcCompileProgram(nvrtcProgram prog, int n, const char* const* options) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    std::vector<std::string> opts;
    for (int i = 0; i < n; ++i) opts.push_back(options[i]);
    return compile(*prog, opts);
}

// The size (with its NUL) and the copy of a program's text (its PTX stand-in or its log),
// as NVRTC's Get*Size / Get* pairs hand them out.
static nvrtcResult text_size(nvrtcProgram prog, std::string Program::*text, size_t* size) {
    if (!prog || !size) return NVRTC_ERROR_INVALID_INPUT;
    *size = (prog->*text).size() + 1;
    return NVRTC_SUCCESS;
}

static nvrtcResult copy_text(nvrtcProgram prog, std::string Program::*text, char* out) {
    if (!prog || !out) return NVRTC_ERROR_INVALID_INPUT;
    memcpy(out, (prog->*text).c_str(), (prog->*text).size() + 1);
    return NVRTC_SUCCESS;
}

nvrtcResult nvrtcGetPTXSize(nvrtcProgram prog, size_t* size) {
    return text_size(prog, &Program::ptx, size);
}

nvrtcResult nvrtcGetPTX(nvrtcProgram prog, char* ptx) { return copy_text(prog, &Program::ptx, ptx); }

nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram prog, size_t* size) {
    return text_size(prog, &Program::log, size);
}

nvrtcResult nvrtcGetProgramLog(nvrtcProgram prog, char* log) {
    return copy_text(prog, &Program::log, log);
}

nvrtcResult nvrtcDestroyProgram(nvrtcProgram* prog) {
    if (!prog) return NVRTC_ERROR_INVALID_INPUT;
    delete *prog;
    *prog = nullptr;
    return NVRTC_SUCCESS;
}

}  // extern "C"
