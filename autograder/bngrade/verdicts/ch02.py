"""Verdicts of chapter 2, *Batch norm forward in NumPy* (probes: :mod:`bncapture.ch02`).

Every verdict compares the probe's records with ``bnref`` (and torch) on the grader's own copy of the inputs,
rebuilt from the public case builders, and names the known mistakes.
"""
import numpy as np

import bnref
from bncapture import ch02 as probes

from bngrade.judge.compare import Mistake, close, compare, inputs_unchanged, keeps_float32, rejects


def _normalize(x, gamma, beta, mean, var, eps, sqrt_eps_outside=False):
    std = np.sqrt(var) + eps if sqrt_eps_outside else np.sqrt(var + eps)
    return gamma * (x - mean) / std + beta


FORWARD_MISTAKES = [
    Mistake("your variance divides by N-1; BN normalizes with the biased batch variance (divide by N)",
            lambda x, g, b, eps: _normalize(x, g, b, x.mean(0), x.var(0, ddof=1), eps)),
    Mistake("eps is added outside the square root; normalize by sqrt(var + eps), not sqrt(var) + eps",
            lambda x, g, b, eps: _normalize(x, g, b, x.mean(0), x.var(0), eps, sqrt_eps_outside=True)),
    Mistake("the statistics are taken over the wrong axis; BN averages over the batch axis 0, "
            "one mean and one variance per feature",
            lambda x, g, b, eps: _normalize(x, g, b, x.mean(1, keepdims=True), x.var(1, keepdims=True), eps)),
    Mistake("the eps argument is ignored (a fixed eps is used instead of the one passed in)",
            lambda x, g, b, eps: _normalize(x, g, b, x.mean(0), x.var(0), 1e-5)),
    Mistake("gamma and beta are swapped: out = gamma * x_hat + beta",
            lambda x, g, b, eps: _normalize(x, b, g, x.mean(0), x.var(0), eps)),
    Mistake("the output is not scaled by gamma and shifted by beta",
            lambda x, g, b, eps: _normalize(x, 1.0, 0.0, x.mean(0), x.var(0), eps)),
    Mistake("the variance is computed in one pass as E[x^2] - E[x]^2, which cancels catastrophically in float32 "
            "when |mean| >> std; subtract the mean first (two passes)",
            lambda x, g, b, eps: _normalize(x, g, b, x.mean(0), (x * x).mean(0) - x.mean(0) ** 2, eps)),
]


def batchnorm_forward(r):
    """``batchnorm_forward(x, gamma, beta, eps) -> (out, cache)``: out on every case; inputs intact; float32 kept."""
    cases = probes.forward_cases()
    compare(r, "case", bnref.batchnorm_forward, cases, "batchnorm_forward", FORWARD_MISTAKES,
            pick=lambda result: result[0])
    inputs_unchanged(r, "case", cases[:3], "batchnorm_forward")
    last = len(cases) - 2
    keeps_float32(r, f"case{last}", bnref.batchnorm_forward(*cases[last].args)[0], "batchnorm_forward",
                  cases[last].label)


def forward_rejects_bad_input(r):
    """Wrong dimensions, mismatched gamma/beta and N == 1 raise ValueError."""
    rejects(r, "bad ", probes.bad_forward_inputs(), "batchnorm_forward")


INFERENCE_MISTAKES = [
    Mistake("inference uses the statistics of the batch; it must use running_mean and running_var",
            lambda x, g, b, rm, rv, eps: bnref.batchnorm_forward(x, g, b, eps)[0]),
    Mistake("eps is added outside the square root; use sqrt(running_var + eps)",
            lambda x, g, b, rm, rv, eps: _normalize(x, g, b, rm, rv, eps, sqrt_eps_outside=True)),
    Mistake("running_var is used as if it were a standard deviation; divide by sqrt(running_var + eps)",
            lambda x, g, b, rm, rv, eps: g * (x - rm) / (rv + eps) + b),
    Mistake("the output is not scaled by gamma and shifted by beta",
            lambda x, g, b, rm, rv, eps: _normalize(x, 1.0, 0.0, rm, rv, eps)),
]


def batchnorm_inference(r):
    """``batchnorm_inference(x, gamma, beta, running_mean, running_var, eps)``."""
    cases = probes.inference_cases()
    compare(r, "case", bnref.batchnorm_inference, cases, "batchnorm_inference", INFERENCE_MISTAKES)
    inputs_unchanged(r, "case", cases, "batchnorm_inference")
    last = len(cases) - 1
    keeps_float32(r, f"case{last}", bnref.batchnorm_inference(*cases[last].args), "batchnorm_inference",
                  cases[last].label)


def _ema(rm, rv, mean, var, m):
    return (1 - m) * rm + m * mean, (1 - m) * rv + m * var


RUNNING_MISTAKES = [
    Mistake("momentum is used in the Keras/TF convention (weight of the old value); in PyTorch's convention "
            "new = (1 - momentum) * old + momentum * batch_statistic",
            lambda rm, rv, x, m: _ema(rm, rv, x.mean(0), x.var(0, ddof=1), 1 - m)),
    Mistake("running_var is updated with the biased batch variance; PyTorch (and Ioffe & Szegedy's Algorithm 2) "
            "use the unbiased one, var * N / (N - 1)",
            lambda rm, rv, x, m: _ema(rm, rv, x.mean(0), x.var(0), m)),
    Mistake("the Keras/TF momentum convention and the biased variance are both used",
            lambda rm, rv, x, m: _ema(rm, rv, x.mean(0), x.var(0), 1 - m)),
    Mistake("the running averages are replaced by the batch statistics instead of being averaged",
            lambda rm, rv, x, m: (x.mean(0), x.var(0, ddof=1))),
]


def update_running_stats(r):
    """``update_running_stats(running_mean, running_var, x, momentum) -> (new_mean, new_var)``."""
    cases = probes.running_cases()
    compare(r, "case", bnref.update_running_stats, cases, "update_running_stats", RUNNING_MISTAKES)
    inputs_unchanged(r, "case", cases, "update_running_stats")


def _torch_steps(d, momentum, gamma, beta, steps):
    """[(out, running_mean, running_var)] of ``torch.nn.BatchNorm1d`` stepped through ``steps``, from the
    grader's own gamma, beta and inputs."""
    import torch

    ref = torch.nn.BatchNorm1d(d, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(gamma))
        ref.bias.copy_(torch.from_numpy(beta))
        found = []
        for mode, x in steps:
            getattr(ref, mode)()
            out = ref(torch.from_numpy(x)).numpy()
            found.append((out, ref.running_mean.numpy().copy(), ref.running_var.numpy().copy()))
    return found


def batchnorm1d(r):
    """``BatchNorm1d`` stepped in lockstep with ``torch.nn.BatchNorm1d``, naming the usual mistakes."""
    name = "BatchNorm1d"
    for run, (n, d, momentum, gamma, beta, steps) in enumerate(probes.layer_runs()):
        r.get(f"{run}.init", None, name, f"BatchNorm1d({d}, momentum={momentum})")
        for step, ((mode, x), (expected, rm, rv)) in enumerate(zip(steps, _torch_steps(d, momentum, gamma, beta,
                                                                                        steps))):
            where = f"step {step} ({mode} mode), x ({n}, {d}), momentum={momentum}"
            r.get(f"{run}.{step}.mode", None, f"BatchNorm1d.{mode}", where)
            out = r.get(f"{run}.{step}.out", expected, "BatchNorm1d.forward", where)
            if mode == "eval" and close(out, bnref.batchnorm_forward(x, gamma, beta)[0]):
                raise AssertionError(f"{name}: in eval mode your layer normalizes with the batch statistics; "
                                     f"it must use running_mean and running_var ({where})")
            if not close(out, expected, tol=(1e-6, 1e-8)):
                raise AssertionError(f"{name}.forward output differs from torch.nn.BatchNorm1d at {where} "
                                     "(if batchnorm_forward or batchnorm_inference fail their tests, fix those first)")
            mean = r.get(f"{run}.{step}.running_mean", rm, f"{name}.running_mean", where)
            var = r.get(f"{run}.{step}.running_var", rv, f"{name}.running_var", where)
            if mode == "eval" and not (close(mean, rm) and close(var, rv)):
                raise AssertionError(f"{name}: the running statistics changed in eval mode ({where}); "
                                     "eval mode must leave them alone")
            if not close(mean, rm, tol=(1e-6, 1e-9)):
                raise AssertionError(f"{name}.running_mean differs from torch after {where}: is it updated in "
                                     "training mode with momentum in PyTorch's convention?")
            if not close(var, rv, tol=(1e-6, 1e-9)):
                raise AssertionError(f"{name}.running_var differs from torch after {where}: PyTorch averages "
                                     "the unbiased batch variance, var * N / (N - 1)")


def keras_momentum_to_torch(r):
    """``keras_momentum_to_torch(m)``: the same average in PyTorch's convention."""
    for keras in probes.KERAS_MOMENTA:
        got = r.get(f"m{keras}", 0.0, "keras_momentum_to_torch", f"m={keras}")
        if not np.isclose(got, 1 - keras, atol=1e-12):
            raise AssertionError(f"keras_momentum_to_torch({keras}) returned {got}: Keras weights the OLD value by "
                                 "momentum, PyTorch weights the NEW batch statistic by momentum")
