"""The small CNN of chapters 6 and 8, with a choice of normalization layer, and its training loop (PyTorch).

The network, for (N, 1, 8, 8) digit images::

    conv 3x3, 1 -> 16 channels, padding 1  [-> norm(16)] -> ReLU     (N, 16, 8, 8)
    conv 3x3, 16 -> 32 channels, padding 1 [-> norm(32)] -> ReLU     (N, 32, 8, 8)
    max-pool 2x2 -> flatten -> linear 512 -> 10                      (N, 10) class scores

``norm`` picks the normalization after each convolution:

* ``None``: none; the convolutions keep their bias.
* ``"bn"``: ``BatchNorm2d(C)``, statistics per channel over (N, H, W).
* ``"gn"``: ``GroupNorm(groups, C)``, statistics per sample and group of C / groups channels over
  (C / groups, H, W); ``groups=8`` by default (2 channels per group in the first convolution, 4 in the second).
* ``"ln"``: ``GroupNorm(1, C)``, layer norm over (C, H, W) per sample, with a γ and β per channel.
* ``"in"``: ``GroupNorm(C, C)``, instance norm: per sample and channel over (H, W).

With a normalization layer the convolutions have no bias. It is exactly redundant before BN and IN, whose
per-channel mean subtraction removes it; before GN and LN it is not (only its mean over a group cancels),
but the per-channel β that follows the normalization supplies a shift per channel, and normalized
convolutions are built without bias in practice (ResNets with GN included).

:func:`make_cnn` draws the random parameters in the same order for every ``norm``, so that models made with
the same seed start from the *same* filters and the same linear layer: the convolutions are created with a
bias, and the bias is removed afterwards when a normalization follows. The plain network keeps its biases
at PyTorch's default initialization, uniform in ±1/sqrt(fan_in). The normalization layers start at γ = 1,
β = 0 and draw nothing.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .progress import progress

NORMS = (None, "bn", "gn", "ln", "in")
CHANNELS = (16, 32)
DTYPE = torch.float32  # explicit: the network does not depend on torch's default dtype (a notebook may change it)


def norm_layer(norm, channels, groups=8):
    """The normalization module for ``channels`` channels (see the module docstring), or None for ``norm=None``.

    Raises:
        ValueError: an unknown ``norm``, or ``channels`` not divisible by ``groups`` for ``"gn"``.
    """
    if norm is None:
        return None
    if norm == "bn":
        return nn.BatchNorm2d(channels, dtype=DTYPE)
    if norm == "gn":
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        return nn.GroupNorm(groups, channels, dtype=DTYPE)
    if norm == "ln":
        return nn.GroupNorm(1, channels, dtype=DTYPE)
    if norm == "in":
        return nn.GroupNorm(channels, channels, dtype=DTYPE)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def make_cnn(norm=None, groups=8, seed=0, channels=CHANNELS, num_classes=10, image_size=8):
    """The small CNN as an ``nn.Sequential``, for (N, 1, image_size, image_size) input, (N, num_classes) output.

    Args:
        norm: None, ``"bn"``, ``"gn"``, ``"ln"`` or ``"in"`` (see the module docstring).
        groups: the number of groups of ``"gn"``; must divide both channel counts.
        seed: seeds ``torch.manual_seed`` before the parameters are drawn; the same seed gives the same
            convolution filters and linear layer for every ``norm``.
        channels: output channels of the two convolutions.
    """
    torch.manual_seed(seed)
    layers, c_in = [], 1
    for c_out in channels:
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=True, dtype=DTYPE)  # the bias is drawn for every norm ...
        layer = norm_layer(norm, c_out, groups)
        if layer is not None:
            conv.bias = None  # ... and dropped before a normalization, keeping the random stream aligned
        layers += [conv] + ([layer] if layer is not None else []) + [nn.ReLU()]
        c_in = c_out
    side = image_size // 2
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c_in * side * side, num_classes, dtype=DTYPE)]
    return nn.Sequential(*layers)


def _images(x):
    """(N, 64) or (N, 1, 8, 8) array or tensor -> float32 (N, 1, 8, 8) tensor."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if t.ndim == 2:
        side = math.isqrt(t.shape[1])
        t = t.reshape(-1, 1, side, side)
    if t.ndim != 4:
        raise ValueError(f"expected images of shape (N, 64) or (N, 1, 8, 8), got {tuple(t.shape)}")
    return t


def evaluate(model, x, y):
    """Accuracy of ``model`` in eval mode (BN uses its running statistics) on images x (N, 64) and labels y (N,)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(_images(x)).argmax(1) == torch.as_tensor(y)).float().mean().item()
    model.train(was_training)
    return acc


def train_cnn(model, x_train, y_train, x_test, y_test, lr, epochs=None, steps=None, batch_size=32, seed=0,
              eval_every=None, desc=None):
    """Train ``model`` with plain SGD (no momentum, no weight decay) on the cross-entropy; returns its history.

    The mini-batches are consecutive slices of a random permutation of the training set, drawn anew each
    epoch from a generator seeded with ``seed``; the last slice of an epoch may be smaller than
    ``batch_size``. Give exactly one of ``epochs`` (whole passes) or ``steps`` (optimizer steps; the
    permutations go on across epoch boundaries).

    Args:
        model: e.g. from :func:`make_cnn`; trained in place.
        x_train: (N, 64) or (N, 1, 8, 8) images; y_train: (N,) integer labels. Same for the test split.
        lr: the SGD learning rate.
        epochs / steps: the length of training (one of the two).
        batch_size: the mini-batch size.
        seed: seeds the order of the mini-batches (not the model: see :func:`make_cnn`).
        eval_every: with ``steps``, evaluate every that many steps (and at the end); by default only at the
            end. With ``epochs``, the evaluation is after every epoch.
        desc: the progress bar's label.

    Returns:
        dict of NumPy arrays, one entry per evaluation: ``"step"`` (optimizer steps done), ``"epoch"``
        (passes over the training set done, fractional with ``steps``), ``"loss"`` (mean training loss over
        the steps since the previous evaluation; NaN once training diverged) and ``"acc"`` (test accuracy
        in eval mode).
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    xtr, xte = _images(x_train), _images(x_test)
    ytr, yte = torch.as_tensor(y_train), torch.as_tensor(y_test)
    n = len(ytr)
    per_epoch = math.ceil(n / batch_size)
    if epochs is not None:
        total, eval_every = epochs * per_epoch, per_epoch
    else:
        total, eval_every = steps, (eval_every or steps)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = {"step": [], "epoch": [], "loss": [], "acc": []}
    order, pos, losses = None, n, []
    model.train()
    for step in progress(range(1, total + 1), desc=desc or f"lr={lr}, batch {batch_size}", leave=False):
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos: pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == total:
            history["step"].append(step)
            history["epoch"].append(step / per_epoch)
            history["loss"].append(float(np.mean(losses)))
            history["acc"].append(evaluate(model, xte, yte))
            losses = []
            model.train()
    return {key: np.array(value) for key, value in history.items()}
