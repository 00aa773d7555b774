"""Public test functions and harnesses that the grader can use on a student's code.

The grader names one of these and its parameters as data (``{"fn": name, "args": [...]}``); the sandbox
builds it here. Most are plain functions of one array ``z`` handed to a student's function (a gradient
checker's ``f``); some return their argument or a view of it, which a gradient checker must copy before it
perturbs ``x`` again. :class:`SyncBNRanks` is a harness instead: it runs the student's SyncBN functions on
several ranks (:mod:`bncapture.ranks`). None of them is part of any exercise's answer.
"""
import numpy as np

from . import ranks


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


class SyncBNRanks(Function):
    """One SyncBN training step on W ranks: params (forward, backward or None, backend, timeout).

    Called with (shards, douts or None, gamma, beta, running_mean, running_var, momentum, eps): shard r is
    rank r's x; every rank gets its own copies of gamma, beta and the running buffers. Returns, per rank,
    {"out", "running_mean", "running_var", "traffic"} and, with a backward, {"dx", "dgamma", "dbeta"}.
    """
    name = "syncbn_ranks"

    def __call__(self, shards, douts, gamma, beta, running_mean, running_var, momentum, eps):
        forward, backward, backend, timeout = self.params

        def step(x, dout, all_reduce):
            mean, var = np.array(running_mean, copy=True), np.array(running_var, copy=True)
            out, cache = forward(x, np.array(gamma, copy=True), np.array(beta, copy=True), mean, var,
                                 all_reduce, momentum, eps)
            result = {"out": out, "running_mean": mean, "running_var": var}
            if backward is not None:
                result["dx"], result["dgamma"], result["dbeta"] = backward(dout, cache, all_reduce)
            return result

        douts = douts if douts is not None else [None] * len(shards)
        results, traffic = ranks.BACKENDS[backend](step, list(zip(shards, douts)), timeout)
        for result, t in zip(results, traffic):
            result["traffic"] = t.summary()
        return results


FUNCTIONS = {cls.name: cls for cls in (SinTimes, MatMul, Cube, ColumnSoftmax, Identity, Transpose, SyncBNRanks)}


def build(name, *params):
    """The test function called ``name`` with ``params``."""
    return FUNCTIONS[name](*params)
