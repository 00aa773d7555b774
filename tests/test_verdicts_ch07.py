"""Chapter 7's hidden checks, differential: the solution, correct alternatives and every seeded mistake, each run
through its probe and its verdict (``check("ch07.<name>", namespace)``), in-process.

The students are written here as a notebook would hold them: sources executed into a namespace of their own, or
functions of this module (which does not import the reference package).
"""
import functools
import sys

import numpy as np
import pytest

from bncapture import ch07 as probes
from bngrade.judge.check import check
from bngrade.verdicts import ch07
from class_roster import ROSTER
from submissions import solution_cells
import differential

CHECKS = ("dropout_train", "dropout_eval", "dropout_classic", "dropout_backward")


def namespace_of(source):
    """The globals of a notebook whose answer cells are ``source``."""
    namespace = {"np": np}
    exec(source, namespace)
    return namespace


def solution_source(replace=()):
    """The solved source's two answer cells, with ``replace`` [(old, new)] applied (each ``old`` must occur)."""
    cells = solution_cells("ch07_dropout")
    source = cells["dropout_forward"] + "\n" + cells["dropout_backward"]
    for old, new in replace:
        assert old in source, old
        source = source.replace(old, new)
    return source


def run_all(namespace):
    differential.passes("ch07", CHECKS, namespace)


fails = functools.partial(differential.fails, "ch07")


def test_the_solution_passes():
    run_all(namespace_of(solution_source()))


# Correct alternatives, each written differently from the solution

BINOMIAL_DICT_CACHE = '''
def dropout_forward(x, p, train, rng, mode="inverted"):
    """rng.binomial with an int mask; a dict cache of many keys (x, out, p, a float mask)."""
    keep = 1 - p
    if train:
        mask = rng.binomial(1, keep, size=x.shape)
        scale = (1 / keep if keep else 0.0) if mode == "inverted" else 1.0
    else:
        mask, scale = np.ones(x.shape, dtype=int), 1.0 if mode == "inverted" else keep
    out = x * mask * scale
    cache = {"x": x, "out": out, "p": p, "keep": keep, "mask": mask.astype(float), "scale": scale, "mode": mode,
             "train": train, "shape": x.shape, "dtype": x.dtype, "rng": None, "seed": None, "n": x.size, "eps": 0}
    return out, cache


def dropout_backward(dout, cache):
    return dout * cache["mask"] * cache["scale"]
'''

CS231N_SCALED_MASK = '''
def dropout_forward(x, p, train, rng, mode="inverted"):
    """CS231n: rng.uniform, the mask stored already scaled, the cache (dropout_param, mask); classic as x * mask."""
    dropout_param = {"p": 1 - p, "mode": "train" if train else "test", "convention": mode}
    keep = dropout_param["p"]
    mask = None
    if dropout_param["mode"] == "train":
        if mode == "inverted":
            mask = (rng.uniform(0, 1, x.shape) < keep) / keep if keep > 0 else np.zeros(x.shape)
        else:
            mask = rng.uniform(size=x.shape) < keep
        out = x * mask
    elif mode == "inverted":
        out = x
    else:
        out = x * (1 - p)
    return out.astype(x.dtype, copy=False), (dropout_param, mask)


def dropout_backward(dout, cache):
    dropout_param, mask = cache
    if dropout_param["mode"] == "train":
        return dout * mask
    return dout if dropout_param["convention"] == "inverted" else dout * dropout_param["p"]
'''

TRANSPOSED_IN_PLACE = '''
def dropout_forward(x, p, train, rng, mode="inverted"):
    """The mask drawn in the reversed axis order (rng.random(x.shape[::-1]).T), compared with > p; an in-place
    multiply on a float64 copy, cast back to x.dtype; a list cache."""
    out = np.array(x, dtype=np.float64)
    if train:
        drop = rng.random(x.shape[::-1]).T <= p
        out[drop] = 0.0
        if mode == "inverted" and p < 1:
            out /= 1.0 - p
        return out.astype(x.dtype), [~drop, 1.0 / (1.0 - p) if mode == "inverted" and p < 1 else 1.0]
    if mode == "classic":
        out *= 1.0 - p
    return out.astype(x.dtype), [np.ones(x.shape, dtype=bool), 1.0 if mode == "inverted" else 1.0 - p]


def dropout_backward(dout, cache):
    kept, scale = cache
    dx = dout.copy()
    dx *= kept
    dx *= scale
    return dx
'''

FLAT_DRAW_OBJECT_CACHE = '''
class DropoutState:
    """An object cache: the kept units as floats and the factor."""

    def __init__(self, kept, factor):
        self.kept, self.factor = kept, factor


def dropout_forward(x, p, train, rng, mode="inverted"):
    """One flat draw reshaped (rng.random(x.size).reshape(x.shape) >= p); np.where; an object cache."""
    if not train:
        factor = 1.0 if mode == "inverted" else 1.0 - p
        return x * factor, DropoutState(None, factor)
    kept = (rng.random(x.size).reshape(x.shape) >= p).astype(x.dtype)
    factor = 1.0 if mode == "classic" else (0.0 if p == 1 else 1.0 / (1.0 - p))
    if p == 1:
        kept[...] = 0
    return np.where(kept > 0, x * factor, 0).astype(x.dtype), DropoutState(kept, factor)


def dropout_backward(dout, cache):
    if cache.kept is None:
        return dout * cache.factor
    return np.where(cache.kept > 0, dout * cache.factor, np.zeros_like(dout))
'''

ALTERNATIVES = {"binomial-dict-cache": BINOMIAL_DICT_CACHE, "cs231n-scaled-mask": CS231N_SCALED_MASK,
                "transposed-draw-in-place": TRANSPOSED_IN_PLACE, "flat-draw-object-cache": FLAT_DRAW_OBJECT_CACHE}


@pytest.mark.filterwarnings("error")  # no division by zero at p = 1 either
@pytest.mark.parametrize("source", ALTERNATIVES.values(), ids=ALTERNATIVES)
def test_correct_alternatives_pass(source):
    run_all(namespace_of(source))


def _dropout_student(draw="random", train_scale=True, eval_scale=False, p_is_keep=False, eval_mask=False,
                     new_mask=False, cache_scaled_mask=False, rng_source=None, p_one="zeros"):
    """A student's dropout forward/backward; the defaults are correct, each flag is one mistake or variant.

    ``p_one``: what p = 1 does: "zeros" (correct), "refuse" (ValueError, as the exercise once asked), "nan" (divides
    by 1 - p = 0 in numpy)."""
    def forward(x, p, train, rng, mode="inverted"):
        if p_one == "refuse" and not 0 <= p < 1:
            raise ValueError(f"p must lie in [0, 1); got {p}")
        keep = p if p_is_keep else 1.0 - p
        if rng_source is not None:
            rng = rng_source(rng)
        if not train and not eval_mask:
            scale = keep if (mode == "classic") != eval_scale else 1.0
            return x * scale, (None, scale)
        if draw == "binomial":
            mask = rng.binomial(1, keep, size=x.shape)
        elif draw == "uniform":
            mask = rng.uniform(size=x.shape) >= 1.0 - keep
        else:
            mask = rng.random(x.shape) < keep
        scale = 1.0 / keep if mode == "inverted" and train_scale and keep > 0 else 1.0
        if p_one == "nan" and keep == 0:
            scale = np.float64(1.0) / np.float64(keep) if mode == "inverted" else 1.0  # 0 * inf
        if cache_scaled_mask:
            return x * (mask * scale), (mask * scale, 1.0)
        return x * mask * scale, (mask, scale)

    def backward(dout, cache):
        mask, scale = cache
        if mask is None:
            return dout * scale
        if new_mask:
            mask = np.random.default_rng().random(dout.shape) < mask.mean()
        return dout * mask * scale

    return {"dropout_forward": forward, "dropout_backward": backward}


@pytest.mark.parametrize("variant", [{}, {"draw": "binomial"}, {"draw": "uniform"}, {"cache_scaled_mask": True}],
                         ids=["random", "binomial", "uniform", "scaled-mask-cache"])
def test_correct_code_passes_whatever_the_random_stream(variant):
    run_all(_dropout_student(**variant))


@pytest.mark.parametrize("flags,name,says", [
    ({"train_scale": False}, "dropout_train", "no scaling at train time"),
    ({"eval_scale": True}, "dropout_eval", "scaling in eval mode"),
    ({"p_is_keep": True}, "dropout_train", "p is used as the keep probability"),
    ({"p_is_keep": True}, "dropout_classic", "p is used as the keep probability"),
    ({"p_is_keep": True}, "dropout_backward", "p is used as the keep probability"),
    ({"eval_mask": True}, "dropout_eval", "a mask is applied in eval mode"),
    ({"eval_mask": True}, "dropout_backward", "a mask is applied in eval mode"),
    ({"new_mask": True}, "dropout_backward", "a new mask is drawn in the backward pass"),
    ({"train_scale": False}, "dropout_backward", "dx is not divided by the keep probability"),
    ({"eval_scale": True}, "dropout_classic", "classic dropout multiplies every unit by the keep probability"),
    ({"rng_source": lambda rng: np.random.default_rng()}, "dropout_train",
     "does not take its randomness from the rng argument"),
    ({"rng_source": lambda rng: np.random.default_rng(0)}, "dropout_train", "same mask twice"),
    ({"rng_source": lambda rng: __import__("copy").deepcopy(rng)}, "dropout_train", "same mask twice"),
])
def test_each_named_mistake_of_the_flags(flags, name, says):
    fails(name, _dropout_student(**flags), says)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the "nan" student divides by zero on purpose
@pytest.mark.parametrize("p_one,name,says", [
    ("refuse", "dropout_train", "raised ValueError"), ("refuse", "dropout_classic", "raised ValueError"),
    ("nan", "dropout_train", "got nan or inf"), ("refuse", "dropout_backward", "raised ValueError"),
    ("nan", "dropout_backward", "dx must be all zeros; got nan or inf"),
])
def test_p_equal_to_one_must_give_zeros_as_torch_does(p_one, name, says):
    message = fails(name, _dropout_student(p_one=p_one), says)
    assert "p=1.0" in message
    if name != "dropout_backward":
        assert "torch.nn.functional.dropout(x, p=1.0) returns" in message


def test_p_equal_to_one_in_eval_mode_follows_the_convention():
    student = _dropout_student()
    correct = student["dropout_forward"]

    def forward(x, p, train, rng, mode="inverted"):  # drops everything whenever p = 1, even in eval mode
        if p == 1:
            return np.zeros_like(x), (np.zeros(x.shape, bool), 0.0)
        return correct(x, p, train, rng, mode)

    student["dropout_forward"] = forward
    fails("dropout_eval", student, "in eval mode with p = 1 the output must be x * 1")
    check("ch07.dropout_train", student)    # the training-mode cell tests training mode only
    check("ch07.dropout_classic", student)  # classic eval mode is x * (1 - p) = 0 at p = 1


# Every seeded Mistake of the verdict module, each with its own message

def _mistaken(where, mode, mistake):
    """Correct dropout, except that ``where`` ("train", "eval", "backward train", "backward eval") in ``mode``
    computes ``mistake.fn`` (for 0 < p < 1)."""
    def forward(x, p, train, rng, mode_="inverted"):
        keep = 1.0 - p
        mask = rng.random(x.shape) < keep if train else None
        if train:
            out = x * mask * (1.0 / keep if mode_ == "inverted" and keep else 1.0)
        else:
            out = x * (1.0 if mode_ == "inverted" else keep)
        if where in ("train", "eval") and mode_ == mode and 0 < p < 1 and (where == "train") == train:
            out = mistake.fn(x, p, mask) if train else mistake.fn(x, p)
        return out, (mask, p, mode_)

    def backward(dout, cache):
        mask, p, mode_ = cache
        keep = 1.0 - p
        if mask is None:
            dx = dout * (1.0 if mode_ == "inverted" else keep)
        else:
            dx = dout * mask * (1.0 / keep if mode_ == "inverted" and keep else 1.0)
        if where.startswith("backward") and mode_ == mode and 0 < p < 1 and (where == "backward train") == (
                mask is not None):
            dx = mistake.fn(dout, p, mask) if mask is not None else mistake.fn(dout, p)
        return dx

    return {"dropout_forward": forward, "dropout_backward": backward}


SEEDED = ([("train", mode, m, "dropout_train" if mode == "inverted" else "dropout_classic")
           for mode, ms in ch07.TRAIN_MISTAKES.items() for m in ms]
          + [("eval", mode, m, "dropout_eval" if mode == "inverted" else "dropout_classic")
             for mode, ms in ch07.EVAL_MISTAKES.items() for m in ms]
          + [("backward train", mode, m, "dropout_backward") for mode, ms in ch07.BACKWARD_TRAIN_MISTAKES.items()
             for m in ms]
          + [("backward eval", mode, m, "dropout_backward") for mode, ms in ch07.BACKWARD_EVAL_MISTAKES.items()
             for m in ms])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where,mode,mistake,name", SEEDED,
                         ids=[f"{w}-{mode}-{m.message[:30]}" for w, mode, m, _ in SEEDED])
def test_each_seeded_mistake_is_named(where, mode, mistake, name):
    student = _mistaken(where, mode, mistake)
    graded = ch07.BACKWARD if where.startswith("backward") else ch07.FORWARD
    assert "(input: x " in fails(name, student, f"{graded}: {mistake.message}")
    for other in set(CHECKS) - {name} - ({"dropout_backward"} if where in ("train", "eval") else set()):
        check(f"ch07.{other}", student)  # the other cells are not charged for it


# The real bugs of the course design, as students write them

SOLUTION_DRAW = "kept = rng.random(x.shape) < keep"


@pytest.mark.parametrize("draw,names,says", [
    ("kept = rng.random(x.shape) < keep / keep", {"dropout_train", "dropout_classic"}, "no unit was dropped"),
    ("kept = rng.random(x.shape[-1]) < keep", {"dropout_train", "dropout_classic"}, "decisions are shared"),
    ("kept = rng.random((1,) + x.shape[1:]) < keep", {"dropout_train", "dropout_classic"}, "decisions are shared"),
    ("kept = rng.random(x.shape) < p", {"dropout_train", "dropout_classic", "dropout_backward"},
     "p is used as the keep probability"),
], ids=["rand-lt-p-over-p", "one-mask-per-feature", "one-(1,D)-mask", "keep-read-as-drop"])
def test_real_bugs_are_named(draw, names, says):
    """Each named cell fails with ``says``; eval mode, which draws no mask, passes."""
    namespace = namespace_of(solution_source([(SOLUTION_DRAW, draw)]))
    for name in names:
        fails(name, namespace, says)
    check("ch07.dropout_eval", namespace)


@pytest.mark.parametrize("config", probes.TRAIN_CASES + [((50, 8, 8), 0.6, np.float32), ((300, 40), 0.25, None)],
                         ids=str)
def test_independence_and_rate_bands_hold_for_independent_masks(config):
    """Honest masks of every case's shape and p, 300 seeds each: never taken for shared or biased ones."""
    shape, p, _ = config
    rng = np.random.default_rng(7)
    x = np.ones(shape)
    for _ in range(300):
        kept = rng.random(shape) >= p
        d = ch07.Draw(x, p, x * kept, kept, "band")
        ch07.check_independent(d)
        ch07.check_drop_rate(d)


# Hostile: what the student's code changes or returns never moves the expected values

def _with(forward=None, backward=None):
    """The solution with one function replaced."""
    namespace = namespace_of(solution_source())
    for name, fn in (("dropout_forward", forward), ("dropout_backward", backward)):
        if fn is not None:
            namespace[name] = fn
    return namespace


def test_a_backward_that_zeroes_dout_in_place_gets_nothing():
    solution = _with()

    def zeroing(dout, cache):
        solution["dropout_backward"](dout, cache)
        dout[...] = 0
        return dout

    fails("dropout_backward", _with(backward=zeroing), "dx is not zero exactly where the forward pass dropped")


def test_a_forward_that_changes_x_in_place_is_named():
    solution = _with()

    def doubling(x, p, train, rng, mode="inverted"):
        out, cache = solution["dropout_forward"](x, p, train, rng, mode)
        x *= 2
        return out, cache

    for name in CHECKS:
        fails(name, _with(forward=doubling), "modifies x in place")


def test_dropping_everything_and_a_zero_gradient_earn_nothing():
    def forward(x, p, train, rng, mode="inverted"):
        return np.zeros_like(x), None

    def backward(dout, cache):
        return np.zeros_like(dout)

    student = {"dropout_forward": forward, "dropout_backward": backward}
    fails("dropout_train", student, "dropped 100.0% of the units")
    fails("dropout_backward", student, "dropout_backward (its forward pass) dropped 100.0% of the units")
    fails("dropout_eval", student, "a mask is applied in eval mode")


@pytest.mark.parametrize("cut,says", [
    (lambda out: out[:1], "shape (1, 50), expected (400, 50)"),
    (lambda out: out[:0], "shape (0, 50), expected (400, 50)"),
    (lambda out: np.zeros((200_000, 1)), "shape (200000, 1), expected (400, 50)"),
    (lambda out: out.tolist(), "a list"),
    (lambda out: out.astype(np.int64), "dtype int64"),
], ids=["one-row", "no-rows", "huge", "list", "integers"])
def test_results_of_another_shape_or_kind_are_refused_by_shape(cut, says):
    solution = _with()

    def forward(x, p, train, rng, mode="inverted"):
        out, cache = solution["dropout_forward"](x, p, train, rng, mode)
        return cut(out), cache

    fails("dropout_train", _with(forward=forward), says)


def test_a_backward_of_a_broadcastable_shape_is_refused():
    solution = _with()

    def backward(dout, cache):
        return solution["dropout_backward"](dout, cache)[:1]

    fails("dropout_backward", _with(backward=backward), "shape (1, 40), expected (300, 40)")


def test_a_forward_that_returns_no_cache_is_refused_by_name():
    fails("dropout_train", {"dropout_forward": lambda x, p, train, rng, mode="inverted": x}, "returned ndarray")


def test_unimplemented_and_missing_functions_are_named():
    def todo(*args):
        raise NotImplementedError

    fails("dropout_train", {"dropout_forward": todo}, "dropout_forward is not implemented yet.")
    fails("dropout_backward", {"dropout_forward": _with()["dropout_forward"], "dropout_backward": todo},
          "dropout_backward is not implemented yet.")
    fails("dropout_eval", {}, "dropout_forward is not defined in your answer cells")


def test_the_reference_package_is_refused():
    import bnref

    fails("dropout_train", {"dropout_forward": bnref.dropout_forward}, "reference package")


def test_the_roster_mutants_apply_to_the_solved_source():
    """tests/class_roster.py seeds its ch07 students by text; each text still occurs in the solution."""
    for student, spec in ROSTER["ch07_dropout"].items():
        for cell, edits in (spec or {}).get("replace", {}).items():
            source = solution_cells("ch07_dropout")[cell]
            assert all(old in source for old, _ in edits), student


@pytest.mark.parametrize("student", [s for s, spec in ROSTER["ch07_dropout"].items() if spec is not None])
def test_the_roster_loses_exactly_its_cells(student):
    """The seeded class of the grading tests, judged in-process: each loses exactly the cells it must lose."""
    spec = ROSTER["ch07_dropout"][student]
    namespace = namespace_of(solution_source([e for edits in spec.get("replace", {}).values() for e in edits]))
    lost, messages = set(), []
    for name in CHECKS:
        try:
            check(f"ch07.{name}", namespace)
        except AssertionError as err:
            lost.add(f"test_{name}")
            messages.append(str(err))
    assert lost == spec.get("lose", set()), messages
    if "says" in spec:
        assert any(spec["says"] in m for m in messages), messages


TORCH_DROPOUT = '''
def dropout_forward(x, p, train, rng, mode="inverted"):
    import torch
    out = torch.nn.functional.dropout(torch.from_numpy(x), p=p, training=train).numpy()
    return out, out != 0
'''


def test_probes_and_verdicts_need_no_torch_and_a_torch_answer_gets_nothing(monkeypatch):
    """As in the sandbox, where torch cannot be imported: the solution passes; torch's dropout raises."""
    monkeypatch.setitem(sys.modules, "torch", None)
    run_all(namespace_of(solution_source()))
    fails("dropout_train", namespace_of(TORCH_DROPOUT), "dropout_forward raised ModuleNotFoundError")
