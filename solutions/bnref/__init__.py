"""bnref: NumPy reference implementations for *Batch Normalization, from scratch to GPU*.

Layers follow the CS231n convention ``forward -> (out, cache)``,
``backward(dout, cache)``. PyTorch is the ground truth in the tests.
"""
from . import data
from .backward import batchnorm_backward, batchnorm_backward_alt, batchnorm_inference_backward
from .forward import batchnorm_forward, batchnorm_inference, update_running_stats
from .gradcheck import eval_numerical_gradient, rel_error
from .layers import BatchNorm1d
from .norms import groupnorm_backward, groupnorm_forward, layernorm_backward, layernorm_forward
from .dropout import dropout_backward, dropout_forward
from .progress import progress
from .syncbn import merge_moments, shard_moments, syncbn_backward, syncbn_forward
from .spatial import (BatchNorm2d, fold_batchnorm, spatial_batchnorm_backward, spatial_batchnorm_forward,
                      spatial_batchnorm_inference)

__all__ = [
    "batchnorm_forward", "batchnorm_inference", "update_running_stats",
    "batchnorm_backward", "batchnorm_backward_alt", "batchnorm_inference_backward", "BatchNorm1d",
    "eval_numerical_gradient", "rel_error",
    "spatial_batchnorm_forward", "spatial_batchnorm_backward", "spatial_batchnorm_inference", "BatchNorm2d",
    "fold_batchnorm", "dropout_forward", "dropout_backward", "progress",
    "layernorm_forward", "layernorm_backward", "groupnorm_forward", "groupnorm_backward",
    "merge_moments", "shard_moments", "syncbn_forward", "syncbn_backward",
]
