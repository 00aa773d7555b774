// bn_affine.cu: the elementwise pass of batch norm, folded to one FMA per value.
//
//     y = x * a[c] + b[c],   a = gamma * rstd,   b = beta - mean * a
//
// In training, rstd is the saved 1 / sqrt(var + eps) of bn_forward.cu; in
// inference the kernel folds the running statistics itself
// (stat_is_var = 1: rstd = 1 / sqrt(running_var + eps)), so inference is one launch.
// Folding moves the subtraction of the mean into b. The rounding this adds is
// about |mean| * 6e-8, the spacing of float32 numbers near x: x itself carried
// that much error already.
//
// Both layouts run a persistent grid whose blocks get equal shares within one unit (bn_common.cuh), and no
// integer division per element:
//   bn_affine_ncs[_vec4]  x is (N*C, S) rows, S = H * W, walked flat: the units are chunks of BN_CHUNK
//                         values (float4s) of the whole tensor, and thread t of a block visits
//                         i = lo + t + k * blockDim.x of its share, in windows of blockDim.x rows whose (a, b)
//                         the block's threads fold first, one row each, into shared memory; RowWalk follows
//                         the row of i. So a and b are folded once per row and block, whatever S.
//   bn_affine_mc[_vec4]   x is (M, C), channels last, with 2-D blocks (bx, by): the units are the rows of
//                         a column of bx channels (or float4s of 4 channels); a thread owns one channel (4)
//                         of a segment and walks down its rows, so its a and b stay in registers.
// The _vec4 variants move float4s; the caller uses them when the row length
// (S, or C) is a multiple of 4 and the pointers are 16-byte aligned.
#include "bn_common.cuh"

__device__ __forceinline__ void fold_channel(int c, const float* __restrict__ mean, const float* __restrict__ stat,
                                             const float* __restrict__ gamma, const float* __restrict__ beta,
                                             float eps, int stat_is_var, float& a, float& b) {
    const float rstd = stat_is_var ? 1.0f / sqrtf(stat[c] + eps) : stat[c];
    a = gamma[c] * rstd;
    b = beta[c] - mean[c] * a;
}

__device__ __forceinline__ float axpb(float x, float a, float b) { return fmaf(x, a, b); }

__device__ __forceinline__ float4 axpb(float4 x, float a, float b) {
    return make_float4(fmaf(x.x, a, b), fmaf(x.y, a, b), fmaf(x.z, a, b), fmaf(x.w, a, b));
}

__device__ __forceinline__ float4 axpb(float4 x, float4 a, float4 b) {
    return make_float4(fmaf(x.x, a.x, b.x), fmaf(x.y, a.y, b.y), fmaf(x.z, a.z, b.z), fmaf(x.w, a.w, b.w));
}

// NCS: T is float or float4; S is the row length in units of T. The block walks its share in windows of rows
// (row_windows in bn_common.cuh): thread t first folds row r0 + t's channel into ab[t] = (a, b), then
// visits its units of the window, reading its row's (a, b) from there.
template <class T>
__device__ __forceinline__ void affine_rows(const T* __restrict__ x, T* __restrict__ y, long long R, int C, int S,
                                            const float* __restrict__ mean, const float* __restrict__ stat,
                                            const float* __restrict__ gamma, const float* __restrict__ beta,
                                            float eps, int stat_is_var, float2* ab /* [BN_THREADS] */) {
    const int stride = blockDim.x;
    row_windows(
        R, S,
        [&](long long row, int t) {
            float a, b;
            fold_channel((int)(row % C), mean, stat, gamma, beta, eps, stat_is_var, a, b);
            ab[t] = make_float2(a, b);
        },
        [&](long long i, long long hi, long long r0) {
            if (i >= hi) return;
            RowWalk at(i, r0, stride, S);
            walk_strided<Unroll<T, 1>::value, T>(
                i, hi, stride, i, stride, [&](long long n) { return x[n]; },
                [&](const auto& v, long long n) {   // y[n], y[n + stride], ..., the walk stepped along
                    for (const T& e : v) {
                        const float2 c = ab[at.r];
                        y[n] = axpb(e, c.x, c.y);
                        n += stride;
                        at.advance();
                    }
                });
        });
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM_WIDE)
bn_affine_ncs(const float* __restrict__ x, float* __restrict__ y, long long R, int C, int S,
              const float* __restrict__ mean, const float* __restrict__ stat,
              const float* __restrict__ gamma, const float* __restrict__ beta, float eps, int stat_is_var) {
    __shared__ float2 ab[BN_THREADS];
    affine_rows<float>(x, y, R, C, S, mean, stat, gamma, beta, eps, stat_is_var, ab);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_affine_ncs_vec4(const float4* __restrict__ x, float4* __restrict__ y, long long R, int C, int S4,
                   const float* __restrict__ mean, const float* __restrict__ stat,
                   const float* __restrict__ gamma, const float* __restrict__ beta, float eps, int stat_is_var) {
    __shared__ float2 ab[BN_THREADS];
    affine_rows<float4>(x, y, R, C, S4, mean, stat, gamma, beta, eps, stat_is_var, ab);
}

// MC: a thread owns channel cv (float) or channels 4cv..4cv+3 (float4); Cv is the row width in units of T.
__device__ __forceinline__ void fold_lanes(int cv, const float* __restrict__ mean, const float* __restrict__ stat,
                                           const float* __restrict__ gamma, const float* __restrict__ beta,
                                           float eps, int stat_is_var, float& a, float& b) {
    fold_channel(cv, mean, stat, gamma, beta, eps, stat_is_var, a, b);
}

__device__ __forceinline__ void fold_lanes(int cv, const float* __restrict__ mean, const float* __restrict__ stat,
                                           const float* __restrict__ gamma, const float* __restrict__ beta,
                                           float eps, int stat_is_var, float4& a, float4& b) {
    fold_channel(4 * cv + 0, mean, stat, gamma, beta, eps, stat_is_var, a.x, b.x);
    fold_channel(4 * cv + 1, mean, stat, gamma, beta, eps, stat_is_var, a.y, b.y);
    fold_channel(4 * cv + 2, mean, stat, gamma, beta, eps, stat_is_var, a.z, b.z);
    fold_channel(4 * cv + 3, mean, stat, gamma, beta, eps, stat_is_var, a.w, b.w);
}

template <class T>
__device__ __forceinline__ void affine_cols(const T* __restrict__ x, T* __restrict__ y, int M, int Cv,
                                            const float* __restrict__ mean, const float* __restrict__ stat,
                                            const float* __restrict__ gamma, const float* __restrict__ beta,
                                            float eps, int stat_is_var) {
    const int by = blockDim.y;
    BlockWork work((long long)((Cv + blockDim.x - 1) / blockDim.x) * M, M);
    Segment seg;
    while (work.next(seg)) {
        const int cv = seg.group * blockDim.x + threadIdx.x;
        if (cv >= Cv) continue;
        T a, b;
        fold_lanes(cv, mean, stat, gamma, beta, eps, stat_is_var, a, b);
        const int m = seg.lo + threadIdx.y;
        walk_strided<Unroll<T, 1>::value, T>(m, seg.hi, by, (long long)m * Cv + cv, (long long)by * Cv,
                                             [&](long long i) { return x[i]; },
                                             [&](const auto& v, long long i) {
                                                 for (const T& e : v) {
                                                     y[i] = axpb(e, a, b);
                                                     i += (long long)by * Cv;
                                                 }
                                             });
    }
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM_WIDE)
bn_affine_mc(const float* __restrict__ x, float* __restrict__ y, int M, int C,
             const float* __restrict__ mean, const float* __restrict__ stat,
             const float* __restrict__ gamma, const float* __restrict__ beta, float eps, int stat_is_var) {
    affine_cols<float>(x, y, M, C, mean, stat, gamma, beta, eps, stat_is_var);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)
bn_affine_mc_vec4(const float4* __restrict__ x, float4* __restrict__ y, int M, int C4,
                  const float* __restrict__ mean, const float* __restrict__ stat,
                  const float* __restrict__ gamma, const float* __restrict__ beta, float eps, int stat_is_var) {
    affine_cols<float4>(x, y, M, C4, mean, stat, gamma, beta, eps, stat_is_var);
}
