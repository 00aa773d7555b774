"""Intake: student ids that stay readable and distinct, collisions and odd files refused by name, and nbgrader
taking such ids end to end (its SQLite gradebook, ``autograde --student``)."""
import os
import stat
import unicodedata
import zipfile
from urllib.parse import unquote

import nbformat
import pytest
from nbgrader.api import Gradebook

from bngrade.pipeline import intake
from bngrade.pipeline.course import Course
from bngrade.pipeline.intake import STUDENT_ID, collect, student_id

NFD_ZOE = unicodedata.normalize("NFD", "Zoë")
# nbgrader's own autograde steps: this module tests intake and ids, not the sandbox or the judge
PLAIN_AUTOGRADE = ["nbgrader.preprocessors.Execute", "nbgrader.preprocessors.IgnorePattern",
                   "nbconvert.preprocessors.ClearMetadataPreprocessor", "nbgrader.preprocessors.LimitOutput",
                   "nbgrader.preprocessors.SaveAutoGrades", "nbgrader.preprocessors.AssignLatePenalties",
                   "nbgrader.preprocessors.CheckCellMetadata"]


def _cell(kind, source, **nbgrader):
    cell = (nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell)(source)
    if nbgrader:
        cell.metadata["nbgrader"] = {"grade": False, "solution": False, "locked": False, "task": False,
                                     "schema_version": 3, **nbgrader}
    return cell


def mini_course(root):
    """A course with the project's configuration, nbgrader's plain autograde steps and one released
    assignment ``hw``: an answer cell (``x = ...``) and a 1-point test cell (``assert x == 1``)."""
    course = Course(root)
    with course.path("nbgrader_config.py").open("a") as config:
        config.write(f"c.Autograde.autograde_preprocessors = {PLAIN_AUTOGRADE!r}\n")
    nb = nbformat.v4.new_notebook(cells=[
        _cell("markdown", "# Homework\nSet `x`."),
        _cell("code", "### BEGIN SOLUTION\nx = 1\n### END SOLUTION", solution=True, grade_id="answer"),
        _cell("code", "assert x == 1", grade=True, locked=True, grade_id="check", points=1)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = course.path("source", "hw", "hw.ipynb")
    source.parent.mkdir(parents=True)
    nbformat.write(nb, source)
    course.check("generate_assignment", "hw", "--force")
    return course


def submission(course, folder, answer="x = 1", extra=()):
    """``folder/hw.ipynb``: the released notebook with ``answer`` in its answer cell and ``extra`` cells after."""
    nb = nbformat.read(course.path("release", "hw", "hw.ipynb"), as_version=4)
    next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")).source = answer
    nb.cells += list(extra)
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / "hw.ipynb")
    return folder / "hw.ipynb"


def _notebook(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["marker"] = marker
    nbformat.write(nb, path)


def test_ids_keep_every_letter_and_map_the_rest_reversibly():
    names = ["Zoë", "Zoé", "Zo", "Anne Marie", "jane@uni.edu", "-rf", ".hidden", "a*b?[c]", "../x", "50%", "प्रिया",
             "Łukasz_Ż", "x\u202ey"]
    ids = [student_id(name) for name in names]
    assert ids[:3] == ["Zoë", "Zoé", "Zo"] and len(set(ids)) == len(ids)
    assert ids[3:6] == ["Anne%20Marie", "jane%40uni.edu", "%2Drf"]
    assert ids[10:12] == ["प्रिया", "Łukasz_Ż"]
    for name, sid in zip(names, ids):
        assert unquote(sid) == name and STUDENT_ID.match(sid)
        assert not sid.startswith((".", "-")) and not set(sid) & set("/*?[] \u202e")
    assert student_id(NFD_ZOE) == "Zoë" and not STUDENT_ID.match(NFD_ZOE)
    assert not STUDENT_ID.match("Anne Marie")


def test_zoe_zoe_and_zo_are_three_students(tmp_path):
    course = Course(tmp_path / "course")
    for name in ("Zoë", "Zoé", "Zo"):
        _notebook(tmp_path / "class" / name / "hw.ipynb", name)
    students, problems = collect(tmp_path / "class", "hw", course)
    assert sorted(students) == sorted(["Zoë", "Zoé", "Zo"]) and problems == {}
    for name in students:
        assert nbformat.read(course.path("submitted", name, "hw", "hw.ipynb"), as_version=4).metadata.marker == name


def test_names_equal_once_normalized_are_each_reported_and_none_is_graded(tmp_path):
    course = Course(tmp_path / "course")
    for name in ("Zoë", NFD_ZOE, "Zo"):
        _notebook(tmp_path / "class" / name / "hw.ipynb", name)
    students, problems = collect(tmp_path / "class", "hw", course)
    assert students == ["Zo"]
    assert sorted(problems) == sorted([f"Zoë ({ascii('Zoë')})", f"{NFD_ZOE} ({ascii(NFD_ZOE)})"])
    message = problems[f"Zoë ({ascii('Zoë')})"]
    assert ascii(NFD_ZOE) in message and "none of them is graded" in message
    assert not any(STUDENT_ID.match(key) for key in problems)   # so no gradebook row is made for either
    assert not course.path("submitted", "Zoë").exists()


def test_symbolic_links_and_special_files_are_refused_by_name(tmp_path):
    course = Course(tmp_path / "course")
    instructor = tmp_path / "source" / "hw.ipynb"
    _notebook(instructor, "BEGIN SOLUTION")
    folder = tmp_path / "class"
    _notebook(folder / "honest" / "hw.ipynb", "honest")
    (folder / "linked").mkdir()
    (folder / "linked" / "hw.ipynb").symlink_to(instructor)
    (folder / "nested" / "work").mkdir(parents=True)
    (folder / "nested" / "work" / "src").symlink_to(instructor.parent, target_is_directory=True)
    (folder / "alias").symlink_to(folder / "honest", target_is_directory=True)
    (folder / "piped").mkdir()
    os.mkfifo(folder / "piped" / "hw.ipynb")
    if os.geteuid() == 0:
        (folder / "device").mkdir()
        os.mknod(folder / "device" / "hw.ipynb", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    students, problems = collect(folder, "hw", course)
    assert students == ["honest"]
    assert problems["linked"] == "refused: linked/hw.ipynb is a symbolic link"
    assert problems["nested"] == "refused: nested/work/src is a symbolic link"
    assert problems["alias"] == "refused: alias is a symbolic link"
    assert problems["piped"] == "refused: piped/hw.ipynb is a FIFO"
    assert os.geteuid() != 0 or problems["device"] == "refused: device/hw.ipynb is a device"
    assert "BEGIN SOLUTION" not in "".join(p.read_text() for p in course.path("submitted").rglob("*.ipynb"))
    with pytest.raises(intake.Problem, match="refused"):   # the reader itself never follows a link either
        intake._read(folder / "linked" / "hw.ipynb")


def test_a_zip_entry_that_is_a_link_or_a_fifo_is_refused_by_name(tmp_path):
    course = Course(tmp_path / "course")
    _notebook(tmp_path / "nb.ipynb", "zip")
    archive = tmp_path / "class.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tmp_path / "nb.ipynb", "Zoë/hw.ipynb")
        for owner, mode in (("mallory", stat.S_IFLNK), ("trudy", stat.S_IFIFO)):
            link = zipfile.ZipInfo(f"{owner}/hw.ipynb")
            link.create_system, link.external_attr = 3, (mode | 0o777) << 16
            zf.writestr(link, "../../source/hw/hw.ipynb")
    students, problems = collect(archive, "hw", course)
    assert students == ["Zoë"]
    assert problems == {"mallory": "refused: mallory/hw.ipynb is a symbolic link in the zip",
                        "trudy": "refused: trudy/hw.ipynb is a FIFO in the zip"}


def test_nbgrader_grades_unicode_and_encoded_ids_end_to_end(tmp_path):
    course = mini_course(tmp_path / "course")
    submission(course, tmp_path / "class" / "Zoë")
    submission(course, tmp_path / "class" / "Anne Marie", answer="x = 2")
    students, problems = collect(tmp_path / "class", "hw", course)
    assert sorted(students) == ["Anne%20Marie", "Zoë"] and problems == {}
    for student in students:
        course.check("autograde", "hw", "--student", student, "--force")
    with Gradebook(f"sqlite:///{course.path('gradebook.db')}") as gb:
        scores = {s.id: gb.find_submission("hw", s.id).score for s in gb.students}
    assert scores == {"Zoë": 1.0, "Anne%20Marie": 0.0}
    assert course.path("autograded", "Zoë", "hw", "hw.ipynb").is_file()
