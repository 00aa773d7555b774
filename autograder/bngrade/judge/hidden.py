"""The hidden blocks of test cells: finding them, the checks they name, and what the sandbox runs instead."""
import re

from bngrade.judge.check import keys_of

HIDDEN = re.compile(r"^[ \t]*### BEGIN HIDDEN TESTS[ \t]*\n(.*?)^[ \t]*### END HIDDEN TESTS[ \t]*\n?", re.S | re.M)


def grade_id(cell):
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def is_test_cell(cell):
    meta = cell.metadata.get("nbgrader", {})
    return cell.cell_type == "code" and meta.get("grade") and not meta.get("solution")


def is_answer_cell(cell):
    return cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution")


def is_students(cell):
    """A code cell whose source is the student's: an answer cell, or a cell without nbgrader metadata (added by
    the student). Locked and test cells are restored from the gradebook by nbgrader."""
    meta = cell.metadata.get("nbgrader", {})
    return cell.cell_type == "code" and (meta.get("solution") or not (meta.get("grade") or meta.get("locked")))


def hidden_code(cell):
    """The hidden block of a test cell ('' if none)."""
    return "".join(HIDDEN.findall(cell.source))


def check_keys(cell):
    """The probe keys a test cell's hidden block checks."""
    code = hidden_code(cell)
    return keys_of(code) if code else []


def without_hidden(cell):
    """A test cell's source with its hidden block removed: what the notebook runs in the sandbox (the visible
    tests); the hidden checks are probed apart, on the answer cells alone."""
    return HIDDEN.sub("", cell.source, count=1)
