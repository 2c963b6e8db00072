// gather.cu: gather along the last dim, out[r, j] = x[r, idx[r, j]] (with one index per row it
// picks per-token log-probabilities from [.., vocab]), and its backward, a scatter-add.
//
// Reference: crates/tensor/src/ops/gather.rs.
//
// Layouts: x [rows, v] contiguous (T); idx [rows, k] int64; out, dout [rows, k] (T);
// dx [rows, v] f32, accumulated into (the host zeroes it first, and casts it to T afterwards
// when T is bf16): repeated indices in a row then add in f32, as the CPU does, instead of
// rounding to bf16 after every add. `bad`: one u64 the host sets to ~0; an
// index outside 0..v reads as 0 (forward) or is skipped (backward), and the first bad flat
// position idx-wise is atomicMin'ed into it (deterministic).
//
// The backward gives each row to one thread, which adds its k gradients in order j = 0..k-1:
// repeated indices in a row accumulate in the same order as on the CPU (bitwise equal for
// f32), with no atomics.
//
// Launch: blockDim.x = 256; gather_last_fwd_T: gridDim.x = min(ceil(rows·k / 256), 65535);
// gather_last_bwd_T: gridDim.x = min(ceil(rows / 256), 65535). Grid-stride loops; no shared
// memory.
//
// Entry points (T = f32 | bf16):
//   gather_last_fwd_T(rows, v, k, x, idx, out, bad)
//   gather_last_bwd_T(rows, v, k, idx, dout, dx, bad)     dx: f32

template <typename T>
__device__ __forceinline__ void gather_fwd_body(i64 rows, i64 v, i64 k, const T* __restrict__ x,
                                                const i64* __restrict__ idx, T* __restrict__ out,
                                                unsigned long long* __restrict__ bad) {
    const i64 n = rows * k;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / k;
        const i64 id = idx[i];
        if (id < 0 || id >= v) {
            out[i] = T(0);
            atomicMin(bad, (unsigned long long)i);
        } else {
            out[i] = x[r * v + id];
        }
    }
}

template <typename T>
__device__ __forceinline__ void gather_bwd_body(i64 rows, i64 v, i64 k, const i64* __restrict__ idx,
                                                const T* __restrict__ dout, float* __restrict__ dx,
                                                unsigned long long* __restrict__ bad) {
    for (i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += (i64)gridDim.x * blockDim.x) {
        for (i64 j = 0; j < k; ++j) {
            const i64 id = idx[r * k + j];
            if (id < 0 || id >= v) {
                atomicMin(bad, (unsigned long long)(r * k + j));
                continue;
            }
            dx[r * v + id] += load_f32(dout + r * k + j);
        }
    }
}

#define GATHER(T, tname)                                                                          \
    extern "C" __global__ void gather_last_fwd_##tname(i64 rows, i64 v, i64 k,                   \
                                                       const T* __restrict__ x,                  \
                                                       const i64* __restrict__ idx,              \
                                                       T* __restrict__ out,                      \
                                                       unsigned long long* __restrict__ bad) {   \
        gather_fwd_body<T>(rows, v, k, x, idx, out, bad);                                         \
    }                                                                                             \
    extern "C" __global__ void gather_last_bwd_##tname(i64 rows, i64 v, i64 k,                   \
                                                       const i64* __restrict__ idx,              \
                                                       const T* __restrict__ dout,               \
                                                       float* __restrict__ dx,                   \
                                                       unsigned long long* __restrict__ bad) {   \
        gather_bwd_body<T>(rows, v, k, idx, dout, dx, bad);                                       \
    }

GATHER(float, f32)
GATHER(bf16, bf16)
