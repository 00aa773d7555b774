"""Chapter 1's hidden checks, differential: the solution, correct alternatives, every seeded mistake and hostile
answers, each run through its probe and its verdict (``check("ch01.<name>", namespace)``), in-process.

The students are written here as a notebook would hold them: answer-cell sources executed into a namespace.
"""
import functools
import sys

import numpy as np
import pytest

import differential
from bncapture import ch01 as probes
from bngrade.judge.check import check
from bngrade.verdicts import ch01
from class_roster import ROSTER
from submissions import solution_cells

ASSIGNMENT = "ch01_why_normalize"
CHECKS = ("standardize", "condition_number")


def namespace_of(*sources):
    """The globals of a notebook whose answer cells are ``sources`` (the setup cell imports numpy as np)."""
    namespace = {"np": np}
    for source in sources:
        exec(source, namespace)
    return namespace


def solution(replace=(), **cells):
    """The solved source's answer cells, each replaced by ``cells[grade_id]`` if given, with ``replace``
    [(old, new)] applied (each ``old`` must occur)."""
    answers = {**solution_cells(ASSIGNMENT), **cells}
    source = "\n".join(answers.values())
    for old, new in replace:
        assert old in source, old
        source = source.replace(old, new)
    return namespace_of(source)


fails = functools.partial(differential.fails, "ch01")


def test_the_solution_passes():
    differential.passes("ch01", CHECKS, solution())


# Correct alternatives, each written differently from the solution

STANDARDIZE_KEEPDIMS = '''
def standardize(X):
    """Statistics kept as (1, D) rows (keepdims=True): they apply to new data the same way."""
    mean = np.mean(X, axis=0, keepdims=True)
    std = np.sqrt(np.mean((X - mean) ** 2, axis=0, keepdims=True))
    return (X - mean) / std, mean, std
'''

STANDARDIZE_SUMS = '''
def standardize(X):
    """Explicit sums, one feature at a time, into a fresh array."""
    n, d = X.shape
    Z, mean, std = np.empty((n, d)), np.empty(d), np.empty(d)
    for j in range(d):
        total = 0.0
        for value in X[:, j]:
            total += value
        mean[j] = total / n
        squares = 0.0
        for value in X[:, j]:
            squares += (value - mean[j]) ** 2
        std[j] = (squares / n) ** 0.5
        Z[:, j] = (X[:, j] - mean[j]) / std[j]
    return Z, mean, std
'''

STANDARDIZE_IN_PLACE_COPY = '''
def standardize(X):
    """Welford's one-pass statistics, then the copy of X standardized in place."""
    mean, m2 = np.zeros(X.shape[1]), np.zeros(X.shape[1])
    for k, row in enumerate(X, start=1):
        delta = row - mean
        mean += delta / k
        m2 += delta * (row - mean)
    std = np.sqrt(m2 / len(X))
    Z = X.copy()
    Z -= mean
    Z /= std
    return Z, mean, std
'''

CONDITION_SINGULAR_VALUES = '''
def condition_number(X):
    """The squared ratio of X's singular values (X^T X / N has their squares over N)."""
    s = np.linalg.svd(X, compute_uv=False)
    return (s[0] / s[-1]) ** 2
'''

CONDITION_EIGVALS = '''
def condition_number(X):
    """General eigenvalues of X^T X (the 1/N cancels in the ratio), returned as a 0-d array."""
    eigenvalues = np.sort(np.linalg.eigvals(X.T @ X).real)
    return np.array(eigenvalues[-1] / eigenvalues[0])
'''

CONDITION_EINSUM = '''
def condition_number(X):
    """The Hessian by einsum, its eigenvalues by eigh, a NumPy scalar out."""
    hessian = np.einsum("ni,nj->ij", X, X) / len(X)
    eigenvalues = np.linalg.eigh(hessian)[0]
    return eigenvalues.max() / eigenvalues.min()
'''

ALTERNATIVES = {"standardize": [STANDARDIZE_KEEPDIMS, STANDARDIZE_SUMS, STANDARDIZE_IN_PLACE_COPY],
                "condition_number": [CONDITION_SINGULAR_VALUES, CONDITION_EIGVALS, CONDITION_EINSUM]}


@pytest.mark.parametrize("name,source", [(n, s) for n, sources in ALTERNATIVES.items() for s in sources],
                         ids=lambda v: v.split('"""')[1][:40] if "def " in v else v)
def test_a_correct_alternative_passes(name, source):
    check(f"ch01.{name}", solution(**{name: source}))


# Every seeded mistake of the verdicts, answered by a student: named by its own message

MISTAKES = ([("standardize", m) for m in ch01.STANDARDIZE_MISTAKES]
            + [("condition_number", m) for m in ch01.CONDITION_MISTAKES])


@pytest.mark.parametrize("name,mistake", MISTAKES, ids=lambda v: v if isinstance(v, str) else v.message[:40])
def test_each_mistake_is_named(name, mistake):
    says = fails(name, {name: mistake.fn}, f"{name}: {mistake.message}")
    assert "(input: X (" in says


def test_the_keepdims_mistake_is_named_by_its_shape_too():
    """Statistics over axis 1 come back as (N, 1): not a layout of the right statistics, the mistake is named."""
    source = STANDARDIZE_KEEPDIMS.replace("axis=0", "axis=1")
    fails("standardize", solution(standardize=source), "the statistics are taken over axis 1")


# Hostile or broken answers: no points, and a message that says why

HOSTILE = {
    "modifies X in place": ("standardize", '''
def standardize(X):
    mean, std = X.mean(axis=0), X.std(axis=0)
    X -= mean
    X /= std
    return X, mean, std
''', "modifies its input arrays in place"),
    "zeroes X after a correct answer": ("standardize", '''
def standardize(X):
    mean, std = X.mean(axis=0), X.std(axis=0)
    Z = (X - mean) / std
    X[...] = 0.0
    return Z, mean, std
''', "modifies its input arrays in place"),
    "statistics as (D, 1) columns": ("standardize", '''
def standardize(X):
    mean, std = X.mean(axis=0)[:, None], X.std(axis=0)[:, None]
    return (X - mean.T) / std.T, mean, std
''', "expected (2,)"),
    "statistics of shape (0, D)": ("standardize", '''
def standardize(X):
    return (X - X.mean(0)) / X.std(0), np.zeros((0, X.shape[1])), np.zeros((0, X.shape[1]))
''', "shape (0, 2), expected (2,)"),
    "a (1, D) Z": ("standardize", '''
def standardize(X):
    return ((X - X.mean(0)) / X.std(0))[:1], X.mean(0), X.std(0)
''', "shape (1, 2), expected (5, 2)"),
    "two results": ("standardize", '''
def standardize(X):
    return (X - X.mean(0)) / X.std(0), X.mean(0)
''', "a tuple of 2 items, expected a tuple of 3 results"),
    "a condition number of shape (1,)": ("condition_number", '''
def condition_number(X):
    eigenvalues = np.linalg.eigvalsh(X.T @ X / len(X))
    return eigenvalues[-1:] / eigenvalues[:1]
''', "shape (1,), expected ()"),
    "a huge array": ("condition_number", '''
def condition_number(X):
    return np.ones((8_000_000, 1, 1))
''', "expected ()"),
    "unfinished": ("condition_number", '''
def condition_number(X):
    raise NotImplementedError()
''', "condition_number is not implemented yet"),
}


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_a_hostile_or_broken_answer_gets_nothing(what):
    name, source, says = HOSTILE[what]
    fails(name, solution(**{name: source}), says)


def test_a_missing_function_is_named():
    fails("standardize", {"np": np}, "standardize is not defined in your answer cells")


def test_the_reference_package_is_refused():
    import bnref

    fails("condition_number", {"condition_number": bnref.batchnorm_forward}, "reference package")


def test_probes_and_verdicts_need_no_sklearn_and_a_standard_scaler_gets_nothing(monkeypatch):
    """As in the sandbox, where scikit-learn cannot be imported: the solution passes; StandardScaler raises."""
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.preprocessing", None)
    test_the_solution_passes()
    scaler = '''
def standardize(X):
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(X)
    return scaler.transform(X), scaler.mean_, scaler.scale_
'''
    fails("standardize", solution(standardize=scaler), "standardize raised ModuleNotFoundError")


def test_the_cases_cover_what_the_mistakes_need():
    """Each data matrix has linearly independent columns, and the loc = 100 one a large condition number."""
    kappas = [ch01.reference_condition_number(*case.args) for case in probes.condition_cases()]
    assert all(np.isfinite(kappas)) and min(kappas) > 1 and max(kappas) > 1e3, kappas


# The seeded class of the grading tests, judged in-process

@pytest.mark.parametrize("student", [s for s, spec in ROSTER[ASSIGNMENT].items() if spec is not None])
def test_the_roster_loses_exactly_its_cells(student):
    spec = ROSTER[ASSIGNMENT][student]
    edits = [e for cell_edits in spec.get("replace", {}).values() for e in cell_edits]
    namespace = solution(edits, **spec.get("override", {}))
    lost, messages = differential.lost_cells(ASSIGNMENT, namespace)
    assert lost == spec.get("lose", set()), messages
    if "says" in spec:
        assert any(spec["says"] in m for m in messages), messages
