// bn_common.cuh: what every batch-norm kernel of chapter 5 shares: launch bounds, the work split of the
// persistent grids, the merge primitives and the reduction tree.
//
// Work split. Every kernel but the simple bn_channel_moments_ncs runs a persistent grid: P = gridDim.x blocks,
// at most as many as the GPU holds at once, so there is never a second, partial wave. The work is T units
// numbered group by group, Q units per group (the chunks of BN_CHUNK values or float4s of one channel, or the
// rows of one column of channels), and block b owns the units [floor(b T / P), floor((b + 1) T / P)): the
// blocks' shares differ by at most one unit. A share that crosses a group boundary is handled piece by piece
// (one Segment per group).
//
// A per-channel statistic is reduced in four levels, always in the same order:
//   1. each thread folds its elements of a segment in sequentially (Welford's update, or a plain sum);
//   2. the 32 lanes of a warp merge with __shfl_down_sync at offsets 16, 8, 4, 2, 1
//      (lane i takes lane i + offset as its right-hand operand);
//   3. the warps (or the rows of a 2-D block) merge through shared memory: one partial per segment;
//   4. the partials of a group's segments merge in block order, in the last block to finish one (grid level).
// bnref/cuda/plan.py computes the same split and bnref/cuda/mirror.py replays exactly this tree in NumPy;
// keep the three in step.
//
// Compiled by NVRTC (through CuPy) and by nvcc (tests): no standard headers.
#pragma once

#define BN_FULL_MASK 0xffffffffu
#define BN_WARP 32
#define BN_THREADS 256   // threads per block, every kernel
#define BN_CHUNK 32      // ncs work unit: 32 consecutive values (or float4s) of a channel, one warp's load
#define BN_LOAD_BYTES 32 // bytes a thread loads per step, over the arrays it streams, before it uses any

// The resident blocks per SM every kernel is compiled for: __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
// makes ptxas fit the registers to that many blocks (or report a spill). 6 blocks of 256 threads, each
// thread with BN_LOAD_BYTES in flight, keep 48 KB per SM in flight, more than Little's law asks of an H100 or
// H200 (bandwidth x latency / SMs, about 25-35 KB), and leave 40 registers per thread; 8 blocks would leave
// 32 and make most kernels spill. Turing's SM (sm_75: T4) holds 1024 threads: 4 blocks, 64 registers.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define BN_BLOCKS_PER_SM 4
#else
#define BN_BLOCKS_PER_SM 6
#endif

// Loads of T per step and array, for a kernel that streams `arrays` arrays, so that a step loads
// BN_LOAD_BYTES: 8 floats or 2 float4s from one array, 4 floats or 1 float4 from each of two.
template <class T, int arrays>
struct Unroll {
    static const int value = BN_LOAD_BYTES / (arrays * (int)sizeof(T));
};

template <class T> __device__ __forceinline__ T zero();
template <> __device__ __forceinline__ float zero<float>() { return 0.0f; }
template <> __device__ __forceinline__ float4 zero<float4>() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }

// ---------------------------------------------------------------------------
// The work split (see the top of this file).
// ---------------------------------------------------------------------------

// The first unit of block b's share of T units: floor(b T / P).
__device__ __forceinline__ long long split_point(long long T, unsigned int b) {
    return (long long)((unsigned long long)T * b / gridDim.x);
}

// This block's share of `total` elementwise values, in whole chunks of BN_CHUNK: the thread's first
// index i and the end hi of the share (hi <= total). The thread then visits i, i + blockDim.x, ... < hi.
struct ChunkShare {
    long long i, hi;
};

__device__ __forceinline__ ChunkShare chunk_share(long long total) {
    const long long chunks = (total + BN_CHUNK - 1) / BN_CHUNK;
    const long long end = split_point(chunks, blockIdx.x + 1) * BN_CHUNK;
    return {split_point(chunks, blockIdx.x) * BN_CHUNK + threadIdx.x, end < total ? end : total};
}

// The block whose share holds unit k: the largest b with split_point(T, b) <= k.
__device__ __forceinline__ unsigned int owner(long long T, long long k) {
    return (unsigned int)(((unsigned long long)(k + 1) * gridDim.x - 1) / (unsigned long long)T);
}

// One group's part of a block's share: units [lo, hi), counted from the group's first unit. A channel has at
// most 2^31 - 2^10 values (the wrappers check it), so 32 bits hold these and a thread's index one step past
// them; only the flat numbering needs 64.
struct Segment {
    int group, lo, hi;
};

// The segments of this block's share, in order: while (work.next(seg)) { ... }.
struct BlockWork {
    long long k, end;  // next unit of the share, and its end
    int Q;             // units per group

    __device__ __forceinline__ BlockWork(long long T, int Q_) {
        Q = Q_;
        k = split_point(T, blockIdx.x);
        end = split_point(T, blockIdx.x + 1);
    }

    __device__ __forceinline__ bool next(Segment& seg) {
        if (k >= end) return false;
        const long long g = k / Q, first = g * Q;
        seg.group = (int)g;
        seg.lo = (int)(k - first);
        seg.hi = end < first + Q ? (int)(end - first) : Q;
        k = first + seg.hi;
        return true;
    }
};

// The blocks that share group g, and where their partials go. Block b stores its partial of group g in slot
// b + g: distinct for distinct (b, g), because both a block's groups and a group's blocks increase along the
// split. Group g's partials thus fill the slots first, ..., first + count - 1, in block order.
struct Sharing {
    long long first;     // slot of the group's first block
    unsigned int count;  // blocks that share the group
};

__device__ __forceinline__ Sharing sharing(long long T, int Q, int g) {
    const unsigned int b0 = owner(T, (long long)g * Q), b1 = owner(T, (long long)g * Q + Q - 1);
    Sharing s;
    s.first = g + b0;
    s.count = b1 - b0 + 1;
    return s;
}

// ---------------------------------------------------------------------------
// Welford / Chan moments: count, mean and M2 = sum of squared deviations.
// ---------------------------------------------------------------------------
struct Moments {
    int n;
    float mean;
    float m2;
};

__device__ __forceinline__ Moments identity(Moments) {
    Moments r;
    r.n = 0;
    r.mean = 0.0f;
    r.m2 = 0.0f;
    return r;
}

// Welford's update with one new value x. d and (x - new mean) have the same
// sign, so m2 only ever grows: there is no subtraction of large, close numbers.
__device__ __forceinline__ void welford_push(Moments& a, float x) {
    a.n += 1;
    const float d = x - a.mean;
    a.mean += __fdividef(d, (float)a.n);
    a.m2 += d * (x - a.mean);
}

// Chan, Golub & LeVeque's pairwise merge of two partial results. With b empty
// it returns a unchanged; with a empty (mean 0) it returns b exactly.
__device__ __forceinline__ Moments combine(Moments a, Moments b) {
    const int n = a.n + b.n;
    const float fb = n > 0 ? (float)b.n / (float)n : 0.0f;
    const float d = b.mean - a.mean;
    Moments r;
    r.n = n;
    r.mean = a.mean + d * fb;
    r.m2 = a.m2 + b.m2 + d * d * (float)a.n * fb;
    return r;
}

__device__ __forceinline__ Moments shfl_down(Moments v, int offset) {
    Moments r;
    r.n = __shfl_down_sync(BN_FULL_MASK, v.n, offset);
    r.mean = __shfl_down_sync(BN_FULL_MASK, v.mean, offset);
    r.m2 = __shfl_down_sync(BN_FULL_MASK, v.m2, offset);
    return r;
}

// ---------------------------------------------------------------------------
// Pairs of plain sums, for the backward pass: (sum dy, sum dy * (x - mean)).
// ---------------------------------------------------------------------------
struct Sums2 {
    float a;
    float b;
};

__device__ __forceinline__ Sums2 identity(Sums2) {
    Sums2 r;
    r.a = 0.0f;
    r.b = 0.0f;
    return r;
}

__device__ __forceinline__ Sums2 combine(Sums2 x, Sums2 y) {
    Sums2 r;
    r.a = x.a + y.a;
    r.b = x.b + y.b;
    return r;
}

__device__ __forceinline__ Sums2 shfl_down(Sums2 v, int offset) {
    Sums2 r;
    r.a = __shfl_down_sync(BN_FULL_MASK, v.a, offset);
    r.b = __shfl_down_sync(BN_FULL_MASK, v.b, offset);
    return r;
}

// Single floats, for the simple two-pass reduction.
__device__ __forceinline__ float identity(float) { return 0.0f; }
__device__ __forceinline__ float combine(float x, float y) { return x + y; }
__device__ __forceinline__ float shfl_down(float v, int offset) {
    return __shfl_down_sync(BN_FULL_MASK, v, offset);
}

// ---------------------------------------------------------------------------
// Level 2 and 3: warp and block trees.
// ---------------------------------------------------------------------------

// Tree over the 32 lanes of a warp; the total lands in lane 0. A lane whose
// partner lane + offset is past 31 gets its own value back from the shuffle;
// such lanes never feed lane 0, so their (doubled) values do not matter.
template <class T>
__device__ __forceinline__ T warp_reduce(T v) {
#pragma unroll
    for (int offset = BN_WARP / 2; offset > 0; offset >>= 1) {
        v = combine(v, shfl_down(v, offset));
    }
    return v;
}

// 1-D block (blockDim.x a multiple of 32, at most 1024): each warp's lane 0
// writes its warp total to shared memory, then warp 0 runs the warp tree over
// those totals (missing warps count as empty). The total is valid in thread 0.
template <class T>
__device__ __forceinline__ T block_reduce_1d(T v, T* smem /* [32] */) {
    const int lane = threadIdx.x & (BN_WARP - 1);
    const int warp = threadIdx.x / BN_WARP;
    const int nwarps = blockDim.x / BN_WARP;
    v = warp_reduce(v);
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? smem[lane] : identity(v);
        v = warp_reduce(v);
    }
    __syncthreads();  // smem may be reused by the caller
    return v;
}

// 2-D block (blockDim.y a power of two): threads with the same threadIdx.x
// hold the same channel; halve the rows in shared memory, offsets
// blockDim.y/2, ..., 2, 1. Every thread returns its column's total.
template <class T>
__device__ __forceinline__ T block_reduce_rows(T v, T* smem /* [blockDim.x * blockDim.y] */) {
    const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
    smem[ty * bx + tx] = v;
    __syncthreads();
    for (int offset = blockDim.y / 2; offset > 0; offset >>= 1) {
        if (ty < offset) smem[ty * bx + tx] = combine(smem[ty * bx + tx], smem[(ty + offset) * bx + tx]);
        __syncthreads();
    }
    v = smem[tx];
    __syncthreads();
    return v;
}

// ---------------------------------------------------------------------------
// Level 4: the partials of one group, in global memory.
// A partial is stored as 32-bit words; __ldcg reads through L2 (the last block
// must not see a stale L1 line of a slot another block wrote).
// ---------------------------------------------------------------------------
__device__ __forceinline__ void store_partial(float* ws, long long slot, Moments m) {
    ws[3 * slot + 0] = __int_as_float(m.n);
    ws[3 * slot + 1] = m.mean;
    ws[3 * slot + 2] = m.m2;
}

__device__ __forceinline__ Moments load_partial(const float* ws, long long slot, Moments) {
    Moments m;
    m.n = __float_as_int(__ldcg(ws + 3 * slot + 0));
    m.mean = __ldcg(ws + 3 * slot + 1);
    m.m2 = __ldcg(ws + 3 * slot + 2);
    return m;
}

__device__ __forceinline__ void store_partial(float* ws, long long slot, Sums2 s) {
    ws[2 * slot + 0] = s.a;
    ws[2 * slot + 1] = s.b;
}

__device__ __forceinline__ Sums2 load_partial(const float* ws, long long slot, Sums2) {
    Sums2 s;
    s.a = __ldcg(ws + 2 * slot + 0);
    s.b = __ldcg(ws + 2 * slot + 1);
    return s;
}

// Called by one thread of each of the `count` blocks that share `counter`, after its block's partial is
// stored. Returns true in exactly one block: the last to arrive, which then reads every partial. The first
// fence orders this block's partial before its ticket (release); the second, in the last block only, orders
// the ticket before its reads of the other blocks' partials (acquire), and the __syncthreads that follows
// extends that order to the rest of the block. The last block resets the counter for the next launch on the
// stream (the wrappers give every stream its own counters, so overlapping launches never share one).
__device__ __forceinline__ bool arrive_last(unsigned int* counter, unsigned int count) {
    __threadfence();
    const unsigned int ticket = atomicAdd(counter, 1u);
    const bool last = ticket == count - 1;
    if (last) {
        __threadfence();
        *counter = 0u;
    }
    return last;
}

// Level 4 for 1-D blocks (the ncs kernels). Thread 0 holds its block's partial v of a group shared by
// sh.count > 1 blocks; this block's slot is `slot`. Returns false in all blocks but the last, where v becomes
// the group's total (in thread 0), the partials merged in slot order.
template <class T>
__device__ __forceinline__ bool merge_blocks_1d(T& v, T* smem, float* partials, unsigned int* counter, Sharing sh,
                                                long long slot) {
    __shared__ bool is_last;
    if (threadIdx.x == 0) {
        store_partial(partials, slot, v);
        is_last = arrive_last(counter, sh.count);
    }
    __syncthreads();
    if (!is_last) return false;
    v = identity(v);
    for (unsigned int k = threadIdx.x; k < sh.count; k += blockDim.x) {
        v = combine(v, load_partial(partials, sh.first + k, v));
    }
    v = block_reduce_1d(v, smem);
    return true;
}

// Level 4 for 2-D blocks (the mc kernels): the same, with one partial per channel of the column (threadIdx.x,
// in slot * blockDim.x + threadIdx.x) and thread row ty merging slots ty, ty + by, ...; the column's totals
// end in every thread of the column.
template <class T>
__device__ __forceinline__ bool merge_blocks_rows(T& v, T* smem, float* partials, unsigned int* counter, Sharing sh,
                                                  long long slot, bool has_channel) {
    __shared__ bool is_last;
    const long long bx = blockDim.x;
    if (threadIdx.y == 0 && has_channel) {
        store_partial(partials, slot * bx + threadIdx.x, v);
        __threadfence();  // each writer publishes its own partial before thread (0, 0) takes the ticket
    }
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) is_last = arrive_last(counter, sh.count);
    __syncthreads();
    if (!is_last) return false;
    v = identity(v);
    if (has_channel) {
        for (unsigned int k = threadIdx.y; k < sh.count; k += blockDim.y) {
            v = combine(v, load_partial(partials, (sh.first + k) * bx + threadIdx.x, v));
        }
    }
    v = block_reduce_rows(v, smem);
    return true;
}

// ---------------------------------------------------------------------------
// Walks without a division per element.
// ---------------------------------------------------------------------------

// The per-channel walk of an NCHW tensor seen as (N, C, S), S = H * W values (or float4s) per row.
// Element j of channel c (0 <= j < N*S) sits at n*C*S + c*S + s with n = j / S, s = j % S. A thread
// visits j, j + stride, j + 2*stride, ...; the division happens once, then each step adds
// (stride / S, stride % S) with one carry.
struct ChannelWalk {
    long long offset;  // n * C * S + c * S + s
    int s;
    long long step_offset;  // (stride / S) * C * S + stride % S
    int step_s;             // stride % S
    long long wrap;         // C * S - S: the carry from s == S to the next sample
    int S;

    __device__ __forceinline__ ChannelWalk(long long j, long long stride, int C, int S_, int c) {
        S = S_;
        const long long CS = (long long)C * S;
        const long long n = j / S;
        s = (int)(j - n * S);
        offset = n * CS + (long long)c * S + s;
        const long long dn = stride / S;
        step_s = (int)(stride - dn * S);
        step_offset = dn * CS + step_s;
        wrap = CS - S;
    }

    __device__ __forceinline__ void advance() {
        offset += step_offset;
        s += step_s;
        if (s >= S) {
            s -= S;
            offset += wrap;
        }
    }
};

// The channel of a flat walk over an NCHW tensor seen as R = N*C rows of S units: unit i is in row i / S,
// of channel (i / S) % C. Each step of `stride` units adds (stride % S, (stride / S) % C) with one carry each.
struct RowChannel {
    int s, c;            // i % S, (i / S) % C
    int step_s, step_c;  // stride % S, (stride / S) % C
    int S, C;

    __device__ __forceinline__ RowChannel(long long i, int stride, int S_, int C_) {
        S = S_;
        C = C_;
        const long long row = i / S;
        s = (int)(i - row * S);
        c = (int)(row % C);
        step_s = stride % S;
        step_c = (stride / S) % C;
    }

    __device__ __forceinline__ void advance() {
        s += step_s;
        c += step_c;
        if (s >= S) {
            s -= S;
            c += 1;
        }
        if (c >= C) c -= C;  // c + step_c + 1 <= 2C - 1
    }
};

// ---------------------------------------------------------------------------
// Level 1 walks: a thread's elements, in increasing order, in steps of U. A full step issues its U loads
// (BN_LOAD_BYTES in all) before it uses any of them; the tail goes one by one.
// ---------------------------------------------------------------------------

// Elements p, p + p_step, ... < hi of a thread, element n at address a + n * a_step (flat walks: p is the
// address, and the step the block's threads; channels-last walks: p is the row, and the step rows * C, which
// needs 64 bits). load(address) returns an element's values, use(address, v) consumes them.
template <int U, class V, class P, class A, class Load, class Use>
__device__ __forceinline__ void walk_strided(P p, P hi, int p_step, long long a, A a_step, Load load, Use use) {
    for (; U > 1 && p < hi - (U - 1) * p_step; p += U * p_step, a += U * a_step) {
        V v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = load(a + u * a_step);
#pragma unroll
        for (int u = 0; u < U; ++u) use(a + u * a_step, v[u]);
    }
    for (; p < hi; p += p_step, a += a_step) use(a, load(a));
}

// Elements j, j + blockDim.x, ... < hi of channel c of an (N, C, S) tensor, through a ChannelWalk.
// load(offset) returns an element's values, use(v) consumes them.
template <int U, class V, class Load, class Use>
__device__ __forceinline__ void walk_channel(int C, int S, int c, int j, int hi, Load load, Use use) {
    const int stride = blockDim.x;
    if (j >= hi) return;
    ChannelWalk walk(j, stride, C, S, c);
    for (; U > 1 && j < hi - (U - 1) * stride; j += U * stride) {
        V v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            v[u] = load(walk.offset);
            walk.advance();
        }
#pragma unroll
        for (int u = 0; u < U; ++u) use(v[u]);
    }
    for (; j < hi; j += stride, walk.advance()) use(load(walk.offset));
}
