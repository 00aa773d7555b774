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
#define BN_FANIN 32      // partials (or runs of partials) one block merges at most, at the grid level

// The resident blocks per SM each kernel is compiled for: __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM[_WIDE])
// makes ptxas fit the registers to that many blocks (or report a spill): 6 blocks of 256 threads leave each
// thread 40 registers, 5 leave 48. A thread's step must issue all its loads (BN_LOAD_BYTES) before it uses
// any, or the bytes in flight shrink: most kernels do that in 40 registers; those whose compiled hot loop at
// 40 did not (ptxas used a load before issuing the next, or spilled) are compiled for 5 blocks (_WIDE).
// tests/test_cuda_sass.py checks both from the machine code. Turing's SM (sm_75: T4) holds 1024 threads: 4
// blocks, 64 registers, for every kernel.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define BN_BLOCKS_PER_SM 4
#define BN_BLOCKS_PER_SM_WIDE 4
#else
#define BN_BLOCKS_PER_SM 6
#define BN_BLOCKS_PER_SM_WIDE 5
#endif

// Loads of T per step and array, for a kernel that streams `arrays` arrays, so that a step loads
// BN_LOAD_BYTES: 8 floats or 2 float4s from one array, 4 floats or 1 float4 from each of two.
template <class T, int arrays>
struct Unroll {
    static const int value = BN_LOAD_BYTES / (arrays * (int)sizeof(T));
};

// ---------------------------------------------------------------------------
// The work split (see the top of this file).
// ---------------------------------------------------------------------------

// The first unit of block b's share of T units: floor(b T / P).
__device__ __forceinline__ long long split_point(long long T, unsigned int b) {
    return (long long)((unsigned long long)T * b / gridDim.x);
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
// Welford / Chan moments of L channels that always see the same number of values (one channel, or the 4 of a
// float4 in the channels-last _vec4 kernels): the count, and each channel's mean and M2 = sum of squared
// deviations. Sharing the count shares each update's division.
// ---------------------------------------------------------------------------
template <int L>
struct Moments {
    int n;
    float mean[L];
    float m2[L];
};

template <int L>
__device__ __forceinline__ Moments<L> identity(Moments<L>) {
    Moments<L> r;
    r.n = 0;
#pragma unroll
    for (int l = 0; l < L; ++l) r.mean[l] = r.m2[l] = 0.0f;
    return r;
}

// Welford's update with K new values x[l][0..K) of each channel l, as Chan's merge (below) of the K values'
// own mean and M2, computed in two passes over K registers: one division per K values instead of one per
// value. Every term added to m2 is non-negative: there is no subtraction of large, close numbers.
template <int L, int K>
__device__ __forceinline__ void welford_push(Moments<L>& a, const float (&x)[L][K]) {
    static_assert((K & (K - 1)) == 0, "K a power of two: sum * (1 / K) is exact");
    const float fb = __fdividef((float)K, (float)(a.n + K)), na = (float)a.n;
#pragma unroll
    for (int l = 0; l < L; ++l) {
        float sum = x[l][0];
#pragma unroll
        for (int k = 1; k < K; ++k) sum += x[l][k];
        const float mb = sum * (1.0f / K);
        float m2b = 0.0f;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const float d = x[l][k] - mb;
            m2b += d * d;
        }
        const float d = mb - a.mean[l];
        a.mean[l] += d * fb;
        a.m2[l] += m2b + d * d * na * fb;
    }
    a.n += K;
}

// Chan, Golub & LeVeque's pairwise merge of two partial results. With b empty
// it returns a unchanged; with a empty (mean 0) it returns b exactly.
template <int L>
__device__ __forceinline__ Moments<L> combine(Moments<L> a, Moments<L> b) {
    const int n = a.n + b.n;
    const float fb = n > 0 ? (float)b.n / (float)n : 0.0f;
    Moments<L> r;
    r.n = n;
#pragma unroll
    for (int l = 0; l < L; ++l) {
        const float d = b.mean[l] - a.mean[l];
        r.mean[l] = a.mean[l] + d * fb;
        r.m2[l] = a.m2[l] + b.m2[l] + d * d * (float)a.n * fb;
    }
    return r;
}

// The warp shuffle of level 2, word by word.
template <int L>
__device__ __forceinline__ Moments<L> shfl_down(Moments<L> v, int offset) {
    v.n = __shfl_down_sync(BN_FULL_MASK, v.n, offset);
#pragma unroll
    for (int l = 0; l < L; ++l) {
        v.mean[l] = __shfl_down_sync(BN_FULL_MASK, v.mean[l], offset);
        v.m2[l] = __shfl_down_sync(BN_FULL_MASK, v.m2[l], offset);
    }
    return v;
}

// ---------------------------------------------------------------------------
// Pairs of plain sums of L channels, for the backward pass: (sum dy, sum dy * (x - mean)).
// ---------------------------------------------------------------------------
template <int L>
struct Sums {
    float a[L];
    float b[L];
};

template <int L>
__device__ __forceinline__ Sums<L> identity(Sums<L>) {
    Sums<L> r;
#pragma unroll
    for (int l = 0; l < L; ++l) r.a[l] = r.b[l] = 0.0f;
    return r;
}

template <int L>
__device__ __forceinline__ Sums<L> combine(Sums<L> x, Sums<L> y) {
#pragma unroll
    for (int l = 0; l < L; ++l) {
        x.a[l] += y.a[l];
        x.b[l] += y.b[l];
    }
    return x;
}

template <int L>
__device__ __forceinline__ Sums<L> shfl_down(Sums<L> v, int offset) {
#pragma unroll
    for (int l = 0; l < L; ++l) {
        v.a[l] = __shfl_down_sync(BN_FULL_MASK, v.a[l], offset);
        v.b[l] = __shfl_down_sync(BN_FULL_MASK, v.b[l], offset);
    }
    return v;
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
// A partial is stored as 32-bit words, through L2 (__stcg, __ldcg: the last block must not see a stale L1 line
// of a slot another block wrote).
// ---------------------------------------------------------------------------
template <int L>
__device__ __forceinline__ void store_partial(float* ws, long long slot, const Moments<L>& m) {
    float* p = ws + (2 * L + 1) * slot;
    __stcg(p, __int_as_float(m.n));
#pragma unroll
    for (int l = 0; l < L; ++l) {
        __stcg(p + 1 + 2 * l, m.mean[l]);
        __stcg(p + 2 + 2 * l, m.m2[l]);
    }
}

template <int L>
__device__ __forceinline__ Moments<L> load_partial(const float* ws, long long slot, Moments<L>) {
    const float* p = ws + (2 * L + 1) * slot;
    Moments<L> m;
    m.n = __float_as_int(__ldcg(p));
#pragma unroll
    for (int l = 0; l < L; ++l) {
        m.mean[l] = __ldcg(p + 1 + 2 * l);
        m.m2[l] = __ldcg(p + 2 + 2 * l);
    }
    return m;
}

template <int L>
__device__ __forceinline__ void store_partial(float* ws, long long slot, const Sums<L>& s) {
#pragma unroll
    for (int l = 0; l < L; ++l) {
        __stcg(ws + 2 * (L * slot + l), s.a[l]);
        __stcg(ws + 2 * (L * slot + l) + 1, s.b[l]);
    }
}

template <int L>
__device__ __forceinline__ Sums<L> load_partial(const float* ws, long long slot, Sums<L>) {
    Sums<L> s;
#pragma unroll
    for (int l = 0; l < L; ++l) {
        s.a[l] = __ldcg(ws + 2 * (L * slot + l));
        s.b[l] = __ldcg(ws + 2 * (L * slot + l) + 1);
    }
    return s;
}

// How the threads of a block hold a partial: thread row `row` of `rows` holds lane `lane` of `lanes` (1-D
// blocks: one lane, a row per thread; 2-D blocks: a lane per threadIdx.x, a row per threadIdx.y); has_lane
// is false in the lanes of a partial column of channels that hold none.
struct Team {
    int lanes, lane, row, rows;
    bool has_lane;
};

// Row 0 of the block stores its partial v in `slot` and publishes it (__threadfence: each writer orders its
// own store before the block's ticket, a release); then thread 0 takes a ticket of `counter`. Returns true in
// exactly one of the `count` blocks that share the counter: the last to arrive, whose ticket is followed by
// a second fence (an acquire: it orders the ticket before the block's reads of the other blocks' slots, and
// the __syncthreads that follows extends that order to the whole block). The last block resets the counter
// for the next launch on the stream (the wrappers give every stream its own counters, so overlapping
// launches never share one).
template <class T>
__device__ __forceinline__ bool arrive(const T& v, float* partials, long long slot, unsigned int* counter,
                                       unsigned int count, Team team) {
    __shared__ bool is_last;
    if (team.row == 0 && team.has_lane) {
        store_partial(partials, slot * team.lanes + team.lane, v);
        __threadfence();
    }
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        is_last = atomicAdd(counter, 1u) == count - 1;
        if (is_last) {
            __threadfence();
            *counter = 0u;
        }
    }
    __syncthreads();
    return is_last;
}

// Row r's merge, in slot order, of the n slots first, first + stride, ...: it takes the r-th, (r + rows)-th,
// ... of them.
template <class T>
__device__ __forceinline__ T gather(const float* partials, long long first, unsigned int n, unsigned int stride,
                                    Team team) {
    T v = identity(T());
    if (team.has_lane) {
        for (unsigned int k = team.row; k < n; k += team.rows) {
            v = combine(v, load_partial(partials, (first + (long long)k * stride) * team.lanes + team.lane, v));
        }
    }
    return v;
}

// Level 4. Every thread of a block calls it with its share of the block's partial v of a group that sh.count >
// 1 blocks share (row 0 holds it; see Team), k being this block's place among them. counters holds one
// counter per group, then one per partial slot. The partials merge in two levels, in slot order: the last
// block to finish of each run of BN_FANIN consecutive blocks merges the run's partials (gather, then
// tree(v), the block tree over the rows); with several runs it stores the result in the run's first slot,
// and the last run to finish merges those. So no block merges more than BN_FANIN partials or runs of
// partials (a few per row of threads). Returns true in the block that holds the group's total, where tree
// leaves it.
template <class T, class Tree>
__device__ __forceinline__ bool merge_blocks(T& v, float* partials, unsigned int* counters, int groups, int group,
                                             Sharing sh, unsigned int k, Team team, Tree tree) {
    const unsigned int run = k / BN_FANIN * BN_FANIN, runs = (sh.count + BN_FANIN - 1) / BN_FANIN;
    const unsigned int size = sh.count - run < BN_FANIN ? sh.count - run : BN_FANIN;
    if (!arrive(v, partials, sh.first + k, counters + groups + sh.first + run, size, team)) return false;
    v = tree(gather<T>(partials, sh.first + run, size, 1, team));
    if (runs == 1) return true;
    if (!arrive(v, partials, sh.first + run, counters + group, runs, team)) return false;
    v = tree(gather<T>(partials, sh.first, runs, BN_FANIN, team));
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

// The rows of a flat walk over an NCHW tensor seen as R = N*C rows of S units: unit i is unit i % S of row
// i / S. A walk of units i, i + stride, ... follows (i / S - r0, i % S), for a window of rows from r0 on, with
// one carry per step instead of a division.
struct RowWalk {
    int s, r;            // i % S, i / S - r0
    int step_s, step_r;  // stride % S, stride / S
    int S;

    __device__ __forceinline__ RowWalk(long long i, long long r0, int stride, int S_) {
        S = S_;
        const long long row = i / S;
        s = (int)(i - row * S);
        r = (int)(row - r0);
        step_s = stride % S;
        step_r = stride / S;
    }

    __device__ __forceinline__ void advance() {
        s += step_s;
        r += step_r;
        if (s >= S) {
            s -= S;
            r += 1;
        }
    }
};

// The elementwise ncs kernels: this block's share of a flat (R, S) tensor (whole chunks of BN_CHUNK units,
// the last one cut at the end), in windows of blockDim.x rows. For each window, thread t first calls
// fold(r0 + t, t) if row r0 + t holds some of the share (it writes that row's per-channel coefficients to
// entry t of a table in shared memory), then, after a barrier, visit(i, hi, r0) for its units i, i +
// blockDim.x, ... < hi of the window. So a channel's coefficients are computed once per block and row, not
// once per value, and the hot loop has no branch and no global load but the streamed ones.
template <class Fold, class Visit>
__device__ __forceinline__ void row_windows(long long R, int S, Fold fold, Visit visit) {
    const long long chunks = (R * S + BN_CHUNK - 1) / BN_CHUNK;
    const long long lo = split_point(chunks, blockIdx.x) * BN_CHUNK;
    const long long end = split_point(chunks, blockIdx.x + 1) * BN_CHUNK;
    const long long hi = end < R * S ? end : R * S;
    for (long long r0 = lo / S; r0 * S < hi; r0 += blockDim.x) {
        const long long row = r0 + threadIdx.x;
        if (row * S < hi) fold(row, (int)threadIdx.x);
        __syncthreads();
        const long long first = lo > r0 * S ? lo : r0 * S, last = (r0 + blockDim.x) * S;
        visit(first + threadIdx.x, last < hi ? last : hi, r0);
        __syncthreads();  // the table is rewritten for the next window
    }
}

// ---------------------------------------------------------------------------
// Level 1 walks: a thread's elements, in increasing order. A full step loads U elements (BN_LOAD_BYTES over
// the arrays it streams) into registers and then hands them, as one array V[U], to use; the tail hands them
// over one at a time, as arrays of one. use is a generic lambda: sizeof(v) / sizeof(v[0]) elements.
// ---------------------------------------------------------------------------

// Elements p, p + p_step, ... < hi of a thread, element n at address a + n * a_step (flat walks: p is the
// address, and the step the block's threads; channels-last walks: p is the row, and the step rows * C, which
// needs 64 bits). load(address) returns an element's values, use(v, address of v[0]) consumes an array.
template <int U, class V, class P, class A, class Load, class Use>
__device__ __forceinline__ void walk_strided(P p, P hi, int p_step, long long a, A a_step, Load load, Use use) {
    for (; U > 1 && p < hi - (U - 1) * p_step; p += U * p_step, a += U * a_step) {
        V v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = load(a + u * a_step);
        use(v, a);
    }
    for (; p < hi; p += p_step, a += a_step) {
        const V v[1] = {load(a)};
        use(v, a);
    }
}

// Elements j, j + blockDim.x, ... < hi of channel c of an (N, C, S) tensor, through a ChannelWalk.
// load(offset) returns an element's values, use(v) consumes an array of them.
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
        use(v);
    }
    for (; j < hi; j += stride, walk.advance()) {
        const V v[1] = {load(walk.offset)};
        use(v);
    }
}

// The components of a float or float4, by index (a constant after unrolling).
template <class T>
struct Width {
    static const int value = sizeof(T) / sizeof(float);
};
__device__ __forceinline__ float component(float v, int) { return v; }
__device__ __forceinline__ float component(float4 v, int l) { return l == 0 ? v.x : l == 1 ? v.y : l == 2 ? v.z : v.w; }

// Welford's update of L channels with N elements of T: with L = 1 the elements' components are N * W values of
// one channel, in order; with L = W each component is a channel of its own, with N values.
template <int L, class T, int N>
__device__ __forceinline__ void push(Moments<L>& a, const T (&v)[N]) {
    const int W = Width<T>::value;
    float x[L][N * W / L];
#pragma unroll
    for (int u = 0; u < N; ++u) {
#pragma unroll
        for (int l = 0; l < W; ++l) x[l % L][u * (W / L) + l / L] = component(v[u], l);
    }
    welford_push(a, x);
}
