"""Batch norm backward pass for (N, D) inputs, from the cache of :func:`batchnorm_forward`.

Two versions with the same result:

* :func:`batchnorm_backward` walks the computational graph of the forward
  pass one node at a time (the way autograd does);
* :func:`batchnorm_backward_alt` uses the closed form

      dx = gamma * rstd / N * (N * dout - sum(dout) - x_hat * sum(dout * x_hat))

  which needs two per-feature reductions and one elementwise pass.

In eval mode the statistics are the running buffers, constants, and
:func:`batchnorm_inference_backward` is the backward of a per-feature affine map.
"""
import numpy as np

from ._checks import check_2d, check_param, check_upstream
from ._kernels import centered_dot, column_sum, two_term_affine


def batchnorm_backward(dout, cache):
    """Staged backward through the graph mean -> centre -> variance -> rstd -> normalize -> affine.

    Args:
        dout: (N, D) upstream gradient.
        cache: the ``BNCache`` from the forward pass.

    Returns:
        dx: (N, D); dgamma, dbeta: (D,).
    """
    x, gamma, mean, _, rstd = cache
    dout = check_upstream(dout, x.shape)
    n = x.shape[0]
    xmu = x - mean                                  # centre
    x_hat = xmu * rstd                              # normalize
    dbeta = dout.sum(axis=0)                        # out = gamma * x_hat + beta
    dgamma = (dout * x_hat).sum(axis=0)
    dx_hat = dout * gamma
    drstd = (dx_hat * xmu).sum(axis=0)              # x_hat = xmu * rstd
    dxmu = dx_hat * rstd
    dvar = -0.5 * rstd**3 * drstd                   # rstd = (var + eps) ** -0.5
    dxmu += 2.0 * xmu * dvar / n                    # var = mean(xmu ** 2)
    dmean = -dxmu.sum(axis=0)                       # xmu = x - mean
    dx = dxmu + dmean / n                           # mean = mean(x)
    return dx, dgamma, dbeta


def batchnorm_backward_alt(dout, cache):
    """Closed-form backward: same results as :func:`batchnorm_backward`, in fewer passes.

    Args:
        dout: (N, D) upstream gradient.
        cache: the ``BNCache`` from the forward pass.

    Returns:
        dx: (N, D); dgamma, dbeta: (D,).
    """
    x, gamma, mean, _, rstd = cache
    dout = check_upstream(dout, x.shape)
    n = x.shape[0]
    dbeta = column_sum(dout)
    dgamma = centered_dot(x, mean, dout) * rstd
    # dx = k * (dout - dbeta / n - x_hat * dgamma / n) with k = gamma * rstd and
    # x_hat = (x - mean) * rstd, regrouped as dout * a + x * b + c per feature.
    k = gamma * rstd
    b = -k * rstd * dgamma / n
    c = -k * dbeta / n - b * mean
    return two_term_affine(dout, k, x, b, c), dgamma, dbeta


def batchnorm_inference_backward(dout, x, gamma, running_mean, running_var, eps=1e-5):
    """Backward of :func:`batchnorm_inference`, where the statistics are constants.

    With fixed ``running_mean`` and ``running_var`` the layer is the per-feature
    affine map ``out = x * a + b`` with ``a = gamma / sqrt(running_var + eps)``, so
    ``dx = dout * a``: no path runs through the statistics, and ``dx`` does not sum
    to 0 over the batch as it does in training mode.

    Args:
        dout: (N, D) upstream gradient.
        x: (N, D) the forward's input.
        gamma, running_mean, running_var: (D,) as passed to the forward.
        eps: as passed to the forward.

    Returns:
        dx: (N, D); dgamma, dbeta: (D,).
    """
    x = check_2d(x)
    d = x.shape[1]
    gamma = check_param(gamma, d, "gamma")
    running_mean = check_param(running_mean, d, "running_mean")
    running_var = check_param(running_var, d, "running_var")
    dout = check_upstream(dout, x.shape)
    rstd = 1.0 / np.sqrt(running_var + eps)
    dbeta = column_sum(dout)
    dgamma = centered_dot(x, running_mean, dout) * rstd
    return dout * (gamma * rstd), dgamma, dbeta
