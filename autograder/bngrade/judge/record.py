"""Record each test cell's script: run its hidden checks once on the instructor's solution.

``python -m bngrade.judge.record ASSIGNMENT FOLDER`` (run by ``grade`` once per class, outside any sandbox: this is
the instructor's own code) executes the solved source's non-test cells, then the hidden block of every test
cell with the student's names bound to :class:`bngrade.judge.remote.Remote` stand-ins of the solution's objects.
Each cell's operations are written to ``FOLDER/<grade id>.json|.npz``: data only, never an outcome.
"""
import os
import sys
import tempfile
from pathlib import Path

import jupytext

from bncapture import codec

from bngrade.pipeline.course import SOURCES
from bngrade.judge.hidden import grade_id, hidden_code, is_test_cell
from bngrade.judge.remote import Session, run_hidden


def solution_namespace(nb):
    """The globals of the solved notebook after its answer and setup cells (test cells skipped)."""
    namespace = {"__name__": "__main__"}
    for cell in nb.cells:
        if cell.cell_type == "code" and not is_test_cell(cell):
            exec(compile(cell.source, f"<{grade_id(cell) or 'cell'}>", "exec"), namespace)
    return namespace


def record(assignment, folder):
    """Write the script of every test cell of ``assignment`` into ``folder``; returns {grade id: ops}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(SOURCES / f"{assignment}.md")
    os.environ.setdefault("BNREF_PROGRESS", "0")
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            namespace = solution_namespace(nb)
            counts = {}
            for cell in nb.cells:
                code = hidden_code(cell) if is_test_cell(cell) else ""
                if not code:
                    continue
                session = Session(record=namespace)
                try:
                    run_hidden(code, session)
                except AssertionError as err:
                    raise RuntimeError(f"the solution fails its own hidden test {grade_id(cell)}: {err}") from None
                codec.save(folder / grade_id(cell), {"ops": session.asked}, session.asked_arrays)
                counts[grade_id(cell)] = len(session.asked)
        finally:
            os.chdir(here)
    return counts


if __name__ == "__main__":
    for cell, n in record(sys.argv[1], sys.argv[2]).items():
        print(f"{cell}: {n} operations")
