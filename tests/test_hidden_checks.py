"""The solved sources run in-process with their hidden blocks (probe and verdict of every check), and their
visible tests catch what they are meant to catch. Each chapter's checks are in tests/test_verdicts_chNN.py."""
import contextlib
import io
import re

import numpy as np
import pytest

import bnref
from bncapture import ch02 as ch02_probes
from bngrade.judge import check as checking
from bngrade.judge.check import check

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
                                        "ch04_training_with_bn", "ch06_batchnorm_cnn", "ch07_dropout",
                                        "ch08_beyond_bn"])
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


def test_float32_offset_of_1e3_is_what_the_page_the_exercise_and_the_hidden_case_say(monkeypatch):
    monkeypatch.setattr(checking, "_reference_names", lambda names, namespace: [])   # this module imports bnref
    case = ch02_probes.forward_cases()[-1]
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
        check("ch02.batchnorm_forward", {"batchnorm_forward": one_pass})
    assert case.label in str(err.value)


def test_batchnorm1d_attributes_the_hidden_check_uses_are_locked_in_the_exercise():
    import inspect

    probes = inspect.getsource(ch02_probes.batchnorm1d)
    used = set(re.findall(r"\blayer\.(\w+)", probes)) | set(re.findall(r"read\([^,]+, layer, \"(\w+)\"\)", probes))
    used |= set(re.findall(r"getattr\(layer, \"(\w+)\"", probes))
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
