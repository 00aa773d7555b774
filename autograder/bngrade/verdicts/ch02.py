"""Hidden tests of chapter 2, *Batch norm forward in NumPy*.

Every check compares the student's code with ``bnref`` on fresh random
inputs (several shapes, float32 and float64) and names the known mistakes.
"""
import numpy as np

import bnref

from bngrade.judge.compare import (Case, Mistake, check_dtype, check_inputs_unchanged, check_not_reference, check_rejects, compare,
                      random_matrix)

SHAPES = [(2, 3), (7, 5), (64, 33), (129, 1)]


def _forward_cases(seed=2):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for shape, eps in zip(SHAPES, (1e-5, 1e-3, 1e-5, 0.1)):
            x = random_matrix(rng, shape, dtype)
            gamma = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
            beta = rng.normal(0.0, 1.0, shape[1]).astype(dtype)
            cases.append(Case((x, gamma, beta, eps), f"x {shape} {np.dtype(dtype).name}, eps={eps}"))
    x = random_matrix(rng, (256, 8), np.float32, loc=1e3, scale=1.0)
    cases.append(Case((x, np.ones(8, np.float32), np.zeros(8, np.float32), 1e-5),
                      "x (256, 8) float32 with |mean|/std ~ 1e3"))
    return cases


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


def check_batchnorm_forward(student):
    """Hidden test of ``batchnorm_forward(x, gamma, beta, eps) -> (out, cache)``."""
    cases = _forward_cases()
    compare(student, bnref.batchnorm_forward, cases, "batchnorm_forward", FORWARD_MISTAKES,
            pick=lambda result: result[0])
    check_inputs_unchanged(student, cases[:3], "batchnorm_forward")
    check_dtype(student, cases[-2], "batchnorm_forward")


def check_forward_rejects_bad_input(student):
    """Hidden test: wrong dimensions, mismatched gamma/beta and N == 1 raise ValueError."""
    d = 4
    g, b = np.ones(d), np.zeros(d)
    bad = {
        "a 1-D x": (np.ones(d), g, b),
        "a 3-D x": (np.ones((2, d, 3)), g, b),
        "gamma of the wrong length": (np.ones((5, d)), np.ones(d + 1), b),
        "beta of the wrong length": (np.ones((5, d)), g, np.zeros(d - 1)),
        "a batch of one sample (N == 1) in training mode": (np.ones((1, d)), g, b),
    }
    check_rejects(student, bad, "batchnorm_forward")


def _inference_cases(seed=3):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for shape, eps in zip([(9, 6), (50, 17), (1, 4)], (1e-5, 1e-3, 0.2)):
            x = random_matrix(rng, shape, dtype)
            d = shape[1]
            params = [rng.uniform(0.5, 2, d), rng.normal(size=d), rng.normal(size=d), rng.uniform(0.2, 4, d)]
            cases.append(Case((x, *(p.astype(dtype) for p in params), eps),
                              f"x {shape} {np.dtype(dtype).name}, eps={eps}"))
    return cases


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


def check_batchnorm_inference(student):
    """Hidden test of ``batchnorm_inference(x, gamma, beta, running_mean, running_var, eps)``."""
    cases = _inference_cases()
    compare(student, bnref.batchnorm_inference, cases, "batchnorm_inference", INFERENCE_MISTAKES)
    check_inputs_unchanged(student, cases, "batchnorm_inference")
    check_dtype(student, cases[-1], "batchnorm_inference")


def _running_cases(seed=4):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for shape, momentum in zip([(2, 3), (16, 5), (100, 12)], (0.1, 0.5, 0.01)):
            x = random_matrix(rng, shape, dtype)
            rm = rng.normal(size=shape[1]).astype(dtype)
            rv = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
            cases.append(Case((rm, rv, x, momentum), f"x {shape} {np.dtype(dtype).name}, momentum={momentum}"))
    return cases


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


def check_update_running_stats(student):
    """Hidden test of ``update_running_stats(running_mean, running_var, x, momentum)``."""
    cases = _running_cases()
    compare(student, bnref.update_running_stats, cases, "update_running_stats", RUNNING_MISTAKES)
    check_inputs_unchanged(student, cases, "update_running_stats")


def check_batchnorm1d(student_cls, steps=4):
    """Hidden test: step the student's ``BatchNorm1d`` in lockstep with ``torch.nn.BatchNorm1d``."""
    import torch

    check_not_reference(student_cls, "BatchNorm1d")
    rng = np.random.default_rng(5)
    for n, d, momentum in [(8, 3, 0.1), (33, 10, 0.3)]:
        layer = student_cls(d, momentum=momentum)
        layer.gamma = rng.uniform(0.5, 2, d)
        layer.beta = rng.normal(size=d)
        ref = torch.nn.BatchNorm1d(d, momentum=momentum, dtype=torch.float64)
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(layer.gamma))
            ref.bias.copy_(torch.from_numpy(layer.beta))
        schedule = ["train"] * steps + ["eval"] * 2 + ["train"] * 2
        for step, mode in enumerate(schedule):
            getattr(layer, mode)()
            getattr(ref, mode)()
            x = random_matrix(rng, (n, d), np.float64)
            where = f"step {step} ({mode} mode), x ({n}, {d}), momentum={momentum}"
            try:
                out = layer.forward(x)
            except NotImplementedError:
                raise AssertionError("BatchNorm1d is not implemented yet.") from None
            except Exception as exc:
                raise AssertionError(f"BatchNorm1d.forward raised {type(exc).__name__}: {exc} at {where}") from None
            with torch.no_grad():
                expected = ref(torch.from_numpy(x)).numpy()
            _check_step(layer, ref, out, expected, x, mode, where)


def _check_step(layer, ref, out, expected, x, mode, where):
    """Compare one step's output and buffers with torch, naming the usual mistakes."""
    rm, rv = ref.running_mean.numpy(), ref.running_var.numpy()
    if mode == "eval" and np.allclose(out, bnref.batchnorm_forward(x, layer.gamma, layer.beta)[0]):
        raise AssertionError(f"BatchNorm1d: in eval mode your layer normalizes with the batch statistics; "
                             f"it must use running_mean and running_var ({where})")
    if not np.allclose(out, expected, rtol=1e-6, atol=1e-8):
        raise AssertionError(f"BatchNorm1d.forward output differs from torch.nn.BatchNorm1d at {where} "
                             "(if batchnorm_forward or batchnorm_inference fail their tests, fix those first)")
    if mode == "eval" and not (np.allclose(layer.running_mean, rm) and np.allclose(layer.running_var, rv)):
        raise AssertionError(f"BatchNorm1d: the running statistics changed in eval mode ({where}); "
                             "eval mode must leave them alone")
    if not np.allclose(layer.running_mean, rm, rtol=1e-6, atol=1e-9):
        raise AssertionError(f"BatchNorm1d.running_mean differs from torch after {where}: is it updated in "
                             "training mode with momentum in PyTorch's convention?")
    if not np.allclose(layer.running_var, rv, rtol=1e-6, atol=1e-9):
        raise AssertionError(f"BatchNorm1d.running_var differs from torch after {where}: PyTorch averages "
                             "the unbiased batch variance, var * N / (N - 1)")


def check_keras_momentum_to_torch(student):
    """Hidden test of ``keras_momentum_to_torch(m)``: the same average in PyTorch's convention."""
    check_not_reference(student, "keras_momentum_to_torch")
    for keras in (0.99, 0.9, 0.5, 0.0, 0.999):
        got = student(keras)
        if not np.isclose(got, 1 - keras, atol=1e-12):
            raise AssertionError(f"keras_momentum_to_torch({keras}) returned {got}: Keras weights the OLD value by "
                                 "momentum, PyTorch weights the NEW batch statistic by momentum")
