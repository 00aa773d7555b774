"""Hidden tests of chapter 8, *Beyond batch norm*: layer norm, group norm, merged moments and SyncBN.

Inputs give every sample, channel and group its own mean and scale, so that statistics over the wrong axes
are clearly wrong. The known mistakes are recomputed (with torch autograd where a wrong forward pass has a
wrong gradient) and named when the student's result matches one. SyncBN runs on simulated ranks (threads)
and on real gloo processes, through the public harness :class:`bncapture.functions.SyncBNRanks`.
"""
import functools

import numpy as np

import bnref
from bncapture.functions import SyncBNRanks

from bngrade.judge.compare import (Case, Mistake, check_dtype, check_inputs_unchanged, check_not_reference, check_rejects, close,
                      compare, tolerance)
from bngrade.judge.remote import in_sandbox

TIMEOUT = {"threads": 20.0, "gloo": 40.0}


def _scaled(rng, shape, dtype, axis_scales):
    """Gaussian values whose mean and scale vary along the axes named in ``axis_scales``."""
    means = np.zeros(shape)
    scales = np.ones(shape)
    for axis in axis_scales:
        dims = [1] * len(shape)
        dims[axis] = shape[axis]
        means = means + rng.normal(0.0, 3.0, dims)
        scales = scales * rng.uniform(0.5, 2.0, dims)
    return (means + scales * rng.standard_normal(shape)).astype(dtype)


def _torch(*arrays, grad=False):
    import torch

    return [torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad) for a in arrays]


def _normalize(x, dims, eps, correction=0, eps_outside=False):
    """torch: x standardized with statistics over ``dims``."""
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, correction=correction)
    return (x - mean) / (var.sqrt() + eps if eps_outside else (var + eps).sqrt())


def _wrong(fn, with_dout):
    """A Mistake function from a torch forward ``fn(x, gamma, beta, *rest)``: its output, or its gradients."""
    def forward(x, gamma, beta, *rest):
        return fn(*_torch(x, gamma, beta), *rest).detach().numpy()

    def backward(x, gamma, beta, *rest):
        import torch

        *rest, dout = rest
        xt, gt, bt = _torch(x, gamma, beta, grad=True)
        fn(xt, gt, bt, *rest).backward(torch.from_numpy(np.asarray(dout, dtype=np.float64)))
        return xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()
    return backward if with_dout else forward


def _forward_then_backward(forward, backward, name, *args):
    """(dx, dgamma, dbeta) of the backward pass fed with the cache of the forward pass."""
    *fargs, dout = args
    try:
        _, cache = forward(*fargs)
    except NotImplementedError:
        raise RuntimeError(f"{name}, which the backward test calls first, is not implemented yet") from None
    return backward(dout, cache)


def _backward_checker(forward_name, backward_name, cases, mistakes):
    """A hidden test of ``backward_name(dout, cache)``, fed by the student's ``forward_name``."""
    def check(forward, backward):
        check_not_reference(forward, forward_name)
        check_not_reference(backward, backward_name)
        student = functools.partial(_forward_then_backward, forward, backward, forward_name)
        reference = functools.partial(_forward_then_backward, getattr(bnref, forward_name),
                                      getattr(bnref, backward_name), forward_name)
        all_cases = cases()
        compare(student, reference, all_cases, backward_name, mistakes)
        check_dtype(student, all_cases[-1], backward_name)
    return check


# --- layer norm -----------------------------------------------------------------------------------------

def _ln(x, gamma, beta, eps, dims=(1,), correction=0, eps_outside=False, per_sample=False):
    shape = (-1, 1) if per_sample else (1, -1)
    return gamma.view(shape) * _normalize(x, dims, eps, correction, eps_outside) + beta.view(shape)


LN_LAYOUTS = [
    ("the statistics are taken over the batch axis (one mean per feature, as batch norm does); layer norm "
     "normalizes each sample over its own D features", lambda x, g, b, eps: _ln(x, g, b, eps, dims=(0,))),
    ("your variance divides by D - 1; layer norm uses the biased variance (divide by D), as torch does",
     lambda x, g, b, eps: _ln(x, g, b, eps, correction=1)),
    ("eps is added outside the square root: the denominator is sqrt(var + eps), not sqrt(var) + eps",
     lambda x, g, b, eps: _ln(x, g, b, eps, eps_outside=True)),
    ("gamma and beta are applied per sample (along N); they hold one scale and one shift per feature, "
     "shape (D,), broadcast over the batch", lambda x, g, b, eps: _ln(x, g, b, eps, per_sample=True)),
    ("the statistics are taken over the whole array; layer norm keeps one mean and variance per sample",
     lambda x, g, b, eps: _ln(x, g, b, eps, dims=(0, 1))),
]


def _ln_cases(seed, with_dout=False):
    rng = np.random.default_rng(seed)
    cases = []
    # (5, 5): N == D, so that a per-sample gamma broadcasts and can be named
    for dtype in (np.float64, np.float32):
        for shape, eps in zip([(5, 5), (8, 12), (1, 6), (16, 3)], (1e-5, 1e-3, 0.1, 1e-5)):
            d = shape[1]
            args = (_scaled(rng, shape, dtype, (0,)), rng.uniform(0.5, 2.0, d).astype(dtype),
                    rng.normal(0.0, 1.0, d).astype(dtype), eps)
            if with_dout:
                args += (rng.standard_normal(shape).astype(dtype),)
            cases.append(Case(args, f"x {shape} {np.dtype(dtype).name}, eps={eps}"))
    return cases


def _rows_dx(rows, g, eps, mean_path=True, var_path=True):
    """dx of a per-row normalization of ``rows`` (M, K) for dL/dx_hat = ``g``, with a path possibly left out.

    Returns (dx (M, K), x_hat (M, K)).
    """
    centered = rows - rows.mean(1, keepdims=True)
    rstd = 1.0 / np.sqrt((centered ** 2).mean(1, keepdims=True) + eps)
    x_hat = centered * rstd
    dx = g - (g.mean(1, keepdims=True) if mean_path else 0) - (
        x_hat * (g * x_hat).mean(1, keepdims=True) if var_path else 0)
    return rstd * dx, x_hat


def _ln_partial_backward(x, gamma, beta, eps, dout, **paths):
    """LN gradients with the path through the mean or the variance left out: (dx, dgamma, dbeta)."""
    x, gamma, dout = (np.asarray(a, dtype=np.float64) for a in (x, gamma, dout))
    dx, x_hat = _rows_dx(x, dout * gamma, eps, **paths)
    return dx, (dout * x_hat).sum(0), dout.sum(0)


def _forward_check(name, cases, layouts, student):
    """Compare a forward pass with bnref's on ``cases``, naming ``layouts``; then inputs and dtype."""
    mistakes = [Mistake(message, _wrong(fn, False)) for message, fn in layouts]
    compare(student, getattr(bnref, name), cases, name, mistakes, pick=lambda result: result[0])
    check_inputs_unchanged(student, cases[:2], name)
    check_dtype(student, cases[-1], name)


def check_layernorm_forward(student):
    """Hidden test of ``layernorm_forward(x, gamma, beta, eps) -> (out, cache)``."""
    _forward_check("layernorm_forward", _ln_cases(seed=81), LN_LAYOUTS, student)
    d = 4
    check_rejects(student, {
        "a 3-D x": (np.ones((2, 3, d)), np.ones(d), np.zeros(d)),
        "gamma of the wrong length": (np.ones((3, d)), np.ones(d + 1), np.zeros(d)),
        "beta of the wrong length": (np.ones((3, d)), np.ones(d), np.zeros(d - 1)),
    }, "layernorm_forward")


check_layernorm_backward = _backward_checker(
    "layernorm_forward", "layernorm_backward",
    lambda: _ln_cases(seed=82, with_dout=True),
    [Mistake(message, _wrong(fn, True)) for message, fn in LN_LAYOUTS] + [
        Mistake("dx is missing the path through the mean: subtract the per-sample mean of dout * gamma",
                functools.partial(_ln_partial_backward, mean_path=False)),
        Mistake("dx is missing the path through the variance: subtract x_hat times the per-sample mean of "
                "dout * gamma * x_hat", functools.partial(_ln_partial_backward, var_path=False)),
    ])


# --- group norm -----------------------------------------------------------------------------------------

def _gn(x, gamma, beta, groups, eps, interleaved=False, dims=None, correction=0, eps_outside=False):
    n, c, h, w = x.shape
    if dims is not None:
        normed = _normalize(x, dims, eps, correction, eps_outside)
    elif interleaved:  # channel k in group k % groups
        grouped = x.reshape(n, c // groups, groups, h * w)
        normed = _normalize(grouped, (1, 3), eps, correction, eps_outside).reshape(x.shape)
    else:
        grouped = x.reshape(n, groups, -1)
        normed = _normalize(grouped, (2,), eps, correction, eps_outside).reshape(x.shape)
    return gamma.view(1, -1, 1, 1) * normed + beta.view(1, -1, 1, 1)


GN_LAYOUTS = [
    ("the groups are not consecutive channels: group g holds channels g*C/G ... (g+1)*C/G - 1, which is "
     "x.reshape(N, G, C // G, H, W), not channels g, g + G, g + 2G, ...",
     lambda x, g, b, groups, eps: _gn(x, g, b, groups, eps, interleaved=True)),
    ("the statistics are per channel over (H, W), ignoring the groups (that is instance norm, groups = C)",
     lambda x, g, b, groups, eps: _gn(x, g, b, groups, eps, dims=(2, 3))),
    ("the statistics are over all of (C, H, W), ignoring the groups (that is layer norm, groups = 1)",
     lambda x, g, b, groups, eps: _gn(x, g, b, groups, eps, dims=(1, 2, 3))),
    ("the statistics are per channel over (N, H, W) (that is batch norm); group norm never looks across "
     "the batch", lambda x, g, b, groups, eps: _gn(x, g, b, groups, eps, dims=(0, 2, 3))),
    ("your variance divides by (C/G)*H*W - 1; group norm uses the biased variance, as torch does",
     lambda x, g, b, groups, eps: _gn(x, g, b, groups, eps, correction=1)),
    ("eps is added outside the square root: the denominator is sqrt(var + eps), not sqrt(var) + eps",
     lambda x, g, b, groups, eps: _gn(x, g, b, groups, eps, eps_outside=True)),
]

# (shape, groups): groups = C is instance norm, groups = 1 layer norm over (C, H, W)
GN_SHAPES = [((2, 6, 4, 5), 3), ((3, 4, 3, 3), 2), ((2, 8, 2, 2), 4), ((2, 3, 4, 4), 3), ((3, 4, 2, 3), 1)]


def _gn_cases(seed, with_dout=False):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for (shape, groups), eps in zip(GN_SHAPES, (1e-5, 1e-3, 0.1, 1e-5, 1e-2)):
            c = shape[1]
            args = (_scaled(rng, shape, dtype, (0, 1)), rng.uniform(0.5, 2.0, c).astype(dtype),
                    rng.normal(0.0, 1.0, c).astype(dtype), groups, eps)
            if with_dout:
                args += (rng.standard_normal(shape).astype(dtype),)
            cases.append(Case(args, f"x {shape} {np.dtype(dtype).name}, groups={groups}, eps={eps}"))
    return cases


def _gn_partial_backward(x, gamma, beta, groups, eps, dout, **paths):
    """GN gradients with the path through the group mean or variance left out."""
    x, gamma, dout = (np.asarray(a, dtype=np.float64) for a in (x, gamma, dout))
    n, c = x.shape[:2]
    g = (dout * gamma.reshape(1, c, 1, 1)).reshape(n * groups, -1)
    dx, x_hat = _rows_dx(x.reshape(n * groups, -1), g, eps, **paths)
    x_hat = x_hat.reshape(x.shape)
    return dx.reshape(x.shape), (dout * x_hat).sum((0, 2, 3)), dout.sum((0, 2, 3))


def check_groupnorm_forward(student):
    """Hidden test of ``groupnorm_forward(x, gamma, beta, groups, eps) -> (out, cache)``."""
    _forward_check("groupnorm_forward", _gn_cases(seed=83), GN_LAYOUTS, student)


def check_groupnorm_rejects_bad_input(student):
    """Hidden test: C not divisible by groups, a non-4-D x, or gamma/beta not (C,) raise ValueError."""
    x, g, b = np.ones((2, 6, 3, 3)), np.ones(6), np.zeros(6)
    check_rejects(student, {
        "C = 6 channels with groups = 4": (x, g, b, 4),
        "C = 6 channels with groups = 12": (x, g, b, 12),
        "groups = 0": (x, g, b, 0),
        "a 3-D x (N, C, L)": (np.ones((2, 6, 5)), g, b, 3),
        "gamma of the wrong length": (x, np.ones(3), b, 3),
        "beta of the wrong length": (x, g, np.zeros(2), 3),
    }, "groupnorm_forward")


check_groupnorm_backward = _backward_checker(
    "groupnorm_forward", "groupnorm_backward",
    lambda: _gn_cases(seed=84, with_dout=True),
    [Mistake(message, _wrong(fn, True)) for message, fn in GN_LAYOUTS] + [
        Mistake("dx is missing the path through the group mean: subtract the mean of dout * gamma over each "
                "(sample, group)", functools.partial(_gn_partial_backward, mean_path=False)),
        Mistake("dx is missing the path through the group variance: subtract x_hat times the mean of "
                "dout * gamma * x_hat over each (sample, group)",
                functools.partial(_gn_partial_backward, var_path=False)),
    ])


# --- merged moments -------------------------------------------------------------------------------------

def _moments(shard, dtype):
    """(count, mean (C,), m2 (C,)) of an (n, C) shard, computed in float64 and rounded to ``dtype``."""
    shard = np.asarray(shard, dtype=np.float64)
    if len(shard) == 0:
        return 0, np.zeros(shard.shape[1], dtype), np.zeros(shard.shape[1], dtype)
    mean = shard.mean(0)
    return len(shard), mean.astype(dtype), ((shard - mean) ** 2).sum(0).astype(dtype)


def _merge_cases(seed=85):
    rng = np.random.default_rng(seed)
    cases = []
    layouts = [([7, 5], 3, 0.0), ([4, 0, 9, 1], 2, 5.0), ([1, 1, 1], 4, -3.0), ([30, 2, 11, 6, 20], 5, 1e2),
               ([50, 50, 50], 3, 1e4)]
    for dtype in (np.float64, np.float32):
        for sizes, c, offset in layouts:
            x = offset + rng.uniform(0.5, 2.0, c) * rng.standard_normal((sum(sizes), c)) + rng.normal(0, 1, c)
            shards = np.split(x, np.cumsum(sizes)[:-1])
            parts = [_moments(s, dtype) for s in shards]
            cases.append(Case((parts,), f"{len(sizes)} shards of sizes {sizes}, {c} channels, "
                                        f"mean offset {offset:g}, {np.dtype(dtype).name}"))
    return cases


def _merge_reference(parts):
    """The exact merge, in float64 and rounded to the parts' dtype."""
    dtype = parts[0][1].dtype
    count, mean, m2 = bnref.merge_moments([(n, np.asarray(m, np.float64), np.asarray(q, np.float64))
                                           for n, m, q in parts])
    return count, mean.astype(dtype), m2.astype(dtype)


def _merge_with(parts, how):
    """Merges that go wrong in known ways."""
    parts = [(n, m, q) for n, m, q in parts if n > 0]
    count = sum(n for n, _, _ in parts)
    if how == "sums":  # through sum(x) and sum(x^2), in the parts' precision
        sx = sum(n * m for n, m, _ in parts)
        sxx = sum(q + n * m * m for n, m, q in parts)
        mean = sx / count
        return count, mean, sxx - count * mean * mean
    mean = sum(n * m for n, m, _ in parts) / count
    if how == "unweighted":
        mean = sum(m for _, m, _ in parts) / len(parts)
        return count, mean, _merge_reference(parts)[2]
    if how == "no_delta":
        return count, mean, sum(q for _, _, q in parts)
    raise ValueError(how)


MERGE_MISTAKES = [
    Mistake("the shards' means are averaged without weighting them by their counts: the mean of the whole is "
            "sum(count * mean) / sum(count)", lambda parts: _merge_with(parts, "unweighted")),
    Mistake("m2 is the sum of the shards' m2 only: add delta^2 * n_a * n_b / n for the spread BETWEEN the "
            "shards' means (Chan's formula)", lambda parts: _merge_with(parts, "no_delta")),
    Mistake("the merge goes through sum(x) and sum(x^2) (E[x^2] - E[x]^2): at a mean offset of 1e4 in "
            "float32 that cancels every digit of the variance; merge the centered m2 with Chan's formula",
            lambda parts: _merge_with(parts, "sums")),
]


def check_merge_moments(student):
    """Hidden test of ``merge_moments(parts) -> (count, mean, m2)``."""
    cases = _merge_cases()
    compare(student, _merge_reference, cases, "merge_moments", MERGE_MISTAKES,
            tol=(2e-4, 1e-6))
    check_inputs_unchanged(student, cases[:2], "merge_moments")
    check_rejects(student, {"only empty shards": ([(0, np.zeros(2), np.zeros(2)), (0, np.zeros(2), np.zeros(2))],)},
                  "merge_moments")


# --- SyncBN ---------------------------------------------------------------------------------------------

def _sync_cases(seed, with_dout):
    """(shards, douts, gamma, beta, running_mean, running_var, momentum, eps), label, backend."""
    rng = np.random.default_rng(seed)
    layouts = [([5, 2, 6], (4,), np.float64, 0.1, 1e-5, "threads"),
               ([3, 2], (3, 4, 2), np.float64, 0.3, 1e-3, "threads"),
               ([6, 6, 2, 4], (2,), np.float64, 0.1, 1e-5, "threads"),
               ([9, 7], (3,), np.float32, 0.1, 1e-5, "threads"),
               ([4, 1, 6], (5,), np.float64, 0.1, 1e-5, "gloo")]
    cases = []
    for sizes, channel_shape, dtype, momentum, eps, backend in layouts:
        c = channel_shape[0]
        shape = (sum(sizes),) + channel_shape
        axes = (0,) + tuple(range(2, len(shape)))
        x = _scaled(rng, shape, np.float64, (1,)) + (1e2 if dtype == np.float32 else 0.0)
        split = np.cumsum(sizes)[:-1]
        dout = rng.standard_normal(shape)
        args = ([s.astype(dtype) for s in np.split(x, split)],
                [d.astype(dtype) for d in np.split(dout, split)] if with_dout else None,
                rng.uniform(0.5, 2.0, c).astype(dtype), rng.normal(0, 1, c).astype(dtype),
                rng.normal(0, 1, c).astype(dtype), rng.uniform(0.5, 2.0, c).astype(dtype), momentum, eps)
        label = (f"{len(sizes)} ranks ({backend}) with shards of {sizes} samples of shape {channel_shape}, "
                 f"{np.dtype(dtype).name}, momentum={momentum}, eps={eps}")
        cases.append((args, label, backend, axes))
    return cases


def _full_batch(args, axes):
    """What one BN over the concatenated batch gives: out, running stats, and (with douts) the gradients."""
    shards, douts, gamma, beta, running_mean, running_var, momentum, eps = args
    x = np.concatenate(shards).astype(np.float64)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = x.mean(axes), x.var(axes)
    n = x.size // x.shape[1]
    x_hat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    expected = {"out": gamma.reshape(shape) * x_hat + beta.reshape(shape),
                "running_mean": (1 - momentum) * running_mean + momentum * mean,
                "running_var": (1 - momentum) * running_var + momentum * var * n / (n - 1),
                "n": n, "x_hat": x_hat, "mean": mean, "var": var, "shape": shape}
    if douts is not None:
        dout = np.concatenate(douts).astype(np.float64)
        g = dout * gamma.reshape(shape)
        expected["dx"] = (g - g.mean(axes, keepdims=True) - x_hat * (g * x_hat).mean(axes, keepdims=True)) / np.sqrt(
            var.reshape(shape) + eps)
        expected["dgamma"], expected["dbeta"] = (dout * x_hat).sum(axes), dout.sum(axes)
    return expected


def _local_batch(args, axes, key):
    """The concatenation of each shard's own batch norm (no synchronization), for ``key``."""
    shards, douts, *rest = args
    parts = []
    with np.errstate(divide="ignore", invalid="ignore"):  # a shard of one sample has no unbiased variance
        for r, shard in enumerate(shards):
            one = _full_batch(([shard], None if douts is None else [douts[r]], *rest), axes)
            parts.append(one[key])
    return np.concatenate(parts) if key in ("out", "dx") else parts


def _run(forward, backward, args, label, backend):
    """The student's step on every rank, as a list of per-rank dicts; a failure becomes the student's message."""
    name = "syncbn_forward" if backward is None else "syncbn_backward"
    harness = SyncBNRanks(forward, backward, backend, TIMEOUT[backend])
    try:
        results = in_sandbox(harness, *args)
    except NotImplementedError:
        raise AssertionError(f"{name} is not implemented yet.") from None
    except Exception as exc:
        raise AssertionError(f"{name} failed on {label}: {type(exc).__name__}: {exc}") from None
    if not isinstance(results, list) or len(results) != len(args[0]) or not all(isinstance(r, dict) for r in results):
        raise AssertionError(f"{name}: the ranks did not return what the docstring asks for ({label})")
    return results


def _gathered(results, key, label, name):
    try:
        return np.concatenate([np.asarray(r[key], dtype=np.float64) for r in results])
    except Exception:
        raise AssertionError(f"{name} returned something that is not an array for {key} ({label})") from None


def _traffic_bound(results, args, label, name):
    """SyncBN must reduce O(C) numbers, not the activations."""
    c = args[2].size
    for rank, result in enumerate(results):
        values = result["traffic"]["values"] if isinstance(result.get("traffic"), dict) else 0
        if values > 8 * c + 8:
            raise AssertionError(f"{name}: rank {rank} all-reduced {values} numbers for {c} channels ({label}); "
                                 "SyncBN needs only per-channel sums (a few times C), never the activations")


def check_syncbn_forward(forward):
    """Hidden test of ``syncbn_forward``: output and running statistics equal one BN over the global batch."""
    check_not_reference(forward, "syncbn_forward")
    name = "syncbn_forward"
    for args, label, backend, axes in _sync_cases(seed=86, with_dout=False):
        dtype = args[0][0].dtype
        expected = _full_batch(args, axes)
        results = _run(forward, None, args, label, backend)
        out = _gathered(results, "out", label, name)
        if not close(out, expected["out"], dtype):
            if close(out, _local_batch(args, axes, "out"), dtype):
                raise AssertionError(f"{name}: each rank normalizes with the statistics of its own shard; SyncBN "
                                     f"uses those of the global batch, through all_reduce ({label})")
            n, var = expected["n"], expected["var"]
            unbiased = expected["x_hat"] * np.sqrt((var + args[7]) / (var * n / (n - 1) + args[7])).reshape(
                expected["shape"])
            if close(out, args[2].reshape(expected["shape"]) * unbiased + args[3].reshape(expected["shape"]), dtype):
                raise AssertionError(f"{name}: the batch is normalized with the unbiased variance; normalize with "
                                     f"the biased one (divide by n), and keep n / (n - 1) for running_var ({label})")
            raise AssertionError(f"{name}: the concatenated outputs of the ranks differ from one batch norm over the "
                                 f"global batch ({label})")
        _check_running(results, args, expected, axes, label, name, dtype)
        _traffic_bound(results, args, label, name)


def _check_running(results, args, expected, axes, label, name, dtype):
    _, _, _, _, running_mean, running_var, momentum, _ = args
    n = expected["n"]
    for rank, result in enumerate(results):
        mean, var = (np.asarray(result[k], dtype=np.float64) for k in ("running_mean", "running_var"))
        for key, got, before in (("running_mean", mean, running_mean), ("running_var", var, running_var)):
            if close(got, before, dtype):
                raise AssertionError(f"{name}: {key} is not updated in place (rank {rank}, {label}); write into the "
                                     f"array you are given, e.g. {key} *= 1 - momentum, as torch updates its buffers")
        if not close(mean, expected["running_mean"], dtype):
            keras = momentum * running_mean + (1 - momentum) * expected["mean"]
            hint = (" with the Keras/TF convention (momentum weights the OLD value); PyTorch's momentum weights "
                    "the new batch") if close(mean, keras, dtype) else ""
            raise AssertionError(f"{name}: running_mean is wrong on rank {rank}{hint} ({label})")
        if not close(var, expected["running_var"], dtype):
            biased = (1 - momentum) * running_var + momentum * expected["var"]
            local = _local_batch(args, axes, "running_var")[rank]
            if close(var, biased, dtype):
                why = "it uses the biased variance; the running average takes the unbiased one, M2 / (n - 1)"
            elif close(var, local, dtype):
                why = "it uses this rank's own shard; it must be the unbiased variance of the GLOBAL batch"
            else:
                why = "expected (1 - momentum) * running_var + momentum * (unbiased variance of the global batch)"
            raise AssertionError(f"{name}: running_var is wrong on rank {rank}: {why} ({label})")


def check_syncbn_backward(forward, backward):
    """Hidden test of ``syncbn_backward``: dx equals one BN's, and local dgamma/dbeta sum to one BN's."""
    check_not_reference(forward, "syncbn_forward")
    check_not_reference(backward, "syncbn_backward")
    name = "syncbn_backward"
    for args, label, backend, axes in _sync_cases(seed=87, with_dout=True):
        dtype = args[0][0].dtype
        rtol, atol = tolerance(dtype)
        tol = (rtol, atol * 10)
        expected = _full_batch(args, axes)
        results = _run(forward, backward, args, label, backend)
        dx = _gathered(results, "dx", label, name)
        if not close(dx, expected["dx"], dtype, tol):
            if close(_gathered(results, "out", label, name), expected["out"], dtype):
                if any(close(dx, _local_dx(args, expected, axes, count), dtype, tol) for count in ("global", "local")):
                    raise AssertionError(f"{name}: dx uses this rank's own sums of dy and dy * x_hat; all-reduce "
                                         f"them and divide by the GLOBAL count ({label})")
                raise AssertionError(f"{name}: the concatenated dx of the ranks differs from the gradient of one "
                                     f"batch norm over the global batch ({label})")
            raise AssertionError(f"{name}: syncbn_forward is not right yet, so neither is dx ({label})")
        for key in ("dgamma", "dbeta"):
            per_rank = [np.asarray(r[key], dtype=np.float64) for r in results]
            if close(per_rank[0], expected[key], dtype, tol) and close(sum(per_rank), len(per_rank) * expected[key],
                                                                      dtype, tol):
                raise AssertionError(f"{name}: {key} is already summed over the ranks on every rank; return this "
                                     f"rank's local sum, as torch.nn.SyncBatchNorm does (data-parallel training "
                                     f"sums the parameter gradients afterwards) ({label})")
            if not close(sum(per_rank), expected[key], dtype, tol):
                raise AssertionError(f"{name}: {key} summed over the ranks differs from that of one batch norm "
                                     f"over the global batch ({label})")
        _traffic_bound(results, args, label, name)


def _local_dx(args, expected, axes, count):
    """dx when each rank sums dy and dy * x_hat over its own shard only (global statistics), divided by the
    global count (``count="global"``) or the shard's own (``"local"``)."""
    shards, douts, gamma, _, _, _, _, eps = args
    shape = expected["shape"]
    rstd = 1.0 / np.sqrt(expected["var"].reshape(shape) + eps)
    sizes = np.cumsum([len(s) for s in shards])[:-1]
    parts = []
    for dout, x_hat in zip(douts, np.split(expected["x_hat"], sizes)):
        g = np.asarray(dout, np.float64) * gamma.reshape(shape)
        n = expected["n"] if count == "global" else g.size // g.shape[1]
        parts.append(rstd * (g - g.sum(axes, keepdims=True) / n - x_hat * (g * x_hat).sum(axes, keepdims=True) / n))
    return np.concatenate(parts)
