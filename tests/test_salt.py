"""The secret input salt: graded inputs change with the course's salt, the solution passes under any salt.

The probes' code is public, so with fixed seeds anyone could compute the graded inputs' answers ahead (with
torch, at home) and ship a lookup table. The course's salt (``.bngrade/salt``) makes a graded run's inputs
unknowable; these tests show the solution's verdicts do not depend on which salt is drawn.
"""
import jupytext
import numpy as np
import pytest

from bncapture import answers, cases, ch02
from bngrade.judge import check as checking
from bngrade.judge.autograde import salted
from bngrade.judge.check import check
from bngrade.judge.hidden import check_keys, is_test_cell
from bngrade.pipeline.course import SOURCES, Course

SALTS = (1, 987_654_321, 2**61 + 12345)


def test_the_salt_changes_the_inputs_and_the_same_salt_gives_the_same_ones():
    plain = ch02.forward_cases()
    with salted(SALTS[0]):
        first, again = ch02.forward_cases(), ch02.forward_cases()
    with salted(SALTS[1]):
        other = ch02.forward_cases()
    assert cases.SALT is None
    for a, b, c, d in zip(plain, first, again, other):
        assert np.array_equal(b.args[0], c.args[0])
        assert not np.array_equal(a.args[0], b.args[0]) and not np.array_equal(b.args[0], d.args[0])


def test_a_course_keeps_one_secret_salt(tmp_path, monkeypatch):
    monkeypatch.delenv("BNGRADE_SALT", raising=False)
    course = Course(tmp_path / "course")
    salt = course.salt()
    assert salt == Course(tmp_path / "course").salt() and salt != Course(tmp_path / "other").salt()
    assert (tmp_path / "course" / ".bngrade" / "salt").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("assignment", ["ch01_why_normalize", "ch02_batchnorm_forward", "ch03_batchnorm_backward",
                                        "ch04_training_with_bn", "ch06_batchnorm_cnn", "ch07_dropout",
                                        "ch08_beyond_bn"])
def test_the_solution_passes_every_check_under_other_salts(assignment, monkeypatch):
    """The solved source's answer cells, as the probe builds them. (Chapter 5 needs a GPU or the emulator: its
    solution is graded under the tests' fixed salt in tests/test_gpu_grading.py.)"""
    monkeypatch.setattr(checking, "_reference_names", lambda names, namespace: [])
    nb = jupytext.read(SOURCES / f"{assignment}.md")
    namespace, problems = answers.build_namespace(nb.cells, 120, isolate=False)
    assert problems == {}
    keys = [key for cell in nb.cells if is_test_cell(cell) for key in check_keys(cell)]
    assert keys
    for salt in SALTS:
        with salted(salt):
            for key in keys:
                check(key, namespace)
