"""bnref.cnn: the small CNN of chapters 6 and 8, its normalization choices and its training loop."""
import numpy as np
import pytest
import torch

from bnref.cnn import NORMS, make_cnn, norm_layer, train_cnn


def _weights(model):
    """The convolution filters and the linear layer's weight and bias, in order."""
    return [p.detach() for name, p in model.named_parameters()
            if isinstance(model[int(name.split(".")[0])], (torch.nn.Conv2d, torch.nn.Linear))
            and (name.endswith("weight") or isinstance(model[int(name.split(".")[0])], torch.nn.Linear))]


def test_every_norm_starts_from_the_same_filters_and_linear_layer():
    reference = _weights(make_cnn(None, seed=3))
    for norm in NORMS[1:]:
        model = make_cnn(norm, seed=3)
        assert all(torch.equal(a, b) for a, b in zip(reference, _weights(model))), norm
        convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
        assert all(c.bias is None for c in convs), f"{norm}: a convolution before a normalization has no bias"
    assert not torch.equal(reference[0], _weights(make_cnn(None, seed=4))[0])


@pytest.mark.parametrize("norm,statistics_over", [("bn", (0, 2, 3)), ("gn", None), ("ln", (1, 2, 3)), ("in", (2, 3))])
def test_norm_layers_take_their_statistics_over_the_named_axes(norm, statistics_over):
    x = torch.randn(4, 16, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 3 + 2
    layer = norm_layer(norm, 16, groups=8).train()
    y = layer(x).detach()
    if statistics_over is None:  # 8 groups of 2 consecutive channels
        y = y.reshape(4, 8, 2, 5, 5)
        statistics_over = (2, 3, 4)
    assert torch.allclose(y.mean(statistics_over), torch.zeros(()), atol=1e-5)
    assert torch.allclose(y.var(statistics_over, correction=0), torch.ones(()), atol=1e-3)


def test_bad_norms_and_groups_are_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        make_cnn("batch")
    with pytest.raises(ValueError, match="not divisible"):
        make_cnn("gn", groups=5)


def test_training_by_steps_lowers_the_loss_and_reports_eval_accuracy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 256)
    x = rng.normal(size=(256, 64)) + 1.5 * y[:, None]  # two separable classes
    history = train_cnn(make_cnn("bn", seed=0, num_classes=2), x[:192], y[:192], x[192:], y[192:], lr=0.1,
                        steps=60, batch_size=16, eval_every=30)
    assert list(history["step"]) == [30, 60]
    assert history["loss"][-1] < history["loss"][0]
    assert history["acc"][-1] > 0.9
    with pytest.raises(ValueError, match="exactly one of epochs or steps"):
        train_cnn(make_cnn(None), x, y, x, y, lr=0.1)


def test_the_network_is_float32_whatever_torch_s_default_dtype(monkeypatch):
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)  # as some exercise notebooks do
        model = make_cnn("gn", seed=0)
    finally:
        torch.set_default_dtype(default)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(make_cnn("gn", seed=0))))
