"""Chapter 6's hidden checks, differential: each check (probe, plain-data encoding, verdict, in-process) against
the solved source, every seeded mistake of :mod:`bngrade.verdicts.ch06`, correct alternatives written unlike the
solution (each must pass without a word), the seeded class, and hostile answers that must gain nothing.

A notebook's namespace holds the setup cell's definitions (``bn1d_forward``, ``bn1d_backward``) and the answer
cells, as in the sandbox. This module never imports the reference package (the in-process check refuses a graded
function whose globals hold it).
"""
import functools

import numpy as np
import pytest

import differential
from bngrade.judge.check import check
from bngrade.verdicts import ch06
from class_roster import ROSTER

CH06 = "ch06_batchnorm_cnn"
KEYS = ["ch06.spatial_forward", "ch06.spatial_rejects_bad_input", "ch06.spatial_backward", "ch06.fold_batchnorm"]


namespace = functools.partial(differential.submission, CH06)
fails = functools.partial(differential.fails, "ch06")


def _said(name, message):
    """How a verdict names a mistake: the function's name, the mistake's own message, the input."""
    return f"{name}: {message} (input: "


@pytest.mark.parametrize("key", KEYS)
def test_the_solution_passes(key):
    check(key, namespace())


@pytest.mark.parametrize("student", [s for s, spec in ROSTER[CH06].items() if spec is not None])
def test_the_roster_loses_exactly_its_cells(student):
    """The seeded class, hidden checks in-process (test_grading grades it in nbgrader, visible tests too)."""
    spec = ROSTER[CH06][student]
    differential.loses_its_cells(CH06, spec, namespace(spec=spec))


# Correct alternatives: statistics over (0, 2, 3) with no reshape, other ways to move the channel axis,
# (1, C, 1, 1) gradients reshaped at the end, dict and CS231n caches, float64 internals; folds in one expression

CHECK_SHAPES = """
def check_shapes(x, gamma, beta):
    if np.ndim(x) != 4:
        raise ValueError(f"x must be (N, C, H, W), not {np.shape(x)}")
    if np.shape(gamma) != (x.shape[1],) or np.shape(beta) != (x.shape[1],):
        raise ValueError(f"gamma and beta must be ({x.shape[1]},)")
"""

AXES_WITHOUT_RESHAPE = CHECK_SHAPES + """
def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    check_shapes(x, gamma, beta)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    x_hat = (x - mean) / np.sqrt(var + eps)
    out = gamma.reshape(1, -1, 1, 1) * x_hat + beta.reshape(1, -1, 1, 1)
    return out, {"x_hat": x_hat, "var": var, "mean": mean, "eps": eps, "gamma": gamma, "beta": beta, "out": out,
                 "m": x.shape[0] * x.shape[2] * x.shape[3]}

def spatial_batchnorm_backward(dout, cache):  # gradients as (1, C, 1, 1), reshaped at the end
    x_hat, m = cache["x_hat"], cache["m"]
    dbeta = dout.sum(axis=(0, 2, 3), keepdims=True)
    dgamma = (dout * x_hat).sum(axis=(0, 2, 3), keepdims=True)
    g = cache["gamma"].reshape(1, -1, 1, 1)
    dx = g / (m * np.sqrt(cache["var"] + cache["eps"])) * (m * dout - dbeta - x_hat * dgamma)
    return dx, dgamma.reshape(-1), dbeta.reshape(-1)
"""

W_BEFORE_H = CHECK_SHAPES + """
def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    check_shapes(x, gamma, beta)
    n, c, h, w = x.shape
    rows = x.transpose(0, 3, 2, 1).reshape(-1, c)            # (N, W, H, C) rows
    out, inner = bn1d_forward(rows, gamma, beta, eps)
    return out.reshape(n, w, h, c).transpose(0, 3, 2, 1), (x.shape, inner)

def spatial_batchnorm_backward(dout, cache):
    (n, c, h, w), inner = cache
    dx, dgamma, dbeta = bn1d_backward(dout.transpose(0, 3, 2, 1).reshape(-1, c), inner)
    return dx.reshape(n, w, h, c).transpose(0, 3, 2, 1), dgamma, dbeta
"""

MOVEAXIS_THEN_TRANSPOSE = CHECK_SHAPES + """
def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    check_shapes(x, gamma, beta)
    n, c, h, w = x.shape
    out, inner = bn1d_forward(np.moveaxis(x, 1, -1).reshape(-1, c), gamma, beta, eps)
    return np.moveaxis(out.reshape(n, h, w, c), -1, 1), [inner, n, c, h, w, eps, gamma, beta]

def spatial_batchnorm_backward(dout, cache):  # the same (N, H, W, C) rows, by another route
    inner, n, c, h, w = cache[:5]
    dx, dgamma, dbeta = bn1d_backward(dout.transpose(0, 2, 3, 1).reshape(-1, c), inner)
    return dx.reshape(n, h, w, c).transpose(0, 3, 1, 2), dgamma, dbeta
"""

FLOAT64_INSIDE = CHECK_SHAPES + """
def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    check_shapes(x, gamma, beta)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))[:, None, None]
    inv_std = 1.0 / np.sqrt(((x64 - mean) ** 2).mean(axis=(0, 2, 3)) + eps)[:, None, None]
    x_hat = (x64 - mean) * inv_std
    out = (x_hat * gamma[:, None, None] + beta[:, None, None]).astype(x.dtype)
    return out, (x_hat, inv_std, gamma.astype(np.float64), x.dtype)

def spatial_batchnorm_backward(dout, cache):
    x_hat, inv_std, gamma, dtype = cache
    d = dout.astype(np.float64)
    dbeta = np.einsum("nchw->c", d)
    dgamma = np.einsum("nchw,nchw->c", d, x_hat)
    m = d.size // d.shape[1]
    dx = gamma[:, None, None] * inv_std / m * (m * d - dbeta[:, None, None] - x_hat * dgamma[:, None, None])
    return dx.astype(dtype), dgamma.astype(dtype), dbeta.astype(dtype)
"""

FOLD_EINSUM = """
def fold_batchnorm(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
    scale = gamma / np.sqrt(running_var + eps)
    return (np.einsum("o...,o->o...", weight, scale).astype(weight.dtype),
            (((0.0 if bias is None else bias) - running_mean) * scale + beta).astype(weight.dtype))
"""

FOLD_ONE_EXPRESSION = """
def fold_batchnorm(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
    return [((weight.T * (gamma / np.sqrt(running_var + eps))).T).astype(weight.dtype),
            (beta + (np.zeros_like(beta) if bias is None else bias) * gamma / np.sqrt(running_var + eps)
             - running_mean * gamma / np.sqrt(running_var + eps)).astype(weight.dtype)]
"""

FOLD_LOOP_FLOAT64 = """
def fold_batchnorm(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
    new_weight = np.empty(weight.shape)
    new_bias = np.empty(weight.shape[0])
    for o in range(weight.shape[0]):
        a = float(gamma[o]) / np.sqrt(float(running_var[o]) + eps)
        new_weight[o] = weight[o].astype(np.float64) * a
        new_bias[o] = a * ((0.0 if bias is None else float(bias[o])) - float(running_mean[o])) + float(beta[o])
    return new_weight.astype(weight.dtype), new_bias.astype(weight.dtype)
"""

ALTERNATIVES = {
    "axes-0-2-3-dict-cache-gradients-1c11": [AXES_WITHOUT_RESHAPE, FOLD_EINSUM],
    "transpose-0-3-2-1-w-before-h": [W_BEFORE_H, FOLD_ONE_EXPRESSION],
    "moveaxis-then-transpose-list-cache": [MOVEAXIS_THEN_TRANSPOSE, FOLD_LOOP_FLOAT64],
    "float64-inside-einsum": [FLOAT64_INSIDE],
}


@pytest.mark.parametrize("alternative", sorted(ALTERNATIVES))
@pytest.mark.parametrize("key", KEYS)
def test_correct_alternatives_pass(alternative, key):
    check(key, namespace(*ALTERNATIVES[alternative]))


# Every seeded mistake is named by its own message

@pytest.mark.parametrize("mistake", ch06.FORWARD_MISTAKES, ids=lambda m: m.message[:60])
def test_each_forward_mistake_is_named(mistake):
    def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
        return mistake.fn(x, gamma, beta, eps).astype(x.dtype), None

    fails("spatial_forward", namespace(spatial_batchnorm_forward=spatial_batchnorm_forward),
          _said("spatial_batchnorm_forward", mistake.message))


@pytest.mark.parametrize("mistake", ch06.BACKWARD_MISTAKES, ids=lambda m: m.message[:60])
def test_each_backward_mistake_is_named(mistake):
    ns = namespace()
    right = ns["spatial_batchnorm_forward"]

    def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
        return right(x, gamma, beta, eps)[0], (x, gamma, beta, eps)

    def spatial_batchnorm_backward(dout, cache):
        return tuple(g.astype(dout.dtype) for g in mistake.fn(*cache, dout))

    ns.update(spatial_batchnorm_forward=spatial_batchnorm_forward,
              spatial_batchnorm_backward=spatial_batchnorm_backward)
    fails("spatial_backward", ns, _said("spatial_batchnorm_backward", mistake.message))


@pytest.mark.parametrize("mistake", ch06.FOLD_MISTAKES, ids=lambda m: m.message[:60])
def test_each_fold_mistake_is_named(mistake):
    def fold_batchnorm(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
        return tuple(a.astype(weight.dtype) for a in mistake.fn(weight, bias, gamma, beta, running_mean,
                                                                   running_var, eps))

    fails("fold_batchnorm", namespace(fold_batchnorm=fold_batchnorm), _said("fold_batchnorm", mistake.message))


NAIVE_RESHAPE = """
def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    check_shapes(x, gamma, beta)
    out, inner = bn1d_forward(x.reshape(-1, x.shape[1]), gamma, beta, eps)
    return out.reshape(x.shape), inner

def spatial_batchnorm_backward(dout, cache):
    dx, dgamma, dbeta = bn1d_backward(dout.reshape(-1, dout.shape[1]), cache)
    return dx.reshape(dout.shape), dgamma, dbeta
"""


def test_the_naive_reshape_is_named_in_forward_and_backward():
    ns = namespace(CHECK_SHAPES, NAIVE_RESHAPE)
    fails("spatial_forward", ns, "x.reshape(-1, C)")
    fails("spatial_backward", ns, "x.reshape(-1, C)")


@pytest.mark.parametrize("axes,says", [((0,), "statistics are per pixel"), ((1, 2, 3), "over (C, H, W)"),
                                       ((2, 3), "instance norm")])
def test_wrong_statistics_axes_are_named(axes, says):
    ns = namespace(f"""
    def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
        mean, var = x.mean(axis={axes}, keepdims=True), x.var(axis={axes}, keepdims=True)
        return ((x - mean) / np.sqrt(var + eps) * gamma[:, None, None] + beta[:, None, None]).astype(x.dtype), None
    """)
    fails("spatial_forward", ns, says)


def test_a_forward_that_accepts_any_shape_is_refused():
    ns = namespace("def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):\n    return x, None\n")
    fails("spatial_rejects_bad_input", ns, "accepted a 2-D x")


def test_a_backward_whose_forward_raises_says_so():
    ns = namespace("def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):\n    raise NotImplementedError\n")
    fails("spatial_backward", ns, "graded with the cache of your spatial_batchnorm_forward, which is not "
                                       "implemented yet")


def test_a_fold_that_returns_float64_for_a_float32_weight_is_named():
    ns = namespace("""
    def fold_batchnorm(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):  # right values, float64
        scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(running_var, np.float64) + eps)
        bias = np.zeros_like(scale) if bias is None else bias
        return weight * scale.reshape(-1, *[1] * (weight.ndim - 1)), (bias - running_mean) * scale + beta
    """)
    fails("fold_batchnorm", ns, f"{ch06.FOLD_DTYPE_MESSAGE}; got folded weight float64, folded bias float64")


def test_the_fold_check_has_a_float32_weight_with_float64_bn_parameters():
    weight, bias, *params, _ = ch06.probes.fold_cases()[-1].args
    assert weight.dtype == bias.dtype == np.float32 and all(p.dtype == np.float64 for p in params)


@pytest.mark.parametrize("forget,says", [("mean", "running mean is missing"), ("eps", "eps is missing")])
def test_a_fold_that_forgets_the_mean_or_eps_is_named(forget, says):
    ns = namespace(f"""
    def fold_batchnorm(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
        scale = gamma / np.sqrt(running_var + {'0.0' if forget == 'eps' else 'eps'})
        bias = np.zeros_like(gamma) if bias is None else bias
        shift = bias * scale + beta if {forget == 'mean'} else (bias - running_mean) * scale + beta
        return (weight * scale.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype), shift.astype(weight.dtype)
    """)
    fails("fold_batchnorm", ns, says)


# Hostile answers gain nothing: expected values from the grader's own inputs, exact shapes, sizes bounded

def test_a_huge_broadcastable_output_is_refused_unread():
    """Issue 16: an (8_000_000, 1, 1) result broadcast against the expected one blew up the judge's memory."""
    ns = namespace("def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                   "    return np.zeros((8_000_000, 1, 1), np.float32), None\n")
    fails("spatial_forward", ns, "returned shape (8000000, 1, 1), expected (2, 3, 4, 5)")


def test_parameter_gradients_of_shape_1c11_not_reshaped_are_refused():
    ns = namespace(AXES_WITHOUT_RESHAPE, """
    _solution = spatial_batchnorm_backward
    def spatial_batchnorm_backward(dout, cache):
        dx, dgamma, dbeta = _solution(dout, cache)
        return dx, dgamma.reshape(1, -1, 1, 1), dbeta
    """)
    fails("spatial_backward", ns, "returned shape (1, 3, 1, 1), expected (3,)")


def test_a_fold_that_changes_running_var_in_place_is_named():
    ns = namespace("""
    _solution = fold_batchnorm
    def fold_batchnorm(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
        running_var += eps
        return _solution(weight, bias, gamma, beta, running_mean, running_var, 0.0)
    """)
    fails("fold_batchnorm", ns, "modifies its input arrays in place")


def test_a_forward_that_zeroes_its_input_in_place_gets_nothing():
    ns = namespace("""
    _solution = spatial_batchnorm_forward
    def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
        out, cache = _solution(x, gamma, beta, eps)
        x[...] = 0
        return out, cache
    """)
    fails("spatial_forward", ns, "modifies its input arrays in place")
