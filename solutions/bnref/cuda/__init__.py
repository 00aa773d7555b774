"""bnref.cuda: the CUDA kernels of chapter 5, their CuPy wrappers, and a NumPy mirror of their reduction tree.

The kernel sources are the ``.cu`` files next to this module (with the shared
header ``bn_common.cuh``). :func:`kernel_source` returns the one string that
both CuPy (NVRTC, at run time) and the tests (``nvcc``, without a GPU)
compile. The wrappers import CuPy lazily and raise ``RuntimeError`` on a
machine without a CUDA GPU; :mod:`bnref.cuda.mirror` and
:mod:`bnref.cuda.plan` need NumPy only.
"""
import re
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
HEADER = "bn_common.cuh"
#: kernel file -> the extern "C" kernels it defines
KERNELS = {
    "bn_affine.cu": ("bn_affine_ncs", "bn_affine_ncs_vec4", "bn_affine_mc", "bn_affine_mc_vec4"),
    "bn_reduce.cu": ("bn_channel_moments_ncs",),
    "bn_forward.cu": ("bn_forward_stats_ncs", "bn_forward_stats_ncs_vec4", "bn_forward_stats_mc",
                      "bn_forward_stats_mc_vec4"),
    "bn_backward.cu": ("bn_backward_reduce_ncs", "bn_backward_reduce_ncs_vec4", "bn_backward_reduce_mc",
                       "bn_backward_reduce_mc_vec4", "bn_backward_dx_ncs", "bn_backward_dx_ncs_vec4",
                       "bn_backward_dx_mc", "bn_backward_dx_mc_vec4"),
}
#: options of every compilation (NVRTC through CuPy, and nvcc in the tests)
COMPILE_OPTIONS = ("-std=c++17",)

_INCLUDE = re.compile(r'^#include "' + re.escape(HEADER) + r'"\n', re.M)


def raw_source(name):
    """The text of one file of this package (a ``.cu`` kernel file or the header), as written."""
    return (SOURCE_DIR / name).read_text()


def kernel_source(name):
    """The complete source of kernel file ``name``: the file with the shared header pasted in place of its include.

    Self-contained on purpose: CuPy caches compiled kernels by the hash of this
    string, so a change to the header must change the string.
    """
    if name not in KERNELS:
        raise KeyError(f"unknown kernel file {name!r}; one of {sorted(KERNELS)}")
    header = f'#line 1 "{HEADER}"\n' + raw_source(HEADER)
    text = raw_source(name)
    match = _INCLUDE.search(text)
    line_after = text.count("\n", 0, match.end()) + 1
    return text[:match.start()] + header + f'\n#line {line_after} "{name}"\n' + text[match.end():]


from .gpu import (GPUCache, batchnorm_backward_gpu, batchnorm_forward_gpu, batchnorm_inference_gpu,  # noqa: E402
                  channel_moments_gpu, gpu_available, NO_GPU_MESSAGE)

__all__ = ["KERNELS", "kernel_source", "raw_source", "gpu_available", "NO_GPU_MESSAGE", "GPUCache",
           "batchnorm_forward_gpu", "batchnorm_inference_gpu", "batchnorm_backward_gpu", "channel_moments_gpu"]
