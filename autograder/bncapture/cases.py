"""Public input builders shared by the probes and, through them, by the verdicts: the same seed gives the
grader's own copy of exactly the inputs that the student's code saw.

Every builder draws from :func:`generator`, which mixes its seed with the grading run's secret :data:`SALT`
(kept in the course directory, sent to the probe with its plan): the code is public, but the inputs of a graded
run are not, so answers cannot be computed ahead for them.
"""
from typing import NamedTuple

import numpy as np


#: the grading run's secret (an int), or None: the builders' own seeds (in-process checks, the tests)
SALT = None


def generator(*seed):
    """A ``numpy.random.Generator`` for a builder's ``seed`` (ints), mixed with :data:`SALT` when there is one."""
    return np.random.default_rng(list(seed) if SALT is None else [SALT, *seed])


class Case(NamedTuple):
    """One input to a graded function: positional args and a label for messages."""

    args: tuple
    label: str


def random_matrix(rng, shape, dtype, loc=0.0, scale=1.0):
    """An (N, D) Gaussian matrix with per-feature means spread around ``loc``."""
    n, d = shape
    means = loc + rng.normal(0.0, 3.0, size=d) * (1.0 if loc == 0 else 0.01 * abs(loc))
    scales = scale * rng.uniform(0.5, 3.0, size=d)
    return (means + scales * rng.standard_normal((n, d))).astype(dtype)


def first(result):
    """``out`` of ``(out, cache)``: what a verdict reads of a forward pass (the cache stays with the student)."""
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError("not an (out, cache) pair")
    return result[0]


def each(p, prefix, fn, cases, keep=None, after=False):
    """Call ``fn`` on every case; records ``prefix0``, ``prefix1``, ..."""
    for index, case in enumerate(cases):
        p.call(f"{prefix}{index}", fn, *case.args, keep=keep, after=after)
