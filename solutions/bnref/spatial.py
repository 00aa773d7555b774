"""Batch norm for convolutional layers, x of shape (N, C, H, W), and BN folding.

A convolution applies the same filter at every position, so its BN keeps one
mean, one variance, one gamma and one beta per *channel*: the statistics of
channel c run over the N * H * W values x[:, c, :, :]. With the channel axis
moved last and the other three flattened, that is exactly the (N, D) batch
norm of :mod:`bnref.forward` with D = C and N * H * W rows:

    (N, C, H, W) --move C last--> (N, H, W, C) --flatten--> (N*H*W, C)

Flattening *without* moving C first (``x.reshape(-1, C)``) is the classic
bug: each row then holds C consecutive values of one channel's image, so
every "feature" column mixes pixels from all channels.
"""
from typing import NamedTuple

import numpy as np

from ._checks import check_4d, check_param
from .backward import batchnorm_backward_alt
from .forward import BNCache, batchnorm_forward, batchnorm_inference
from .layers import BatchNorm1d


def nchw_to_rows(x):
    """(N, C, H, W) -> (N*H*W, C): one row per (sample, position), one column per channel."""
    c = x.shape[1]
    return np.moveaxis(x, 1, -1).reshape(-1, c)


def rows_to_nchw(rows, shape):
    """Inverse of :func:`nchw_to_rows` for an array of NCHW ``shape``."""
    n, c, h, w = shape
    return np.moveaxis(rows.reshape(n, h, w, c), -1, 1)


class SpatialCache(NamedTuple):
    """What :func:`spatial_batchnorm_forward` keeps for the backward pass."""

    rows: BNCache  # the cache of the (N*H*W, C) batch norm
    shape: tuple  # (N, C, H, W)


def _check_channels(x, params):
    """Validate a 4-D ``x`` and per-channel ``params`` {name: array}; returns x."""
    x = check_4d(x)
    for name, p in params.items():
        check_param(p, x.shape[1], name, letter="C")
    return x


def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Training-mode batch norm of an NCHW batch, statistics per channel over (N, H, W).

    Args:
        x: (N, C, H, W) inputs with N * H * W >= 2.
        gamma, beta: (C,) scale and shift (2 * C parameters).
        eps: added to the variance inside the square root.

    Returns:
        out: (N, C, H, W).
        cache: a :class:`SpatialCache` for :func:`spatial_batchnorm_backward`.
    """
    x = _check_channels(x, {"gamma": gamma, "beta": beta})
    out, cache = batchnorm_forward(nchw_to_rows(x), gamma, beta, eps)
    return rows_to_nchw(out, x.shape), SpatialCache(cache, x.shape)


def spatial_batchnorm_backward(dout, cache):
    """Gradients of :func:`spatial_batchnorm_forward`.

    Args:
        dout: (N, C, H, W) upstream gradient.
        cache: the :class:`SpatialCache` of the forward pass.

    Returns:
        dx: (N, C, H, W); dgamma, dbeta: (C,).
    """
    dout = check_4d(dout, "dout")
    if dout.shape != tuple(cache.shape):
        raise ValueError(f"dout must have the shape of x, {tuple(cache.shape)}; got {dout.shape}")
    dx, dgamma, dbeta = batchnorm_backward_alt(nchw_to_rows(dout), cache.rows)
    return rows_to_nchw(dx, cache.shape), dgamma, dbeta


def spatial_batchnorm_inference(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Eval-mode batch norm of an NCHW batch with per-channel running statistics.

    Args:
        x: (N, C, H, W); gamma, beta, running_mean, running_var: (C,).

    Returns:
        out: (N, C, H, W).
    """
    x = _check_channels(x, {"gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var})
    out = batchnorm_inference(nchw_to_rows(x), gamma, beta, running_mean, running_var, eps)
    return rows_to_nchw(out, x.shape)


class BatchNorm2d(BatchNorm1d):
    """NumPy twin of ``torch.nn.BatchNorm2d`` for (N, C, H, W) inputs.

    Same attributes as :class:`bnref.BatchNorm1d`, all of shape (C,). The
    running variance averages the unbiased variance of the N * H * W values of
    each channel, as PyTorch does.
    """

    def forward(self, x):
        """Normalize an (N, C, H, W) batch; returns (N, C, H, W)."""
        x = _check_channels(x, {"gamma": self.gamma})
        return rows_to_nchw(super().forward(nchw_to_rows(x)), x.shape)

    __call__ = forward

    def backward(self, dout):
        """Backward of the last :meth:`forward` for an (N, C, H, W) ``dout``; sets dgamma, dbeta (C,)."""
        dout = check_4d(dout, "dout")
        return rows_to_nchw(super().backward(nchw_to_rows(dout)), dout.shape)


def fold_batchnorm(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
    """Fold an eval-mode batch norm into the conv or linear layer before it.

    In eval mode BN is the per-channel affine map ``y = a * z + b`` with
    ``a = gamma / sqrt(running_var + eps)`` and ``b = beta - a * running_mean``.
    Applied to ``z = W * x + bias`` it gives a layer with weight ``a * W``
    (each output channel's filter scaled by its own ``a``) and bias
    ``a * (bias - running_mean) + beta``.

    Args:
        weight: (C_out, ...) conv weight (C_out, C_in, kH, kW) or linear weight (C_out, C_in).
        bias: (C_out,) or None (no bias: zeros).
        gamma, beta, running_mean, running_var: (C_out,) the BN layer's parameters and buffers.
        eps: the BN layer's eps.

    Returns:
        (weight, bias) of the folded layer, shapes (C_out, ...) and (C_out,), in weight's dtype.
    """
    weight = np.asarray(weight)
    if weight.ndim < 2:
        raise ValueError(f"weight must have shape (C_out, C_in, ...); got an array of shape {weight.shape}")
    c_out = weight.shape[0]
    bias = np.zeros(c_out, dtype=weight.dtype) if bias is None else check_param(bias, c_out, "bias", "C_out")
    params = {"gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var}
    gamma, beta, running_mean, running_var = (check_param(p, c_out, name, "C_out") for name, p in params.items())
    a = gamma / np.sqrt(running_var + eps)
    folded_weight = weight * a.reshape((c_out,) + (1,) * (weight.ndim - 1))
    folded_bias = (bias - running_mean) * a + beta
    return folded_weight.astype(weight.dtype, copy=False), folded_bias.astype(weight.dtype, copy=False)
