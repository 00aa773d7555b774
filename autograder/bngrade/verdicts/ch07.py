"""Verdicts of chapter 7, *Dropout* (probes: :mod:`bncapture.ch07`).

A student may draw the mask any way they like (``rng.random(shape) < keep``, ``rng.binomial(1, keep, shape)``,
``rng.uniform`` ..., in any order of the axes), so nothing here compares with a particular random stream. Each
verdict reads the mask off the student's own recorded output: the grader's copy of x has no zeros, so
``out != 0`` marks the kept units. Then, judged on the grader's own x and dout:

* every kept unit must be ``x`` times the convention's scale, every other 0;
* the fraction dropped must be within 6 standard deviations of ``p``;
* the keep/drop decisions must be independent per element, and come from ``rng``;
* the backward pass must let the gradient through exactly the units its forward pass kept;
* ``p = 1`` drops every unit: the training-mode output and its gradient are all zeros, as
  ``torch.nn.functional.dropout(x, p=1.0)`` returns (and as ``bnref`` does).
"""
from typing import NamedTuple

import numpy as np

from bncapture import ch07 as probes

from bngrade.judge.compare import Mistake, close

FORWARD, BACKWARD = "dropout_forward", "dropout_backward"

KEEP_PROB_MESSAGE = ("p is used as the keep probability; here p is the DROP probability, as in torch.nn.Dropout(p) "
                     "(CS231n and TF1's keep_prob use the keep probability 1 - p)")
KEEPS_ALL_MESSAGE = ("no unit was dropped: every unit was kept in training mode. Keep each unit with probability "
                     "1 - p, e.g. rng.random(x.shape) < 1 - p; mind the precedence: `rand < keep / keep` is "
                     "`rand < 1`, which keeps everything")
MASK_IN_EVAL = ("a mask is applied in eval mode: at test time no unit is dropped (dropout is deterministic there; "
                "MC dropout is a deliberate exception, not the eval mode)")
P_ONE_MESSAGE = ("with p = 1 every unit is dropped: in training mode the output is all zeros, as "
                 "torch.nn.functional.dropout(x, p=1.0) returns (1 / (1 - p) divides by zero there: handle p = 1 "
                 "apart, and do not refuse it)")


class Draw(NamedTuple):
    """One recorded call of the student's forward pass, on the grader's own x."""

    x: np.ndarray
    p: float
    out: np.ndarray  # as float64
    kept: np.ndarray  # bool, out != 0
    label: str


def draw(r, key, case):
    """The :class:`Draw` of the forward call recorded at ``key`` on ``case`` (x must come back intact)."""
    out = r.get(key, case.x, FORWARD, case.label)
    if not np.array_equal(r.after(key, 0, case.x, FORWARD, case.label), case.x):
        raise AssertionError(f"{FORWARD} modifies x in place; return a new array (input: {case.label})")
    out = out.astype(np.float64)
    return Draw(case.x, case.p, out, out != 0, case.label)


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


def check_drop_rate(d, who=FORWARD):
    """The fraction of dropped units is p, within statistical bounds (``who`` drew the mask, for the message)."""
    n = d.kept.size
    dropped = 1.0 - d.kept.mean()
    if abs(dropped - d.p) <= _sigma_bound(d.p, n):
        return
    if abs(dropped - (1.0 - d.p)) <= _sigma_bound(d.p, n):
        raise AssertionError(f"{who}: {KEEP_PROB_MESSAGE}: {dropped:.1%} of the units were dropped with p={d.p} "
                             f"(input: {d.label})")
    raise AssertionError(f"{who} dropped {dropped:.1%} of the units with p={d.p}; each unit must be dropped "
                         f"independently with probability p (input: {d.label})")


def check_not_constant(d):
    """A large mask neither keeps every unit with p > 0 nor drops every unit with p < 1 (odds below 1e-12)."""
    n = d.kept.size
    if d.p > 0 and (1.0 - d.p) ** n < 1e-12 and d.kept.all():
        raise AssertionError(f"{FORWARD}: {KEEPS_ALL_MESSAGE} (p={d.p}; input: {d.label})")
    if d.p < 1 and d.p ** n < 1e-12 and not d.kept.any():
        check_drop_rate(d)


def _uniform_lines(kept, axis):
    """(how many lines of ``kept`` along ``axis`` are all kept or all dropped, how many lines there are)."""
    lines = np.moveaxis(kept, axis, -1).reshape(-1, kept.shape[axis])
    return int((lines.all(axis=1) | ~lines.any(axis=1)).sum()), len(lines)


def check_independent(d):
    """Along no axis are the lines of the mask entirely kept or entirely dropped more often than chance allows.

    A line of length L is uniform with probability q = (1-p)^L + p^L; the bound is 6 standard deviations above
    the expected count (a mask shared along an axis makes every line along it uniform).
    """
    if d.p == 0:
        return
    for axis, length in enumerate(d.kept.shape):
        uniform, lines = _uniform_lines(d.kept, axis)
        q = (1.0 - d.p) ** length + d.p ** length
        if length < 2 or uniform <= lines * q + 6.0 * np.sqrt(lines * q * (1.0 - q)) + 5:
            continue
        what = "samples of the batch" if axis == 0 else f"entries along axis {axis}"
        raise AssertionError(f"{FORWARD}: the keep/drop decisions are shared: {uniform} of {lines} lines across "
                             f"the {what} are entirely kept or entirely dropped (one decision for all of them). "
                             f"Draw one independent decision per element, a mask of shape x.shape "
                             f"(input: {d.label})")


def _check_uses_rng(r):
    """The mask comes from ``rng``: equal seeds give equal masks, and a generator is not re-seeded."""
    cases = probes.rng_cases()
    a, b, one, two = (draw(r, key, case).out for key, case in cases.items())
    label = next(iter(cases.values())).label
    if not np.array_equal(a, b):
        raise AssertionError(f"{FORWARD} does not take its randomness from the rng argument: two generators "
                             f"with the same seed gave different masks. Draw the mask with rng, e.g. "
                             f"rng.random(x.shape) (input: {label})")
    if np.array_equal(one, two):
        raise AssertionError(f"{FORWARD} returned the same mask twice from one generator: it must draw a fresh "
                             f"mask from rng at every call, without re-seeding (input: {label})")


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


def _check_train_mode(r, prefix, cases):
    """Values, rate and independence of each recorded training-mode mask."""
    for index, case in enumerate(cases):
        d = draw(r, f"{prefix}{index}", case)
        check_not_constant(d)
        scale = TRAIN_SCALE[case.mode](case.p)
        judge(FORWARD, d.out, case.x * d.kept * scale, case.x.dtype, TRAIN_MISTAKES[case.mode],
              (case.x, case.p, d.kept), d.label,
              f"in training mode each unit must be either 0 (dropped) or x * {scale:.4g} (kept)")
        check_independent(d)
        check_drop_rate(d)


def _check_eval_mode(r, prefix, cases):
    """Eval mode is deterministic: x for inverted dropout, x * (1 - p) for classic dropout."""
    for index, case in enumerate(cases):
        d = draw(r, f"{prefix}{index}", case)
        if not d.kept.all():
            raise AssertionError(f"{FORWARD}: {MASK_IN_EVAL} (input: {d.label})")
        scale = EVAL_SCALE[case.mode](case.p)
        judge(FORWARD, d.out, case.x * scale, case.x.dtype, EVAL_MISTAKES[case.mode], (case.x, case.p), d.label,
              f"in eval mode the output must be x * {scale:.4g}")


def _check_p_one(r, key, case):
    """``p = 1``: all zeros in training mode; in eval mode ``x * EVAL_SCALE`` (x for inverted dropout, as torch)."""
    try:
        d = draw(r, key, case)
    except AssertionError as err:  # it raised: name the case
        raise AssertionError(f"{err}; {P_ONE_MESSAGE}") from None
    if case.train and not np.all(d.out == 0):
        got = "nan or inf" if not np.all(np.isfinite(d.out)) else f"{np.count_nonzero(d.out)} nonzero values"
        raise AssertionError(f"{FORWARD}: {P_ONE_MESSAGE}; got {got} (input: {d.label})")
    scale = EVAL_SCALE[case.mode](1.0)
    if not case.train and not close(d.out, case.x * scale, np.float64):
        raise AssertionError(f"{FORWARD}: in eval mode with p = 1 the output must be x * {scale:g}, as for any p "
                             f"(input: {d.label})")


def dropout_train(r):
    """``dropout_forward(x, p, train=True, rng, mode="inverted")``."""
    _check_train_mode(r, "train", probes.forward_cases(probes.TRAIN_CASES, True, "inverted", seed=71))
    _check_uses_rng(r)
    _check_p_one(r, "p1", probes.p_one_case(True, "inverted", seed=76))


def dropout_eval(r):
    """``dropout_forward(x, p, train=False, rng, mode="inverted")``: the identity."""
    _check_eval_mode(r, "eval", probes.forward_cases(probes.EVAL_CASES, False, "inverted", seed=72))
    _check_p_one(r, "p1", probes.p_one_case(False, "inverted", seed=78))


def dropout_classic(r):
    """``mode="classic"``: unscaled mask in training, times 1 - p in eval mode."""
    _check_train_mode(r, "train", probes.forward_cases(probes.TRAIN_CASES[:3], True, "classic", seed=73))
    _check_eval_mode(r, "eval", probes.forward_cases(probes.EVAL_CASES, False, "classic", seed=74))
    _check_p_one(r, "p1 train", probes.p_one_case(True, "classic", seed=77))
    _check_p_one(r, "p1 eval", probes.p_one_case(False, "classic", seed=79))


# Backward

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
BACKWARD_EVAL_MISTAKES = {mode: [Mistake(m.message.replace("your eval mode returns x", "your backward returns dout"),
                                         m.fn) for m in mistakes] for mode, mistakes in EVAL_MISTAKES.items()}


def _check_backward_mask(dx, d):
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


def _check_backward_case(dx, d, case):
    """dx of one case against the grader's own dout and the mask the student's forward recorded."""
    forward, dout, dtype = case.forward, case.dout, case.dout.dtype
    if forward.p == 1.0:
        if not np.all(dx == 0):
            raise AssertionError(f"{BACKWARD}: with p = 1 the forward pass dropped every unit, so dx must be all "
                                 f"zeros; got {'nan or inf' if not np.all(np.isfinite(dx)) else 'nonzero values'} "
                                 f"(input: {d.label})")
    elif forward.train:
        check_drop_rate(d, who=f"{BACKWARD} (its forward pass)")  # a forward that drops all cannot pass for free
        _check_backward_mask(dx, d)
        scale = TRAIN_SCALE[forward.mode](forward.p)
        judge(BACKWARD, dx, dout * d.kept * scale, dtype, BACKWARD_TRAIN_MISTAKES[forward.mode],
              (dout, forward.p, d.kept), d.label,
              f"dx must be dout * {scale:.4g} on the kept units and 0 on the dropped ones")
    else:
        if not (dx != 0).all():
            raise AssertionError(f"{BACKWARD}: {MASK_IN_EVAL} (input: {d.label})")
        scale = EVAL_SCALE[forward.mode](forward.p)
        judge(BACKWARD, dx, dout * scale, dtype, BACKWARD_EVAL_MISTAKES[forward.mode], (dout, forward.p), d.label,
              f"in eval mode dx must be dout * {scale:.4g}")


def dropout_backward(r):
    """``dropout_backward(dout, cache)`` with the cache of the student's own forward pass."""
    for index, case in enumerate(probes.backward_cases()):
        d = draw(r, f"forward{index}", case.forward)
        dx = r.get(f"backward{index}", case.dout, BACKWARD, case.label).astype(np.float64)
        _check_backward_case(dx, d, case)
