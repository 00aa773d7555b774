"""The reference backward passes and gradient-check helpers against torch.autograd, the ground truth."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnref
from twins import lockstep, torch_twin

DTYPES = [(np.float64, 1e-10), (np.float32, 2e-4)]
SHAPES = [(2, 3), (16, 5), (257, 33), (4, 300)]
BACKWARDS = [bnref.batchnorm_backward, bnref.batchnorm_backward_alt]


def _batch(rng, shape, dtype):
    """x with spread-out feature means and scales, gamma, beta and a random upstream gradient."""
    n, d = shape
    x = rng.normal(0.0, 3.0, d) + rng.uniform(0.5, 3.0, d) * rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 2.0, d), rng.normal(size=d)
    dout = rng.standard_normal(shape)
    return tuple(a.astype(dtype) for a in (x, gamma, beta, dout))


def _torch_grads(x, gamma, beta, dout, eps, running=None):
    """(dx, dgamma, dbeta) of F.batch_norm by autograd; train mode unless ``running`` = (mean, var)."""
    xt, gt, bt = (torch.from_numpy(a).requires_grad_() for a in (x, gamma, beta))
    rm, rv = (torch.from_numpy(a) for a in running) if running else (None, None)
    out = F.batch_norm(xt, rm, rv, gt, bt, training=running is None, eps=eps)
    out.backward(torch.from_numpy(dout))
    return xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()


def _assert_grads_close(got, expected, tol, what=""):
    for name, g, e in zip(("dx", "dgamma", "dbeta"), got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, f"{what} {name}: {g.shape} {g.dtype}"
        np.testing.assert_allclose(g, e, rtol=tol, atol=tol * max(1.0, np.abs(e).max()), err_msg=f"{what} {name}")


@pytest.mark.parametrize("backward", BACKWARDS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_autograd(shape, dtype, tol, backward):
    x, gamma, beta, dout = _batch(np.random.default_rng(0), shape, dtype)
    _, cache = bnref.batchnorm_forward(x, gamma, beta, eps=1e-3)
    _assert_grads_close(backward(dout, cache), _torch_grads(x, gamma, beta, dout, 1e-3), tol)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_staged_and_closed_form_agree(shape):
    x, gamma, beta, dout = _batch(np.random.default_rng(1), shape, np.float64)
    _, cache = bnref.batchnorm_forward(x, gamma, beta)
    staged, closed = bnref.batchnorm_backward(dout, cache), bnref.batchnorm_backward_alt(dout, cache)
    scale = np.abs(dout).max() * max(1.0, np.max(gamma * cache.rstd), np.abs(x).max())  # dx can cancel to ~0
    for a, b in zip(staged, closed):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13 * scale)


@pytest.mark.parametrize("backward", BACKWARDS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.5])
def test_gradient_properties(backward, eps):
    """Shift invariance: dx sums to 0 per feature. Scale invariance of x_hat (exact when eps = 0):
    sum_i dx * x_hat = gamma * rstd * eps / (var + eps) * sum_i dout * x_hat per feature."""
    x, gamma, beta, dout = _batch(np.random.default_rng(2), (64, 7), np.float64)
    _, cache = bnref.batchnorm_forward(x, gamma, beta, eps=eps)
    dx, _, _ = backward(dout, cache)
    x_hat = (x - cache.mean) * cache.rstd
    scale = np.abs(dx).max() * len(x)
    np.testing.assert_allclose(dx.sum(axis=0), 0.0, atol=1e-13 * scale)
    eps_term = gamma * cache.rstd * eps / (cache.var + eps) * (dout * x_hat).sum(axis=0)
    np.testing.assert_allclose((dx * x_hat).sum(axis=0), eps_term, atol=1e-13 * scale)
    if eps == 0.5:
        assert np.abs(eps_term).max() > 1e-3, "with a large eps the second property holds only up to eps"


@pytest.mark.parametrize("backward", BACKWARDS, ids=lambda f: f.__name__)
def test_constant_upstream_gradient_gives_zero_dx(backward):
    """Why the checks use a random dout: a constant one makes sum(dout * out) independent of x,
    so dx = 0 for a correct backward, and also for one that drops the variance path."""
    x, gamma, beta, _ = _batch(np.random.default_rng(3), (32, 6), np.float64)
    _, cache = bnref.batchnorm_forward(x, gamma, beta)
    dout = np.ones_like(x) * np.arange(1.0, 7.0)  # constant over the batch, per feature
    dx, dgamma, dbeta = backward(dout, cache)
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)
    np.testing.assert_allclose(dgamma, 0.0, atol=1e-12)
    np.testing.assert_allclose(dbeta, 32 * np.arange(1.0, 7.0))
    no_variance_path = gamma * cache.rstd * (dout - dout.mean(axis=0))
    np.testing.assert_allclose(no_variance_path, 0.0, atol=1e-12)
    random_dout = np.random.default_rng(4).standard_normal(x.shape)
    assert np.abs(backward(random_dout, cache)[0]).max() > 0.1


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("shape", [(1, 4), (9, 6), (128, 20)], ids=str)
def test_inference_backward_matches_autograd(shape, dtype, tol):
    rng = np.random.default_rng(5)
    x, gamma, beta, dout = _batch(rng, shape, dtype)
    running = (rng.normal(size=shape[1]).astype(dtype), rng.uniform(0.2, 4.0, shape[1]).astype(dtype))
    got = bnref.batchnorm_inference_backward(dout, x, gamma, *running, eps=1e-3)
    _assert_grads_close(got, _torch_grads(x, gamma, beta, dout, 1e-3, running), tol)


def test_inference_backward_is_a_per_feature_scale():
    rng = np.random.default_rng(6)
    x, gamma, _, dout = _batch(rng, (10, 3), np.float64)
    rv = rng.uniform(0.5, 2.0, 3)
    dx, _, _ = bnref.batchnorm_inference_backward(dout, x, gamma, np.zeros(3), rv, eps=0.0)
    np.testing.assert_allclose(dx, dout * gamma / np.sqrt(rv))
    assert np.abs(dx.sum(axis=0)).max() > 1e-3, "no path through the statistics: dx need not sum to 0"


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["float64", "float32"])
def test_layer_backward_matches_torch_in_train_and_eval(dtype, tol):
    """Forward and backward in lockstep with torch.nn.BatchNorm1d, switching modes."""
    rng = np.random.default_rng(7)
    ours = bnref.BatchNorm1d(5, momentum=0.3, dtype=dtype)
    theirs = torch_twin(ours, torch.nn.BatchNorm1d, rng)
    schedule = ["train", "train", "eval", "train", "eval"]
    batches = [rng.normal(1.0, 2.0, (12, 5)).astype(dtype) for _ in schedule]
    lockstep(ours, theirs, schedule, batches, tol, dout_rng=rng)


def test_layer_backward_uses_the_mode_of_its_forward():
    layer = bnref.BatchNorm1d(3)
    x = np.random.default_rng(8).normal(size=(6, 3))
    layer.forward(x)
    layer.eval()  # switched after the forward: the backward still belongs to the training-mode forward
    dx = layer.backward(np.random.default_rng(9).normal(size=(6, 3)))
    np.testing.assert_allclose(dx.sum(axis=0), 0.0, atol=1e-12)
    with pytest.raises(RuntimeError, match="forward pass first"):
        bnref.BatchNorm1d(3).backward(np.ones((2, 3)))


@pytest.mark.parametrize("call", [
    lambda c: bnref.batchnorm_backward(np.ones((4, 2)), c),
    lambda c: bnref.batchnorm_backward_alt(np.ones((3, 3, 1)), c),
    lambda c: bnref.batchnorm_inference_backward(np.ones((4, 3)), np.ones((3, 3)), np.ones(3), np.zeros(3), np.ones(3)),
])
def test_upstream_gradient_of_the_wrong_shape_is_refused(call):
    _, cache = bnref.batchnorm_forward(np.arange(9.0).reshape(3, 3), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward's output, \(N, D\) = \(3, 3\)"):
        call(cache)


def test_numerical_gradient_of_a_known_function():
    rng = np.random.default_rng(10)
    x, w, df = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    before = x.copy()
    grad = bnref.eval_numerical_gradient(lambda z: w * z**3, x, df)
    assert bnref.rel_error(grad, 3 * w * x**2 * df) < 1e-8
    np.testing.assert_array_equal(x, before)


def test_numerical_gradient_of_a_coupled_function_and_of_float32_input():
    rng = np.random.default_rng(11)
    x, a = rng.normal(size=(5, 4)), rng.normal(size=(4, 3))
    df = rng.normal(size=(5, 3))
    grad = bnref.eval_numerical_gradient(lambda z: z @ a, x.astype(np.float32), df)
    assert grad.dtype == np.float64 and grad.shape == x.shape
    assert bnref.rel_error(grad, df @ a.T) < 1e-8


def test_central_difference_error_falls_like_h_squared():
    x, df = np.array([0.7, -1.2]), np.array([1.0, 0.5])
    exact = np.exp(x) * df
    errors = [np.abs(bnref.eval_numerical_gradient(np.exp, x, df, h=h) - exact).max() for h in (1e-2, 1e-3)]
    assert 50 < errors[0] / errors[1] < 200


def test_a_function_that_ignores_its_argument_gets_a_zero_gradient():
    x = np.ones((2, 2))
    grad = bnref.eval_numerical_gradient(lambda z: 2.0 * x, x, np.ones((2, 2)))
    np.testing.assert_array_equal(grad, 0.0)
    assert bnref.rel_error(grad, 2.0 * np.ones((2, 2))) == 1.0


@pytest.mark.parametrize("dtype,limit", [(np.float64, 1e-7), (np.float32, 1e-2)])
def test_gradient_check_of_the_reference_backward(dtype, limit):
    """Numerical gradients in float64 of the forward, against both backwards; float32 costs digits."""
    x, gamma, beta, dout = _batch(np.random.default_rng(12), (6, 4), dtype)
    _, cache = bnref.batchnorm_forward(x, gamma, beta)
    numeric = (
        bnref.eval_numerical_gradient(lambda z: bnref.batchnorm_forward(z, gamma, beta)[0], x, dout),
        bnref.eval_numerical_gradient(lambda g: bnref.batchnorm_forward(x, g, beta)[0], gamma, dout),
        bnref.eval_numerical_gradient(lambda b: bnref.batchnorm_forward(x, gamma, b)[0], beta, dout),
    )
    for backward in BACKWARDS:
        for name, analytic, num in zip(("dx", "dgamma", "dbeta"), backward(dout, cache), numeric):
            assert bnref.rel_error(analytic, num) < limit, (backward.__name__, name)


def test_rel_error():
    assert bnref.rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert bnref.rel_error(1.0, 1.1) == pytest.approx(0.1 / 2.1)
    assert bnref.rel_error([1.0, -2.0], [1.0, 2.0]) == 1.0
    assert bnref.rel_error([3.0, 1e-9], [3.0, 0.0]) == pytest.approx(0.1)
    a, b = np.random.default_rng(13).normal(size=(2, 10))
    assert bnref.rel_error(a, b) == bnref.rel_error(b, a)
