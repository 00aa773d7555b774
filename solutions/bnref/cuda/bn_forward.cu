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
//   bn_forward_stats_mc[_vec4]   x is (M, C), channels last (NHWC with M = N*H*W, or a plain (N, D) batch),
//                         as M rows of Cv = C floats or C/4 float4s (_vec4, when C % 4 == 0 and x is aligned);
//                         2-D blocks (bx, by): threadIdx.x picks the float (1 channel) or float4 (4 channels)
//                         of a row in a column of bx of them (plan.row_block: bx a power of two up to 32 that
//                         leaves the fewest lanes idle), so a warp reads 32 / bx rows of bx consecutive floats
//                         or float4s each: 512 contiguous bytes at C = 64, where a column is the whole row. A
//                         unit is one row of a column; in a segment [lo, hi) of rows, thread row ty visits the
//                         rows m = lo + ty + k * by.
#include "bn_common.cuh"

// The finalizer of L channels, 4 * cv ... (L = 4) or cv (L = 1): one thread each, after the whole tree has
// merged.
template <int L>
__device__ __forceinline__ void finalize_moments(const Moments<L>& m, int cv, float eps, float momentum,
                                                 int update_running, float* __restrict__ save_mean,
                                                 float* __restrict__ save_rstd, float* __restrict__ running_mean,
                                                 float* __restrict__ running_var) {
#pragma unroll
    for (int l = 0; l < L; ++l) {
        const int c = L * cv + l;
        const float var = m.m2[l] / (float)m.n;
        save_mean[c] = m.mean[l];
        save_rstd[c] = 1.0f / sqrtf(var + eps);
        if (update_running) {
            const float unbiased = m.m2[l] / (float)(m.n - 1);
            running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * m.mean[l];
            running_var[c] = (1.0f - momentum) * running_var[c] + momentum * unbiased;
        }
    }
}

// NCS: T is float or float4; S is the row length in units of T. Units: chunks of BN_CHUNK elements of a
// channel, Q = ceil(N * S / BN_CHUNK) per channel, channel by channel. In a segment [lo, hi) of channel c,
// thread t folds in elements lo + t, lo + t + blockDim.x, ... with Welford's update, a step of BN_LOAD_BYTES
// (8 values) at a time. smem: the kernel's __shared__ Moments<1>[BN_WARP] (declared there, not in
// this template, so that the emulator can fill it; see emulator.hpp).
template <class T>
__device__ __forceinline__ void forward_stats_ncs(const T* __restrict__ x, int N, int C, int S,
                                                  float eps, float momentum, int update_running,
                                                  float* __restrict__ save_mean, float* __restrict__ save_rstd,
                                                  float* __restrict__ running_mean, float* __restrict__ running_var,
                                                  float* __restrict__ partials, unsigned int* __restrict__ counters,
                                                  Moments<1>* smem) {
    const long long L = (long long)N * S;                       // elements per channel
    const int Q = (int)((L + BN_CHUNK - 1) / BN_CHUNK);          // chunks per channel
    const long long units = (long long)Q * C;
    const Team team = {1, 0, (int)threadIdx.x, (int)blockDim.x, true};
    const auto tree = [&](Moments<1> v) { return block_reduce_1d(v, smem); };   // levels 2 and 3
    BlockWork work(units, Q);
    Segment seg;
    while (work.next(seg)) {
        const int c = seg.group;
        const int hi = (long long)seg.hi * BN_CHUNK < L ? seg.hi * BN_CHUNK : (int)L;
        Moments<1> m = identity(Moments<1>());                                          // level 1
        walk_channel<Unroll<T, 1>::value, T>(
            C, S, c, seg.lo * BN_CHUNK + (int)threadIdx.x, hi, [&](long long i) { return __ldg(x + i); },
            [&](const auto& v) { push(m, v); });
        m = tree(m);
        const Sharing sh = sharing(units, Q, c);                                        // level 4
        if (sh.count > 1 && !merge_blocks(m, partials, counters, C, c, sh, blockIdx.x + c - sh.first, team, tree)) {
            continue;
        }
        if (threadIdx.x == 0) {
            finalize_moments(m, c, eps, momentum, update_running, save_mean, save_rstd, running_mean, running_var);
        }
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM_WIDE)
bn_forward_stats_ncs(const float* __restrict__ x, int N, int C, int S,
                     float eps, float momentum, int update_running,
                     float* __restrict__ save_mean, float* __restrict__ save_rstd,
                     float* __restrict__ running_mean, float* __restrict__ running_var,
                     float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Moments<1> smem[BN_WARP];
    forward_stats_ncs<float>(x, N, C, S, eps, momentum, update_running, save_mean, save_rstd, running_mean,
                             running_var, partials, counters, smem);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_forward_stats_ncs_vec4(const float4* __restrict__ x, int N, int C, int S4,
                          float eps, float momentum, int update_running,
                          float* __restrict__ save_mean, float* __restrict__ save_rstd,
                          float* __restrict__ running_mean, float* __restrict__ running_var,
                          float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Moments<1> smem[BN_WARP];
    forward_stats_ncs<float4>(x, N, C, S4, eps, momentum, update_running, save_mean, save_rstd, running_mean,
                              running_var, partials, counters, smem);
}

// MC: T is float or float4, Cv the row width in units of T, L = 1 or 4 channels per thread. Units: the M rows
// of a column of blockDim.x lanes, column by column. Level 1 folds in a step of BN_LOAD_BYTES (8 rows of a
// float, or 2 of a float4) at a time; there is no warp level, the thread rows of a block merge in shared
// memory instead (smem: the kernel's __shared__ Moments<L>[BN_THREADS]).
template <class T>
__device__ __forceinline__ void forward_stats_mc(const T* __restrict__ x, int M, int Cv, float eps, float momentum,
                                                 int update_running, float* __restrict__ save_mean,
                                                 float* __restrict__ save_rstd, float* __restrict__ running_mean,
                                                 float* __restrict__ running_var, float* __restrict__ partials,
                                                 unsigned int* __restrict__ counters,
                                                 Moments<Width<T>::value>* smem) {
    const int L = Width<T>::value, by = blockDim.y;
    const int groups = (Cv + blockDim.x - 1) / blockDim.x;
    const long long units = (long long)groups * M;
    const auto tree = [&](Moments<L> v) { return block_reduce_rows(v, smem); };   // level 3
    BlockWork work(units, M);
    Segment seg;
    while (work.next(seg)) {
        const int cv = seg.group * blockDim.x + threadIdx.x;
        const Team team = {(int)blockDim.x, (int)threadIdx.x, (int)threadIdx.y, by, cv < Cv};
        Moments<L> m = identity(Moments<L>());                                          // level 1
        if (team.has_lane) {
            const int row = seg.lo + threadIdx.y;
            walk_strided<Unroll<T, 1>::value, T>(
                row, seg.hi, by, (long long)row * Cv + cv, (long long)by * Cv,
                [&](long long i) { return __ldg(x + i); }, [&](const auto& v, long long) { push(m, v); });
        }
        m = tree(m);
        const Sharing sh = sharing(units, M, seg.group);                                // level 4
        const unsigned int k = blockIdx.x + seg.group - sh.first;   // this block's place among the group's
        if (sh.count > 1 && !merge_blocks(m, partials, counters, groups, seg.group, sh, k, team, tree)) continue;
        if (threadIdx.y == 0 && team.has_lane) {
            finalize_moments(m, cv, eps, momentum, update_running, save_mean, save_rstd, running_mean, running_var);
        }
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_forward_stats_mc(const float* __restrict__ x, int M, int C,
                    float eps, float momentum, int update_running,
                    float* __restrict__ save_mean, float* __restrict__ save_rstd,
                    float* __restrict__ running_mean, float* __restrict__ running_var,
                    float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Moments<1> smem[BN_THREADS];
    forward_stats_mc<float>(x, M, C, eps, momentum, update_running, save_mean, save_rstd, running_mean, running_var,
                            partials, counters, smem);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM_WIDE)
bn_forward_stats_mc_vec4(const float4* __restrict__ x, int M, int C4,
                         float eps, float momentum, int update_running,
                         float* __restrict__ save_mean, float* __restrict__ save_rstd,
                         float* __restrict__ running_mean, float* __restrict__ running_var,
                         float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Moments<4> smem[BN_THREADS];
    forward_stats_mc<float4>(x, M, C4, eps, momentum, update_running, save_mean, save_rstd, running_mean,
                             running_var, partials, counters, smem);
}
