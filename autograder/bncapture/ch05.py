"""Probes of chapter 5, *CuPy GPU kernels*: the inputs and the calls; the verdicts are the grader's.

The inputs are built on the host with NumPy; each probe copies them to the GPU with ``cupy.asarray`` (the
sandbox's CuPy: the real one on a GPU machine, the CPU emulator in the course's tests) and calls the student's
functions on the copies. What comes back is recorded as host copies (:func:`bncapture.codec.encode_result`
calls ``.get()`` on device arrays), so the verdicts work on NumPy alone.
"""
import numpy as np

from .cases import Case, each, generator

# float32 shapes whose values per channel (N*H*W) are not multiples of a 256-thread block
STATS_SHAPES = [(2, 3, 5, 7), (3, 4, 17, 19), (64, 3, 1, 1), (5, 6, 33, 31), (1, 2, 300, 1)]
# reduction_moments takes (N, D) batches as well as (N, C, H, W) ones
MOMENT_SHAPES = [(64, 5), (7, 300), (2, 3), (2, 3, 5, 7), (5, 6, 33, 31)]
MERGE_DTYPES = (np.float64, np.float32)
#: the mean near which the large-offset inputs lie, |mean| / std = OFFSET
OFFSET = 1e3
#: running buffers, momentum and eps of the fused kernel's large-offset calls
OFFSET_MOMENTUM, OFFSET_EPS = 0.1, 1e-5


# --- the inputs -----------------------------------------------------------------------------------

def _partial(values, dtype):
    """(count, mean, m2) of ``values`` (n, *shape): an int64 count and ``dtype`` moments, zeros when n == 0."""
    n, shape = values.shape[0], values.shape[1:]
    count = np.full(shape, n, np.int64)
    if n == 0:
        return count, np.zeros(shape, dtype), np.zeros(shape, dtype)
    mean = values.mean(0)
    return count, mean.astype(dtype), ((values - mean) ** 2).sum(0).astype(dtype)


def merge_cases(dtype, seed=51):
    """``chan_merge`` inputs ((count, mean, m2), (count, mean, m2)) with means of ``dtype``: unequal counts,
    far-apart means, and an empty side, or both (counts (0, 0))."""
    rng = generator(seed, np.dtype(dtype).itemsize)
    cases = []
    for (na, nb), shape, loc in [((5, 9), (4,), 0.0), ((1, 30), (3, 2), 3.0), ((40, 2), (6,), -20.0),
                                 ((0, 7), (5,), 1.0), ((7, 0), (5,), 1.0), ((0, 0), (3,), 0.0)]:
        a = _partial(loc + rng.normal(0, 2, (na, *shape)), dtype)
        b = _partial(loc + 4 + rng.normal(0, 1, (nb, *shape)), dtype)
        cases.append(Case((a, b), f"counts ({na}, {nb}), shape {shape}, {np.dtype(dtype).name}"))
    return cases


def stats_cases(seed=52, loc=0.0, scale=None, shapes=STATS_SHAPES):
    """float32 inputs (N, C, ...) with a mean and a spread per channel (or one spread ``scale``, means near
    ``loc``)."""
    rng = generator(seed)
    cases = []
    for shape in shapes:
        C = shape[1]
        per_channel = (1, -1) + (1,) * (len(shape) - 2)
        means = loc + rng.normal(0.0, 3.0, C) if not loc else loc * (1 + 0.01 * rng.standard_normal(C))
        scales = scale if scale is not None else rng.uniform(0.5, 3.0, C)
        x = np.reshape(means, per_channel) + np.reshape(scales, per_channel) * rng.standard_normal(shape)
        cases.append(Case((x.astype(np.float32),), f"x {shape} float32" + (f", |mean|/std ~ {loc:g}" if loc else "")))
    return cases


def offset_cases(seed, shapes=STATS_SHAPES):
    """float32 inputs with means near :data:`OFFSET` and std 1 per channel."""
    return stats_cases(seed=seed, loc=OFFSET, scale=1.0, shapes=shapes)


def centred(case):
    """The same spread as ``case``'s x with the mean moved near 0 (x - OFFSET, float32): the input that tells
    the one-pass variance's cancellation from other mistakes."""
    x, *rest = case.args
    return Case(((x.astype(np.float64) - OFFSET).astype(np.float32), *rest), f"{case.label}, shifted by -{OFFSET:g}")


def forward_cases(seed=54):
    """(x (N, C, H, W), gamma (C,), beta (C,), eps), float32."""
    rng = generator(seed)
    cases = []
    for shape, eps in zip(STATS_SHAPES, (1e-5, 1e-3, 1e-5, 0.1, 1e-5)):
        C = shape[1]
        x = (rng.normal(0, 3, C)[None, :, None, None] + rng.uniform(0.5, 3, C)[None, :, None, None]
             * rng.standard_normal(shape)).astype(np.float32)
        gamma = rng.uniform(0.5, 2.0, C).astype(np.float32)
        beta = rng.normal(0.0, 1.0, C).astype(np.float32)
        cases.append(Case((x, gamma, beta, eps), f"x {shape} float32, eps={eps}"))
    return cases


def fused_cases(seed=57):
    """(x (N, C, H, W), running_mean (C,), running_var (C,), momentum, eps), float32."""
    rng = generator(seed)
    cases = []
    for case, momentum, eps in zip(stats_cases(seed=seed), (0.1, 0.3, 0.1, 0.01, 1.0), (1e-5, 1e-3, 1e-5, 0.1, 1e-5)):
        (x,) = case.args
        C = x.shape[1]
        rm, rv = rng.normal(0, 1, C).astype(np.float32), rng.uniform(0.5, 2.0, C).astype(np.float32)
        cases.append(Case((x, rm, rv, momentum, eps), f"{case.label}, momentum={momentum}, eps={eps}"))
    return cases


def fused_offset_cases(seed=58):
    """The large-offset inputs of the fused kernel: (x, zeros, ones, OFFSET_MOMENTUM, OFFSET_EPS)."""
    cases = []
    for case in offset_cases(seed):
        (x,) = case.args
        C = x.shape[1]
        args = (x, np.zeros(C, np.float32), np.ones(C, np.float32), OFFSET_MOMENTUM, OFFSET_EPS)
        cases.append(Case(args, case.label))
    return cases


# --- the calls on the device ----------------------------------------------------------------------

def to_device(value, cupy):
    """``value`` with every NumPy array (in tuples too) copied to the GPU."""
    if isinstance(value, np.ndarray):
        return cupy.asarray(value)
    if isinstance(value, tuple):
        return tuple(to_device(v, cupy) for v in value)
    return value


def on_device(fn):
    """``fn`` called on GPU copies of its arguments."""
    import cupy

    def run(*args):
        return fn(*to_device(args, cupy))

    return run


def with_buffers(fn):
    """``fn(x, running_mean, running_var, ...)`` on GPU copies; returns ``(its result, running_mean,
    running_var)``, the two buffers as the call left them (the kernel updates them in place)."""
    import cupy

    def run(*args):
        moved = to_device(args, cupy)
        return fn(*moved), moved[1], moved[2]

    return run


def offset_calls(p, fn, cases):
    """Call ``fn`` on each large-offset case (``offset0``, ...) and on its centred copy (``centred0``, ...)."""
    each(p, "offset", fn, cases)
    each(p, "centred", fn, [centred(case) for case in cases])


# --- the probes -----------------------------------------------------------------------------------

def chan_merge(p):
    """Every merge case on NumPy arrays (``host <dtype> <i>``) and on CuPy arrays (``device <dtype> <i>``)."""
    fn = p.student("chan_merge")
    device = on_device(fn)
    for dtype in MERGE_DTYPES:
        name = np.dtype(dtype).name
        each(p, f"host {name} ", fn, merge_cases(dtype))
        each(p, f"device {name} ", device, merge_cases(dtype))


def reduction_moments(p):
    """(mean, var) of (N, D) and (N, C, H, W) batches (``case<i>``), and of the large-offset ones."""
    fn = on_device(p.student("reduction_moments"))
    each(p, "case", fn, stats_cases(seed=55, shapes=MOMENT_SHAPES))
    offset_calls(p, fn, offset_cases(56, MOMENT_SHAPES))


def channel_stats(p):
    """(mean, var) of every statistics case."""
    each(p, "case", on_device(p.student("channel_stats")), stats_cases())


def channel_stats_large_offset(p):
    """(mean, var) of the large-offset batches and of their centred copies."""
    offset_calls(p, on_device(p.student("channel_stats")), offset_cases(53))


def batchnorm_forward_cupy(p):
    """y of every forward case."""
    each(p, "case", on_device(p.student("batchnorm_forward_cupy")), forward_cases())


def fused_forward_stats(p):
    """((mean, rstd), running_mean, running_var) of every fused case, and of the large-offset calls."""
    fn = with_buffers(p.student("fused_forward_stats"))
    each(p, "case", fn, fused_cases())
    offset_calls(p, fn, fused_offset_cases())
