"""Probes of chapter 7, *Dropout*: the inputs and the calls; the verdicts are the grader's.

Each forward call gets a fresh ``numpy.random.Generator`` made here from a public seed; the verdict knows the
seed but never assumes how the student draws from it. The inputs have no zeros, so ``out != 0`` marks the units
that the student's mask kept. The cache of each forward call goes, unread, to the student's own backward.
"""
from typing import NamedTuple

import numpy as np

from .cases import first, generator
from .probe import part


class Forward(NamedTuple):
    """One call ``dropout_forward(x, p, train, np.random.default_rng(seed), mode)``."""

    x: np.ndarray
    p: float
    train: bool
    seed: int
    mode: str

    @property
    def label(self):
        return (f"x {self.x.shape} {self.x.dtype.name}, p={self.p}, train={self.train}, "
                f"mode={self.mode!r}")


class Backward(NamedTuple):
    """One forward call, then ``dropout_backward(dout, cache)`` with its cache; ``dout`` the shape of x."""

    forward: Forward
    dout: np.ndarray

    @property
    def label(self):
        return self.forward.label


def signed_values(rng, shape, dtype):
    """Values with |x| in [0.5, 2] and random signs: no zeros, so ``out != 0`` marks the kept units."""
    return (rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.5, 2.0, size=shape)).astype(dtype)


#: (shape, p, dtype) of the training-mode and eval-mode cases
TRAIN_CASES = [((400, 50), 0.2, np.float64), ((400, 50), 0.7, np.float64), ((100, 8, 8), 0.35, np.float32),
               ((20000,), 0.1, np.float32), ((3, 4), 0.0, np.float64)]
EVAL_CASES = [((50, 20), 0.3, np.float64), ((10, 4, 4), 0.75, np.float32), ((7,), 0.0, np.float64)]
#: (shape, p, train, mode, dtype) of the backward cases; the last drops every unit
BACKWARD_CASES = [((300, 40), 0.3, True, "inverted", np.float64), ((50, 8, 8), 0.6, True, "inverted", np.float32),
                  ((300, 40), 0.25, True, "classic", np.float64), ((30, 20), 0.4, False, "inverted", np.float64),
                  ((30, 20), 0.4, False, "classic", np.float32), ((20, 10), 1.0, True, "inverted", np.float64)]

#: the generator checks: x (40, 30) of ones, p = 0.4; two generators of one seed, then one generator twice
RNG_X, RNG_P, SAME_SEED, SHARED_SEED = np.ones((40, 30)), 0.4, 123, 321


def forward_cases(configs, train, mode, seed):
    """[:class:`Forward`] of ``configs`` [(shape, p, dtype)]: x and the mask's seed drawn in turn from ``seed``."""
    rng = generator(seed)
    cases = []
    for shape, p, dtype in configs:
        x = signed_values(rng, shape, dtype)
        cases.append(Forward(x, p, train, int(rng.integers(1 << 31)), mode))
    return cases


def p_one_case(train, mode, seed):
    """The :class:`Forward` of x (20, 10) with p = 1, every unit dropped in training mode."""
    return forward_cases([((20, 10), 1.0, np.float64)], train, mode, seed)[0]


def rng_cases():
    """{key: Forward} of the generator checks; the two "shared" calls draw from one generator in turn."""
    return {f"{what} {i}": Forward(RNG_X, RNG_P, True, seed, "inverted")
            for what, seed in (("same seed", SAME_SEED), ("shared", SHARED_SEED)) for i in range(2)}


def backward_cases(seed=75):
    """[:class:`Backward`] of :data:`BACKWARD_CASES`: x, the mask's seed and dout drawn in turn from ``seed``."""
    rng = generator(seed)
    cases = []
    for shape, p, train, mode, dtype in BACKWARD_CASES:
        x = signed_values(rng, shape, dtype)
        forward = Forward(x, p, train, int(rng.integers(1 << 31)), mode)
        cases.append(Backward(forward, signed_values(rng, shape, dtype)))
    return cases


def call_forward(p, key, fn, case, rng=None):
    """Record ``out`` of ``fn`` on ``case`` (x watched); the generator is a fresh one of the case's seed unless
    ``rng`` is given (it is then shared, never copied). Returns the live ``(out, cache)``."""
    rng = generator(case.seed) if rng is None else rng
    return p.call(key, lambda x: fn(x, case.p, case.train, rng, case.mode), case.x, keep=first, after=True)


def call_each(p, prefix, fn, cases):
    """:func:`call_forward` on every case; records ``prefix0``, ``prefix1``, ..."""
    for index, case in enumerate(cases):
        call_forward(p, f"{prefix}{index}", fn, case)


def dropout_train(p):
    """Inverted training mode: every case, the generator checks, and p = 1."""
    fn = p.student("dropout_forward")
    call_each(p, "train", fn, forward_cases(TRAIN_CASES, True, "inverted", seed=71))
    shared = generator(SHARED_SEED)
    for key, case in rng_cases().items():
        call_forward(p, key, fn, case, rng=shared if key.startswith("shared") else None)
    call_forward(p, "p1", fn, p_one_case(True, "inverted", seed=76))


def dropout_eval(p):
    """Inverted eval mode: every case, and p = 1."""
    fn = p.student("dropout_forward")
    call_each(p, "eval", fn, forward_cases(EVAL_CASES, False, "inverted", seed=72))
    call_forward(p, "p1", fn, p_one_case(False, "inverted", seed=78))


def dropout_classic(p):
    """Classic mode: training cases, eval cases, and p = 1 in both."""
    fn = p.student("dropout_forward")
    call_each(p, "train", fn, forward_cases(TRAIN_CASES[:3], True, "classic", seed=73))
    call_each(p, "eval", fn, forward_cases(EVAL_CASES, False, "classic", seed=74))
    call_forward(p, "p1 train", fn, p_one_case(True, "classic", seed=77))
    call_forward(p, "p1 eval", fn, p_one_case(False, "classic", seed=79))


def dropout_backward(p):
    """Each case: the forward's out (``forward<i>``), then dx of the backward on its cache (``backward<i>``)."""
    forward, backward = p.student("dropout_forward"), p.student("dropout_backward")
    for index, case in enumerate(backward_cases()):
        result = call_forward(p, f"forward{index}", forward, case.forward)
        p.call(f"backward{index}", lambda dout: backward(dout, part(result, 1)), case.dout)
