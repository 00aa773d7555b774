"""Public test functions that chapter 3's probes hand to a student's gradient checker as its ``f``.

Each is a plain function of one array ``z``; some return their argument or a view of it, which a gradient
checker must copy before it perturbs ``x`` again. None of them is part of any exercise's answer.
"""
import numpy as np


class Function:
    """A named test function with array parameters, callable as ``f(z)``."""

    name = ""

    def __init__(self, *params):
        self.params = params

    def __call__(self, z):
        return self.apply(z, *self.params)

    def __repr__(self):
        return f"{self.name}({', '.join(str(np.shape(p)) for p in self.params)})"


class SinTimes(Function):
    """sin(z) * w, elementwise; z and w of one shape."""
    name = "sin_times"

    @staticmethod
    def apply(z, w):
        return np.sin(z) * w


class MatMul(Function):
    """z @ a: z (N, D), a (D, M) -> (N, M)."""
    name = "matmul"

    @staticmethod
    def apply(z, a):
        return z @ a


class Cube(Function):
    """z ** 3, elementwise."""
    name = "cube"

    @staticmethod
    def apply(z):
        return z ** 3


class ColumnSoftmax(Function):
    """softmax over axis 0 of z (N, D), times w (D,): every output depends on its whole column."""
    name = "column_softmax"

    @staticmethod
    def apply(z, w):
        e = np.exp(z - z.max(axis=0))
        return e / e.sum(axis=0) * w


class Identity(Function):
    """z itself (not a copy)."""
    name = "identity"

    @staticmethod
    def apply(z):
        return z


class Transpose(Function):
    """z.T, a view of z."""
    name = "transpose"

    @staticmethod
    def apply(z):
        return z.T
