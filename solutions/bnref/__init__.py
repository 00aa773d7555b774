"""bnref: NumPy reference implementations for *Batch Normalization, from scratch to GPU*.

Layers follow the CS231n convention ``forward -> (out, cache)``,
``backward(dout, cache)``. PyTorch is the ground truth in the tests.
"""
from . import data
from .backward import batchnorm_backward, batchnorm_backward_alt
from .forward import batchnorm_forward, batchnorm_inference, update_running_stats
from .layers import BatchNorm1d

__all__ = [
    "batchnorm_forward", "batchnorm_inference", "update_running_stats",
    "batchnorm_backward", "batchnorm_backward_alt", "BatchNorm1d",
]
