"""The hidden-test checks themselves: the reference passes, and each known mistake is named."""
import contextlib
import io
import re

import numpy as np
import pytest

import bnref
from bngrade.verdicts import ch02
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


FORWARD_CHECKS = [(ch02.check_batchnorm_forward, m) for m in ch02.FORWARD_MISTAKES]


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


# Chapter 6's checks are in test_verdicts_ch06.py.


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


@pytest.mark.parametrize("assignment", ["ch01_why_normalize", "ch02_batchnorm_forward", "ch03_batchnorm_backward",
                                        "ch04_training_with_bn", "ch06_batchnorm_cnn", "ch07_dropout"])
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


# Chapter 3's checks are in test_verdicts_ch03.py.
