// embedding.cu: embedding lookup (rows of a table selected by token ids) and its backward, a
// scatter-add of the output gradient into the table's rows. The backward is deterministic and
// needs no atomics and no sort: it adds in token order, exactly as the CPU does.
//
// Reference: crates/tensor/src/ops/embedding.rs.
//
// Layouts: ids [n] int64; table [vocab, dim] (T); out, dout [n, dim] (T); dtable [vocab, dim]
// f32 (accumulated into: the host zeroes it first, or passes existing gradients to add to).
// `bad` is one u64 the host sets to ~0 before the launch; a kernel that meets an id outside
// 0..vocab writes zeros for that token and atomicMin's the token's index into it, so the host
// can report the first bad position (the min is deterministic).
//
// Backward scheme: block (x, y) owns the 128 columns [128x, 128x + 128) of every table row
// whose id satisfies id % gridDim.y == y. The block walks the n tokens in chunks of 1024: each
// thread tests 8 consecutive ids of the chunk, a block-wide prefix sum of the counts places the
// matches in a shared list in token order, and then every thread adds the matching tokens'
// dout values to its column of their rows, in that order. A (row, column) pair belongs to
// exactly one thread, so every sum is formed sequentially in token order: bitwise equal to the
// CPU reference for f32, whatever the number of buckets. The ids are read once per block (8 a
// thread), not once per thread: buckets are cheap, and many of them keep the card busy.
//
// Launch:
// - embedding_fwd_T: blockDim.x = 256, gridDim.x = min(ceil(n·dim / 256), 65535), grid-stride.
// - embedding_bwd_T: blockDim.x = 128 (required), gridDim = (ceil(dim / 128), B) with B buckets
//   chosen from the shape alone (crates/tensor/src/ops/embedding.rs EMB_BUCKETS).
//   Static shared memory: 12 KB of matches (id and chunk position) and 16 bytes of warp sums.
//
// Entry points (T = f32 | bf16):
//   embedding_fwd_T(n, dim, vocab, ids, table, out, bad)
//   embedding_bwd_T(n, dim, vocab, ids, dout, dtable, bad)

#define EMB_BWD_THREADS 128
#define EMB_IDS_CHUNK 1024

template <typename T>
__device__ __forceinline__ void embedding_fwd_body(i64 n, i64 dim, i64 vocab,
                                                   const i64* __restrict__ ids,
                                                   const T* __restrict__ table,
                                                   T* __restrict__ out,
                                                   unsigned long long* __restrict__ bad) {
    const i64 total = n * dim;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const i64 t = i / dim, c = i - t * dim;
        const i64 id = ids[t];
        if (id < 0 || id >= vocab) {
            out[i] = T(0);
            if (c == 0) atomicMin(bad, (unsigned long long)t);
        } else {
            out[i] = table[id * dim + c];
        }
    }
}

#define EMB_IDS_PER_THREAD (EMB_IDS_CHUNK / EMB_BWD_THREADS)

template <typename T>
__device__ __forceinline__ void embedding_bwd_body(i64 n, i64 dim, i64 vocab,
                                                   const i64* __restrict__ ids,
                                                   const T* __restrict__ dout,
                                                   float* __restrict__ dtable,
                                                   unsigned long long* __restrict__ bad) {
    // The chunk's matching tokens in token order: position in the chunk and id.
    __shared__ i64 match_id[EMB_IDS_CHUNK];
    __shared__ int match_j[EMB_IDS_CHUNK];
    __shared__ int warp_sum[EMB_BWD_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 c = (i64)blockIdx.x * EMB_BWD_THREADS + threadIdx.x;
    const u32 buckets = gridDim.y, bucket = blockIdx.y;
    const bool reporter = blockIdx.x == 0 && blockIdx.y == 0;
    for (i64 start = 0; start < n; start += EMB_IDS_CHUNK) {
        // This thread's ids: chunk positions j0 .. j0 + 8; matches flagged bit by bit.
        const int j0 = threadIdx.x * EMB_IDS_PER_THREAD;
        i64 idv[EMB_IDS_PER_THREAD];
        unsigned mine = 0;
#pragma unroll
        for (int e = 0; e < EMB_IDS_PER_THREAD; ++e) {
            const i64 t = start + j0 + e;
            idv[e] = 0;
            if (t >= n) continue;
            const i64 id = ids[t];
            if (id < 0 || id >= vocab) {
                // Reported once, by one block.
                if (reporter) atomicMin(bad, (unsigned long long)t);
                continue;
            }
            // Valid ids of a vocabulary under 2^32 take the 32-bit remainder.
            const u32 b = vocab <= 0xffffffffLL ? (u32)id % buckets : (u32)((unsigned long long)id % buckets);
            idv[e] = id;
            if (b == bucket) mine |= 1u << e;
        }
        // Exclusive prefix sum of the match counts over the block, in thread order.
        const int count = __popc(mine);
        int incl = count;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int x = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += x;
        }
        __syncthreads();  // the previous chunk's matches are consumed
        if (lane == 31) warp_sum[warp] = incl;
        __syncthreads();
        int before = incl - count, total = 0;
#pragma unroll
        for (int w = 0; w < EMB_BWD_THREADS / 32; ++w) {
            if (w < warp) before += warp_sum[w];
            total += warp_sum[w];
        }
#pragma unroll
        for (int e = 0; e < EMB_IDS_PER_THREAD; ++e)
            if (mine & (1u << e)) {
                match_j[before] = j0 + e;
                match_id[before] = idv[e];
                ++before;
            }
        __syncthreads();
        if (c >= dim) continue;
        for (int m = 0; m < total; ++m) {
            dtable[match_id[m] * dim + c] += load_f32(dout + (start + match_j[m]) * dim + c);
        }
    }
}

#define EMBEDDING(T, tname)                                                                    \
    extern "C" __global__ void embedding_fwd_##tname(i64 n, i64 dim, i64 vocab,               \
                                                     const i64* __restrict__ ids,             \
                                                     const T* __restrict__ table,             \
                                                     T* __restrict__ out,                     \
                                                     unsigned long long* __restrict__ bad) {  \
        embedding_fwd_body<T>(n, dim, vocab, ids, table, out, bad);                            \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(EMB_BWD_THREADS) embedding_bwd_##tname(      \
        i64 n, i64 dim, i64 vocab, const i64* __restrict__ ids, const T* __restrict__ dout,   \
        float* __restrict__ dtable, unsigned long long* __restrict__ bad) {                   \
        embedding_bwd_body<T>(n, dim, vocab, ids, dout, dtable, bad);                          \
    }

EMBEDDING(float, f32)
EMBEDDING(bf16, bf16)
