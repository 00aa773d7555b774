"""Probes of chapter 8, *Beyond batch norm*: layer norm, group norm, merged moments and SyncBN; the inputs and
the calls; the verdicts are the grader's.

Inputs give every sample, channel and group its own mean and scale, so that statistics over the wrong axes are
clearly wrong. The backward passes run on the student's own forward's cache (an opaque value that never leaves
the sandbox). SyncBN runs one training step on several ranks, as threads and as forked processes
(:mod:`bncapture.ranks`, no framework needed), through :func:`sync_step_on_ranks`.
"""
import copy
import functools
from typing import NamedTuple

import numpy as np

from . import ranks
from .cases import Case, each, first, generator
from .probe import part

#: seconds a rank may wait at one all_reduce (the probe's whole run stays well within the grader's limit)
TIMEOUT = {"threads": 10.0, "processes": 15.0}


def scaled(rng, shape, dtype, axis_scales):
    """Gaussian values of ``shape`` whose mean and scale vary along the axes named in ``axis_scales``."""
    means = np.zeros(shape)
    scales = np.ones(shape)
    for axis in axis_scales:
        dims = [1] * len(shape)
        dims[axis] = shape[axis]
        means = means + rng.normal(0.0, 3.0, dims)
        scales = scales * rng.uniform(0.5, 2.0, dims)
    return (means + scales * rng.standard_normal(shape)).astype(dtype)


def _nothing(result):
    """What a verdict reads of a call that must raise: nothing."""
    return None


# --- layer norm -------------------------------------------------------------------------------------------

def ln_cases(seed, with_dout=False):
    """Cases (x (N, D), gamma (D,), beta (D,), eps[, dout (N, D)]) in float64 then float32 (the last is
    float32); (5, 5) has N == D, so that a per-sample gamma broadcasts and can be named; (1, 6) is one sample."""
    rng = generator(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for shape, eps in zip([(5, 5), (8, 12), (1, 6), (16, 3)], (1e-5, 1e-3, 0.1, 1e-5)):
            d = shape[1]
            args = (scaled(rng, shape, dtype, (0,)), rng.uniform(0.5, 2.0, d).astype(dtype),
                    rng.normal(0.0, 1.0, d).astype(dtype), eps)
            if with_dout:
                args += (rng.standard_normal(shape).astype(dtype),)
            cases.append(Case(args, f"x {shape} {np.dtype(dtype).name}, eps={eps}"))
    return cases


def bad_ln_inputs(d=4):
    """{what: args} that ``layernorm_forward`` must refuse with a ValueError."""
    return {
        "a 3-D x": (np.ones((2, 3, d)), np.ones(d), np.zeros(d)),
        "gamma of the wrong length": (np.ones((3, d)), np.ones(d + 1), np.zeros(d)),
        "beta of the wrong length": (np.ones((3, d)), np.ones(d), np.zeros(d - 1)),
    }


# --- group norm -------------------------------------------------------------------------------------------

#: (shape, groups): groups = C is instance norm, groups = 1 layer norm over (C, H, W)
GN_SHAPES = [((2, 6, 4, 5), 3), ((3, 4, 3, 3), 2), ((2, 8, 2, 2), 4), ((2, 3, 4, 4), 3), ((3, 4, 2, 3), 1)]


def gn_cases(seed, with_dout=False):
    """Cases (x (N, C, H, W), gamma (C,), beta (C,), groups, eps[, dout]) in float64 then float32."""
    rng = generator(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for (shape, groups), eps in zip(GN_SHAPES, (1e-5, 1e-3, 0.1, 1e-5, 1e-2)):
            c = shape[1]
            args = (scaled(rng, shape, dtype, (0, 1)), rng.uniform(0.5, 2.0, c).astype(dtype),
                    rng.normal(0.0, 1.0, c).astype(dtype), groups, eps)
            if with_dout:
                args += (rng.standard_normal(shape).astype(dtype),)
            cases.append(Case(args, f"x {shape} {np.dtype(dtype).name}, groups={groups}, eps={eps}"))
    return cases


def indivisible_groups():
    """{what: args} where C % groups != 0; in the last four C * H * W divides by groups, so that
    ``x.reshape(N * groups, -1)`` succeeds silently and only a check of its own refuses them."""
    inputs = {}
    for shape, groups in [((2, 6, 3, 3), 4), ((2, 6, 3, 3), 12), ((2, 6, 2, 2), 4), ((2, 10, 3, 2), 4),
                          ((3, 9, 2, 1), 6), ((1, 6, 4, 4), 12)]:
        c = shape[1]
        what = f"C = {c} channels with groups = {groups}"
        if np.prod(shape[1:]) % groups == 0:
            what += f" (x {shape}: C * H * W divides by {groups}, so a reshape into groups does not fail)"
        inputs[what] = (np.ones(shape), np.ones(c), np.zeros(c), groups)
    return inputs


def bad_gn_inputs():
    """{what: args} that ``groupnorm_forward`` must refuse with a ValueError."""
    x, g, b = np.ones((2, 6, 3, 3)), np.ones(6), np.zeros(6)
    return {**indivisible_groups(),
            "groups = 0": (x, g, b, 0),
            "a 3-D x (N, C, L)": (np.ones((2, 6, 5)), g, b, 3),
            "gamma of the wrong length": (x, np.ones(3), b, 3),
            "beta of the wrong length": (x, g, np.zeros(2), 3)}


# --- merged moments ---------------------------------------------------------------------------------------

def shard_moments_as(shard, dtype):
    """(count, mean (C,), m2 (C,)) of an (n, C) shard, computed in float64 and rounded to ``dtype``."""
    shard = np.asarray(shard, dtype=np.float64)
    if len(shard) == 0:
        return 0, np.zeros(shard.shape[1], dtype), np.zeros(shard.shape[1], dtype)
    mean = shard.mean(0)
    return len(shard), mean.astype(dtype), ((shard - mean) ** 2).sum(0).astype(dtype)


def merge_cases(seed=85):
    """Cases (parts,): uneven shards (some empty, some of one sample) in float64 then float32; the last is
    float32 with a mean offset of 1e4, where sums of x and x^2 lose every digit of the variance."""
    rng = generator(seed)
    cases = []
    layouts = [([7, 5], 3, 0.0), ([4, 0, 9, 1], 2, 5.0), ([1, 1, 1], 4, -3.0), ([30, 2, 11, 6, 20], 5, 1e2),
               ([50, 50, 50], 3, 1e4)]
    for dtype in (np.float64, np.float32):
        for sizes, c, offset in layouts:
            x = offset + rng.uniform(0.5, 2.0, c) * rng.standard_normal((sum(sizes), c)) + rng.normal(0, 1, c)
            shards = np.split(x, np.cumsum(sizes)[:-1])
            parts = [shard_moments_as(s, dtype) for s in shards]
            cases.append(Case((parts,), f"{len(sizes)} shards of sizes {sizes}, {c} channels, "
                                        f"mean offset {offset:g}, {np.dtype(dtype).name}"))
    return cases


def empty_merges():
    """{what: args} that ``merge_moments`` must refuse with a ValueError."""
    return {"only empty shards": ([(0, np.zeros(2), np.zeros(2)), (0, np.zeros(2), np.zeros(2))],)}


# --- SyncBN -----------------------------------------------------------------------------------------------

class SyncCase(NamedTuple):
    """One SyncBN step: args (shards, douts or None, gamma, beta, running_mean, running_var, momentum, eps),
    where shard r (n_r, C) or (n_r, C, H, W) is rank r's x; the backend that runs the ranks; a label."""

    args: tuple
    backend: str
    label: str


def sync_cases(seed, with_dout):
    """Four cases on threads (float64, a 4-D one, four ranks, float32 at a mean offset of 1e2), then three
    processes with a shard of one sample."""
    rng = generator(seed)
    layouts = [([5, 2, 6], (4,), np.float64, 0.1, 1e-5, "threads"),
               ([3, 2], (3, 4, 2), np.float64, 0.3, 1e-3, "threads"),
               ([6, 6, 2, 4], (2,), np.float64, 0.1, 1e-5, "threads"),
               ([9, 7], (3,), np.float32, 0.1, 1e-5, "threads"),
               ([4, 1, 6], (5,), np.float64, 0.1, 1e-5, "processes")]
    cases = []
    for sizes, channel_shape, dtype, momentum, eps, backend in layouts:
        c = channel_shape[0]
        shape = (sum(sizes),) + channel_shape
        x = scaled(rng, shape, np.float64, (1,)) + (1e2 if dtype == np.float32 else 0.0)
        split = np.cumsum(sizes)[:-1]
        dout = rng.standard_normal(shape)
        args = ([s.astype(dtype) for s in np.split(x, split)],
                [d.astype(dtype) for d in np.split(dout, split)] if with_dout else None,
                rng.uniform(0.5, 2.0, c).astype(dtype), rng.normal(0, 1, c).astype(dtype),
                rng.normal(0, 1, c).astype(dtype), rng.uniform(0.5, 2.0, c).astype(dtype), momentum, eps)
        label = (f"{len(sizes)} ranks ({backend}) with shards of {sizes} samples of shape {channel_shape}, "
                 f"{np.dtype(dtype).name}, momentum={momentum}, eps={eps}")
        cases.append(SyncCase(args, backend, label))
    return cases


def sync_step_on_ranks(forward, backward, backend, shards, douts, gamma, beta, running_mean, running_var,
                       momentum, eps):
    """One SyncBN training step on W ranks (rank r gets shard r and its own copies of gamma, beta and the
    running buffers); ``backward`` may be None (forward only).

    Returns:
        {"ranks": [per rank {"out", "running_mean", "running_var"} and, with a backward, {"dx", "dgamma",
        "dbeta"}], "traffic": [per rank {"calls", "values", "bytes"} passed to all_reduce]}.
    """
    def step(x, dout, all_reduce):
        mean, var = np.array(running_mean, copy=True), np.array(running_var, copy=True)
        out, cache = forward(x, np.array(gamma, copy=True), np.array(beta, copy=True), mean, var, all_reduce,
                             momentum, eps)
        result = {"out": out, "running_mean": mean, "running_var": var}
        if backward is not None:
            result["dx"], result["dgamma"], result["dbeta"] = backward(dout, cache, all_reduce)
        return result

    douts = douts if douts is not None else [None] * len(shards)
    results, traffic = ranks.BACKENDS[backend](step, list(zip(shards, douts)), TIMEOUT[backend])
    return {"ranks": results, "traffic": [t.summary() for t in traffic]}


# --- probes -----------------------------------------------------------------------------------------------

def _ranks(found):
    """What a verdict reads of :func:`sync_step_on_ranks`: the ranks' results (the traffic goes apart)."""
    return found["ranks"]


def _forward_then_backward(p, forward, backward, cases):
    """Each case (forward args..., dout): ``forward`` (its out recorded as ``fwd<i>``), then ``backward(dout,
    its cache)`` (recorded as ``case<i>``)."""
    for index, case in enumerate(cases):
        *args, dout = case.args
        result = p.call(f"fwd{index}", forward, *args, keep=first)
        p.call(f"case{index}", backward, dout, part(result, 1))


def _forwards(p, fn, cases, bad):
    """out of every case (inputs watched on the first two), then each bad input (``bad <what>``)."""
    each(p, "case", fn, cases[:2], keep=first, after=True)
    for index, case in enumerate(cases[2:], start=2):
        p.call(f"case{index}", fn, *case.args, keep=first)
    for what, args in bad.items():
        p.call(f"bad {what}", fn, *args, keep=_nothing)


def _sync_steps(p, forward, backward, cases):
    """Each case: one step on its ranks (``case<i>``) and what each rank passed to all_reduce
    (``case<i>.traffic``)."""
    for index, case in enumerate(cases):
        run = functools.partial(sync_step_on_ranks, forward, backward, case.backend)
        found = p.call(f"case{index}", run, *case.args, keep=_ranks)
        if found is not None:
            p.put(f"case{index}.traffic", found["traffic"])


def layernorm_forward(p):
    _forwards(p, p.student("layernorm_forward"), ln_cases(seed=81), bad_ln_inputs())


def layernorm_backward(p):
    _forward_then_backward(p, p.student("layernorm_forward"), p.student("layernorm_backward"),
                           ln_cases(seed=82, with_dout=True))


def groupnorm_forward(p):
    _forwards(p, p.student("groupnorm_forward"), gn_cases(seed=83), {})


def groupnorm_rejects_bad_input(p):
    _forwards(p, p.student("groupnorm_forward"), [], bad_gn_inputs())


def groupnorm_backward(p):
    _forward_then_backward(p, p.student("groupnorm_forward"), p.student("groupnorm_backward"),
                           gn_cases(seed=84, with_dout=True))


def merge_moments(p):
    """Every case, with the parts as the call left them (``case<i>.after``); then the empty merge."""
    fn = p.student("merge_moments")
    for index, case in enumerate(merge_cases()):
        (parts,) = copy.deepcopy(case.args)
        p.call(f"case{index}", functools.partial(fn, parts))
        p.put(f"case{index}.after", parts)
    for what, args in empty_merges().items():
        p.call(f"bad {what}", fn, *args, keep=_nothing)


def syncbn_forward(p):
    _sync_steps(p, p.student("syncbn_forward"), None, sync_cases(seed=86, with_dout=False))


def syncbn_backward(p):
    _sync_steps(p, p.student("syncbn_forward"), p.student("syncbn_backward"), sync_cases(seed=87, with_dout=True))
