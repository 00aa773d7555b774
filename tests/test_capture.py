"""The trust boundary's pieces: the plain-data codec, the public package, records read by the judge."""
import io
import json

import numpy as np
import pytest

from bncapture import codec
from bngrade import sandbox
from bngrade.pipeline import executors, grading
from bngrade.pipeline.intake import Problem


def _npz(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("blob,what", [
    (_npz(a=np.array([{"evil": 1}], dtype=object)), "pickled"),
    (_npz(a=np.zeros(2, dtype=[("x", "f8"), ("y", "i4")])), "structured"),
    (_npz(a=np.array(["text"])), "string array"),
    (b"PK\x03\x04 not a zip", "corrupt"),
])
def test_outcomes_that_are_not_plain_numeric_data_are_refused(blob, what):
    with pytest.raises(codec.Malformed):
        codec.loads('{"outcomes": []}', blob)


@pytest.mark.parametrize("text", ['{"a": ' * 80 + "1" + "}" * 80, json.dumps({"x": "y" * (codec.MAX_STRING + 100)}),
                                  "not json", json.dumps(list(range(codec.MAX_ITEMS + 1)))])
def test_outcome_trees_over_the_limits_are_refused(text):
    with pytest.raises(codec.Malformed):
        codec.loads(text, b"")


def test_the_public_package_holds_no_reference_no_key_and_no_grader():
    """What runs in the sandbox imports nothing private: no bnref, no bngrade, no answer key."""
    import ast
    from pathlib import Path

    import bncapture

    for path in Path(bncapture.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"bnref", "bngrade", "solutions"}, path.name


def test_a_student_exception_comes_back_as_data_with_its_builtin_bases():
    from bncapture.probe import Probe
    from bngrade.judge.results import Results

    class Custom(ValueError):
        pass

    def raises(*_):
        raise Custom("names the shape (N, D)")

    probe = Probe({"f": raises})
    probe.call("k", probe.student("f"), 1)
    error = Results(probe.tree(), codec.LazyArrays()).raised("k", "f", "input")
    assert error == {"type": "Custom", "bases": ["ValueError", "Exception", "BaseException"],
                     "message": "names the shape (N, D)"}


def test_a_missing_record_is_not_a_pass():
    from bngrade.judge.results import Results

    results = Results({"records": {}, "error": "cell 'forward' ran past the grader's time limit"}, codec.LazyArrays())
    with pytest.raises(AssertionError, match="no result came back for input x.*time limit"):
        results.get("case0", np.zeros(3), "batchnorm_forward", "x")


def test_grading_is_refused_where_no_sandbox_can_be_made(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "available", lambda: "bwrap cannot create namespaces here")
    monkeypatch.setattr(grading, "collect", lambda *a, **k: pytest.fail("submissions were collected"))
    with pytest.raises(Problem, match="cannot grade in a sandbox.*--no-sandbox"):
        grading.grade_class(object(), "ch02_batchnorm_forward", tmp_path, progress=False)


@pytest.mark.skipif(sandbox.available() is not None, reason=f"no sandbox here: {sandbox.available()}")
def test_the_same_runner_sees_the_repository_only_without_the_sandbox():
    """``--no-sandbox`` runs the notebook and the probes the same way, with the grader's view; the sandboxes hide
    the repository from both."""
    import nbformat

    from bngrade.judge import autograde
    from bngrade.pipeline.course import REPO

    nb = nbformat.v4.new_notebook()
    visible = f"import os\nanswer_bias = str(os.path.exists({str(REPO / 'solutions')!r}))"
    answer = nbformat.v4.new_code_cell(visible + "\nprint('repo visible:', answer_bias)")
    answer.metadata["nbgrader"] = {"solution": True, "grade": False, "grade_id": "answer_bias", "schema_version": 3}
    test = nbformat.v4.new_code_cell("### BEGIN HIDDEN TESTS\nfrom bngrade.judge.check import check\n"
                                     "check('questions.ch02_bias_before_bn', globals())\n### END HIDDEN TESTS\n")
    test.metadata["nbgrader"] = {"solution": False, "grade": True, "grade_id": "test_bias", "points": 1,
                                 "schema_version": 3}
    nb.cells = [answer, test]
    seen = {}
    for boxed in (True, False):
        executed, status, probed, records, exceeded = autograde.execute(
            nb, "nb.ipynb", "ch02_batchnorm_forward", {"timeout": 60}, sandbox.Limits(), executor=executors.Local(boxed))
        assert status["ended"] == probed["ended"] == "ok" and not exceeded, (status, probed)
        tree, _ = records["test_bias"]
        seen[boxed] = (executed.cells[0].outputs[0]["text"].strip(),
                       tree["questions.ch02_bias_before_bn"]["records"]["answer"]["value"])
    assert seen == {True: ("repo visible: False", "False"), False: ("repo visible: True", "True")}
