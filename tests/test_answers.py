"""The probe's runner (bncapture.answers) and the judge's handling of what comes back, without a sandbox.

What runs: the answer cells and the locked cells' definitions only; a crash, a hang or a time-limit-swallowing
loop costs one cell or one check; outsized or malformed results are refused unread, under a memory limit.
"""
import io
import json
import resource
import subprocess
import sys
import zipfile

import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from bncapture import answers, codec
from bngrade import sandbox
from bngrade.judge.autograde import Judge, memory_limit, parse_probes


def _cell(source, kind, grade_id):
    meta = {"answer": {"solution": True, "grade": False, "locked": False},
            "locked": {"solution": False, "grade": False, "locked": True},
            "test": {"solution": False, "grade": True, "locked": True, "points": 1}}.get(kind)
    cell = new_code_cell(source)
    if meta is not None:
        cell.metadata["nbgrader"] = dict(meta, grade_id=grade_id, schema_version=3)
    return cell


FORWARD = ("import numpy as np\ndef batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
           "    if x.ndim != 2 or x.shape[0] < 2 or gamma.shape != (x.shape[1],) or beta.shape != gamma.shape:\n"
           "        raise ValueError('x must be (N, D), gamma and beta (D,)')\n"
           "    mu, var = x.mean(0), x.var(0)\n"
           "    return (gamma * (x - mu) / np.sqrt(var + eps) + beta).astype(x.dtype), (mu, var)\n")


def test_only_answer_cells_and_locked_definitions_run():
    cells = [_cell("import numpy as np\nTRIALS = []\nTRIALS.append('experiment ran')\nrng = np.random.default_rng(0)",
                   "locked", "setup"),
             _cell(FORWARD, "answer", "forward"),
             _cell("def batchnorm_forward(*a):\n    return 'redefined in an extra cell'", None, None),
             _cell("raise RuntimeError('visible test')", "test", "test_forward")]
    namespace, problems = answers.build_namespace(cells, 10, isolate=True)
    assert namespace["TRIALS"] == [] and "rng" in namespace, "a locked cell's definitions run, its experiments do not"
    assert namespace["batchnorm_forward"](np.ones((2, 1)), np.ones(1), np.zeros(1))[0].shape == (2, 1)
    assert problems == {}


def test_a_failing_statement_is_reported_and_the_rest_of_the_cell_still_runs():
    cells = [_cell("import not_a_module_at_all\nimport sys\nsys.exit(3)\nLATER = 1", "answer", "forward")]
    namespace, problems = answers.build_namespace(cells, 10, isolate=False)
    assert namespace["LATER"] == 1
    assert problems["forward"].startswith("ModuleNotFoundError") and "(line 1)" in problems["forward"]


def test_a_crashing_cell_is_skipped_and_the_cells_around_it_count():
    cells = [_cell("A = 1", "answer", "first"), _cell("import os\nos._exit(7)", "answer", "crash"),
             _cell("B = A + 1", "answer", "after")]
    namespace, problems = answers.build_namespace(cells, 10, isolate=True)
    assert namespace["B"] == 2
    assert problems == {"crash": "the cell crashed the Python process (exit code 7); it was skipped"}


def _plan(keys, seconds=5):
    return {"cells": {"test_forward": keys}, "probe_seconds": seconds, "cell_seconds": seconds, "isolate": True}


def test_a_probe_that_hangs_or_crashes_costs_that_check_alone():
    hang = "def batchnorm_forward(*a, **k):\n    while True:\n        try:\n            pass\n        except BaseException:\n            pass\n"
    for source, why in [(hang, "ran past the grader's time limit"), ("import os\ndef batchnorm_forward(*a, **k):\n"
                                                                     "    os._exit(0)\n", "crashed")]:
        namespace, _ = answers.build_namespace([_cell(source, "answer", "forward")], 5, isolate=True)
        results = answers.probe_cells(_plan(["ch02.batchnorm_forward", "questions.ch02_bias_before_bn"], 2),
                                      dict(namespace, answer_bias="A"))
        tree, _ = results["test_forward"]
        assert why in tree["ch02.batchnorm_forward"]["error"]
        assert tree["questions.ch02_bias_before_bn"]["records"]["answer"] == {"value": "A"}


def test_the_runner_writes_one_zip_of_plain_data(tmp_path):
    nb = new_notebook(cells=[_cell(FORWARD, "answer", "forward")])
    (tmp_path / "in").mkdir()
    (tmp_path / "work").mkdir()
    nbformat.write(nb, tmp_path / "in" / "notebook.ipynb")
    (tmp_path / "in" / "plan.json").write_text(json.dumps(_plan(["ch02.batchnorm_forward"])))
    proc = subprocess.run([sys.executable, "-m", "bncapture.answers", str(tmp_path / "in"), str(tmp_path / "work")],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, records = parse_probes(proc.stdout, sandbox.Limits())
    assert status == {"ended": "ok", "error": "", "cells": {}}
    tree, arrays = records["test_forward"]
    assert Judge._verdict(["ch02.batchnorm_forward"], (tree, arrays), {}, {}, None, "test_forward", []) is None


def _probe_zip(value_shape):
    """A probe zip whose every forward record is one array of ``value_shape`` (zeros: it compresses to little)."""
    records = {f"case{i}": {"value": {"a": "k0"}} for i in range(17)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("status.json", json.dumps({"ended": "ok", "cells": {}}))
        zf.writestr("out/test_forward.json", json.dumps({"ch02.batchnorm_forward": {"records": records}}))
        codec.write_arrays(zf, "out/test_forward/", {"ch02.batchnorm_forward/k0": np.zeros(value_shape)})
    return buffer.getvalue()


def test_an_outsized_result_is_refused_from_its_header_without_growing_the_judge():
    """8 million rows for an expected (2, 3): a few hundred KB sent, 64 MB if read; it is never read."""
    blob = _probe_zip((8_000_000, 1, 1))
    assert len(blob) < 1_000_000
    _, warm = parse_probes(_probe_zip((2, 3)), sandbox.Limits())   # imports and the reference, once
    Judge._verdict(["ch02.batchnorm_forward"], warm["test_forward"], {}, {}, None, "test_forward", [])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, records = parse_probes(blob, sandbox.Limits())
    message = Judge._verdict(["ch02.batchnorm_forward"], records["test_forward"], {}, {}, None, "test_forward", [])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert "shape (8000000, 1, 1), expected (2, 3)" in message
    assert grown < 32 * 1024, f"the judge grew by {grown} KB"


def test_malformed_records_cost_the_cell_and_are_flagged():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("status.json", "{}")
        zf.writestr("out/test_forward.json", "[[[[not json")
    _, records = parse_probes(buffer.getvalue(), sandbox.Limits())
    flags = []
    message = Judge._verdict(["ch02.batchnorm_forward"], records["test_forward"], {}, {}, None, "test_forward", flags)
    assert "no usable results" in message and flags and flags[0][1].startswith("malformed results")


def test_the_judge_runs_under_a_memory_limit_of_its_own():
    with memory_limit(256 * sandbox.MiB):
        with pytest.raises(MemoryError):
            np.ones(1 << 30)
    assert np.ones(1 << 26).sum() == 1 << 26   # lifted afterwards


def test_a_verdict_that_breaks_on_odd_records_costs_that_cell_only(monkeypatch):
    """A grader's bug triggered by a student's records must not stop nbgrader for the whole notebook."""
    from bngrade.judge import autograde

    def broken(key, *args, **kwargs):
        raise KeyError("a verdict's own bug")

    monkeypatch.setattr(autograde, "judge", broken)
    _, records = parse_probes(_probe_zip((2, 3)), sandbox.Limits())
    flags = []
    message = Judge._verdict(["ch02.batchnorm_forward"], records["test_forward"], {}, {}, None, "test_forward", flags)
    assert "could not judge this test" in message
    assert flags == [("test_forward", "could not be judged: KeyError: \"a verdict's own bug\"")]
