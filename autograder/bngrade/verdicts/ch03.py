"""Verdicts of chapter 3, *Batch norm backward in NumPy* (probes: :mod:`bncapture.ch03`).

Students choose their own cache format, so a backward pass is probed through the student's own
``batchnorm_forward``: its cache goes into the student's backward inside the sandbox, and the gradients that
come back are compared with ``bnref``'s on the grader's own copy of the inputs (several shapes and eps, float64
and float32, always a random upstream gradient: a constant one gives dx = 0 and hides bugs). No verdict looks
into a cache. The known mistakes are written as variants of the closed form

    dx = gamma * (a * (dout - mean(dout)) - b * xmu * mean(dout * xmu))

(a = rstd, b = rstd**3 when correct, xmu = x - mean), with one path or one factor changed.
"""
import numpy as np

import bnref
from bncapture import ch03 as probes
from bncapture.cases import Case, first

from bngrade.judge.compare import Mistake, close, compare, inputs_unchanged
from bngrade.verdicts import ch02


def _variant(x, gamma, eps, dout, mean_w=1.0, var_w=1.0, dx_w=1.0, free_a=False, free_b=0, free_dgamma=False,
             with_gamma=True):
    """(dx, dgamma, dbeta) of the closed form with changes, in float64.

    Args:
        mean_w, var_w: weights of the paths through the mean and the variance (1 correct, 0 missing,
            "N" for a missing 1/N); dx_w multiplies dx ("N": the leading 1/N of the closed form is missing).
        free_a, free_b, free_dgamma: where eps is dropped: the rstd of the direct path, how many of
            the three rstd factors of the variance path (0-3), the rstd of x_hat in dgamma.
        with_gamma: False drops the factor gamma from dx.
    """
    x, gamma, dout = (np.asarray(t, dtype=np.float64) for t in (x, gamma, dout))
    mean_w, var_w, dx_w = (len(x) if w == "N" else w for w in (mean_w, var_w, dx_w))
    xmu = x - x.mean(axis=0)
    var = (xmu * xmu).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rstd, rstd_free = 1.0 / np.sqrt(var + eps), 1.0 / np.sqrt(var)
        a = rstd_free if free_a else rstd
        b = rstd_free**free_b * rstd ** (3 - free_b)
        dx = dx_w * (gamma if with_gamma else 1.0) * (a * (dout - mean_w * dout.mean(axis=0))
                                                       - b * xmu * (var_w * (dout * xmu).mean(axis=0)))
        dgamma = (dout * xmu).sum(axis=0) * (rstd_free if free_dgamma else rstd)
    return dx, dgamma, dout.sum(axis=0)


def _mistake(message, **changes):
    return Mistake(message, lambda x, g, b, eps, dout: _variant(x, g, eps, dout, **changes))


def _swapped(grads):
    dx, dgamma, dbeta = grads
    return dx, dbeta, dgamma


def _x_hat(x, eps):
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + eps)


EPS_DROPPED = ("eps is dropped in the backward pass: the forward normalized with 1 / sqrt(var + eps), so every "
               "rstd factor of the gradient is 1 / sqrt(var + eps) too, not 1 / sqrt(var)")
ONE_OVER_N = "a 1/N factor is missing"
SWAPPED = ("dgamma and dbeta are swapped: return (dx, dgamma, dbeta) with dgamma = sum(dout * x_hat), "
           "dbeta = sum(dout)")

BACKWARD_MISTAKES = [
    _mistake("dx is missing the path through the mean: mu = mean(x) depends on every x_i, so dx gets the term "
             "-mean(dx_hat) / sqrt(var + eps) (the mean of the upstream gradient over the batch)", mean_w=0.0),
    _mistake("dx is missing the path through the variance: var depends on every x_i, so dx gets the term "
             "-x_hat * mean(dx_hat * x_hat) / sqrt(var + eps)", var_w=0.0),
    _mistake("dx treats the batch mean and variance as constants (dx = gamma * dout / sqrt(var + eps)): both the "
             "path through the mean and the path through the variance are missing; that is the eval-mode "
             "gradient, not the training-mode one", mean_w=0.0, var_w=0.0),
    Mistake(SWAPPED, lambda x, g, b, eps, dout: _swapped(_variant(x, g, eps, dout))),
    _mistake(f"{ONE_OVER_N} in the path through the variance: var = mean((x - mu)**2) averages over the N samples, "
             "so dvar/dx_i carries 2 * (x_i - mu) / N", var_w="N"),
    _mistake(f"{ONE_OVER_N} in the path through the mean: mu = mean(x), so dmu/dx_i = 1/N", mean_w="N"),
    _mistake(f"{ONE_OVER_N} in the paths through the mean and the variance: both statistics are averages over the "
             "N samples", mean_w="N", var_w="N"),
    _mistake(f"{ONE_OVER_N}: dx is N times too large; the closed form is "
             "gamma / (N * sqrt(var + eps)) * (N * dout - sum(dout) - x_hat * sum(dout * x_hat))", dx_w="N"),
    _mistake("dx is missing the factor gamma: out = gamma * x_hat + beta, so the gradient reaching x_hat is "
             "dout * gamma", with_gamma=False),
    Mistake("dgamma sums dout * x; gamma multiplies the normalized input, so dgamma = sum(dout * x_hat)",
            lambda x, g, b, eps, dout: (_variant(x, g, eps, dout)[0], (dout * x).sum(0), dout.sum(0))),
    Mistake("dgamma and dbeta are not summed over the batch: they must have shape (D,), "
            "sum(dout * x_hat, axis=0) and sum(dout, axis=0)",
            lambda x, g, b, eps, dout: (_variant(x, g, eps, dout)[0], dout * _x_hat(x, eps), dout)),
] + [
    # eps dropped from some of the rstd factors, as the staged and closed forms can drop it
    _mistake(EPS_DROPPED, free_a=free_a, free_b=free_b, free_dgamma=free_dgamma)
    for free_dgamma in (False, True) for free_a in (False, True) for free_b in range(4)
    if free_a or free_b or free_dgamma
]


def _reference(x, gamma, beta, eps, dout):
    """(dx, dgamma, dbeta) of ``bnref``'s backward on the cache of ``bnref``'s forward."""
    return bnref.batchnorm_backward(dout, bnref.batchnorm_forward(x, gamma, beta, eps)[1])


def _forward_first(r, cases, name):
    """The backward is graded with the student's cache: name a wrong forward pass before anything else."""
    forward_cases = [Case(case.args[:4], case.label) for case in cases]
    try:
        compare(r, "fwd", bnref.batchnorm_forward, forward_cases, "batchnorm_forward", ch02.FORWARD_MISTAKES,
                pick=first)
    except AssertionError as err:
        raise AssertionError(f"{name} is graded with the cache of your batchnorm_forward, which is not right "
                             f"yet: {err}") from None


def _read(r, key, like, name, label):
    """The record at ``key`` read as ``like``, or None when it does not have exactly that structure."""
    try:
        return r.get(key, like, name, label)
    except AssertionError:
        return None


def _name_by_shape(r, cases, name):
    """A result that does not have the reference's shapes may have exactly those of a known mistake, such as
    gradients not summed over the batch (N, D) instead of (D,): read it as that mistake's and name it."""
    for index, case in enumerate(cases):
        key = f"case{index}"
        if _read(r, key, _reference(*case.args), name, case.label) is not None:
            continue
        for mistake in BACKWARD_MISTAKES:
            wrong = mistake.fn(*case.args)
            got = _read(r, key, wrong, name, case.label)
            if got is not None and close(got, wrong, case.args[0].dtype):
                raise AssertionError(f"{name}: {mistake.message} (input: {case.label})")


def _backward(r, name):
    """``name(dout, cache) -> (dx, dgamma, dbeta)`` on the cache of the student's forward; dout left intact."""
    cases = probes.backward_cases()
    _forward_first(r, cases, name)
    with np.errstate(all="ignore"):
        _name_by_shape(r, cases, name)
        compare(r, "case", _reference, cases, name, BACKWARD_MISTAKES)
    inputs_unchanged(r, "case", [Case((case.args[4],), case.label) for case in cases], name)


def batchnorm_backward(r):
    """The staged backward (any correct form passes)."""
    _backward(r, "batchnorm_backward")


def batchnorm_backward_alt(r):
    """The closed-form backward (any correct form passes)."""
    _backward(r, "batchnorm_backward_alt")


# Eval mode: the running statistics are constants.

def _eval_variant(dout, x, gamma, rm, rv, eps, free=False, free_dgamma=False, with_gamma=True):
    dout, x = np.asarray(dout, dtype=np.float64), np.asarray(x, dtype=np.float64)
    rstd = 1.0 / np.sqrt(rv + eps)
    rstd_free = 1.0 / np.sqrt(rv)
    dx = dout * (gamma if with_gamma else 1.0) * (rstd_free if free else rstd)
    dgamma = (dout * (x - rm)).sum(axis=0) * (rstd_free if free_dgamma else rstd)
    return dx, dgamma, dout.sum(axis=0)


def _train_formula_with_running_stats(dout, x, gamma, rm, rv, eps):
    dout, x = np.asarray(dout, dtype=np.float64), np.asarray(x, dtype=np.float64)
    rstd = 1.0 / np.sqrt(rv + eps)
    x_hat = (x - rm) * rstd
    dx = gamma * rstd * (dout - dout.mean(axis=0) - x_hat * (dout * x_hat).mean(axis=0))
    return dx, (dout * x_hat).sum(axis=0), dout.sum(axis=0)


EVAL_THROUGH_STATS = ("in eval mode the running statistics are constants, so no gradient flows through them: "
                      "the layer is the affine map gamma * (x - running_mean) / sqrt(running_var + eps) + beta "
                      "and dx = dout * gamma / sqrt(running_var + eps)")

INFERENCE_BACKWARD_MISTAKES = [
    Mistake(EVAL_THROUGH_STATS + " (your dx uses the training-mode formula with the running statistics)",
            _train_formula_with_running_stats),
    Mistake(EVAL_THROUGH_STATS + " (your gradients are the training-mode ones, with the batch statistics)",
            lambda dout, x, g, rm, rv, eps: bnref.batchnorm_backward(dout, bnref.batchnorm_forward(
                x, g, np.zeros_like(g), eps)[1])),
    Mistake("eps is dropped in the backward pass: the forward divides by sqrt(running_var + eps)",
            lambda dout, x, g, rm, rv, eps: _eval_variant(dout, x, g, rm, rv, eps, free=True)),
    Mistake("eps is dropped in the backward pass: the forward divides by sqrt(running_var + eps)",
            lambda dout, x, g, rm, rv, eps: _eval_variant(dout, x, g, rm, rv, eps, free=True, free_dgamma=True)),
    Mistake("dx is missing the factor gamma: dx = dout * gamma / sqrt(running_var + eps)",
            lambda dout, x, g, rm, rv, eps: _eval_variant(dout, x, g, rm, rv, eps, with_gamma=False)),
    Mistake(SWAPPED, lambda dout, x, g, rm, rv, eps: _swapped(_eval_variant(dout, x, g, rm, rv, eps))),
    Mistake("dgamma sums dout * x; it is the sum of dout * x_hat with x_hat = (x - running_mean) / "
            "sqrt(running_var + eps)",
            lambda dout, x, g, rm, rv, eps: (_eval_variant(dout, x, g, rm, rv, eps)[0], (dout * x).sum(0),
                                             dout.sum(0))),
]


def batchnorm_inference_backward(r):
    """``batchnorm_inference_backward(dout, x, gamma, running_mean, running_var, eps)``; inputs intact."""
    cases = probes.inference_backward_cases()
    with np.errstate(all="ignore"):
        compare(r, "case", bnref.batchnorm_inference_backward, cases, "batchnorm_inference_backward",
                INFERENCE_BACKWARD_MISTAKES)
    inputs_unchanged(r, "case", cases, "batchnorm_inference_backward")


# Gradient checking

def _differences(f, x, df, h, lo=-1.0, hi=1.0, denom=2.0, weighted=True, restore=True, copy=True):
    """sum((f(x + hi*h e_i) - f(x + lo*h e_i)) * df) / (denom * h) per coordinate i, with variations."""
    result = np.array if copy else np.asarray
    point = np.array(x, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64) if weighted else 1.0
    grad = np.zeros(point.size)
    flat = point.reshape(-1)
    for i in range(point.size):
        centre = flat[i]
        flat[i] = centre + hi * h
        up = result(f(point), dtype=np.float64)
        flat[i] = centre + lo * h
        down = result(f(point), dtype=np.float64)
        if restore:
            flat[i] = centre
        grad[i] = np.sum((up - down) * df) / (denom * h)
    return grad.reshape(point.shape)


ONE_SIDED = ("uses a one-sided difference; use the central difference (f(x + h) - f(x - h)) / (2h), whose error "
             "falls like h**2 instead of h")
GRADCHECK_MISTAKES = [
    Mistake(ONE_SIDED + " (yours is (f(x + h) - f(x)) / h)", lambda f, x, df, h: _differences(f, x, df, h, lo=0.0,
                                                                                             denom=1.0)),
    Mistake(ONE_SIDED + " (yours is (f(x) - f(x - h)) / h)", lambda f, x, df, h: _differences(f, x, df, h, hi=0.0,
                                                                                             denom=1.0)),
    Mistake("the central difference f(x + h) - f(x - h) spans 2h: divide by 2 * h, not h",
            lambda f, x, df, h: _differences(f, x, df, h, denom=1.0)),
    Mistake("the upstream gradient df is ignored: the gradient is that of sum(f(x) * df), so weight the change "
            "of f by df before summing", lambda f, x, df, h: _differences(f, x, df, h, weighted=False)),
    Mistake("the step argument h is ignored (a fixed step is used instead of the one passed in)",
            lambda f, x, df, h: _differences(f, x, df, 1e-5)),
    Mistake("x is not restored after each perturbation: put x[i] back to its value before moving on to the next "
            "coordinate", lambda f, x, df, h: _differences(f, x, df, h, restore=False)),
    Mistake("the result of f is not copied: when f returns x itself or a view of it (identity, .T, reshape), "
            "f(x + h) changes when you move x to x - h, and the difference is 0. Copy it: np.array(f(x))",
            lambda f, x, df, h: _differences(f, x, df, h, copy=False)),
]


def eval_numerical_gradient(r):
    """``eval_numerical_gradient(f, x, df, h=1e-5)``; x and df intact."""
    cases = probes.gradcheck_cases()
    compare(r, "case", bnref.eval_numerical_gradient, cases, "eval_numerical_gradient", GRADCHECK_MISTAKES)
    inputs_unchanged(r, "case", cases, "eval_numerical_gradient")


def _elementwise_error(a, b, denominator):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(a - b) / denominator(np.abs(a), np.abs(b))


def _floored_sum(a, b):
    return np.maximum(1e-8, a + b)


REL_ERROR_FORMULA = "the course's rel_error is max(|a - b| / max(1e-8, |a| + |b|)), elementwise then the maximum"
REL_ERROR_MISTAKES = [
    Mistake("returns the mean of the elementwise errors; a gradient check needs the worst entry: " + REL_ERROR_FORMULA,
            lambda a, b: np.mean(_elementwise_error(a, b, _floored_sum))),
    Mistake("returns the absolute error max |a - b|; it must be relative: " + REL_ERROR_FORMULA,
            lambda a, b: np.max(np.abs(np.asarray(a, dtype=np.float64) - b))),
    Mistake("divides by |b| only; " + REL_ERROR_FORMULA,
            lambda a, b: np.max(_elementwise_error(a, b, lambda p, q: np.maximum(1e-8, q)))),
    Mistake("divides by max(|a|, |b|); " + REL_ERROR_FORMULA,
            lambda a, b: np.max(_elementwise_error(a, b, lambda p, q: np.maximum(1e-8, np.maximum(p, q))))),
    Mistake("takes the ratio of the maxima, max |a - b| / max(|a| + |b|); " + REL_ERROR_FORMULA,
            lambda a, b: np.max(np.abs(np.asarray(a) - b)) / max(1e-8, np.max(np.abs(a) + np.abs(b)))),
    Mistake("drops the absolute values; " + REL_ERROR_FORMULA,
            lambda a, b: np.max((np.asarray(a, dtype=np.float64) - b) / np.maximum(1e-8, np.asarray(a) + b))),
]


def rel_error(r):
    """``rel_error(a, b)``: a float, 0 for two arrays of zeros (never nan), then every case."""
    for what in probes.ZEROS:
        value = r.get(what, 0.0, "rel_error", what)
        if not np.isfinite(value) or value != 0.0:
            raise AssertionError(f"rel_error of {what} is {value}, not 0: floor the denominator "
                                 "at 1e-8, max(1e-8, |a| + |b|), so that 0 / 0 cannot happen")
    with np.errstate(all="ignore"):
        compare(r, "case", bnref.rel_error, probes.rel_error_cases(), "rel_error", REL_ERROR_MISTAKES, pick=float,
                tol=(1e-9, 1e-15))


# The layer

LAYER = "BatchNorm1d"
LAYER_EPS = 1e-5  # the locked default of BatchNorm1d(num_features, eps=1e-5, momentum=0.1), which the probe keeps


def _torch_gradients(d, momentum, gamma, beta, steps):
    """[(dx, dgamma, dbeta)] of ``torch.nn.BatchNorm1d`` stepped through ``steps`` [(mode, x, dout)], forward
    and backward, from the grader's own gamma, beta, inputs and upstream gradients."""
    import torch

    ref = torch.nn.BatchNorm1d(d, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(gamma))
        ref.bias.copy_(torch.from_numpy(beta))
    found = []
    for mode, x, dout in steps:
        getattr(ref, mode)()
        ref.zero_grad()
        xt = torch.tensor(x, requires_grad=True)
        ref(xt).backward(torch.tensor(dout))
        found.append((xt.grad.numpy(), ref.weight.grad.numpy().copy(), ref.bias.grad.numpy().copy()))
    return found


def _layer_gradients(r, key, expected, where):
    """(dx, dgamma, dbeta) recorded at one step, shaped like ``expected``; a missing one is named."""
    name = f"{LAYER}.backward"
    got = []
    for what, like in zip(("dx", "dgamma", "dbeta"), expected):
        record = r.record(f"{key}.{what}", name, where)
        if (what != "dx" and "error" in record) or record.get("value", 0) is None:
            raise AssertionError(f"{name} must return dx and set self.dgamma and self.dbeta ({where})")
        got.append(r.get(f"{key}.{what}", like, name if what == "dx" else f"{LAYER}.{what}", where))
    return tuple(got)


def _diagnose_layer(dx, x, gamma, dout, mode, where):
    """Name the mode mix-ups of a layer whose gradients differ from torch's."""
    if mode == "eval" and close(dx, _variant(x, gamma, LAYER_EPS, dout)[0]):
        raise AssertionError(f"{LAYER}.backward: after an eval-mode forward it uses the training-mode gradient; "
                             f"{EVAL_THROUGH_STATS} ({where})")
    if mode == "train" and close(dx, _variant(x, gamma, LAYER_EPS, dout, mean_w=0.0, var_w=0.0)[0]):
        raise AssertionError(f"{LAYER}.backward: after a training-mode forward the gradient must flow through the "
                             f"batch mean and variance; yours treats them as constants ({where})")
    raise AssertionError(f"{LAYER}.backward: dx, dgamma or dbeta differ from torch.nn.BatchNorm1d at {where}")


def batchnorm1d_backward(r):
    """``BatchNorm1d`` forward (as in chapter 2), then forward and backward in lockstep with torch.

    ``backward(dout)`` returns dx and sets ``dgamma`` and ``dbeta``, in the mode of the forward before it. The
    expected gradients come from the grader's own dout, whatever the student's call did to its copy.
    """
    ch02.batchnorm1d(r)
    for run, (n, d, momentum, gamma, beta, steps) in enumerate(probes.layer_backward_runs()):
        r.get(f"b{run}.init", None, LAYER, f"BatchNorm1d({d}, momentum={momentum})")
        for step, ((mode, x, dout), expected) in enumerate(zip(steps, _torch_gradients(d, momentum, gamma, beta,
                                                                                        steps))):
            key, where = f"b{run}.{step}", f"step {step} ({mode} mode), x ({n}, {d}), random dout"
            r.get(f"{key}.mode", None, f"{LAYER}.{mode}", where)
            r.get(f"{key}.forward", None, f"{LAYER}.forward", where)
            got = _layer_gradients(r, key, expected, where)
            if not close(got, expected, np.float64, tol=(1e-6, 1e-8)):
                _diagnose_layer(got[0], x, gamma, dout, mode, where)
