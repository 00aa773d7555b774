"""Make student submissions the way a student would: fill the released notebook's
answer cells, optionally with a seeded mistake."""
import re

import jupytext
import nbformat

from bngrade.pipeline.course import SOURCES

MARKERS = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n", re.M)


def solution_cells(assignment):
    """{grade_id: source with solution markers removed} of the solved source's answer cells."""
    nb = jupytext.read(SOURCES / f"{assignment}.md")
    return {
        cell.metadata["nbgrader"]["grade_id"]: MARKERS.sub("", cell.source)
        for cell in nb.cells
        if cell.metadata.get("nbgrader", {}).get("solution")
    }


def make_submission(released, assignment, path, replace=None, cell_override=None):
    """Write a filled-in copy of the ``released`` notebook to ``path``.

    Args:
        replace: {grade_id: [(old, new), ...]} text substitutions (the seeded mistakes);
            each ``old`` must occur, so a stale mutant fails loudly.
        cell_override: {grade_id: source} to write verbatim (e.g. an infinite loop).
    """
    answers = solution_cells(assignment)
    nb = nbformat.read(released, as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id not in answers:
            continue
        source = answers[grade_id]
        for old, new in (replace or {}).get(grade_id, []):
            assert old in source, f"mutant text {old!r} not found in cell {grade_id}"
            source = source.replace(old, new)
        cell.source = (cell_override or {}).get(grade_id, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path
