"""Hidden tests of chapter 3, *Batch norm backward in NumPy*.

Students choose their own cache format, so a backward pass is graded through
the student's own ``batchnorm_forward``: its cache goes into the student's
backward, and the gradients are compared with ``bnref``'s for the same inputs
(several shapes and eps, float64 and float32, always a random upstream
gradient: a constant one gives dx = 0 and hides bugs). The known mistakes are
written as variants of the closed form

    dx = gamma * (a * (dout - mean(dout)) - b * xmu * mean(dout * xmu))

(a = rstd, b = rstd**3 when correct, xmu = x - mean), with one path or one
factor changed.
"""
import numpy as np

import bnref
from bncapture import functions

from bngrade.verdicts import ch02
from bngrade.judge.compare import Case, Mistake, check_inputs_unchanged, check_not_reference, close, compare, random_matrix

BACKWARD_SHAPES = [((2, 3), 1e-5), ((7, 5), 1e-3), ((64, 33), 0.1), ((129, 1), 1e-5)]


def _backward_cases(seed=31):
    """Cases (x, gamma, beta, eps, dout); the last two make eps matter and test a constant feature."""
    rng = np.random.default_rng(seed)
    cases = []

    def add(x, eps, what):
        d = x.shape[1]
        gamma = rng.uniform(0.5, 2.0, d).astype(x.dtype)
        beta = rng.normal(0.0, 1.0, d).astype(x.dtype)
        dout = rng.standard_normal(x.shape).astype(x.dtype)
        cases.append(Case((x, gamma, beta, eps, dout), f"x {x.shape} {x.dtype.name}{what}, eps={eps}, random dout"))

    for dtype in (np.float64, np.float32):
        for shape, eps in BACKWARD_SHAPES:
            add(random_matrix(rng, shape, dtype), eps, "")
    add(1e-3 * random_matrix(rng, (32, 6), np.float64), 1e-5, " with std ~ 1e-3")
    x = random_matrix(rng, (16, 4), np.float64)
    x[:, 2] = 1.5
    add(x, 1e-5, " whose feature 2 is constant")
    return cases


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


def forward_then_backward(forward, backward):
    """``run(x, gamma, beta, eps, dout)``: ``backward(dout, cache)`` with the cache of ``forward``.

    The graded functions are listed in ``graded_parts``, so compare's check for
    the reference package looks at them.
    """
    def run(x, gamma, beta, eps, dout):
        _, cache = forward(x, gamma, beta, eps)
        return backward(dout, cache)

    run.graded_parts = (forward, backward)
    return run


REFERENCE = forward_then_backward(bnref.batchnorm_forward, bnref.batchnorm_backward)


def _check_forward_first(forward, cases, name):
    """The backward is graded with the student's cache: name a wrong forward pass before anything else."""
    forward_cases = [Case(case.args[:4], case.label) for case in cases]
    try:
        compare(forward, bnref.batchnorm_forward, forward_cases, "batchnorm_forward", ch02.FORWARD_MISTAKES,
                pick=lambda result: result[0])
    except AssertionError as err:
        raise AssertionError(f"{name} is graded with the cache of your batchnorm_forward, which is not right "
                             f"yet: {err}") from None


def check_batchnorm_backward(forward, backward, name="batchnorm_backward"):
    """Hidden test of ``batchnorm_backward(dout, cache) -> (dx, dgamma, dbeta)`` (staged or closed form).

    ``cache`` comes from the student's ``forward``; any correct backward passes,
    whichever form it takes.
    """
    check_not_reference(forward, "batchnorm_forward")
    cases = _backward_cases()
    _check_forward_first(forward, cases, name)
    student = forward_then_backward(forward, backward)
    with np.errstate(all="ignore"):
        compare(student, REFERENCE, cases, name, BACKWARD_MISTAKES)
    check_inputs_unchanged(student, cases[:3], name)


# Eval mode: the running statistics are constants.

def _inference_backward_cases(seed=32):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for shape, eps in zip([(9, 6), (50, 17), (1, 4)], (1e-5, 0.1, 1e-3)):
            d = shape[1]
            x = random_matrix(rng, shape, dtype)
            params = [rng.uniform(0.5, 2.0, d), rng.normal(size=d), rng.uniform(0.05, 2.0, d)]
            dout = rng.standard_normal(shape).astype(dtype)
            cases.append(Case((dout, x, *(p.astype(dtype) for p in params), eps),
                              f"x {shape} {np.dtype(dtype).name}, eps={eps}, random dout"))
    return cases


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


def check_batchnorm_inference_backward(student):
    """Hidden test of ``batchnorm_inference_backward(dout, x, gamma, running_mean, running_var, eps)``."""
    cases = _inference_backward_cases()
    with np.errstate(all="ignore"):
        compare(student, bnref.batchnorm_inference_backward, cases, "batchnorm_inference_backward",
                INFERENCE_BACKWARD_MISTAKES)
    check_inputs_unchanged(student, cases, "batchnorm_inference_backward")


# Gradient checking

def _gradcheck_cases(seed=33):
    """Test functions f of :mod:`bncapture.functions` (public: the sandbox builds them from their names), among
    them f = identity and f = transpose, whose results are x itself or a view of it."""
    rng = np.random.default_rng(seed)
    w, a = rng.normal(size=(3, 4)), rng.normal(size=(4, 2))
    return [
        Case((functions.SinTimes(w), rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), 1e-5),
             "f(x) = sin(x) * w, x (3, 4), h=1e-5"),
        Case((functions.MatMul(a), rng.normal(size=(5, 4)), rng.normal(size=(5, 2)), 1e-5),
             "f(x) = x @ A, x (5, 4), f(x) (5, 2), h=1e-5"),
        Case((functions.Cube(), rng.normal(size=6), rng.normal(size=6), 1e-2), "f(x) = x**3, x (6,), h=1e-2"),
        Case((functions.ColumnSoftmax(rng.uniform(0.5, 2.0, 3)), random_matrix(rng, (6, 3), np.float64),
              rng.normal(size=(6, 3)), 1e-5),
             "f(x) = softmax over the batch axis of x (6, 3), times w, h=1e-5"),
        Case((functions.Identity(), rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 1e-5),
             "f(x) = x itself (no copy), x (4, 3), h=1e-5"),
        Case((functions.Transpose(), rng.normal(size=(2, 5)), rng.normal(size=(5, 2)), 1e-5),
             "f(x) = x.T (a view of x), x (2, 5), h=1e-5"),
    ]


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


def check_eval_numerical_gradient(student):
    """Hidden test of ``eval_numerical_gradient(f, x, df, h=1e-5)``."""
    cases = _gradcheck_cases()
    compare(student, bnref.eval_numerical_gradient, cases, "eval_numerical_gradient", GRADCHECK_MISTAKES)
    check_inputs_unchanged(student, cases, "eval_numerical_gradient")


def _rel_error_cases(seed=34):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(5, 4))
    return [
        Case((np.array([3.0, 0.5]), np.array([1.5, 0.1])), "a, b (2,) of different sizes"),
        Case((a, a + 1e-6 * rng.normal(size=a.shape)), "a (5, 4), b = a + 1e-6 noise"),
        Case((a * 10.0 ** rng.integers(-3, 4, a.shape), rng.normal(size=a.shape)), "unrelated a, b (5, 4), "
             "magnitudes 1e-3..1e3"),
        Case((np.array([0.0, 1.0, -2.0, 3.0]), np.array([0.0, 1.5, -2.0, 2.0])), "a, b (4,) with a shared 0"),
        Case((np.array([1e-9, 5.0]), np.array([0.0, 5.5])), "a, b (2,) with entries near 0"),
        Case((np.array([2.0, -1.0]), np.array([-2.0, -1.0])), "a, b (2,) with opposite signs"),
    ]


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


def check_rel_error(student):
    """Hidden test of ``rel_error(a, b)``: a float, 0 for equal inputs, never nan."""
    check_not_reference(student, "rel_error")
    with np.errstate(all="ignore"):
        for a in (np.zeros(3), np.zeros((2, 2))):
            try:
                value = float(student(a, a.copy()))
            except NotImplementedError:
                raise AssertionError("rel_error is not implemented yet.") from None
            except Exception as exc:
                raise AssertionError(f"rel_error raised {type(exc).__name__}: {exc} for two arrays of zeros") from None
            if not np.isfinite(value) or value != 0.0:
                raise AssertionError(f"rel_error of two arrays of zeros is {value}, not 0: floor the denominator "
                                     "at 1e-8, max(1e-8, |a| + |b|), so that 0 / 0 cannot happen")
        compare(student, bnref.rel_error, _rel_error_cases(), "rel_error", REL_ERROR_MISTAKES,
                pick=lambda value: np.float64(value), tol=(1e-9, 1e-15))


# The layer

def check_batchnorm1d_backward(student_cls):
    """Hidden test: ``BatchNorm1d`` forward (as in chapter 2), then its backward in lockstep with torch.

    ``backward(dout)`` returns dx and sets ``dgamma`` and ``dbeta``, in the mode of the forward before it.
    """
    import torch

    ch02.check_batchnorm1d(student_cls)
    rng = np.random.default_rng(35)
    for n, d, momentum in [(8, 3, 0.1), (20, 6, 0.5)]:
        layer = student_cls(d, momentum=momentum)
        layer.gamma, layer.beta = rng.uniform(0.5, 2.0, d), rng.normal(size=d)
        ref = torch.nn.BatchNorm1d(d, momentum=momentum, dtype=torch.float64)
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(layer.gamma))
            ref.bias.copy_(torch.from_numpy(layer.beta))
        for step, mode in enumerate(["train", "train", "eval", "train", "eval", "eval"]):
            getattr(layer, mode)()
            getattr(ref, mode)()
            x, dout = random_matrix(rng, (n, d), np.float64), rng.standard_normal((n, d))
            where = f"step {step} ({mode} mode), x ({n}, {d}), random dout"
            got = _layer_step(layer, x, dout, where)
            ref.zero_grad()
            xt = torch.from_numpy(x).requires_grad_()
            ref(xt).backward(torch.from_numpy(dout))
            expected = (xt.grad.numpy(), ref.weight.grad.numpy(), ref.bias.grad.numpy())
            if not close(got, expected, np.float64, tol=(1e-6, 1e-8)):
                _diagnose_layer(layer, x, dout, got, mode, where)


def _layer_step(layer, x, dout, where):
    """One forward and backward of the student's layer: (dx, dgamma, dbeta)."""
    try:
        layer.forward(x)
        dx = layer.backward(dout)
    except NotImplementedError:
        raise AssertionError("BatchNorm1d.backward is not implemented yet.") from None
    except Exception as exc:
        raise AssertionError(f"BatchNorm1d raised {type(exc).__name__}: {exc} at {where}") from None
    grads = (dx, getattr(layer, "dgamma", None), getattr(layer, "dbeta", None))
    if any(g is None for g in grads):
        raise AssertionError(f"BatchNorm1d.backward must return dx and set self.dgamma and self.dbeta ({where})")
    return grads


def _diagnose_layer(layer, x, dout, got, mode, where):
    if mode == "eval" and close(got[0], _variant(x, layer.gamma, layer.eps, dout)[0]):
        raise AssertionError(f"BatchNorm1d.backward: after an eval-mode forward it uses the training-mode gradient; "
                             f"{EVAL_THROUGH_STATS} ({where})")
    if mode == "train" and close(got[0], _variant(x, layer.gamma, layer.eps, dout, mean_w=0.0, var_w=0.0)[0]):
        raise AssertionError("BatchNorm1d.backward: after a training-mode forward the gradient must flow through the "
                             f"batch mean and variance; yours treats them as constants ({where})")
    raise AssertionError(f"BatchNorm1d.backward: dx, dgamma or dbeta differ from torch.nn.BatchNorm1d at {where}")
