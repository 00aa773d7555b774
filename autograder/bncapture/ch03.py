"""Probes of chapter 3, *Batch norm backward in NumPy*: the inputs and the calls; the verdicts are the grader's.

The backward passes are probed through the student's own ``batchnorm_forward``: its cache, an opaque value,
goes straight into the student's backward here and never leaves.
"""
import numpy as np

from . import ch02
from .cases import Case, each, first, generator, random_matrix
from .functions import ColumnSoftmax, Cube, Identity, MatMul, SinTimes, Transpose
from .probe import part

BACKWARD_SHAPES = [((2, 3), 1e-5), ((7, 5), 1e-3), ((64, 33), 0.1), ((129, 1), 1e-5)]


def backward_cases(seed=31):
    """Cases (x (N, D), gamma (D,), beta (D,), eps, dout (N, D)) in float64 and float32, always a random dout;
    the last two make eps matter (std ~ 1e-3) and hold a constant feature."""
    rng = generator(seed)
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


def inference_backward_cases(seed=32):
    """Cases (dout (N, D), x (N, D), gamma, running_mean, running_var (D,), eps), N = 1 among them."""
    rng = generator(seed)
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


def gradcheck_cases(seed=33):
    """Cases (f, x, df, h) with public test functions f (:mod:`bncapture.functions`), among them f = identity
    and f = transpose, whose results are x itself or a view of it."""
    rng = generator(seed)
    w, a = rng.normal(size=(3, 4)), rng.normal(size=(4, 2))
    return [
        Case((SinTimes(w), rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), 1e-5),
             "f(x) = sin(x) * w, x (3, 4), h=1e-5"),
        Case((MatMul(a), rng.normal(size=(5, 4)), rng.normal(size=(5, 2)), 1e-5),
             "f(x) = x @ A, x (5, 4), f(x) (5, 2), h=1e-5"),
        Case((Cube(), rng.normal(size=6), rng.normal(size=6), 1e-2), "f(x) = x**3, x (6,), h=1e-2"),
        Case((ColumnSoftmax(rng.uniform(0.5, 2.0, 3)), random_matrix(rng, (6, 3), np.float64),
              rng.normal(size=(6, 3)), 1e-5),
             "f(x) = softmax over the batch axis of x (6, 3), times w, h=1e-5"),
        Case((Identity(), rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 1e-5),
             "f(x) = x itself (no copy), x (4, 3), h=1e-5"),
        Case((Transpose(), rng.normal(size=(2, 5)), rng.normal(size=(5, 2)), 1e-5),
             "f(x) = x.T (a view of x), x (2, 5), h=1e-5"),
    ]


#: {what: (a, b)}: two equal arrays of zeros, whose relative error is 0
ZEROS = {"two arrays of zeros (3,)": (np.zeros(3), np.zeros(3)), "two arrays of zeros (2, 2)": (np.zeros((2, 2)),
                                                                                              np.zeros((2, 2)))}


def rel_error_cases(seed=34):
    """Cases (a, b) of one shape: near-equal, unrelated, with shared zeros, near 0, of opposite signs."""
    rng = generator(seed)
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


LAYER_SCHEDULE = ["train", "train", "eval", "train", "eval", "eval"]


def layer_backward_runs(seed=35):
    """[(n, d, momentum, gamma (d,), beta (d,), [(mode, x (n, d), dout (n, d))])]: the lockstep runs of
    ``BatchNorm1d`` forward and backward against torch."""
    rng = generator(seed)
    runs = []
    for n, d, momentum in [(8, 3, 0.1), (20, 6, 0.5)]:
        gamma, beta = rng.uniform(0.5, 2.0, d), rng.normal(size=d)
        steps = [(mode, random_matrix(rng, (n, d), np.float64), rng.standard_normal((n, d)))
                 for mode in LAYER_SCHEDULE]
        runs.append((n, d, momentum, gamma, beta, steps))
    return runs


def _forward_then_backward(p, forward, backward):
    """Each backward case: ``forward`` (its out recorded as ``fwd<i>``), then ``backward(dout, its cache)``
    (recorded as ``case<i>``, with dout as the call left it)."""
    for index, case in enumerate(backward_cases()):
        x, gamma, beta, eps, dout = case.args
        result = p.call(f"fwd{index}", forward, x, gamma, beta, eps, keep=first)
        p.call(f"case{index}", backward, dout, part(result, 1), after=True)


def batchnorm_backward(p):
    """The student's forward, then its staged backward on that cache."""
    _forward_then_backward(p, p.student("batchnorm_forward"), p.student("batchnorm_backward"))


def batchnorm_backward_alt(p):
    """The student's forward, then its closed-form backward on that cache."""
    _forward_then_backward(p, p.student("batchnorm_forward"), p.student("batchnorm_backward_alt"))


def batchnorm_inference_backward(p):
    each(p, "case", p.student("batchnorm_inference_backward"), inference_backward_cases(), after=True)


def eval_numerical_gradient(p):
    each(p, "case", p.student("eval_numerical_gradient"), gradcheck_cases(), after=True)


def rel_error(p):
    """Two arrays of zeros, then every case."""
    fn = p.student("rel_error")
    for what, args in ZEROS.items():
        p.call(what, fn, *args)
    each(p, "case", fn, rel_error_cases())


def batchnorm1d_backward(p):
    """Chapter 2's forward runs, then each backward run: build the layer, set gamma and beta, and at every step
    switch the mode, run forward(x) and backward(dout); record dx and the layer's dgamma and dbeta."""
    ch02.batchnorm1d(p)
    cls = p.student("BatchNorm1d")
    for run, (n, d, momentum, gamma, beta, steps) in enumerate(layer_backward_runs()):
        layer = ch02.build_layer(p, f"b{run}.init", cls, d, momentum, gamma, beta)
        if layer is None:
            continue
        for step, (mode, x, dout) in enumerate(steps):
            key = f"b{run}.{step}"
            p.call(f"{key}.mode", getattr(layer, mode, None), keep=lambda r: None)
            p.call(f"{key}.forward", getattr(layer, "forward", None), x, keep=lambda r: None)
            p.call(f"{key}.dx", getattr(layer, "backward", None), dout)
            p.read(f"{key}.dgamma", layer, "dgamma")
            p.read(f"{key}.dbeta", layer, "dbeta")
