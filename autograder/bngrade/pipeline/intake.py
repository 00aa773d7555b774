"""Bring a class's submissions into nbgrader's ``submitted/<student>/<assignment>/`` layout.

Two inputs are accepted:

* a folder with one sub-folder per student, each holding the student's
  notebook (anywhere below it);
* an LMS-style zip: either the same per-student folders, or flat files named
  ``<student>_<anything>.ipynb`` as Canvas and similar systems export them.

Every problem (an unreadable zip or zip member, a notebook that is not valid
JSON, a student with no or several candidate notebooks) is reported with the
student's name; the other students are still collected.
"""
import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import nbformat

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]*$")


class Problem(Exception):
    """A submission that cannot be graded, with what the instructor should know."""


def _student_id(raw):
    """A safe nbgrader student id from a folder or file-name prefix."""
    sid = re.sub(r"[^A-Za-z0-9.\-]", "", raw)
    if not STUDENT_ID.match(sid or ""):
        raise Problem(f"cannot make a student id from {raw!r}")
    return sid


def _pick_notebook(candidates, assignment):
    """The one notebook of a student for ``assignment`` among ``candidates``."""
    candidates = [p for p in candidates if ".ipynb_checkpoints" not in p.parts]
    named = [p for p in candidates if assignment in p.name]
    chosen = named or candidates
    if not chosen:
        raise Problem("no .ipynb notebook found")
    if len(chosen) > 1:
        raise Problem("several notebooks found: " + ", ".join(sorted(p.name for p in chosen)))
    return chosen[0]


def _check_readable(path, cell_ids=None):
    """Raise Problem unless ``path`` is a valid nbformat-4 notebook holding some of the assignment's cells."""
    try:
        major = nbformat.reads(path.read_text(encoding="utf-8"), as_version=nbformat.NO_CONVERT).get("nbformat")
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # JSON errors, schema errors, bad encodings
        raise Problem(f"{path.name} is not a readable notebook ({type(exc).__name__}: {str(exc)[:200]})") from None
    if major != 4:
        raise Problem(f"{path.name} is nbformat {major}: convert it (jupyter nbconvert --to notebook) or resubmit")
    found = {c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells}
    if cell_ids and not found & set(cell_ids):
        raise Problem(f"{path.name} holds none of the assignment's cells (an empty or different notebook)")


def _groups_from_folder(folder):
    """{student folder name: [notebook paths]} for a folder of per-student folders."""
    return {d.name: sorted(d.rglob("*.ipynb")) for d in sorted(folder.iterdir()) if d.is_dir()}


def _extract_zip(archive, into, problems):
    """Extract the notebooks of ``archive`` safely below ``into``; returns {student: [paths]}."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise Problem(f"{archive} is not a readable zip file ({exc})") from None
    groups = {}
    with zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if info.is_dir() or name.suffix != ".ipynb" or "__MACOSX" in name.parts:
                continue
            if name.is_absolute() or ".." in name.parts:
                problems[str(name)] = "unsafe path in zip, skipped"
                continue
            owner = name.parts[0] if len(name.parts) > 1 else name.name.split("_", 1)[0]
            target = Path(into, *name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.write_bytes(zf.read(info))
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                problems[owner] = f"{name} could not be extracted from the zip ({exc})"
                continue
            groups.setdefault(owner, []).append(target)
    return groups


def collect(source, assignment, course):
    """Copy each student's notebook to ``submitted/<student>/<assignment>/<assignment>.ipynb``.

    Args:
        source: folder of per-student folders, or a zip file.
        assignment: the assignment id, e.g. ``ch02_batchnorm_forward``.
        course: a :class:`bngrade.pipeline.course.Course`.

    Returns:
        (students, problems): the ids collected, and {student or file: message}.

    Raises:
        Problem: when ``source`` itself cannot be read (missing, not a zip).
    """
    source = Path(source)
    problems = {}
    released = course.path("release", assignment, f"{assignment}.ipynb")
    cell_ids = ({c.metadata.get("nbgrader", {}).get("grade_id") for c in nbformat.read(released, as_version=4).cells}
                - {None}) if released.exists() else None
    with tempfile.TemporaryDirectory() as tmp:
        if source.is_dir():
            groups = _groups_from_folder(source)
        elif source.is_file():
            groups = _extract_zip(source, tmp, problems)
        else:
            raise Problem(f"{source} does not exist")
        students = []
        for raw, paths in groups.items():
            try:
                sid = _student_id(raw)
                notebook = _pick_notebook(paths, assignment)
                _check_readable(notebook, cell_ids)
            except Problem as exc:
                problems[raw] = str(exc)
                continue
            target = course.path("submitted", sid, assignment, f"{assignment}.ipynb")
            shutil.rmtree(target.parent, ignore_errors=True)
            target.parent.mkdir(parents=True)
            shutil.copyfile(notebook, target)
            students.append(sid)
    return students, problems
