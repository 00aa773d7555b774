"""The execution cache: a regrade re-executes only the students whose sandboxed step's inputs changed."""
import json

import nbformat
import pytest

from bngrade.judge import autograde
from bngrade.pipeline.grading import from_cache, grade_class
from bngrade.sandbox import Limits
from small_class import ASSIGNMENT, LIMITS, STUDENTS, grades, small_course

pytestmark = pytest.mark.xdist_group("grading")


def _grade(course, subs, **options):
    report, _ = grade_class(course, ASSIGNMENT, subs, progress=False, cell_timeout=15, jobs=2, limits=LIMITS,
                            **options)
    assert all(not problems for problems in report.values()), report
    return from_cache(course, ASSIGNMENT, STUDENTS)


def test_a_regrade_reexecutes_only_what_changed(tmp_path):
    course, subs = small_course(tmp_path)
    assert _grade(course, subs) == set()                      # first grade: every student runs
    first = grades(course)
    assert first["solution"] != first["unbiased-var"]
    assert _grade(course, subs) == set(STUDENTS)              # nothing changed: nobody runs
    assert grades(course) == first
    path = subs / "unbiased-var" / f"{ASSIGNMENT}.ipynb"      # one notebook changes: only its student runs
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("a note"))
    nbformat.write(nb, path)
    assert _grade(course, subs) == {"solution"}
    entries = [p for p in course.path(".bngrade", "cache").rglob("*") if p.is_file()]
    for entry in entries:                                     # corrupted entries: detected, recomputed
        data = bytearray(entry.read_bytes())
        data[-10] ^= 0xFF
        entry.write_bytes(bytes(data))
    assert _grade(course, subs) == set()
    assert _grade(course, subs, cache=False) == set()         # --no-cache: everyone runs
    assert grades(course) == first


def test_a_change_of_points_or_verdict_leaves_the_key_alone(tmp_path):
    """What the judge alone reads (points; tolerances and messages live in bngrade.verdicts) is not in the
    bundle, so changing it re-executes nobody; the notebook and the limits are."""
    course, _ = small_course(tmp_path)
    released = nbformat.read(course.path("source", ASSIGNMENT, f"{ASSIGNMENT}.ipynb"), as_version=4)
    seen = []

    def executor(bundle, gpu):
        seen.append(bundle)
        raise StopIteration

    def bundle_of(nb, limits=Limits()):
        with pytest.raises(StopIteration):
            autograde.execute(nb, "nb.ipynb", ASSIGNMENT, {"timeout": 15}, limits, salt=1, executor=executor)
        return seen[-1]

    before = bundle_of(released)
    more = nbformat.from_dict(json.loads(json.dumps(released)))
    for cell in more.cells:
        if "points" in cell.metadata.get("nbgrader", {}):
            cell.metadata["nbgrader"]["points"] += 1
    assert bundle_of(more) == before
    assert bundle_of(released, Limits(wall=5)) != before
    more.cells[0].source += "\n"
    assert bundle_of(more) != before
