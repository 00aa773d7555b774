"""Chapter 3's hidden checks, differential: each check (probe, plain-data encoding, verdict, in-process) against
the solved source, every seeded mistake of :mod:`bngrade.verdicts.ch03`, correct alternatives written unlike the
solution (each must pass without a word), the seeded class, and hostile answers that must gain nothing.

A notebook's namespace holds the setup cell's definitions and the answer cells, as in the sandbox; students are
source strings run there, or functions of this module, which never imports the reference package (the in-process
check refuses a graded function whose globals hold it).
"""
import re
import functools

import jupytext
import numpy as np
import pytest

import differential
from bngrade.judge.check import check
from bngrade.pipeline.course import SOURCES
from bngrade.verdicts import ch02, ch03
from class_roster import ROSTER

CH03 = "ch03_batchnorm_backward"
#: the answer cells as released: each solution replaced by ``raise NotImplementedError()``
RELEASED = {c.metadata["nbgrader"]["grade_id"]: re.sub(r"### BEGIN SOLUTION.*?### END SOLUTION",
                                                       "raise NotImplementedError()", c.source, flags=re.S)
            for c in jupytext.read(SOURCES / f"{CH03}.md").cells if c.metadata.get("nbgrader", {}).get("solution")}
KEYS = ["ch02.batchnorm_forward", "ch03.batchnorm_backward", "ch03.batchnorm_backward_alt",
        "ch03.batchnorm_inference_backward", "ch03.eval_numerical_gradient", "ch03.rel_error",
        "ch03.batchnorm1d_backward"]


namespace = functools.partial(differential.submission, CH03)
fails = functools.partial(differential.fails, "ch03")


# The solved source, and the seeded class of the grading tests

@pytest.mark.parametrize("key", KEYS)
def test_the_solution_passes(key):
    check(key, namespace())


@pytest.mark.parametrize("student", [s for s, spec in ROSTER[CH03].items() if spec is not None])
def test_the_roster_loses_exactly_its_cells(student):
    """The seeded class, hidden checks in-process (test_grading grades it in nbgrader, visible tests too)."""
    spec = ROSTER[CH03][student]
    differential.loses_its_cells(CH03, spec, namespace(spec=spec))


def test_the_released_notebook_loses_every_graded_cell():
    lost, messages = differential.lost_cells(CH03, namespace(spec={"override": RELEASED}))
    graded = {c.metadata["nbgrader"]["grade_id"] for c in jupytext.read(SOURCES / f"{CH03}.md").cells
              if c.metadata.get("nbgrader", {}).get("grade")}
    assert lost == graded and all("not implemented yet" in m or "is not defined" in m for m in messages), messages


def test_the_reference_package_is_refused():
    ns = namespace("import bnref\ndef batchnorm_backward(dout, cache):\n    return bnref.batchnorm_backward_alt(dout, "
                   "cache)\n")
    fails("batchnorm_backward", ns, "reference package")


# Correct alternatives: other caches (CS231n tuples, lists, dicts, namedtuples, (1, D) and (D, 1) statistics),
# other staged and closed forms, in-place accumulation, einsum, float32 kept all the way, float64 internals

CS231N_STAGED = """
def batchnorm_forward(x, gamma, beta, eps=1e-5):
    N, D = x.shape
    mu = 1. / N * np.sum(x, axis=0)
    xmu = x - mu
    sq = xmu ** 2
    var = 1. / N * np.sum(sq, axis=0)
    sqrtvar = np.sqrt(var + eps)
    ivar = 1. / sqrtvar
    xhat = xmu * ivar
    out = gamma * xhat + beta
    return out, (xhat, gamma, xmu, ivar, sqrtvar, var, eps)

def batchnorm_backward(dout, cache):
    xhat, gamma, xmu, ivar, sqrtvar, var, eps = cache
    N, D = dout.shape
    dbeta = np.sum(dout, axis=0)
    dgamma = np.sum(dout * xhat, axis=0)
    dxhat = dout * gamma
    divar = np.sum(dxhat * xmu, axis=0)
    dxmu1 = dxhat * ivar
    dsqrtvar = -1. / (sqrtvar ** 2) * divar
    dvar = 0.5 * 1. / np.sqrt(var + eps) * dsqrtvar
    dsq = 1. / N * np.ones((N, D)) * dvar
    dxmu2 = 2 * xmu * dsq
    dmu = -1 * np.sum(dxmu1 + dxmu2, axis=0)
    dx = dxmu1 + dxmu2 + 1. / N * np.ones((N, D)) * dmu
    return dx, dgamma, dbeta

def batchnorm_backward_alt(dout, cache):  # a second staged form: through x_hat, then var, then mu
    xhat, gamma, xmu, ivar, sqrtvar, var, eps = cache
    N = dout.shape[0]
    dxhat = dout * gamma
    dvar = np.sum(dxhat * xmu, axis=0) * -0.5 * (var + eps) ** -1.5
    dmu = np.sum(-dxhat * ivar, axis=0) + dvar * np.mean(-2.0 * xmu, axis=0)
    dx = dxhat * ivar + dvar * 2.0 * xmu / N + dmu / N
    return dx, np.sum(dout * xhat, axis=0), np.sum(dout, axis=0)
"""

DICT_CACHE = """
def batchnorm_forward(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=0)
    var = x.var(axis=0)
    std = np.sqrt(var + eps)
    x_norm = (x - mean) / std
    out = gamma * x_norm + beta
    cache = {"x": x, "mean": mean, "var": var, "std": std, "x_norm": x_norm, "gamma": gamma, "beta": beta,
             "eps": eps, "out": out, "N": x.shape[0], "D": x.shape[1], "axis": 0, "mode": "train",
             "centered": x - mean}
    return out, cache

def batchnorm_backward(dout, cache):  # staged through the standard deviation
    xc, std, gamma, N = cache["centered"], cache["std"], cache["gamma"], cache["N"]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xc / std).sum(axis=0)
    dxn = dout * gamma
    dxc = dxn / std
    dstd = -(dxn * xc / std ** 2).sum(axis=0)
    dvar = 0.5 * dstd / std
    dxc = dxc + (2.0 / N) * xc * dvar
    dx = dxc - dxc.sum(axis=0) / N
    return dx, dgamma, dbeta

def batchnorm_backward_alt(dout, cache):  # the closed form, divided by N * sigma last
    N, x_norm = cache["N"], cache["x_norm"]
    dxn = dout * cache["gamma"]
    dx = (N * dxn - dxn.sum(axis=0) - x_norm * (dxn * x_norm).sum(axis=0)) / (N * cache["std"])
    return dx, (dout * x_norm).sum(axis=0), dout.sum(axis=0)
"""

LIST_KEEPDIMS_IN_PLACE = """
def batchnorm_forward(x, gamma, beta, eps=1e-5):
    mu = x.mean(axis=0, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=0, keepdims=True)
    inv = 1.0 / np.sqrt(var + eps)
    xh = (x - mu) * inv
    return gamma * xh + beta, [xh, inv, gamma.reshape(1, -1), mu, var]

def batchnorm_backward(dout, cache):  # accumulates into dx in place
    xh, inv, gamma, _, _ = cache
    dxh = dout * gamma
    dx = dxh.copy()
    dx -= dxh.mean(axis=0, keepdims=True)
    dx -= xh * (dxh * xh).mean(axis=0, keepdims=True)
    dx *= inv
    return dx, (dout * xh).sum(axis=0), dout.sum(axis=0)

def batchnorm_backward_alt(dout, cache):
    xh, inv, gamma, _, _ = cache
    n = len(dout)
    dbeta, dgamma = dout.sum(axis=0), np.einsum("nd,nd->d", dout, xh)
    dx = np.empty_like(dout)
    np.multiply(dout, n, out=dx)
    np.subtract(dx, dbeta, out=dx)
    np.subtract(dx, xh * dgamma, out=dx)
    np.multiply(dx, gamma * inv / n, out=dx)
    return dx, dgamma, dbeta
"""

EINSUM_NAMEDTUPLE = """
from collections import namedtuple

Saved = namedtuple("Saved", "x_hat inv_std gamma")

def batchnorm_forward(x, gamma, beta, eps=1e-5):
    x64 = x.astype(np.float64)  # float64 internals, the output in x's dtype
    n = x.shape[0]
    mean = np.einsum("nd->d", x64) / n
    xc = x64 - mean
    inv_std = 1.0 / np.sqrt(np.einsum("nd,nd->d", xc, xc) / n + eps)
    x_hat = np.einsum("nd,d->nd", xc, inv_std)
    return (np.einsum("nd,d->nd", x_hat, gamma) + beta).astype(x.dtype), Saved(x_hat, inv_std, gamma)

def batchnorm_backward(dout, cache):
    n = dout.shape[0]
    dbeta = np.einsum("nd->d", dout)
    dgamma = np.einsum("nd,nd->d", dout, cache.x_hat)
    dx = np.einsum("d,nd->nd", cache.gamma * cache.inv_std / n, n * dout - dbeta - cache.x_hat * dgamma)
    return dx, dgamma, dbeta

batchnorm_backward_alt = batchnorm_backward
"""

COLUMNS_ON_THE_TRANSPOSE = """
def batchnorm_forward(x, gamma, beta, eps=1e-5):
    xt = x.T
    mean = xt.mean(axis=1, keepdims=True)           # (D, 1)
    var = xt.var(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(var + eps)
    xhat_t = (xt - mean) * rstd
    return (gamma[:, None] * xhat_t + beta[:, None]).T, (eps, var, mean, gamma[:, None], rstd, xhat_t)

def batchnorm_backward(dout, cache):
    eps, var, mean, g, rstd, xhat_t = cache
    dt = dout.T
    n = dt.shape[1]
    dxhat = dt * g
    dx_t = rstd / n * (n * dxhat - dxhat.sum(axis=1, keepdims=True)
                       - xhat_t * (dxhat * xhat_t).sum(axis=1, keepdims=True))
    return dx_t.T, (dt * xhat_t).sum(axis=1), dt.sum(axis=1)

batchnorm_backward_alt = batchnorm_backward
"""

FLOAT32_ALL_THE_WAY = """
def batchnorm_forward(x, gamma, beta, eps=1e-5):
    eps = np.asarray(eps, dtype=x.dtype)
    mean = np.sum(x, axis=0, dtype=x.dtype) / x.shape[0]
    var = np.sum((x - mean) ** 2, axis=0, dtype=x.dtype) / x.shape[0]
    x_hat = (x - mean) / np.sqrt(var + eps)
    return gamma * x_hat + beta, (x_hat, gamma, var + eps)

def batchnorm_backward(dout, cache):
    x_hat, gamma, var_eps = cache
    dbeta, dgamma = dout.sum(axis=0), (dout * x_hat).sum(axis=0)
    return gamma / np.sqrt(var_eps) * (dout - dbeta / len(dout) - x_hat * dgamma / len(dout)), dgamma, dbeta

batchnorm_backward_alt = batchnorm_backward
"""

INFERENCE_KEEPDIMS = """
def batchnorm_inference_backward(dout, x, gamma, running_mean, running_var, eps=1e-5):
    rstd = (1.0 / np.sqrt(running_var + eps)).reshape(1, -1)
    dx = dout * gamma.reshape(1, -1) * rstd
    dgamma = np.sum(dout * (x - running_mean.reshape(1, -1)) * rstd, axis=0, keepdims=True).ravel()
    return dx, dgamma, dout.sum(axis=0, keepdims=True).reshape(-1)
"""

INFERENCE_LOOP_FLOAT64 = """
def batchnorm_inference_backward(dout, x, gamma, running_mean, running_var, eps=1e-5):
    d64, x64 = dout.astype(np.float64), x.astype(np.float64)
    dx, dgamma, dbeta = np.empty_like(d64), np.empty(x.shape[1]), np.empty(x.shape[1])
    for j in range(x.shape[1]):
        s = 1.0 / np.sqrt(float(running_var[j]) + eps)
        dx[:, j] = d64[:, j] * float(gamma[j]) * s
        dgamma[j] = np.dot(d64[:, j], (x64[:, j] - float(running_mean[j])) * s)
        dbeta[j] = d64[:, j].sum()
    return dx.astype(dout.dtype), dgamma.astype(dout.dtype), dbeta.astype(dout.dtype)
"""

GRADCHECK_NDITER = """
def eval_numerical_gradient(f, x, df, h=1e-5):
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index
        oldval = x[ix]
        x[ix] = oldval + h
        pos = f(x).copy()
        x[ix] = oldval - h
        neg = f(x).copy()
        x[ix] = oldval
        grad[ix] = np.sum((pos - neg) * df) / (2 * h)
        it.iternext()
    return grad
"""

GRADCHECK_OUT_OF_PLACE = """
def eval_numerical_gradient(f, x, df, h=1e-5):
    base = np.asarray(x, dtype=float)
    grad = np.empty(base.size)
    for i in range(base.size):
        step = np.zeros(base.size)
        step[i] = h
        step = step.reshape(base.shape)
        grad[i] = np.sum((np.asarray(f(base + step)) - np.asarray(f(base - step))) * df) / (2 * h)
    return grad.reshape(base.shape)
"""

REL_ERROR_NUMPY_SCALAR = """
def rel_error(a, b):
    return np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b)))
"""

REL_ERROR_LOOP = """
def rel_error(a, b):
    worst = 0.0
    for p, q in zip(np.ravel(a).astype(float), np.ravel(b).astype(float)):
        worst = max(worst, abs(p - q) / max(1e-8, abs(p) + abs(q)))
    return worst
"""

LAYER_OF_ITS_OWN = """
class BatchNorm1d:
    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        self.eps = eps
        self.momentum = momentum
        self.training = True
        self.dgamma = self.dbeta = None
        self.gamma, self.beta = np.ones(num_features), np.zeros(num_features)
        self.running_mean, self.running_var = np.zeros(num_features), np.ones(num_features)
        self._saved = {}

    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    def forward(self, x):
        if self.training:
            mean, var, n = x.mean(0), x.var(0), len(x)
            self.running_mean *= 1 - self.momentum
            self.running_mean += self.momentum * mean
            self.running_var *= 1 - self.momentum
            self.running_var += self.momentum * var * n / (n - 1)
        else:
            mean, var = self.running_mean, self.running_var
        inv = 1 / np.sqrt(var + self.eps)
        xh = (x - mean) * inv
        self._saved = {"xh": xh, "inv": inv, "train": self.training}
        return self.gamma * xh + self.beta

    def backward(self, dout):
        s = self._saved
        g = dout * self.gamma
        self.dbeta, self.dgamma = dout.sum(0), (dout * s["xh"]).sum(0)
        if not s["train"]:
            return g * s["inv"]
        return s["inv"] * (g - g.mean(0) - s["xh"] * (g * s["xh"]).mean(0))
"""

ALTERNATIVES = {
    "cs231n-staged-7-tuple": [CS231N_STAGED, INFERENCE_KEEPDIMS, GRADCHECK_NDITER, REL_ERROR_NUMPY_SCALAR],
    "dict-14-keys-divide-by-n-sigma-last": [DICT_CACHE, INFERENCE_LOOP_FLOAT64, GRADCHECK_OUT_OF_PLACE,
                                            REL_ERROR_LOOP],
    "list-keepdims-in-place": [LIST_KEEPDIMS_IN_PLACE, LAYER_OF_ITS_OWN],
    "einsum-namedtuple-float64-inside": [EINSUM_NAMEDTUPLE],
    "columns-of-the-transpose": [COLUMNS_ON_THE_TRANSPOSE],
    "float32-all-the-way": [FLOAT32_ALL_THE_WAY],
}


@pytest.mark.parametrize("alternative", sorted(ALTERNATIVES))
@pytest.mark.parametrize("key", KEYS)
def test_correct_alternatives_pass(alternative, key):
    """Every check, the layer included (it runs on the alternative's own functions where it has no class)."""
    check(key, namespace(*ALTERNATIVES[alternative]))


def test_a_cache_that_cannot_be_copied_is_handed_over_as_it_is():
    """The probe copies a call's arguments; an opaque cache that refuses to be copied still reaches the backward."""
    check("ch03.batchnorm_backward", namespace("""
    class Sticky(tuple):
        def __deepcopy__(self, memo):
            raise RuntimeError("no copies")
    _solution = batchnorm_forward
    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        out, cache = _solution(x, gamma, beta, eps)
        return out, Sticky(cache)
    """))


# Every seeded mistake is named by its own message

def _input_caching(**backwards):
    """The solution, with a forward whose cache is its inputs (x, gamma, beta, eps) and ``backwards``."""
    ns = namespace()
    right = ns["batchnorm_forward"]

    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        return right(x, gamma, beta, eps)[0], (x, gamma, beta, eps)

    ns.update(batchnorm_forward=batchnorm_forward, **backwards)
    return ns


def _said(name, message):
    """How a verdict names a mistake: the function's name, the mistake's own message, the input."""
    return f"{name}: {message} (input: "


@pytest.mark.parametrize("name", ["batchnorm_backward", "batchnorm_backward_alt"])
@pytest.mark.parametrize("mistake", ch03.BACKWARD_MISTAKES, ids=lambda m: m.message[:60])
def test_each_backward_mistake_is_named(mistake, name):
    def backward(dout, cache):
        return tuple(np.asarray(g).astype(cache[0].dtype) for g in mistake.fn(*cache, dout))

    fails(name, _input_caching(**{name: backward}), _said(name, mistake.message))


def test_a_wrong_forward_is_named_first():
    ns = namespace()
    right = ns["batchnorm_backward_alt"]
    forward = ns["batchnorm_forward"]

    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        return ch02.FORWARD_MISTAKES[0].fn(x, gamma, beta, eps).astype(x.dtype), forward(x, gamma, beta, eps)[1]

    ns.update(batchnorm_forward=batchnorm_forward, batchnorm_backward=right)
    fails("batchnorm_backward", ns, "graded with the cache of your batchnorm_forward, which is not right yet: "
          "batchnorm_forward: your variance divides by N-1")


@pytest.mark.parametrize("mistake", ch03.INFERENCE_BACKWARD_MISTAKES, ids=lambda m: m.message[:60])
def test_each_inference_backward_mistake_is_named(mistake):
    def batchnorm_inference_backward(*args):
        return tuple(np.asarray(g).astype(args[1].dtype) for g in mistake.fn(*args))

    fails("batchnorm_inference_backward", namespace(batchnorm_inference_backward=batchnorm_inference_backward),
          _said("batchnorm_inference_backward", mistake.message))


@pytest.mark.parametrize("name,mistake", [("eval_numerical_gradient", m) for m in ch03.GRADCHECK_MISTAKES]
                         + [("rel_error", m) for m in ch03.REL_ERROR_MISTAKES], ids=lambda arg: str(arg)[:60])
def test_each_gradcheck_tool_mistake_is_named(name, mistake):
    def student(*args):
        return mistake.fn(*args)

    fails(name, namespace(**{name: student}), _said(name, mistake.message))


def test_a_gradcheck_that_leaves_x_perturbed_in_the_callers_array_is_named():
    ns = namespace("""
    def eval_numerical_gradient(f, x, df, h=1e-5):
        grad = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            x[i] += h
            up = f(x)
            x[i] -= 2 * h
            grad[i] = np.sum((up - f(x)) * df) / (2 * h)
        return grad
    """)
    fails("eval_numerical_gradient", ns, "x is not restored after each perturbation")


def test_rel_error_without_a_floor_is_named():
    ns = namespace("def rel_error(a, b):\n    return np.max(np.abs(a - b) / (np.abs(a) + np.abs(b)))\n")
    fails("rel_error", ns, "floor the denominator")


EVAL_THROUGH_BATCH_STATS = """
class Layer(BatchNorm1d):
    def backward(self, dout):
        if self.cache is None:
            _, self.cache = batchnorm_forward(self.eval_input, self.gamma, self.beta, self.eps)
        return super().backward(dout)
BatchNorm1d = Layer
"""

TRAIN_WITHOUT_STATS = """
class Layer(BatchNorm1d):
    def backward(self, dout):
        if self.cache is None:
            return super().backward(dout)
        x_hat, xmu, var, eps, gamma = self.cache
        self.dgamma, self.dbeta = (dout * x_hat).sum(axis=0), dout.sum(axis=0)
        return dout * gamma / np.sqrt(var + eps)
BatchNorm1d = Layer
"""

NO_PARAMETER_GRADIENTS = """
class Layer(BatchNorm1d):
    def backward(self, dout):
        dx = super().backward(dout)
        del self.dgamma
        return dx
BatchNorm1d = Layer
"""


@pytest.mark.parametrize("layer,says", [
    (EVAL_THROUGH_BATCH_STATS, "after an eval-mode forward it uses the training-mode gradient"),
    (TRAIN_WITHOUT_STATS, "yours treats them as constants"),
    (NO_PARAMETER_GRADIENTS, "set self.dgamma and self.dbeta"),
], ids=["eval-through-batch-stats", "train-without-stats", "no-parameter-gradients"])
def test_each_layer_backward_mistake_is_named(layer, says):
    fails("batchnorm1d_backward", namespace(layer), says)


# Hostile answers gain nothing: the expected values come from the grader's own inputs, shapes are exact

def test_a_layer_that_zeroes_dout_in_place_gets_nothing():
    """Issue 16: a layer that set dout[...] = 0 got 3/3, torch's gradients being taken from the zeroed dout."""
    ns = namespace("""
    class Layer(BatchNorm1d):
        def backward(self, dout):
            dout[...] = 0
            return super().backward(dout)
    BatchNorm1d = Layer
    """)
    fails("batchnorm1d_backward", ns, "differ from torch.nn.BatchNorm1d")


def test_a_backward_that_zeroes_dout_in_place_gets_nothing():
    ns = namespace("""
    def batchnorm_backward(dout, cache):
        dout[...] = 0
        return batchnorm_backward_alt(dout, cache)
    """)
    fails("batchnorm_backward", ns, "does not match the reference")


def test_a_backward_that_modifies_dout_in_place_is_named():
    ns = namespace("""
    def batchnorm_backward(dout, cache):
        grads = batchnorm_backward_alt(dout.copy(), cache)
        dout *= 2.0
        return grads
    """)
    fails("batchnorm_backward", ns, "modifies its input arrays in place")


def test_a_layer_whose_parameters_read_as_zeros_gets_nothing():
    """gamma and beta are properties that read 0 whatever the grader sets; the layer computes nothing."""
    ns = namespace("""
    class Layer:
        def __init__(self, num_features, eps=1e-5, momentum=0.1):
            self.d, self.eps, self.momentum, self.training = num_features, eps, momentum, True
            self.running_mean, self.running_var = np.zeros(num_features), np.ones(num_features)
            self.dgamma = self.dbeta = np.zeros(num_features)
        gamma = property(lambda self: np.zeros(self.d), lambda self, value: None)
        beta = property(lambda self: np.zeros(self.d), lambda self, value: None)
        def train(self):
            self.training = True
        def eval(self):
            self.training = False
        def forward(self, x):
            return np.zeros_like(x)
        def backward(self, dout):
            return np.zeros_like(dout)
    BatchNorm1d = Layer
    """)
    fails("batchnorm1d_backward", ns, "BatchNorm1d")


def test_a_gradient_that_reads_zeros_the_first_time_gets_nothing():
    ns = namespace("""
    class Layer(BatchNorm1d):
        @property
        def dgamma(self):
            first, self._read = not getattr(self, "_read", False), True
            return np.zeros_like(self.gamma) if first else self._dgamma
        @dgamma.setter
        def dgamma(self, value):
            self._dgamma, self._read = value, False
    BatchNorm1d = Layer
    """)
    fails("batchnorm1d_backward", ns, "differ from torch.nn.BatchNorm1d")


@pytest.mark.parametrize("shape,says", [
    ("(1, -1)", "batchnorm_backward returned shape (1, 3), expected (3,)"),
    ("(-1, 1)", "batchnorm_backward returned shape (3, 1), expected (3,)"),
])
def test_parameter_gradients_of_a_broadcastable_shape_are_refused(shape, says):
    ns = namespace(f"""
    def batchnorm_backward(dout, cache):
        dx, dgamma, dbeta = batchnorm_backward_alt(dout, cache)
        return dx, dgamma.reshape{shape}, dbeta.reshape{shape}
    """)
    fails("batchnorm_backward", ns, says)


def test_an_empty_or_huge_dx_is_refused_unread():
    ns = namespace("""
    def batchnorm_backward(dout, cache):
        _, dgamma, dbeta = batchnorm_backward_alt(dout, cache)
        return np.zeros((0, dout.shape[1])), dgamma, dbeta
    def batchnorm_backward_alt(dout, cache):
        return np.zeros((400_000, 1, 1)), np.zeros(dout.shape[1]), np.zeros(dout.shape[1])
    """)
    fails("batchnorm_backward", ns, "returned shape (0, 3), expected (2, 3)")
    fails("batchnorm_backward_alt", ns, "returned shape (400000, 1, 1), expected (2, 3)")


def test_a_layer_gradient_of_a_broadcastable_shape_is_refused():
    ns = namespace("""
    class Layer(BatchNorm1d):
        def backward(self, dout):
            dx = super().backward(dout)
            self.dbeta = self.dbeta[None, :]
            return dx
    BatchNorm1d = Layer
    """)
    fails("batchnorm1d_backward", ns, "BatchNorm1d.dbeta returned shape (1, 3), expected (3,)")


def test_rel_error_returning_an_array_is_refused():
    ns = namespace("def rel_error(a, b):\n    return np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))\n")
    fails("rel_error", ns, "rel_error returned shape (3,), expected ()")


def test_a_gradcheck_that_zeroes_df_in_place_gets_nothing():
    ns = namespace("""
    _solution = eval_numerical_gradient
    def eval_numerical_gradient(f, x, df, h=1e-5):
        df[...] = 0
        return _solution(f, x, df, h)
    """)
    fails("eval_numerical_gradient", ns, "eval_numerical_gradient does not match the reference")
