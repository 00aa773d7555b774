"""The reference library against PyTorch, the ground truth."""
import numpy as np
import pytest
import torch

import bnref
from twins import lockstep, torch_twin

DTYPES = [(np.float64, torch.float64, 1e-10), (np.float32, torch.float32, 2e-5)]


def _params(rng, d, dtype):
    return rng.uniform(0.5, 2.0, d).astype(dtype), rng.normal(size=d).astype(dtype)


@pytest.mark.parametrize("dtype,tdtype,tol", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3), (64, 17), (1000, 5), (3, 300)])
def test_forward_matches_torch(shape, dtype, tdtype, tol):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype(dtype)
    gamma, beta = _params(rng, shape[1], dtype)
    out, cache = bnref.batchnorm_forward(x, gamma, beta, eps=1e-3)
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, torch.from_numpy(gamma),
                                              torch.from_numpy(beta), training=True, eps=1e-3).numpy()
    assert out.dtype == dtype
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
    np.testing.assert_allclose(cache.var, x.astype(np.float64).var(0), rtol=max(tol, 1e-6))


@pytest.mark.parametrize("dtype,tdtype,tol", DTYPES)
def test_layer_steps_in_lockstep_with_torch(dtype, tdtype, tol):
    """Train, eval, train again: outputs and running buffers (unbiased var, momentum) match."""
    rng = np.random.default_rng(1)
    d = 6
    ours = bnref.BatchNorm1d(d, momentum=0.2, dtype=dtype)
    theirs = torch_twin(ours, torch.nn.BatchNorm1d, rng)
    schedule = ["train"] * 4 + ["eval"] * 2 + ["train", "eval"]
    lockstep(ours, theirs, schedule, [rng.normal(1.0, 2.0, (10, d)).astype(dtype) for _ in schedule], tol)


def test_update_running_stats_uses_unbiased_variance_and_torch_momentum():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 3))
    mean, var = bnref.update_running_stats(np.zeros(3), np.ones(3), x, momentum=0.25)
    np.testing.assert_allclose(mean, 0.25 * x.mean(0))
    np.testing.assert_allclose(var, 0.75 + 0.25 * x.var(0, ddof=1))


def test_inference_matches_torch_for_a_single_sample():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 4))
    gamma, beta = _params(rng, 4, np.float64)
    rm, rv = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    out = bnref.batchnorm_inference(x, gamma, beta, rm, rv, eps=1e-3)
    expected = torch.nn.functional.batch_norm(*(torch.from_numpy(a) for a in (x, rm, rv, gamma, beta)),
                                              training=False, eps=1e-3).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_float32_variance_is_accurate_far_from_zero(offset):
    """|mean|/std = 1e4 in float32: two passes keep the variance; E[x^2]-E[x]^2 would not."""
    rng = np.random.default_rng(4)
    x = (offset + rng.standard_normal((4096, 64))).astype(np.float32)
    exact = x.astype(np.float64).var(0)
    _, cache = bnref.batchnorm_forward(x, np.ones(64, np.float32), np.zeros(64, np.float32))
    assert np.max(np.abs(cache.var / exact - 1)) < 1e-3
    one_pass = (x * x).mean(0) - x.mean(0) ** 2
    assert np.max(np.abs(one_pass / exact - 1)) > 1e-2, "the test input must defeat the one-pass formula"


@pytest.mark.parametrize("call,match", [
    (lambda: bnref.batchnorm_forward(np.ones(3), np.ones(3), np.zeros(3)), r"\(N, D\)"),
    (lambda: bnref.batchnorm_forward(np.ones((2, 3, 4)), np.ones(3), np.zeros(3)), r"\(N, D\)"),
    (lambda: bnref.batchnorm_forward(np.ones((4, 3)), np.ones(2), np.zeros(3)), r"gamma must have shape \(D,\) = \(3,\)"),
    (lambda: bnref.batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(4)), r"beta must have shape"),
    (lambda: bnref.batchnorm_forward(np.ones((1, 3)), np.ones(3), np.zeros(3)), r"N >= 2"),
    (lambda: bnref.BatchNorm1d(3).forward(np.ones((1, 3))), r"N >= 2"),
    (lambda: bnref.batchnorm_inference(np.ones((2, 3)), np.ones(3), np.zeros(3), np.zeros(2), np.ones(3)),
     r"running_mean must have shape"),
    (lambda: bnref.update_running_stats(np.zeros(3), np.ones(3), np.ones((4, 3)), momentum=0.99 * 2), r"momentum"),
])
def test_bad_input_raises_value_error_naming_the_shape(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_eval_mode_accepts_one_sample_and_leaves_buffers_alone():
    layer = bnref.BatchNorm1d(3).eval()
    layer.forward(np.ones((1, 3)))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3))
    np.testing.assert_array_equal(layer.running_var, np.ones(3))


def test_digits_loader_is_offline_and_split():
    x_train, y_train, x_test, y_test = bnref.data.load_digits(test_fraction=0.25)
    assert x_train.shape[1] == 64 and len(x_train) + len(x_test) == 1797
    assert abs(len(x_test) - 449) <= 1 and 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(np.unique(y_train)) == set(range(10))
