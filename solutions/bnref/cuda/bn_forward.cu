// bn_forward.cu: the fused training-forward statistics of batch norm, one launch.
//
// For every channel c it computes the batch mean and the biased variance of all
// the channel's values with Welford's update per thread and Chan's merge up
// the tree of bn_common.cuh (warp, block, then the G blocks of the channel),
// and the last block of the channel finalizes:
//     save_mean[c] = mean,  save_rstd[c] = 1 / sqrt(var + eps),
//     running_mean[c] <- (1 - momentum) * running_mean[c] + momentum * mean
//     running_var[c]  <- (1 - momentum) * running_var[c]  + momentum * var * n / (n - 1)
// (PyTorch's convention: momentum weighs the new statistic, and the running
// variance averages the unbiased batch variance). The output y = x * a + b is
// then one pass of bn_affine.cu with a = gamma * rstd, b = beta - mean * a.
//
// Two layouts:
//   bn_forward_stats_ncs  x is (N, C, S) with S = H * W (NCHW); grid (G, C),
//                         1-D blocks; thread t of block g visits the channel's
//                         elements j = g * blockDim.x + t + k * G * blockDim.x.
//   bn_forward_stats_mc   x is (M, C), channels last (NHWC with M = N*H*W, or a
//                         plain (N, D) batch); grid (ceil(C / bx), G), 2-D
//                         blocks (bx, by): threadIdx.x picks the channel, so a
//                         warp reads bx consecutive floats of one row, and
//                         thread row ty of block g visits rows
//                         m = g * by + ty + k * G * by.
#include "bn_common.cuh"

#define BN_UNROLL 4

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

extern "C" __global__ void __launch_bounds__(256)
bn_forward_stats_ncs(const float* __restrict__ x, int N, int C, int S,
                     float eps, float momentum, int update_running,
                     float* __restrict__ save_mean, float* __restrict__ save_rstd,
                     float* __restrict__ running_mean, float* __restrict__ running_var,
                     float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Moments smem[BN_WARP];
    const int c = blockIdx.y;
    const unsigned int G = gridDim.x;
    const long long L = (long long)N * S;               // values per channel
    const long long stride = (long long)G * blockDim.x;
    long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;

    // Level 1: Welford over this thread's elements, in increasing j.
    Moments m = identity(Moments());
    if (j < L) {
        ChannelWalk walk(j, stride, C, S, c);
        for (; j < L; j += BN_UNROLL * stride) {
            float v[BN_UNROLL];
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {   // issue the loads first ...
                v[u] = j + u * stride < L ? __ldg(x + walk.offset) : 0.0f;
                walk.advance();
            }
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {   // ... then fold them in, in order
                if (j + u * stride < L) welford_push(m, v[u]);
            }
        }
    }
    // Levels 2 and 3: warp shuffles, then the warps through shared memory.
    m = block_reduce_1d(m, smem);

    // Level 4: the last of the channel's G blocks merges their partials, in slot order.
    if (G > 1 && !merge_blocks_1d(m, smem, partials, counters + c, (long long)c * G, blockIdx.x, G)) return;
    if (threadIdx.x == 0) {
        finalize_moments(m, c, eps, momentum, update_running, save_mean, save_rstd, running_mean, running_var);
    }
}

// Channels last, x (M, C): threadIdx.x picks the channel, so a warp reads 32 neighbouring channels of one
// row; there is no warp level, the 8 thread rows of a block merge in shared memory instead.
extern "C" __global__ void __launch_bounds__(256)
bn_forward_stats_mc(const float* __restrict__ x, int M, int C,
                    float eps, float momentum, int update_running,
                    float* __restrict__ save_mean, float* __restrict__ save_rstd,
                    float* __restrict__ running_mean, float* __restrict__ running_var,
                    float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Moments smem[256];
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const bool has_channel = c < C;
    const unsigned int G = gridDim.y;
    const int by = blockDim.y;
    const long long stride = (long long)G * by;

    // Level 1: Welford over this thread's rows, in increasing m.
    Moments m = identity(Moments());
    if (has_channel) {
        long long row = (long long)blockIdx.y * by + threadIdx.y;
        for (; row < M; row += BN_UNROLL * stride) {
            float v[BN_UNROLL];
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                const long long r = row + u * stride;
                v[u] = r < M ? __ldg(x + r * C + c) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                if (row + u * stride < M) welford_push(m, v[u]);
            }
        }
    }
    // Level 3 (a warp holds 32 channels, so no shuffle level): rows of the block.
    m = block_reduce_rows(m, smem);

    // Level 4: the last of the G blocks of this column of channels merges.
    if (G > 1 && !merge_blocks_rows(m, smem, partials, counters + blockIdx.x, (long long)c * G, has_channel,
                                    blockIdx.y, G)) {
        return;
    }
    if (threadIdx.y == 0 && has_channel) {
        finalize_moments(m, c, eps, momentum, update_running, save_mean, save_rstd, running_mean, running_var);
    }
}
