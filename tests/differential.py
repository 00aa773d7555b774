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


def loses_its_cells(assignment, spec, namespace):
    """Assert that ``namespace``, the roster submission ``spec`` of ``assignment`` (tests/class_roster.py), loses
    exactly the cells ``spec["lose"]`` to its hidden checks, one of them with a message containing ``spec["says"]``."""
    lost, messages = lost_cells(assignment, namespace)
    assert lost == spec.get("lose", set()), messages
    if "says" in spec:
        assert any(spec["says"] in message for message in messages), messages


def submission(assignment, *sources, spec=None, **objects):
    """The namespace of the roster submission ``spec`` of ``assignment`` (``replace``: {grade id: [(old, new)]},
    ``override``: {grade id: source}; default: the solved source): the setup cell, then each answer cell (one that
    raises NotImplementedError, as released, defines nothing), then ``objects`` and ``sources`` (a student's code
    that redefines some of its names)."""
    import textwrap

    from submissions import solution_cells

    spec = spec or {}
    namespace = {}
    exec(next(c.source for c in jupytext.read(SOURCES / f"{assignment}.md").cells
              if c.metadata.get("nbgrader", {}).get("grade_id") == "setup"), namespace)
    for grade_id, source in solution_cells(assignment).items():
        for old, new in spec.get("replace", {}).get(grade_id, []):
            assert old in source, f"mutant text {old!r} not found in cell {grade_id}"
            source = source.replace(old, new)
        try:
            exec(spec.get("override", {}).get(grade_id, source), namespace)
        except NotImplementedError:
            pass
    namespace.update(objects)
    for source in sources:
        exec(textwrap.dedent(source), namespace)
    return namespace
