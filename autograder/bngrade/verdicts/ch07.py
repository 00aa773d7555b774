"""Hidden tests of chapter 7, *Dropout*.

A student may draw the mask any way they like (``rng.random(shape) < keep``,
``rng.binomial(1, keep, shape)``, ``rng.uniform`` ...), so nothing here
compares with a particular random stream. Instead each check reads the mask
off the student's own output: the inputs have no zeros, so ``out != 0`` marks
the kept units. Then

* every kept unit must be ``x`` times the convention's scale, every other 0;
* the fraction dropped must be within 6 standard deviations of ``p``;
* the keep/drop decisions must be independent per element, and come from ``rng``;
* the backward pass must let the gradient through exactly the kept units;
* ``p = 1`` drops every unit: the training-mode output and its gradient are all zeros, as
  ``torch.nn.functional.dropout(x, p=1.0)`` returns (and as ``bnref`` does).
"""
from typing import NamedTuple

import numpy as np

from bngrade.judge.compare import Mistake, check_not_reference, close

FORWARD, BACKWARD = "dropout_forward", "dropout_backward"

KEEP_PROB_MESSAGE = ("p is used as the keep probability; here p is the DROP probability, as in torch.nn.Dropout(p) "
                     "(CS231n and TF1's keep_prob use the keep probability 1 - p)")


def signed_values(rng, shape, dtype):
    """Values with |x| in [0.5, 2] and random signs: no zeros, so ``out != 0`` marks the kept units."""
    return (rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.5, 2.0, size=shape)).astype(dtype)


class Draw(NamedTuple):
    """One call of the student's forward pass."""

    x: np.ndarray
    p: float
    out: np.ndarray  # as float64
    cache: object
    kept: np.ndarray  # bool, out != 0
    label: str


def _call(fn, name, args, label):
    """Call a student's function (no deep copy: the same rng may be passed twice on purpose)."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise AssertionError(f"{name} is not implemented yet.") from None
    except Exception as exc:  # a student's bug: a failed test that names the input
        raise AssertionError(f"{name} raised {type(exc).__name__}: {exc} (input: {label})") from None


def _as_result(value, shape, name, label):
    """``value`` as a float64 array of ``shape``, or a failed test that says what is wrong."""
    try:
        value = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise AssertionError(f"{name} must return an array; got {type(value).__name__} (input: {label})") from None
    if value.shape != shape:
        raise AssertionError(f"{name} returned shape {value.shape}, expected {shape} (input: {label})")
    return value


def draw(student, x, p, train, mode, rng):
    """Run the student's ``dropout_forward`` on a copy of ``x``; returns a :class:`Draw`."""
    label = f"x {x.shape} {x.dtype.name}, p={p}, train={train}, mode={mode!r}"
    given = x.copy()
    result = _call(student, FORWARD, (given, p, train, rng, mode), label)
    if not np.array_equal(given, x):
        raise AssertionError(f"{FORWARD} modifies x in place; return a new array (input: {label})")
    try:
        out, cache = result
    except (TypeError, ValueError):
        raise AssertionError(f"{FORWARD} must return a tuple (out, cache) (input: {label})") from None
    out = _as_result(out, x.shape, FORWARD, label)
    return Draw(x, p, out, cache, out != 0, label)


def judge(name, got, expected, dtype, mistakes, args, label, what):
    """Pass if ``got`` matches ``expected``; otherwise name the first mistake it matches, or say ``what``."""
    if close(got, expected, dtype):
        return
    for mistake in mistakes:
        try:
            with np.errstate(all="ignore"):
                wrong = mistake.fn(*args)
        except ZeroDivisionError:  # the mistake does not apply to this input (p = 0)
            continue
        if close(got, wrong, dtype):
            raise AssertionError(f"{name}: {mistake.message} (input: {label})")
    raise AssertionError(f"{name}: {what} (input: {label})")


def _sigma_bound(p, n):
    """Six standard deviations of the dropped fraction of ``n`` independent units."""
    return 6.0 * np.sqrt(p * (1.0 - p) / n) + 1e-12


def check_drop_rate(d, name=FORWARD):
    """The fraction of dropped units is p, within statistical bounds."""
    n = d.kept.size
    dropped = 1.0 - d.kept.mean()
    if abs(dropped - d.p) <= _sigma_bound(d.p, n):
        return
    if abs(dropped - (1.0 - d.p)) <= _sigma_bound(d.p, n):
        raise AssertionError(f"{name}: {KEEP_PROB_MESSAGE}: {dropped:.1%} of the units were dropped with p={d.p} "
                             f"(input: {d.label})")
    raise AssertionError(f"{name} dropped {dropped:.1%} of the units with p={d.p}; each unit must be dropped "
                         f"independently with probability p (input: {d.label})")


def check_independent(d):
    """No row or column of a 2-D mask is all kept or all dropped more often than chance allows."""
    if d.kept.ndim != 2 or d.p == 0:
        return
    for axis, what in ((1, "rows (samples)"), (0, "columns (features)")):
        uniform = np.all(d.kept, axis=axis) | ~np.any(d.kept, axis=axis)
        if uniform.sum() > max(5, 0.05 * uniform.size):
            raise AssertionError(f"{FORWARD}: the keep/drop decisions are shared: {uniform.sum()} of {uniform.size} "
                                 f"{what} are entirely kept or entirely dropped. Draw one independent decision "
                                 f"per element, a mask of shape x.shape (input: {d.label})")


def check_uses_rng(student, x, p, mode):
    """The mask comes from ``rng``: equal seeds give equal masks, and a generator is not re-seeded."""
    first = draw(student, x, p, True, mode, np.random.default_rng(123))
    again = draw(student, x, p, True, mode, np.random.default_rng(123))
    if not np.array_equal(first.out, again.out):
        raise AssertionError(f"{FORWARD} does not take its randomness from the rng argument: two generators "
                             f"with the same seed gave different masks. Draw the mask with rng, e.g. "
                             f"rng.random(x.shape) (input: {first.label})")
    rng = np.random.default_rng(321)
    one, two = draw(student, x, p, True, mode, rng), draw(student, x, p, True, mode, rng)
    if np.array_equal(one.out, two.out):
        raise AssertionError(f"{FORWARD} returned the same mask twice from one generator: it must draw a fresh "
                             f"mask from rng at every call, without re-seeding (input: {one.label})")


def _kept(scale):
    """A mistake's output on the observed mask: the kept units times ``scale(p)``."""
    return lambda x, p, kept: x * kept * scale(p)


TRAIN_MISTAKES = {
    "inverted": [
        Mistake("no scaling at train time: inverted dropout divides the kept units by the keep probability "
                "1 - p during training, so that eval mode can be the identity", _kept(lambda p: 1.0)),
        Mistake(KEEP_PROB_MESSAGE, _kept(lambda p: 1.0 / p)),
        Mistake("the kept units are multiplied by the keep probability; inverted dropout DIVIDES them by 1 - p",
                _kept(lambda p: 1.0 - p)),
    ],
    "classic": [
        Mistake("classic dropout does not scale at training time (it scales by 1 - p at test time); the kept "
                "units pass unchanged", _kept(lambda p: 1.0 / (1.0 - p))),
        Mistake(KEEP_PROB_MESSAGE, _kept(lambda p: 1.0 / p)),
    ],
}
TRAIN_SCALE = {"inverted": lambda p: 1.0 / (1.0 - p), "classic": lambda p: 1.0}

EVAL_MISTAKES = {
    "inverted": [
        Mistake("scaling in eval mode: inverted dropout is the identity at test time (the kept units were "
                "already divided by 1 - p during training)", lambda x, p: x * (1.0 - p)),
        Mistake("scaling in eval mode: inverted dropout is the identity at test time; it divides by 1 - p only "
                "during training", lambda x, p: x / (1.0 - p)),
        Mistake("scaling in eval mode (by p, the keep probability of CS231n): inverted dropout is the identity "
                "at test time", lambda x, p: x * p),
    ],
    "classic": [
        Mistake("classic dropout multiplies every unit by the keep probability 1 - p at test time (its "
                "training-time outputs were not scaled); your eval mode returns x unchanged", lambda x, p: x),
        Mistake(KEEP_PROB_MESSAGE, lambda x, p: x * p),
        Mistake("classic dropout MULTIPLIES by the keep probability 1 - p at test time", lambda x, p: x / (1.0 - p)),
    ],
}
EVAL_SCALE = {"inverted": lambda p: 1.0, "classic": lambda p: 1.0 - p}

MASK_IN_EVAL = ("a mask is applied in eval mode: at test time no unit is dropped (dropout is deterministic there; "
                "MC dropout is a deliberate exception, not the eval mode)")


def check_train_mode(student, mode, cases, seed):
    """Values, rate and independence of the training-mode mask, for one convention."""
    rng = np.random.default_rng(seed)
    for shape, p, dtype in cases:
        x = signed_values(rng, shape, dtype)
        d = draw(student, x, p, True, mode, np.random.default_rng(rng.integers(1 << 31)))
        scale = TRAIN_SCALE[mode](p)
        judge(FORWARD, d.out, x * d.kept * scale, dtype, TRAIN_MISTAKES[mode], (x, p, d.kept), d.label,
              f"in training mode each unit must be either 0 (dropped) or x * {scale:.4g} (kept)")
        check_independent(d)
        check_drop_rate(d)


def check_eval_mode(student, mode, cases, seed):
    """Eval mode is deterministic: x for inverted dropout, x * (1 - p) for classic dropout."""
    rng = np.random.default_rng(seed)
    for shape, p, dtype in cases:
        x = signed_values(rng, shape, dtype)
        d = draw(student, x, p, False, mode, np.random.default_rng(rng.integers(1 << 31)))
        if not d.kept.all():
            raise AssertionError(f"{FORWARD}: {MASK_IN_EVAL} (input: {d.label})")
        judge(FORWARD, d.out, x * EVAL_SCALE[mode](p), dtype, EVAL_MISTAKES[mode], (x, p), d.label,
              f"in eval mode the output must be x * {EVAL_SCALE[mode](p):.4g}")


TRAIN_CASES = [((400, 50), 0.2, np.float64), ((400, 50), 0.7, np.float64), ((100, 8, 8), 0.35, np.float32),
               ((20000,), 0.1, np.float32), ((3, 4), 0.0, np.float64)]
EVAL_CASES = [((50, 20), 0.3, np.float64), ((10, 4, 4), 0.75, np.float32), ((7,), 0.0, np.float64)]


P_ONE_MESSAGE = ("with p = 1 every unit is dropped: in training mode the output is all zeros, as "
                 "torch.nn.functional.dropout(x, p=1.0) returns (1 / (1 - p) divides by zero there: handle p = 1 "
                 "apart, and do not refuse it)")


def check_p_one(student, mode, train, seed):
    """``p = 1``: all zeros in training mode; in eval mode ``x * EVAL_SCALE`` (x for inverted dropout, as torch)."""
    rng = np.random.default_rng(seed)
    x = signed_values(rng, (20, 10), np.float64)
    try:
        d = draw(student, x, 1.0, train, mode, np.random.default_rng(rng.integers(1 << 31)))
    except AssertionError as err:  # it raised: name the case
        raise AssertionError(f"{err}; {P_ONE_MESSAGE}") from None
    if train and not np.all(d.out == 0):
        got = "nan or inf" if not np.all(np.isfinite(d.out)) else f"{np.count_nonzero(d.out)} nonzero values"
        raise AssertionError(f"{FORWARD}: {P_ONE_MESSAGE}; got {got} (input: {d.label})")
    scale = EVAL_SCALE[mode](1.0)
    if not train and not close(d.out, x * scale, np.float64):
        raise AssertionError(f"{FORWARD}: in eval mode with p = 1 the output must be x * {scale:g}, as for any p "
                             f"(input: {d.label})")


def check_dropout_train(student):
    """Hidden test of ``dropout_forward(x, p, train=True, rng, mode="inverted")``."""
    check_not_reference(student, FORWARD)
    check_train_mode(student, "inverted", TRAIN_CASES, seed=71)
    check_uses_rng(student, np.ones((40, 30)), 0.4, "inverted")
    check_p_one(student, "inverted", train=True, seed=76)


def check_dropout_eval(student):
    """Hidden test of ``dropout_forward(x, p, train=False, rng, mode="inverted")``: the identity."""
    check_not_reference(student, FORWARD)
    check_eval_mode(student, "inverted", EVAL_CASES, seed=72)
    check_p_one(student, "inverted", train=False, seed=78)


def check_dropout_classic(student):
    """Hidden test of ``mode="classic"``: unscaled mask in training, times 1 - p in eval mode."""
    check_not_reference(student, FORWARD)
    check_train_mode(student, "classic", TRAIN_CASES[:3], seed=73)
    check_eval_mode(student, "classic", EVAL_CASES, seed=74)
    check_p_one(student, "classic", train=True, seed=77)
    check_p_one(student, "classic", train=False, seed=79)


# Backward

BACKWARD_CASES = [((300, 40), 0.3, True, "inverted", np.float64), ((50, 8, 8), 0.6, True, "inverted", np.float32),
                  ((300, 40), 0.25, True, "classic", np.float64), ((30, 20), 0.4, False, "inverted", np.float64),
                  ((30, 20), 0.4, False, "classic", np.float32)]

BACKWARD_TRAIN_MISTAKES = {
    "inverted": [
        Mistake("dx is not divided by the keep probability 1 - p; the forward pass scaled the kept units, so "
                "their gradient is scaled the same way", _kept(lambda p: 1.0)),
        Mistake(KEEP_PROB_MESSAGE, _kept(lambda p: 1.0 / p)),
    ],
    "classic": [
        Mistake("in classic mode nothing is scaled at training time, so dx is dout on the kept units and 0 "
                "elsewhere", _kept(lambda p: 1.0 / (1.0 - p))),
    ],
}


def _check_backward_mask(dx, d, dtype):
    """dx must be zero exactly where the forward pass dropped a unit."""
    passed = dx != 0
    if np.array_equal(passed, d.kept):
        return
    if passed.all():
        raise AssertionError(f"{BACKWARD}: the mask is ignored; the gradient of a dropped unit is 0 "
                             f"(input: {d.label})")
    if abs((1.0 - passed.mean()) - d.p) <= _sigma_bound(d.p, passed.size):
        raise AssertionError(f"{BACKWARD}: a new mask is drawn in the backward pass; the gradient must flow "
                             "through exactly the units the forward pass kept: reuse the mask stored in the cache "
                             f"(input: {d.label})")
    raise AssertionError(f"{BACKWARD}: dx is not zero exactly where the forward pass dropped units; reuse the "
                         f"forward's mask from the cache (input: {d.label})")


def check_dropout_backward(forward, backward):
    """Hidden test of ``dropout_backward(dout, cache)`` with the cache of the student's forward pass."""
    check_not_reference(forward, FORWARD)
    check_not_reference(backward, BACKWARD)
    rng = np.random.default_rng(75)
    for shape, p, train, mode, dtype in BACKWARD_CASES:
        x = signed_values(rng, shape, dtype)
        d = draw(forward, x, p, train, mode, np.random.default_rng(rng.integers(1 << 31)))
        dout = signed_values(rng, shape, dtype)
        dx = _as_result(_call(backward, BACKWARD, (dout.copy(), d.cache), d.label), shape, BACKWARD, d.label)
        if train:
            _check_backward_mask(dx, d, dtype)
            scale = TRAIN_SCALE[mode](p)
            judge(BACKWARD, dx, dout * d.kept * scale, dtype, BACKWARD_TRAIN_MISTAKES[mode], (dout, p, d.kept),
                  d.label, f"dx must be dout * {scale:.4g} on the kept units and 0 on the dropped ones")
        else:
            if not (dx != 0).all():
                raise AssertionError(f"{BACKWARD}: {MASK_IN_EVAL} (input: {d.label})")
            judge(BACKWARD, dx, dout * EVAL_SCALE[mode](p), dtype,
                  [Mistake(m.message.replace("your eval mode returns x", "your backward returns dout"), m.fn)
                   for m in EVAL_MISTAKES[mode]], (dout, p), d.label,
                  f"in eval mode dx must be dout * {EVAL_SCALE[mode](p):.4g}")
    x, dout = signed_values(rng, (20, 10), np.float64), signed_values(rng, (20, 10), np.float64)
    d = draw(forward, x, 1.0, True, "inverted", np.random.default_rng(rng.integers(1 << 31)))
    dx = _as_result(_call(backward, BACKWARD, (dout.copy(), d.cache), d.label), x.shape, BACKWARD, d.label)
    if not np.all(dx == 0):
        raise AssertionError(f"{BACKWARD}: with p = 1 the forward pass dropped every unit, so dx must be all zeros; "
                             f"got {'nan or inf' if not np.all(np.isfinite(dx)) else 'nonzero values'} "
                             f"(input: {d.label})")
