"""Verdicts of chapter 5, *CuPy GPU kernels* (probes: :mod:`bncapture.ch05`; a GPU assignment: see
:mod:`bngrade.pipeline.device`).

The probes run the student's functions on CuPy copies of the inputs and record host copies of the results.
Every verdict here works on NumPy alone: it rebuilds the float32 inputs from the public builders, computes
float64 references and the known mistakes on them, and compares. The kernels the exercises practise
(``ReductionKernel``, ``RawKernel``, ``ElementwiseKernel``) must be built in the answer cell that defines the
graded function (:func:`bngrade.judge.compare.require_construct`).
"""
import numpy as np

import bnref
from bncapture import ch05 as probes

from bngrade.judge.compare import (Mistake, close, compare, describe_mismatch, name_mistake, require_construct,
                                   tolerance)

#: what builds a raw CUDA kernel: ``cupy.RawKernel``, or a ``cupy.RawModule`` and its ``get_function``
RAW_KERNEL = ("RawKernel", "RawModule")


def require_kernel(r, fn_name, classes, why):
    """:func:`require_construct` for any one of ``classes`` (its message names the first)."""
    failures = []
    for cls in classes:
        try:
            return require_construct(r, fn_name, cls, why)
        except AssertionError as exc:
            failures.append(exc)
    raise failures[0]


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


def _merged(r, key, expected, label):
    """The (count, mean, m2) recorded at ``key``, shaped like ``expected``; a count of a float dtype is taken too."""
    try:
        return r.get(key, expected, "chan_merge", label)
    except AssertionError as first:
        n, mean, m2 = expected
        try:
            return r.get(key, (n.astype(np.float64), mean, m2), "chan_merge", label)
        except AssertionError:
            raise first from None


def _merge_cases(where):
    """{dtype: cases} of the merges recorded on ``where`` ("host" or "device"), labelled with it."""
    words = "" if where == "host" else ", CuPy arrays"
    return {np.dtype(dtype): [case._replace(label=case.label + words) for case in probes.merge_cases(dtype)]
            for dtype in probes.MERGE_DTYPES}


def _check_merges(r, where):
    """The merges recorded on ``where``: no nan for two empty sides, the reference, the means' dtype kept."""
    groups = _merge_cases(where)
    for dtype, cases in groups.items():
        for index, case in enumerate(cases):
            if case.args[0][0].sum() + case.args[1][0].sum() == 0:
                got = _merged(r, f"{where} {dtype.name} {index}", reference_chan_merge(*case.args), case.label)
                if any(np.isnan(np.asarray(g, dtype=np.float64)).any() for g in got):
                    raise AssertionError("chan_merge returns nan when both counts are 0; two empty partial results "
                                         "must merge into an empty one (count 0, mean 0, M2 0), without dividing "
                                         "by 0")
    for dtype, cases in groups.items():   # the cases hold tuples, so name the tolerance of their dtype
        tol = tolerance(dtype)
        for index, case in enumerate(cases):
            expected = reference_chan_merge(*case.args)
            got = _merged(r, f"{where} {dtype.name} {index}", expected, case.label)
            if close(got, expected, tol=tol):
                continue
            name_mistake(got, case, MERGE_MISTAKES, "chan_merge", dtype, tol)
            raise AssertionError(f"chan_merge does not match the reference for input {case.label}: "
                                 f"{describe_mismatch(got, expected)}")
    case = groups[np.dtype(np.float32)][0]   # float32 means in, float32 out
    _, mean, m2 = _merged(r, f"{where} float32 0", reference_chan_merge(*case.args), case.label)
    for what, value in (("means", mean), ("m2", m2)):
        if value.dtype != np.float32:
            raise AssertionError(f"chan_merge returns {what} of dtype {value.dtype} for float32 input; keep the dtype "
                                 "of the means (cast the count ratio)")


def chan_merge(r):
    """``chan_merge(a, b) -> (count, mean, m2)`` on NumPy arrays, then on CuPy arrays."""
    for where in ("host", "device"):
        _check_merges(r, where)


# --- 2. the per-channel statistics ----------------------------------------------------------------

def reference_channel_stats(x):
    """Per-channel mean and biased variance of an (N, C, ...) array, in float64."""
    axes = (0,) + tuple(range(2, x.ndim))
    x64 = x.astype(np.float64)
    return x64.mean(axes), x64.var(axes)


def _count(x):
    """Values per channel of an (N, C, ...) array."""
    return x.size // x.shape[1]


def _first_positions(x, threads):
    """Statistics of the first ``threads`` positions of each row (the mistake applies when H*W > threads)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    if flat.shape[2] <= threads:
        raise ValueError("every position is covered")
    return reference_channel_stats(flat[:, :, :threads])


STATS_MISTAKES = [
    Mistake("your variance divides by the count minus 1 (N*H*W - 1); the batch statistics use the biased variance "
            "(divide by the count)",
            lambda x: (reference_channel_stats(x)[0], reference_channel_stats(x)[1] * _count(x) / (_count(x) - 1))),
    Mistake("the statistics are taken over every value of the tensor, not per channel over (N, H, W) "
            "(per feature, over N, for an (N, D) input)",
            lambda x: (np.full(x.shape[1], x.astype(np.float64).mean()),
                       np.full(x.shape[1], x.astype(np.float64).var()))),
    Mistake("the statistics run over only the first sample (n = 0) of each channel; loop over the batch too",
            lambda x: reference_channel_stats(x[:1])),
    Mistake("only the first 256 positions of each (sample, channel) row are used: the loop over positions must "
            "go on, s = tid, tid + blockDim.x, ..., while s < H*W",
            lambda x: _first_positions(x, 256)),
]


def large_offset(r, name, cases, read):
    """The records ``offset<i>`` of ``cases`` (means near 1e3, std 1) must hold; a variance that is right on the
    centred copy (``centred<i>``, the same data shifted to a mean near 0) is named as the one-pass cancellation.

    Args:
        read: ``read(key, case) -> (mean, var)`` of the record ``key`` of the call on ``case``.
    """
    for index, case in enumerate(cases):
        if close(read(f"offset{index}", case), reference_channel_stats(case.args[0]), np.float32):
            continue
        shifted = probes.centred(case)
        if close(read(f"centred{index}", shifted)[1], reference_channel_stats(shifted.args[0])[1], np.float32):
            raise AssertionError(
                f"{name}: the variance is right for data near 0 but wrong for the same data shifted to a mean "
                f"of 1e3 ({case.label}). That is the cancellation of the one-pass E[x^2] - E[x]^2 in float32; use "
                "two passes (subtract the mean before squaring), or Welford's update and Chan's merge")
        raise AssertionError(f"{name} does not match the reference for input {case.label}")


def _moments_read(r, name):
    """``read`` of :func:`large_offset` for a function that returns (mean, var)."""
    return lambda key, case: r.get(key, reference_channel_stats(case.args[0]), name, case.label)


def channel_stats(r):
    """``channel_stats(x) -> (mean, var)`` on (N, C, H, W) float32 input, by a RawKernel."""
    compare(r, "case", reference_channel_stats, probes.stats_cases(), "channel_stats", STATS_MISTAKES)
    require_kernel(r, "channel_stats", RAW_KERNEL, "compute the statistics with your own cupy.RawKernel (that is "
                   "what this exercise practises)")


def channel_stats_large_offset(r):
    """The variance stays accurate in float32 when |mean| / std = 1e3.

    A one-pass E[x^2] - E[x]^2 is off by about 10 % there; the check names it by its symptom: the variance is
    right once the same data are shifted to a mean near 0.
    """
    large_offset(r, "channel_stats", probes.offset_cases(53), _moments_read(r, "channel_stats"))
    require_kernel(r, "channel_stats", RAW_KERNEL, "compute the statistics with your own cupy.RawKernel (that is "
                   "what this exercise practises)")


def reduction_moments(r):
    """``reduction_moments(x) -> (mean, var)``: per feature of (N, D), per channel of (N, C, H, W), float32,
    computed with ``cupy.ReductionKernel``; accurate when |mean| / std = 1e3."""
    compare(r, "case", reference_channel_stats, probes.stats_cases(seed=55, shapes=probes.MOMENT_SHAPES),
            "reduction_moments", STATS_MISTAKES[:2])
    require_construct(r, "reduction_moments", "ReductionKernel",
                      "compute the sums with your own cupy.ReductionKernel (that is what this exercise practises)")
    large_offset(r, "reduction_moments", probes.offset_cases(56, probes.MOMENT_SHAPES),
                 _moments_read(r, "reduction_moments"))


# --- 3. the forward pass ----------------------------------------------------------------------

def reference_forward(x, gamma, beta, eps=1e-5):
    """Training-mode spatial batch norm in float64."""
    return bnref.spatial_batchnorm_forward(x.astype(np.float64), gamma.astype(np.float64),
                                           beta.astype(np.float64), eps)[0]


def _norm(x, g, b, mean, var, eps, eps_outside=False):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x = x.astype(np.float64)
    std = np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps)
    return g.reshape(shape) * (x - mean.reshape(shape)) / std.reshape(shape) + b.reshape(shape)


def _wrong_channel(x, g, b, eps):
    """The usual indexing slip: channel = i % C, as if the array were channels-last."""
    mean, var = reference_channel_stats(x)
    a = g / np.sqrt(var + eps)
    shift = b - mean * a
    C = x.shape[1]
    c = np.arange(x.size) % C
    return (x.reshape(-1).astype(np.float64) * a[c] + shift[c]).reshape(x.shape)


FORWARD_MISTAKES = [
    Mistake("gamma and beta are swapped: y = x * a + b with a = gamma / sqrt(var + eps), b = beta - mean * a",
            lambda x, g, b, eps: _norm(x, b, g, *reference_channel_stats(x), eps)),
    Mistake("eps is added outside the square root; use a = gamma / sqrt(var + eps)",
            lambda x, g, b, eps: _norm(x, g, b, *reference_channel_stats(x), eps, eps_outside=True)),
    Mistake("the output uses the unbiased variance; the batch is normalized with the biased one",
            lambda x, g, b, eps: _norm(x, g, b, reference_channel_stats(x)[0],
                                       reference_channel_stats(x)[1] * _count(x) / (_count(x) - 1), eps)),
    Mistake("the channel of element i is computed wrongly: in an (N, C, H, W) array it is (i // (H*W)) % C",
            _wrong_channel),
]


def batchnorm_forward_cupy(r):
    """``batchnorm_forward_cupy(x, gamma, beta, eps) -> y``: float32, by an ElementwiseKernel."""
    name = "batchnorm_forward_cupy"
    cases = probes.forward_cases()
    compare(r, "case", reference_forward, cases, name, FORWARD_MISTAKES)
    out = r.get("case0", reference_forward(*cases[0].args), name, cases[0].label)
    if out.dtype != np.float32:
        raise AssertionError(f"{name} returns {out.dtype} for float32 input; the kernels work in float32")
    require_construct(r, name, "ElementwiseKernel", "apply y = x * a[c] + b[c] with your own cupy.ElementwiseKernel "
                      "(that is what this exercise practises)")


# --- 5. the fused statistics kernel, with the running update -------------------------------------

def reference_fused_stats(x, running_mean, running_var, momentum, eps, unbiased=True, reciprocal=True):
    """((mean, rstd), new running_mean, new running_var) in float64, in PyTorch's convention (the running
    variance averages the unbiased batch variance), from the grader's own buffers.

    Args:
        unbiased, reciprocal: False for the mistakes: the biased variance averaged, rstd = sqrt(var + eps).
    """
    mean, var = reference_channel_stats(x)
    n = _count(x)
    batch_var = var * n / (n - 1) if unbiased else var
    rm, rv = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    rstd = 1 / np.sqrt(var + eps) if reciprocal else np.sqrt(var + eps)
    return (mean, rstd), (1 - momentum) * rm + momentum * mean, (1 - momentum) * rv + momentum * batch_var


FUSED_MISTAKES = [
    Mistake("running_var averages the biased batch variance; PyTorch (and Ioffe & Szegedy's Algorithm 2) average "
            "the unbiased one, m2 / (n - 1)",
            lambda x, rm, rv, m, eps: reference_fused_stats(x, rm, rv, m, eps, unbiased=False)),
    Mistake("the momentum is used in TensorFlow's convention (weight of the old value); in PyTorch's it weighs the "
            "new batch statistic: new = (1 - momentum) * old + momentum * batch",
            lambda x, rm, rv, m, eps: reference_fused_stats(x, rm, rv, 1 - m, eps)),
    Mistake("the running statistics are not updated: the kernel must write the new values into the running_mean "
            "and running_var buffers it was given",
            lambda x, rm, rv, m, eps: (reference_fused_stats(x, rm, rv, m, eps)[0], rm, rv)),
    Mistake("rstd is sqrt(var + eps); it is the reciprocal, 1 / sqrt(var + eps)",
            lambda x, rm, rv, m, eps: reference_fused_stats(x, rm, rv, m, eps, reciprocal=False)),
]


def _fused_moments(r, key, case):
    """(mean, var) of the fused call recorded at ``key``, the variance recovered from rstd."""
    (mean, rstd), _, _ = r.get(key, reference_fused_stats(*case.args), "fused_forward_stats", case.label)
    return mean, 1 / np.asarray(rstd, np.float64) ** 2 - case.args[4]


def fused_forward_stats(r):
    """``fused_forward_stats(x, running_mean, running_var, momentum, eps) -> (mean, rstd)``: the statistics, the
    in-place running update in PyTorch's convention, and accuracy at |mean| / std = 1e3; by a RawKernel."""
    name = "fused_forward_stats"
    compare(r, "case", reference_fused_stats, probes.fused_cases(), name, FUSED_MISTAKES)
    large_offset(r, name, probes.fused_offset_cases(), lambda key, case: _fused_moments(r, key, case))
    require_kernel(r, name, RAW_KERNEL, "compute the statistics and the running update in your own cupy.RawKernel "
                   "(that is what this exercise practises)")
