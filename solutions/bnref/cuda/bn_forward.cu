// bn_forward.cu: the fused training-forward statistics of batch norm, one launch.
//
// For every channel c it computes the batch mean and the biased variance of all
// the channel's values with Welford's update per thread and Chan's merge up
// the tree of bn_common.cuh (warp, block, then the blocks that share the channel),
// and the last of those blocks finalizes:
//     save_mean[c] = mean,  save_rstd[c] = 1 / sqrt(var + eps),
//     running_mean[c] <- (1 - momentum) * running_mean[c] + momentum * mean
//     running_var[c]  <- (1 - momentum) * running_var[c]  + momentum * var * n / (n - 1)
// (PyTorch's convention: momentum weighs the new statistic, and the running
// variance averages the unbiased batch variance). The output y = x * a + b is
// then one pass of bn_affine.cu with a = gamma * rstd, b = beta - mean * a.
//
// Both kernels run a persistent grid (bn_common.cuh): block b owns a share of the work that differs from
// every other block's by at most one unit.
//   bn_forward_stats_ncs[_vec4]  x is (N, C, S) with S = H * W (NCHW) values, or S/4 float4s (_vec4, when
//                         S % 4 == 0 and x is 16-byte aligned); 1-D blocks. A unit is BN_CHUNK consecutive
//                         values (float4s) of one channel; in a segment [lo, hi) of channel c, thread t
//                         visits the channel's elements j = lo + t + k * blockDim.x.
//   bn_forward_stats_mc   x is (M, C), channels last (NHWC with M = N*H*W, or a
//                         plain (N, D) batch); 2-D blocks (bx, by): threadIdx.x picks the channel in a
//                         column of bx channels, so a warp reads bx consecutive floats of one row. A unit is
//                         one row of a column; in a segment [lo, hi) of rows, thread row ty visits the rows
//                         m = lo + ty + k * by.
#include "bn_common.cuh"

// Welford's update with the 1 or 4 values of a float or float4, in order.
__device__ __forceinline__ void push(Moments& m, float v) { welford_push(m, v); }
__device__ __forceinline__ void push(Moments& m, float4 v) {
    welford_push(m, v.x);
    welford_push(m, v.y);
    welford_push(m, v.z);
    welford_push(m, v.w);
}

// The finalizer: one thread per channel, after the whole tree has merged.
__device__ __forceinline__ void finalize_moments(Moments m, int c, float eps, float momentum, int update_running,
                                                 float* __restrict__ save_mean, float* __restrict__ save_rstd,
                                                 float* __restrict__ running_mean, float* __restrict__ running_var) {
    const float var = m.m2 / (float)m.n;
    save_mean[c] = m.mean;
    save_rstd[c] = 1.0f / sqrtf(var + eps);
    if (update_running) {
        const float unbiased = m.m2 / (float)(m.n - 1);
        running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * m.mean;
        running_var[c] = (1.0f - momentum) * running_var[c] + momentum * unbiased;
    }
}

// NCS: T is float or float4; S is the row length in units of T. Units: chunks of BN_CHUNK elements of a
// channel, Q = ceil(N * S / BN_CHUNK) per channel, channel by channel. In a segment [lo, hi) of channel c,
// thread t folds in elements lo + t, lo + t + blockDim.x, ... with Welford's update. smem: the kernel's __shared__
// Moments[BN_WARP] (declared there, not in this template, so that the emulator can fill it; see emulator.hpp).
template <class T>
__device__ __forceinline__ void forward_stats_ncs(const T* __restrict__ x, int N, int C, int S,
                                                  float eps, float momentum, int update_running,
                                                  float* __restrict__ save_mean, float* __restrict__ save_rstd,
                                                  float* __restrict__ running_mean, float* __restrict__ running_var,
                                                  float* __restrict__ partials, unsigned int* __restrict__ counters,
                                                  Moments* smem) {
    const long long L = (long long)N * S;                       // elements per channel
    const int Q = (int)((L + BN_CHUNK - 1) / BN_CHUNK);          // chunks per channel
    const long long units = (long long)Q * C;
    BlockWork work(units, Q);
    Segment seg;
    while (work.next(seg)) {
        const int c = seg.group;
        const int hi = (long long)seg.hi * BN_CHUNK < L ? seg.hi * BN_CHUNK : (int)L;
        Moments m = identity(Moments());                                                // level 1
        walk_channel<Unroll<T, 1>::value, T>(
            C, S, c, seg.lo * BN_CHUNK + (int)threadIdx.x, hi, [&](long long i) { return __ldg(x + i); },
            [&](T v) { push(m, v); });
        m = block_reduce_1d(m, smem);                                                   // levels 2 and 3
        const Sharing sh = sharing(units, Q, c);                                        // level 4
        if (sh.count > 1 && !merge_blocks_1d(m, smem, partials, counters + c, sh, blockIdx.x + c)) continue;
        if (threadIdx.x == 0) {
            finalize_moments(m, c, eps, momentum, update_running, save_mean, save_rstd, running_mean, running_var);
        }
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_forward_stats_ncs(const float* __restrict__ x, int N, int C, int S,
                     float eps, float momentum, int update_running,
                     float* __restrict__ save_mean, float* __restrict__ save_rstd,
                     float* __restrict__ running_mean, float* __restrict__ running_var,
                     float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Moments smem[BN_WARP];
    forward_stats_ncs<float>(x, N, C, S, eps, momentum, update_running, save_mean, save_rstd, running_mean,
                             running_var, partials, counters, smem);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_forward_stats_ncs_vec4(const float4* __restrict__ x, int N, int C, int S4,
                          float eps, float momentum, int update_running,
                          float* __restrict__ save_mean, float* __restrict__ save_rstd,
                          float* __restrict__ running_mean, float* __restrict__ running_var,
                          float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Moments smem[BN_WARP];
    forward_stats_ncs<float4>(x, N, C, S4, eps, momentum, update_running, save_mean, save_rstd, running_mean,
                              running_var, partials, counters, smem);
}

// Channels last, x (M, C): threadIdx.x picks the channel, so a warp reads 32 neighbouring channels of one
// row; there is no warp level, the 8 thread rows of a block merge in shared memory instead. Units: the M
// rows of a column of blockDim.x channels, column by column.
extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_forward_stats_mc(const float* __restrict__ x, int M, int C,
                    float eps, float momentum, int update_running,
                    float* __restrict__ save_mean, float* __restrict__ save_rstd,
                    float* __restrict__ running_mean, float* __restrict__ running_var,
                    float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Moments smem[BN_THREADS];
    const int by = blockDim.y;
    const long long units = (long long)((C + blockDim.x - 1) / blockDim.x) * M;
    BlockWork work(units, M);
    Segment seg;
    while (work.next(seg)) {
        const int c = seg.group * blockDim.x + threadIdx.x;
        const bool has_channel = c < C;
        // Level 1: Welford over this thread's rows of the segment, in increasing m.
        Moments m = identity(Moments());
        if (has_channel) {
            const int row = seg.lo + threadIdx.y;
            walk_strided<Unroll<float, 1>::value, float>(
                row, seg.hi, by, (long long)row * C + c, (long long)by * C, [&](long long i) { return __ldg(x + i); },
                [&](long long, float v) { welford_push(m, v); });
        }
        // Level 3 (a warp holds 32 channels, so no shuffle level): rows of the block.
        m = block_reduce_rows(m, smem);
        // Level 4: the last of the blocks that share this column of channels merges.
        const Sharing sh = sharing(units, M, seg.group);
        if (sh.count > 1 &&
            !merge_blocks_rows(m, smem, partials, counters + seg.group, sh, blockIdx.x + seg.group, has_channel)) {
            continue;
        }
        if (threadIdx.y == 0 && has_channel) {
            finalize_moments(m, c, eps, momentum, update_running, save_mean, save_rstd, running_mean, running_var);
        }
    }
}
