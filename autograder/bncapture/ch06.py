"""Probes of chapter 6, *BN for CNNs*: the inputs and the calls; the verdicts are the grader's.

The spatial backward is probed through the student's own ``spatial_batchnorm_forward``: its cache goes into
the student's backward here and never leaves.
"""
import numpy as np

from .cases import Case, each, first, generator
from .probe import part

# Shapes chosen so that every wrong layout differs from the right one (H * W > 1, C > 1).
SHAPES = [(2, 3, 4, 5), (6, 4, 3, 3), (3, 2, 5, 1), (16, 8, 4, 4)]


def random_images(rng, shape, dtype):
    """An (N, C, H, W) batch; each channel has its own mean (spread ~3) and scale (0.5..3)."""
    n, c, h, w = shape
    means = rng.normal(0.0, 3.0, size=(1, c, 1, 1))
    scales = rng.uniform(0.5, 3.0, size=(1, c, 1, 1))
    return (means + scales * rng.standard_normal(shape)).astype(dtype)


def spatial_cases(seed, with_dout=False):
    """Cases (x (N, C, H, W), gamma (C,), beta (C,), eps[, dout (N, C, H, W)]), float64 then float32."""
    rng = generator(seed)
    cases = []
    for dtype in (np.float64, np.float32):
        for shape, eps in zip(SHAPES, (1e-5, 1e-3, 0.1, 1e-5)):
            c = shape[1]
            args = (random_images(rng, shape, dtype), rng.uniform(0.5, 2.0, c).astype(dtype),
                    rng.normal(0.0, 1.0, c).astype(dtype), eps)
            if with_dout:
                args += (rng.standard_normal(shape).astype(dtype),)
            cases.append(Case(args, f"x {shape} {np.dtype(dtype).name}, eps={eps}"))
    return cases


FORWARD_SEED, BACKWARD_SEED, BACKWARD_DTYPE_SEED = 61, 62, 63


def bad_spatial_inputs():
    """{what: args} that ``spatial_batchnorm_forward`` must refuse with a ValueError."""
    x = np.ones((2, 3, 4, 4))
    x[0, :, 0, 0] = 2.0
    g, b = np.ones(3), np.zeros(3)
    return {
        "a 2-D x (N, D)": (np.ones((5, 3)), g, b),
        "a 3-D x (N, C, L)": (np.ones((4, 3, 5)), g, b),
        "gamma of the wrong length": (x, np.ones(4), b),
        "beta of the wrong length": (x, g, np.zeros(2)),
    }


def fold_cases(seed=64):
    """Cases (weight (C_out, ...), bias (C_out,) or None, gamma, beta, running_mean, running_var (C_out,), eps);
    the last is a float32 layer with float64 BN parameters (NumPy's default dtype)."""
    rng = generator(seed)
    # the first shapes let the wrong-axis mistakes broadcast (C_in == C_out, kW == C_out), so they can be named
    shapes = [((3, 3, 3, 3), True), ((6, 6, 1, 1), False), ((8, 2, 3, 8), True), ((7, 7), True), ((4, 9), False)]
    cases = []
    for dtype in (np.float64, np.float32):
        for (shape, has_bias), eps in zip(shapes, (1e-5, 1e-3, 0.1, 1e-2, 1e-5)):
            c = shape[0]
            weight = rng.normal(0.0, 0.5, shape).astype(dtype)
            bias = rng.normal(0.0, 1.0, c).astype(dtype) if has_bias else None
            gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(0.0, 1.0, c)
            mean, var = rng.normal(0.0, 2.0, c), rng.uniform(0.01, 3.0, c)
            params = tuple(p.astype(dtype) for p in (gamma, beta, mean, var))
            label = f"weight {shape} {np.dtype(dtype).name}, bias={'given' if has_bias else 'None'}, eps={eps}"
            cases.append(Case((weight, bias, *params, eps), label))
    weight, bias = rng.normal(0.0, 0.5, (5, 3, 3, 3)).astype(np.float32), rng.normal(0.0, 1.0, 5).astype(np.float32)
    params = (rng.uniform(0.5, 2.0, 5), rng.normal(0.0, 1.0, 5), rng.normal(0.0, 2.0, 5), rng.uniform(0.01, 3.0, 5))
    cases.append(Case((weight, bias, *params, 1e-5), "weight (5, 3, 3, 3) float32, bias given, gamma, beta, "
                                                     "running_mean, running_var float64, eps=1e-05"))
    return cases


def spatial_forward(p):
    """out of every forward case (inputs watched on the first two)."""
    fn = p.student("spatial_batchnorm_forward")
    for index, case in enumerate(spatial_cases(FORWARD_SEED)):
        p.call(f"case{index}", fn, *case.args, keep=first, after=index < 2)


def spatial_rejects_bad_input(p):
    fn = p.student("spatial_batchnorm_forward")
    for what, args in bad_spatial_inputs().items():
        p.call(f"bad {what}", fn, *args, keep=lambda r: None)


def spatial_backward(p):
    """Each backward case, and a float32 one (``dtype``): the student's forward, then its backward on that
    cache."""
    forward, backward = p.student("spatial_batchnorm_forward"), p.student("spatial_batchnorm_backward")
    cases = spatial_cases(BACKWARD_SEED, with_dout=True) + spatial_cases(BACKWARD_DTYPE_SEED, with_dout=True)[-1:]
    for index, case in enumerate(cases):
        x, gamma, beta, eps, dout = case.args
        key = "dtype" if index == len(cases) - 1 else f"case{index}"
        result = p.call(f"fwd {key}", forward, x, gamma, beta, eps, keep=lambda r: None)
        p.call(key, backward, dout, part(result, 1))


def fold_batchnorm(p):
    each(p, "case", p.student("fold_batchnorm"), fold_cases(), after=True)
