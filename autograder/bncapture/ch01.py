"""Probes of chapter 1, *Why normalize?*: the inputs and the calls; the verdicts are the grader's.

scikit-learn is unavailable to these probes (the sandbox hides it for this chapter): ``StandardScaler`` cannot
stand in for ``standardize``.
"""
import numpy as np

from .cases import Case, each, generator, random_matrix

#: (shape, loc) of the data matrices: small, wide-spread means (loc = 100), and a larger one
MATRICES = [((5, 2), 0.0), ((40, 3), 100.0), ((200, 7), 0.0)]


def matrix_cases(seed):
    """Cases (X (N, D) float64,) of the shapes of :data:`MATRICES`."""
    rng = generator(seed)
    return [Case((random_matrix(rng, shape, np.float64, loc=loc),), f"X {shape}, feature means near {loc:g}")
            for shape, loc in MATRICES]


def standardize_cases():
    return matrix_cases(seed=1)


def condition_cases():
    return matrix_cases(seed=11)


def standardize(p):
    """(Z, mean, std) of every case, and X as the call left it."""
    each(p, "case", p.student("standardize"), standardize_cases(), after=True)


def condition_number(p):
    """The condition number of every case."""
    each(p, "case", p.student("condition_number"), condition_cases())
