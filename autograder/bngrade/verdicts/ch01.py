"""Hidden tests of chapter 1, *Why normalize?*"""
import numpy as np

from bngrade.judge.compare import Case, Mistake, check_inputs_unchanged, compare, random_matrix


def reference_standardize(x):
    """Per-feature standardization of (N, D) data: (Z, mean, std), each std with ddof=0."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return (x - mean) / std, mean, std


def reference_condition_number(x):
    """Condition number of the least-squares Hessian X^T X / N for (N, D) data."""
    eig = np.linalg.eigvalsh(x.T @ x / x.shape[0])
    return eig[-1] / eig[0]


def _cases(seed=1):
    rng = np.random.default_rng(seed)
    return [Case((random_matrix(rng, shape, np.float64, loc=loc),), f"X {shape}")
            for shape, loc in [((5, 2), 0.0), ((40, 3), 100.0), ((200, 7), 0.0)]]


def check_standardize(student):
    """Hidden test of ``standardize(X) -> (Z, mean, std)``."""
    mistakes = [
        Mistake("the standard deviation uses N-1 (ddof=1); standardize with the population std (ddof=0), "
                "as batch norm does", lambda x: ((x - x.mean(0)) / x.std(0, ddof=1), x.mean(0), x.std(0, ddof=1))),
        Mistake("the statistics are taken over axis 1 (per sample); standardize each feature over the samples "
                "(axis 0)", lambda x: ((x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True),
                                       x.mean(1, keepdims=True), x.std(1, keepdims=True))),
        Mistake("Z is divided by the variance instead of the standard deviation",
                lambda x: ((x - x.mean(0)) / x.var(0), x.mean(0), x.std(0))),
    ]
    cases = _cases()
    compare(student, reference_standardize, cases, "standardize", mistakes)
    check_inputs_unchanged(student, cases, "standardize")


def check_condition_number(student):
    """Hidden test of ``condition_number(X)``."""
    mistakes = [
        Mistake("you returned the condition number of X itself (ratio of singular values); the Hessian "
                "X^T X / N has the ratio of their squares", lambda x: np.linalg.cond(x)),
        Mistake("the ratio is inverted: the condition number is largest / smallest eigenvalue (>= 1)",
                lambda x: 1.0 / reference_condition_number(x)),
    ]
    compare(student, reference_condition_number, _cases(seed=11), "condition_number", mistakes,
            pick=lambda value: np.float64(value), tol=(1e-4, 0.0))
