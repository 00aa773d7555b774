"""Helpers of the differential tests of the hidden checks (``tests/test_verdicts_chNN.py``): a check run
in-process on a namespace, through its probe and its verdict (:func:`bngrade.judge.check.check`)."""
import re

import jupytext
import pytest

from bngrade.judge.check import check
from bngrade.judge.hidden import check_keys, is_test_cell
from bngrade.pipeline.course import SOURCES


def passes(chapter, names, namespace):
    """Run the checks ``chapter.<name>`` of ``names`` on ``namespace``: each must pass."""
    for name in names:
        check(f"{chapter}.{name}", namespace)


def fails(chapter, name, namespace, says):
    """Assert that check ``chapter.<name>`` fails on ``namespace`` with a message containing ``says``; returns it."""
    with pytest.raises(AssertionError, match=re.escape(says)) as err:
        check(f"{chapter}.{name}", namespace)
    return str(err.value)


def lost_cells(assignment, namespace):
    """(grade ids of the test cells whose hidden checks fail on ``namespace``, their messages), as the grader
    would score them: a cell is lost at its first failing check."""
    lost, messages = set(), []
    for cell in jupytext.read(SOURCES / f"{assignment}.md").cells:
        if not is_test_cell(cell):
            continue
        try:
            for key in check_keys(cell):
                check(key, namespace)
        except AssertionError as err:
            lost.add(cell.metadata["nbgrader"]["grade_id"])
            messages.append(str(err))
    return lost, messages
