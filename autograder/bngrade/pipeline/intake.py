"""Bring a class's submissions into nbgrader's ``submitted/<student>/<assignment>/`` layout.

Two inputs are accepted:

* a folder with one sub-folder per student, each holding the student's
  notebook (anywhere below it);
* an LMS-style zip: either the same per-student folders, or flat files named
  ``<student>_<anything>.ipynb`` as Canvas and similar systems export them.

Every problem (an unreadable zip or zip member, a notebook that is not valid
JSON, a student with no or several candidate notebooks) is reported with the
student's name; the other students are still collected.

Student ids (:func:`student_id`) keep the name readable and distinct: NFC-normalized, letters, marks and
digits of every script kept, any other character percent-encoded, so that ``Zoë``, ``Zoé`` and ``Zo`` are
three students. Two names that are the same after normalization (``Zoë`` typed as one character, or as
``e`` and a combining diaeresis) are not merged: each is reported by name, and neither is graded.

Nothing is read through a symbolic link, nor from a FIFO, a device or a socket: a submission (folder or zip
member) that holds one is refused by name.
"""
import os
import shutil
import stat
import tempfile
import unicodedata
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

import nbformat

KEPT = "._-"   # besides letters, marks and digits; "." and "-" are encoded first (a hidden name, an option)


class Problem(Exception):
    """A submission that cannot be graded, with what the instructor should know."""


def student_id(raw):
    """nbgrader's student id for a folder name or a file-name prefix: readable, and reversible by ``unquote``.

    The name is NFC-normalized; letters, combining marks and digits (of any script), ``_``, and ``.`` or ``-``
    after the first character are kept; every other character (spaces, ``/``, ``%``, glob characters,
    invisible ones) is percent-encoded as UTF-8: ``"Anne Marie"`` is ``"Anne%20Marie"``.
    """
    name = unicodedata.normalize("NFC", raw)
    if not name:
        raise Problem("cannot make a student id from an empty name")
    kept = [ch if ch.isalnum() or unicodedata.category(ch).startswith("M") or (ch in KEPT and (i or ch == "_"))
            else "".join(f"%{byte:02X}" for byte in ch.encode("utf-8", "surrogateescape"))
            for i, ch in enumerate(name)]
    return "".join(kept)


class _StudentIds:
    """``STUDENT_ID.match(text)``: whether ``text`` is a student id as :func:`student_id` makes them."""

    def match(self, text):
        try:
            return student_id(unquote(text)) == text
        except Problem:
            return False


STUDENT_ID = _StudentIds()


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


def _kind(mode):
    """What a file that is neither a folder nor a regular file is, in words."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def _read(path):
    """The bytes of ``path``: a regular file, opened without following a symbolic link, else Problem."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise Problem(f"{path.name} cannot be read ({os.strerror(exc.errno)}): refused") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise Problem(f"{path.name} is {_kind(mode)}: refused")
        return fh.read()


def _check_readable(name, data, cell_ids=None):
    """Raise Problem unless ``data`` is a valid nbformat-4 notebook holding some of the assignment's cells."""
    try:
        text = data.decode("utf-8")
        major = nbformat.reads(text, as_version=nbformat.NO_CONVERT).get("nbformat")
        nb = nbformat.reads(text, as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # JSON errors, schema errors, bad encodings
        raise Problem(f"{name} is not a readable notebook ({type(exc).__name__}: {str(exc)[:200]})") from None
    if major != 4:
        raise Problem(f"{name} is nbformat {major}: convert it (jupyter nbconvert --to notebook) or resubmit")
    found = {c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells}
    if cell_ids and not found & set(cell_ids):
        raise Problem(f"{name} holds none of the assignment's cells (an empty or different notebook)")


def _odd_files(folder):
    """The symbolic links and special files below ``folder``, in words (relative paths); nothing is followed."""
    odd = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root, name)
            mode = path.lstat().st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                odd.append(f"{path.relative_to(folder.parent)} is {_kind(mode)}")
    return odd


def _groups_from_folder(folder):
    """{student folder name: [notebook paths], or the Problem that refuses it} for a folder of per-student folders.

    A student entry that is, or holds, a symbolic link or a special file is refused; loose regular files are
    ignored.
    """
    groups = {}
    for entry in sorted(folder.iterdir()):
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode):
            odd = _odd_files(entry)
            groups[entry.name] = Problem("refused: " + "; ".join(odd)) if odd else sorted(entry.rglob("*.ipynb"))
        elif not stat.S_ISREG(mode):
            groups[entry.name] = Problem(f"refused: {entry.name} is {_kind(mode)}")
    return groups


def _extract_zip(archive, into, problems):
    """Extract the notebooks of ``archive`` safely below ``into``; returns {student: [paths], or a Problem}.

    A student whose entries include a symbolic link or a special file (by the zip's Unix mode) is refused.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise Problem(f"{archive} is not a readable zip file ({exc})") from None
    groups = {}
    with zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if info.is_dir() or "__MACOSX" in name.parts:
                continue
            if name.is_absolute() or ".." in name.parts:
                problems[str(name)] = "unsafe path in zip, skipped"
                continue
            owner = name.parts[0] if len(name.parts) > 1 else name.name.split("_", 1)[0]
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind not in (0, stat.S_IFREG):
                groups[owner] = Problem(f"refused: {name} is {_kind(kind)} in the zip")
            if name.suffix != ".ipynb" or isinstance(groups.get(owner), Problem):
                continue
            target = Path(into, *name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.write_bytes(zf.read(info))
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                groups[owner] = Problem(f"{name} could not be extracted from the zip ({exc})")
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
        (students, problems): the ids collected, and {student id, file, or name of a colliding student: message}.

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
        names = {}
        for raw in groups:
            names.setdefault(student_id(raw), []).append(raw)
        students = []
        for sid, raws in names.items():
            if len(raws) > 1:   # keyed so as not to be an id: no gradebook row for any of them
                for raw in raws:
                    others = ", ".join(ascii(other) for other in raws if other != raw)
                    problems[f"{raw} ({ascii(raw)})"] = (
                        f"the same name as {others} once Unicode-normalized (student id {sid!r}): none of them is "
                        "graded; give each student a folder name of their own")
                continue
            try:
                if isinstance(groups[raws[0]], Problem):
                    raise groups[raws[0]]
                notebook = _pick_notebook(groups[raws[0]], assignment)
                data = _read(notebook)
                _check_readable(notebook.name, data, cell_ids)
            except Problem as exc:
                problems[sid] = str(exc)
                continue
            target = course.path("submitted", sid, assignment, f"{assignment}.ipynb")
            shutil.rmtree(target.parent, ignore_errors=True)
            target.parent.mkdir(parents=True)
            target.write_bytes(data)
            students.append(sid)
    return students, problems
