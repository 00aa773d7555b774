"""Probes of chapter 2, *Batch norm forward in NumPy*: the inputs and the calls; the verdicts are the grader's."""
import numpy as np

from .cases import Case, each, first, generator, random_matrix

SHAPES = [(2, 3), (7, 5), (64, 33), (129, 1)]


def forward_cases(seed=2):
    """Several shapes and eps in float64 and float32, and a float32 batch with |mean|/std ~ 1e3 (last)."""
    rng = generator(seed)
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


def bad_forward_inputs(d=4):
    """{what: args} that ``batchnorm_forward`` must refuse with a ValueError."""
    g, b = np.ones(d), np.zeros(d)
    return {
        "a 1-D x": (np.ones(d), g, b),
        "a 3-D x": (np.ones((2, d, 3)), g, b),
        "gamma of the wrong length": (np.ones((5, d)), np.ones(d + 1), b),
        "beta of the wrong length": (np.ones((5, d)), g, np.zeros(d - 1)),
        "a batch of one sample (N == 1) in training mode": (np.ones((1, d)), g, b),
    }


def inference_cases(seed=3):
    rng = generator(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for shape, eps in zip([(9, 6), (50, 17), (1, 4)], (1e-5, 1e-3, 0.2)):
            x = random_matrix(rng, shape, dtype)
            d = shape[1]
            params = [rng.uniform(0.5, 2, d), rng.normal(size=d), rng.normal(size=d), rng.uniform(0.2, 4, d)]
            cases.append(Case((x, *(p.astype(dtype) for p in params), eps),
                              f"x {shape} {np.dtype(dtype).name}, eps={eps}"))
    return cases


def running_cases(seed=4):
    rng = generator(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for shape, momentum in zip([(2, 3), (16, 5), (100, 12)], (0.1, 0.5, 0.01)):
            x = random_matrix(rng, shape, dtype)
            rm = rng.normal(size=shape[1]).astype(dtype)
            rv = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
            cases.append(Case((rm, rv, x, momentum), f"x {shape} {np.dtype(dtype).name}, momentum={momentum}"))
    return cases


def layer_runs(seed=5, steps=4):
    """[(n, d, momentum, gamma, beta, [(mode, x)])]: the lockstep runs of ``BatchNorm1d`` against torch."""
    rng = generator(seed)
    runs = []
    for n, d, momentum in [(8, 3, 0.1), (33, 10, 0.3)]:
        gamma, beta = rng.uniform(0.5, 2, d), rng.normal(size=d)
        schedule = ["train"] * steps + ["eval"] * 2 + ["train"] * 2
        runs.append((n, d, momentum, gamma, beta, [(mode, random_matrix(rng, (n, d), np.float64))
                                                   for mode in schedule]))
    return runs


KERAS_MOMENTA = (0.99, 0.9, 0.5, 0.0, 0.999)


def batchnorm_forward(p):
    """out of every forward case (inputs watched on the first three)."""
    fn = p.student("batchnorm_forward")
    cases = forward_cases()
    each(p, "case", fn, cases[:3], keep=first, after=True)
    for index, case in enumerate(cases[3:], start=3):
        p.call(f"case{index}", fn, *case.args, keep=first)


def forward_rejects_bad_input(p):
    fn = p.student("batchnorm_forward")
    for what, args in bad_forward_inputs().items():
        p.call(f"bad {what}", fn, *args, keep=lambda r: None)


def batchnorm_inference(p):
    each(p, "case", p.student("batchnorm_inference"), inference_cases(), after=True)


def update_running_stats(p):
    each(p, "case", p.student("update_running_stats"), running_cases(), after=True)


def build_layer(p, key, cls, d, momentum, gamma, beta):
    """The student's layer ``cls(d, momentum=momentum)`` with gamma and beta set (recorded as ``key``), or None."""
    layer = p.call(key, cls, d, momentum=momentum, keep=lambda r: None)
    if layer is not None:
        try:
            layer.gamma, layer.beta = gamma.copy(), beta.copy()
        except Exception:  # the steps' records show what such a layer does
            pass
    return layer


def batchnorm1d(p):
    """Each run: build the layer, set gamma and beta, step through the modes; record outputs and buffers."""
    cls = p.student("BatchNorm1d")
    for run, (n, d, momentum, gamma, beta, steps) in enumerate(layer_runs()):
        layer = build_layer(p, f"{run}.init", cls, d, momentum, gamma, beta)
        if layer is None:
            continue
        for step, (mode, x) in enumerate(steps):
            p.call(f"{run}.{step}.mode", getattr(layer, mode, None), keep=lambda r: None)
            p.call(f"{run}.{step}.out", getattr(layer, "forward", None), x)
            p.read(f"{run}.{step}.running_mean", layer, "running_mean")
            p.read(f"{run}.{step}.running_var", layer, "running_var")


def keras_momentum_to_torch(p):
    fn = p.student("keras_momentum_to_torch")
    for value in KERAS_MOMENTA:
        p.call(f"m{value}", fn, value)
