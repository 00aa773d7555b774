"""The machinery behind every verdict: compare what a probe recorded with the reference, computed here on the
grader's own copy of the inputs, and when they disagree, say which known mistake the result matches.

A verdict raises ``AssertionError`` with a message written for the student; nbgrader scores the cell 0 and the
feedback shows that message. Every expected value and every mistake is computed from the public case builders
(:mod:`bncapture.cases` and the chapters' probe modules), never from anything the student's code returned.
"""
import ast
import copy
from typing import Callable, NamedTuple

import numpy as np

# Float32 results are compared loosely, float64 ones tightly.
TOLERANCE = {np.dtype(np.float32): (2e-4, 2e-4), np.dtype(np.float64): (1e-7, 1e-8)}


class Mistake(NamedTuple):
    """A known wrong implementation and what to tell a student whose output matches it."""

    message: str
    fn: Callable


def tolerance(dtype):
    """(rtol, atol) for comparing arrays of ``dtype``."""
    return TOLERANCE.get(np.dtype(dtype), TOLERANCE[np.dtype(np.float64)])


def close(got, expected, dtype=None, tol=None):
    """True when ``got`` matches ``expected`` in structure, exact shape and value (arrays or tuples of arrays).

    Shapes must be equal (nothing is broadcast); ``tol`` = (rtol, atol) overrides the tolerance of ``dtype``;
    atol scales with max |expected|.
    """
    if isinstance(expected, (tuple, list)):
        return (isinstance(got, (tuple, list)) and len(got) == len(expected)
                and all(close(g, e, dtype, tol) for g, e in zip(got, expected)))
    if np.shape(got) != np.shape(expected):
        return False
    try:
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    expected = np.asarray(expected, dtype=np.float64)
    rtol, atol = tol or tolerance(dtype or np.float64)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    return bool(np.allclose(got, expected, rtol=rtol, atol=atol * scale, equal_nan=False))


def describe_mismatch(got, expected, dtype=None, tol=None):
    """A short description of how two results of the same structure differ: the largest error and where."""
    if isinstance(expected, (tuple, list)):
        for i, (g, e) in enumerate(zip(got, expected)):
            if not close(g, e, dtype, tol):
                return f"result [{i}]: " + describe_mismatch(g, e, dtype, tol)
        return "results differ"
    err = np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64))
    if err.size == 0:
        return "results differ"
    index = tuple(int(i) for i in np.unravel_index(np.argmax(err), err.shape))
    return f"largest absolute error {np.max(err):.3g} at index {index}"


def name_mistake(got, case, mistakes, name, dtype, tol=None):
    """Raise the message of the first mistake whose output ``got`` matches, if any."""
    for mistake in mistakes:
        try:
            wrong = mistake.fn(*copy.deepcopy(case.args))
        except Exception:  # the mistake does not apply to this input
            continue
        if close(got, wrong, dtype, tol):
            raise AssertionError(f"{name}: {mistake.message} (input: {case.label})")


def dtype_of(case):
    return next((a.dtype for a in case.args if isinstance(a, np.ndarray)), np.dtype(np.float64))


def compare(r, prefix, reference, cases, name, mistakes=(), pick=lambda result: result, tol=None):
    """Assert that the records ``prefix0``, ``prefix1``, ... match ``reference`` on ``cases``, or name the mistake.

    Args:
        r: the probe's :class:`bngrade.judge.results.Results`.
        reference: the reference function; ``pick`` selects from its result what the probe recorded.
        mistakes: :class:`Mistake` s tried, in order, when a case fails; each returns what ``pick`` selects.
        tol: optional (rtol, atol) instead of the dtype's tolerance.
    """
    for index, case in enumerate(cases):
        expected = pick(reference(*copy.deepcopy(case.args)))
        got = r.get(f"{prefix}{index}", expected, name, case.label)
        dtype = dtype_of(case)
        if close(got, expected, dtype, tol):
            continue
        name_mistake(got, case, mistakes, name, dtype, tol)
        raise AssertionError(f"{name} does not match the reference for input {case.label}: "
                             f"{describe_mismatch(got, expected, dtype, tol)}")


def inputs_unchanged(r, prefix, cases, name):
    """Assert that the calls recorded with ``after=True`` left their array arguments as they were."""
    for index, case in enumerate(cases):
        for position, before in enumerate(case.args):
            if not isinstance(before, np.ndarray):
                continue
            after = r.after(f"{prefix}{index}", position, before, name, case.label)
            if not np.array_equal(before, after):
                raise AssertionError(f"{name} modifies its input arrays in place; return new arrays instead "
                                     f"(input: {case.label})")


def keeps_float32(r, key, like, name, label, where=None):
    """Assert that the float32 case recorded at ``key`` came back float32 (as torch does)."""
    got = r.get(key, like, name, label)
    out = got[0] if isinstance(got, (tuple, list)) else got
    if np.asarray(out).dtype != np.float32:
        raise AssertionError(f"{name} returns {np.asarray(out).dtype} for float32 input{where or ''}; keep the "
                             "input's dtype (float32 in, float32 out), as PyTorch does")


def rejects(r, prefix, bad, name):
    """Assert that every call ``prefix<what>`` (one per ``{what: args}`` of ``bad``) raised a ValueError."""
    for what in bad:
        error = r.raised(f"{prefix}{what}", name, what)
        if error is None:
            raise AssertionError(f"{name} accepted {what}; it must raise ValueError")
        if error["type"] == "NotImplementedError":
            raise AssertionError(f"{name} is not implemented yet.")
        if "ValueError" not in error["bases"]:
            raise AssertionError(f"{name} raised {error['type']} for {what}; raise a ValueError that names the "
                                 "expected shape")


def require_construct(r, fn_name, cls, why):
    """Fail unless the answer cell that defines ``fn_name`` calls a ``cls`` (a name or attribute), directly or
    through a global of that cell. A function defined outside the answer cells fails: it was never graded.

    Docstrings and comments do not count. In-process (no sources), nothing is checked.
    """
    if r.sources is None:
        return
    source = r.sources.get(fn_name)
    if source is None:
        raise AssertionError(f"{fn_name} is not defined in an answer cell: define it in the cell that says "
                             "YOUR CODE HERE")
    try:
        tree = ast.parse(source)
    except SyntaxError:
        raise AssertionError(f"{fn_name}: its answer cell is not valid Python") from None
    if not any(isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == cls
               for node in ast.walk(tree)):
        raise AssertionError(f"{fn_name} does not use {cls}: {why}.")
