// bn_common.cuh: the merge primitives every batch-norm kernel of chapter 5 shares.
//
// A per-channel statistic is reduced in four levels, always in the same order:
//   1. each thread folds its own elements in sequentially (Welford's update, or a plain sum);
//   2. the 32 lanes of a warp merge with __shfl_down_sync at offsets 16, 8, 4, 2, 1
//      (lane i takes lane i + offset as its right-hand operand);
//   3. the warps (or the rows of a 2-D block) merge through shared memory;
//   4. the blocks of one channel merge in the last block to finish (grid level).
// bnref/cuda/mirror.py replays exactly this tree in NumPy; keep the two in step.
//
// Compiled by NVRTC (through CuPy) and by nvcc (tests): no standard headers.
#pragma once

#define BN_FULL_MASK 0xffffffffu
#define BN_WARP 32

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
// Level 4: partial results of the blocks of one channel, in global memory.
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

// Called by one thread of each of the G blocks that share `counter`, after it
// stored the block's partial. Returns true in exactly one block: the last to
// arrive, which then sees every partial. It resets the counter for the next
// launch. (The fence orders this block's partial before its ticket.)
__device__ __forceinline__ bool arrive_last(unsigned int* counter, unsigned int G) {
    __threadfence();
    const unsigned int ticket = atomicAdd(counter, 1u);
    const bool last = ticket == G - 1;
    if (last) *counter = 0u;
    return last;
}

// Level 4 for 1-D blocks (the ncs kernels). Thread 0 holds its block's total v
// for the channel whose G partial slots start at slot0. Every block stores
// its partial and takes a ticket; returns false in all blocks but the last,
// where v becomes the channel's total (in thread 0), merged in slot order.
template <class T>
__device__ __forceinline__ bool merge_blocks_1d(T& v, T* smem, float* partials, unsigned int* counter,
                                                long long slot0, unsigned int g, unsigned int G) {
    __shared__ bool is_last;
    if (threadIdx.x == 0) {
        store_partial(partials, slot0 + g, v);
        is_last = arrive_last(counter, G);
    }
    __syncthreads();
    if (!is_last) return false;
    v = identity(v);
    for (unsigned int k = threadIdx.x; k < G; k += blockDim.x) v = combine(v, load_partial(partials, slot0 + k, v));
    v = block_reduce_1d(v, smem);
    return true;
}

// Level 4 for 2-D blocks (the mc kernels): the same, with one partial per
// channel column (threadIdx.x) and thread row ty merging slots ty, ty + by, ...;
// the column total ends in every thread of the column.
template <class T>
__device__ __forceinline__ bool merge_blocks_rows(T& v, T* smem, float* partials, unsigned int* counter,
                                                  long long slot0, bool has_channel, unsigned int g, unsigned int G) {
    __shared__ bool is_last;
    if (threadIdx.y == 0 && has_channel) {
        store_partial(partials, slot0 + g, v);
        __threadfence();  // each writer publishes its own partial before thread (0, 0) takes the ticket
    }
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) is_last = arrive_last(counter, G);
    __syncthreads();
    if (!is_last) return false;
    v = identity(v);
    if (has_channel) {
        for (unsigned int k = threadIdx.y; k < G; k += blockDim.y) v = combine(v, load_partial(partials, slot0 + k, v));
    }
    v = block_reduce_rows(v, smem);
    return true;
}

// ---------------------------------------------------------------------------
// The per-channel walk of an NCHW tensor seen as (N, C, S), S = H * W.
// Element j of channel c (0 <= j < N*S) sits at n*C*S + c*S + s with
// n = j / S, s = j % S. A thread visits j, j + stride, j + 2*stride, ...;
// the division happens once, then each step adds (stride / S, stride % S)
// with one carry, so the loop has no integer division.
// ---------------------------------------------------------------------------
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
