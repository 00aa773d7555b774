"""Batch norm forward pass for fully connected layers, x of shape (N, D).

Equations (1)-(4) of Ioffe & Szegedy (2015):

    mu    = mean_i x_i                       (D,)
    var   = mean_i (x_i - mu)^2              (D,)  biased: divides by N
    x_hat = (x - mu) / sqrt(var + eps)       (N, D)
    out   = gamma * x_hat + beta             (N, D)

The statistics use two passes (mean first, then squared deviations), so
float32 stays accurate even when |mean| / std is 1e4; the one-pass
E[x^2] - E[x]^2 form would cancel catastrophically there.
"""
from typing import NamedTuple

import numpy as np

from ._checks import check_2d, check_batch, check_param
from ._kernels import batch_moments, scale_shift


class BNCache(NamedTuple):
    """What the training forward pass keeps for the backward pass."""

    x: np.ndarray  # (N, D) inputs
    gamma: np.ndarray  # (D,) scale
    mean: np.ndarray  # (D,) batch mean
    var: np.ndarray  # (D,) biased batch variance
    rstd: np.ndarray  # (D,) 1 / sqrt(var + eps)


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Training-mode batch norm.

    Args:
        x: (N, D) inputs, N >= 2.
        gamma, beta: (D,) scale and shift.
        eps: added to the variance inside the square root.

    Returns:
        out: (N, D) normalized, scaled and shifted inputs.
        cache: a :class:`BNCache` ``(x, gamma, mean, var, rstd)``.
    """
    x = check_2d(x)
    n, d = x.shape
    check_batch(n)
    gamma = check_param(gamma, d, "gamma")
    beta = check_param(beta, d, "beta")
    mean, var = batch_moments(x)
    rstd = 1.0 / np.sqrt(var + eps)
    a = gamma * rstd
    out = scale_shift(x, a, beta - mean * a)
    return out, BNCache(x, gamma, mean, var, rstd)


def batchnorm_inference(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Eval-mode batch norm: normalize with the running statistics.

    Args:
        x: (N, D) inputs (N may be 1).
        gamma, beta, running_mean, running_var: (D,).

    Returns:
        out: (N, D).
    """
    x = check_2d(x)
    d = x.shape[1]
    gamma = check_param(gamma, d, "gamma")
    beta = check_param(beta, d, "beta")
    running_mean = check_param(running_mean, d, "running_mean")
    running_var = check_param(running_var, d, "running_var")
    a = gamma / np.sqrt(running_var + eps)
    return scale_shift(x, a, beta - running_mean * a)


def update_running_stats(running_mean, running_var, x, momentum=0.1):
    """Exponential moving averages of the batch statistics, PyTorch's convention.

        new = (1 - momentum) * old + momentum * batch_stat

    ``momentum=0.1`` here is Keras/TF ``momentum=0.9`` (Keras weights the old
    value). The variance that enters the average is the *unbiased* batch
    variance (divides by N - 1), as in PyTorch and Algorithm 2 of Ioffe &
    Szegedy; the forward pass itself normalizes with the biased one.

    Args:
        running_mean, running_var: (D,) current estimates (not modified).
        x: (N, D) the batch, N >= 2.
        momentum: weight of the new batch statistic, in [0, 1].

    Returns:
        (new_mean, new_var), each (D,).
    """
    x = check_2d(x)
    n, d = x.shape
    check_batch(n)
    running_mean = check_param(running_mean, d, "running_mean")
    running_var = check_param(running_var, d, "running_var")
    mean, var = batch_moments(x)
    return ema_update(running_mean, running_var, mean, var, n, momentum)


def ema_update(running_mean, running_var, mean, var, n, momentum):
    """The moving-average step of :func:`update_running_stats`, from batch moments.

    Args:
        running_mean, running_var, mean: (D,).
        var: (D,) *biased* variance of a batch of ``n`` samples.

    Returns:
        (new_mean, new_var), each (D,), in the dtype of the running buffers.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] in PyTorch's convention (weight of the new batch); got {momentum}. "
            "Keras' momentum=0.99 is PyTorch's momentum=0.01."
        )
    unbiased = var * (n / (n - 1))
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * unbiased
    return new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)
