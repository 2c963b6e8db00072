// elementwise.cu: strided binary ops with broadcasting, comparisons (u8 masks), unary ops (GELU
// forward and backward among them), dtype casts, where/masked_fill and fill. f32 and bf16 storage; arithmetic is f32.
//
// Reference: crates/tensor/src/ops/{binary,unary}.rs and cpu/vec.rs (same formulas; GELU is
// the tanh approximation GPT-2 uses, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))).
//
// Layouts:
// - Inputs are read through a `Strided` (shape, strides in elements; the pointer includes the
//   tensor's offset). The host passes every operand at the output's rank with the output's
//   shape; a broadcast dim has stride 0. `rank == 0` means flat indexing (element i at i),
//   which is the fast path for contiguous operands and also right for a single element.
// - Outputs are contiguous, row-major over the output shape, `n` elements.
//
// Fast paths: when every operand of a binary op, a unary op, GELU's backward or an f32 ↔ bf16
// cast is flat and starts 16-byte aligned, each thread takes 8 elements a step in 16-byte
// vectors (one of bf16, two of f32: VecIO, vec_map), the last n mod 8 elements one by one; a
// binary op's operand may also be one row of C elements repeated (C a multiple of 8: a bias
// over [B, T, C] activations, a position table over the batch), read 8 at a time from
// offset i mod C (vector_period); the
// arithmetic per element is unchanged, so results are bitwise those of the scalar loop. Strided operands of fewer than 2^32 elements compute
// their offsets with 32-bit divisions (strided_offset32).
//
// Launch: 1-D, blockDim.x = 256, gridDim.x = min(ceil(n / 2048), 65535) when the kernel takes
// its vector path (about 8 elements a thread), else min(ceil(n / 256), 65535)
// (crates/tensor/src/cuda/storage.rs map_config); every kernel runs a grid-stride loop, so any
// grid size is correct. No shared memory.
//
// Entry points (T = f32 | bf16):
//   binary_{add,sub,mul,div,maximum,minimum}_T(n, a_layout, b_layout, a, b, out)
//   compare_{gt,ne}_T(n, a_layout, b_layout, a, b, out (u8)): out = (a OP b) ? 1 : 0, compared
//        in f32 (exact for bf16); NaN compares as IEEE says (gt false, ne true), as the CPU's
//        `x > y` and `x != 0.0`. gt is Tensor::gt; ne against a broadcast zero turns a float
//        mask into the u8 condition where_T reads.
//   unary_{copy,neg,exp,log,sqrt,tanh,relu,gelu,sigmoid,log_sigmoid,abs,powf,clamp,
//          add_scalar,mul_scalar}_T(n, x_layout, x, out, p0, p1)
//        powf uses p0 as the exponent, clamp [p0, p1], add_scalar/mul_scalar p0; others
//        ignore p0 and p1.
//   gelu_backward_T(n, x, dy, dx)               contiguous; dx = dy · gelu'(x)
//   cast_{F}_to_{T}(n, x_layout, x, out) for F ≠ T in {f32, bf16, i64, i32, u8}: the CPU's
//        Tensor::to_dtype element for element — f32 → bf16 rounds to nearest even, bf16 → f32
//        is exact, everything else goes through f64 as the CPU does: integers → float round
//        once (f64 → f32 → bf16 rounds as f64 → bf16 does: f32 has more than 2·8 + 2 bits),
//        float or integer → integer truncates toward zero and saturates, NaN → 0 (Rust's `as`).
//   where_T(n, cond_layout, a_layout, b_layout, cond (u8), a, b, out): cond ? a : b
//   fill_T(n, out, value)
//   dropout_T(n, x_layout, x, out, seed (u64), threshold (u32), scale): element i (row-major)
//        keeps x·scale when 32 bits of SplitMix64's output i/2 + 1 for `seed` (low half for
//        even i, high for odd) are ≥ threshold, else 0 (crates/tensor/src/ops/dropout.rs).

#define GRID_STRIDE_LOOP(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// Element i's offset in an operand read through `l`; `narrow`: the launch has fewer than 2^32
// elements (then every extent of `l` and every index fits 32 bits).
__device__ __forceinline__ i64 offset_of(const Strided& l, i64 i, bool narrow) {
    if (l.rank == 0) return i;
    return narrow ? strided_offset32(l, (u32)i) : strided_offset(l, i);
}

__device__ __forceinline__ bool narrow_launch(i64 n) { return n <= 0xffffffffLL; }

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15) == 0; }

// 16 bytes of T as floats: N elements per load or store.
template <typename T>
struct VecIO;
template <>
struct VecIO<float> {
    static constexpr int N = 4;
    __device__ static void load(const float* p, float (&v)[4]) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    }
    __device__ static void store(float* p, const float (&v)[4]) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    }
};
template <>
struct VecIO<bf16> {
    static constexpr int N = 8;
    __device__ static void load(const bf16* p, float (&v)[8]) {
        const uint4 q = *reinterpret_cast<const uint4*>(p);
        const bf16* e = reinterpret_cast<const bf16*>(&q);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = bf16_to_f32(e[k]);
    }
    __device__ static void store(bf16* p, const float (&v)[8]) {
        uint4 q;
        bf16* e = reinterpret_cast<bf16*>(&q);
#pragma unroll
        for (int k = 0; k < 8; ++k) e[k] = f32_to_bf16(v[k]);
        *reinterpret_cast<uint4*>(p) = q;
    }
};

// 8 elements of T as floats (one 16-byte vector of bf16, two of f32), and back.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
    constexpr int N = VecIO<T>::N;
#pragma unroll
    for (int c = 0; c < 8 / N; ++c) {
        float w[N];
        VecIO<T>::load(p + c * N, w);
#pragma unroll
        for (int k = 0; k < N; ++k) v[c * N + k] = w[k];
    }
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
    constexpr int N = VecIO<T>::N;
#pragma unroll
    for (int c = 0; c < 8 / N; ++c) {
        float w[N];
#pragma unroll
        for (int k = 0; k < N; ++k) w[k] = v[c * N + k];
        VecIO<T>::store(p + c * N, w);
    }
}

// The offset of element i in an operand of the vector path: flat (`period` 0), or one row of
// `period` elements repeated (a bias over activations; `period` a multiple of 8, so the 8
// elements of a step never straddle two rows). `narrow`: i and period fit 32 bits.
__device__ __forceinline__ i64 vec_offset(i64 i, i64 period, bool narrow) {
    if (period == 0) return i;
    return narrow ? (i64)((u32)i % (u32)period) : i % period;
}

// The fast path of a map over K 16-byte-aligned inputs into flat out, 8 elements a step
// (MAP_ELEMENTS_PER_THREAD on the host): input k is read at vec_offset(i, period[k]); f(x, e)
// sets x[0][e] to the result of element e of the step from x[0..K][e] (K ≤ 2); the last
// n mod 8 elements go one by one, through x[..][0].
template <int K, typename TI, typename TO, typename F>
__device__ __forceinline__ void vec_map(i64 n, const TI* const (&in)[K], const i64 (&period)[K],
                                        TO* __restrict__ out, F f) {
    const bool narrow = narrow_launch(n);
    const i64 nv = n / 8;
    GRID_STRIDE_LOOP(j, nv) {
        float x[K][8];
#pragma unroll
        for (int k = 0; k < K; ++k) load8(in[k] + vec_offset(j * 8, period[k], narrow), x[k]);
#pragma unroll
        for (int e = 0; e < 8; ++e) f(x, e);
        store8(out + j * 8, x[0]);
    }
    GRID_STRIDE_LOOP(t, n - nv * 8) {
        const i64 i = nv * 8 + t;
        float x[K][8];
#pragma unroll
        for (int k = 0; k < K; ++k) x[k][0] = load_f32(in[k] + vec_offset(i, period[k], narrow));
        f(x, 0);
        store_f32(out + i, x[0][0]);
    }
}

// vec_map over K flat inputs.
template <int K, typename TI, typename TO, typename F>
__device__ __forceinline__ void flat_map(i64 n, const TI* const (&in)[K], TO* __restrict__ out, F f) {
    const i64 flat[K] = {};
    vec_map<K>(n, in, flat, out, f);
}

// ---- binary ---------------------------------------------------------------------------------

struct OpAdd { __device__ static float f(float a, float b) { return a + b; } };
struct OpSub { __device__ static float f(float a, float b) { return a - b; } };
struct OpMul { __device__ static float f(float a, float b) { return a * b; } };
struct OpDiv { __device__ static float f(float a, float b) { return a / b; } };
// fmaxf/fminf return the other operand for one NaN; the CPU's f32::max does too.
struct OpMaximum { __device__ static float f(float a, float b) { return fmaxf(a, b); } };
struct OpMinimum { __device__ static float f(float a, float b) { return fminf(a, b); } };

// The period (vec_offset) of an operand the vector path reads: 0 when flat, C when it is one
// row of C elements repeated (coalesced shape [R, C], strides [0, 1], C a multiple of 8); -1
// when the vector path cannot read it. vector_period in crates/tensor/src/cuda/storage.rs is
// the host's copy of this test.
__device__ __forceinline__ i64 vector_period(const Strided& l) {
    if (l.rank == 0) return 0;
    const bool row = l.rank == 2 && l.stride[0] == 0 && l.stride[1] == 1 && l.shape[1] % 8 == 0;
    return row ? l.shape[1] : -1;
}

template <typename Op, typename T>
__device__ __forceinline__ void binary_body(i64 n, const Strided& la, const Strided& lb,
                                            const T* __restrict__ a, const T* __restrict__ b,
                                            T* __restrict__ out) {
    const i64 period[2] = {vector_period(la), vector_period(lb)};
    if (period[0] >= 0 && period[1] >= 0 && aligned16(a) && aligned16(b) && aligned16(out)) {
        const T* const in[2] = {a, b};
        vec_map<2>(n, in, period, out, [](float (&x)[2][8], int e) { x[0][e] = Op::f(x[0][e], x[1][e]); });
        return;
    }
    const bool narrow = narrow_launch(n);
    GRID_STRIDE_LOOP(i, n) {
        const float x = load_f32(a + offset_of(la, i, narrow));
        const float y = load_f32(b + offset_of(lb, i, narrow));
        store_f32(out + i, Op::f(x, y));
    }
}

#define BINARY(name, Op, T, tname)                                                          \
    extern "C" __global__ void binary_##name##_##tname(i64 n, Strided la, Strided lb,       \
                                                       const T* __restrict__ a,             \
                                                       const T* __restrict__ b,             \
                                                       T* __restrict__ out) {               \
        binary_body<Op, T>(n, la, lb, a, b, out);                                            \
    }
#define BINARY_BOTH(name, Op) BINARY(name, Op, float, f32) BINARY(name, Op, bf16, bf16)

BINARY_BOTH(add, OpAdd)
BINARY_BOTH(sub, OpSub)
BINARY_BOTH(mul, OpMul)
BINARY_BOTH(div, OpDiv)
BINARY_BOTH(maximum, OpMaximum)
BINARY_BOTH(minimum, OpMinimum)

// ---- comparisons: u8 masks ---------------------------------------------------------------

struct CmpGt { __device__ static bool f(float a, float b) { return a > b; } };
struct CmpNe { __device__ static bool f(float a, float b) { return a != b; } };

template <typename Op, typename T>
__device__ __forceinline__ void compare_body(i64 n, const Strided& la, const Strided& lb,
                                             const T* __restrict__ a, const T* __restrict__ b,
                                             unsigned char* __restrict__ out) {
    const bool narrow = narrow_launch(n);
    GRID_STRIDE_LOOP(i, n) {
        const float x = load_f32(a + offset_of(la, i, narrow));
        const float y = load_f32(b + offset_of(lb, i, narrow));
        out[i] = Op::f(x, y) ? 1 : 0;
    }
}

#define COMPARE(name, Op, T, tname)                                                         \
    extern "C" __global__ void compare_##name##_##tname(i64 n, Strided la, Strided lb,      \
                                                        const T* __restrict__ a,            \
                                                        const T* __restrict__ b,            \
                                                        unsigned char* __restrict__ out) {  \
        compare_body<Op, T>(n, la, lb, a, b, out);                                          \
    }
#define COMPARE_BOTH(name, Op) COMPARE(name, Op, float, f32) COMPARE(name, Op, bf16, bf16)

COMPARE_BOTH(gt, CmpGt)
COMPARE_BOTH(ne, CmpNe)

// ---- unary ----------------------------------------------------------------------------------

#define GELU_C 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_A 0.044715f

__device__ __forceinline__ float gelu_f(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_C * (x + GELU_A * x * x * x)));
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float t = tanhf(GELU_C * (x + GELU_A * x * x * x));
    const float du = GELU_C * (1.0f + 3.0f * GELU_A * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
}

struct UCopy { __device__ static float f(float x, float, float) { return x; } };
struct UNeg { __device__ static float f(float x, float, float) { return -x; } };
struct UExp { __device__ static float f(float x, float, float) { return expf(x); } };
struct ULog { __device__ static float f(float x, float, float) { return logf(x); } };
struct USqrt { __device__ static float f(float x, float, float) { return sqrtf(x); } };
struct UTanh { __device__ static float f(float x, float, float) { return tanhf(x); } };
struct URelu { __device__ static float f(float x, float, float) { return fmaxf(x, 0.0f); } };
struct UGelu { __device__ static float f(float x, float, float) { return gelu_f(x); } };
struct USigmoid {
    __device__ static float f(float x, float, float) { return 1.0f / (1.0f + expf(-x)); }
};
// log σ(x) = min(x, 0) − log1p(e^−|x|): finite for every finite x, as on the CPU.
struct ULogSigmoid {
    __device__ static float f(float x, float, float) { return fminf(x, 0.0f) - log1pf(expf(-fabsf(x))); }
};
struct UAbs { __device__ static float f(float x, float, float) { return fabsf(x); } };
struct UPowf { __device__ static float f(float x, float p, float) { return powf(x, p); } };
struct UClamp {
    __device__ static float f(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }
};
struct UAddScalar { __device__ static float f(float x, float s, float) { return x + s; } };
struct UMulScalar { __device__ static float f(float x, float s, float) { return x * s; } };

template <typename Op, typename T>
__device__ __forceinline__ void unary_body(i64 n, const Strided& lx, const T* __restrict__ x,
                                           T* __restrict__ out, float p0, float p1) {
    if (lx.rank == 0 && aligned16(x) && aligned16(out)) {
        const T* const in[1] = {x};
        flat_map<1>(n, in, out, [=](float (&v)[1][8], int e) { v[0][e] = Op::f(v[0][e], p0, p1); });
        return;
    }
    const bool narrow = narrow_launch(n);
    GRID_STRIDE_LOOP(i, n) {
        store_f32(out + i, Op::f(load_f32(x + offset_of(lx, i, narrow)), p0, p1));
    }
}

#define UNARY(name, Op, T, tname)                                                              \
    extern "C" __global__ void unary_##name##_##tname(i64 n, Strided lx,                       \
                                                      const T* __restrict__ x,                 \
                                                      T* __restrict__ out, float p0, float p1) { \
        unary_body<Op, T>(n, lx, x, out, p0, p1);                                              \
    }
#define UNARY_BOTH(name, Op) UNARY(name, Op, float, f32) UNARY(name, Op, bf16, bf16)

UNARY_BOTH(copy, UCopy)
UNARY_BOTH(neg, UNeg)
UNARY_BOTH(exp, UExp)
UNARY_BOTH(log, ULog)
UNARY_BOTH(sqrt, USqrt)
UNARY_BOTH(tanh, UTanh)
UNARY_BOTH(relu, URelu)
UNARY_BOTH(gelu, UGelu)
UNARY_BOTH(sigmoid, USigmoid)
UNARY_BOTH(log_sigmoid, ULogSigmoid)
UNARY_BOTH(abs, UAbs)
UNARY_BOTH(powf, UPowf)
UNARY_BOTH(clamp, UClamp)
UNARY_BOTH(add_scalar, UAddScalar)
UNARY_BOTH(mul_scalar, UMulScalar)

// ---- GELU backward (contiguous: the backward reads the saved input and the incoming gradient,
// both produced contiguous) ----------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void gelu_backward_body(i64 n, const T* __restrict__ x,
                                                   const T* __restrict__ dy, T* __restrict__ dx) {
    if (aligned16(x) && aligned16(dy) && aligned16(dx)) {
        const T* const in[2] = {dy, x};
        flat_map<2>(n, in, dx, [](float (&v)[2][8], int e) { v[0][e] *= gelu_grad(v[1][e]); });
        return;
    }
    GRID_STRIDE_LOOP(i, n) {
        store_f32(dx + i, load_f32(dy + i) * gelu_grad(load_f32(x + i)));
    }
}

extern "C" __global__ void gelu_backward_f32(i64 n, const float* __restrict__ x,
                                             const float* __restrict__ dy, float* __restrict__ dx) {
    gelu_backward_body<float>(n, x, dy, dx);
}
extern "C" __global__ void gelu_backward_bf16(i64 n, const bf16* __restrict__ x,
                                              const bf16* __restrict__ dy, bf16* __restrict__ dx) {
    gelu_backward_body<bf16>(n, x, dy, dx);
}

// ---- casts ----------------------------------------------------------------------------------

// An element as f64, as the CPU reads every dtype for a cast (exact but for i64 beyond 2^53,
// rounded to nearest as Rust's `as f64`).
__device__ __forceinline__ double cast_in(float x) { return (double)x; }
__device__ __forceinline__ double cast_in(bf16 x) { return (double)bf16_to_f32(x); }
__device__ __forceinline__ double cast_in(long long x) { return (double)x; }
__device__ __forceinline__ double cast_in(int x) { return (double)x; }
__device__ __forceinline__ double cast_in(unsigned char x) { return (double)x; }

// Rust's f64 `as` an integer: toward zero, saturating at the type's bounds, NaN → 0. `hi` is the
// smallest double at or above the type's maximum (2^63 for i64), `lo` its minimum.
template <typename I>
__device__ __forceinline__ I cast_int(double v, double lo, double hi, I min, I max) {
    if (v != v) return (I)0;
    if (v >= hi) return max;
    if (v <= lo) return min;
    return (I)v;  // in range: truncation
}

template <typename T>
struct CastOut;
template <>
struct CastOut<float> {
    __device__ static float from(double v) { return (float)v; }
};
template <>
struct CastOut<bf16> {  // f64 → f32 → bf16: one rounding's worth (see the header)
    __device__ static bf16 from(double v) { return f32_to_bf16((float)v); }
};
template <>
struct CastOut<long long> {
    __device__ static long long from(double v) {
        return cast_int<long long>(v, -9223372036854775808.0, 9223372036854775808.0,
                                   (long long)(-9223372036854775807LL - 1), 9223372036854775807LL);
    }
};
template <>
struct CastOut<int> {
    __device__ static int from(double v) {
        return cast_int<int>(v, -2147483648.0, 2147483647.0, (int)(-2147483647 - 1), 2147483647);
    }
};
template <>
struct CastOut<unsigned char> {
    __device__ static unsigned char from(double v) {
        return cast_int<unsigned char>(v, 0.0, 255.0, (unsigned char)0, (unsigned char)255);
    }
};

template <typename F, typename T>
__device__ __forceinline__ void cast_body(i64 n, const Strided& lx, const F* __restrict__ x, T* __restrict__ out) {
    const bool narrow = narrow_launch(n);
    GRID_STRIDE_LOOP(i, n) { out[i] = CastOut<T>::from(cast_in(x[offset_of(lx, i, narrow)])); }
}

// The two float casts the mixed-precision model runs all the time stay single-rounding f32
// code (bitwise the same as through f64: bf16 → f32 is exact, f32 → f64 → f32 is the identity).
// Both have the flat vector path.
template <typename F, typename T>
__device__ __forceinline__ void float_cast_body(i64 n, const Strided& lx, const F* __restrict__ x,
                                                T* __restrict__ out) {
    if (lx.rank == 0 && aligned16(x) && aligned16(out)) {
        const F* const in[1] = {x};
        flat_map<1>(n, in, out, [](float (&)[1][8], int) {});  // the conversion is the load and store
        return;
    }
    const bool narrow = narrow_launch(n);
    GRID_STRIDE_LOOP(i, n) { store_f32(out + i, load_f32(x + offset_of(lx, i, narrow))); }
}
extern "C" __global__ void cast_f32_to_bf16(i64 n, Strided lx, const float* __restrict__ x,
                                            bf16* __restrict__ out) {
    float_cast_body(n, lx, x, out);
}
extern "C" __global__ void cast_bf16_to_f32(i64 n, Strided lx, const bf16* __restrict__ x,
                                            float* __restrict__ out) {
    float_cast_body(n, lx, x, out);
}

#define CAST(fname, F, tname, T)                                                                  \
    extern "C" __global__ void cast_##fname##_to_##tname(i64 n, Strided lx, const F* __restrict__ x, \
                                                         T* __restrict__ out) {                  \
        cast_body<F, T>(n, lx, x, out);                                                           \
    }
#define CAST_FROM(fname, F)                                                                       \
    CAST(fname, F, i64, long long) CAST(fname, F, i32, int) CAST(fname, F, u8, unsigned char)
CAST_FROM(f32, float)
CAST_FROM(bf16, bf16)
CAST(i64, long long, f32, float) CAST(i64, long long, bf16, bf16) CAST(i64, long long, i32, int)
CAST(i64, long long, u8, unsigned char)
CAST(i32, int, f32, float) CAST(i32, int, bf16, bf16) CAST(i32, int, i64, long long)
CAST(i32, int, u8, unsigned char)
CAST(u8, unsigned char, f32, float) CAST(u8, unsigned char, bf16, bf16)
CAST(u8, unsigned char, i64, long long) CAST(u8, unsigned char, i32, int)

// ---- where / masked_fill ------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void where_body(i64 n, const Strided& lc, const Strided& la,
                                           const Strided& lb, const unsigned char* __restrict__ c,
                                           const T* __restrict__ a, const T* __restrict__ b,
                                           T* __restrict__ out) {
    const bool narrow = narrow_launch(n);
    GRID_STRIDE_LOOP(i, n) {
        out[i] = c[offset_of(lc, i, narrow)] ? a[offset_of(la, i, narrow)] : b[offset_of(lb, i, narrow)];
    }
}

extern "C" __global__ void where_f32(i64 n, Strided lc, Strided la, Strided lb,
                                     const unsigned char* __restrict__ c, const float* __restrict__ a,
                                     const float* __restrict__ b, float* __restrict__ out) {
    where_body<float>(n, lc, la, lb, c, a, b, out);
}
extern "C" __global__ void where_bf16(i64 n, Strided lc, Strided la, Strided lb,
                                      const unsigned char* __restrict__ c, const bf16* __restrict__ a,
                                      const bf16* __restrict__ b, bf16* __restrict__ out) {
    where_body<bf16>(n, lc, la, lb, c, a, b, out);
}

// ---- fill -----------------------------------------------------------------------------------

extern "C" __global__ void fill_f32(i64 n, float* __restrict__ out, float value) {
    GRID_STRIDE_LOOP(i, n) { out[i] = value; }
}
extern "C" __global__ void fill_bf16(i64 n, bf16* __restrict__ out, float value) {
    const bf16 v = f32_to_bf16(value);
    GRID_STRIDE_LOOP(i, n) { out[i] = v; }
}

// ---- dropout --------------------------------------------------------------------------------
//
// A counter-based mask (crates/tensor/src/ops/dropout.rs): each thread hashes the element
// indices it owns, so there is no mask in memory and no generator state. A thread takes
// element pairs (2k, 2k + 1), which share one SplitMix64 output.

template <typename T>
__device__ __forceinline__ void dropout_body(i64 n, const Strided& lx, const T* __restrict__ x,
                                             T* __restrict__ out, unsigned long long seed,
                                             u32 threshold, float scale) {
    const bool narrow = narrow_launch(n);
    GRID_STRIDE_LOOP(k, (n + 1) / 2) {
        unsigned long long z = seed + (unsigned long long)(k + 1) * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        const i64 i = 2 * k;
        const float a = load_f32(x + offset_of(lx, i, narrow));
        // Times 0 when dropped, not 0: NaN and inf stay NaN, as on the CPU.
        store_f32(out + i, a * ((u32)z >= threshold ? scale : 0.0f));
        if (i + 1 < n) {
            const float b = load_f32(x + offset_of(lx, i + 1, narrow));
            store_f32(out + i + 1, b * ((u32)(z >> 32) >= threshold ? scale : 0.0f));
        }
    }
}

extern "C" __global__ void dropout_f32(i64 n, Strided lx, const float* __restrict__ x,
                                       float* __restrict__ out, unsigned long long seed,
                                       u32 threshold, float scale) {
    dropout_body<float>(n, lx, x, out, seed, threshold, scale);
}
extern "C" __global__ void dropout_bf16(i64 n, Strided lx, const bf16* __restrict__ x,
                                        bf16* __restrict__ out, unsigned long long seed,
                                        u32 threshold, float scale) {
    dropout_body<bf16>(n, lx, x, out, seed, threshold, scale);
}
