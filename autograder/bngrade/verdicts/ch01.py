"""Verdicts of chapter 1, *Why normalize?* (probes: :mod:`bncapture.ch01`).

Each verdict rebuilds the data matrices from the public case builders, computes the reference and the known
mistakes on them, and compares with what the probe recorded. A ban of a library shortcut (``StandardScaler``,
``np.linalg.cond``) is the static scan's business, not a verdict's: a verdict judges the numbers.
"""
import copy

import numpy as np

from bncapture import ch01 as probes

from bngrade.judge.compare import Mistake, close, compare, describe_mismatch, inputs_unchanged, name_mistake


def reference_standardize(x):
    """Per-feature standardization of (N, D) data: (Z (N, D), mean (D,), std (D,)), the std with ddof=0."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return (x - mean) / std, mean, std


def reference_condition_number(x):
    """Condition number of the least-squares Hessian X^T X / N for (N, D) data."""
    eig = np.linalg.eigvalsh(x.T @ x / x.shape[0])
    return eig[-1] / eig[0]


def _singular_value_ratio(x):
    """Largest over smallest singular value of X itself: the condition number of X, not of X^T X / N."""
    s = np.linalg.svd(x, compute_uv=False)
    return s[0] / s[-1]


STANDARDIZE_MISTAKES = [
    Mistake("the standard deviation uses N-1 (ddof=1); standardize with the population std (ddof=0), "
            "as batch norm does", lambda x: ((x - x.mean(0)) / x.std(0, ddof=1), x.mean(0), x.std(0, ddof=1))),
    Mistake("the statistics are taken over axis 1 (per sample); standardize each feature over the samples "
            "(axis 0)", lambda x: ((x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True),
                                   x.mean(1, keepdims=True), x.std(1, keepdims=True))),
    Mistake("Z is divided by the variance instead of the standard deviation",
            lambda x: ((x - x.mean(0)) / x.var(0), x.mean(0), x.std(0))),
]

CONDITION_MISTAKES = [
    Mistake("you returned the condition number of X itself (ratio of singular values); the Hessian "
            "X^T X / N has the ratio of their squares", _singular_value_ratio),
    Mistake("the ratio is inverted: the condition number is largest / smallest eigenvalue (>= 1)",
            lambda x: 1.0 / reference_condition_number(x)),
]


def _with_row_statistics(result):
    """(Z, mean, std) with mean and std as (1, D) rows, as ``keepdims=True`` leaves them."""
    z, mean, std = result
    return z, mean[None, :], std[None, :]


def _standardized(r, key, case, expected):
    """(Z (N, D), mean (D,), std (D,)) as the probe recorded them at ``key``.

    mean and std may come back as (D,) or as (1, D) rows (``keepdims=True``): both apply to new (N, D) data the
    same way. Any other structure fails, with the name of the mistake whose structure it has, if one matches.
    """
    try:
        return r.get(key, expected, "standardize", case.label)
    except AssertionError as exc:
        error = exc
    try:
        z, mean, std = r.get(key, _with_row_statistics(expected), "standardize", case.label)
        return z, mean[0], std[0]
    except AssertionError:
        pass
    for mistake in STANDARDIZE_MISTAKES:  # a result shaped like a mistake's (per-sample statistics)
        wrong = mistake.fn(*copy.deepcopy(case.args))
        try:
            got = r.get(key, wrong, "standardize", case.label)
        except AssertionError:
            continue
        if close(got, wrong):
            raise AssertionError(f"standardize: {mistake.message} (input: {case.label})")
    raise error


def standardize(r):
    """``standardize(X) -> (Z, mean, std)`` on every case; X left as it was."""
    cases = probes.standardize_cases()
    for index, case in enumerate(cases):
        expected = reference_standardize(*copy.deepcopy(case.args))
        got = _standardized(r, f"case{index}", case, expected)
        if close(got, expected):
            continue
        name_mistake(got, case, STANDARDIZE_MISTAKES, "standardize", np.float64)
        raise AssertionError(f"standardize does not match the reference for input {case.label}: "
                             f"{describe_mismatch(got, expected)}")
    inputs_unchanged(r, "case", cases, "standardize")


def condition_number(r):
    """``condition_number(X)``: largest over smallest eigenvalue of X^T X / N, to a relative 1e-4."""
    compare(r, "case", reference_condition_number, probes.condition_cases(), "condition_number", CONDITION_MISTAKES,
            pick=np.float64, tol=(1e-4, 0.0))
