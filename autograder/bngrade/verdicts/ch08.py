"""Verdicts of chapter 8, *Beyond batch norm*: layer norm, group norm, merged moments and SyncBN (probes:
:mod:`bncapture.ch08`).

Every verdict rebuilds the inputs from the public case builders and compares the probe's records with
``bnref`` on them. The known mistakes are recomputed on the same inputs (with torch autograd where a wrong
forward pass has a wrong gradient) and named when the student's result matches one. Dtypes: the layer-norm
forward must keep float32 (the exercise says so); everywhere else any float dtype that meets float32's
tolerance passes (a backward may keep float64 internals). What the ranks report about their all_reduce
traffic comes from the sandbox and is forgeable: it can only cost points (activations sent), never earn them.
"""
import functools

import numpy as np

import bnref
from bncapture import ch08 as probes

from bngrade.judge.compare import (Mistake, close, compare, dtype_of, inputs_unchanged, keeps_float32, rejects,
                                   tolerance)


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


def _through(forward, backward):
    """(x, ..., dout) -> the gradients of ``backward`` on the cache of ``forward``."""
    def gradients(*args):
        *forward_args, dout = args
        return backward(dout, forward(*forward_args)[1])
    return gradients


def _forward_mistakes(layouts):
    return [Mistake(message, _wrong(fn, False)) for message, fn in layouts]


def _backward(r, forward_name, name, cases, mistakes):
    """Compare the gradients recorded on the student's own forward's cache with bnref's, naming ``mistakes``.

    The forward must have run on every case; when the gradients match no mistake and the forward's own output
    is wrong, the message says to fix the forward first.
    """
    forward = getattr(bnref, forward_name)
    outs = [forward(*case.args[:-1])[0] for case in cases]
    for index, (case, out) in enumerate(zip(cases, outs)):
        try:
            r.get(f"fwd{index}", out, forward_name, case.label)
        except AssertionError as err:
            raise AssertionError(f"{name} is tested on the cache of your {forward_name}, which failed: {err}") from None
    try:
        compare(r, "case", _through(forward, getattr(bnref, name)), cases, name, mistakes)
    except AssertionError as err:
        if str(err).startswith(f"{name} does not match the reference"):
            for index, (case, out) in enumerate(zip(cases, outs)):
                if not close(r.get(f"fwd{index}", out, forward_name, case.label), out, dtype_of(case)):
                    raise AssertionError(f"{name}: your {forward_name} does not match the reference for input "
                                         f"{case.label}, so neither can gradients on its cache; make its own test "
                                         "pass first") from None
        raise


FORGETS_GAMMA = ("dx forgets gamma: the gradient that reaches x_hat is dout * gamma, not dout (dbeta and dgamma "
                 "do not involve gamma, dx does)")


# --- layer norm -------------------------------------------------------------------------------------------

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


def _ln_partial_backward(x, gamma, beta, eps, dout, with_gamma=True, **paths):
    """LN gradients with the path through the mean or the variance left out, or without gamma in dx:
    (dx, dgamma, dbeta)."""
    x, gamma, dout = (np.asarray(a, dtype=np.float64) for a in (x, gamma, dout))
    dx, x_hat = _rows_dx(x, dout * gamma if with_gamma else dout, eps, **paths)
    return dx, (dout * x_hat).sum(0), dout.sum(0)


LN_BACKWARD_MISTAKES = [Mistake(message, _wrong(fn, True)) for message, fn in LN_LAYOUTS] + [
    Mistake("dx is missing the path through the mean: subtract the per-sample mean of dout * gamma",
            functools.partial(_ln_partial_backward, mean_path=False)),
    Mistake("dx is missing the path through the variance: subtract x_hat times the per-sample mean of "
            "dout * gamma * x_hat", functools.partial(_ln_partial_backward, var_path=False)),
    Mistake(FORGETS_GAMMA, functools.partial(_ln_partial_backward, with_gamma=False)),
]


def layernorm_forward(r):
    """``layernorm_forward(x, gamma, beta, eps) -> (out, cache)``: out on every case, inputs intact, float32
    kept (the exercise says so), bad shapes refused."""
    name = "layernorm_forward"
    cases = probes.ln_cases(seed=81)
    compare(r, "case", bnref.layernorm_forward, cases, name, _forward_mistakes(LN_LAYOUTS),
            pick=lambda result: result[0])
    inputs_unchanged(r, "case", cases[:2], name)
    keeps_float32(r, f"case{len(cases) - 1}", bnref.layernorm_forward(*cases[-1].args)[0], name, cases[-1].label)
    rejects(r, "bad ", probes.bad_ln_inputs(), name)


def layernorm_backward(r):
    """``layernorm_backward(dout, cache)`` on the cache of the student's own forward: (dx, dgamma, dbeta)."""
    _backward(r, "layernorm_forward", "layernorm_backward", probes.ln_cases(seed=82, with_dout=True),
              LN_BACKWARD_MISTAKES)


# --- group norm -------------------------------------------------------------------------------------------

def _gn(x, gamma, beta, groups, eps, over=(2, 3, 4), interleaved=False, dims=None, correction=0,
        eps_outside=False):
    """torch group norm gone wrong: statistics ``over`` these axes of the (N, G, C/G, H, W) view, or over
    ``dims`` of x itself, or groups of interleaved channels (channel k in group k % G)."""
    n, c, h, w = x.shape
    if dims is not None:
        normed = _normalize(x, dims, eps, correction, eps_outside)
    elif interleaved:
        normed = _normalize(x.reshape(n, c // groups, groups, h, w), (1, 3, 4), eps, correction, eps_outside)
    else:
        normed = _normalize(x.reshape(n, groups, c // groups, h, w), over, eps, correction, eps_outside)
    return gamma.view(1, -1, 1, 1) * normed.reshape(x.shape) + beta.view(1, -1, 1, 1)


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
    ("the group statistics are pooled over the whole batch: group norm takes one mean and one variance per "
     "(sample, group), never across the samples of the batch",
     lambda x, g, b, groups, eps: _gn(x, g, b, groups, eps, over=(0, 2, 3, 4))),
    ("the statistics are taken over the C/G channels of a group at each pixel separately; group norm pools "
     "each (sample, group) over all of its C/G * H * W values: one mean and one variance per group, not per "
     "pixel", lambda x, g, b, groups, eps: _gn(x, g, b, groups, eps, over=(2,))),
]


def _gn_partial_backward(x, gamma, beta, groups, eps, dout, with_gamma=True, **paths):
    """GN gradients with the path through the group mean or variance left out, or without gamma in dx."""
    x, gamma, dout = (np.asarray(a, dtype=np.float64) for a in (x, gamma, dout))
    n, c = x.shape[:2]
    g = (dout * gamma.reshape(1, c, 1, 1) if with_gamma else dout).reshape(n * groups, -1)
    dx, x_hat = _rows_dx(x.reshape(n * groups, -1), g, eps, **paths)
    x_hat = x_hat.reshape(x.shape)
    return dx.reshape(x.shape), (dout * x_hat).sum((0, 2, 3)), dout.sum((0, 2, 3))


GN_BACKWARD_MISTAKES = [Mistake(message, _wrong(fn, True)) for message, fn in GN_LAYOUTS] + [
    Mistake("dx is missing the path through the group mean: subtract the mean of dout * gamma over each "
            "(sample, group)", functools.partial(_gn_partial_backward, mean_path=False)),
    Mistake("dx is missing the path through the group variance: subtract x_hat times the mean of "
            "dout * gamma * x_hat over each (sample, group)",
            functools.partial(_gn_partial_backward, var_path=False)),
    Mistake(FORGETS_GAMMA, functools.partial(_gn_partial_backward, with_gamma=False)),
]


def groupnorm_forward(r):
    """``groupnorm_forward(x, gamma, beta, groups, eps) -> (out, cache)``: out on every case, inputs intact."""
    name = "groupnorm_forward"
    cases = probes.gn_cases(seed=83)
    compare(r, "case", bnref.groupnorm_forward, cases, name, _forward_mistakes(GN_LAYOUTS),
            pick=lambda result: result[0])
    inputs_unchanged(r, "case", cases[:2], name)


def groupnorm_rejects_bad_input(r):
    """C not divisible by groups (also where a reshape into groups would succeed), groups = 0, a non-4-D x, or
    gamma/beta not (C,) raise ValueError; where C % groups != 0 the message must say it is about the groups."""
    name = "groupnorm_forward"
    rejects(r, "bad ", probes.bad_gn_inputs(), name)
    for what, (x, _, _, groups) in probes.indivisible_groups().items():
        message = r.raised(f"bad {what}", name, what)["message"]
        if "group" not in message.lower():
            raise AssertionError(f"{name} raised a ValueError for {what}, but its message does not say why "
                                 f"({message[:200]!r}); say that C = {x.shape[1]} channels cannot be split into "
                                 f"groups = {groups} equal groups")


def groupnorm_backward(r):
    """``groupnorm_backward(dout, cache)`` on the cache of the student's own forward: (dx, dgamma, dbeta)."""
    _backward(r, "groupnorm_forward", "groupnorm_backward", probes.gn_cases(seed=84, with_dout=True),
              GN_BACKWARD_MISTAKES)


# --- merged moments ---------------------------------------------------------------------------------------

#: float32 far from 0 rounds the mean by ulp(1e4); m2 is what the tolerance is about
MERGE_TOL = (2e-4, 1e-6)

SIZES_IGNORED = ("the merge ignores the shards' sizes: the shards' means are averaged without weighting them by "
                 "their counts; the count of the whole is sum(count), its mean sum(count * mean) / sum(count), "
                 "and Chan's delta^2 term is weighted by n_a * n_b / n")


def _merge_reference(parts):
    """The exact merge, in float64 and rounded to the parts' dtype."""
    dtype = parts[0][1].dtype
    count, mean, m2 = bnref.merge_moments([(n, np.asarray(m, np.float64), np.asarray(q, np.float64))
                                           for n, m, q in parts])
    return count, mean.astype(dtype), m2.astype(dtype)


def _merge_with(parts, how):
    """Merges that go wrong in known ways: through sums of x and x^2 in the parts' precision, or without the
    spread between the shards' means."""
    parts = [(n, m, q) for n, m, q in parts if n > 0]
    count = sum(n for n, _, _ in parts)
    if how == "sums":
        sx = sum(n * m for n, m, _ in parts)
        sxx = sum(q + n * m * m for n, m, q in parts)
        mean = sx / count
        return count, mean, sxx - count * mean * mean
    if how == "no_delta":
        return count, sum(n * m for n, m, _ in parts) / count, sum(q for _, _, q in parts)
    raise ValueError(how)


MERGE_MISTAKES = [
    Mistake("m2 is the sum of the shards' m2 only: add delta^2 * n_a * n_b / n for the spread BETWEEN the "
            "shards' means (Chan's formula)", lambda parts: _merge_with(parts, "no_delta")),
    Mistake("the merge goes through sum(x) and sum(x^2) (E[x^2] - E[x]^2): at a mean offset of 1e4 in "
            "float32 that cancels every digit of the variance; merge the centered m2 with Chan's formula",
            lambda parts: _merge_with(parts, "sums")),
]


def _name_ignored_sizes(r, cases, name):
    """At the first case that fails, name a merge whose count is the number of shards, or whose mean is the
    plain average of the shards' means, whatever its m2."""
    for index, case in enumerate(cases):
        expected = _merge_reference(*case.args)
        got = r.get(f"case{index}", expected, name, case.label)
        if close(got, expected, tol=MERGE_TOL):
            continue
        shards = [(n, m) for n, m, _ in case.args[0] if n > 0]
        plain = np.mean([m.astype(np.float64) for _, m in shards], axis=0)
        if (got[0] != expected[0] and got[0] == len(shards)) or (
                not close(got[1], expected[1], tol=MERGE_TOL) and close(got[1], plain, tol=MERGE_TOL)):
            raise AssertionError(f"{name}: {SIZES_IGNORED} (input: {case.label})")
        return


def merge_moments(r):
    """``merge_moments(parts) -> (count, mean, m2)``: every case, parts intact, only empty shards refused."""
    name = "merge_moments"
    cases = probes.merge_cases()
    _name_ignored_sizes(r, cases, name)
    compare(r, "case", _merge_reference, cases, name, MERGE_MISTAKES, tol=MERGE_TOL)
    for index, case in enumerate(cases):
        (parts,) = case.args
        try:
            intact = close(r.get(f"case{index}.after", parts, name, case.label), parts, tol=(0.0, 0.0))
        except AssertionError:
            intact = False
        if not intact:
            raise AssertionError(f"{name} modifies its input parts in place; compute new arrays instead "
                                 f"(input: {case.label})")
    rejects(r, "bad ", probes.empty_merges(), name)


# --- SyncBN -----------------------------------------------------------------------------------------------

def _axes(case):
    """The axes a channel's statistics run over: all but 1."""
    return (0,) + tuple(range(2, case.args[0][0].ndim))


def _full_batch(args, axes):
    """What one BN over the concatenated batch gives, in float64: out, running stats, and (with douts) the
    gradients; the per-rank splits of out (and dx, and the local dgamma and dbeta) under "ranks"."""
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
    cuts = np.cumsum([len(s) for s in shards])[:-1]
    ranks = [{"out": out, "running_mean": expected["running_mean"], "running_var": expected["running_var"]}
             for out in np.split(expected["out"], cuts)]
    if douts is not None:
        dout = np.concatenate(douts).astype(np.float64)
        g = dout * gamma.reshape(shape)
        expected["dx"] = (g - g.mean(axes, keepdims=True) - x_hat * (g * x_hat).mean(axes, keepdims=True)) / np.sqrt(
            var.reshape(shape) + eps)
        expected["dgamma"], expected["dbeta"] = (dout * x_hat).sum(axes), dout.sum(axes)
        for rank, dx, d, xh in zip(ranks, np.split(expected["dx"], cuts), np.split(dout, cuts),
                                   np.split(x_hat, cuts)):
            rank.update(dx=dx, dgamma=(d * xh).sum(axes), dbeta=d.sum(axes))
    expected["ranks"] = ranks
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


def _ranks(r, index, case, expected, name):
    """The ranks' results of case ``index``, shaped like ``expected["ranks"]``; a failed run is the message."""
    key = f"case{index}"
    error = r.raised(key, name, case.label)
    if error is not None:
        if error["type"] == "NotImplementedError":
            raise AssertionError(f"{name} is not implemented yet.")
        raise AssertionError(f"{name} failed on {case.label}: {error['type']}: {error['message'][:1000]}")
    return r.get(key, expected["ranks"], name, case.label)


def _traffic_bound(r, index, case, name):
    """SyncBN must reduce O(C) numbers, not the activations. The report comes from the sandbox: a missing or
    odd one costs nothing, and a small one earns nothing."""
    c, world = case.args[2].size, len(case.args[0])
    try:
        traffic = r.get(f"case{index}.traffic", [{"calls": 0, "values": 0, "bytes": 0}] * world, name, case.label)
    except AssertionError:
        return
    for rank, report in enumerate(traffic):
        if report["values"] > 8 * c + 8:
            raise AssertionError(f"{name}: rank {rank} all-reduced {report['values']} numbers for {c} channels "
                                 f"({case.label}); SyncBN needs only per-channel sums (a few times C), never the "
                                 "activations")


def _check_running(results, case, expected, name, dtype):
    _, _, _, _, running_mean, running_var, momentum, _ = case.args
    label = case.label
    for rank, result in enumerate(results):
        mean, var = result["running_mean"], result["running_var"]
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
            local = _local_batch(case.args, _axes(case), "running_var")[rank]
            if close(var, biased, dtype):
                why = "it uses the biased variance; the running average takes the unbiased one, M2 / (n - 1)"
            elif close(var, local, dtype):
                why = "it uses this rank's own shard; it must be the unbiased variance of the GLOBAL batch"
            else:
                why = "expected (1 - momentum) * running_var + momentum * (unbiased variance of the global batch)"
            raise AssertionError(f"{name}: running_var is wrong on rank {rank}: {why} ({label})")


def _check_out(results, case, expected, name, dtype):
    """The concatenated outputs equal one BN over the global batch, or the known mistake is named."""
    out = np.concatenate([result["out"] for result in results])
    if close(out, expected["out"], dtype):
        return
    if close(out, _local_batch(case.args, _axes(case), "out"), dtype):
        raise AssertionError(f"{name}: each rank normalizes with the statistics of its own shard; SyncBN "
                             f"uses those of the global batch, through all_reduce ({case.label})")
    n, var, shape, eps = expected["n"], expected["var"], expected["shape"], case.args[7]
    unbiased = expected["x_hat"] * np.sqrt((var + eps) / (var * n / (n - 1) + eps)).reshape(shape)
    if close(out, case.args[2].reshape(shape) * unbiased + case.args[3].reshape(shape), dtype):
        raise AssertionError(f"{name}: the batch is normalized with the unbiased variance; normalize with "
                             f"the biased one (divide by n), and keep n / (n - 1) for running_var ({case.label})")
    raise AssertionError(f"{name}: the concatenated outputs of the ranks differ from one batch norm over the "
                         f"global batch ({case.label})")


def syncbn_forward(r):
    """``syncbn_forward`` on every case's ranks: outputs and running statistics equal one BN's over the global
    batch; the running buffers are updated in place; only O(C) numbers are all-reduced."""
    name = "syncbn_forward"
    for index, case in enumerate(probes.sync_cases(seed=86, with_dout=False)):
        dtype = case.args[0][0].dtype
        expected = _full_batch(case.args, _axes(case))
        results = _ranks(r, index, case, expected, name)
        _check_out(results, case, expected, name, dtype)
        _check_running(results, case, expected, name, dtype)
        _traffic_bound(r, index, case, name)


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


def _check_dx(results, case, expected, name, tol):
    dtype, axes = case.args[0][0].dtype, _axes(case)
    dx = np.concatenate([result["dx"] for result in results])
    if close(dx, expected["dx"], dtype, tol):
        return
    if not close(np.concatenate([result["out"] for result in results]), expected["out"], dtype):
        raise AssertionError(f"{name}: syncbn_forward is not right yet, so neither is dx ({case.label})")
    if any(close(dx, _local_dx(case.args, expected, axes, count), dtype, tol) for count in ("global", "local")):
        raise AssertionError(f"{name}: dx uses this rank's own sums of dy and dy * x_hat; all-reduce "
                             f"them and divide by the GLOBAL count ({case.label})")
    raise AssertionError(f"{name}: the concatenated dx of the ranks differs from the gradient of one "
                         f"batch norm over the global batch ({case.label})")


def syncbn_backward(r):
    """``syncbn_backward`` on the caches of the student's ``syncbn_forward``: dx equals one BN's, and each rank's
    local dgamma and dbeta sum to one BN's."""
    name = "syncbn_backward"
    for index, case in enumerate(probes.sync_cases(seed=87, with_dout=True)):
        dtype = case.args[0][0].dtype
        rtol, atol = tolerance(dtype)
        tol = (rtol, atol * 10)
        expected = _full_batch(case.args, _axes(case))
        results = _ranks(r, index, case, expected, name)
        _check_dx(results, case, expected, name, tol)
        for key in ("dgamma", "dbeta"):
            per_rank = [result[key] for result in results]
            if close(per_rank[0], expected[key], dtype, tol) and close(sum(per_rank), len(per_rank) * expected[key],
                                                                      dtype, tol):
                raise AssertionError(f"{name}: {key} is already summed over the ranks on every rank; return this "
                                     f"rank's local sum, as torch.nn.SyncBatchNorm does (data-parallel training "
                                     f"sums the parameter gradients afterwards) ({case.label})")
            if not close(sum(per_rank), expected[key], dtype, tol):
                raise AssertionError(f"{name}: {key} summed over the ranks differs from that of one batch norm "
                                     f"over the global batch ({case.label})")
        _traffic_bound(r, index, case, name)
