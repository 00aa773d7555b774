"""Numerical gradients by central differences, and the relative error used to compare them.

A backward pass maps an upstream gradient ``df`` (the gradient of some loss
with respect to the output ``f(x)``) to the gradient with respect to ``x``.
The loss that makes ``df`` exact is ``L(x) = sum(f(x) * df)``, so one entry of
the gradient is the derivative of that scalar along one coordinate:

    dx[i] ~ sum((f(x + h e_i) - f(x - h e_i)) * df) / (2 h)

The central difference has an error of order h^2 (one-sided: order h), and
round-off adds about eps_mach * |L| / h, so h = 1e-5 in float64 sits near the
sweet spot: relative errors of 1e-10 or less for a correct backward.
"""
import numpy as np


def eval_numerical_gradient(f, x, df, h=1e-5):
    """Central-difference gradient of ``sum(f(x) * df)`` with respect to ``x``.

    ``f`` is called with a perturbed float64 copy of ``x`` as its argument, one
    coordinate moved by +h, then by -h; the caller's ``x`` is never modified.
    A function that ignores its argument (and reads ``x`` from elsewhere) gets
    a zero gradient, which shows up in the gradient check instead of passing.

    Args:
        f: function of one array of ``x``'s shape, returning an array of ``df``'s shape.
        x: array of any shape, the point where the gradient is taken.
        df: upstream gradient, the shape of ``f(x)``.
        h: step of the central difference.

    Returns:
        float64 array of ``x``'s shape.
    """
    point = np.array(x, dtype=np.float64)  # private copy: the caller's x stays untouched
    df = np.asarray(df, dtype=np.float64)
    grad = np.zeros_like(point)
    coords, grad_flat = point.reshape(-1), grad.reshape(-1)
    for i, centre in enumerate(coords.copy()):
        coords[i] = centre + h
        up = np.array(f(point), dtype=np.float64)  # a copy: f may return point itself or a view of it
        coords[i] = centre - h
        down = np.array(f(point), dtype=np.float64)
        coords[i] = centre
        grad_flat[i] = np.sum((up - down) * df) / (2.0 * h)
    return grad


def rel_error(a, b):
    """Largest elementwise relative error ``|a - b| / max(1e-8, |a| + |b|)``, a float.

    The 1e-8 floor keeps entries where both arrays are (nearly) 0 from dividing
    by zero: such entries count by their absolute difference, scaled by 1e8.

    Args:
        a, b: arrays of the same shape (or broadcastable), or scalars.

    Returns:
        float; 0.0 for identical inputs. For gradients in float64, below about
        1e-8 means agreement, above about 1e-7 means a bug (an eps dropped from the backward gives 1e-5..1e-4).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))
