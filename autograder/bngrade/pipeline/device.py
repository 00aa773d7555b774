"""GPU assignments: which ones need a CUDA GPU to be graded, and running a student's GPU code on test data.

Grading a GPU assignment on a machine without a GPU would give every student
0 (each test cell fails on ``import cupy`` or on its first kernel), so
:func:`require_device` refuses it up front, before any submission is
collected. A hung GPU kernel cannot be interrupted from inside the notebook's
kernel, so GPU notebooks get a shorter hard wall-clock limit; the whole
process group is then killed (``Course.nbgrader``), and the driver frees the GPU.

This module must not import ``bnref``: :func:`on_device` wraps student code,
and the hidden tests reject functions whose module reaches the reference package.
"""
from contextlib import contextmanager

import numpy as np

from bngrade.pipeline.intake import Problem

#: assignments whose notebooks run CUDA kernels through CuPy
GPU_ASSIGNMENTS = frozenset({"ch05_cupy_kernels"})
#: hard wall-clock limit of one GPU notebook, seconds (CPU notebooks: grading.NOTEBOOK_WALL_SECONDS)
GPU_NOTEBOOK_WALL_SECONDS = 300


def gpu_available():
    """True when CuPy imports and sees a usable CUDA device on this machine."""
    try:
        import cupy
        return bool(cupy.is_available())
    except Exception:  # no cupy, no driver, no device
        return False


def require_device(assignment):
    """Raise :class:`Problem` when ``assignment`` needs a GPU and this machine has none."""
    if assignment in GPU_ASSIGNMENTS and not gpu_available():
        raise Problem(
            f"{assignment} is a GPU assignment: its notebooks run CUDA kernels with CuPy, and this machine has "
            "no usable CUDA GPU (cupy.is_available() is False). Nothing was collected or graded; grading it here "
            "would give every student 0. Run the same command on a machine with an NVIDIA GPU and cupy-cuda12x."
        )


_DEVICE = []  # the xp that default_xp() gives inside default_device()


@contextmanager
def default_device(xp):
    """Within the block, :func:`default_xp` is ``xp`` (the judge's stand-in, which marks data for the sandbox's GPU)."""
    _DEVICE.append(xp)
    try:
        yield xp
    finally:
        _DEVICE.pop()


def default_xp():
    """The array module the GPU checks use unless told otherwise: CuPy (or the judge's stand-in)."""
    if _DEVICE:
        return _DEVICE[-1]
    import cupy
    return cupy


def to_numpy(value):
    """A result with every CuPy array (anything with ``.get()``) copied to NumPy; tuples stay tuples."""
    if isinstance(value, (tuple, list)):
        return tuple(to_numpy(v) for v in value)
    if hasattr(value, "get") and hasattr(value, "shape"):
        return value.get()
    return value


def on_device(student, xp):
    """``student`` called with NumPy test data moved to ``xp`` arrays, its results moved back to NumPy."""
    def run(*args):
        moved = tuple(xp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
        return to_numpy(student(*moved))

    run.__name__ = getattr(student, "__name__", "student")
    return run
