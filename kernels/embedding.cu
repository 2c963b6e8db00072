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
// whose id satisfies id % gridDim.y == y. Each block walks all n tokens in order (ids staged in
// shared memory 1024 at a time) and adds the rows it owns. A (row, column) pair belongs to
// exactly one thread, so every sum is formed sequentially in token order: bitwise equal to the
// CPU reference for f32. Reading all n ids per block is cheap (shared-memory broadcasts).
//
// Launch:
// - embedding_fwd_T: blockDim.x = 256, gridDim.x = min(ceil(n·dim / 256), 65535), grid-stride.
// - embedding_bwd_T: blockDim.x = 128 (required), gridDim = (ceil(dim / 128), B) with B buckets
//   chosen from the shape alone (e.g. 64; more buckets: more parallelism, more id reads).
//   Static shared memory: 8 KB.
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

template <typename T>
__device__ __forceinline__ void embedding_bwd_body(i64 n, i64 dim, i64 vocab,
                                                   const i64* __restrict__ ids,
                                                   const T* __restrict__ dout,
                                                   float* __restrict__ dtable,
                                                   unsigned long long* __restrict__ bad) {
    __shared__ i64 ids_s[EMB_IDS_CHUNK];
    const i64 c = (i64)blockIdx.x * EMB_BWD_THREADS + threadIdx.x;
    const i64 buckets = gridDim.y, bucket = blockIdx.y;
    for (i64 start = 0; start < n; start += EMB_IDS_CHUNK) {
        const int len = (int)min((i64)EMB_IDS_CHUNK, n - start);
        __syncthreads();  // the previous chunk is fully consumed
        for (int j = threadIdx.x; j < len; j += EMB_BWD_THREADS) ids_s[j] = ids[start + j];
        __syncthreads();
        for (int j = 0; j < len; ++j) {
            const i64 id = ids_s[j];
            if (id < 0 || id >= vocab) {
                // Reported once, by one thread of one block.
                if (bucket == 0 && blockIdx.x == 0 && threadIdx.x == 0)
                    atomicMin(bad, (unsigned long long)(start + j));
                continue;
            }
            if (id % buckets != bucket || c >= dim) continue;
            dtable[id * dim + c] += load_f32(dout + (start + j) * dim + c);
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
