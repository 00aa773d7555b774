"""Batch norm backward pass for (N, D) inputs, from the cache of :func:`batchnorm_forward`.

Two versions with the same result:

* :func:`batchnorm_backward` walks the computational graph of the forward
  pass one node at a time (the way autograd does);
* :func:`batchnorm_backward_alt` uses the closed form

      dx = gamma * rstd / N * (N * dout - sum(dout) - x_hat * sum(dout * x_hat))

  which needs two per-feature reductions and one elementwise pass.
"""
import numpy as np

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
    n = x.shape[0]
    dbeta = column_sum(dout)
    dgamma = centered_dot(x, mean, dout) * rstd
    # dx = k * (dout - dbeta / n - x_hat * dgamma / n) with k = gamma * rstd and
    # x_hat = (x - mean) * rstd, regrouped as dout * a + x * b + c per feature.
    k = gamma * rstd
    b = -k * rstd * dgamma / n
    c = -k * dbeta / n - b * mean
    return two_term_affine(dout, k, x, b, c), dgamma, dbeta
