"""Hidden tests of chapter 5, *CuPy GPU kernels* (a GPU assignment: see :mod:`bngrade.pipeline.device`).

Each check takes the student's function and an array module ``xp`` (CuPy by
default). Test data are made with NumPy, moved to ``xp``, and the results
moved back and compared with float64 references of the same float32 data.
On a CPU the checks run with ``xp=numpy`` and NumPy stand-ins for the
student code, which is how their logic is tested without a GPU.
"""
import numpy as np

import bnref

from bngrade.judge.compare import Case, Mistake, check_not_reference, close, compare, require_construct, tolerance
from bngrade.pipeline.device import default_xp, on_device, to_numpy

# float32 shapes whose values per channel (N*H*W) are not multiples of a 256-thread block
STATS_SHAPES = [(2, 3, 5, 7), (3, 4, 17, 19), (64, 3, 1, 1), (5, 6, 33, 31), (1, 2, 300, 1)]


# --- 1. Chan's merge ---------------------------------------------------------------------------

def reference_chan_merge(a, b):
    """Merged (count, mean, M2) in float64, the means' dtype kept."""
    (na, ma, qa), (nb, mb, qb) = a, b
    n = na + nb
    w = np.where(n > 0, nb / np.where(n > 0, n, 1), 0.0)
    d = mb.astype(np.float64) - ma
    mean = ma + d * w
    m2 = qa + qb + d * d * na * w
    return n, mean.astype(ma.dtype), m2.astype(ma.dtype)


def _moments(v):
    return np.full(v.shape[1:], v.shape[0], dtype=np.int64), v.mean(0), ((v - v.mean(0)) ** 2).sum(0)


def _merge_cases(seed=51):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for (na, nb), shape, loc in [((5, 9), (4,), 0.0), ((1, 30), (3, 2), 3.0), ((40, 2), (6,), -20.0),
                                     ((0, 7), (5,), 1.0), ((7, 0), (5,), 1.0), ((0, 0), (3,), 0.0)]:
            va = loc + rng.normal(0, 2, (na, *shape)) if na else np.zeros((0, *shape))
            vb = loc + 4 + rng.normal(0, 1, (nb, *shape)) if nb else np.zeros((0, *shape))
            a = tuple(np.asarray(t) for t in _moments(va)) if na else (
                np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape))
            b = tuple(np.asarray(t) for t in _moments(vb)) if nb else (
                np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape))
            a = (a[0], a[1].astype(dtype), a[2].astype(dtype))
            b = (b[0], b[1].astype(dtype), b[2].astype(dtype))
            cases.append(Case((a, b), f"counts ({na}, {nb}), shape {shape}, {np.dtype(dtype).name}"))
    return cases


def _merge_mistake(mean_fn, m2_fn):
    def wrong(a, b):
        (na, ma, qa), (nb, mb, qb) = a, b
        n = na + nb
        safe = np.where(n > 0, n, 1)
        return n, mean_fn(na, ma, nb, mb, safe), m2_fn(na, ma, qa, nb, mb, qb, safe)
    return wrong


_GOOD_MEAN = lambda na, ma, nb, mb, n: ma + (mb - ma) * nb / n  # noqa: E731

MERGE_MISTAKES = [
    Mistake("the merged mean is the plain average of the two means; weight them by their counts, "
            "mean = mean_a + delta * n_b / n",
            _merge_mistake(lambda na, ma, nb, mb, n: (ma + mb) / 2,
                           lambda na, ma, qa, nb, mb, qb, n: qa + qb + (mb - ma) ** 2 * na * nb / n)),
    Mistake("M2 misses the between-groups term delta^2 * n_a * n_b / n: adding M2_a + M2_b alone ignores how far "
            "apart the two means are",
            _merge_mistake(_GOOD_MEAN, lambda na, ma, qa, nb, mb, qb, n: qa + qb)),
    Mistake("the between-groups term is delta^2 * n_a * n_b without the division by n = n_a + n_b",
            _merge_mistake(_GOOD_MEAN, lambda na, ma, qa, nb, mb, qb, n: qa + qb + (mb - ma) ** 2 * na * nb)),
]


def check_chan_merge(student, xp=None):
    """Hidden test of ``chan_merge(a, b) -> (count, mean, m2)`` on NumPy and on ``xp`` arrays."""
    check_not_reference(student, "chan_merge")
    xp = xp or default_xp()
    cases = _merge_cases()
    for case in cases:
        if case.args[0][0].sum() + case.args[1][0].sum() == 0:
            got = on_device(student, xp)(*case.args)
            if any(np.isnan(np.asarray(g, dtype=np.float64)).any() for g in got):
                raise AssertionError("chan_merge returns nan when both counts are 0; two empty partial results "
                                     "must merge into an empty one (count 0, mean 0, M2 0), without dividing by 0")
    for dtype in (np.float64, np.float32):   # the cases hold tuples, so name the tolerance of their dtype
        subset = [c for c in cases if c.args[0][1].dtype == dtype]
        compare(on_device(student, xp), reference_chan_merge, subset, "chan_merge", MERGE_MISTAKES,
                tol=tolerance(dtype))
    got = on_device(student, xp)(*cases[-4].args)   # float32 means in, float32 out
    if np.asarray(got[1]).dtype != np.float32:
        raise AssertionError(f"chan_merge returns means of dtype {np.asarray(got[1]).dtype} for float32 input; "
                             "keep the dtype of the means (cast the count ratio)")


# --- 2. the per-channel statistics kernel ---------------------------------------------------------

def reference_channel_stats(x):
    """Per-channel mean and biased variance of an (N, C, ...) array, in float64."""
    axes = (0,) + tuple(range(2, x.ndim))
    x64 = x.astype(np.float64)
    return x64.mean(axes), x64.var(axes)


def _stats_cases(seed=52, loc=0.0, scale=None, shapes=STATS_SHAPES):
    """float32 inputs (N, C, ...) with a mean and a spread per channel (or one spread ``scale``, means near ``loc``)."""
    rng = np.random.default_rng(seed)
    cases = []
    for shape in shapes:
        C = shape[1]
        per_channel = (1, -1) + (1,) * (len(shape) - 2)
        means = loc + rng.normal(0.0, 3.0, C) if not loc else loc * (1 + 0.01 * rng.standard_normal(C))
        scales = scale if scale is not None else rng.uniform(0.5, 3.0, C)
        x = np.reshape(means, per_channel) + np.reshape(scales, per_channel) * rng.standard_normal(shape)
        cases.append(Case((x.astype(np.float32),), f"x {shape} float32" + (f", |mean|/std ~ {loc:g}" if loc else "")))
    return cases


STATS_MISTAKES = [
    Mistake("your variance divides by the count minus 1 (N*H*W - 1); the batch statistics use the biased variance "
            "(divide by the count)",
            lambda x: (reference_channel_stats(x)[0], reference_channel_stats(x)[1] * _count(x) / (_count(x) - 1))),
    Mistake("the statistics are taken over every value of the tensor, not per channel over (N, H, W) "
            "(per feature, over N, for an (N, D) input)",
            lambda x: (np.full(x.shape[1], x.astype(np.float64).mean()), np.full(x.shape[1], x.astype(np.float64).var()))),
    Mistake("the statistics run over only the first sample (n = 0) of each channel; loop over the batch too",
            lambda x: reference_channel_stats(x[:1])),
    Mistake("only the first 256 positions of each (sample, channel) row are used: the loop over positions must "
            "go on, s = tid, tid + blockDim.x, ..., while s < H*W",
            lambda x: _first_positions(x, 256)),
]


def _first_positions(x, threads):
    """Statistics of the first ``threads`` positions of each row (the mistake applies when H*W > threads)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    if flat.shape[2] <= threads:
        raise ValueError("every position is covered")
    return reference_channel_stats(flat[:, :, :threads])


def _count(x):
    return x.size // x.shape[1]


def check_channel_stats(student, xp=None):
    """Hidden test of ``channel_stats(x) -> (mean, var)`` on (N, C, H, W) float32 input."""
    check_not_reference(student, "channel_stats")
    xp = xp or default_xp()
    compare(on_device(student, xp), reference_channel_stats, _stats_cases(), "channel_stats", STATS_MISTAKES)


def check_channel_stats_large_offset(student, xp=None):
    """Hidden test: the variance stays accurate in float32 when |mean| / std = 1e3.

    A one-pass E[x^2] - E[x]^2 is off by about 10 % there; the check names it
    by its symptom: the variance changes when the same data are shifted by a constant.
    """
    check_not_reference(student, "channel_stats")
    xp = xp or default_xp()
    _check_large_offset(on_device(student, xp), "channel_stats", _stats_cases(seed=53, loc=1e3, scale=1.0))


def _check_large_offset(run, name, cases):
    """``run(x) -> (mean, var)`` must hold on ``cases`` (means near 1e3, std 1); a variance that is right once the
    data are shifted to a mean near 0 is named as the one-pass cancellation."""
    for case in cases:
        (x,) = case.args
        expected = reference_channel_stats(x)
        try:
            got = run(x)
        except Exception as exc:
            raise AssertionError(f"{name} raised {type(exc).__name__}: {exc} (input: {case.label})") from None
        if close(got, expected, np.float32):
            continue
        centred = (x.astype(np.float64) - 1e3).astype(np.float32)   # the same spread, mean near 0
        shifted = run(centred)
        if close(shifted[1], reference_channel_stats(centred)[1], np.float32):
            raise AssertionError(
                f"{name}: the variance is right for data near 0 but wrong for the same data shifted to a mean "
                f"of 1e3 ({case.label}). That is the cancellation of the one-pass E[x^2] - E[x]^2 in float32; use "
                "two passes (subtract the mean before squaring), or Welford's update and Chan's merge")
        raise AssertionError(f"{name} does not match the reference for input {case.label}")


# --- 2b. two-pass statistics with ReductionKernels ------------------------------------------------

MOMENT_SHAPES = [(64, 5), (7, 300), (2, 3), (2, 3, 5, 7), (5, 6, 33, 31)]


def check_reduction_moments(student, xp=None):
    """Hidden test of ``reduction_moments(x) -> (mean, var)``: per feature of (N, D), per channel of (N, C, H, W),
    float32, computed with ``cupy.ReductionKernel``; accurate when |mean| / std = 1e3."""
    check_not_reference(student, "reduction_moments")
    xp = xp or default_xp()
    run = on_device(student, xp)
    compare(run, reference_channel_stats, _stats_cases(seed=55, shapes=MOMENT_SHAPES), "reduction_moments",
            STATS_MISTAKES[:2])
    require_construct(student, "ReductionKernel", "reduction_moments",
                      "compute the sums with your own cupy.ReductionKernel (that is what this exercise practises)")
    _check_large_offset(run, "reduction_moments", _stats_cases(seed=56, loc=1e3, scale=1.0, shapes=MOMENT_SHAPES))


# --- 3. the forward pass ----------------------------------------------------------------------

def _forward_cases(seed=54):
    rng = np.random.default_rng(seed)
    cases = []
    for shape, eps in zip(STATS_SHAPES, (1e-5, 1e-3, 1e-5, 0.1, 1e-5)):
        C = shape[1]
        x = (rng.normal(0, 3, C)[None, :, None, None] + rng.uniform(0.5, 3, C)[None, :, None, None]
             * rng.standard_normal(shape)).astype(np.float32)
        gamma = rng.uniform(0.5, 2.0, C).astype(np.float32)
        beta = rng.normal(0.0, 1.0, C).astype(np.float32)
        cases.append(Case((x, gamma, beta, eps), f"x {shape} float32, eps={eps}"))
    return cases


def reference_forward(x, gamma, beta, eps=1e-5):
    """Training-mode spatial batch norm in float64."""
    return bnref.spatial_batchnorm_forward(x.astype(np.float64), gamma.astype(np.float64),
                                           beta.astype(np.float64), eps)[0]


def _norm(x, g, b, mean, var, eps, eps_outside=False):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x = x.astype(np.float64)
    std = np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps)
    return g.reshape(shape) * (x - mean.reshape(shape)) / std.reshape(shape) + b.reshape(shape)


FORWARD_MISTAKES = [
    Mistake("gamma and beta are swapped: y = x * a + b with a = gamma / sqrt(var + eps), b = beta - mean * a",
            lambda x, g, b, eps: _norm(x, b, g, *reference_channel_stats(x), eps)),
    Mistake("eps is added outside the square root; use a = gamma / sqrt(var + eps)",
            lambda x, g, b, eps: _norm(x, g, b, *reference_channel_stats(x), eps, eps_outside=True)),
    Mistake("the output uses the unbiased variance; the batch is normalized with the biased one",
            lambda x, g, b, eps: _norm(x, g, b, reference_channel_stats(x)[0],
                                       reference_channel_stats(x)[1] * _count(x) / (_count(x) - 1), eps)),
    Mistake("the channel of element i is computed wrongly: in an (N, C, H, W) array it is (i // (H*W)) % C",
            lambda x, g, b, eps: _wrong_channel(x, g, b, eps)),
]


def _wrong_channel(x, g, b, eps):
    """The usual indexing slip: channel = i % C, as if the array were channels-last."""
    mean, var = reference_channel_stats(x)
    a = g / np.sqrt(var + eps)
    shift = b - mean * a
    C = x.shape[1]
    c = np.arange(x.size) % C
    return (x.reshape(-1).astype(np.float64) * a[c] + shift[c]).reshape(x.shape)


def check_batchnorm_forward_cupy(student, xp=None):
    """Hidden test of ``batchnorm_forward_cupy(x, gamma, beta, eps) -> out``."""
    check_not_reference(student, "batchnorm_forward_cupy")
    xp = xp or default_xp()
    run = on_device(student, xp)
    cases = _forward_cases()
    compare(run, reference_forward, cases, "batchnorm_forward_cupy", FORWARD_MISTAKES)
    out = run(*cases[0].args)
    if np.asarray(out).dtype != np.float32:
        raise AssertionError(f"batchnorm_forward_cupy returns {np.asarray(out).dtype} for float32 input; "
                             "the kernels work in float32")


# --- 5. the fused statistics kernel, with the running update -------------------------------------

def reference_fused_stats(x, running_mean, running_var, momentum, eps):
    """(mean, rstd, new running_mean, new running_var) in float64, PyTorch's convention (unbiased running_var)."""
    mean, var = reference_channel_stats(x)
    n = _count(x)
    rm, rv = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    new_rm = (1 - momentum) * rm + momentum * mean
    new_rv = (1 - momentum) * rv + momentum * var * n / (n - 1)
    return mean, 1 / np.sqrt(var + eps), new_rm, new_rv


def _fused_cases(seed=57):
    rng = np.random.default_rng(seed)
    cases = []
    for case, momentum, eps in zip(_stats_cases(seed=seed), (0.1, 0.3, 0.1, 0.01, 1.0), (1e-5, 1e-3, 1e-5, 0.1, 1e-5)):
        (x,) = case.args
        C = x.shape[1]
        rm, rv = rng.normal(0, 1, C).astype(np.float32), rng.uniform(0.5, 2.0, C).astype(np.float32)
        cases.append(Case((x, rm, rv, momentum, eps), f"{case.label}, momentum={momentum}, eps={eps}"))
    return cases


FUSED_MISTAKES = [
    Mistake("running_var averages the biased batch variance; PyTorch (and Ioffe & Szegedy's Algorithm 2) average "
            "the unbiased one, m2 / (n - 1)",
            lambda x, rm, rv, m, eps: reference_fused_stats(x, rm, rv, m, eps)[:3]
            + ((1 - m) * rv + m * reference_channel_stats(x)[1],)),
    Mistake("the momentum is used in TensorFlow's convention (weight of the old value); in PyTorch's it weighs the "
            "new batch statistic: new = (1 - momentum) * old + momentum * batch",
            lambda x, rm, rv, m, eps: reference_fused_stats(x, rm, rv, m, eps)[:2]
            + reference_fused_stats(x, rm, rv, 1 - m, eps)[2:]),
    Mistake("the running statistics are not updated: the kernel must write the new values into the running_mean "
            "and running_var buffers it was given",
            lambda x, rm, rv, m, eps: reference_fused_stats(x, rm, rv, m, eps)[:2] + (rm, rv)),
    Mistake("rstd is sqrt(var + eps); it is the reciprocal, 1 / sqrt(var + eps)",
            lambda x, rm, rv, m, eps: (reference_channel_stats(x)[0], np.sqrt(reference_channel_stats(x)[1] + eps))
            + reference_fused_stats(x, rm, rv, m, eps)[2:]),
]


def _fused_on_device(student, xp):
    """``student`` on device copies of (x, running_mean, running_var); returns (mean, rstd, running_mean,
    running_var) on the host, the buffers as the student's kernel left them."""
    def run(x, running_mean, running_var, momentum, eps):
        rm, rv = xp.asarray(running_mean), xp.asarray(running_var)
        mean, rstd = to_numpy(student(xp.asarray(x), rm, rv, momentum, eps))
        return mean, rstd, to_numpy(rm), to_numpy(rv)

    run.__name__ = getattr(student, "__name__", "student")
    run.graded_parts = (student,)  # this module imports bnref: judge the student's function, not this wrapper
    return run


def check_fused_forward_stats(student, xp=None):
    """Hidden test of ``fused_forward_stats(x, running_mean, running_var, momentum, eps) -> (mean, rstd)``: the
    statistics, the in-place running update in PyTorch's convention, and accuracy at |mean| / std = 1e3."""
    check_not_reference(student, "fused_forward_stats")
    xp = xp or default_xp()
    run = _fused_on_device(student, xp)
    compare(run, reference_fused_stats, _fused_cases(), "fused_forward_stats", FUSED_MISTAKES)

    def moments(x, eps=1e-5):
        C = x.shape[1]
        mean, rstd, _, _ = run(x, np.zeros(C, np.float32), np.ones(C, np.float32), 0.1, eps)
        return mean, 1 / np.asarray(rstd, np.float64) ** 2 - eps

    _check_large_offset(moments, "fused_forward_stats", _stats_cases(seed=58, loc=1e3, scale=1.0))
