"""Public input builders shared by the probes and, through them, by the verdicts: the same seed gives the
grader's own copy of exactly the inputs that the student's code saw."""
from typing import NamedTuple

import numpy as np


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
