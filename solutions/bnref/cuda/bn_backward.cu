// bn_backward.cu: the training-mode backward pass of batch norm in two launches.
//
// With x_hat = (x - mean) * rstd and M values per channel, the gradients are
//     dbeta  = sum dy
//     dgamma = sum dy * x_hat = rstd * sum dy * (x - mean)
//     dx     = gamma * rstd / M * (M * dy - dbeta - x_hat * dgamma)
// 1. bn_backward_reduce_*: one read of dy and x gives both sums per channel,
//    reduced with the same tree as the forward statistics (thread, warp,
//    block, and the last of the channel's G blocks), whose finalizer writes
//    dgamma, dbeta and three coefficients
//        k = gamma * rstd,  kx = -k * rstd * dgamma / M,  k0 = -k * dbeta / M
// 2. bn_backward_dx_*: dx = dy * k + (x - mean) * kx + k0, one elementwise pass.
// x - mean costs one subtraction and keeps the centring exact (no cancellation
// between x * kx and mean * kx when |mean| >> std).
// Layouts and launch shapes are those of bn_forward.cu and bn_affine.cu.
#include "bn_common.cuh"

#define BN_UNROLL 4

// Runs in one thread per channel. coef holds 3 rows of C: k, kx, k0.
__device__ __forceinline__ void finalize_backward(Sums2 s, int c, int C, long long M,
                                                  const float* __restrict__ save_rstd,
                                                  const float* __restrict__ gamma,
                                                  float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                  float* __restrict__ coef) {
    const float rstd = save_rstd[c];
    const float dg = s.b * rstd;
    const float k = gamma[c] * rstd;
    dbeta[c] = s.a;
    dgamma[c] = dg;
    coef[c] = k;
    coef[C + c] = -k * rstd * dg / (float)M;
    coef[2 * C + c] = -k * s.a / (float)M;
}

extern "C" __global__ void __launch_bounds__(256)
bn_backward_reduce_ncs(const float* __restrict__ dy, const float* __restrict__ x, int N, int C, int S,
                       const float* __restrict__ save_mean, const float* __restrict__ save_rstd,
                       const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,
                       float* __restrict__ coef, float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Sums2 smem[BN_WARP];
    const int c = blockIdx.y;
    const unsigned int G = gridDim.x;
    const long long L = (long long)N * S;
    const long long stride = (long long)G * blockDim.x;
    const float mean = save_mean[c];
    long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;

    Sums2 acc = identity(Sums2());
    if (j < L) {
        ChannelWalk walk(j, stride, C, S, c);
        for (; j < L; j += BN_UNROLL * stride) {
            float g[BN_UNROLL], v[BN_UNROLL];
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                const bool in = j + u * stride < L;
                g[u] = in ? __ldg(dy + walk.offset) : 0.0f;
                v[u] = in ? __ldg(x + walk.offset) : mean;
                walk.advance();
            }
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                acc.a += g[u];
                acc.b += g[u] * (v[u] - mean);
            }
        }
    }
    acc = block_reduce_1d(acc, smem);
    if (G > 1 && !merge_blocks_1d(acc, smem, partials, counters + c, (long long)c * G, blockIdx.x, G)) return;
    if (threadIdx.x == 0) finalize_backward(acc, c, C, L, save_rstd, gamma, dgamma, dbeta, coef);
}

extern "C" __global__ void __launch_bounds__(256)
bn_backward_reduce_mc(const float* __restrict__ dy, const float* __restrict__ x, int M, int C,
                      const float* __restrict__ save_mean, const float* __restrict__ save_rstd,
                      const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,
                      float* __restrict__ coef, float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Sums2 smem[256];
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const bool has_channel = c < C;
    const unsigned int G = gridDim.y;
    const int by = blockDim.y;
    const long long stride = (long long)G * by;

    Sums2 acc = identity(Sums2());
    if (has_channel) {
        const float mean = save_mean[c];
        for (long long row = (long long)blockIdx.y * by + threadIdx.y; row < M; row += BN_UNROLL * stride) {
            float g[BN_UNROLL], v[BN_UNROLL];
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                const long long r = row + u * stride;
                g[u] = r < M ? __ldg(dy + r * C + c) : 0.0f;
                v[u] = r < M ? __ldg(x + r * C + c) : mean;
            }
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                acc.a += g[u];
                acc.b += g[u] * (v[u] - mean);
            }
        }
    }
    acc = block_reduce_rows(acc, smem);
    if (G > 1 && !merge_blocks_rows(acc, smem, partials, counters + blockIdx.x, (long long)c * G, has_channel,
                                    blockIdx.y, G)) {
        return;
    }
    if (threadIdx.y == 0 && has_channel) finalize_backward(acc, c, C, M, save_rstd, gamma, dgamma, dbeta, coef);
}

// dx = dy * k + (x - mean) * kx + k0, with scalar or float4 coefficients.
__device__ __forceinline__ float dx_value(float g, float v, float k, float kx, float k0, float mean) {
    return fmaf(g, k, fmaf(v - mean, kx, k0));
}

__device__ __forceinline__ float4 dx_value(float4 g, float4 v, float4 k, float4 kx, float4 k0, float4 mean) {
    return make_float4(dx_value(g.x, v.x, k.x, kx.x, k0.x, mean.x), dx_value(g.y, v.y, k.y, kx.y, k0.y, mean.y),
                       dx_value(g.z, v.z, k.z, kx.z, k0.z, mean.z), dx_value(g.w, v.w, k.w, kx.w, k0.w, mean.w));
}

// A per-channel coefficient, as a scalar or repeated in the 4 lanes of a float4.
template <class T> __device__ __forceinline__ T splat(float v);
template <> __device__ __forceinline__ float splat<float>(float v) { return v; }
template <> __device__ __forceinline__ float4 splat<float4>(float v) { return make_float4(v, v, v, v); }

template <class T>
__device__ __forceinline__ void dx_rows(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                        long long R, int C, int Sv, const float* __restrict__ save_mean,
                                        const float* __restrict__ coef) {
    for (long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y; row < R;
         row += (long long)gridDim.x * blockDim.y) {
        const int c = (int)(row % C);   // once per row, not per element
        const T k = splat<T>(coef[c]), kx = splat<T>(coef[C + c]), k0 = splat<T>(coef[2 * C + c]);
        const T mean = splat<T>(save_mean[c]);
        for (int s = blockIdx.y * blockDim.x + threadIdx.x; s < Sv; s += gridDim.y * blockDim.x) {
            const long long i = row * Sv + s;
            dx[i] = dx_value(dy[i], x[i], k, kx, k0, mean);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
bn_backward_dx_ncs(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dx,
                   long long R, int C, int S, const float* __restrict__ save_mean, const float* __restrict__ coef) {
    dx_rows<float>(dy, x, dx, R, C, S, save_mean, coef);
}

extern "C" __global__ void __launch_bounds__(256)
bn_backward_dx_ncs_vec4(const float4* __restrict__ dy, const float4* __restrict__ x, float4* __restrict__ dx,
                        long long R, int C, int S4, const float* __restrict__ save_mean,
                        const float* __restrict__ coef) {
    dx_rows<float4>(dy, x, dx, R, C, S4, save_mean, coef);
}

// MC: a thread owns channel cv (float) or channels 4cv..4cv+3 (float4) and walks down the rows.
__device__ __forceinline__ float lanes(const float* __restrict__ v, int cv, float) { return v[cv]; }
__device__ __forceinline__ float4 lanes(const float* __restrict__ v, int cv, float4) {
    return make_float4(v[4 * cv], v[4 * cv + 1], v[4 * cv + 2], v[4 * cv + 3]);
}

template <class T>
__device__ __forceinline__ void dx_cols(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                        long long M, int Cv, const float* __restrict__ save_mean,
                                        const float* __restrict__ coef) {
    const int cv = blockIdx.x * blockDim.x + threadIdx.x;
    if (cv >= Cv) return;
    const int C = Cv * (int)(sizeof(T) / sizeof(float));
    const T k = lanes(coef, cv, T()), kx = lanes(coef + C, cv, T()), k0 = lanes(coef + 2 * C, cv, T());
    const T mean = lanes(save_mean, cv, T());
    for (long long m = (long long)blockIdx.y * blockDim.y + threadIdx.y; m < M; m += (long long)gridDim.y * blockDim.y) {
        const long long i = m * Cv + cv;
        dx[i] = dx_value(dy[i], x[i], k, kx, k0, mean);
    }
}

extern "C" __global__ void __launch_bounds__(256)
bn_backward_dx_mc(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dx,
                  long long M, int C, const float* __restrict__ save_mean, const float* __restrict__ coef) {
    dx_cols<float>(dy, x, dx, M, C, save_mean, coef);
}

extern "C" __global__ void __launch_bounds__(256)
bn_backward_dx_mc_vec4(const float4* __restrict__ dy, const float4* __restrict__ x, float4* __restrict__ dx,
                       long long M, int C4, const float* __restrict__ save_mean, const float* __restrict__ coef) {
    dx_cols<float4>(dy, x, dx, M, C4, save_mean, coef);
}
