"""Hidden tests of chapter 6, *BN for CNNs*.

The spatial functions are compared with ``bnref`` on fresh NCHW batches whose
channels have very different means and scales, so that statistics taken over
the wrong axes give clearly wrong results; the known mistakes are recomputed
with torch (autograd gives their gradients) and named when a result matches.
"""
import functools

import numpy as np

import bnref

from bngrade.judge.compare import (Case, Mistake, _call, check_dtype, check_inputs_unchanged, check_not_reference, check_rejects,
                      compare)

# Shapes chosen so that every wrong layout differs from the right one (H * W > 1, C > 1).
SHAPES = [(2, 3, 4, 5), (6, 4, 3, 3), (3, 2, 5, 1), (16, 8, 4, 4)]


def random_images(rng, shape, dtype):
    """An (N, C, H, W) batch; each channel has its own mean (spread ~3) and scale (0.5..3)."""
    n, c, h, w = shape
    means = rng.normal(0.0, 3.0, size=(1, c, 1, 1))
    scales = rng.uniform(0.5, 3.0, size=(1, c, 1, 1))
    return (means + scales * rng.standard_normal(shape)).astype(dtype)


def _cases(seed, with_dout=False):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for shape, eps in zip(SHAPES, (1e-5, 1e-3, 0.1, 1e-5)):
            c = shape[1]
            args = (random_images(rng, shape, dtype), rng.uniform(0.5, 2.0, c).astype(dtype),
                    rng.normal(0.0, 1.0, c).astype(dtype), eps)
            if with_dout:
                args += (rng.standard_normal(shape).astype(dtype),)
            cases.append(Case(args, f"x {shape} {np.dtype(dtype).name}, eps={eps}"))
    return cases


# The wrong forward passes, written with torch so that autograd also gives their gradients.

def _rows_bn(rows, gamma, beta, eps):
    """Batch norm of an (M, C) tensor over its rows."""
    mean = rows.mean(0)
    var = rows.var(0, correction=0)
    return gamma * (rows - mean) / (var + eps).sqrt() + beta


def _over(x, dims, gamma, beta, eps, correction=0):
    """Normalize an NCHW tensor with statistics over ``dims``, then the per-channel affine map."""
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, correction=correction)
    return gamma.view(1, -1, 1, 1) * (x - mean) / (var + eps).sqrt() + beta.view(1, -1, 1, 1)


def _naive_reshape(x, gamma, beta, eps):
    return _rows_bn(x.reshape(-1, x.shape[1]), gamma, beta, eps).reshape(x.shape)


def _not_moved_back(x, gamma, beta, eps):
    return _rows_bn(x.movedim(1, -1).reshape(-1, x.shape[1]), gamma, beta, eps).reshape(x.shape)


WRONG_LAYOUTS = [
    ("the channel axis was not moved before flattening: x.reshape(-1, C) on an NCHW array mixes pixels of "
     "different channels in each column; move C last first (N, C, H, W) -> (N, H, W, C), then reshape",
     _naive_reshape),
    ("the result is reshaped back to (N, C, H, W) without moving the channel axis back: reshape the "
     "(N*H*W, C) rows to (N, H, W, C) first, then move C to axis 1",
     _not_moved_back),
    ("the statistics are per pixel (over the batch axis N only, one mean per channel AND position); "
     "spatial BN shares one mean and variance per channel over (N, H, W)",
     lambda x, g, b, eps: _over(x, (0,), g, b, eps)),
    ("the statistics are taken over (C, H, W), per sample (that is layer norm); batch norm takes them "
     "per channel over (N, H, W)",
     lambda x, g, b, eps: _over(x, (1, 2, 3), g, b, eps)),
    ("the statistics are taken over (H, W), per sample and channel (that is instance norm); batch norm "
     "takes them per channel over (N, H, W)",
     lambda x, g, b, eps: _over(x, (2, 3), g, b, eps)),
    ("the statistics are taken over the whole array (N, C, H, W); batch norm keeps one mean and variance "
     "per channel, over (N, H, W)",
     lambda x, g, b, eps: _over(x, (0, 1, 2, 3), g, b, eps)),
    ("your variance divides by N*H*W - 1; BN normalizes with the biased variance (divide by N*H*W)",
     lambda x, g, b, eps: _over(x, (0, 2, 3), g, b, eps, correction=1)),
]


def _torch_args(*arrays, grad=False):
    import torch

    return [torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad) for a in arrays]


def _wrong_forward(fn):
    def wrong(x, gamma, beta, eps):
        return fn(*_torch_args(x, gamma, beta), eps).detach().numpy()
    return wrong


def _wrong_backward(fn):
    def wrong(x, gamma, beta, eps, dout):
        import torch

        xt, gt, bt = _torch_args(x, gamma, beta, grad=True)
        fn(xt, gt, bt, eps).backward(torch.from_numpy(np.asarray(dout, dtype=np.float64)))
        return xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()
    return wrong


FORWARD_MISTAKES = [Mistake(message, _wrong_forward(fn)) for message, fn in WRONG_LAYOUTS]
BACKWARD_MISTAKES = [Mistake(message, _wrong_backward(fn)) for message, fn in WRONG_LAYOUTS]


def check_spatial_forward(student):
    """Hidden test of ``spatial_batchnorm_forward(x, gamma, beta, eps) -> (out, cache)``."""
    cases = _cases(seed=61)
    compare(student, bnref.spatial_batchnorm_forward, cases, "spatial_batchnorm_forward", FORWARD_MISTAKES,
            pick=lambda result: result[0])
    check_inputs_unchanged(student, cases[:2], "spatial_batchnorm_forward")
    check_dtype(student, cases[-1], "spatial_batchnorm_forward")


def _forward_then_backward(forward, backward, x, gamma, beta, eps, dout):
    """Run a forward pass and the backward pass of its cache: (dx, dgamma, dbeta)."""
    try:
        _, cache = forward(x, gamma, beta, eps)
    except NotImplementedError:
        raise RuntimeError("spatial_batchnorm_forward, which the backward test calls first, "
                           "is not implemented yet") from None
    return backward(dout, cache)


def check_spatial_backward(forward, backward):
    """Hidden test of ``spatial_batchnorm_backward(dout, cache)``, with the cache of the student's forward."""
    check_not_reference(forward, "spatial_batchnorm_forward")
    check_not_reference(backward, "spatial_batchnorm_backward")
    # partial objects carry no module globals, so compare's own reference check looks at nothing of ours
    student = functools.partial(_forward_then_backward, forward, backward)
    reference = functools.partial(_forward_then_backward, bnref.spatial_batchnorm_forward,
                                  bnref.spatial_batchnorm_backward)
    compare(student, reference, _cases(seed=62, with_dout=True), "spatial_batchnorm_backward",
            BACKWARD_MISTAKES)
    dtype_case = _cases(seed=63, with_dout=True)[-1]
    check_dtype(student, dtype_case, "spatial_batchnorm_backward")


def check_spatial_rejects_bad_input(student):
    """Hidden test: an x that is not 4-D, or gamma/beta that are not (C,), raise ValueError."""
    x = np.ones((2, 3, 4, 4))
    x[0, :, 0, 0] = 2.0
    g, b = np.ones(3), np.zeros(3)
    bad = {
        "a 2-D x (N, D)": (np.ones((5, 3)), g, b),
        "a 3-D x (N, C, L)": (np.ones((4, 3, 5)), g, b),
        "gamma of the wrong length": (x, np.ones(4), b),
        "beta of the wrong length": (x, g, np.zeros(2)),
    }
    check_rejects(student, bad, "spatial_batchnorm_forward")


# Folding

def _fold_cases(seed=64):
    rng = np.random.default_rng(seed)
    # the first shapes let the wrong-axis mistakes broadcast (C_in == C_out, kW == C_out), so they can be named
    shapes = [((3, 3, 3, 3), True), ((6, 6, 1, 1), False), ((8, 2, 3, 8), True), ((7, 7), True), ((4, 9), False)]
    cases = []
    for dtype in (np.float64, np.float32):
        for (shape, has_bias), eps in zip(shapes, (1e-5, 1e-3, 0.1, 1e-2, 1e-5)):
            c = shape[0]
            weight = rng.normal(0.0, 0.5, shape).astype(dtype)
            bias = rng.normal(0.0, 1.0, c).astype(dtype) if has_bias else None
            gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(0.0, 1.0, c)
            mean, var = rng.normal(0.0, 2.0, c), rng.uniform(0.01, 3.0, c)
            params = tuple(p.astype(dtype) for p in (gamma, beta, mean, var))
            label = f"weight {shape} {np.dtype(dtype).name}, bias={'given' if has_bias else 'None'}, eps={eps}"
            cases.append(Case((weight, bias, *params, eps), label))
    # a float32 layer with float64 BN statistics (numpy's default dtype): the result keeps the weight's float32
    weight, bias = rng.normal(0.0, 0.5, (5, 3, 3, 3)).astype(np.float32), rng.normal(0.0, 1.0, 5).astype(np.float32)
    params = (rng.uniform(0.5, 2.0, 5), rng.normal(0.0, 1.0, 5), rng.normal(0.0, 2.0, 5), rng.uniform(0.01, 3.0, 5))
    cases.append(Case((weight, bias, *params, 1e-5), "weight (5, 3, 3, 3) float32, bias given, gamma, beta, "
                                                     "running_mean, running_var float64, eps=1e-05"))
    return cases


def _fold(weight, bias, gamma, beta, mean, var, eps, scale=None, axis=0, use_mean=True, scale_bias=True):
    """A folding with some of its ingredients changed, to name the usual mistakes."""
    a = gamma / np.sqrt(var + eps) if scale is None else scale
    bias = np.zeros_like(gamma) if bias is None else bias
    shape = [1] * weight.ndim
    shape[axis] = -1
    new_weight = weight * a.reshape(shape)
    shift = (bias - mean) * a if scale_bias else bias - mean * a
    new_bias = (shift if use_mean else bias * a) + beta
    return new_weight, new_bias


FOLD_MISTAKES = [
    Mistake("the running mean is missing from the folded bias; it must be (bias - running_mean) * scale + beta "
            "with scale = gamma / sqrt(running_var + eps)",
            lambda w, b, g, be, m, v, eps: _fold(w, b, g, be, m, v, eps, use_mean=False)),
    Mistake("eps is missing: the BN scale is gamma / sqrt(running_var + eps), with the layer's eps",
            lambda w, b, g, be, m, v, eps: _fold(w, b, g, be, m, v, eps, scale=g / np.sqrt(v))),
    Mistake("running_var is used as if it were a standard deviation; the scale is gamma / sqrt(running_var + eps)",
            lambda w, b, g, be, m, v, eps: _fold(w, b, g, be, m, v, eps, scale=g / (v + eps))),
    Mistake("the weight is scaled along the wrong axis (per input channel, axis 1); each OUTPUT channel "
            "(axis 0 of the weight) gets its own scale",
            lambda w, b, g, be, m, v, eps: _fold(w, b, g, be, m, v, eps, axis=1)),
    Mistake("the weight is scaled along its last axis (weight * scale broadcasts that way); each OUTPUT channel "
            "(axis 0 of the weight) gets its own scale",
            lambda w, b, g, be, m, v, eps: _fold(w, b, g, be, m, v, eps, axis=w.ndim - 1)),
    Mistake("the layer's bias is not multiplied by the BN scale; the folded bias is (bias - running_mean) * scale "
            "+ beta",
            lambda w, b, g, be, m, v, eps: _fold(w, b, g, be, m, v, eps, scale_bias=False)),
]


FOLD_DTYPE_MESSAGE = ("keep the dtype of weight (float32 in, float32 out): with float64 BN parameters the products "
                      "are float64; cast the folded weight and bias with .astype(weight.dtype)")


def check_fold_dtype(student, cases, name="fold_batchnorm"):
    """Both folded arrays have the weight's dtype, also when the BN parameters are float64."""
    for case in cases:
        weight = case.args[0]
        got = [np.asarray(r).dtype for r in _call(student, case.args, name, case.label)]
        if any(dtype != weight.dtype for dtype in got):
            raise AssertionError(f"{name}: {FOLD_DTYPE_MESSAGE}; got folded weight {got[0]}, folded bias {got[1]} "
                                 f"for a {weight.dtype} weight (input: {case.label})")


def check_fold_batchnorm(student):
    """Hidden test of ``fold_batchnorm(weight, bias, gamma, beta, running_mean, running_var, eps)``."""
    cases = _fold_cases()
    compare(student, bnref.fold_batchnorm, cases, "fold_batchnorm", FOLD_MISTAKES)
    check_inputs_unchanged(student, cases, "fold_batchnorm")
    check_fold_dtype(student, cases[-2:])   # float32 without a bias; float32 with float64 BN parameters
