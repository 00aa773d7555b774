// bn_reduce.cu: the straightforward per-channel reduction, one block per channel.
//
// bn_channel_moments_ncs computes the mean and the biased variance of each
// channel of an (N, C, S) tensor in two passes over the channel's N * S values
// (sum, then sum of squared deviations from the mean), with a 1-D block of
// threads walking the channel (ChannelWalk: no division per element) and the
// warp/block tree of bn_common.cuh. It is correct and simple, and it shows
// the two costs that bn_forward.cu removes: x is read twice for the
// statistics, and only C blocks exist, so with C = 64 channels on a GPU with
// 132 SMs half of the machine has nothing to do.
#include "bn_common.cuh"

__device__ __forceinline__ float channel_sum(const float* __restrict__ x, int N, int C, int S, int c,
                                             float shift, bool squared, float* smem) {
    const long long L = (long long)N * S;
    float acc = 0.0f;
    long long j = threadIdx.x;
    if (j < L) {
        ChannelWalk walk(j, blockDim.x, C, S, c);
        for (; j < L; j += blockDim.x) {
            const float d = __ldg(x + walk.offset) - shift;
            acc += squared ? d * d : d;
            walk.advance();
        }
    }
    return block_reduce_1d(acc, smem);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_channel_moments_ncs(const float* __restrict__ x, int N, int C, int S,
                       float* __restrict__ mean, float* __restrict__ var) {
    __shared__ float smem[BN_WARP];
    __shared__ float mu;
    const int c = blockIdx.x;
    const float count = (float)((long long)N * S);
    const float total = channel_sum(x, N, C, S, c, 0.0f, false, smem);      // pass 1: sum x
    if (threadIdx.x == 0) mu = total / count;
    __syncthreads();
    const float sq = channel_sum(x, N, C, S, c, mu, true, smem);            // pass 2: sum (x - mean)^2
    if (threadIdx.x == 0) {
        mean[c] = mu;
        var[c] = sq / count;
    }
}
