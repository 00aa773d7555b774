"""The reference layer norm and group norm against PyTorch (forward and autograd)."""
import numpy as np
import pytest
import torch

import bnref
from bncapture.ch08 import scaled

DTYPES = [(np.float64, 1e-10), (np.float32, 5e-5)]
LN_SHAPES = [(4, 5), (1, 7), (16, 64), (3, 1)]
GN_CASES = [((2, 6, 3, 4), 1), ((2, 6, 3, 4), 2), ((2, 6, 3, 4), 3), ((2, 6, 3, 4), 6), ((1, 8, 5, 5), 4),
            ((3, 4, 1, 1), 2)]


def random_rows(rng, shape, dtype):
    """An (N, D) batch; each sample has its own mean (spread ~3) and scale (0.5..3)."""
    n, d = shape
    return (rng.normal(0, 3, (n, 1)) + rng.uniform(0.5, 3, (n, 1)) * rng.standard_normal(shape)).astype(dtype)


def random_images(rng, shape, dtype):
    """An (N, C, H, W) batch; each channel has its own mean and scale (chapter 8's public case builder)."""
    return scaled(rng, shape, dtype, (1,))


def params(rng, c, dtype):
    return rng.uniform(0.5, 2, c).astype(dtype), rng.normal(size=c).astype(dtype)


def torch_grads(f, x, gamma, beta, dout):
    """out, dx, dgamma, dbeta of ``f(x, gamma, beta)`` by torch autograd."""
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    out = f(xt, gt, bt)
    out.backward(torch.from_numpy(dout))
    return out.detach().numpy(), xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()


def assert_matches(ours, theirs, tol, dtype):
    """Compare (out, dx, dgamma, dbeta); sums of many terms get an absolute tolerance scaled by their size."""
    for name, got, want in zip(("out", "dx", "dgamma", "dbeta"), ours, theirs):
        assert got.dtype == dtype and got.shape == want.shape, name
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=name)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
@pytest.mark.parametrize("shape", LN_SHAPES)
def test_layernorm_forward_and_backward_match_torch_autograd(shape, eps, dtype, tol):
    rng = np.random.default_rng(0)
    x = random_rows(rng, shape, dtype)
    gamma, beta = params(rng, shape[1], dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    out, cache = bnref.layernorm_forward(x, gamma, beta, eps=eps)
    ours = (out, *bnref.layernorm_backward(dout, cache))
    theirs = torch_grads(lambda a, g, b: torch.nn.functional.layer_norm(a, (shape[1],), g, b, eps=eps),
                         x, gamma, beta, dout)
    assert_matches(ours, theirs, tol, dtype)


def test_layernorm_normalizes_each_sample_on_its_own():
    rng = np.random.default_rng(1)
    x = random_rows(rng, (6, 50), np.float64)
    out, _ = bnref.layernorm_forward(x, np.ones(50), np.zeros(50), eps=0.0)
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=1), 1, rtol=1e-12)
    one, _ = bnref.layernorm_forward(x[2:3], np.ones(50), np.zeros(50), eps=0.0)  # N = 1: no batch needed
    np.testing.assert_array_equal(one, out[2:3])
    d1, cache = bnref.layernorm_forward(x[:, :1], np.full(1, 2.0), np.full(1, 0.5))  # D = 1: out = beta
    np.testing.assert_array_equal(d1, 0.5)
    np.testing.assert_array_equal(bnref.layernorm_backward(np.ones((6, 1)), cache)[0], 0)


def test_statistics_over_the_batch_axis_are_not_layer_norm():
    """A BN-style implementation (statistics per feature over N) fails the comparison with torch."""
    rng = np.random.default_rng(2)
    x = random_rows(rng, (8, 5), np.float64)
    wrong = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-5)
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x), (5,)).numpy()
    assert np.abs(wrong - expected).max() > 0.1
    np.testing.assert_allclose(bnref.layernorm_forward(x, np.ones(5), np.zeros(5))[0], expected, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_layernorm_over_c_h_w_is_ours_on_flattened_samples(dtype, tol):
    """``nn.LayerNorm((C, H, W))`` normalizes each sample over its last 3 dims, with one gamma per element."""
    rng = np.random.default_rng(3)
    n, c, h, w = shape = (3, 4, 5, 2)
    x = random_images(rng, shape, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    ln = torch.nn.LayerNorm((c, h, w), eps=1e-3, dtype=torch.from_numpy(x).dtype)
    assert tuple(ln.weight.shape) == (c, h, w)  # C * H * W parameters, not C
    with torch.no_grad():
        ln.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, (c, h, w)).astype(dtype)))
        ln.bias.copy_(torch.from_numpy(rng.normal(size=(c, h, w)).astype(dtype)))
    gamma, beta = ln.weight.detach().numpy().reshape(-1), ln.bias.detach().numpy().reshape(-1)
    theirs = torch_grads(lambda a, g, b: torch.nn.functional.layer_norm(a, (c, h, w), g, b, eps=1e-3),
                         x, ln.weight.detach().numpy(), ln.bias.detach().numpy(), dout)
    out, cache = bnref.layernorm_forward(x.reshape(n, -1), gamma, beta, eps=1e-3)
    ours = (out, *bnref.layernorm_backward(dout.reshape(n, -1), cache))
    assert_matches([a.reshape(b.shape) for a, b in zip(ours, theirs)], theirs, tol, dtype)
    np.testing.assert_allclose(ln(torch.from_numpy(x)).detach().numpy(), theirs[0], rtol=tol, atol=tol)
    # normalized_shape = (W,) normalizes each row of W values instead: LN of x.reshape(-1, W)
    last = torch.nn.functional.layer_norm(torch.from_numpy(x), (w,), eps=1e-3).numpy()
    rows, _ = bnref.layernorm_forward(x.reshape(-1, w), np.ones(w, dtype), np.zeros(w, dtype), eps=1e-3)
    np.testing.assert_allclose(rows.reshape(shape), last, rtol=tol, atol=tol)
    assert np.abs(last - torch.nn.functional.layer_norm(torch.from_numpy(x), (c, h, w), eps=1e-3).numpy()).max() > 0.1


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape,groups", GN_CASES)
def test_groupnorm_forward_and_backward_match_torch_autograd(shape, groups, dtype, tol):
    rng = np.random.default_rng(4)
    x = random_images(rng, shape, dtype)
    gamma, beta = params(rng, shape[1], dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    out, cache = bnref.groupnorm_forward(x, gamma, beta, groups, eps=1e-3)
    ours = (out, *bnref.groupnorm_backward(dout, cache))
    theirs = torch_grads(lambda a, g, b: torch.nn.functional.group_norm(a, groups, g, b, eps=1e-3),
                         x, gamma, beta, dout)
    assert_matches(ours, theirs, tol, dtype)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_groupnorm_with_one_group_per_channel_is_instance_norm(dtype, tol):
    rng = np.random.default_rng(5)
    shape = (3, 5, 4, 6)
    x = random_images(rng, shape, dtype)
    gamma, beta = params(rng, 5, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    inorm = torch.nn.InstanceNorm2d(5, eps=1e-3, affine=True, dtype=torch.from_numpy(x).dtype)
    with torch.no_grad():
        inorm.weight.copy_(torch.from_numpy(gamma))
        inorm.bias.copy_(torch.from_numpy(beta))
    xt = torch.tensor(x, requires_grad=True)
    out_t = inorm(xt)
    out_t.backward(torch.from_numpy(dout))
    theirs = (out_t.detach().numpy(), xt.grad.numpy(), inorm.weight.grad.numpy(), inorm.bias.grad.numpy())
    out, cache = bnref.groupnorm_forward(x, gamma, beta, groups=5, eps=1e-3)
    assert_matches((out, *bnref.groupnorm_backward(dout, cache)), theirs, tol, dtype)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_groupnorm_with_one_group_is_layer_norm_over_c_h_w(dtype, tol):
    rng = np.random.default_rng(6)
    n, c, h, w = shape = (4, 3, 5, 5)
    x = random_images(rng, shape, dtype)
    gamma, beta = params(rng, c, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    # the per-channel gamma and beta, expanded to layer norm's per-element (C, H, W) parameters
    expand = lambda p: np.ascontiguousarray(np.broadcast_to(p[:, None, None], (c, h, w)))  # noqa: E731
    out_t, dx_t, dg_t, db_t = torch_grads(lambda a, g, b: torch.nn.functional.layer_norm(a, (c, h, w), g, b),
                                          x, expand(gamma), expand(beta), dout)
    out, cache = bnref.groupnorm_forward(x, gamma, beta, groups=1)
    assert_matches((out, *bnref.groupnorm_backward(dout, cache)),
                   (out_t, dx_t, dg_t.sum(axis=(1, 2)), db_t.sum(axis=(1, 2))), tol, dtype)


def test_groupnorm_groups_are_consecutive_channels():
    """Group g holds channels g * C/G .. (g + 1) * C/G - 1: each is normalized over its own values."""
    rng = np.random.default_rng(7)
    x = random_images(rng, (2, 6, 3, 3), np.float64)
    out, _ = bnref.groupnorm_forward(x, np.ones(6), np.zeros(6), groups=3, eps=0.0)
    grouped = out.reshape(2, 3, 2 * 3 * 3)
    np.testing.assert_allclose(grouped.mean(axis=2), 0, atol=1e-12)
    np.testing.assert_allclose(grouped.var(axis=2), 1, rtol=1e-12)
    assert np.abs(out.mean(axis=(2, 3))).max() > 0.1  # one channel alone is not normalized


@pytest.mark.parametrize("groups", [4, 5, 12])
def test_groupnorm_refuses_groups_that_do_not_divide_c(groups):
    with pytest.raises(ValueError, match=rf"C = 6 channels cannot be split into groups = {groups} equal groups"):
        bnref.groupnorm_forward(np.ones((2, 6, 3, 3)), np.ones(6), np.zeros(6), groups)


@pytest.mark.parametrize("groups", [0, -2, 2.0, True, "2", None])
def test_groupnorm_refuses_groups_that_are_not_positive_ints(groups):
    with pytest.raises(ValueError, match="groups must be a positive int"):
        bnref.groupnorm_forward(np.ones((2, 6, 3, 3)), np.ones(6), np.zeros(6), groups)


def _ln_cache():
    return bnref.layernorm_forward(np.arange(12.0).reshape(4, 3), np.ones(3), np.zeros(3))[1]


def _gn_cache():
    return bnref.groupnorm_forward(np.arange(48.0).reshape(2, 6, 2, 2), np.ones(6), np.zeros(6), 2)[1]


@pytest.mark.parametrize("call,match", [
    (lambda: bnref.layernorm_forward(np.ones(3), np.ones(3), np.zeros(3)), r"\(N, D\)"),
    (lambda: bnref.layernorm_forward(np.ones((2, 3, 4)), np.ones(4), np.zeros(4)), r"\(N, D\)"),
    (lambda: bnref.layernorm_forward(np.ones((4, 3)), np.ones(4), np.zeros(3)),
     r"gamma must have shape \(D,\) = \(3,\)"),
    (lambda: bnref.layernorm_forward(np.ones((4, 3)), np.ones(3), np.zeros((1, 3))), r"beta must have shape \(D,\)"),
    (lambda: bnref.layernorm_backward(np.ones((4, 2)), _ln_cache()), r"dout must have the shape .* \(4, 3\)"),
    (lambda: bnref.groupnorm_forward(np.ones((4, 6)), np.ones(6), np.zeros(6), 2), r"\(N, C, H, W\)"),
    (lambda: bnref.groupnorm_forward(np.ones((2, 6, 3, 3)), np.ones(3), np.zeros(6), 3),
     r"gamma must have shape \(C,\) = \(6,\)"),
    (lambda: bnref.groupnorm_forward(np.ones((2, 6, 3, 3)), np.ones(6), np.zeros(2), 2),
     r"beta must have shape \(C,\)"),
    (lambda: bnref.groupnorm_backward(np.ones((2, 6, 2)), _gn_cache()), r"\(N, C, H, W\)"),
    (lambda: bnref.groupnorm_backward(np.ones((2, 6, 2, 3)), _gn_cache()),
     r"dout must have the shape of x.*\(2, 6, 2, 2\)"),
])
def test_bad_input_raises_value_error_naming_the_shape(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_float32_far_from_zero_stays_accurate():
    """|mean| / std = 1e3 in float32: out and dx within 1e-4 of float64 on the same input."""
    rng = np.random.default_rng(8)
    cases = [
        (lambda a, g, b: bnref.layernorm_forward(a, g, b), bnref.layernorm_backward, (16, 1024), 1024),
        (lambda a, g, b: bnref.groupnorm_forward(a, g, b, groups=2), bnref.groupnorm_backward, (4, 8, 16, 16), 8),
    ]
    for forward, backward, shape, c in cases:
        x = (1e3 + rng.standard_normal(shape)).astype(np.float32)
        gamma, beta = params(rng, c, np.float32)
        dout = rng.standard_normal(shape).astype(np.float32)
        results = {}
        for dtype in (np.float32, np.float64):
            out, cache = forward(x.astype(dtype), gamma.astype(dtype), beta.astype(dtype))
            results[dtype] = (out, backward(dout.astype(dtype), cache)[0])
        for got, want in zip(results[np.float32], results[np.float64]):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the input defeats a one-pass E[x^2] - E[x]^2 in float32: the test can fail
    rows = x.reshape(4, -1)
    one_pass = (rows - rows.mean(1, keepdims=True)) / np.sqrt((rows * rows).mean(1, keepdims=True)
                                                              - rows.mean(1, keepdims=True) ** 2 + 1e-5)
    exact = bnref.groupnorm_forward(x.astype(np.float64), np.ones(8), np.zeros(8), groups=1)[0].reshape(4, -1)
    assert np.abs(one_pass - exact).max() > 1e-3
