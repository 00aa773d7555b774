"""The machinery behind every hidden test: run the student's function and the
reference on fresh random inputs, and when they disagree, say which known
mistake the student's output matches.

A hidden test raises ``AssertionError`` with a message written for the
student; nbgrader scores the cell 0 and the feedback shows that message.
"""
import ast
import copy
import inspect
import textwrap
import types
from typing import Callable, NamedTuple

import numpy as np

# Float32 results are compared loosely, float64 ones tightly.
TOLERANCE = {np.dtype(np.float32): (2e-4, 2e-4), np.dtype(np.float64): (1e-7, 1e-8)}


class Mistake(NamedTuple):
    """A known wrong implementation and what to tell a student whose output matches it."""

    message: str
    fn: Callable


class Case(NamedTuple):
    """One input to a graded function: positional args and a label for messages."""

    args: tuple
    label: str


def tolerance(dtype):
    """(rtol, atol) for comparing arrays of ``dtype``."""
    return TOLERANCE.get(np.dtype(dtype), TOLERANCE[np.dtype(np.float64)])


def close(got, expected, dtype=None, tol=None):
    """True when ``got`` matches ``expected`` in shape and value (arrays or tuples of arrays).

    ``tol`` = (rtol, atol) overrides the tolerance of ``dtype``; atol scales with max |expected|.
    """
    if isinstance(expected, (tuple, list)):
        return (
            isinstance(got, (tuple, list))
            and len(got) == len(expected)
            and all(close(g, e, dtype, tol) for g, e in zip(got, expected))
        )
    try:
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return False
    rtol, atol = tol or tolerance(dtype or np.float64)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    return bool(np.allclose(got, expected, rtol=rtol, atol=atol * scale, equal_nan=False))


def uses_reference(fn):
    """True if the student's code reaches the course's reference package ``bnref``.

    A function the grader builds from student functions (e.g. a forward pass
    followed by a backward pass) lists them in its ``graded_parts``; those are checked instead.
    """
    from bngrade.judge.remote import Remote

    if isinstance(fn, Remote):
        return False  # it lives in the sandbox, where bnref does not exist; the static scan flags imports of it
    parts = getattr(fn, "graded_parts", None)
    if parts is not None:
        return any(uses_reference(part) for part in parts)
    names = getattr(fn, "__globals__", None) or getattr(getattr(fn, "__init__", None), "__globals__", {})
    for value in names.values():
        if isinstance(value, (np.ndarray, np.generic)):
            continue  # data, not code (the GPU emulator's device arrays are an ndarray subclass from bnref)
        module = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(module, str) and module.split(".")[0] == "bnref":
            return True
    return False


def check_not_reference(fn, name):
    """Fail when a graded function is the reference solution in disguise."""
    if uses_reference(fn):
        raise AssertionError(f"{name}: your notebook uses the course's reference package `bnref`; "
                             "grading needs your own implementation.")


def require_construct(fn, cls, name, why):
    """Fail unless ``fn`` builds a ``cls`` object (a call to a name ``cls`` in its code) or uses a global one.

    Docstrings and comments do not count. Skipped when Python has no source for ``fn``. For the student's
    function in the sandbox, the source is that of the answer cell that defines it.
    """
    from bngrade.judge.remote import Remote

    if isinstance(fn, Remote):
        source = fn._session.sources.get(fn._name or "")
        if source is None or _calls(ast.parse(source), cls):
            return
        raise AssertionError(f"{name} does not use {cls}: {why}.")
    used = [getattr(fn, "__globals__", {}).get(n) for n in getattr(getattr(fn, "__code__", None), "co_names", ())]
    if any(type(obj).__name__ == cls for obj in used):
        return
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return
    if _calls(tree, cls):
        return
    raise AssertionError(f"{name} does not use {cls}: {why}.")


def _calls(tree, cls):
    """Whether an AST calls a name or attribute ``cls``."""
    return any(isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == cls
               for node in ast.walk(tree))


def _call(fn, args, name, label):
    """Call the student's ``fn`` on deep copies of ``args``; name the input on a crash."""
    try:
        return fn(*copy.deepcopy(args))
    except NotImplementedError:
        raise AssertionError(f"{name} is not implemented yet.") from None
    except Exception as exc:  # a student's bug: report it as a failed test, with the input
        raise AssertionError(f"{name} raised {type(exc).__name__}: {exc} (input: {label})") from None


def _describe_mismatch(got, expected):
    """A short description of how two results differ: shape, or largest error."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} results, got {type(got).__name__}"
        for i, (g, e) in enumerate(zip(got, expected)):
            if not close(g, e):
                return f"result [{i}]: " + _describe_mismatch(g, e)
        return "results differ"
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape:
        return f"shape {got.shape}, expected {expected.shape}"
    err = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    index = tuple(int(i) for i in np.unravel_index(np.argmax(err), err.shape))
    return f"largest absolute error {np.max(err):.3g} at index {index}"


def compare(student, reference, cases, name, mistakes=(), pick=lambda result: result, tol=None):
    """Assert that ``student`` matches ``reference`` on every case, or name the mistake.

    Args:
        student, reference: the functions under test.
        cases: iterable of :class:`Case`.
        name: the function's name, for messages.
        mistakes: :class:`Mistake` s tried, in order, when a case fails; each one's
            ``fn`` returns what ``pick`` selects from a correct result.
        pick: selects what is compared from a result (e.g. ``out`` of ``(out, cache)``).
        tol: optional (rtol, atol) instead of the dtype's tolerance.
    """
    check_not_reference(student, name)
    for case in cases:
        dtype = next((a.dtype for a in case.args if isinstance(a, np.ndarray)), np.float64)
        expected = pick(reference(*copy.deepcopy(case.args)))
        result = _call(student, case.args, name, case.label)
        try:
            got = pick(result)
        except Exception:
            raise AssertionError(f"{name} returned {type(result).__name__}, which is not what the docstring asks for "
                                 f"(input: {case.label})") from None
        if close(got, expected, dtype, tol):
            continue
        for mistake in mistakes:
            try:
                wrong = mistake.fn(*copy.deepcopy(case.args))
            except Exception:  # the mistake does not apply to this input
                continue
            if close(got, wrong, dtype, tol):
                raise AssertionError(f"{name}: {mistake.message} (input: {case.label})")
        raise AssertionError(f"{name} does not match the reference for input {case.label}: "
                             f"{_describe_mismatch(got, expected)}")


def check_inputs_unchanged(student, cases, name):
    """Assert that ``student`` does not modify its array arguments in place."""
    for case in cases:
        args = copy.deepcopy(case.args)
        try:
            student(*args)
        except Exception:
            return  # crashes are reported by the value checks
        for before, after in zip(case.args, args):
            if isinstance(before, np.ndarray) and not np.array_equal(before, after):
                raise AssertionError(f"{name} modifies its input arrays in place; return new arrays instead "
                                     f"(input: {case.label})")


def check_dtype(student, case, name):
    """Assert that float32 input gives float32 output (as torch does)."""
    result = _call(student, case.args, name, case.label)
    out = result[0] if isinstance(result, tuple) else result
    if np.asarray(out).dtype != np.float32:
        raise AssertionError(f"{name} returns {np.asarray(out).dtype} for float32 input; keep the input's dtype "
                             "(float32 in, float32 out), as PyTorch does")


def check_rejects(student, bad, name):
    """Assert that ``student(*args)`` raises ValueError for every ``{what: args}`` of ``bad``."""
    for what, args in bad.items():
        try:
            student(*args)
        except ValueError:
            continue
        except NotImplementedError:
            raise AssertionError(f"{name} is not implemented yet.") from None
        except Exception as exc:
            raise AssertionError(f"{name} raised {type(exc).__name__} for {what}; "
                                 "raise a ValueError that names the expected shape") from None
        raise AssertionError(f"{name} accepted {what}; it must raise ValueError")


def random_matrix(rng, shape, dtype, loc=0.0, scale=1.0):
    """An (N, D) Gaussian matrix with per-feature means spread around ``loc``."""
    n, d = shape
    means = loc + rng.normal(0.0, 3.0, size=d) * (1.0 if loc == 0 else 0.01 * abs(loc))
    scales = scale * rng.uniform(0.5, 3.0, size=d)
    return (means + scales * rng.standard_normal((n, d))).astype(dtype)
