"""Verdicts of chapter 6, *BN for CNNs* (probes: :mod:`bncapture.ch06`).

The spatial functions are compared with ``bnref`` on the grader's own copy of fresh NCHW batches whose channels
have very different means and scales, so that statistics taken over the wrong axes give clearly wrong results;
the known mistakes are recomputed with torch (autograd gives their gradients) and named when a result matches.
The backward pass is probed through the student's own forward and its opaque cache.
"""
import numpy as np

import bnref
from bncapture import ch06 as probes

from bngrade.judge.compare import Mistake, compare, inputs_unchanged, keeps_float32, rejects


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


def spatial_forward(r):
    """``spatial_batchnorm_forward(x, gamma, beta, eps) -> (out, cache)``: out; inputs intact; float32 kept."""
    name = "spatial_batchnorm_forward"
    cases = probes.spatial_cases(probes.FORWARD_SEED)
    compare(r, "case", bnref.spatial_batchnorm_forward, cases, name, FORWARD_MISTAKES,
            pick=lambda result: result[0])
    inputs_unchanged(r, "case", cases[:2], name)
    last = len(cases) - 1
    keeps_float32(r, f"case{last}", bnref.spatial_batchnorm_forward(*cases[last].args)[0], name, cases[last].label)


def _forward_ran(r, key, name, label):
    """The backward is graded with the cache of the student's forward: say so when that forward raised."""
    error = r.raised(key, name, label)
    if error is None:
        return
    what = ("is not implemented yet" if error["type"] == "NotImplementedError"
            else f"raised {error['type']}: {error['message'][:500]}")
    raise AssertionError(f"{name} is graded with the cache of your spatial_batchnorm_forward, which {what} "
                         f"(input: {label})")


def _reference_backward(x, gamma, beta, eps, dout):
    """(dx, dgamma, dbeta) of ``bnref``'s spatial backward on the cache of its forward."""
    return bnref.spatial_batchnorm_backward(dout, bnref.spatial_batchnorm_forward(x, gamma, beta, eps)[1])


def spatial_backward(r):
    """``spatial_batchnorm_backward(dout, cache)`` on the cache of the student's forward; float32 kept."""
    name = "spatial_batchnorm_backward"
    cases = probes.spatial_cases(probes.BACKWARD_SEED, with_dout=True)
    dtype_case = probes.spatial_cases(probes.BACKWARD_DTYPE_SEED, with_dout=True)[-1]
    for index, case in enumerate(cases):
        _forward_ran(r, f"fwd case{index}", name, case.label)
    compare(r, "case", _reference_backward, cases, name, BACKWARD_MISTAKES)
    _forward_ran(r, "fwd dtype", name, dtype_case.label)
    keeps_float32(r, "dtype", _reference_backward(*dtype_case.args), name, dtype_case.label)


def spatial_rejects_bad_input(r):
    """An x that is not 4-D, or gamma/beta that are not (C,), raise ValueError."""
    rejects(r, "bad ", probes.bad_spatial_inputs(), "spatial_batchnorm_forward")


# Folding

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


def _fold_keeps_dtype(r, index, case, name):
    """Both folded arrays of case ``index`` have the weight's dtype, also when the BN parameters are float64."""
    weight = case.args[0]
    got = [a.dtype for a in r.get(f"case{index}", bnref.fold_batchnorm(*case.args), name, case.label)]
    if any(dtype != weight.dtype for dtype in got):
        raise AssertionError(f"{name}: {FOLD_DTYPE_MESSAGE}; got folded weight {got[0]}, folded bias {got[1]} "
                             f"for a {weight.dtype} weight (input: {case.label})")


def fold_batchnorm(r):
    """``fold_batchnorm(weight, bias, gamma, beta, running_mean, running_var, eps)``; inputs intact; the
    weight's dtype kept (float32 without a bias; float32 with float64 BN parameters)."""
    name = "fold_batchnorm"
    cases = probes.fold_cases()
    compare(r, "case", bnref.fold_batchnorm, cases, name, FOLD_MISTAKES)
    inputs_unchanged(r, "case", cases, name)
    for index in (len(cases) - 2, len(cases) - 1):
        _fold_keeps_dtype(r, index, cases[index], name)
