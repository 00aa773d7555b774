// bn_backward.cu: the training-mode backward pass of batch norm in two launches.
//
// With x_hat = (x - mean) * rstd and M values per channel, the gradients are
//     dbeta  = sum dy
//     dgamma = sum dy * x_hat = rstd * sum dy * (x - mean)
//     dx     = gamma * rstd / M * (M * dy - dbeta - x_hat * dgamma)
// 1. bn_backward_reduce_*: one read of dy and x gives both sums per channel,
//    reduced with the same tree and the same persistent grid as the forward statistics (thread, warp,
//    block, and the last of the blocks that share the channel), whose finalizer writes
//    dgamma, dbeta and three coefficients
//        k = gamma * rstd,  kx = -k * rstd * dgamma / M,  k0 = -k * dbeta / M
// 2. bn_backward_dx_*: dx = dy * k + (x - mean) * kx + k0, one elementwise pass.
// x - mean costs one subtraction and keeps the centring exact (no cancellation
// between x * kx and mean * kx when |mean| >> std).
// Layouts, units and launch shapes are those of bn_forward.cu and bn_affine.cu.
#include "bn_common.cuh"

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

// Adds (g, g * (v - mean)) for the 1 or 4 values of a float or float4, in order.
__device__ __forceinline__ void push(Sums2& acc, float g, float v, float mean) {
    acc.a += g;
    acc.b += g * (v - mean);
}
__device__ __forceinline__ void push(Sums2& acc, float4 g, float4 v, float mean) {
    push(acc, g.x, v.x, mean);
    push(acc, g.y, v.y, mean);
    push(acc, g.z, v.z, mean);
    push(acc, g.w, v.w, mean);
}

// The two elements, of dy and of x, a thread loads at one address.
template <class T>
struct Pair {
    T g, v;
};

template <class T>
__device__ __forceinline__ Pair<T> load_pair(const T* __restrict__ dy, const T* __restrict__ x, long long i) {
    Pair<T> p;
    p.g = __ldg(dy + i);
    p.v = __ldg(x + i);
    return p;
}

// smem: the kernel's __shared__ Sums2[BN_WARP] (see forward_stats_ncs in bn_forward.cu).
template <class T>
__device__ __forceinline__ void backward_reduce_ncs(const T* __restrict__ dy, const T* __restrict__ x, int N, int C,
                                                    int S, const float* __restrict__ save_mean,
                                                    const float* __restrict__ save_rstd,
                                                    const float* __restrict__ gamma, float* __restrict__ dgamma,
                                                    float* __restrict__ dbeta, float* __restrict__ coef,
                                                    float* __restrict__ partials,
                                                    unsigned int* __restrict__ counters, Sums2* smem) {
    const long long L = (long long)N * S;
    const int Q = (int)((L + BN_CHUNK - 1) / BN_CHUNK);          // chunks per channel
    const long long units = (long long)Q * C;
    const long long values = L * (long long)(sizeof(T) / sizeof(float));   // M of the formulas
    BlockWork work(units, Q);
    Segment seg;
    while (work.next(seg)) {
        const int c = seg.group;
        const int hi = (long long)seg.hi * BN_CHUNK < L ? seg.hi * BN_CHUNK : (int)L;
        const float mean = save_mean[c];
        Sums2 acc = identity(Sums2());
        walk_channel<Unroll<T, 2>::value, Pair<T>>(
            C, S, c, seg.lo * BN_CHUNK + (int)threadIdx.x, hi, [&](long long i) { return load_pair(dy, x, i); },
            [&](Pair<T> p) { push(acc, p.g, p.v, mean); });
        acc = block_reduce_1d(acc, smem);
        const Sharing sh = sharing(units, Q, c);
        if (sh.count > 1 && !merge_blocks_1d(acc, smem, partials, counters + c, sh, blockIdx.x + c)) continue;
        if (threadIdx.x == 0) finalize_backward(acc, c, C, values, save_rstd, gamma, dgamma, dbeta, coef);
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_reduce_ncs(const float* __restrict__ dy, const float* __restrict__ x, int N, int C, int S,
                       const float* __restrict__ save_mean, const float* __restrict__ save_rstd,
                       const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,
                       float* __restrict__ coef, float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Sums2 smem[BN_WARP];
    backward_reduce_ncs<float>(dy, x, N, C, S, save_mean, save_rstd, gamma, dgamma, dbeta, coef, partials, counters,
                               smem);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_reduce_ncs_vec4(const float4* __restrict__ dy, const float4* __restrict__ x, int N, int C, int S4,
                            const float* __restrict__ save_mean, const float* __restrict__ save_rstd,
                            const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,
                            float* __restrict__ coef, float* __restrict__ partials,
                            unsigned int* __restrict__ counters) {
    __shared__ Sums2 smem[BN_WARP];
    backward_reduce_ncs<float4>(dy, x, N, C, S4, save_mean, save_rstd, gamma, dgamma, dbeta, coef, partials,
                                counters, smem);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_reduce_mc(const float* __restrict__ dy, const float* __restrict__ x, int M, int C,
                      const float* __restrict__ save_mean, const float* __restrict__ save_rstd,
                      const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,
                      float* __restrict__ coef, float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Sums2 smem[BN_THREADS];
    const int by = blockDim.y;
    const long long units = (long long)((C + blockDim.x - 1) / blockDim.x) * M;
    BlockWork work(units, M);
    Segment seg;
    while (work.next(seg)) {
        const int c = seg.group * blockDim.x + threadIdx.x;
        const bool has_channel = c < C;
        Sums2 acc = identity(Sums2());
        if (has_channel) {
            const float mean = save_mean[c];
            const int row = seg.lo + threadIdx.y;
            walk_strided<Unroll<float, 2>::value, Pair<float>>(
                row, seg.hi, by, (long long)row * C + c, (long long)by * C,
                [&](long long i) { return load_pair(dy, x, i); },
                [&](long long, Pair<float> p) { push(acc, p.g, p.v, mean); });
        }
        acc = block_reduce_rows(acc, smem);
        const Sharing sh = sharing(units, M, seg.group);
        if (sh.count > 1 &&
            !merge_blocks_rows(acc, smem, partials, counters + seg.group, sh, blockIdx.x + seg.group, has_channel)) {
            continue;
        }
        if (threadIdx.y == 0 && has_channel) finalize_backward(acc, c, C, M, save_rstd, gamma, dgamma, dbeta, coef);
    }
}

// dx = dy * k + (x - mean) * kx + k0, with scalar or float4 coefficients.
__device__ __forceinline__ float dx_value(float g, float v, float k, float kx, float k0, float mean) {
    return fmaf(g, k, fmaf(v - mean, kx, k0));
}

__device__ __forceinline__ float4 dx_value(float4 g, float4 v, float4 k, float4 kx, float4 k0, float4 mean) {
    return make_float4(dx_value(g.x, v.x, k.x, kx.x, k0.x, mean.x), dx_value(g.y, v.y, k.y, kx.y, k0.y, mean.y),
                       dx_value(g.z, v.z, k.z, kx.z, k0.z, mean.z), dx_value(g.w, v.w, k.w, kx.w, k0.w, mean.w));
}

__device__ __forceinline__ float4 dx_value(float4 g, float4 v, float k, float kx, float k0, float mean) {
    return make_float4(dx_value(g.x, v.x, k, kx, k0, mean), dx_value(g.y, v.y, k, kx, k0, mean),
                       dx_value(g.z, v.z, k, kx, k0, mean), dx_value(g.w, v.w, k, kx, k0, mean));
}

// NCS: dy, x, dx are (N*C, S) rows of T, walked flat as in bn_affine.cu: block b owns chunks of BN_CHUNK
// units, thread t the units i = lo + t + k * blockDim.x of them; the channel follows the walk (RowChannel),
// and the coefficients are reloaded only when it changes.
template <class T>
__device__ __forceinline__ void dx_rows(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                        long long R, int C, int S, const float* __restrict__ save_mean,
                                        const float* __restrict__ coef) {
    const ChunkShare share = chunk_share(R * S);
    const long long i = share.i, hi = share.hi;
    if (i >= hi) return;
    const int stride = blockDim.x;
    RowChannel at(i, stride, S, C);
    int c = -1;
    float k = 0.0f, kx = 0.0f, k0 = 0.0f, mean = 0.0f;
    walk_strided<Unroll<T, 2>::value, Pair<T>>(
        i, hi, stride, i, stride, [&](long long n) { return load_pair(dy, x, n); },
        [&](long long n, Pair<T> p) {   // dx[n] for the unit n the walk is at, then step the walk
            if (at.c != c) {
                c = at.c;
                k = coef[c], kx = coef[C + c], k0 = coef[2 * C + c], mean = save_mean[c];
            }
            dx[n] = dx_value(p.g, p.v, k, kx, k0, mean);
            at.advance();
        });
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_dx_ncs(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dx,
                   long long R, int C, int S, const float* __restrict__ save_mean, const float* __restrict__ coef) {
    dx_rows<float>(dy, x, dx, R, C, S, save_mean, coef);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_dx_ncs_vec4(const float4* __restrict__ dy, const float4* __restrict__ x, float4* __restrict__ dx,
                        long long R, int C, int S4, const float* __restrict__ save_mean,
                        const float* __restrict__ coef) {
    dx_rows<float4>(dy, x, dx, R, C, S4, save_mean, coef);
}

// MC: a thread owns channel cv (float) or channels 4cv..4cv+3 (float4) of a segment of a column and walks
// down its rows, the coefficients in registers.
__device__ __forceinline__ float lanes(const float* __restrict__ v, int cv, float) { return v[cv]; }
__device__ __forceinline__ float4 lanes(const float* __restrict__ v, int cv, float4) {
    return make_float4(v[4 * cv], v[4 * cv + 1], v[4 * cv + 2], v[4 * cv + 3]);
}

template <class T>
__device__ __forceinline__ void dx_cols(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                        int M, int Cv, const float* __restrict__ save_mean,
                                        const float* __restrict__ coef) {
    const int C = Cv * (int)(sizeof(T) / sizeof(float)), by = blockDim.y;
    BlockWork work((long long)((Cv + blockDim.x - 1) / blockDim.x) * M, M);
    Segment seg;
    while (work.next(seg)) {
        const int cv = seg.group * blockDim.x + threadIdx.x;
        if (cv >= Cv) continue;
        const T k = lanes(coef, cv, T()), kx = lanes(coef + C, cv, T()), k0 = lanes(coef + 2 * C, cv, T());
        const T mean = lanes(save_mean, cv, T());
        const int m = seg.lo + threadIdx.y;
        walk_strided<Unroll<T, 2>::value, Pair<T>>(
            m, seg.hi, by, (long long)m * Cv + cv, (long long)by * Cv, [&](long long i) { return load_pair(dy, x, i); },
            [&](long long i, Pair<T> p) { dx[i] = dx_value(p.g, p.v, k, kx, k0, mean); });
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_dx_mc(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dx,
                  int M, int C, const float* __restrict__ save_mean, const float* __restrict__ coef) {
    dx_cols<float>(dy, x, dx, M, C, save_mean, coef);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_dx_mc_vec4(const float4* __restrict__ dy, const float4* __restrict__ x, float4* __restrict__ dx,
                       int M, int C4, const float* __restrict__ save_mean, const float* __restrict__ coef) {
    dx_cols<float4>(dy, x, dx, M, C4, save_mean, coef);
}
