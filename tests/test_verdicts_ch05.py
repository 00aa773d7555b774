"""Chapter 5's verdicts, differentially: the solution, every named mistake, and correct code written otherwise.

Everything runs in-process on the CPU emulator: ``import cupy`` (the probes') and the notebooks' ``cp`` are
:func:`emulated_gpu.cupy_module`. Stand-ins for the mistakes are NumPy functions (the emulator's device arrays
are NumPy arrays); the correct alternatives are notebook cells of real CuPy code (``RawKernel``,
``RawModule``, ``ElementwiseKernel``, ``ReductionKernel``), run by the emulator as a GPU would run them.
"""
import re

import numpy as np
import pytest

from bncapture import ch05 as probes, codec, probe
from bngrade.judge.check import check, judge
from bngrade.judge.scan import defined_sources, scan
from bngrade.verdicts import ch05
from emulated_gpu import emulated_cupy, needs_cxx, notebook
from submissions import solution_cells

SOLVED = solution_cells("ch05_cupy_kernels")
KEYS = ["chan_merge", "reduction_moments", "channel_stats", "channel_stats_large_offset", "batchnorm_forward_cupy",
        "fused_forward_stats"]


@pytest.fixture
def cp():
    """The emulated cupy, as the probes' ``import cupy`` and as the notebooks' ``cp``."""
    with emulated_cupy() as module:
        yield module


def passes(key, namespace):
    check(f"ch05.{key}", namespace)


def fails(key, namespace, says):
    with pytest.raises(AssertionError, match=says):
        check(f"ch05.{key}", namespace)


def judged(key, namespace, cells):
    """Probe ``namespace`` and judge as grading does, with the answer cells' sources ({grade_id: source})."""
    found, error = probe.run(f"ch05.{key}", namespace)
    text, blob = codec.dumps(found.tree(error), found.arrays)
    tree, _ = codec.loads(text.decode(), b"")
    judge(f"ch05.{key}", tree, codec.LazyArrays.from_npz(blob), sources=defined_sources(cells))


# --- (a) the solution ---------------------------------------------------------------------------

@needs_cxx
@pytest.mark.parametrize("key", KEYS)
def test_the_solution_passes(cp, key):
    passes(key, notebook(SOLVED, cp))


# --- (b) every named mistake, as a NumPy stand-in -------------------------------------------------

@pytest.mark.parametrize("mistake", ch05.MERGE_MISTAKES, ids=lambda m: m.message[:40])
def test_each_merge_mistake_is_named(cp, mistake):
    def chan_merge(a, b):
        return tuple(np.asarray(v, dtype=a[1].dtype) if i else v for i, v in enumerate(mistake.fn(a, b)))

    fails("chan_merge", {"chan_merge": chan_merge}, re.escape(mistake.message))


def _stats_stand_in(mistake):
    """``mistake`` as a student's (mean, var) in float32; the reference where the mistake does not apply."""
    def stats(x):
        try:
            mean, var = mistake.fn(x)
        except ValueError:
            mean, var = ch05.reference_channel_stats(x)
        return np.asarray(mean, np.float32), np.asarray(var, np.float32)
    return stats


@pytest.mark.parametrize("mistake", ch05.STATS_MISTAKES, ids=lambda m: m.message[:40])
def test_each_statistics_mistake_is_named(cp, mistake):
    fails("channel_stats", {"channel_stats": _stats_stand_in(mistake)}, re.escape(mistake.message))


@pytest.mark.parametrize("mistake", ch05.STATS_MISTAKES[:2], ids=lambda m: m.message[:40])
def test_each_moments_mistake_is_named(cp, mistake):
    fails("reduction_moments", {"reduction_moments": _stats_stand_in(mistake)}, re.escape(mistake.message))


@pytest.mark.parametrize("mistake", ch05.FORWARD_MISTAKES, ids=lambda m: m.message[:40])
def test_each_forward_mistake_is_named(cp, mistake):
    def batchnorm_forward_cupy(x, gamma, beta, eps=1e-5):
        return mistake.fn(x, gamma, beta, eps).astype(np.float32)

    fails("batchnorm_forward_cupy", {"batchnorm_forward_cupy": batchnorm_forward_cupy}, re.escape(mistake.message))


@pytest.mark.parametrize("mistake", ch05.FUSED_MISTAKES, ids=lambda m: m.message[:40])
def test_each_fused_mistake_is_named(cp, mistake):
    def fused_forward_stats(x, running_mean, running_var, momentum=0.1, eps=1e-5):
        (mean, rstd), new_mean, new_var = mistake.fn(x, running_mean, running_var, momentum, eps)
        running_mean[...], running_var[...] = new_mean, new_var
        return mean.astype(np.float32), rstd.astype(np.float32)

    fails("fused_forward_stats", {"fused_forward_stats": fused_forward_stats}, re.escape(mistake.message))


def one_pass(x):
    """E[x^2] - E[x]^2 in float32: right near 0, wrong at |mean| / std = 1e3."""
    axes = (0,) + tuple(range(2, x.ndim))
    x = np.asarray(x, np.float32)
    mean = x.mean(axis=axes)
    return mean, (x * x).mean(axis=axes) - mean * mean


def test_a_one_pass_variance_passes_near_zero_and_is_named_at_a_large_offset(cp):
    passes("channel_stats", {"channel_stats": one_pass})
    for key, name in (("channel_stats_large_offset", "channel_stats"), ("reduction_moments", "reduction_moments")):
        fails(key, {name: one_pass}, r"cancellation of the one-pass E\[x\^2\] - E\[x\]\^2")


def test_a_one_pass_fused_kernel_is_named_at_a_large_offset(cp):
    def fused_forward_stats(x, running_mean, running_var, momentum=0.1, eps=1e-5):
        mean, var = one_pass(x)
        n = x.size // x.shape[1]
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * var * n / (n - 1)
        return mean, (1 / np.sqrt(var + np.float32(eps))).astype(np.float32)

    fails("fused_forward_stats", {"fused_forward_stats": fused_forward_stats}, "cancellation of the one-pass")


def test_a_merge_that_divides_by_zero_is_named(cp):
    def chan_merge(a, b):
        (na, ma, qa), (nb, mb, qb) = a, b
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            w = (nb / n).astype(ma.dtype)
        d = mb - ma
        return n, ma + d * w, qa + qb + d * d * na * w

    fails("chan_merge", {"chan_merge": chan_merge}, "nan when both counts are 0")


def test_a_merge_that_returns_float64_for_float32_means_is_named(cp):
    def chan_merge(a, b):
        n, mean, m2 = ch05.reference_chan_merge(a, b)
        return n, mean.astype(np.float64), m2.astype(np.float64)

    fails("chan_merge", {"chan_merge": chan_merge}, "returns means of dtype float64 for float32 input; keep the dtype")


def test_a_merge_that_works_on_numpy_arrays_only_fails_on_cupy_arrays(cp):
    def chan_merge(a, b):
        if not all(type(v) is np.ndarray for v in (*a, *b)):
            raise TypeError("only NumPy arrays")
        return ch05.reference_chan_merge(a, b)

    fails("chan_merge", {"chan_merge": chan_merge}, r"raised TypeError: only NumPy arrays \(input: .*CuPy arrays\)")


def test_a_forward_that_returns_float64_is_named(cp):
    def batchnorm_forward_cupy(x, gamma, beta, eps=1e-5):
        return ch05.reference_forward(x, gamma, beta, eps)

    fails("batchnorm_forward_cupy", {"batchnorm_forward_cupy": batchnorm_forward_cupy},
          "returns float64 for float32 input; the kernels work in float32")


# --- (c) correct alternatives, written otherwise ----------------------------------------------------

MERGE_WEIGHTED = '''
def chan_merge(a, b):
    """The merged mean as the count-weighted average, everything in float64 and cast back."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    xp = cp.get_array_module(mean_a)
    n = n_a + n_b
    total = xp.where(n > 0, n, 1).astype(xp.float64)
    delta = mean_b.astype(xp.float64) - mean_a
    mean = (n_a * mean_a.astype(xp.float64) + n_b * mean_b) / total
    m2 = m2_a + m2_b + delta ** 2 * (n_a * n_b) / total
    return n, mean.astype(mean_a.dtype), m2.astype(mean_a.dtype)
'''

MERGE_STEP = '''
def chan_merge(a, b):
    """M2's between-groups term as n_a * delta * (the mean's step); float counts; a list."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    xp = cp.get_array_module(mean_a, mean_b)
    dtype = mean_a.dtype
    n = (n_a + n_b).astype(dtype)
    step = ((mean_b - mean_a) * xp.where(n > 0, n_b / xp.where(n > 0, n, 1), 0)).astype(dtype)
    return [n, mean_a + step, m2_a + m2_b + n_a.astype(dtype) * (mean_b - mean_a) * step]
'''

MOMENTS_KEEPDIMS = '''
def reduction_moments(x):
    """The division in the post-map, the reduce written b + a, the mean kept as (1, C, 1, 1)."""
    per_value = "out = a / (_in_ind.size() / _out_ind.size())"
    mean_of = cp.ReductionKernel("T v", "T out", "v", "b + a", per_value, "0", "mean_of")
    var_of = cp.ReductionKernel("T v, T m", "T out", "(m - v) * (m - v)", "b + a", per_value, "0", "var_of")
    axes = tuple(d for d in range(x.ndim) if d != 1)
    mean = mean_of(x, axis=axes, keepdims=True)
    return mean.reshape(-1), var_of(x, mean, axis=axes, keepdims=True).reshape(-1)
'''

MOMENTS_ROWS = '''
def reduction_moments(x):
    """Channels moved to rows (C, N*H*W) and summed in float64 along axis 1."""
    rows = cp.ascontiguousarray(cp.moveaxis(x, 1, 0)).reshape(x.shape[1], -1)
    total = cp.ReductionKernel("float32 v", "float64 s", "(double)v", "a + b", "s = a", "0", "sum64")
    squares = cp.ReductionKernel("float32 v, float64 m", "float64 s", "((double)v - m) * ((double)v - m)",
                                 "a + b", "s = a", "0", "centred64")
    mean = total(rows, axis=1) / rows.shape[1]
    var = squares(rows, mean[:, None], axis=1) / rows.shape[1]
    return mean.astype(cp.float32), var.astype(cp.float32)
'''

STATS_TWO_PASS = r'''
TWO_PASS = r"""
extern "C" __global__ void two_pass(const float* x, int N, int C, int S, float* mean_out, float* var_out) {
    __shared__ double acc[128];
    const int c = blockIdx.x, t = threadIdx.x;
    double s = 0.0;
    for (int i = 0; i < N; ++i)
        for (int j = t; j < S; j += blockDim.x) s += x[((long long)i * C + c) * S + j];
    acc[t] = s;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) acc[t] += acc[t + half];
        __syncthreads();
    }
    const double mean = acc[0] / ((double)N * S);
    __syncthreads();
    double q = 0.0;
    for (int i = 0; i < N; ++i)
        for (int j = t; j < S; j += blockDim.x) {
            const double d = x[((long long)i * C + c) * S + j] - mean;
            q += d * d;
        }
    acc[t] = q;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) acc[t] += acc[t + half];
        __syncthreads();
    }
    if (t == 0) {
        mean_out[c] = (float)mean;
        var_out[c] = (float)(acc[0] / ((double)N * S));
    }
}
"""


def channel_stats(x):
    """Two passes in double (the sum, then the centred squares), 128 threads, a RawKernel."""
    kernel = cp.RawKernel(TWO_PASS, "two_pass")
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    N, C = x.shape[:2]
    mean, var = cp.empty(C, dtype=cp.float32), cp.empty(C, dtype=cp.float32)
    kernel((C,), (128,), (x, np.int32(N), np.int32(C), np.int32(x.size // (N * C)), mean, var))
    return mean, var
'''

STATS_MODULE = r'''
WELFORD = r"""
extern "C" __global__ void welford64(const float* x, int N, int C, int S, float* mean_out, float* var_out) {
    __shared__ float cnt[64];
    __shared__ float avg[64];
    __shared__ float dev[64];
    const int c = blockIdx.x, t = threadIdx.x;
    float n = 0.0f, m = 0.0f, q = 0.0f;
    for (long long k = t; k < (long long)N * S; k += blockDim.x) {
        const float v = x[(k / S * C + c) * S + k % S];
        n += 1.0f;
        const float d = v - m;
        m += d / n;
        q += d * (v - m);
    }
    cnt[t] = n;
    avg[t] = m;
    dev[t] = q;
    __syncthreads();
    if (t == 0) {  // thread 0 merges the partials, the last one first
        float tn = 0.0f, tm = 0.0f, tq = 0.0f;
        for (int k = blockDim.x - 1; k >= 0; --k) {
            if (cnt[k] == 0.0f) continue;
            const float total = tn + cnt[k], d = avg[k] - tm;
            tm += d * cnt[k] / total;
            tq += dev[k] + d * d * tn * cnt[k] / total;
            tn = total;
        }
        mean_out[c] = tm;
        var_out[c] = tq / tn;
    }
}
"""


def channel_stats(x):
    """Welford over a flat index with 64 threads, merged serially in reverse by thread 0; a RawModule."""
    kernel = cp.RawModule(code=WELFORD).get_function("welford64")
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    N, C = x.shape[:2]
    mean, var = cp.empty(C, dtype=cp.float32), cp.empty(C, dtype=cp.float32)
    kernel((C,), (64,), (x, np.int32(N), np.int32(C), np.int32(x.size // (N * C)), mean, var))
    return mean, var
'''

FORWARD_UNFOLDED = '''
def batchnorm_forward_cupy(x, gamma, beta, eps=1e-5):
    """Not folded: y = (x - mean[c]) * rstd[c] * gamma[c] + beta[c], the channel from a 3-D index."""
    normalize = cp.ElementwiseKernel(
        "float32 v, raw float32 mean, raw float32 rstd, raw float32 g, raw float32 b, int32 plane, int32 channels",
        "float32 y", "const int c = i / plane - i / (plane * channels) * channels; "
        "y = (v - mean[c]) * rstd[c] * g[c] + b[c];", "bn_unfolded")
    mean, var = channel_stats(x)
    rstd = (1.0 / cp.sqrt(var + eps)).astype(cp.float32)
    plane = x.shape[2] * x.shape[3]
    return normalize(x, mean, rstd, gamma, beta, np.int32(plane), np.int32(x.shape[1]))
'''

FORWARD_BROADCAST = '''
def batchnorm_forward_cupy(x, gamma, beta, eps=1e-5):
    """The fold in float64, a and b broadcast as (1, C, 1, 1), the output preallocated."""
    affine = cp.ElementwiseKernel("float32 v, float32 a, float32 b", "float32 y", "y = v * a + b", "bn_affine")
    mean, var = channel_stats(x)
    a = gamma.astype(cp.float64) / cp.sqrt(var.astype(cp.float64) + eps)
    b = beta - mean.astype(cp.float64) * a
    shape = (1, -1, 1, 1)
    y = cp.empty_like(x)
    affine(x, a.astype(cp.float32).reshape(shape), b.astype(cp.float32).reshape(shape), y)
    return y
'''

FUSED_XOR = r'''
FUSED = r"""
struct Moments { float n, mean, m2; };

__device__ Moments combine(Moments a, Moments b) {
    if (b.n == 0.0f) return a;
    if (a.n == 0.0f) return b;
    Moments r;
    r.n = a.n + b.n;
    const float d = b.mean - a.mean;
    r.mean = (a.n * a.mean + b.n * b.mean) / r.n;
    r.m2 = a.m2 + b.m2 + d * d * (a.n * b.n / r.n);
    return r;
}

extern "C" __global__ void fused128(const float* x, int N, int C, int S, float eps, float momentum,
                                    float* mean_out, float* rstd_out, float* running_mean, float* running_var) {
    __shared__ Moments warps[4];
    const int c = blockIdx.x, t = threadIdx.x;
    Moments p = {0.0f, 0.0f, 0.0f};
    for (int i = 0; i < N; ++i)
        for (int s = t; s < S; s += blockDim.x) {
            const float v = x[((long long)i * C + c) * S + s];
            p.n += 1.0f;
            const float d = v - p.mean;
            p.mean += d / p.n;
            p.m2 += d * (v - p.mean);
        }
    for (int mask = 16; mask > 0; mask /= 2) {  // a butterfly: every lane ends with the warp's total
        Moments o;
        o.n = __shfl_xor_sync(0xffffffffu, p.n, mask);
        o.mean = __shfl_xor_sync(0xffffffffu, p.mean, mask);
        o.m2 = __shfl_xor_sync(0xffffffffu, p.m2, mask);
        p = combine(o, p);
    }
    if (t % 32 == 0) warps[t / 32] = p;
    __syncthreads();
    if (t == 0) {
        Moments total = warps[0];
        for (int w = 1; w < blockDim.x / 32; ++w) total = combine(total, warps[w]);
        const float unbiased = total.m2 / (total.n - 1.0f);
        mean_out[c] = total.mean;
        rstd_out[c] = rsqrtf(total.m2 / total.n + eps);
        running_mean[c] += momentum * (total.mean - running_mean[c]);
        running_var[c] += momentum * (unbiased - running_var[c]);
    }
}
"""


def fused_forward_stats(x, running_mean, running_var, momentum=0.1, eps=1e-5):
    """128 threads, xor shuffles, thread 0 merges the warps in order; the update as old += m * (new - old)."""
    kernel = cp.RawKernel(FUSED, "fused128")
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    N, C = x.shape[:2]
    mean, rstd = cp.empty(C, dtype=cp.float32), cp.empty(C, dtype=cp.float32)
    kernel((C,), (128,), (x, np.int32(N), np.int32(C), np.int32(x.size // (N * C)), np.float32(eps),
                          np.float32(momentum), mean, rstd, running_mean, running_var))
    return mean, rstd
'''

FUSED_TWO_PASS = r'''
FUSED = r"""
__device__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

__device__ float block_sum(float v, float* partial) {  // partial: 32 floats of shared memory
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = warp_sum(lane < blockDim.x / 32 ? partial[lane] : 0.0f);
    __syncthreads();
    return v;  // the total, in every lane of warp 0
}

extern "C" __global__ void fused512(const float* x, int N, int C, int S, float eps, float momentum,
                                    float* mean_out, float* rstd_out, float* running_mean, float* running_var) {
    __shared__ float partial[32];
    __shared__ float shared_mean;
    const int c = blockIdx.x, t = threadIdx.x;
    const float n = (float)N * S;
    float s = 0.0f;
    for (int i = 0; i < N; ++i)
        for (int j = t; j < S; j += blockDim.x) s += x[((long long)i * C + c) * S + j];
    s = block_sum(s, partial);
    if (t == 0) shared_mean = s / n;
    __syncthreads();
    const float mean = shared_mean;
    float q = 0.0f;
    for (int i = 0; i < N; ++i)
        for (int j = t; j < S; j += blockDim.x) {
            const float d = x[((long long)i * C + c) * S + j] - mean;
            q += d * d;
        }
    q = block_sum(q, partial);
    if (t == 0) {
        mean_out[c] = mean;
        rstd_out[c] = 1.0f / sqrtf(q / n + eps);
        running_mean[c] = momentum * mean + (1.0f - momentum) * running_mean[c];
        running_var[c] = momentum * (q / (n - 1.0f)) + (1.0f - momentum) * running_var[c];
    }
}
"""


def fused_forward_stats(x, running_mean, running_var, momentum=0.1, eps=1e-5):
    """512 threads in two passes (the sum, then the centred squares), each reduced by shuffles down."""
    n, c, h, w = x.shape
    mean = cp.zeros(c, dtype=cp.float32)
    rstd = cp.zeros_like(mean)
    sizes = [np.int32(v) for v in (n, c, h * w)]
    scalars = [np.float32(eps), np.float32(momentum)]
    launch = cp.RawModule(code=FUSED).get_function("fused512")
    launch((c,), (512,), (cp.ascontiguousarray(x), *sizes, *scalars, mean, rstd, running_mean, running_var))
    return mean, rstd
'''

ALTERNATIVES = {
    "chan_merge": [MERGE_WEIGHTED, MERGE_STEP],
    "reduction_moments": [MOMENTS_KEEPDIMS, MOMENTS_ROWS],
    "channel_stats": [STATS_TWO_PASS, STATS_MODULE],
    "batchnorm_forward_cupy": [FORWARD_UNFOLDED, FORWARD_BROADCAST],
    "fused_forward_stats": [FUSED_XOR, FUSED_TWO_PASS],
}
CHECKS = {"channel_stats": ["channel_stats", "channel_stats_large_offset"]}
CASES = [(name, key, index) for name, sources in ALTERNATIVES.items() for index in range(len(sources))
         for key in CHECKS.get(name, [name])]


@needs_cxx
@pytest.mark.parametrize("name,key,index", CASES, ids=[f"{key}-{index}" for _, key, index in CASES])
def test_a_correct_alternative_passes_as_graded(cp, name, key, index):
    """Each alternative replaces the solution's answer cell and is judged with the answer cells' sources."""
    cells = dict(SOLVED, **{name: ALTERNATIVES[name][index]})
    judged(key, notebook(cells, cp), cells)


@pytest.mark.parametrize("name,index", [(n, i) for n, sources in ALTERNATIVES.items() for i in range(len(sources))])
def test_no_flag_on_the_solution_or_a_correct_alternative(name, index):
    assert scan("ch05_cupy_kernels", SOLVED) == ({}, [])
    assert scan("ch05_cupy_kernels", dict(SOLVED, **{name: ALTERNATIVES[name][index]})) == ({}, [])


# --- the kernel each exercise practises: in the answer cell that defines the function -----------------

NO_KERNEL = '''
def reduction_moments(x):
    """Right values, without the kernel: CuPy's own reductions."""
    axes = tuple(d for d in range(x.ndim) if d != 1)
    return x.mean(axis=axes), x.var(axis=axes)
'''
DOCSTRING_ONLY = '''
def reduction_moments(x):
    """Two passes with a ReductionKernel (a docstring names it; the code never builds one)."""
    # cp.ReductionKernel("T v", "T s", "v", "a + b", "s = a", "0", "unused")
    axes = tuple(d for d in range(x.ndim) if d != 1)
    return x.mean(axis=axes), x.var(axis=axes)
'''


@needs_cxx
def test_the_kernel_must_be_built_in_the_answer_cell_that_defines_the_function(cp):
    judged("reduction_moments", notebook(SOLVED, cp), SOLVED)
    for source in (NO_KERNEL, DOCSTRING_ONLY):
        cells = dict(SOLVED, reduction_moments=source)
        with pytest.raises(AssertionError, match="reduction_moments does not use ReductionKernel: compute the sums"):
            judged("reduction_moments", notebook(cells, cp), cells)
    outside = {k: v for k, v in SOLVED.items() if k != "reduction_moments"}   # defined in a cell of its own
    with pytest.raises(AssertionError, match="reduction_moments is not defined in an answer cell"):
        judged("reduction_moments", notebook(SOLVED, cp), outside)


@needs_cxx
@pytest.mark.parametrize("name,keys,source,kernel", [
    ("channel_stats", ["channel_stats", "channel_stats_large_offset"],
     "def channel_stats(x):\n    return x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))", "RawKernel"),
    ("batchnorm_forward_cupy", ["batchnorm_forward_cupy"],
     "def batchnorm_forward_cupy(x, gamma, beta, eps=1e-5):\n    mean, var = channel_stats(x)\n"
     "    a = gamma / cp.sqrt(var + eps)\n"
     "    return x * a[None, :, None, None] + (beta - mean * a)[None, :, None, None]", "ElementwiseKernel"),
], ids=["channel_stats", "batchnorm_forward_cupy"])
def test_right_values_without_the_kernel_lose_the_points(cp, name, keys, source, kernel):
    cells = dict(SOLVED, **{name: source})
    namespace = notebook(cells, cp)
    for key in keys:
        passes(key, namespace)   # in-process, nothing is checked statically
        with pytest.raises(AssertionError, match=f"{name} does not use {kernel}"):
            judged(key, namespace, cells)


# --- hostile: nothing the student's code does to its arguments or returns changes the expected values -----

def test_a_fused_kernel_that_zeroes_its_inputs_in_place_gets_nothing(cp):
    def fused_forward_stats(x, running_mean, running_var, momentum=0.1, eps=1e-5):
        x[...], running_mean[...], running_var[...] = 0, 0, 0   # the statistics of what it left are all 0
        return cp.zeros(x.shape[1], dtype=np.float32), cp.full(x.shape[1], 1 / np.sqrt(eps), dtype=np.float32)

    fails("fused_forward_stats", {"fused_forward_stats": fused_forward_stats}, "does not match the reference")


def test_a_merge_that_zeroes_its_inputs_in_place_gets_nothing(cp):
    def chan_merge(a, b):
        for part in (*a, *b):
            part[...] = 0
        return a[0] + b[0], a[1], a[2]

    fails("chan_merge", {"chan_merge": chan_merge}, "chan_merge does not match the reference")


WRONG_SHAPES = {(1, 3): lambda v: v[None], (3, 1): lambda v: v[:, None], (0,): lambda v: v[:0],
                (8_000_000, 1): lambda v: np.zeros((8_000_000, 1), np.float32)}


@pytest.mark.parametrize("shape", WRONG_SHAPES, ids=str)
def test_statistics_of_a_broadcastable_or_huge_shape_are_refused_by_shape(cp, shape):
    """The first case's (3 channels) statistics come back in ``shape`` (the right values where they broadcast);
    every other case is right."""
    def channel_stats(x):
        mean, var = (v.astype(np.float32) for v in ch05.reference_channel_stats(x))
        if x.shape != probes.STATS_SHAPES[0]:
            return mean, var
        return WRONG_SHAPES[shape](mean), WRONG_SHAPES[shape](var)

    fails("channel_stats", {"channel_stats": channel_stats},
          re.escape(f"channel_stats returned shape {shape}, expected (3,)"))


def test_a_merge_of_a_broadcastable_shape_is_refused_by_shape(cp):
    def chan_merge(a, b):
        n, mean, m2 = ch05.reference_chan_merge(a, b)
        return n, mean[None], m2[None]

    fails("chan_merge", {"chan_merge": chan_merge}, r"chan_merge returned shape \(1, (\d)\), expected \(\1,\)")


def test_integer_means_are_refused_by_dtype(cp):
    def chan_merge(a, b):
        n, mean, m2 = ch05.reference_chan_merge(a, b)
        return n, mean.astype(np.int64), m2

    fails("chan_merge", {"chan_merge": chan_merge}, "expected a 'f'-kind dtype")


def test_a_fused_result_that_is_not_a_pair_is_named(cp):
    def fused_forward_stats(x, running_mean, running_var, momentum=0.1, eps=1e-5):
        return x

    fails("fused_forward_stats", {"fused_forward_stats": fused_forward_stats},
          "fused_forward_stats returned an array, expected a tuple of 2 results")


def test_using_the_reference_package_is_refused(cp):
    import bnref

    namespace = {"bnref": bnref}
    exec("def batchnorm_forward_cupy(x, gamma, beta, eps=1e-5):\n"
         "    return bnref.spatial_batchnorm_forward(x, gamma, beta, eps)[0]", namespace)
    fails("batchnorm_forward_cupy", namespace, "reference package")

