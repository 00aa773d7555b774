"""Cache-blocked, multithreaded NumPy primitives behind the reference layers.

Each helper streams an (N, D) array in row blocks of about ``BLOCK_BYTES``
so that temporaries stay in the CPU cache: a two-pass variance then costs
two reads of ``x`` instead of a read, a write and two more reads of a
full-size ``x - mean`` temporary. NumPy releases the GIL inside ufuncs, so
the row range is split across ``THREADS`` worker threads.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BLOCK_BYTES = 1 << 20
THREADS = max(1, min(8, len(os.sched_getaffinity(0))))
_POOL = ThreadPoolExecutor(THREADS) if THREADS > 1 else None


def _new_pool_after_fork():
    """A forked child (a gloo rank) inherits the pool but not its threads: give it threads of its own."""
    global _POOL
    _POOL = ThreadPoolExecutor(THREADS) if THREADS > 1 else None


os.register_at_fork(after_in_child=_new_pool_after_fork)


def _map_row_blocks(fn, n_rows, row_bytes):
    """Call ``fn(rows)`` on row slices covering ``range(n_rows)``; list of results.

    The rows are split into one contiguous part per thread, and each thread
    walks its part in slices of about ``BLOCK_BYTES``: one task per thread
    keeps the pool's overhead out of the loop. Small arrays stay on the
    caller's thread.
    """
    step = max(1, BLOCK_BYTES // max(1, row_bytes))

    def walk(start, stop):
        return [fn(slice(s, min(stop, s + step))) for s in range(start, stop, step)]

    if _POOL is None or n_rows <= step:
        return walk(0, n_rows)
    bounds = np.linspace(0, n_rows, THREADS + 1).astype(int)
    parts = _POOL.map(walk, bounds[:-1], bounds[1:])
    return [result for part in parts for result in part]


def column_sum(x):
    """Sum over rows of an (N, D) array: (D,), through BLAS gemv."""
    return np.ones(x.shape[0], dtype=x.dtype) @ x


def batch_moments(x):
    """Per-feature mean and biased variance of an (N, D) array, in two passes.

    Returns:
        mean, var: (D,) in the dtype of ``x`` (float64 for integer input).
    """
    x = np.ascontiguousarray(x, dtype=np.result_type(x.dtype, np.float16))
    n, d = x.shape
    mean = column_sum(x) / n

    def squared_deviations(rows):
        dev = np.subtract(x[rows], mean)
        return np.einsum("ij,ij->j", dev, dev)

    sq = _map_row_blocks(squared_deviations, n, d * x.itemsize)
    return mean, np.sum(sq, axis=0) / n


def scale_shift(x, a, b):
    """Per-feature affine map ``x * a + b`` of an (N, D) array, one pass.

    Args:
        x: (N, D); a, b: (D,).

    Returns:
        (N, D) array in the common dtype of the inputs.
    """
    out = np.empty(x.shape, dtype=np.result_type(x, a, b))

    def affine(rows):
        np.multiply(x[rows], a, out=out[rows])
        out[rows] += b

    _map_row_blocks(affine, x.shape[0], x.shape[1] * out.itemsize)
    return out


def centered_dot(x, mean, dy):
    """Per-feature sum of ``dy * (x - mean)`` for (N, D) arrays: (D,), without a full temporary."""
    n, d = x.shape

    def partial(rows):
        return np.einsum("ij,ij->j", dy[rows], np.subtract(x[rows], mean))

    return np.sum(_map_row_blocks(partial, n, d * x.itemsize), axis=0)


def two_term_affine(u, a, v, b, c):
    """Per-feature ``u * a + v * b + c`` of two (N, D) arrays, one pass; a, b, c are (D,)."""
    out = np.empty(u.shape, dtype=np.result_type(u, v, a, b, c))

    def combine(rows):
        block = out[rows]
        np.multiply(u[rows], a, out=block)
        block += np.multiply(v[rows], b)
        block += c

    _map_row_blocks(combine, u.shape[0], u.shape[1] * out.itemsize)
    return out
