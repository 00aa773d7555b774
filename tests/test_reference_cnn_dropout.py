"""The reference spatial batch norm, BN folding and dropout against PyTorch and statistics."""
import numpy as np
import pytest
import torch

import bnref
from bncapture.ch06 import random_images
from bnref.spatial import nchw_to_rows, rows_to_nchw
from twins import lockstep, torch_twin

DTYPES = [(np.float64, torch.float64, 1e-10), (np.float32, torch.float32, 5e-5)]
SHAPES = [(2, 3, 4, 5), (8, 16, 7, 7), (1, 4, 3, 2), (5, 2, 1, 1)]


@pytest.mark.parametrize("dtype,tdtype,tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_spatial_forward_and_backward_match_torch_autograd(shape, dtype, tdtype, tol):
    rng = np.random.default_rng(0)
    c = shape[1]
    x = random_images(rng, shape, dtype)
    gamma, beta = rng.uniform(0.5, 2, c).astype(dtype), rng.normal(size=c).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    out, cache = bnref.spatial_batchnorm_forward(x, gamma, beta, eps=1e-3)
    dx, dgamma, dbeta = bnref.spatial_batchnorm_backward(dout, cache)

    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-3)
    yt.backward(torch.from_numpy(dout))
    assert out.dtype == dx.dtype == dtype and out.shape == dx.shape == shape
    assert dgamma.shape == dbeta.shape == (c,)
    scale = max(1.0, float(np.abs(dx).max()))
    np.testing.assert_allclose(out, yt.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=tol, atol=tol * np.prod(shape))
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=tol, atol=tol * np.prod(shape))


def test_spatial_statistics_are_per_channel_over_n_h_w():
    rng = np.random.default_rng(1)
    x = random_images(rng, (6, 5, 4, 3), np.float64)
    out, _ = bnref.spatial_batchnorm_forward(x, np.ones(5), np.zeros(5))
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), 1, atol=1e-4)
    # one pixel alone is not normalized: its statistics over N are not 0 and 1
    assert np.abs(out.mean(axis=0)).max() > 0.1


def test_rows_layout_round_trips_and_keeps_channels_in_columns():
    x = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    rows = nchw_to_rows(x)
    assert rows.shape == (40, 3)
    for c in range(3):
        assert sorted(rows[:, c]) == sorted(x[:, c].ravel())
    np.testing.assert_array_equal(rows_to_nchw(rows, x.shape), x)
    naive = x.reshape(-1, 3)  # the classic bug: columns mix channels
    assert not np.array_equal(np.sort(naive[:, 0]), np.sort(x[:, 0].ravel()))


def test_spatial_rejects_bad_shapes():
    g, b = np.ones(3), np.zeros(3)
    for bad_x, bad_g in [(np.ones((4, 3)), g), (np.ones((4, 3, 5)), g), (np.ones((2, 3, 4, 4)), np.ones(4))]:
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)|\(C,\)"):
            bnref.spatial_batchnorm_forward(bad_x, bad_g, b)
    with pytest.raises(ValueError, match="N >= 2"):
        bnref.spatial_batchnorm_forward(np.ones((1, 3, 1, 1)), g, b)


@pytest.mark.parametrize("dtype,tdtype,tol", DTYPES)
def test_batchnorm2d_steps_in_lockstep_with_torch_forward_and_backward(dtype, tdtype, tol):
    rng = np.random.default_rng(2)
    ours = bnref.BatchNorm2d(4, momentum=0.3, dtype=dtype)
    theirs = torch_twin(ours, torch.nn.BatchNorm2d, rng)
    schedule = ["train"] * 4 + ["eval"] * 2 + ["train", "eval"]
    lockstep(ours, theirs, schedule, [random_images(rng, (3, 4, 5, 4), dtype) for _ in schedule], tol, dout_rng=rng)


def test_spatial_inference_matches_torch_eval():
    rng = np.random.default_rng(3)
    x = random_images(rng, (2, 3, 4, 4), np.float64)
    params = [rng.uniform(0.5, 2, 3), rng.normal(size=3), rng.normal(size=3), rng.uniform(0.5, 2, 3)]
    out = bnref.spatial_batchnorm_inference(x, *params, eps=1e-3)
    g, b, rm, rv = (torch.from_numpy(p) for p in params)
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x), rm, rv, g, b, training=False, eps=1e-3)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-12, atol=1e-12)


def test_nchw_and_nhwc_agree_after_a_transpose():
    """TF's axis=-1 on channels-last data is PyTorch's dim 1 on channels-first data."""
    rng = np.random.default_rng(4)
    x = random_images(rng, (4, 3, 5, 6), np.float64)
    nhwc = x.transpose(0, 2, 3, 1)
    mean, var = nhwc.mean(axis=(0, 1, 2)), nhwc.var(axis=(0, 1, 2))  # tf.nn.moments(x, axes=[0, 1, 2])
    tf_style = (nhwc - mean) / np.sqrt(var + 1e-3)
    torch_style = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True, eps=1e-3).numpy()
    np.testing.assert_allclose(tf_style.transpose(0, 3, 1, 2), torch_style, rtol=1e-10, atol=1e-12)
    ours, _ = bnref.spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), eps=1e-3)
    np.testing.assert_allclose(ours, torch_style, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tdtype,tol", DTYPES)
def test_folded_conv_equals_conv_then_eval_batchnorm(bias, dtype, tdtype, tol):
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=bias, dtype=tdtype)
    bn = torch.nn.BatchNorm2d(6, eps=1e-3, dtype=tdtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_(0, 2)
        bn.running_var.uniform_(0.05, 3.0)
    bn.eval()
    x = torch.randn(4, 3, 8, 8, dtype=tdtype)
    with torch.no_grad():
        expected = bn(conv(x))
    as_np = lambda t: None if t is None else t.detach().numpy()  # noqa: E731
    w, b = bnref.fold_batchnorm(as_np(conv.weight), as_np(conv.bias), as_np(bn.weight), as_np(bn.bias),
                                as_np(bn.running_mean), as_np(bn.running_var), eps=bn.eps)
    assert w.dtype == b.dtype == dtype
    folded = torch.nn.functional.conv2d(x, torch.from_numpy(w), torch.from_numpy(b), padding=1)
    np.testing.assert_allclose(folded.numpy(), expected.numpy(), rtol=10 * tol, atol=10 * tol)


def test_fold_works_for_a_linear_layer():
    torch.manual_seed(6)
    lin = torch.nn.Linear(5, 4, dtype=torch.float64)
    bn = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(7, 5, dtype=torch.float64)
    params = [t.detach().numpy() for t in (lin.weight, lin.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    w, b = bnref.fold_batchnorm(*params)
    np.testing.assert_allclose(x.numpy() @ w.T + b, bn(lin(x)).detach().numpy(), rtol=1e-12, atol=1e-12)


# Dropout

def _bound(p, n, sigmas=6.0):
    return sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_inverted_dropout_mask_values_and_rate(p):
    rng = np.random.default_rng(7)
    x = rng.uniform(0.5, 2.0, (300, 200))
    out, cache = bnref.dropout_forward(x, p, True, rng)
    kept = cache.mask
    assert kept.dtype == bool and kept.shape == x.shape
    np.testing.assert_allclose(out[kept], x[kept] / (1 - p))
    assert np.all(out[~kept] == 0)
    assert abs((1 - kept.mean()) - p) < _bound(p, x.size)


def test_classic_dropout_scales_at_test_time_and_inverted_does_not():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 40))
    out, cache = bnref.dropout_forward(x, 0.3, True, rng, mode="classic")
    np.testing.assert_array_equal(out, x * cache.mask)
    np.testing.assert_allclose(bnref.dropout_forward(x, 0.3, False, rng, mode="classic")[0], 0.7 * x)
    np.testing.assert_array_equal(bnref.dropout_forward(x, 0.3, False, rng)[0], x)


@pytest.mark.parametrize("mode", ["inverted", "classic"])
def test_expectation_is_preserved_monte_carlo(mode):
    """Averaged over many masks, training-mode outputs equal the eval-mode output."""
    rng = np.random.default_rng(9)
    x = rng.uniform(-2, 2, 8)
    p, k = 0.4, 20000
    samples = np.stack([bnref.dropout_forward(x, p, True, rng, mode=mode)[0] for _ in range(k)])
    expected = bnref.dropout_forward(x, p, False, rng, mode=mode)[0]
    sem = samples.std(axis=0) / np.sqrt(k)
    assert np.all(np.abs(samples.mean(axis=0) - expected) < 5 * sem + 1e-12)


@pytest.mark.parametrize("mode", ["inverted", "classic"])
def test_backward_reuses_the_mask_and_matches_the_numerical_gradient(mode):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(6, 5))
    dout = rng.normal(size=(6, 5))
    out, cache = bnref.dropout_forward(x, 0.5, True, np.random.default_rng(11), mode=mode)
    dx = bnref.dropout_backward(dout, cache)
    np.testing.assert_array_equal(dx == 0, out == 0)
    h = 1e-6
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):  # the same seed gives the same mask at every evaluation
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fp = bnref.dropout_forward(xp, 0.5, True, np.random.default_rng(11), mode=mode)[0]
        fm = bnref.dropout_forward(xm, 0.5, True, np.random.default_rng(11), mode=mode)[0]
        numeric[i] = np.sum((fp - fm) * dout) / (2 * h)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)


def test_backward_matches_torch_autograd_through_the_same_mask():
    """torch draws its own mask; read it off its output and run ours with that mask."""
    torch.manual_seed(12)
    x = torch.rand(40, 30, dtype=torch.float64) + 0.5
    x.requires_grad_(True)
    y = torch.nn.functional.dropout(x, p=0.3, training=True)
    dout = torch.randn_like(y)
    y.backward(dout)
    mask = (y != 0).detach().numpy()
    cache = bnref.dropout.DropoutCache(mask, 1 / 0.7)
    np.testing.assert_allclose(bnref.dropout_backward(dout.numpy(), cache), x.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(y.detach().numpy(), x.detach().numpy() * mask / 0.7, rtol=1e-12)


def test_dropout_keeps_dtype_and_refuses_bad_arguments():
    x = np.ones((3, 4), np.float32)
    out, cache = bnref.dropout_forward(x, 0.25, True, np.random.default_rng(0))
    assert out.dtype == np.float32 and bnref.dropout_backward(out, cache).dtype == np.float32
    assert np.all(bnref.dropout_forward(x, 1.0, True, np.random.default_rng(0))[0] == 0)
    with pytest.raises(ValueError, match="drop probability"):
        bnref.dropout_forward(x, 1.5, True, np.random.default_rng(0))
    with pytest.raises(ValueError, match="mode"):
        bnref.dropout_forward(x, 0.5, True, np.random.default_rng(0), mode="keep")


def test_progress_bars_are_quiet_unless_asked(monkeypatch, capsys):
    monkeypatch.setenv("BNREF_PROGRESS", "0")
    assert list(bnref.progress(range(3), desc="quiet")) == [0, 1, 2]
    monkeypatch.setenv("BNREF_PROGRESS", "1")
    list(bnref.progress(range(3), desc="loud"))
    assert "loud" in capsys.readouterr().err
    monkeypatch.delenv("BNREF_PROGRESS")
    assert bnref.progress(range(3)).disable  # pytest's stderr is not a terminal


def _exercise_dropout():
    """The exercise's solved dropout_forward and dropout_backward, run from the solution source."""
    from submissions import solution_cells

    cells = solution_cells("ch07_dropout")
    namespace = {"np": np}
    exec(cells["dropout_forward"] + "\n" + cells["dropout_backward"], namespace)
    return namespace["dropout_forward"], namespace["dropout_backward"]


@pytest.mark.parametrize("mode", ["inverted", "classic"])
def test_p_equal_to_one_agrees_in_bnref_the_exercise_and_torch(mode):
    """p = 1 drops every unit: zeros in training mode, and a zero gradient; eval mode follows the convention."""
    x = np.random.default_rng(3).normal(size=(6, 5))
    dout = np.ones_like(x)
    torch_train = torch.nn.functional.dropout(torch.from_numpy(x), p=1.0, training=True).numpy()
    torch_eval = torch.nn.functional.dropout(torch.from_numpy(x), p=1.0, training=False).numpy()
    assert np.all(torch_train == 0) and np.array_equal(torch_eval, x)
    for forward, backward in [(bnref.dropout_forward, bnref.dropout_backward), _exercise_dropout()]:
        with np.errstate(all="raise"):  # no division by 1 - p = 0 anywhere
            out, cache = forward(x, 1.0, True, np.random.default_rng(0), mode)
            np.testing.assert_array_equal(out, torch_train)
            np.testing.assert_array_equal(backward(dout, cache), np.zeros_like(x))
            out, cache = forward(x, 1.0, False, np.random.default_rng(0), mode)
            np.testing.assert_array_equal(out, torch_eval if mode == "inverted" else np.zeros_like(x))
            np.testing.assert_array_equal(backward(dout, cache), dout if mode == "inverted" else np.zeros_like(x))
        with pytest.raises(ValueError, match="drop probability"):
            forward(x, 1.5, True, np.random.default_rng(0), mode)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_keeps_a_float32_weight_float32_with_float64_bn_parameters(bias):
    rng = np.random.default_rng(8)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    conv_bias = rng.normal(size=4).astype(np.float32) if bias else None
    params = rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4)   # float64
    w, b = bnref.fold_batchnorm(weight, conv_bias, *params)
    assert (w.dtype, b.dtype) == (np.float32, np.float32)
    bias64 = None if conv_bias is None else conv_bias.astype(np.float64)
    w64, b64 = bnref.fold_batchnorm(weight.astype(np.float64), bias64, *params)
    np.testing.assert_allclose(w, w64, rtol=1e-6)
    np.testing.assert_allclose(b, b64, rtol=1e-6, atol=1e-6)
