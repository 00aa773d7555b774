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
// Layouts, units and launch shapes are those of bn_forward.cu and bn_affine.cu: L = 1 channel per thread
// (ncs, and the scalar mc kernels) or 4 (the float4 lanes of the mc _vec4 kernels).
#include "bn_common.cuh"

// Runs in one thread per lane of L channels (L * cv + l). coef holds 3 rows of C: k, kx, k0.
template <int L>
__device__ __forceinline__ void finalize_backward(const Sums<L>& s, int cv, int C, long long M,
                                                  const float* __restrict__ save_rstd,
                                                  const float* __restrict__ gamma,
                                                  float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                  float* __restrict__ coef) {
#pragma unroll
    for (int l = 0; l < L; ++l) {
        const int c = L * cv + l;
        const float rstd = save_rstd[c];
        const float dg = s.b[l] * rstd;
        const float k = gamma[c] * rstd;
        dbeta[c] = s.a[l];
        dgamma[c] = dg;
        coef[c] = k;
        coef[C + c] = -k * rstd * dg / (float)M;
        coef[2 * C + c] = -k * s.a[l] / (float)M;
    }
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

// Adds (g, g * (v - mean)) for the components of the elements in v, in order: component l to lane l % L
// (with L = 1, every component to the one channel; with L = 4, each to its own).
template <int L, class T, int N>
__device__ __forceinline__ void push(Sums<L>& acc, const Pair<T> (&v)[N], const float (&mean)[L]) {
#pragma unroll
    for (int u = 0; u < N; ++u) {
#pragma unroll
        for (int l = 0; l < Width<T>::value; ++l) {
            const float g = component(v[u].g, l);
            acc.a[l % L] += g;
            acc.b[l % L] += g * (component(v[u].v, l) - mean[l % L]);
        }
    }
}

// smem: the kernel's __shared__ Sums<1>[BN_WARP] (see forward_stats_ncs in bn_forward.cu).
template <class T>
__device__ __forceinline__ void backward_reduce_ncs(const T* __restrict__ dy, const T* __restrict__ x, int N, int C,
                                                    int S, const float* __restrict__ save_mean,
                                                    const float* __restrict__ save_rstd,
                                                    const float* __restrict__ gamma, float* __restrict__ dgamma,
                                                    float* __restrict__ dbeta, float* __restrict__ coef,
                                                    float* __restrict__ partials,
                                                    unsigned int* __restrict__ counters, Sums<1>* smem) {
    const long long L = (long long)N * S;
    const int Q = (int)((L + BN_CHUNK - 1) / BN_CHUNK);          // chunks per channel
    const long long units = (long long)Q * C;
    const long long values = L * Width<T>::value;                // M of the formulas
    const Team team = {1, 0, (int)threadIdx.x, (int)blockDim.x, true};
    const auto tree = [&](Sums<1> v) { return block_reduce_1d(v, smem); };
    BlockWork work(units, Q);
    Segment seg;
    while (work.next(seg)) {
        const int c = seg.group;
        const int hi = (long long)seg.hi * BN_CHUNK < L ? seg.hi * BN_CHUNK : (int)L;
        const float mean[1] = {save_mean[c]};
        Sums<1> acc = identity(Sums<1>());
        walk_channel<Unroll<T, 2>::value, Pair<T>>(
            C, S, c, seg.lo * BN_CHUNK + (int)threadIdx.x, hi, [&](long long i) { return load_pair(dy, x, i); },
            [&](const auto& v) { push(acc, v, mean); });
        acc = tree(acc);
        const Sharing sh = sharing(units, Q, c);
        if (sh.count > 1 && !merge_blocks(acc, partials, counters, C, c, sh, blockIdx.x + c - sh.first, team, tree)) {
            continue;
        }
        if (threadIdx.x == 0) finalize_backward(acc, c, C, values, save_rstd, gamma, dgamma, dbeta, coef);
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM_WIDE)
bn_backward_reduce_ncs(const float* __restrict__ dy, const float* __restrict__ x, int N, int C, int S,
                       const float* __restrict__ save_mean, const float* __restrict__ save_rstd,
                       const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,
                       float* __restrict__ coef, float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Sums<1> smem[BN_WARP];
    backward_reduce_ncs<float>(dy, x, N, C, S, save_mean, save_rstd, gamma, dgamma, dbeta, coef, partials, counters,
                               smem);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_reduce_ncs_vec4(const float4* __restrict__ dy, const float4* __restrict__ x, int N, int C, int S4,
                            const float* __restrict__ save_mean, const float* __restrict__ save_rstd,
                            const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,
                            float* __restrict__ coef, float* __restrict__ partials,
                            unsigned int* __restrict__ counters) {
    __shared__ Sums<1> smem[BN_WARP];
    backward_reduce_ncs<float4>(dy, x, N, C, S4, save_mean, save_rstd, gamma, dgamma, dbeta, coef, partials,
                                counters, smem);
}

// MC: dy, x are (M, Cv) of T, L = 1 or 4 channels per thread; the walk and the tree of forward_stats_mc.
template <class T>
__device__ __forceinline__ void backward_reduce_mc(const T* __restrict__ dy, const T* __restrict__ x, int M, int Cv,
                                                   const float* __restrict__ save_mean,
                                                   const float* __restrict__ save_rstd,
                                                   const float* __restrict__ gamma, float* __restrict__ dgamma,
                                                   float* __restrict__ dbeta, float* __restrict__ coef,
                                                   float* __restrict__ partials, unsigned int* __restrict__ counters,
                                                   Sums<Width<T>::value>* smem) {
    const int L = Width<T>::value, by = blockDim.y;
    const int groups = (Cv + blockDim.x - 1) / blockDim.x;
    const long long units = (long long)groups * M;
    const auto tree = [&](Sums<L> v) { return block_reduce_rows(v, smem); };
    BlockWork work(units, M);
    Segment seg;
    while (work.next(seg)) {
        const int cv = seg.group * blockDim.x + threadIdx.x;
        const Team team = {(int)blockDim.x, (int)threadIdx.x, (int)threadIdx.y, by, cv < Cv};
        Sums<L> acc = identity(Sums<L>());
        if (team.has_lane) {
            float mean[L];
#pragma unroll
            for (int l = 0; l < L; ++l) mean[l] = save_mean[L * cv + l];
            const int row = seg.lo + threadIdx.y;
            walk_strided<Unroll<T, 2>::value, Pair<T>>(
                row, seg.hi, by, (long long)row * Cv + cv, (long long)by * Cv,
                [&](long long i) { return load_pair(dy, x, i); },
                [&](const auto& v, long long) { push(acc, v, mean); });
        }
        acc = tree(acc);
        const Sharing sh = sharing(units, M, seg.group);
        const unsigned int k = blockIdx.x + seg.group - sh.first;   // this block's place among the group's
        if (sh.count > 1 && !merge_blocks(acc, partials, counters, groups, seg.group, sh, k, team, tree)) continue;
        if (threadIdx.y == 0 && team.has_lane) {
            finalize_backward(acc, cv, L * Cv, M, save_rstd, gamma, dgamma, dbeta, coef);
        }
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_reduce_mc(const float* __restrict__ dy, const float* __restrict__ x, int M, int C,
                      const float* __restrict__ save_mean, const float* __restrict__ save_rstd,
                      const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,
                      float* __restrict__ coef, float* __restrict__ partials, unsigned int* __restrict__ counters) {
    __shared__ Sums<1> smem[BN_THREADS];
    backward_reduce_mc<float>(dy, x, M, C, save_mean, save_rstd, gamma, dgamma, dbeta, coef, partials, counters, smem);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM_WIDE)
bn_backward_reduce_mc_vec4(const float4* __restrict__ dy, const float4* __restrict__ x, int M, int C4,
                           const float* __restrict__ save_mean, const float* __restrict__ save_rstd,
                           const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,
                           float* __restrict__ coef, float* __restrict__ partials,
                           unsigned int* __restrict__ counters) {
    __shared__ Sums<4> smem[BN_THREADS];
    backward_reduce_mc<float4>(dy, x, M, C4, save_mean, save_rstd, gamma, dgamma, dbeta, coef, partials, counters,
                               smem);
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

// NCS: dy, x, dx are (N*C, S) rows of T, walked flat in windows of rows (row_windows in bn_common.cuh): thread t
// first loads row r0 + t's coefficients (k, kx, k0, mean) into kc[t], then visits its units i = lo + t +
// k * blockDim.x of the window, reading its row's coefficients from there.
template <class T>
__device__ __forceinline__ void dx_rows(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                        long long R, int C, int S, const float* __restrict__ save_mean,
                                        const float* __restrict__ coef, float4* kc /* [BN_THREADS] */) {
    const int stride = blockDim.x;
    row_windows(
        R, S,
        [&](long long row, int t) {
            const int c = (int)(row % C);
            kc[t] = make_float4(coef[c], coef[C + c], coef[2 * C + c], save_mean[c]);
        },
        [&](long long i, long long hi, long long r0) {
            if (i >= hi) return;
            RowWalk at(i, r0, stride, S);
            walk_strided<Unroll<T, 2>::value, Pair<T>>(
                i, hi, stride, i, stride, [&](long long n) { return load_pair(dy, x, n); },
                [&](const auto& v, long long n) {   // dx[n], dx[n + stride], ..., the walk stepped along
                    for (const Pair<T>& p : v) {
                        const float4 q = kc[at.r];
                        dx[n] = dx_value(p.g, p.v, q.x, q.y, q.z, q.w);
                        n += stride;
                        at.advance();
                    }
                });
        });
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_dx_ncs(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dx,
                   long long R, int C, int S, const float* __restrict__ save_mean, const float* __restrict__ coef) {
    __shared__ float4 kc[BN_THREADS];
    dx_rows<float>(dy, x, dx, R, C, S, save_mean, coef, kc);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_backward_dx_ncs_vec4(const float4* __restrict__ dy, const float4* __restrict__ x, float4* __restrict__ dx,
                        long long R, int C, int S4, const float* __restrict__ save_mean,
                        const float* __restrict__ coef) {
    __shared__ float4 kc[BN_THREADS];
    dx_rows<float4>(dy, x, dx, R, C, S4, save_mean, coef, kc);
}

// MC: a thread owns channel cv (float) or channels 4cv..4cv+3 (float4) of a segment of a column and walks
// down its rows, the coefficients in registers.
__device__ __forceinline__ float lane_values(const float* __restrict__ v, int cv, float) { return v[cv]; }
__device__ __forceinline__ float4 lane_values(const float* __restrict__ v, int cv, float4) {
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
        const T k = lane_values(coef, cv, T()), kx = lane_values(coef + C, cv, T());
        const T k0 = lane_values(coef + 2 * C, cv, T()), mean = lane_values(save_mean, cv, T());
        const int m = seg.lo + threadIdx.y;
        walk_strided<Unroll<T, 2>::value, Pair<T>>(
            m, seg.hi, by, (long long)m * Cv + cv, (long long)by * Cv, [&](long long i) { return load_pair(dy, x, i); },
            [&](const auto& v, long long i) {
                for (const Pair<T>& p : v) {
                    dx[i] = dx_value(p.g, p.v, k, kx, k0, mean);
                    i += (long long)by * Cv;
                }
            });
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
