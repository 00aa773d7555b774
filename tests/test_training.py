"""Chapter 4's reference: the NumPy MLP against torch autograd, training with and without BN on the digits,
the train/eval pitfalls, recalibration, and the MNIST IDX loader (on small files the tests write)."""
import copy
import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from bnref import data as bndata
from bnref import mlp
from bnref.data import load_digits, load_mnist, read_idx


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """The matrices are tiny: one BLAS thread is several times faster on a shared machine."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _torch_loss(model, x, y):
    """The same network in torch (training-mode BN), its loss, and the leaf tensors of its parameters."""
    weights = [torch.tensor(w, requires_grad=True) for w in model.weights]
    biases = [None if b is None else torch.tensor(b, requires_grad=True) for b in model.biases]
    gammas = [torch.tensor(layer.gamma, requires_grad=True) for layer in model.bn_layers]
    betas = [torch.tensor(layer.beta, requires_grad=True) for layer in model.bn_layers]
    act = F.relu if model.act_forward is mlp.relu_forward else F.elu
    h = torch.tensor(x)
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w if b is None else h @ w + b
        if i < len(weights) - 1:
            if model.bn_layers:
                h = F.batch_norm(h, None, None, gammas[i], betas[i], training=True, eps=model.bn_layers[i].eps)
            h = act(h)
    loss = F.cross_entropy(h, torch.tensor(y))
    leaves = weights + [b for b in biases if b is not None] + [t for pair in zip(gammas, betas) for t in pair]
    return loss, leaves


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("act", ["relu", "elu"])
def test_mlp_gradients_match_torch_autograd(bn, act):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 7)), rng.integers(0, 4, 16)
    model = mlp.MLP((7, 9, 8, 4), bn=bn, act=act, seed=1)
    for layer in model.bn_layers:  # gamma and beta away from their initial 1 and 0
        layer.gamma, layer.beta = rng.uniform(0.5, 2.0, layer.gamma.shape), rng.normal(size=layer.beta.shape)
    for i, b in enumerate(model.biases):
        if b is not None:
            model.biases[i] = rng.normal(size=b.shape)
    loss, dscores = mlp.softmax_cross_entropy(model.forward(x), y)
    dx = model.backward(dscores)

    torch_loss, leaves = _torch_loss(model, x, y)
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), rel=1e-12)
    params = model.parameters()  # grads pairs each parameter, in this order, with its gradient
    assert len(model.grads) == len(params) and all(p is q for (p, _), q in zip(model.grads, params))
    for (_, grad), leaf in zip(model.grads, leaves):
        np.testing.assert_allclose(grad, leaf.grad.numpy(), rtol=1e-9, atol=1e-12)
    assert dx.shape == x.shape


def test_layer_functions_match_torch():
    rng = np.random.default_rng(1)
    x, dout = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    for forward, backward, torch_fn in ((mlp.relu_forward, mlp.relu_backward, F.relu),
                                        (mlp.elu_forward, mlp.elu_backward, F.elu)):
        out, cache = forward(x)
        xt = torch.tensor(x, requires_grad=True)
        yt = torch_fn(xt)
        yt.backward(torch.tensor(dout))
        np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(backward(dout, cache), xt.grad.numpy(), rtol=1e-12, atol=1e-15)

    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    out, cache = mlp.affine_forward(x, w, b)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    (xt @ wt + bt).backward(torch.tensor(dout[:, :3]))
    for ours, theirs in zip(mlp.affine_backward(dout[:, :3], cache), (xt, wt, bt)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-12)
    assert mlp.affine_backward(dout[:, :3], mlp.affine_forward(x, w)[1])[2] is None

    scores, y = 30.0 * rng.normal(size=(6, 4)), rng.integers(0, 4, 6)  # large scores: the shift matters
    loss, dscores = mlp.softmax_cross_entropy(scores, y)
    st = torch.tensor(scores, requires_grad=True)
    torch_loss = F.cross_entropy(st, torch.tensor(y))
    torch_loss.backward()
    assert np.isfinite(loss) and loss == pytest.approx(torch_loss.item(), rel=1e-12)
    np.testing.assert_allclose(dscores, st.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_mlp_input_gradient_matches_torch():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 6)), rng.integers(0, 3, 10)
    model = mlp.MLP((6, 8, 3), bn=True, act="elu", seed=3)
    dx = model.backward(mlp.softmax_cross_entropy(model.forward(x), y)[1])
    xt = torch.tensor(x, requires_grad=True)
    h = F.elu(F.batch_norm(xt @ torch.tensor(model.weights[0]), None, None, torch.ones(8, dtype=torch.float64),
                           torch.zeros(8, dtype=torch.float64), training=True))
    F.cross_entropy(h @ torch.tensor(model.weights[1]) + torch.tensor(model.biases[1]), torch.tensor(y)).backward()
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_deferred_bn_tracks_torch_only_when_the_update_ops_run():
    rng = np.random.default_rng(4)
    ours = mlp.DeferredBatchNorm1d(5, momentum=0.3)
    theirs = torch.nn.BatchNorm1d(5, momentum=0.3, dtype=torch.float64)
    for _ in range(4):
        x = rng.normal(2.0, 3.0, size=(12, 5))
        out = ours.forward(x)
        with torch.no_grad():
            expected = theirs(torch.tensor(x)).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
        assert ours.pending is not None
        before = ours.running_mean.copy()
        ours.forward(x)  # a second forward replaces the queued statistics; nothing is applied yet
        np.testing.assert_array_equal(ours.running_mean, before)
        ours.run_update()
        assert ours.pending is None
        np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-12)
    ours.eval()
    theirs.eval()
    x = rng.normal(size=(3, 5))
    with torch.no_grad():
        np.testing.assert_allclose(ours.forward(x), theirs(torch.tensor(x)).numpy(), rtol=1e-10, atol=1e-12)
    assert ours.pending is None, "eval mode queues nothing"


def test_bn_model_trains_above_90_percent_on_digits(digits):
    history = mlp.fit(mlp.MLP((64, 100, 100, 10), bn=True, seed=0), digits, epochs=3, lr=0.1, batch_size=64)
    assert history["test_acc"][-1] > 0.9
    assert len(history["step_loss"]) == 3 * (len(digits[0]) // 64)
    assert history["step_loss"][-1] < history["step_loss"][0] / 3


def test_bn_tolerates_a_learning_rate_that_breaks_the_plain_network(digits):
    acc = {bn: mlp.fit(mlp.MLP((64, 100, 100, 100, 10), bn=bn, seed=0), digits, 4, 1.0, 64)["test_acc"][-1]
           for bn in (False, True)}
    assert acc[True] > 0.9 > 0.5 > acc[False]


@pytest.fixture(scope="module")
def trained(digits):
    model = mlp.MLP((64, 100, 100, 10), bn=True, seed=0)
    mlp.fit(model, digits, 8, 0.1, 64)
    return model


def test_training_mode_evaluation_changes_the_accuracy(trained, digits):
    x_test, y_test = digits[2:]
    accuracy = mlp.evaluate(copy.deepcopy(trained), x_test, y_test)[1]
    assert accuracy > 0.95
    by_class = np.argsort(y_test, kind="stable")
    net = copy.deepcopy(trained).train()
    correct = sum(np.sum(net.forward(x_test[idx]).argmax(1) == y_test[idx])
                  for idx in np.array_split(by_class, len(y_test) // 32))
    assert correct / len(y_test) < accuracy - 0.3, "sorted batches in training mode should ruin the accuracy"
    # Eval mode does not depend on the batch: per-sample scores equal whole-set scores.
    net.eval()
    np.testing.assert_allclose(net.forward(x_test[:5]), net.forward(x_test)[:5], rtol=1e-12)


def test_running_statistics_never_updated_ruin_eval_mode(digits):
    x_train, y_train, x_test, y_test = digits
    model = mlp.MLP((64, 100, 100, 10), bn=True, seed=0)
    forgetful = copy.deepcopy(model)
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    for _ in range(5):
        mlp.train_epoch(model, x_train, y_train, 0.1, 64, rng_a)
        forgetful.train()  # the same loop without the update ops
        order = rng_b.permutation(len(x_train))
        for start in range(0, len(x_train) - 63, 64):
            batch = order[start:start + 64]
            forgetful.backward(mlp.softmax_cross_entropy(forgetful.forward(x_train[batch]), y_train[batch])[1])
            forgetful.sgd_step(0.1)
    for ours, theirs in zip(model.parameters(), forgetful.parameters()):
        np.testing.assert_array_equal(ours, theirs)  # training never reads the running statistics
    assert all(np.all(layer.running_mean == 0) and np.all(layer.running_var == 1) for layer in forgetful.bn_layers)
    assert forgetful.update_ops, "the last step's update is still queued"
    good, bad = mlp.evaluate(model, x_test, y_test)[1], mlp.evaluate(forgetful, x_test, y_test)[1]
    assert good > 0.9 and bad < good - 0.2


def test_recalibration_equals_full_training_set_statistics(trained, digits):
    x_train = digits[0]
    model = copy.deepcopy(trained)
    momenta = [layer.momentum for layer in model.bn_layers]
    mlp.recalibrate_bn(model, x_train)
    assert not model.training and [layer.momentum for layer in model.bn_layers] == momenta
    assert not model.update_ops
    # Layer by layer: each BN input over the whole training set, the layers below normalized with full-set statistics.
    h = x_train
    for w, layer in zip(model.weights, model.bn_layers):
        z = h @ w
        np.testing.assert_allclose(layer.running_mean, z.mean(axis=0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.running_var, z.var(axis=0, ddof=1), rtol=1e-10)
        h = np.maximum(layer.gamma * (z - z.mean(axis=0)) / np.sqrt(z.var(axis=0) + layer.eps) + layer.beta, 0)
    # Eval mode on the training set now matches a full-batch training-mode pass (up to N / (N - 1)).
    expected = copy.deepcopy(model).train().forward(x_train)
    np.testing.assert_allclose(model.forward(x_train), expected, rtol=1e-2, atol=1e-2)
    # The parameters are untouched.
    for ours, theirs in zip(model.parameters(), trained.parameters()):
        np.testing.assert_array_equal(ours, theirs)


def test_fit_records_curves_and_recalibrated_accuracy_without_touching_the_model(digits):
    model = mlp.MLP((64, 30, 10), bn=True, momentum=0.01, seed=0)
    history = mlp.fit(model, digits, 2, 0.2, 64, recalibrate=True)
    assert {k: len(v) for k, v in history.items() if k != "step_loss"} == dict.fromkeys(
        ["train_loss", "train_acc", "test_loss", "test_acc", "test_acc_recal"], 2)
    assert history["test_acc_recal"][0] > history["test_acc"][0], "momentum 0.01 lags after one epoch"
    assert model.bn_layers[0].momentum == 0.01


def test_progress_is_quiet_without_a_terminal(digits, capsys, monkeypatch):
    monkeypatch.delenv("BNREF_PROGRESS", raising=False)
    mlp.fit(mlp.MLP((64, 10, 10), bn=True), digits, 1, 0.1, 256)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("BNREF_PROGRESS", "1")
    mlp.fit(mlp.MLP((64, 10, 10), bn=True), digits, 1, 0.1, 256)
    assert "epochs" in capsys.readouterr().err


# --- lite BN, fixed-step training, diagnostics ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mean", "var"])
@pytest.mark.parametrize("training", [True, False])
def test_lite_bn_matches_torch_autograd(mode, training):
    rng = np.random.default_rng(5)
    x, dout = rng.normal(1.5, 2.0, size=(12, 6)), rng.normal(size=(12, 6))
    layer = mlp.LiteBatchNorm1d(6, mode, momentum=0.2)
    layer.gamma, layer.beta = rng.uniform(0.5, 2.0, 6), rng.normal(size=6)
    layer.running_mean, layer.running_var = rng.normal(size=6), rng.uniform(0.5, 2.0, 6)
    if not training:
        layer.eval()
    out = layer.forward(x)
    dx = layer.backward(dout)

    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, layer.gamma, layer.beta))
    mean = xt.mean(0) if training else torch.tensor(layer.running_mean)
    var = xt.var(0, unbiased=False) if training else torch.tensor(layer.running_var)
    x_hat = xt - mean if mode == "mean" else xt / torch.sqrt(var + layer.eps)
    expected = gt * x_hat + bt
    expected.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    for ours, theirs in ((dx, xt), (layer.dgamma, gt), (layer.dbeta, bt)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-10, atol=1e-12)
    if training:  # the queued statistics are the batch mean and unbiased variance, applied by run_update
        np.testing.assert_allclose(layer.pending[1], x.var(axis=0, ddof=1), rtol=1e-12)
        layer.run_update()
        assert layer.pending is None
    else:
        assert layer.pending is None


@pytest.mark.parametrize("mode", ["mean", "var"])
def test_lite_bn_mlp_gradients_and_training(mode, digits):
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(16, 7)), rng.integers(0, 4, 16)
    model = mlp.MLP((7, 9, 8, 4), bn=mode, seed=1)
    assert all(isinstance(layer, mlp.LiteBatchNorm1d) and layer.mode == mode for layer in model.bn_layers)
    assert model.biases[:-1] == [None, None]
    loss, dscores = mlp.softmax_cross_entropy(model.forward(x), y)
    model.backward(dscores)
    eps = 1e-6
    for param, grad in model.grads:  # central differences on a few entries of every parameter
        for index in list(np.ndindex(param.shape))[:3]:
            old = param[index]
            param[index] = old + eps
            up = mlp.softmax_cross_entropy(model.forward(x), y)[0]
            param[index] = old - eps
            down = mlp.softmax_cross_entropy(model.forward(x), y)[0]
            param[index] = old
            assert grad[index] == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
    history = mlp.fit(mlp.MLP((64, 50, 10), bn=mode, seed=0), digits, 2, 0.1, 64)
    assert history["test_acc"][-1] > 0.5, "it learns (chance is 10%)"
    with pytest.raises(ValueError, match="mode"):
        mlp.LiteBatchNorm1d(3, "both")


def test_fit_with_one_pass_per_epoch_of_steps_trains_exactly_as_epochs(digits):
    n_steps = len(digits[0]) // 64
    by_epoch = mlp.fit(mlp.MLP((64, 30, 10), bn=True, seed=2), digits, 2, 0.1, 64, seed=3)
    by_steps = mlp.fit(mlp.MLP((64, 30, 10), bn=True, seed=2), digits, 2, 0.1, 64, seed=3, steps_per_epoch=n_steps)
    for key in by_epoch:
        np.testing.assert_array_equal(by_epoch[key], by_steps[key])


def test_fit_with_fixed_steps_takes_the_same_number_of_steps_for_every_batch_size(digits):
    for batch_size in (4, 512):  # a tenth of an epoch, and several epochs
        history = mlp.fit(mlp.MLP((64, 20, 10), bn=True, seed=0), digits, 3, 0.05, batch_size, steps_per_epoch=10)
        assert len(history["step_loss"]) == 30 and len(history["test_acc"]) == 3
    stream = mlp.batch_stream(10, 4, np.random.default_rng(0))
    batches = [next(stream) for _ in range(4)]  # two passes of two batches; each pass a permutation
    for first, second in (batches[:2], batches[2:]):
        assert len(set(first) | set(second)) == 8
    with pytest.raises(ValueError, match="batch_size"):
        next(mlp.batch_stream(10, 1, np.random.default_rng(0)))


@pytest.mark.parametrize("bn", [False, True])
def test_layer_statistics_describe_one_pass_and_leave_the_model_alone(bn, digits):
    x, y = digits[0][:200], digits[1][:200]
    model = mlp.MLP((64, 30, 20, 10), bn=bn, seed=0, weight_scale=0.05)
    model.eval()
    before = copy.deepcopy(model)
    stats = mlp.layer_statistics(model, x, y)
    assert not model.training and not model.update_ops
    for ours, theirs in zip(model.parameters(), before.parameters()):
        np.testing.assert_array_equal(ours, theirs)
    for ours, theirs in zip(model.bn_layers, before.bn_layers):
        np.testing.assert_array_equal(ours.running_mean, theirs.running_mean)
        np.testing.assert_array_equal(ours.running_var, theirs.running_var)
    # By hand: the first hidden layer's output and the loss.
    z = x @ model.weights[0]
    if bn:
        z = (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)
    else:
        z = z + model.biases[0]
    h = np.maximum(z, 0)
    assert stats["act_mean"][0] == pytest.approx(h.mean(), rel=1e-10)
    assert stats["act_std"][0] == pytest.approx(h.std(), rel=1e-10)
    assert stats["saturated"][0] == pytest.approx(np.mean(z <= 0), abs=1e-12)
    assert stats["dead"][0] == pytest.approx(np.mean((z <= 0).all(axis=0)), abs=1e-12)
    assert stats["loss"] == pytest.approx(mlp.softmax_cross_entropy(copy.deepcopy(before).train().forward(x), y)[0])
    assert all(len(v) == 2 for k, v in stats.items() if k != "loss") and np.all(stats["grad_std"] > 0)
    if not bn:  # weight std 0.05 shrinks the signal layer by layer; BN restores it
        assert stats["act_std"][1] < stats["act_std"][0] < 0.5
    else:
        assert stats["act_std"][1] == pytest.approx(stats["act_std"][0], rel=0.2)


# --- the MNIST loader, on small IDX files written here ---------------------------------------------------------


def _idx(array, type_code=0x08, compress=True):
    """The IDX encoding of ``array``: magic (0, 0, type, ndim), big-endian dimensions, then the data."""
    raw = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    return gzip.compress(raw) if compress else raw


def _write_mnist(folder, n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        images_name, labels_name = bndata.MNIST_FILES[split]
        (folder / images_name).write_bytes(_idx(images))
        (folder / labels_name).write_bytes(_idx(labels))
        arrays[split] = (images, labels)
    return arrays


def test_load_mnist_reads_idx_files_from_the_cache(tmp_path):
    arrays = _write_mnist(tmp_path)
    x_train, y_train, x_test, y_test = load_mnist(cache_dir=tmp_path)
    assert x_train.shape == (5, 784) and x_test.shape == (3, 784) and x_train.dtype == np.float64
    np.testing.assert_allclose(x_train, arrays["train"][0].reshape(5, -1) / 255.0)
    np.testing.assert_array_equal(y_test, arrays["test"][1])
    assert y_train.dtype == np.int64 and 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert load_mnist(cache_dir=tmp_path, dtype=np.float32)[0].dtype == np.float32


def test_load_mnist_default_cache_follows_bnref_data(tmp_path, monkeypatch):
    monkeypatch.setenv("BNREF_DATA", str(tmp_path))
    assert bndata.default_cache_dir() == tmp_path / "mnist"
    (tmp_path / "mnist").mkdir()
    _write_mnist(tmp_path / "mnist", n_train=2, n_test=2)
    assert load_mnist()[0].shape == (2, 784)


def test_load_mnist_without_the_files_and_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(cache_dir=tmp_path / "empty")
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path / "empty") in message
    assert "download=True" in message
    assert not (tmp_path / "empty").exists(), "nothing is created without download=True"


def test_load_mnist_downloads_into_the_cache_only_when_asked(tmp_path, monkeypatch):
    source = tmp_path / "mirror"
    source.mkdir()
    arrays = _write_mnist(source)
    checksums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in source.iterdir()}
    monkeypatch.setattr(bndata, "MNIST_MD5", checksums)
    cache = tmp_path / "cache"
    x_train, y_train, _, _ = load_mnist(cache_dir=cache, download=True, base_url=source.as_uri() + "/")
    np.testing.assert_array_equal(y_train, arrays["train"][1])
    assert sorted(p.name for p in cache.iterdir()) == sorted(checksums)
    for p in source.iterdir():
        p.unlink()  # the mirror is gone: the cache alone serves the next call
    assert load_mnist(cache_dir=cache)[0].shape == (5, 784)


def test_a_download_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    source = tmp_path / "mirror"
    source.mkdir()
    _write_mnist(source)
    monkeypatch.setattr(bndata, "MNIST_MD5", dict.fromkeys(bndata.MNIST_MD5, "0" * 32))
    with pytest.raises(OSError, match="md5"):
        load_mnist(cache_dir=tmp_path / "cache", download=True, base_url=source.as_uri() + "/")
    assert not any((tmp_path / "cache").iterdir()), "a bad download leaves nothing in the cache"


def test_an_unreachable_mirror_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="could not download"):
        load_mnist(cache_dir=tmp_path / "cache", download=True, base_url=(tmp_path / "nowhere").as_uri() + "/")


def test_read_idx_accepts_plain_files_and_rejects_broken_ones(tmp_path):
    values = np.arange(12, dtype=">i4").reshape(3, 4)
    plain = tmp_path / "plain.idx"
    plain.write_bytes(_idx(values, type_code=0x0C, compress=False))
    np.testing.assert_array_equal(read_idx(plain), values)
    bad_magic = tmp_path / "bad.idx"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">i", 1) + b"\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad_magic)
    truncated = tmp_path / "short.idx.gz"
    truncated.write_bytes(gzip.compress(_idx(np.zeros((2, 28, 28), np.uint8), compress=False)[:-10]))
    with pytest.raises(ValueError, match="header announces shape"):
        read_idx(truncated)
