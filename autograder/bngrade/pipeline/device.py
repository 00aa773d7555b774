"""GPU assignments: which ones need a CUDA GPU to be graded, and the wall clock of their notebooks.

Grading a GPU assignment on a machine without a GPU would give every student
0 (each test cell fails on ``import cupy`` or on its first kernel), so
:func:`require_device` refuses it up front, before any submission is
collected. A hung GPU kernel cannot be interrupted from inside the notebook's
kernel, so GPU notebooks get a shorter hard wall-clock limit; the whole
process group is then killed (``Course.nbgrader``), and the driver frees the GPU.

The hidden checks move their inputs to the GPU in the sandbox (:mod:`bncapture.ch05`); nothing here runs
student code.
"""
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
