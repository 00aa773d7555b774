"""The hidden-test checks themselves: the reference passes, and each known mistake is named."""
import contextlib
import io
import re

import numpy as np
import pytest

import bnref
from bngrade.verdicts import ch02, ch06
from bngrade.judge import compare
from bngrade.verdicts.questions import QUESTIONS, check_choice


@pytest.fixture(autouse=True)
def no_reference_detection(request, monkeypatch):
    """Student code here is written in this test module, which imports bnref; detection is tested apart."""
    if "reference_package" not in request.node.name:
        monkeypatch.setattr(compare, "uses_reference", lambda fn: False)


@pytest.mark.parametrize("check,fn", [
    (ch02.check_batchnorm_forward, bnref.batchnorm_forward),
    (ch02.check_batchnorm_inference, bnref.batchnorm_inference),
    (ch02.check_update_running_stats, bnref.update_running_stats),
    (ch02.check_batchnorm1d, bnref.BatchNorm1d),
])
def test_correct_code_passes(check, fn):
    check(fn)


FORWARD_CHECKS = ([(ch02.check_batchnorm_forward, m) for m in ch02.FORWARD_MISTAKES]
                  + [(ch06.check_spatial_forward, m) for m in ch06.FORWARD_MISTAKES])


@pytest.mark.parametrize("check,mistake", FORWARD_CHECKS,
                         ids=[f"{c.__name__}-{m.message[:30]}" for c, m in FORWARD_CHECKS])
def test_each_forward_mistake_is_named(check, mistake):
    def student(x, gamma, beta, eps=1e-5):
        return mistake.fn(x, gamma, beta, eps).astype(x.dtype), None

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        check(student)


@pytest.mark.parametrize("mistake", ch02.RUNNING_MISTAKES, ids=lambda m: m.message[:40])
def test_each_running_stats_mistake_is_named(mistake):
    with pytest.raises(AssertionError, match=re.escape(mistake.message[:25])):
        ch02.check_update_running_stats(mistake.fn)


@pytest.mark.parametrize("mistake", ch02.INFERENCE_MISTAKES, ids=lambda m: m.message[:40])
def test_each_inference_mistake_is_named(mistake):
    with pytest.raises(AssertionError, match=re.escape(mistake.message[:25])):
        ch02.check_batchnorm_inference(mistake.fn)


def test_using_the_reference_package_is_refused():
    namespace = {"bnref": bnref}
    exec("def batchnorm_forward(x, gamma, beta, eps=1e-5):\n    return bnref.batchnorm_forward(x, gamma, beta, eps)",
         namespace)
    with pytest.raises(AssertionError, match="reference package"):
        ch02.check_batchnorm_forward(namespace["batchnorm_forward"])


def test_own_code_is_not_taken_for_the_reference_package():
    from bnref.cuda.emulator import CupyOnCpu

    device_array = CupyOnCpu().zeros(3)   # an ndarray subclass defined in bnref: data, not the reference's code
    namespace = {"np": np, "mean": device_array}
    exec("def batchnorm_forward(x, gamma, beta, eps=1e-5):\n    return x, None", namespace)
    assert not compare.uses_reference(namespace["batchnorm_forward"])
    namespace["layer"] = bnref.BatchNorm1d(3)   # an object of the reference's classes is its code
    assert compare.uses_reference(namespace["batchnorm_forward"])


def test_reference_package_itself_is_refused():
    with pytest.raises(AssertionError, match="reference package"):
        ch02.check_batchnorm_forward(bnref.batchnorm_forward)


def test_in_place_modification_is_named():
    def student(rm, rv, x, momentum=0.1):
        rm *= 1 - momentum
        rm += momentum * x.mean(0)
        rv *= 1 - momentum
        rv += momentum * x.var(0, ddof=1)
        return rm, rv

    with pytest.raises(AssertionError, match="modifies its input arrays in place"):
        ch02.check_update_running_stats(student)


def test_float64_output_for_float32_input_is_named():
    def student(x, gamma, beta, eps=1e-5):
        return bnref.batchnorm_forward(x.astype(np.float64), gamma.astype(np.float64),
                                       beta.astype(np.float64), eps)[0], None

    with pytest.raises(AssertionError, match="float32 in, float32 out|does not match"):
        ch02.check_batchnorm_forward(student)


def test_batchnorm1d_check_names_eval_mode_with_batch_statistics():
    class EvalUsesBatch(bnref.BatchNorm1d):
        def forward(self, x):
            self.train()
            return super().forward(x)

    with pytest.raises(AssertionError, match="in eval mode your layer normalizes with the batch statistics"):
        ch02.check_batchnorm1d(EvalUsesBatch)


@pytest.mark.parametrize("question", sorted(QUESTIONS))
def test_questions_accept_only_the_key(question):
    check_choice(question, QUESTIONS[question]["answer"].lower())
    for wrong in set("ABCD") - {QUESTIONS[question]["answer"]}:
        with pytest.raises(AssertionError, match=re.escape(QUESTIONS[question]["why"][wrong][:20])):
            check_choice(question, wrong)


# Chapter 6: spatial batch norm and folding.


def _spatial_student(to_rows, from_rows):
    """A student's spatial forward/backward built on the 1-D reference through a given layout."""
    def forward(x, gamma, beta, eps=1e-5):
        if np.ndim(x) != 4:
            raise ValueError("x must be (N, C, H, W)")
        out, cache = bnref.batchnorm_forward(to_rows(x), gamma, beta, eps)
        return from_rows(out, x.shape), (cache, x.shape)

    def backward(dout, cache):
        inner, shape = cache
        dx, dgamma, dbeta = bnref.batchnorm_backward(to_rows(dout), inner)
        return from_rows(dx, shape), dgamma, dbeta

    return forward, backward


SPATIAL_LAYOUTS = {
    "transpose": (lambda x: x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1]),
                  lambda r, s: r.reshape(s[0], s[2], s[3], s[1]).transpose(0, 3, 1, 2)),
    "swapaxes": (lambda x: x.swapaxes(1, 3).reshape(-1, x.shape[1]),
                 lambda r, s: r.reshape(s[0], s[3], s[2], s[1]).swapaxes(1, 3)),
    "naive reshape": (lambda x: x.reshape(-1, x.shape[1]), lambda r, s: r.reshape(s)),
}


@pytest.mark.parametrize("layout", ["transpose", "swapaxes"])
def test_spatial_checks_pass_any_correct_layout(layout):
    forward, backward = _spatial_student(*SPATIAL_LAYOUTS[layout])
    ch06.check_spatial_forward(forward)
    ch06.check_spatial_backward(forward, backward)
    ch06.check_spatial_rejects_bad_input(forward)


def test_spatial_checks_pass_the_reference_and_direct_axis_statistics():
    ch06.check_spatial_forward(bnref.spatial_batchnorm_forward)
    ch06.check_spatial_backward(bnref.spatial_batchnorm_forward, bnref.spatial_batchnorm_backward)
    ch06.check_spatial_rejects_bad_input(bnref.spatial_batchnorm_forward)
    ch06.check_fold_batchnorm(bnref.fold_batchnorm)

    def direct(x, gamma, beta, eps=1e-5):
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
        return ((x - mean) / np.sqrt(var + eps) * gamma[:, None, None] + beta[:, None, None]).astype(x.dtype), None

    ch06.check_spatial_forward(direct)


def test_naive_reshape_is_named_in_forward_and_backward():
    forward, backward = _spatial_student(*SPATIAL_LAYOUTS["naive reshape"])
    with pytest.raises(AssertionError, match=re.escape("x.reshape(-1, C)")):
        ch06.check_spatial_forward(forward)
    with pytest.raises(AssertionError, match=re.escape("x.reshape(-1, C)")):
        ch06.check_spatial_backward(forward, backward)


def _numpy_stats_student(axes):
    """A student who normalizes an NCHW array with statistics over ``axes``."""
    def forward(x, gamma, beta, eps=1e-5):
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        return ((x - mean) / np.sqrt(var + eps) * gamma[:, None, None] + beta[:, None, None]).astype(x.dtype), None
    return forward


@pytest.mark.parametrize("axes,says", [((0,), "statistics are per pixel"), ((1, 2, 3), "over (C, H, W)")])
def test_wrong_statistics_axes_are_named(axes, says):
    with pytest.raises(AssertionError, match=re.escape(says)):
        ch06.check_spatial_forward(_numpy_stats_student(axes))


@pytest.mark.parametrize("mistake", ch06.BACKWARD_MISTAKES, ids=lambda m: m.message[:40])
def test_each_spatial_backward_mistake_is_named(mistake):
    def forward(x, gamma, beta, eps=1e-5):
        return bnref.spatial_batchnorm_forward(x, gamma, beta, eps)[0], (x, gamma, beta, eps)

    def backward(dout, cache):
        return tuple(g.astype(dout.dtype) for g in mistake.fn(*cache, dout))

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        ch06.check_spatial_backward(forward, backward)


def test_spatial_forward_that_accepts_any_shape_is_refused():
    def student(x, gamma, beta, eps=1e-5):
        return x, None

    with pytest.raises(AssertionError, match="accepted a 2-D x"):
        ch06.check_spatial_rejects_bad_input(student)


@pytest.mark.parametrize("mistake", ch06.FOLD_MISTAKES, ids=lambda m: m.message[:40])
def test_each_fold_mistake_is_named(mistake):
    def student(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
        return tuple(a.astype(weight.dtype) for a in mistake.fn(weight, bias, gamma, beta, running_mean,
                                                                   running_var, eps))

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        ch06.check_fold_batchnorm(student)


def test_fold_that_returns_float64_for_a_float32_weight_is_named():
    def student(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):  # right values, products float64
        scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(running_var, np.float64) + eps)
        bias = np.zeros_like(scale) if bias is None else bias
        return weight * scale.reshape(-1, *[1] * (weight.ndim - 1)), (bias - running_mean) * scale + beta

    with pytest.raises(AssertionError, match=re.escape("keep the dtype of weight (float32 in, float32 out)")) as err:
        ch06.check_fold_batchnorm(student)
    assert "got folded weight float64" in str(err.value)


def test_fold_check_has_a_float32_weight_with_float64_bn_parameters():
    weight, bias, *params, _ = ch06._fold_cases()[-1].args
    assert weight.dtype == bias.dtype == np.float32 and all(p.dtype == np.float64 for p in params)
    assert [a.dtype for a in bnref.fold_batchnorm(weight, bias, *params)] == [np.float32, np.float32]


@pytest.mark.parametrize("forget,says", [("mean", "running mean is missing"), ("eps", "eps is missing")])
def test_folding_that_forgets_the_mean_or_eps_is_named(forget, says):
    def student(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
        scale = gamma / np.sqrt(running_var + (0.0 if forget == "eps" else eps))
        bias = np.zeros_like(gamma) if bias is None else bias
        shift = bias * scale + beta if forget == "mean" else (bias - running_mean) * scale + beta
        return weight * scale.reshape(-1, *[1] * (weight.ndim - 1)), shift

    with pytest.raises(AssertionError, match=re.escape(says)):
        ch06.check_fold_batchnorm(student)


# Chapter 7's checks are in test_verdicts_ch07.py.


# The solved sources: their visible tests catch the mistakes they are meant to catch

import jupytext  # noqa: E402
import torch  # noqa: E402

from bngrade.pipeline.course import REPO, SOURCES  # noqa: E402
from bngrade.judge.hidden import HIDDEN  # noqa: E402
from submissions import solution_cells  # noqa: E402


def _run_source(assignment, replace=None, hidden=False):
    """Run a solved source with its answer cells changed by ``replace`` ({grade_id: [(old, new), ...]}).

    The hidden blocks of the test cells are left out unless ``hidden``. Returns {grade cell: error message} of the
    grade cells that raised.
    """
    answers = solution_cells(assignment)
    namespace, failures = {}, {}
    default_dtype = torch.get_default_dtype()  # setup cells change it
    try:
        for cell in jupytext.read(SOURCES / f"{assignment}.md").cells:
            meta = cell.metadata.get("nbgrader", {})
            if cell.cell_type != "code":
                continue
            source = cell.source if hidden else HIDDEN.sub("", cell.source)
            if meta.get("solution"):
                source = answers[meta["grade_id"]]
                for old, new in (replace or {}).get(meta["grade_id"], []):
                    assert old in source, f"mutant text {old!r} not found in cell {meta['grade_id']}"
                    source = source.replace(old, new)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(source, namespace)
            except Exception as err:
                if not meta.get("grade"):
                    raise
                failures[meta["grade_id"]] = f"{type(err).__name__}: {err}"
    finally:
        torch.set_default_dtype(default_dtype)
    return failures


@pytest.mark.parametrize("assignment", ["ch01_why_normalize", "ch02_batchnorm_forward", "ch04_training_with_bn",
                                        "ch06_batchnorm_cnn", "ch07_dropout"])
def test_solved_source_passes_its_visible_and_hidden_tests(assignment):
    assert _run_source(assignment, hidden=True) == {}


@pytest.mark.parametrize("assignment,cell,old,new,lose,says", [
    ("ch02_batchnorm_forward", "batchnorm_forward", "var = (centered * centered).mean(axis=0)",
     "var = (x * x).mean(axis=0) - mean * mean", "test_forward", "subtract the mean before squaring"),
    ("ch06_batchnorm_cnn", "fold_batchnorm",
     "folded_weight, folded_bias = folded_weight.astype(weight.dtype), folded_bias.astype(weight.dtype)", "",
     "test_fold", "keep the weight's dtype"),
    ("ch07_dropout", "dropout_forward", "if not 0.0 <= p <= 1.0:", "if not 0.0 <= p < 1.0:",
     "test_dropout_train", "ValueError"),
    ("ch07_dropout", "dropout_forward", "if keep == 0.0:", "if keep < 0.0:", "test_dropout_train", "ZeroDivisionError"),
], ids=["ch02-one-pass-float32", "ch06-fold-float64", "ch07-refuses-p-1", "ch07-divides-by-zero-at-p-1"])
def test_visible_tests_catch(assignment, cell, old, new, lose, says):
    failures = _run_source(assignment, {cell: [(old, new)]})
    assert set(failures) == {lose}, failures
    assert says in failures[lose], failures


def test_float32_offset_of_1e3_is_what_the_page_the_exercise_and_the_hidden_case_say():
    case = ch02._forward_cases()[-1]
    x = case.args[0].astype(np.float64)
    ratio = np.median(np.abs(x.mean(0)) / x.std(0))
    assert x.dtype == np.float64 and case.args[0].dtype == np.float32 and 3e2 < ratio < 3e3 and "1e3" in case.label
    exercises = (REPO / "chapters" / "02_batchnorm_forward" / "index.md").read_text().rsplit("## Exercises", 1)[1]
    assert r"$|\mu|/\sigma \approx 10^3$" in exercises and "visible and the hidden tests" in exercises
    source = (SOURCES / "ch02_batchnorm_forward.md").read_text()
    assert "x32 = (1e3 + " in source and r"$|\mu|/\sigma \approx 10^3$" in source

    def one_pass(x, gamma, beta, eps=1e-5):
        mean = x.mean(0)
        return (gamma * (x - mean) / np.sqrt((x * x).mean(0) - mean * mean + eps) + beta).astype(x.dtype), None

    with pytest.raises(AssertionError, match=re.escape("E[x^2] - E[x]^2")) as err:
        ch02.check_batchnorm_forward(one_pass)
    assert case.label in str(err.value)


def test_batchnorm1d_attributes_the_hidden_check_uses_are_locked_in_the_exercise():
    import inspect

    used = set(re.findall(r"\blayer\.(\w+)", inspect.getsource(ch02.check_batchnorm1d)
                          + inspect.getsource(ch02._check_step)))
    locked = {"gamma", "beta", "running_mean", "running_var", "eps", "momentum", "training"}
    methods = {"train", "eval", "forward"}
    assert used <= locked | methods, used - locked - methods
    source = (SOURCES / "ch02_batchnorm_forward.md").read_text()
    section = source.split("## 4. A `BatchNorm1d` layer", 1)[1].split("```", 1)[0]
    assert "**locked**" in section
    for name in locked | {f"{m}()" for m in methods - {"forward"}} | {"forward(x)"}:
        assert f"`{name}`" in section, name
    layer = bnref.BatchNorm1d(3, momentum=0.2)
    assert all(hasattr(layer, name) for name in locked | methods)


# Chapter 3: backward passes graded through the student's own forward pass and cache

from bngrade.verdicts import ch03  # noqa: E402
from class_roster import ROSTER  # noqa: E402

CH03 = "ch03_batchnorm_backward"


def _ch03_notebook(spec):
    """Run the ch03 source notebook as the roster submission ``spec`` fills it in, hidden tests included.

    Returns:
        (namespace, {grade cell: error message} of the grade cells that raised).
    """
    answers = solution_cells(CH03)
    namespace, failures = {}, {}
    default_dtype = torch.get_default_dtype()  # the notebook's setup cell changes it
    try:
        for cell in jupytext.read(SOURCES / f"{CH03}.md").cells:
            meta = cell.metadata.get("nbgrader", {})
            if cell.cell_type != "code":
                continue
            source = cell.source
            if meta.get("solution"):
                source = answers[meta["grade_id"]]
                for old, new in spec.get("replace", {}).get(meta["grade_id"], []):
                    assert old in source, f"mutant text {old!r} not found in cell {meta['grade_id']}"
                    source = source.replace(old, new)
                source = spec.get("override", {}).get(meta["grade_id"], source)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(source, namespace)
            except Exception as err:  # a failing cell, as nbgrader would record it
                if meta.get("grade"):
                    failures[meta["grade_id"]] = f"{type(err).__name__}: {err}"
    finally:
        torch.set_default_dtype(default_dtype)
    return namespace, failures


@pytest.mark.parametrize("student", [s for s, spec in ROSTER[CH03].items() if spec is not None])
def test_ch03_roster_loses_exactly_its_cells_and_is_told_why(student):
    """The seeded ch03 class without nbgrader (fast); test_grading grades the same class with it."""
    spec = ROSTER[CH03][student]
    _, failures = _ch03_notebook(spec)
    assert set(failures) == spec.get("lose", set()), failures
    if "says" in spec:
        assert any(spec["says"] in message for message in failures.values()), failures


def test_ch03_blank_notebook_fails_every_grade_cell():
    blank = {grade_id: "raise NotImplementedError()" for grade_id in solution_cells(CH03)}
    _, failures = _ch03_notebook({"override": blank})
    cells = jupytext.read(SOURCES / f"{CH03}.md").cells
    assert set(failures) == {c.metadata["nbgrader"]["grade_id"] for c in cells
                             if c.metadata.get("nbgrader", {}).get("grade")}


@pytest.mark.parametrize("backward", [bnref.batchnorm_backward, bnref.batchnorm_backward_alt],
                         ids=lambda f: f.__name__)
def test_ch03_any_correct_backward_passes_whatever_its_cache(backward):
    ch03.check_batchnorm_backward(bnref.batchnorm_forward, backward)


def test_ch03_float32_kept_all_the_way_passes():
    """A float32 student with other rounding than the reference gets full marks."""
    def forward(x, gamma, beta, eps=1e-5):
        eps = np.asarray(eps, dtype=x.dtype)
        mean = np.sum(x, axis=0, dtype=x.dtype) / x.shape[0]
        var = np.sum((x - mean) ** 2, axis=0, dtype=x.dtype) / x.shape[0]
        x_hat = (x - mean) / np.sqrt(var + eps)
        return gamma * x_hat + beta, (x_hat, gamma, var + eps)

    def backward(dout, cache):
        x_hat, gamma, var_eps = cache
        dbeta, dgamma = dout.sum(axis=0), (dout * x_hat).sum(axis=0)
        return gamma / np.sqrt(var_eps) * (dout - dbeta / len(dout) - x_hat * dgamma / len(dout)), dgamma, dbeta

    ch03.check_batchnorm_backward(forward, backward)


def _forward_keeping_inputs(x, gamma, beta, eps=1e-5):
    """A student forward whose cache is simply its inputs."""
    return bnref.batchnorm_forward(x, gamma, beta, eps)[0], (x, gamma, beta, eps)


@pytest.mark.parametrize("mistake", ch03.BACKWARD_MISTAKES, ids=lambda m: m.message[:50])
def test_each_ch03_backward_mistake_is_named(mistake):
    def backward(dout, cache):
        return tuple(np.asarray(g).astype(cache[0].dtype) for g in mistake.fn(*cache, dout))

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:40])):
        ch03.check_batchnorm_backward(_forward_keeping_inputs, backward)


def test_ch03_backward_names_a_wrong_forward_first():
    def forward(x, gamma, beta, eps=1e-5):
        return ch02.FORWARD_MISTAKES[0].fn(x, gamma, beta, eps).astype(x.dtype), (x, gamma, beta, eps)

    with pytest.raises(AssertionError, match="graded with the cache of your batchnorm_forward.*divides by N-1"):
        ch03.check_batchnorm_backward(forward, lambda dout, cache: bnref.batchnorm_backward_alt(
            dout, bnref.batchnorm_forward(*cache)[1]))


def test_ch03_reference_package_is_refused_in_the_backward():
    """compare's reference check looks at both graded parts of the forward-then-backward chain."""
    nb, _ = _ch03_notebook({})
    ch03.check_batchnorm_backward(nb["batchnorm_forward"], nb["batchnorm_backward"])
    namespace = {"bnref": bnref}
    exec("def backward(dout, cache):\n    return bnref.batchnorm_backward_alt(dout, cache)", namespace)
    with pytest.raises(AssertionError, match="reference package"):
        ch03.check_batchnorm_backward(nb["batchnorm_forward"], namespace["backward"])


@pytest.mark.parametrize("mistake", ch03.INFERENCE_BACKWARD_MISTAKES, ids=lambda m: m.message[:50])
def test_each_ch03_inference_backward_mistake_is_named(mistake):
    def student(*args):
        return tuple(np.asarray(g).astype(args[1].dtype) for g in mistake.fn(*args))

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:40])):
        ch03.check_batchnorm_inference_backward(student)


@pytest.mark.parametrize("check,mistake", [(ch03.check_eval_numerical_gradient, m) for m in ch03.GRADCHECK_MISTAKES]
                         + [(ch03.check_rel_error, m) for m in ch03.REL_ERROR_MISTAKES],
                         ids=lambda arg: getattr(arg, "message", getattr(arg, "__name__", ""))[:50])
def test_each_gradcheck_tool_mistake_is_named(check, mistake):
    with pytest.raises(AssertionError, match=re.escape(mistake.message[:40])):
        check(mistake.fn)


def test_gradcheck_that_leaves_x_perturbed_in_the_callers_array_is_named():
    def student(f, x, df, h=1e-5):
        grad = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            x[i] += h
            up = f(x)
            x[i] -= 2 * h
            grad[i] = np.sum((up - f(x)) * df) / (2 * h)
        return grad

    with pytest.raises(AssertionError, match="x is not restored|modifies its input"):
        ch03.check_eval_numerical_gradient(student)


def test_rel_error_without_a_floor_is_named():
    with pytest.raises(AssertionError, match="floor the denominator"):
        ch03.check_rel_error(lambda a, b: np.max(np.abs(a - b) / (np.abs(a) + np.abs(b))))


class _EvalBackwardThroughBatchStats(bnref.BatchNorm1d):
    def backward(self, dout):
        if self.cache is None:
            _, self.cache = bnref.batchnorm_forward(self.eval_args[0], self.gamma, self.beta, self.eps)
        return super().backward(dout)


class _TrainBackwardWithoutStats(bnref.BatchNorm1d):
    def backward(self, dout):
        if self.cache is not None:
            x = self.cache.x
            self.eval_args = (x, self.gamma, self.cache.mean, self.cache.var, self.eps)
            self.cache = None
        return super().backward(dout)


class _NoParameterGradients(bnref.BatchNorm1d):
    def backward(self, dout):
        dx = super().backward(dout)
        del self.dgamma
        return dx


@pytest.mark.parametrize("layer,says", [
    (_EvalBackwardThroughBatchStats, "after an eval-mode forward it uses the training-mode gradient"),
    (_TrainBackwardWithoutStats, "yours treats them as constants"),
    (_NoParameterGradients, "set self.dgamma and self.dbeta"),
])
def test_each_layer_backward_mistake_is_named(layer, says):
    with pytest.raises(AssertionError, match=re.escape(says)):
        ch03.check_batchnorm1d_backward(layer)
