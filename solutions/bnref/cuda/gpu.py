"""CuPy wrappers around the chapter-5 kernels: batch norm forward (training and inference) and backward, float32.

CuPy is imported only when a wrapper runs. Without a CUDA GPU every wrapper
raises ``RuntimeError`` with :data:`NO_GPU_MESSAGE`; nothing here falls back
silently to the CPU.

Layouts: ``layout="NCHW"`` takes (N, C) or (N, C, *spatial) with channels on
axis 1; ``layout="NHWC"`` takes (..., C) with channels last. Statistics are
per channel over every other axis, as in ``torch.nn.BatchNorm1d/2d``.
"""
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
_COUNTERS = {}


def _kernel(cp, file, name):
    """The compiled kernel ``name`` of ``file`` (NVRTC compiles each file once per process and device)."""
    from . import COMPILE_OPTIONS, kernel_source

    key = (cp.__name__, file)
    if key not in _MODULES:
        _MODULES[key] = cp.RawModule(code=kernel_source(file), options=COMPILE_OPTIONS)
    return _MODULES[key].get_function(name)


def _sm_count(cp):
    dev = (cp.__name__, cp.cuda.Device().id)
    if dev not in _SM_COUNT:
        _SM_COUNT[dev] = int(cp.cuda.runtime.getDeviceProperties(dev[1])["multiProcessorCount"])
    return _SM_COUNT[dev]


def _counters(cp, n):
    """Arrival counters of the grid-level merge: zero between launches (the last block resets its own).

    One zeroed buffer per device is kept and grown; kernels sharing it must run on one stream.
    """
    dev = (cp.__name__, cp.cuda.Device().id)
    if dev not in _COUNTERS or _COUNTERS[dev].size < n:
        _COUNTERS[dev] = cp.zeros(max(n, 1024), dtype=cp.uint32)
    return _COUNTERS[dev]


def _input(cp, x, layout, name="x"):
    if not isinstance(x, cp.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray on the GPU (cupy.asarray(...)); got {type(x).__name__}")
    if x.dtype != cp.float32:
        raise TypeError(f"{name} must be float32 (the kernels are float32); got {x.dtype}")
    lay = plan.layout_of(x.shape, layout)
    if lay.kind == "ncs" and lay.C > plan.MAX_GRID_Y:
        raise ValueError(f"at most {plan.MAX_GRID_Y} channels in the NCHW layout; got C = {lay.C}")
    if lay.per_channel >= 2**31 or (lay.kind == "mc" and lay.N >= 2**31):
        raise ValueError(f"at most 2**31 - 1 values per channel; got {lay.per_channel}")
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


def _aligned(*arrays):
    return all(a.data.ptr % 16 == 0 for a in arrays)


class GPUCache(NamedTuple):
    """What the training forward pass keeps for :func:`batchnorm_backward_gpu` (all on the GPU)."""

    x: object       # the input, C-contiguous float32
    gamma: object   # (C,)
    mean: object    # (C,) batch mean
    rstd: object    # (C,) 1 / sqrt(biased batch variance + eps)
    layout: plan.Layout


def _affine(cp, x, lay, mean, stat, gamma, beta, eps, stat_is_var):
    """y = x * a + b with a = gamma * rstd, b = beta - mean * a (rstd = stat, or 1/sqrt(stat + eps))."""
    y = cp.empty_like(x)
    vec = plan.vector_width(lay, _aligned(x, y))
    grid, block = plan.elementwise_launch(lay, vec, _sm_count(cp))
    suffix = "_vec4" if vec == 4 else ""
    if lay.kind == "ncs":
        name, dims = "bn_affine_ncs" + suffix, (np.int64(lay.N * lay.C), np.int32(lay.C), np.int32(lay.S // vec))
    else:
        name, dims = "bn_affine_mc" + suffix, (np.int64(lay.N), np.int32(lay.C // vec))
    _kernel(cp, "bn_affine.cu", name)(grid, block, (x, y, *dims, mean, stat, gamma, beta, np.float32(eps),
                                                    np.int32(stat_is_var)))
    return y


def _dims(lay):
    """The size arguments of the reduction kernels: (N, C, S) or (M, C)."""
    if lay.kind == "ncs":
        return np.int32(lay.N), np.int32(lay.C), np.int32(lay.S)
    return np.int32(lay.N), np.int32(lay.C)


def batchnorm_forward_gpu(x, gamma, beta, running_mean=None, running_var=None, momentum=0.1, eps=1e-5,
                          layout="NCHW", blocks_per_channel=None):
    """Training-mode batch norm on the GPU: one statistics launch, one elementwise launch.

    Args:
        x: float32 cupy array, (N, C, ...) for "NCHW" or (..., C) for "NHWC",
            with at least 2 values per channel.
        gamma, beta: (C,) scale and shift.
        running_mean, running_var: optional (C,) float32 cupy buffers, updated in
            place in PyTorch's convention (``momentum`` weighs the new batch
            statistic; the variance averaged is the unbiased one).
        blocks_per_channel: override the planner's G (tests use it to force a grid-level merge).

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
    mean, rstd = cp.empty(lay.C, cp.float32), cp.empty(lay.C, cp.float32)
    if update:
        running_mean = _buffer(cp, running_mean, lay.C, "running_mean")
        running_var = _buffer(cp, running_var, lay.C, "running_var")
    else:  # never touched by the kernel when update_running is 0
        running_mean, running_var = mean, rstd
    launch = plan.reduction_launch(lay, _sm_count(cp), blocks_per_channel)
    partials = cp.empty(3 * lay.C * launch.G, cp.float32)
    kernel = _kernel(cp, "bn_forward.cu", f"bn_forward_stats_{lay.kind}")
    kernel(launch.grid, launch.block, (x, *_dims(lay), np.float32(eps), np.float32(momentum), np.int32(update),
                                       mean, rstd, running_mean, running_var, partials,
                                       _counters(cp, launch.counters)))
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


def batchnorm_backward_gpu(dout, cache):
    """Backward of :func:`batchnorm_forward_gpu`: one reduction launch, one elementwise launch.

    Args:
        dout: float32 cupy array shaped like the forward's input.
        cache: the forward's :class:`GPUCache`.

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
    dgamma, dbeta, coef = cp.empty(C, cp.float32), cp.empty(C, cp.float32), cp.empty(3 * C, cp.float32)
    launch = plan.reduction_launch(lay, _sm_count(cp))
    partials = cp.empty(2 * C * launch.G, cp.float32)
    reduce = _kernel(cp, "bn_backward.cu", f"bn_backward_reduce_{lay.kind}")
    reduce(launch.grid, launch.block, (dout, x, *_dims(lay), cache.mean, cache.rstd, cache.gamma, dgamma, dbeta, coef,
                                       partials, _counters(cp, launch.counters)))
    dx = cp.empty_like(x)
    vec = plan.vector_width(lay, _aligned(dout, x, dx))
    grid, block = plan.elementwise_launch(lay, vec, _sm_count(cp))
    suffix = "_vec4" if vec == 4 else ""
    if lay.kind == "ncs":
        dims = (np.int64(lay.N * lay.C), np.int32(C), np.int32(lay.S // vec))
    else:
        dims = (np.int64(lay.N), np.int32(C // vec))
    _kernel(cp, "bn_backward.cu", f"bn_backward_dx_{lay.kind}{suffix}")(grid, block,
                                                                        (dout, x, dx, *dims, cache.mean, coef))
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
