"""The instructor's workflow end to end, on nbgrader's real machinery and SQLite gradebook."""
import csv
import subprocess
import sys
import zipfile

import pytest
from nbgrader.api import Gradebook

from bngrade.pipeline.course import assignments
from bngrade.pipeline.grading import grade_class
from bngrade.pipeline.intake import Problem
from class_roster import ROSTER, write_class
from emulated_gpu import can_run, gpu_for

pytestmark = pytest.mark.xdist_group("grading")

GRADED = [(a, s) for a, students in ROSTER.items() for s, spec in students.items()
          if spec is None or "lose" in spec]


def _grades(course, assignment, student):
    with Gradebook(f"sqlite:///{course.path('gradebook.db')}") as gb:
        nb = gb.find_submission_notebook(assignment, assignment, student)
        return {g.name: (g.score, g.max_score) for g in nb.grades if g.cell_type == "code" and g.max_score}


@pytest.mark.parametrize("assignment,student", GRADED)
def test_each_submission_loses_exactly_the_points_of_its_mistake(graded, course, assignment, student):
    graded[assignment]
    grades = _grades(course, assignment, student)
    lost = {name for name, (score, max_score) in grades.items() if score != max_score}
    spec = ROSTER[assignment][student]
    if spec is None:  # the blank released notebook
        assert lost == set(grades), f"a blank notebook kept points in {set(grades) - lost}"
        assert all(score == 0 for score, _ in grades.values())
    else:
        assert lost == spec.get("lose", set()), f"{student}: lost {sorted(lost)}"


@pytest.mark.parametrize("assignment", sorted(ROSTER))
def test_grades_csv_lists_every_student_with_the_right_total(graded, course, assignment):
    report, csv_path = graded[assignment]
    rows = {r["student_id"]: r for r in csv.DictReader(csv_path.open()) if r["assignment"] == assignment}
    assert set(ROSTER[assignment]) <= set(rows), "every student, graded or not, has a row"
    full = float(rows["solution"]["max_score"])
    assert float(rows["solution"]["score"]) == full > 0
    assert float(rows["blank"]["score"]) == 0
    for student, spec in ROSTER[assignment].items():
        if spec and "lose" in spec:
            grades = _grades(course, assignment, student)
            expected = full - sum(grades[name][1] for name in spec["lose"])
            assert float(rows[student]["score"]) == expected, student


def test_broken_submissions_are_reported_by_name_and_do_not_stop_the_class(graded):
    report, _ = graded["ch02_batchnorm_forward"]
    for student, spec in ROSTER["ch02_batchnorm_forward"].items():
        if spec and "problem" in spec:
            assert any(spec["problem"] in p for p in report[student]), (student, report[student])
        elif spec is None or not spec.get("lose") or "override" not in spec:
            assert report[student] == [], (student, report[student])


@pytest.mark.parametrize("assignment", sorted(ROSTER))
def test_feedback_names_the_mistake(graded, course, assignment):
    for student, spec in ROSTER[assignment].items():
        if spec and "says" in spec:
            html = course.path("feedback", student, assignment, f"{assignment}.html").read_text()
            assert spec["says"] in html, f"{student}'s feedback does not say {spec['says']!r}"


def test_solution_passes_nbgrader_validate_and_blank_fails_every_test(course, tmp_path):
    """`nbgrader validate` on the filled-in notebook, `--invert` on the blank released one."""
    from submissions import make_submission

    for assignment in filter(can_run, assignments()):
        released = course.path("release", assignment, f"{assignment}.ipynb")
        solved = make_submission(released, assignment, tmp_path / assignment / f"{assignment}.ipynb")
        with gpu_for(assignment):   # the GPU assignment, without a GPU: on the CPU emulator
            ok = course.nbgrader("validate", str(solved))[1]
            inverted = course.nbgrader("validate", "--invert", str(released))[1]
        assert "Success! Your notebook passes all the tests." in ok, ok
        assert "Success! The notebook does not pass any tests." in inverted, inverted


def test_lms_zip_is_collected_and_a_corrupt_zip_is_a_clear_error(course, tmp_path):
    assignment = "ch01_why_normalize"
    folder = write_class(course, assignment, tmp_path / "class")
    archive = tmp_path / "canvas.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # Canvas-style flat names: <student>_<ids>_<file>
        zf.write(folder / "solution" / f"{assignment}.ipynb", f"zoe_1234_5678_{assignment}.ipynb")
        zf.write(folder / "blank" / f"{assignment}.ipynb", f"yann_4321_8765_{assignment}-1.ipynb")
        zf.writestr("../evil.ipynb", "{}")
    report, csv_path = grade_class(course, assignment, archive, progress=False)
    assert report["zoe"] == [] and report["yann"] == []
    assert report["../evil.ipynb"] == ["unsafe path in zip, skipped"]
    rows = {r["student_id"]: r for r in csv.DictReader(csv_path.open()) if r["assignment"] == assignment}
    assert float(rows["zoe"]["score"]) == float(rows["zoe"]["max_score"]) > 0
    assert float(rows["yann"]["score"]) == 0

    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(Problem, match="not a readable zip"):
        grade_class(course, assignment, corrupt, progress=False)


def test_cli_reports_a_corrupt_zip_without_a_traceback(course, tmp_path):
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "bngrade", "--course", str(course.root), "grade",
                           "ch01_why_normalize", str(corrupt), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "not a readable zip" in proc.stderr and "Traceback" not in proc.stderr
