"""CuPy wrappers around the chapter-5 kernels: batch norm forward (training and inference) and backward, float32.

CuPy is imported only when a wrapper runs. Without a CUDA GPU every wrapper
raises ``RuntimeError`` with :data:`NO_GPU_MESSAGE`; nothing here falls back
silently to the CPU.

Layouts: ``layout="NCHW"`` takes (N, C) or (N, C, *spatial) with channels on
axis 1; ``layout="NHWC"`` takes (..., C) with channels last. Statistics are
per channel over every other axis, as in ``torch.nn.BatchNorm1d/2d``.
"""
import threading
import weakref
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from . import plan

NO_GPU_MESSAGE = (
    "bnref.cuda needs a CUDA GPU, and cupy.is_available() is False on this machine. "
    "On Google Colab: Runtime -> Change runtime type -> GPU (then run the notebook again); "
    "if `import cupy` fails there, run `pip install cupy-cuda12x` in a cell first."
)


def gpu_available():
    """True when CuPy imports and sees a usable CUDA device."""
    try:
        import cupy
        return bool(cupy.is_available())
    except Exception:  # no cupy, no driver, no device: all mean "no GPU"
        return False


_BACKENDS = []


@contextmanager
def use_backend(module):
    """Run the wrappers on ``module`` instead of CuPy: any object with the part of CuPy's interface they use.

    Tests use :class:`bnref.cuda.emulator.CupyOnCpu` to run the kernels on a CPU.
    """
    _BACKENDS.append(module)
    try:
        yield module
    finally:
        _BACKENDS.pop()


def _cupy():
    if _BACKENDS:
        return _BACKENDS[-1]
    if not gpu_available():
        raise RuntimeError(NO_GPU_MESSAGE)
    import cupy
    return cupy


_MODULES = {}
_SM_COUNT = {}
_SLOTS = {}
_COUNTERS = weakref.WeakKeyDictionary()   # stream -> {(backend, device, host thread): counters}


def _kernel(cp, file, name):
    """The compiled kernel ``name`` of ``file`` (NVRTC compiles each file once per process and device)."""
    from . import COMPILE_OPTIONS, kernel_source

    key = (cp.__name__, cp.cuda.Device().id, file)
    if key not in _MODULES:
        _MODULES[key] = cp.RawModule(code=kernel_source(file), options=COMPILE_OPTIONS)
    return _MODULES[key].get_function(name)


def _sm_count(cp):
    dev = (cp.__name__, cp.cuda.Device().id)
    if dev not in _SM_COUNT:
        _SM_COUNT[dev] = int(cp.cuda.runtime.getDeviceProperties(dev[1])["multiProcessorCount"])
    return _SM_COUNT[dev]


def _slots(cp, kernel):
    """Blocks of ``kernel`` (a ``RawKernel``) the device holds at once, the size of its persistent grid: the SMs
    times the driver's count of resident 256-thread blocks per SM for this compiled kernel (its registers, its
    shared memory)."""
    handle = kernel.kernel.ptr   # the CUfunction
    key = (cp.__name__, cp.cuda.Device().id, handle)
    if key not in _SLOTS:
        per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(handle, plan.THREADS, 0)
        _SLOTS[key] = _sm_count(cp) * max(1, int(per_sm))
    return _SLOTS[key]


def _counters(cp, n):
    """At least ``n`` arrival counters for the grid-level merge, zero between launches (the last block of a
    group resets its own).

    One buffer per stream, device and host thread (the per-thread default streams of two host threads are one
    stream object): launches that may overlap never share a counter, and launches that share one run one after
    the other on their stream.
    """
    mine = _COUNTERS.setdefault(cp.cuda.get_current_stream(), {})
    key = (cp.__name__, cp.cuda.Device().id, threading.get_ident())
    if key not in mine or mine[key].size < n:
        mine[key] = cp.zeros(max(n, 1024), dtype=cp.uint32)
    return mine[key]


def _input(cp, x, layout, name="x"):
    if not isinstance(x, cp.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray on the GPU (cupy.asarray(...)); got {type(x).__name__}")
    if x.dtype != cp.float32:
        raise TypeError(f"{name} must be float32 (the kernels are float32); got {x.dtype}")
    lay = plan.layout_of(x.shape, layout)
    if lay.per_channel > plan.MAX_PER_CHANNEL:
        raise ValueError(f"at most {plan.MAX_PER_CHANNEL} values per channel; got {lay.per_channel}")
    return cp.ascontiguousarray(x), lay


def _param(cp, p, C, name):
    p = cp.ascontiguousarray(cp.asarray(p, dtype=cp.float32))
    if p.shape != (C,):
        raise ValueError(f"{name} must have shape (C,) = ({C},) to match x; got {p.shape}")
    return p


def _buffer(cp, p, C, name):
    """A running-statistics buffer, updated in place: it must already be a contiguous float32 (C,) cupy array."""
    if not (isinstance(p, cp.ndarray) and p.dtype == cp.float32 and p.shape == (C,) and p.flags.c_contiguous):
        raise ValueError(f"{name} must be a contiguous float32 cupy array of shape (C,) = ({C},); "
                         f"it is updated in place")
    return p


_POISON = []


@contextmanager
def poisoned():
    """Within the block, every output and workspace array the wrappers allocate starts as NaN, not as whatever
    the memory pool hands back (often the same bytes as the last call's), so that a value a kernel should have
    written and did not shows as NaN. :mod:`bnref.cuda.checks` runs under it."""
    _POISON.append(True)
    try:
        yield
    finally:
        _POISON.pop()


def _empty(cp, shape):
    """A float32 array for a wrapper's output or workspace (NaN within :func:`poisoned`)."""
    out = cp.empty(shape, cp.float32)
    if _POISON:
        out.fill(np.nan)
    return out


def _aligned(*arrays):
    return all(a.data.ptr % 16 == 0 for a in arrays)


class GPUCache(NamedTuple):
    """What the training forward pass keeps for :func:`batchnorm_backward_gpu` (all on the GPU)."""

    x: object       # the input, C-contiguous float32
    gamma: object   # (C,)
    mean: object    # (C,) batch mean
    rstd: object    # (C,) 1 / sqrt(biased batch variance + eps)
    layout: plan.Layout


class Launched(NamedTuple):
    """A kernel launch of the wrappers, as :func:`observed` reports it."""

    kernel: str     # its name, e.g. "bn_forward_stats_ncs_vec4" (the _vec4 ones move float4s)
    grid: tuple
    block: tuple
    slots: int      # its blocks the device holds at once: the driver's occupancy per SM times the SMs


_OBSERVERS = []


@contextmanager
def observed(callback):
    """Within the block, ``callback(Launched)`` runs on the host right after each kernel the wrappers launch
    (the benchmark records a CUDA event there, to time each kernel of a pass, and keeps the launch shapes)."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.pop()


def _planned(cp, file, stem, lay, vec, plan_launch):
    """Kernel ``stem``_ncs|mc[_vec4] of ``file``, planned by ``plan_launch(slots)``: (launch, run), where
    run(args) launches it and tells the observers."""
    name = f"{stem}_{lay.kind}" + ("_vec4" if vec == 4 else "")
    kernel = _kernel(cp, file, name)
    slots = _slots(cp, kernel)
    launch = plan_launch(slots)

    def run(args):
        kernel(launch.grid, launch.block, args)
        for observe in _OBSERVERS:
            observe(Launched(name, launch.grid, launch.block, slots))
    return launch, run


def _elementwise(cp, file, stem, lay, arrays):
    """The kernel ``stem``_ncs|mc[_vec4] of ``file`` for ``arrays`` (those it reads and writes), as run(args) on
    its persistent launch, and its size arguments: (N*C, C, S/vec) or (M, C/vec)."""
    vec = plan.vector_width(lay, _aligned(*arrays))
    _, run = _planned(cp, file, stem, lay, vec, lambda slots: plan.elementwise_launch(lay, vec, slots))
    if lay.kind == "ncs":
        return run, (np.int64(lay.N * lay.C), np.int32(lay.C), np.int32(lay.S // vec))
    return run, (np.int32(lay.N), np.int32(lay.C // vec))


def _reduction(cp, file, stem, lay, arrays, count_words, blocks=None):
    """The kernel ``stem``_ncs|mc[_vec4] of ``file`` for ``arrays`` (the ones it streams), as run(args) on its
    persistent launch, its size arguments ((N, C, S/vec) or (M, C/vec)), and its workspace: the partials (2
    floats per channel of a lane, plus ``count_words`` for a count the lane's channels share) and the arrival
    counters."""
    vec = plan.vector_width(lay, _aligned(*arrays))
    launch, run = _planned(cp, file, stem, lay, vec, lambda slots: plan.reduction_launch(lay, vec, slots, blocks))
    if lay.kind == "ncs":   # one lane of one channel per partial
        words, dims = 2 + count_words, (np.int32(lay.N), np.int32(lay.C), np.int32(lay.S // vec))
    else:                   # bx lanes of vec channels
        words, dims = launch.block[0] * (2 * vec + count_words), (np.int32(lay.N), np.int32(lay.C // vec))
    partials = _empty(cp, words * launch.partial_slots)
    return run, dims, (partials, _counters(cp, launch.counters))


def _affine(cp, x, lay, mean, stat, gamma, beta, eps, stat_is_var):
    """y = x * a + b with a = gamma * rstd, b = beta - mean * a (rstd = stat, or 1/sqrt(stat + eps))."""
    y = _empty(cp, x.shape)
    run, dims = _elementwise(cp, "bn_affine.cu", "bn_affine", lay, (x, y))
    run((x, y, *dims, mean, stat, gamma, beta, np.float32(eps), np.int32(stat_is_var)))
    return y


def batchnorm_forward_gpu(x, gamma, beta, running_mean=None, running_var=None, momentum=0.1, eps=1e-5,
                          layout="NCHW", blocks=None):
    """Training-mode batch norm on the GPU: one statistics launch, one elementwise launch.

    Args:
        x: float32 cupy array, (N, C, ...) for "NCHW" or (..., C) for "NHWC",
            with at least 2 values per channel.
        gamma, beta: (C,) scale and shift.
        running_mean, running_var: optional (C,) float32 cupy buffers, updated in
            place in PyTorch's convention (``momentum`` weighs the new batch
            statistic; the variance averaged is the unbiased one).
        blocks: override the planner's number of blocks of the statistics grid (tests use it to split
            channels over several blocks and force a grid-level merge).

    Returns:
        out: like x. cache: a :class:`GPUCache`.
    """
    cp = _cupy()
    x, lay = _input(cp, x, layout)
    if lay.per_channel < 2:
        raise ValueError(f"batch norm in training mode needs at least 2 values per channel; got x of shape {x.shape}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (PyTorch's convention, weight of the new batch); got {momentum}")
    gamma, beta = _param(cp, gamma, lay.C, "gamma"), _param(cp, beta, lay.C, "beta")
    update = running_mean is not None or running_var is not None
    mean, rstd = _empty(cp, lay.C), _empty(cp, lay.C)
    if update:
        running_mean = _buffer(cp, running_mean, lay.C, "running_mean")
        running_var = _buffer(cp, running_var, lay.C, "running_var")
    else:  # never touched by the kernel when update_running is 0
        running_mean, running_var = mean, rstd
    run, dims, workspace = _reduction(cp, "bn_forward.cu", "bn_forward_stats", lay, (x,), 1, blocks)
    run((x, *dims, np.float32(eps), np.float32(momentum), np.int32(update), mean, rstd, running_mean, running_var,
         *workspace))
    out = _affine(cp, x, lay, mean, rstd, gamma, beta, eps, stat_is_var=0)
    return out, GPUCache(x, gamma, mean, rstd, lay)


def batchnorm_inference_gpu(x, gamma, beta, running_mean, running_var, eps=1e-5, layout="NCHW"):
    """Eval-mode batch norm on the GPU: one elementwise launch that folds the running statistics itself.

    Returns:
        out: like x (float32).
    """
    cp = _cupy()
    x, lay = _input(cp, x, layout)
    params = [_param(cp, p, lay.C, n) for p, n in ((gamma, "gamma"), (beta, "beta"), (running_mean, "running_mean"),
                                                  (running_var, "running_var"))]
    gamma, beta, running_mean, running_var = params
    return _affine(cp, x, lay, running_mean, running_var, gamma, beta, eps, stat_is_var=1)


def batchnorm_backward_gpu(dout, cache, blocks=None):
    """Backward of :func:`batchnorm_forward_gpu`: one reduction launch, one elementwise launch.

    Args:
        dout: float32 cupy array shaped like the forward's input.
        cache: the forward's :class:`GPUCache`.
        blocks: override the planner's number of blocks of the reduction grid, as in the forward.

    Returns:
        dx (like x), dgamma (C,), dbeta (C,).
    """
    cp = _cupy()
    x, lay = cache.x, cache.layout
    if not isinstance(dout, cp.ndarray) or dout.shape != x.shape or dout.dtype != cp.float32:
        raise ValueError(f"dout must be a float32 cupy array of the forward's shape {x.shape}; "
                         f"got {getattr(dout, 'shape', type(dout).__name__)}")
    dout = cp.ascontiguousarray(dout)
    C = lay.C
    dgamma, dbeta, coef = _empty(cp, C), _empty(cp, C), _empty(cp, 3 * C)
    run, dims, workspace = _reduction(cp, "bn_backward.cu", "bn_backward_reduce", lay, (dout, x), 0, blocks)
    run((dout, x, *dims, cache.mean, cache.rstd, cache.gamma, dgamma, dbeta, coef, *workspace))
    dx = _empty(cp, x.shape)
    run, dims = _elementwise(cp, "bn_backward.cu", "bn_backward_dx", lay, (dout, x, dx))
    run((dout, x, dx, *dims, cache.mean, coef))
    return dx, dgamma, dbeta


def channel_moments_gpu(x):
    """Per-channel mean and biased variance of an (N, C, ...) float32 cupy array, by the simple two-pass
    kernel ``bn_channel_moments_ncs`` (one block per channel).

    Returns:
        mean, var: (C,) float32 cupy arrays.
    """
    cp = _cupy()
    x, _ = _input(cp, x, "NCHW")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, ...); got {x.shape}")
    N, C, S = x.shape[0], x.shape[1], int(np.prod(x.shape[2:], dtype=np.int64))
    mean, var = cp.empty(C, cp.float32), cp.empty(C, cp.float32)
    _kernel(cp, "bn_reduce.cu", "bn_channel_moments_ncs")((C, 1, 1), (plan.THREADS, 1, 1),
                                                           (x, np.int32(N), np.int32(C), np.int32(S), mean, var))
    return mean, var
