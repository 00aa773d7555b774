"""The trust boundary's pieces: the plain-data codec, the record/replay session, the script's contents."""
import io
import json

import numpy as np
import pytest

import bnref
from bncapture import codec
from bncapture.runner import Runner
from bngrade.pipeline import grading
from bngrade import sandbox
from bngrade.pipeline.intake import Problem
from bngrade.judge.record import record
from bngrade.judge.remote import Diverged, NoResult, Remote, Session


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


def _forward_session():
    """A recorded session of one call to the solution's batchnorm_forward, and its script."""
    namespace = {"batchnorm_forward": bnref.batchnorm_forward}
    recorder = Session(record=namespace)
    x = np.random.default_rng(0).normal(size=(5, 3))
    fn = recorder.global_("batchnorm_forward")
    fn(x, np.ones(3), np.zeros(3))
    return ({"ops": recorder.asked}, recorder.asked_arrays), x


def _replay(script, student):
    """Outcomes of ``student`` (run as the sandbox would) for ``script``, and a replaying session."""
    runner = Runner({"batchnorm_forward": student}, script[1])
    outcomes = runner.run_all(script[0]["ops"])
    return Session(script=script, outcomes=(outcomes, runner.out_arrays))


def test_replay_returns_the_students_results_and_refuses_other_calls():
    script, x = _forward_session()
    session = _replay(script, lambda x, g, b: (x * 0 + 7, None))
    fn = session.global_("batchnorm_forward")
    assert isinstance(fn, Remote)
    out, cache = fn(x, np.ones(3), np.zeros(3))
    assert np.all(out == 7) and cache is None
    with pytest.raises(Diverged):
        fn(x + 1, np.ones(3), np.zeros(3))   # not in the script: another path than prepared


def test_a_student_exception_comes_back_as_the_same_builtin_type():
    script, x = _forward_session()

    def student(x, g, b):
        raise ValueError("x must be (N, D)")

    fn = _replay(script, student).global_("batchnorm_forward")
    with pytest.raises(ValueError, match=r"x must be \(N, D\)"):
        fn(x, np.ones(3), np.zeros(3))


def test_missing_outcomes_are_not_a_pass():
    script, x = _forward_session()
    session = Session(script=script, outcomes=([], {}), missing="the kernel died")
    with pytest.raises(NoResult, match="the kernel died"):
        session.global_("batchnorm_forward")


def test_the_sandboxs_script_holds_no_reference_output(tmp_path):
    """What goes into the sandbox is the grader's inputs: no output of the solution, no hidden code."""
    record("ch02_batchnorm_forward", tmp_path)
    text = "".join(p.read_text() for p in tmp_path.glob("*.json"))
    assert "check_" not in text and "bngrade" not in text and "Mistake" not in text
    arrays = [a for p in tmp_path.glob("*.npz") for a in np.load(p, allow_pickle=False).values()]
    inputs = [a for a in arrays if a.ndim == 2 and a.shape[0] >= 2]
    assert inputs, "the script holds the hidden tests' inputs"
    for x in inputs:
        d = x.shape[1]
        expected = bnref.batchnorm_forward(x, np.ones(d, x.dtype), np.zeros(d, x.dtype))[0]
        assert not any(a.shape == expected.shape and np.allclose(a, expected) for a in arrays)


def test_grading_is_refused_where_no_sandbox_can_be_made(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "available", lambda: "bwrap cannot create namespaces here")
    monkeypatch.setattr(grading, "collect", lambda *a, **k: pytest.fail("submissions were collected"))
    with pytest.raises(Problem, match="cannot grade in a sandbox.*--no-sandbox"):
        grading.grade_class(object(), "ch02_batchnorm_forward", tmp_path, progress=False)


@pytest.mark.skipif(sandbox.available() is not None, reason=f"no sandbox here: {sandbox.available()}")
def test_the_same_runner_sees_the_repository_only_without_the_sandbox():
    """``--no-sandbox`` runs the notebook the same way, with the grader's view; the sandbox hides the repository."""
    import nbformat

    from bngrade.judge import autograde
    from bngrade.pipeline.course import REPO

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"import os\nprint('repo visible:', os.path.exists({str(REPO / 'solutions')!r}))")]
    seen = {}
    for boxed in (True, False):
        executed, status, _, exceeded = autograde.execute(nb, "nb.ipynb", {}, {"timeout": 60}, sandbox.Limits(),
                                                          use_sandbox=boxed)
        assert status["ended"] == "ok" and not exceeded, status
        seen[boxed] = executed.cells[0].outputs[0]["text"].strip()
    assert seen == {True: "repo visible: False", False: "repo visible: True"}
