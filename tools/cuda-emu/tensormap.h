// tensormap.h: the emulator's encoding of a CUtensorMap (tools/cuda-emu/README.md, "TMA").
//
// A CUtensorMap is 128 opaque bytes. The emulated driver's cuTensorMapEncodeTiled (driver.cpp)
// writes the validated parameters into them in this layout, and the device model (emu.h,
// tma_load_3d) reads them back. Included by both; build copies it beside emu.h, and the
// emulated NVRTC hashes it into the module cache key with emu.h.
#pragma once

#include <cstdint>

namespace rlhf_emu_tmap {

constexpr uint64_t kMagic = 0x30706d74756d65ull;  // "emutmp0": a map this driver encoded

struct Encoded {
    uint64_t magic;
    uint64_t global_address;
    uint64_t dim[5];        // elements, innermost first
    uint64_t stride[4];     // bytes between consecutive indices of dims 1..4
    uint32_t box[5];        // elements per box dimension
    uint8_t elem_stride[5];
    uint8_t data_type;      // CUtensorMapDataType
    uint8_t rank;
    uint8_t interleave;     // CUtensorMapInterleave
    uint8_t swizzle;        // CUtensorMapSwizzle
    uint8_t l2_promotion;
    uint8_t oob_fill;       // CUtensorMapFloatOOBfill
    uint8_t elem_bytes;
};
static_assert(sizeof(Encoded) <= 128, "a CUtensorMap is 128 bytes");

// Bytes per element of CUtensorMapDataType 0..12 (UINT8 .. TFLOAT32_FTZ); 0: not a type this
// emulator knows (the packed sub-byte types of newer drivers).
inline unsigned type_bytes(unsigned t) {
    static const unsigned b[13] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2, 4, 4, 4};
    return t < 13 ? b[t] : 0;
}

// The swizzle span in bytes of CUtensorMapSwizzle 0..3 (0: none).
inline unsigned swizzle_span(unsigned s) {
    static const unsigned b[4] = {0, 32, 64, 128};
    return s < 4 ? b[s] : 0;
}

}  // namespace rlhf_emu_tmap
