"""Chapter 8's checks, differentially: the solution and correct alternatives written differently pass every
check with no complaint; every seeded mistake fails with its own message; hostile answers gain nothing.

Every student here is source code run in a namespace of its own (as the sandbox runs answer cells), through
``check("ch08.<name>", namespace)``: the probe, the plain-data encoding and the verdict, in this process.
"""
import functools
import sys

import numpy as np
import pytest

from bncapture import ch08 as probes, ranks
from bngrade.verdicts import ch08 as verdicts
from submissions import solution_cells
import differential

LN, GN = ("layernorm_forward", "layernorm_backward"), ("groupnorm_forward", "groupnorm_backward")
SYNC = ("syncbn_forward", "syncbn_backward")
#: check key -> the graded functions it reads
CHECKS = {"layernorm_forward": LN[:1], "layernorm_backward": LN, "groupnorm_forward": GN[:1],
          "groupnorm_rejects_bad_input": GN[:1], "groupnorm_backward": GN, "merge_moments": ("merge_moments",),
          "syncbn_forward": SYNC[:1], "syncbn_backward": SYNC}


def namespace(*sources, **values):
    """A namespace in which ``sources`` ran (the solution's answer cells first), with ``values`` bound."""
    ns = {"np": np, **values}
    for source in (*solution_cells("ch08_beyond_bn").values(), *sources):
        exec(source, ns)
    return ns


passes = functools.partial(differential.passes, "ch08")
fails = functools.partial(differential.fails, "ch08")


def solution_with(cell, *changes):
    """The solution's answer cell ``cell`` with each (old, new) replaced (each old must be there)."""
    source = solution_cells("ch08_beyond_bn")[cell]
    for old, new in changes:
        assert old in source, old
        source = source.replace(old, new)
    return source


@pytest.mark.parametrize("key", sorted(CHECKS))
def test_the_solution_passes(key):
    passes([key], namespace())


# --- correct alternatives ---------------------------------------------------------------------------------

LN_TRANSPOSED = '''
def layernorm_forward(x, gamma, beta, eps=1e-5):
    """Batch norm on x.T: each column of x.T is a sample; gamma and beta as (D, 1) columns; a dict cache."""
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D), got {x.shape}")
    d = x.shape[1]
    if gamma.shape != (d,) or beta.shape != (d,):
        raise ValueError(f"gamma and beta must be (D,) = ({d},)")
    xt = x.T
    mu = xt.mean(axis=0, keepdims=True)
    xmu = xt - mu
    var = (xmu ** 2).mean(axis=0, keepdims=True)
    sqrtvar = np.sqrt(var + eps)
    ivar = 1.0 / sqrtvar
    xhat = xmu * ivar
    gamma_col, beta_col = gamma[:, None], beta[:, None]
    out = (gamma_col * xhat + beta_col).T
    cache = {"x": x, "xhat": xhat, "xmu": xmu, "ivar": ivar, "sqrtvar": sqrtvar, "var": var, "mu": mu,
             "gamma": gamma_col, "beta": beta_col, "eps": eps, "out": out, "mode": "train", "axis": 0, "d": d}
    return out, cache


def layernorm_backward(dout, cache):
    """CS231n's staged batch-norm backward, on the transposed arrays."""
    xhat, xmu, ivar, sqrtvar, var, gamma, eps = (cache[k] for k in ("xhat", "xmu", "ivar", "sqrtvar", "var",
                                                                     "gamma", "eps"))
    d = xhat.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat.T).sum(axis=0)
    dxhat = dout.T * gamma
    divar = (dxhat * xmu).sum(axis=0)
    dxmu1 = dxhat * ivar
    dsqrtvar = -1.0 / sqrtvar ** 2 * divar
    dvar = 0.5 / np.sqrt(var + eps) * dsqrtvar
    dxmu2 = 2 * xmu * np.ones_like(xmu) / d * dvar
    dx1 = dxmu1 + dxmu2
    dmu = -dx1.sum(axis=0)
    return (dx1 + np.ones_like(xmu) / d * dmu).T, dgamma, dbeta
'''

LN_FLOAT64 = '''
def layernorm_forward(x, gamma, beta, eps=1e-5):
    """float64 internals, output in x's dtype; a 7-tuple cache in its own order."""
    x = np.asarray(x)
    if x.ndim != 2 or np.shape(gamma) != (x.shape[1],) or np.shape(beta) != (x.shape[1],):
        raise ValueError("layer norm takes x of shape (N, D) with gamma and beta of shape (D,)")
    x64 = x.astype(np.float64)
    mean = np.mean(x64, axis=1, keepdims=True)
    var = np.var(x64, axis=1, keepdims=True)
    std = np.sqrt(var + eps)
    x_hat = (x64 - mean) / std
    return (gamma * x_hat + beta).astype(x.dtype), (eps, beta, gamma, std, var, mean, x_hat)


def layernorm_backward(dout, cache):
    """Closed form with einsum, divided by D * std last; float64 gradients whatever the input's dtype."""
    eps, beta, gamma, std, var, mean, x_hat = cache
    d = x_hat.shape[1]
    dout64 = dout.astype(np.float64)
    g = dout64 * gamma
    dx = (d * g - g.sum(axis=1, keepdims=True) - x_hat * np.einsum("nd,nd->n", g, x_hat)[:, None]) / (d * std)
    return dx, np.einsum("nd,nd->d", dout64, x_hat), dout64.sum(axis=0)
'''

LN_LOOP = '''
def layernorm_forward(x, gamma, beta, eps=1e-5):
    """A loop over the samples, Welford's one-pass moments per row; a nested-list cache."""
    if np.ndim(x) != 2:
        raise ValueError("x must be 2-D, (N, D)")
    n, d = x.shape
    if np.ndim(gamma) != 1 or np.ndim(beta) != 1 or len(gamma) != d or len(beta) != d:
        raise ValueError(f"gamma and beta must have shape (D,) = ({d},)")
    out = np.empty_like(x)
    rows = []
    for i in range(n):
        mean, m2 = 0.0, 0.0
        for k, v in enumerate(x[i].astype(np.float64), start=1):
            delta = v - mean
            mean += delta / k
            m2 += delta * (v - mean)
        rstd = 1.0 / np.sqrt(m2 / d + eps)
        x_hat = (x[i] - mean) * rstd
        out[i] = gamma * x_hat + beta
        rows.append([x_hat, rstd])
    return out, [rows, gamma]


def layernorm_backward(dout, cache):
    """Row by row, accumulating dgamma and dbeta in place."""
    rows, gamma = cache
    dx = np.empty_like(dout)
    dgamma, dbeta = np.zeros_like(gamma), np.zeros_like(gamma)
    for i, (x_hat, rstd) in enumerate(rows):
        g = dout[i] * gamma
        dx[i] = rstd * (g - g.mean() - x_hat * (g * x_hat).mean())
        dgamma += dout[i] * x_hat
        dbeta += dout[i]
    return dx, dgamma, dbeta
'''

GN_LOOP = '''
def groupnorm_forward(x, gamma, beta, groups, eps=1e-5):
    """A Python loop over the groups; a dict cache."""
    if x.ndim != 4:
        raise ValueError("x must be (N, C, H, W)")
    n, c, h, w = x.shape
    if gamma.shape != (c,) or beta.shape != (c,):
        raise ValueError("gamma and beta must be (C,)")
    if groups <= 0 or c % groups != 0:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    size = c // groups
    x_hat = np.empty_like(x)
    rstds = []
    for g in range(groups):
        block = x[:, g * size:(g + 1) * size]
        mean = block.mean(axis=(1, 2, 3), keepdims=True)
        rstd = 1.0 / np.sqrt(block.var(axis=(1, 2, 3), keepdims=True) + eps)
        x_hat[:, g * size:(g + 1) * size] = (block - mean) * rstd
        rstds.append(rstd)
    out = x_hat * gamma[None, :, None, None] + beta[None, :, None, None]
    return out, {"x_hat": x_hat, "rstd": rstds, "gamma": gamma, "groups": groups, "size": size, "eps": eps,
                 "beta": beta, "x": x, "out": out}


def groupnorm_backward(dout, cache):
    """Group by group; dgamma and dbeta as (1, C, 1, 1), reshaped at the end."""
    x_hat, rstds, gamma, size = cache["x_hat"], cache["rstd"], cache["gamma"], cache["size"]
    dgamma = (dout * x_hat).sum(axis=(0, 2, 3), keepdims=True)
    dbeta = dout.sum(axis=(0, 2, 3), keepdims=True)
    dx = np.empty_like(dout)
    for g, rstd in enumerate(rstds):
        part = slice(g * size, (g + 1) * size)
        dxh = dout[:, part] * gamma[part][None, :, None, None]
        xh = x_hat[:, part]
        dx[:, part] = rstd * (dxh - dxh.mean(axis=(1, 2, 3), keepdims=True)
                              - xh * (dxh * xh).mean(axis=(1, 2, 3), keepdims=True))
    return dx, dgamma.reshape(-1), dbeta.reshape(-1)
'''

GN_5D = '''
def groupnorm_forward(x, gamma, beta, groups, eps=1e-5):
    """A 5-D view (N, G, C/G, H, W) in float64, returned in float64; an 8-tuple cache."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected x of shape (N, C, H, W), got {x.shape}")
    n, c, h, w = x.shape
    if np.shape(gamma) != (c,) or np.shape(beta) != (c,):
        raise ValueError("gamma and beta must have shape (C,)")
    if not isinstance(groups, int) or groups < 1 or c % groups:
        raise ValueError(f"the number of groups ({groups}) must divide the number of channels ({c})")
    view = x.astype(np.float64).reshape(n, groups, c // groups, h, w)
    mean = view.mean(axis=(2, 3, 4), keepdims=True)
    var = ((view - mean) ** 2).mean(axis=(2, 3, 4), keepdims=True)
    std = np.sqrt(var + eps)
    x_hat = ((view - mean) / std).reshape(n, c, h, w)
    out = gamma.reshape(1, c, 1, 1) * x_hat + beta.reshape(1, c, 1, 1)
    return out, (eps, groups, x.shape, std, mean, var, x_hat, gamma)


def groupnorm_backward(dout, cache):
    """einsum for dgamma; the closed form on the 5-D view, divided by m * std last."""
    eps, groups, shape, std, mean, var, x_hat, gamma = cache
    n, c, h, w = shape
    m = (c // groups) * h * w
    g = (dout * gamma.reshape(1, c, 1, 1)).reshape(n, groups, c // groups, h, w)
    xh = x_hat.reshape(g.shape)
    dx = (m * g - g.sum(axis=(2, 3, 4), keepdims=True) - xh * (g * xh).sum(axis=(2, 3, 4), keepdims=True)) / (m * std)
    return dx.reshape(shape), np.einsum("nchw,nchw->c", dout, x_hat), dout.sum(axis=(0, 2, 3))
'''

GN_CHANNELS_LAST = '''
def groupnorm_forward(x, gamma, beta, groups, eps=1e-5):
    """Channels last by transpose(0, 3, 2, 1) (W before H), groups as (N, W*H, G, C/G), and back the same way."""
    if np.ndim(x) != 4:
        raise ValueError("x must be (N, C, H, W)")
    n, c, h, w = x.shape
    if np.shape(gamma) != (c,) or np.shape(beta) != (c,):
        raise ValueError("gamma and beta must be (C,)")
    if groups < 1 or c % groups:
        raise ValueError(f"C = {c} is not a multiple of groups = {groups}")
    last = x.transpose(0, 3, 2, 1).reshape(n, w * h, groups, c // groups)
    mean = last.mean(axis=(1, 3), keepdims=True)
    inv = 1.0 / np.sqrt(last.var(axis=(1, 3), keepdims=True) + eps)
    x_hat = (last - mean) * inv
    out = (x_hat.reshape(n, w, h, c) * gamma + beta).transpose(0, 3, 2, 1)
    return out, [x_hat, inv, gamma, (n, c, h, w)]


def groupnorm_backward(dout, cache):
    x_hat, inv, gamma, (n, c, h, w) = cache
    dlast = dout.transpose(0, 3, 2, 1).reshape(x_hat.shape)
    g = dlast * gamma.reshape(1, 1, *x_hat.shape[2:])
    dx = inv * (g - g.mean(axis=(1, 3), keepdims=True) - x_hat * (g * x_hat).mean(axis=(1, 3), keepdims=True))
    return (dx.reshape(n, w, h, c).transpose(0, 3, 2, 1), (dlast * x_hat).sum(axis=(0, 1)).reshape(c),
            dlast.sum(axis=(0, 1)).reshape(c))
'''

MERGE_FOLD = '''
def merge_moments(parts):
    """Chan's formula as a left fold, one shard at a time."""
    count, mean, m2 = 0, None, None
    for n, m, q in parts:
        if n == 0:
            continue
        if count == 0:
            count, mean, m2 = n, np.array(m, copy=True), np.array(q, copy=True)
            continue
        total = count + n
        delta = m - mean
        mean = mean + delta * n / total
        m2 = m2 + q + delta ** 2 * count * n / total
        count = total
    if count == 0:
        raise ValueError("every shard is empty")
    return count, mean, m2
'''

MERGE_AT_ONCE = '''
def merge_moments(parts):
    """All shards at once: the weighted mean, then m2 plus every shard's spread around it."""
    live = [(n, np.asarray(m), np.asarray(q)) for n, m, q in parts if n]
    if not live:
        raise ValueError("no data: every shard has count 0")
    counts = np.array([n for n, _, _ in live], dtype=float)[:, None]
    means, m2s = np.stack([m for _, m, _ in live]), np.stack([q for _, _, q in live])
    total = int(counts.sum())
    mean = (counts * means).sum(axis=0) / total
    return total, mean, m2s.sum(axis=0) + (counts * (means - mean) ** 2).sum(axis=0)
'''

MERGE_SUMS64 = '''
def merge_moments(parts):
    """Through sums of x and x^2, but in float64 (exact enough for float32 shards)."""
    n = sum(c for c, _, _ in parts)
    if n == 0:
        raise ValueError("merge_moments: every shard is empty")
    sx = sum(c * np.asarray(m, np.float64) for c, m, _ in parts)
    sxx = sum(np.asarray(q, np.float64) + c * np.asarray(m, np.float64) ** 2 for c, m, q in parts)
    mean = sx / n
    return n, mean, sxx - n * mean ** 2
'''

SYNC_ONE_ROUND = '''
def _rows(a):
    return a if a.ndim == 2 else a.transpose(0, 3, 2, 1).reshape(-1, a.shape[1])


def _unrows(rows, shape):
    if len(shape) == 2:
        return rows
    n, c, h, w = shape
    return rows.reshape(n, w, h, c).transpose(0, 3, 2, 1)


def syncbn_forward(x, gamma, beta, running_mean, running_var, all_reduce, momentum=0.1, eps=1e-5):
    """One all_reduce of [n, sum x, sum x^2] in float64; buffers updated with np.copyto; a dict cache."""
    rows = _rows(np.asarray(x))
    r64 = rows.astype(np.float64)
    c = rows.shape[1]
    totals = all_reduce(np.concatenate([[len(rows)], r64.sum(axis=0), (r64 * r64).sum(axis=0)]))
    n = int(totals[0])
    if n < 2:
        raise ValueError("batch norm needs at least 2 values per channel")
    mean = totals[1:c + 1] / n
    var = totals[c + 1:] / n - mean * mean
    inv = 1.0 / np.sqrt(var + eps)
    x_hat = (r64 - mean) * inv
    out = _unrows((gamma * x_hat + beta).astype(rows.dtype), np.shape(x))
    np.copyto(running_mean, (1 - momentum) * running_mean + momentum * mean)
    np.copyto(running_var, (1 - momentum) * running_var + momentum * var * n / (n - 1))
    return out, {"x_hat": x_hat, "inv": inv, "gamma": gamma, "n": n, "shape": np.shape(x), "beta": beta,
                 "eps": eps, "mean": mean}


def syncbn_backward(dout, cache, all_reduce):
    """Two all_reduces (sum dy, then sum dy * x_hat)."""
    dy = _rows(np.asarray(dout)).astype(np.float64)
    x_hat, inv, gamma, n = cache["x_hat"], cache["inv"], cache["gamma"], cache["n"]
    dbeta, dgamma = dy.sum(axis=0), (dy * x_hat).sum(axis=0)
    sum_dy = all_reduce(dbeta)
    sum_dy_xhat = all_reduce(dgamma)
    dx = gamma * inv / n * (n * dy - sum_dy - x_hat * sum_dy_xhat)
    return _unrows(dx.astype(dout.dtype), cache["shape"]), dgamma, dbeta
'''

SYNC_CHAN = '''
def syncbn_forward(x, gamma, beta, running_mean, running_var, all_reduce, momentum=0.1, eps=1e-5):
    """Local moments merged globally: [n_r, n_r * mean_r], then m2_r + n_r * (mean_r - mean)^2; statistics
    kept as (1, C[, 1, 1]); buffers written through [:]; float64 out."""
    axes = (0,) + tuple(range(2, x.ndim))
    keep = (1, -1) + (1,) * (x.ndim - 2)
    n_r = x.size // x.shape[1]
    local_mean = x.mean(axis=axes, dtype=np.float64) if n_r else np.zeros(x.shape[1])
    first = all_reduce(np.concatenate([[n_r], n_r * local_mean]))
    n = first[0]
    if n < 2:
        raise ValueError(f"the global batch has {n} values per channel; batch norm needs 2")
    mean = first[1:] / n
    local_m2 = ((x - local_mean.reshape(keep)) ** 2).sum(axis=axes) if n_r else np.zeros(x.shape[1])
    m2 = all_reduce(local_m2 + n_r * (local_mean - mean) ** 2)
    std = np.sqrt(m2 / n + eps)
    x_hat = (x - mean.reshape(keep)) / std.reshape(keep)
    out = gamma.reshape(keep) * x_hat + beta.reshape(keep)
    running_mean[:] = (1 - momentum) * running_mean + momentum * mean
    running_var[:] = (1 - momentum) * running_var + momentum * m2 / (n - 1)
    return out, (x_hat, std, gamma, n, axes, keep, eps, beta, mean, m2)


def syncbn_backward(dout, cache, all_reduce):
    """Sums as (1, C[, 1, 1]) with keepdims, reshaped at the end."""
    x_hat, std, gamma, n, axes, keep = cache[:6]
    dbeta = dout.sum(axis=axes, keepdims=True)
    dgamma = (dout * x_hat).sum(axis=axes, keepdims=True)
    total = all_reduce(np.concatenate([dbeta.ravel(), dgamma.ravel()]))
    c = dbeta.size
    dx = gamma.reshape(keep) / std.reshape(keep) * (dout - total[:c].reshape(keep) / n
                                                    - x_hat * total[c:].reshape(keep) / n)
    return dx, dgamma.reshape(-1), dbeta.reshape(-1)
'''

ALTERNATIVES = [(LN_TRANSPOSED, LN), (LN_FLOAT64, LN), (LN_LOOP, LN), (GN_LOOP, GN), (GN_5D, GN),
                (GN_CHANNELS_LAST, GN), (MERGE_FOLD, ("merge_moments",)), (MERGE_AT_ONCE, ("merge_moments",)),
                (MERGE_SUMS64, ("merge_moments",)), (SYNC_ONE_ROUND, SYNC), (SYNC_CHAN, SYNC)]


@pytest.mark.parametrize("source,graded", ALTERNATIVES,
                         ids=["ln-transposed", "ln-float64", "ln-loop", "gn-loop", "gn-5d", "gn-channels-last",
                              "merge-fold", "merge-at-once", "merge-sums-float64", "sync-one-round", "sync-chan"])
def test_correct_alternatives_pass_every_check_of_their_functions(source, graded):
    keys = [key for key, reads in CHECKS.items() if set(reads) & set(graded)]
    passes(keys, namespace(source))


# --- every seeded mistake, named -------------------------------------------------------------------------

def forward_student(name, wrong):
    """``name`` returns the mistake's output (in x's dtype) and the solution's cache."""
    return namespace(f"solved = {name}\n"
                     f"def {name}(x, gamma, beta, *rest):\n"
                     "    out, cache = solved(x, gamma, beta, *rest)\n"
                     "    return wrong(x, gamma, beta, *rest).astype(x.dtype), cache\n", wrong=wrong)


def backward_student(names, wrong):
    """The forward keeps its arguments as the cache; the backward returns the mistake's gradients."""
    forward, backward = names
    return namespace(f"solved = {forward}\n"
                     f"def {forward}(x, gamma, beta, *rest):\n"
                     "    return solved(x, gamma, beta, *rest)[0], (x, gamma, beta, *rest)\n"
                     f"def {backward}(dout, cache):\n"
                     "    return tuple(np.asarray(g).astype(dout.dtype) for g in wrong(*cache, dout))\n", wrong=wrong)


FORWARD_MISTAKES = ([("layernorm_forward", m) for m in verdicts._forward_mistakes(verdicts.LN_LAYOUTS)]
                    + [("groupnorm_forward", m) for m in verdicts._forward_mistakes(verdicts.GN_LAYOUTS)])


@pytest.mark.parametrize("key,mistake", FORWARD_MISTAKES, ids=[f"{k}-{m.message[:40]}" for k, m in FORWARD_MISTAKES])
def test_each_forward_mistake_is_named(key, mistake):
    fails(key, forward_student(key, mistake.fn), mistake.message)


BACKWARD_MISTAKES = ([(LN, m) for m in verdicts.LN_BACKWARD_MISTAKES]
                     + [(GN, m) for m in verdicts.GN_BACKWARD_MISTAKES])


@pytest.mark.parametrize("names,mistake", BACKWARD_MISTAKES,
                         ids=[f"{n[1]}-{m.message[:40]}" for n, m in BACKWARD_MISTAKES])
def test_each_backward_mistake_is_named(names, mistake):
    fails(names[1], backward_student(names, mistake.fn), mistake.message)


@pytest.mark.parametrize("mistake", verdicts.MERGE_MISTAKES, ids=lambda m: m.message[:40])
def test_each_merge_mistake_is_named(mistake):
    ns = namespace("def merge_moments(parts):\n"
                   "    if not any(n > 0 for n, _, _ in parts):\n"
                   "        raise ValueError('every shard is empty')\n"
                   "    return wrong(parts)\n", wrong=mistake.fn)
    fails("merge_moments", ns, mistake.message)


MERGE_UNWEIGHTED = '''
def merge_moments(parts):
    parts = [(n, np.asarray(m), np.asarray(q)) for n, m, q in parts if n > 0]
    if not parts:
        raise ValueError("no data")
    mean = sum(m for _, m, _ in parts) / len(parts)
    return sum(n for n, _, _ in parts), mean, M2
'''


@pytest.mark.parametrize("source", [
    MERGE_UNWEIGHTED.replace("M2", "sum(q + n * (m - mean) ** 2 for n, m, q in parts)"),
    MERGE_UNWEIGHTED.replace("M2", "sum(q for _, _, q in parts)"),
    solution_with("merge_moments", ("n = na + nb", "n = 2"), ("qa + qb + delta * delta * (na * nb / n)",
                                                              "qa + qb + delta * delta / 2")),
    solution_with("merge_moments", ("(nb / n)", "0.5")),
    solution_with("merge_moments", ("merged.append((n,", "merged.append((2,")),
], ids=["plain-mean", "plain-mean-no-delta", "counts-as-one", "half-step", "count-is-shards"])
def test_a_merge_that_ignores_the_shards_sizes_is_named_whatever_its_m2(source):
    fails("merge_moments", namespace(source), verdicts.SIZES_IGNORED)


SYNC_MISTAKES = {
    "local": ([("all_reduce(np.concatenate([[x.size", "(np.concatenate([[x.size"),
               ("m2 = all_reduce(", "m2 = (")], "syncbn_forward", "statistics of its own shard"),
    "biased-running": ([("running_var += momentum * m2 / (n - 1)", "running_var += momentum * m2 / n")],
                       "syncbn_forward", "it uses the biased variance"),
    "local-running": ([("running_var += momentum * m2 / (n - 1)",
                        "running_var += momentum * ((x - x.mean(axis=axes, keepdims=True)) ** 2).sum(axis=axes)"
                        " / (x.size // x.shape[1] - 1)")], "syncbn_forward", "it uses this rank's own shard"),
    "not-in-place": ([("running_mean *= 1 - momentum\n    running_mean += momentum * mean",
                       "running_mean = (1 - momentum) * running_mean + momentum * mean")],
                     "syncbn_forward", "running_mean is not updated in place"),
    "keras-momentum": ([("running_mean *= 1 - momentum\n    running_mean += momentum * mean",
                         "running_mean *= momentum\n    running_mean += (1 - momentum) * mean")],
                       "syncbn_forward", "with the Keras/TF convention"),
    "unbiased-normalization": ([("np.sqrt(m2 / n + eps)", "np.sqrt(m2 / (n - 1) + eps)")], "syncbn_forward",
                               "normalized with the unbiased variance"),
    "wrong-eps": ([("np.sqrt(m2 / n + eps)", "np.sqrt(m2 / n + eps + 0.5)")], "syncbn_forward",
                  "differ from one batch norm over the global batch"),
    "gather": ([("    n = int(round(totals[0]))", "    all_reduce(np.zeros(1000))\n    n = int(round(totals[0]))")],
               "syncbn_forward", "never the activations"),
    "skips-a-call": ([("    x = np.asarray(x)\n", "    x = np.asarray(x)\n    if len(x) == 1:\n"
                                                 "        return np.zeros_like(x), None\n")],
                     "syncbn_forward", "the same number of times"),
    "global-dgamma": ([("    return dx, dgamma, dbeta", "    return dx, sums[c:] * n, sums[:c] * n")],
                      "syncbn_backward", "already summed over the ranks"),
    "local-sums": ([("sums = all_reduce(np.concatenate([dbeta, dgamma]).astype(np.float64)) / n",
                     "sums = np.concatenate([dbeta, dgamma]).astype(np.float64) / n")],
                   "syncbn_backward", "own sums of dy"),
    "local-sums-local-count": ([("sums = all_reduce(np.concatenate([dbeta, dgamma]).astype(np.float64)) / n",
                                 "sums = np.concatenate([dbeta, dgamma]).astype(np.float64) / (dout.size // dbeta.size)")],
                               "syncbn_backward", "own sums of dy"),
    "wrong-forward": ([("np.sqrt(m2 / n + eps)", "np.sqrt(m2 / n + eps + 0.5)")], "syncbn_backward",
                      "syncbn_forward is not right yet"),
    "wrong-dx": ([("x_hat * mean_dy_xhat)", "x_hat * mean_dy_xhat * 2)")], "syncbn_backward",
                 "differs from the gradient of one batch norm"),
}


@pytest.mark.parametrize("variant", sorted(SYNC_MISTAKES))
def test_each_syncbn_mistake_is_named(variant):
    changes, key, says = SYNC_MISTAKES[variant]
    fails(key, namespace(solution_with("syncbn", *changes)), says)


@pytest.mark.parametrize("source,says", [
    (solution_with("groupnorm_forward", (" or c % groups", "")), "accepted C = 6 channels with groups = 4 (x (2, 6, 2, 2)"),
    (solution_with("groupnorm_forward", ("raise ValueError(f\"C = {c} channels cannot be split into groups = {groups} "
                                         "equal groups\")", "raise ValueError('bad shape')")),
     "message does not say why ('bad shape')"),
    (solution_with("groupnorm_forward", (" or c % groups", ""),
                   ("    rows = x.reshape(", "    groups = groups if c % groups == 0 else 1\n    rows = x.reshape(")),
     "accepted C = 6 channels with groups = 4; it must raise ValueError"),
], ids=["no-divisibility-check", "message-without-groups", "falls-back-to-one-group"])
def test_group_norm_must_refuse_groups_that_do_not_divide_c_and_say_so(source, says):
    fails("groupnorm_rejects_bad_input", namespace(source), says)


def test_the_cases_hold_shapes_where_a_reshape_into_groups_succeeds_silently():
    silent = [args for what, args in probes.indivisible_groups().items() if "does not fail" in what]
    assert len(silent) >= 3
    for x, _, _, groups in silent:
        n, c = x.shape[:2]
        assert c % groups and x.reshape(n * groups, -1).shape[0] == n * groups


def test_a_blank_notebook_is_told_it_is_not_implemented():
    blank = "\n".join(f"def {name}(*args, **kwargs):\n    raise NotImplementedError()\n"
                      for name in ("layernorm_forward", "layernorm_backward", "groupnorm_forward",
                                   "groupnorm_backward", "merge_moments", "syncbn_forward", "syncbn_backward"))
    ns = namespace(blank)
    for key in sorted(CHECKS):
        fails(key, ns, "not implemented yet")


# --- hostile answers gain nothing -------------------------------------------------------------------------

def test_a_backward_that_zeroes_dout_in_place_does_not_zero_the_expected_gradients():
    ns = namespace("solved = layernorm_backward\n"
                   "def layernorm_backward(dout, cache):\n"
                   "    dout[...] = 0\n"
                   "    return solved(dout, cache)\n")
    fails("layernorm_backward", ns, "layernorm_backward does not match the reference")


def test_a_forward_that_zeroes_gamma_and_beta_in_place_is_named():
    ns = namespace("solved = groupnorm_forward\n"
                   "def groupnorm_forward(x, gamma, beta, groups, eps=1e-5):\n"
                   "    result = solved(x, gamma, beta, groups, eps)\n"
                   "    gamma[...], beta[...] = 0, 0\n"
                   "    return result\n")
    fails("groupnorm_forward", ns, "modifies its input arrays in place")


@pytest.mark.parametrize("shape", ["(0, x.shape[1])", "(1, x.shape[1])", "(1_000_000, 1)"])
def test_a_broadcastable_or_huge_result_fails_on_its_shape(shape):
    ns = namespace("solved = layernorm_forward\n"
                   "def layernorm_forward(x, gamma, beta, eps=1e-5):\n"
                   f"    return np.zeros({shape}, x.dtype), solved(x, gamma, beta, eps)[1]\n")
    message = fails("layernorm_forward", ns, "layernorm_forward returned shape")
    assert "expected (5, 5)" in message


def test_a_merge_whose_mean_broadcasts_fails_on_its_shape():
    ns = namespace("solved = merge_moments\n"
                   "def merge_moments(parts):\n"
                   "    count, mean, m2 = solved(parts)\n"
                   "    return count, mean[None, :], m2\n")
    fails("merge_moments", ns, "shape (1, 3), expected (3,)")


def test_a_merge_that_changes_its_parts_in_place_is_named():
    ns = namespace("solved = merge_moments\n"
                   "def merge_moments(parts):\n"
                   "    result = solved(parts)\n"
                   "    for _, m, q in parts:\n"
                   "        m[...] = 0\n"
                   "    return result\n")
    fails("merge_moments", ns, "modifies its input parts in place")


def test_a_forged_traffic_report_earns_nothing(monkeypatch):
    """The report comes from inside the sandbox: a small or odd one neither rescues wrong numbers nor breaks the
    verdict; a large one (activations sent) is all it can decide."""
    monkeypatch.setattr(ranks.Traffic, "summary", lambda self: {"calls": 0, "values": 0, "bytes": 0})
    wrong = namespace(solution_with("syncbn", ("np.sqrt(m2 / n + eps)", "np.sqrt(m2 / n + eps + 0.5)")))
    fails("syncbn_forward", wrong, "differ from one batch norm over the global batch")
    monkeypatch.setattr(ranks.Traffic, "summary", lambda self: "nothing to see")
    passes(["syncbn_forward", "syncbn_backward"], namespace())


def test_every_check_runs_where_torch_cannot_be_imported(monkeypatch):
    """The sandbox hides torch from the probes (chapter 8 bans its norms and collectives): the graded
    multi-process SyncBN case runs on forked processes and pipes, not torch.distributed."""
    assert {c.backend for c in probes.sync_cases(seed=86, with_dout=False)} == {"threads", "processes"}
    for name in ("torch", "torch.distributed"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import torch  # noqa: F401
    passes(sorted(CHECKS), namespace())
