"""Layer norm and group norm: batch norm's statistics taken per sample instead of per batch.

Both normalize *rows* of a 2-D view of x, each row with its own mean and
biased variance, then apply a learned affine map:

* layer norm (Ba et al., 2016), x of shape (N, D): one row per sample, over
  its D features; gamma, beta (D,), as ``torch.nn.LayerNorm(D)``;
* group norm (Wu & He, 2018), x of shape (N, C, H, W) with C split into G
  groups of C/G consecutive channels: one row per (sample, group), over its
  C/G * H * W values; gamma, beta (C,) per channel, as
  ``torch.nn.GroupNorm(G, C)``. G = C is instance norm, G = 1 is layer norm
  over (C, H, W) with per-channel gamma and beta.

Neither uses the batch axis, so there are no running statistics and a batch
of one sample is fine. The row statistics are accumulated in float64 (two
passes), so float32 stays accurate when |mean| / std is 1e3 or more; the
outputs keep the input's dtype.
"""
from numbers import Integral
from typing import NamedTuple

import numpy as np

from ._checks import check_2d, check_4d, check_param, check_upstream


class NormCache(NamedTuple):
    """What :func:`layernorm_forward` and :func:`groupnorm_forward` keep for the backward pass."""

    x_hat: np.ndarray  # normalized input, the shape of x: (N, D) or (N, C, H, W)
    gamma: np.ndarray  # scale, broadcast against x_hat: (D,) for LN, (C, 1, 1) for GN
    rstd: np.ndarray  # (R, 1) 1 / sqrt(var + eps) of each row: R = N for LN, N * G for GN


def normalize_rows(rows, eps):
    """Normalize each row of an (R, M) array by its own mean and biased variance.

    Returns:
        x_hat: (R, M) ``(rows - mean) / sqrt(var + eps)``, in the dtype of ``rows``.
        rstd: (R, 1) ``1 / sqrt(var + eps)``.
    """
    rows = rows.astype(np.result_type(rows.dtype, np.float16), copy=False)
    mean = rows.mean(axis=1, keepdims=True, dtype=np.float64).astype(rows.dtype)
    dev = rows - mean
    var = np.mean(dev * dev, axis=1, keepdims=True, dtype=np.float64).astype(rows.dtype)
    rstd = 1.0 / np.sqrt(var + eps)
    return dev * rstd, rstd


def normalize_rows_backward(dx_hat, x_hat, rstd):
    """Backward of :func:`normalize_rows`: (R, M) gradients w.r.t. x_hat -> w.r.t. the rows.

        drows = rstd * (dx_hat - mean_j(dx_hat) - x_hat * mean_j(dx_hat * x_hat))

    Args:
        dx_hat, x_hat: (R, M); rstd: (R, 1).
    """
    return rstd * (dx_hat - dx_hat.mean(axis=1, keepdims=True)
                   - x_hat * (dx_hat * x_hat).mean(axis=1, keepdims=True))


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """Layer norm: each sample normalized over its D features.

    Args:
        x: (N, D) inputs; any N >= 1 (D = 1 gives ``out = beta``).
        gamma, beta: (D,) scale and shift.
        eps: added to the variance inside the square root.

    Returns:
        out: (N, D).
        cache: a :class:`NormCache` for :func:`layernorm_backward`.
    """
    x = check_2d(x)
    d = x.shape[1]
    gamma = check_param(gamma, d, "gamma")
    beta = check_param(beta, d, "beta")
    x_hat, rstd = normalize_rows(x, eps)
    return gamma * x_hat + beta, NormCache(x_hat, gamma, rstd)


def layernorm_backward(dout, cache):
    """Gradients of :func:`layernorm_forward`, closed form per sample.

    Args:
        dout: (N, D) upstream gradient.
        cache: the :class:`NormCache` of the forward pass.

    Returns:
        dx: (N, D); dgamma, dbeta: (D,).
    """
    x_hat, gamma, rstd = cache
    dout = check_upstream(dout, x_hat.shape)
    dx = normalize_rows_backward(dout * gamma, x_hat, rstd)
    return dx, (dout * x_hat).sum(axis=0), dout.sum(axis=0)


def check_groups(c, groups):
    """Check that ``groups`` is a positive int that divides the C channels."""
    if isinstance(groups, bool) or not isinstance(groups, Integral) or groups < 1:
        raise ValueError(f"groups must be a positive int; got {groups!r}")
    if c % groups:
        raise ValueError(f"C = {c} channels cannot be split into groups = {groups} equal groups "
                         f"(groups must divide C)")


def groupnorm_forward(x, gamma, beta, groups, eps=1e-5):
    """Group norm: each (sample, group of C/G channels) normalized over its C/G * H * W values.

    Args:
        x: (N, C, H, W) inputs; any N >= 1.
        gamma, beta: (C,) per-channel scale and shift.
        groups: G, a positive int dividing C.
        eps: added to the variance inside the square root.

    Returns:
        out: (N, C, H, W).
        cache: a :class:`NormCache` for :func:`groupnorm_backward`.
    """
    x = check_4d(x)
    n, c = x.shape[:2]
    check_groups(c, groups)
    gamma = check_param(gamma, c, "gamma", letter="C").reshape(c, 1, 1)
    beta = check_param(beta, c, "beta", letter="C").reshape(c, 1, 1)
    x_hat, rstd = normalize_rows(x.reshape(n * groups, -1), eps)
    x_hat = x_hat.reshape(x.shape)
    return gamma * x_hat + beta, NormCache(x_hat, gamma, rstd)


def groupnorm_backward(dout, cache):
    """Gradients of :func:`groupnorm_forward`.

    Args:
        dout: (N, C, H, W) upstream gradient.
        cache: the :class:`NormCache` of the forward pass.

    Returns:
        dx: (N, C, H, W); dgamma, dbeta: (C,).
    """
    x_hat, gamma, rstd = cache
    dout = check_4d(dout, "dout")
    if dout.shape != x_hat.shape:
        raise ValueError(f"dout must have the shape of x, (N, C, H, W) = {x_hat.shape}; got {dout.shape}")
    rows = (rstd.shape[0], -1)
    dx = normalize_rows_backward((dout * gamma).reshape(rows), x_hat.reshape(rows), rstd)
    return dx.reshape(x_hat.shape), (dout * x_hat).sum(axis=(0, 2, 3)), dout.sum(axis=(0, 2, 3))
