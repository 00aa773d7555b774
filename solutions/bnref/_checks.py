"""Input validation shared by every layer: clear ``ValueError`` messages that name the expected shape."""
import numpy as np


def check_2d(x, name="x"):
    """Return ``x`` as an array after checking it is (N, D)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D); got an array of shape {x.shape}")
    return x


def check_4d(x, name="x"):
    """Return ``x`` as an array after checking it is (N, C, H, W)."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W); got an array of shape {x.shape}")
    return x


def check_param(p, d, name, letter="D"):
    """Check that a per-feature (or per-channel, ``letter="C"``) parameter has shape (D,)."""
    p = np.asarray(p)
    if p.shape != (d,):
        raise ValueError(f"{name} must have shape ({letter},) = ({d},) to match x; got {p.shape}")
    return p


def check_batch(n):
    """Refuse a training-mode batch of one sample (its variance is 0), as torch does."""
    if n < 2:
        raise ValueError(
            "batch norm in training mode needs N >= 2 samples per feature "
            f"(got N = {n}): the batch variance of one sample is 0"
        )


def check_upstream(dout, shape):
    """Check that an upstream gradient has the shape of the forward's output."""
    dout = np.asarray(dout)
    if dout.shape != tuple(shape):
        raise ValueError(f"dout must have the shape of the forward's output, (N, D) = {tuple(shape)}; "
                         f"got {dout.shape}")
    return dout
