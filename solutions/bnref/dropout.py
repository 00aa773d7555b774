"""Dropout, forward and backward, in both scaling conventions.

``p`` is the probability of *dropping* a unit, as in ``torch.nn.Dropout(p)``
and TF2's ``tf.nn.dropout(x, rate=p)``; CS231n and TF1's
``tf.nn.dropout(x, keep_prob)`` pass the keep probability ``1 - p`` instead.

* ``mode="inverted"`` (PyTorch, TensorFlow): at training time the kept units
  are divided by ``keep = 1 - p``; at test time the layer is the identity.
* ``mode="classic"`` (Srivastava et al., 2014): at training time the kept
  units pass unchanged; at test time every unit is multiplied by ``keep``.

Both keep the expected output of a unit equal at training and test time.
The backward pass reuses the forward's mask: a unit that was dropped gets
no gradient.
"""
from typing import NamedTuple, Optional

import numpy as np

MODES = ("inverted", "classic")


class DropoutCache(NamedTuple):
    """What the forward pass keeps for the backward pass."""

    mask: Optional[np.ndarray]  # bool, True where the unit was kept; None in eval mode
    scale: float  # factor applied to what passes: 1/keep, 1 or keep


def keep_probability(p):
    """``1 - p`` after checking that the drop probability ``p`` lies in [0, 1]."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p is the drop probability and must lie in [0, 1]; got {p}")
    return 1.0 - p


def dropout_scale(keep, train, mode):
    """The factor applied to the units that pass, for a convention ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if mode == "inverted":
        return (1.0 / keep if keep > 0 else 0.0) if train else 1.0
    return 1.0 if train else keep


def dropout_forward(x, p, train, rng, mode="inverted"):
    """Dropout on an array of any shape.

    Args:
        x: inputs, any shape.
        p: drop probability in [0, 1].
        train: True for training mode (random mask), False for eval mode.
        rng: a ``numpy.random.Generator`` (or a seed) that draws the mask.
        mode: ``"inverted"`` (scale at training time) or ``"classic"`` (scale at test time).

    Returns:
        out: same shape and dtype as x.
        cache: a :class:`DropoutCache` ``(mask, scale)``.
    """
    x = np.asarray(x)
    keep = keep_probability(p)
    scale = dropout_scale(keep, train, mode)
    if not train:
        return x * scale, DropoutCache(None, scale)
    mask = np.random.default_rng(rng).random(x.shape) < keep
    return x * mask * scale, DropoutCache(mask, scale)


def dropout_backward(dout, cache):
    """Gradient of :func:`dropout_forward` with the same mask.

    Args:
        dout: upstream gradient, the shape of x.
        cache: the :class:`DropoutCache` of the forward pass.

    Returns:
        dx: the shape of dout.
    """
    mask, scale = cache
    if mask is None:
        return dout * scale
    return dout * mask * scale
