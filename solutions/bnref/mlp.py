"""A small multilayer perceptron in NumPy, with and without batch norm, and its training loop.

Layers follow the CS231n convention: ``*_forward(...) -> (out, cache)`` and
``*_backward(dout, cache)`` returning the gradients of the forward's inputs.
Shapes: N samples, D_in inputs, D_out outputs, C classes.

The batch-norm layers of :class:`MLP` follow TensorFlow 1's graph semantics
for the running statistics: a training-mode forward pass normalizes with the
batch statistics but only *queues* the moving-average update, like the ops
that ``tf.layers.batch_normalization`` puts in ``tf.GraphKeys.UPDATE_OPS``.
The update takes effect when :meth:`MLP.run_update_ops` runs. A training
loop that forgets it trains well and evaluates with running statistics that
never left their initial values (mean 0, variance 1).

Besides full BN, :class:`MLP` offers the two halves of it, ``bn="mean"`` (centring
only) and ``bn="var"`` (scaling only), for the "lite" BN experiment; :func:`fit`
can train for a fixed number of steps per evaluation (``steps_per_epoch``), so
that runs with different batch sizes take the same number of SGD steps; and
:func:`layer_statistics` gives the per-layer activation and gradient
statistics of one forward/backward pass, for diagnostics at initialization.
"""
import copy

import numpy as np

from .layers import BatchNorm1d
from .progress import progress


def affine_forward(x, w, b=None):
    """Fully connected layer ``x @ w + b``.

    Args:
        x: (N, D_in); w: (D_in, D_out); b: (D_out,) or None (no bias).

    Returns:
        out: (N, D_out); cache: (x, w, has_bias).
    """
    out = x @ w
    if b is not None:
        out = out + b
    return out, (x, w, b is not None)


def affine_backward(dout, cache):
    """Backward of :func:`affine_forward`.

    Args:
        dout: (N, D_out).

    Returns:
        dx: (N, D_in); dw: (D_in, D_out); db: (D_out,) or None without a bias.
    """
    x, w, has_bias = cache
    return dout @ w.T, x.T @ dout, (dout.sum(axis=0) if has_bias else None)


def relu_forward(x):
    """``max(x, 0)`` elementwise; returns (out, cache), out of x's shape."""
    return np.maximum(x, 0), x


def relu_backward(dout, cache):
    """Backward of :func:`relu_forward`: the gradient passes where x > 0."""
    return dout * (cache > 0)


def elu_forward(x, alpha=1.0):
    """ELU: ``x`` for x > 0, ``alpha * (exp(x) - 1)`` otherwise; returns (out, cache).

    Smooth and negative for x < 0, so a unit's mean output is closer to zero
    than with ReLU (Clevert et al., 2016).
    """
    negative_part = alpha * np.expm1(np.minimum(x, 0))
    return np.where(x > 0, x, negative_part), (x, negative_part, alpha)


def elu_backward(dout, cache):
    """Backward of :func:`elu_forward`: slope 1 for x > 0, ``out + alpha`` otherwise."""
    x, negative_part, alpha = cache
    return dout * np.where(x > 0, 1.0, negative_part + alpha)


ACTIVATIONS = {"relu": (relu_forward, relu_backward), "elu": (elu_forward, elu_backward)}


def softmax_cross_entropy(scores, y):
    """Mean cross-entropy of the softmax of ``scores`` and its gradient.

    Args:
        scores: (N, C) unnormalized log-probabilities.
        y: (N,) integer labels in [0, C).

    Returns:
        loss: float; dscores: (N, C), the gradient of the loss.
    """
    shifted = scores - scores.max(axis=1, keepdims=True)  # exp cannot overflow
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    loss = -log_probs[rows, y].mean()
    dscores = np.exp(log_probs)
    dscores[rows, y] -= 1.0
    return float(loss), dscores / len(y)


class DeferredBatchNorm1d(BatchNorm1d):
    """:class:`BatchNorm1d` whose running-statistics update is a separate step, as in TF1.

    A training-mode :meth:`forward` normalizes with the batch statistics and
    keeps them in :attr:`pending`; :meth:`run_update` moves the running
    averages towards them with the current :attr:`momentum` (PyTorch
    convention). Eval mode is :class:`BatchNorm1d`'s.

    Attributes:
        pending: ``(mean, var)``, each (D,), of the last training batch, with the
            *unbiased* variance (the one the running average takes), or None
            once :meth:`run_update` has used them.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float64):
        super().__init__(num_features, eps=eps, momentum=momentum, dtype=dtype)
        self.pending = None

    def forward(self, x):
        """Normalize an (N, D) batch; returns (N, D). Training mode queues the running-stat update."""
        if not self.training:
            return super().forward(x)
        kept = self.running_mean, self.running_var
        out = super().forward(x)  # BatchNorm1d would average this batch in right away ...
        self.running_mean, self.running_var = kept  # ... here that waits for run_update()
        n = x.shape[0]
        self.pending = (self.cache.mean, self.cache.var * (n / (n - 1)))
        return out

    __call__ = forward

    def run_update(self):
        """Apply the queued moving-average update, if any."""
        if self.pending is not None:
            mean, var = self.pending
            m = self.momentum
            self.running_mean = (1 - m) * self.running_mean + m * mean
            self.running_var = (1 - m) * self.running_var + m * var
            self.pending = None


class LiteBatchNorm1d(DeferredBatchNorm1d):
    """Half of batch norm: centring only (``mode="mean"``) or scaling only (``mode="var"``).

    ``mode="mean"`` computes ``gamma * (x - mean) + beta``, ``mode="var"``
    computes ``gamma * x / sqrt(var + eps) + beta``, with the batch mean and
    (biased) variance in training mode and the running ones in eval mode. The
    "lite" BN of an exercise of Dive into Deep Learning (section on batch
    normalization): which half of BN does the work? The running statistics,
    the queued update and :meth:`run_update` are :class:`DeferredBatchNorm1d`'s
    (both statistics are tracked in either mode, only one is used).
    """

    MODES = ("mean", "var")

    def __init__(self, num_features, mode, eps=1e-5, momentum=0.1, dtype=np.float64):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        super().__init__(num_features, eps=eps, momentum=momentum, dtype=dtype)
        self.mode = mode
        self.lite_cache = None

    def forward(self, x):
        """Centre or scale an (N, D) batch; returns (N, D). Training mode queues the running-stat update."""
        if self.training:
            n = x.shape[0]
            mean, var = x.mean(axis=0), x.var(axis=0)
            self.pending = (mean, var * (n / (n - 1)))
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = None if self.mode == "mean" else 1.0 / np.sqrt(var + self.eps)
        x_hat = x - mean if self.mode == "mean" else x * inv_std
        self.lite_cache = (x, mean, x_hat, inv_std, self.training)
        return self.gamma * x_hat + self.beta

    __call__ = forward

    def backward(self, dout):
        """Backward of the last :meth:`forward`: dout (N, D) -> dx (N, D); sets dgamma and dbeta."""
        if self.lite_cache is None:
            raise RuntimeError("LiteBatchNorm1d.backward needs a forward pass first")
        x, mean, x_hat, inv_std, batch_stats = self.lite_cache
        self.dgamma, self.dbeta = (dout * x_hat).sum(axis=0), dout.sum(axis=0)
        g = dout * self.gamma
        if self.mode == "mean":
            return g - g.mean(axis=0) if batch_stats else g
        if not batch_stats:  # the running variance is a constant
            return g * inv_std
        # d(x_j s)/dx with s = (var + eps)^(-1/2) and d var / d x_j = 2 (x_j - mean) / N
        return inv_std * g - inv_std ** 3 * (x - mean) * (g * x).mean(axis=0)


def init_weights(d_in, d_out, scale, rng, dtype=np.float64):
    """A (d_in, d_out) Gaussian weight matrix.

    ``scale="he"`` draws with std sqrt(2 / d_in) (He et al., 2015), which keeps
    the variance of ReLU and ELU layers roughly constant with depth; a number
    is used as the std itself (the CS231n weight-scale sweep).
    """
    std = np.sqrt(2.0 / d_in) if scale == "he" else float(scale)
    return (std * rng.standard_normal((d_in, d_out))).astype(dtype)


class MLP:
    """Classifier ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``, scores out.

    Each hidden layer is ``affine -> [batch norm] -> activation``; the last layer
    is affine. With ``bn=True`` the hidden affine layers have no bias (BN's beta
    replaces it). ``bn="mean"`` or ``bn="var"`` uses a :class:`LiteBatchNorm1d`
    of that mode instead (no hidden biases either). The API mirrors ``torch.nn.Module`` where it can:
    :meth:`train` / :meth:`eval`, :meth:`forward`, :meth:`backward`, plus
    :meth:`sgd_step` and :meth:`run_update_ops`.

    Attributes:
        weights: list of (D_in, D_out) arrays; biases: list of (D_out,) arrays or None.
        bn_layers: list of :class:`DeferredBatchNorm1d` (empty without BN).
        training: True after :meth:`train`, False after :meth:`eval`.
        hidden_grads: after :meth:`backward`, the gradient of the loss with respect
            to each hidden layer's output (after the activation), (N, width) each.
    """

    def __init__(self, sizes=(64, 100, 100, 10), bn=False, act="relu", weight_scale="he", momentum=0.1,
                 eps=1e-5, seed=0, dtype=np.float64):
        rng = np.random.default_rng(seed)
        n_hidden = len(sizes) - 2
        self.act_forward, self.act_backward = ACTIVATIONS[act]
        self.weights = [init_weights(a, b, weight_scale, rng, dtype) for a, b in zip(sizes[:-1], sizes[1:])]
        self.biases = [None if bn and i < n_hidden else np.zeros(b, dtype=dtype)
                       for i, b in enumerate(sizes[1:])]
        if isinstance(bn, str) and bn not in LiteBatchNorm1d.MODES:
            raise ValueError(f"bn must be True, False or one of {LiteBatchNorm1d.MODES}, got {bn!r}")
        if isinstance(bn, str):
            self.bn_layers = [LiteBatchNorm1d(d, bn, eps=eps, momentum=momentum, dtype=dtype) for d in sizes[1:-1]]
        else:
            self.bn_layers = [DeferredBatchNorm1d(d, eps=eps, momentum=momentum, dtype=dtype)
                              for d in sizes[1:-1]] if bn else []
        self.training = True
        self._caches = None
        self.grads = None
        self.hidden_grads = None

    def train(self):
        """Training mode: BN uses batch statistics and queues running-stat updates."""
        self.training = True
        for layer in self.bn_layers:
            layer.train()
        return self

    def eval(self):
        """Eval mode: BN uses its running statistics."""
        self.training = False
        for layer in self.bn_layers:
            layer.eval()
        return self

    def forward(self, x):
        """x: (N, sizes[0]) -> scores (N, sizes[-1]); keeps what :meth:`backward` needs."""
        caches = []
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h, affine_cache = affine_forward(h, w, b)
            if i == len(self.weights) - 1:
                caches.append((affine_cache, None))
                break
            if self.bn_layers:
                h = self.bn_layers[i].forward(h)
            h, act_cache = self.act_forward(h)
            caches.append((affine_cache, act_cache))
        self._caches = caches
        return h

    __call__ = forward

    def backward(self, dscores):
        """Backpropagate dscores (N, C) through the last forward pass.

        Sets :attr:`grads`, a list of (parameter, gradient) pairs in the order of
        :meth:`parameters`. Returns dx: (N, sizes[0]).
        """
        if self._caches is None:
            raise RuntimeError("MLP.backward needs a forward pass first")
        grads_w, grads_b = [None] * len(self.weights), [None] * len(self.weights)
        hidden_grads = [None] * (len(self.weights) - 1)
        dh = dscores
        for i in reversed(range(len(self.weights))):
            affine_cache, act_cache = self._caches[i]
            if act_cache is not None:
                hidden_grads[i] = dh
                dh = self.act_backward(dh, act_cache)
                if self.bn_layers:
                    dh = self.bn_layers[i].backward(dh)
            dh, grads_w[i], grads_b[i] = affine_backward(dh, affine_cache)
        grads = list(zip(self.weights, grads_w)) + [(b, g) for b, g in zip(self.biases, grads_b) if b is not None]
        grads += [(p, g) for layer in self.bn_layers for p, g in ((layer.gamma, layer.dgamma),
                                                                  (layer.beta, layer.dbeta))]
        self.grads = grads
        self.hidden_grads = hidden_grads
        return dh

    def parameters(self):
        """The learnable arrays: weights, biases, then each BN layer's gamma and beta."""
        return (self.weights + [b for b in self.biases if b is not None]
                + [p for layer in self.bn_layers for p in (layer.gamma, layer.beta)])

    def sgd_step(self, lr):
        """One step of plain SGD on every parameter, in place, with the gradients of :meth:`backward`."""
        if self.grads is None:
            raise RuntimeError("MLP.sgd_step needs a backward pass first")
        for param, grad in self.grads:
            param -= lr * grad

    @property
    def update_ops(self):
        """The BN layers whose running-statistics update is queued and not yet run."""
        return [layer for layer in self.bn_layers if layer.pending is not None]

    def run_update_ops(self):
        """Fold every queued batch statistic into its layer's running averages."""
        for layer in self.bn_layers:
            layer.run_update()


def train_epoch(model, x, y, lr, batch_size, rng):
    """One epoch of mini-batch SGD over a random permutation of (x, y).

    The last ``len(x) % batch_size`` samples of the permutation are left out,
    so every batch has ``batch_size`` samples (BN needs at least 2).

    Args:
        model: an :class:`MLP`.
        x: (N, D) inputs; y: (N,) labels.
        lr: learning rate; batch_size: samples per step.
        rng: ``numpy.random.Generator``, used for one ``permutation(N)``.

    Returns:
        (steps,) array of the training loss of each step.
    """
    model.train()
    order = rng.permutation(len(x))
    losses = []
    for start in progress(range(0, len(x) - batch_size + 1, batch_size), desc="steps", leave=False):
        batch = order[start:start + batch_size]
        losses.append(sgd_step(model, x[batch], y[batch], lr))
    return np.array(losses)


def batch_stream(n, batch_size, rng):
    """Endless mini-batches of indices into N samples, as :func:`train_epoch` draws them.

    Each pass over the data is one ``rng.permutation(n)`` cut into batches of
    ``batch_size``; the last ``n % batch_size`` indices of a pass are left out.

    Yields:
        (batch_size,) integer arrays.
    """
    if not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 2 and {n}, got {batch_size}")
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def train_steps(model, x, y, lr, batches, steps):
    """``steps`` steps of mini-batch SGD, on the next ``steps`` batches of the iterator ``batches``.

    The step is :func:`train_epoch`'s; :func:`batch_stream` makes the batches.

    Returns:
        (steps,) array of the training loss of each step.
    """
    model.train()
    losses = []
    for _ in progress(range(steps), desc="steps", leave=False):
        batch = next(batches)
        losses.append(sgd_step(model, x[batch], y[batch], lr))
    return np.array(losses)


def sgd_step(model, xb, yb, lr):
    """One step of SGD on a mini-batch xb (B, D), yb (B,): forward, backward, running-stat updates, update.

    Returns:
        the batch's training loss (a float).
    """
    loss, dscores = softmax_cross_entropy(model.forward(xb), yb)
    model.backward(dscores)
    model.run_update_ops()
    model.sgd_step(lr)
    return loss


def evaluate(model, x, y):
    """Loss and accuracy of ``model`` on (x, y) in eval mode (running statistics).

    Returns:
        (loss, accuracy), two floats; the model is left in eval mode.
    """
    model.eval()
    scores = model.forward(x)
    loss, _ = softmax_cross_entropy(scores, y)
    return loss, float(np.mean(scores.argmax(axis=1) == y))


def layer_statistics(model, x, y, threshold=0.05):
    """Statistics of each hidden layer in one training-mode forward and backward pass on (x, y).

    The diagnostics of a network at initialization: how large the activations
    and their gradients are, layer by layer, and how many units pass little or
    no gradient. The model is left as it was: its mode is restored, the queued
    running-statistics updates are dropped, and no parameter changes (only
    :attr:`MLP.grads` and :attr:`MLP.hidden_grads` now hold this pass's gradients).

    Args:
        model: an :class:`MLP`; x: (N, D) inputs; y: (N,) labels.
        threshold: a unit is *saturated* on a sample where the derivative of its
            activation is below this (for ReLU: where it is inactive; for ELU:
            inputs below ln 0.05, about -3).

    Returns:
        dict: ``loss`` (float), and per hidden layer, arrays of length
        ``len(sizes) - 2``: ``act_mean``, ``act_std`` (of the layer's outputs over
        all samples and units), ``grad_std`` (of the loss gradient with respect to
        those outputs), ``saturated`` (fraction of (sample, unit) pairs) and
        ``dead`` (fraction of units saturated on every sample).
    """
    was_training = model.training
    pending = [layer.pending for layer in model.bn_layers]
    model.train()
    loss, dscores = softmax_cross_entropy(model.forward(x), y)
    caches = model._caches
    model.backward(dscores)
    for layer, queued in zip(model.bn_layers, pending):
        layer.pending = queued  # drop this pass's statistics, keep what was queued before
    if not was_training:
        model.eval()
    out = {key: [] for key in ("act_mean", "act_std", "grad_std", "saturated", "dead")}
    for i, grad in enumerate(model.hidden_grads):
        act = caches[i + 1][0][0]  # the input of the next affine layer is this layer's output
        slope = model.act_backward(np.ones_like(act), caches[i][1])
        low = slope < threshold
        out["act_mean"].append(act.mean())
        out["act_std"].append(act.std())
        out["grad_std"].append(grad.std())
        out["saturated"].append(low.mean())
        out["dead"].append(low.all(axis=0).mean())
    return {"loss": loss, **{key: np.array(value) for key, value in out.items()}}


def recalibrate_bn(model, x):
    """Replace every BN layer's running statistics by those of the whole of ``x``.

    One training-mode pass with all of ``x`` as a single batch gives every BN
    layer its exact full-set mean and (unbiased) variance, each computed with
    the layers below already normalized by theirs. The momenta are restored
    and the model is left in eval mode.

    Args:
        model: an :class:`MLP`; x: (N, D) the training inputs, N >= 2.
    """
    momenta = [layer.momentum for layer in model.bn_layers]
    model.train()
    model.forward(x)
    for layer in model.bn_layers:
        layer.momentum = 1.0  # replace the running averages instead of blending into them
    model.run_update_ops()
    for layer, momentum in zip(model.bn_layers, momenta):
        layer.momentum = momentum
    model.eval()


def fit(model, data, epochs, lr, batch_size, seed=0, recalibrate=False, desc="epochs", steps_per_epoch=None):
    """Train ``model`` for ``epochs`` epochs and record its curves.

    Args:
        model: an :class:`MLP`.
        data: (x_train, y_train, x_test, y_test) as from :func:`bnref.data.load_digits`.
        lr, batch_size: as in :func:`train_epoch`; seed: of the shuffling.
        recalibrate: also record the test metrics after :func:`recalibrate_bn`
            (on a copy, so the running averages of the training run are kept).
        steps_per_epoch: None for epochs of one pass over the training set; a
            number makes every "epoch" (the period between two evaluations)
            exactly that many SGD steps on the batches of one
            :func:`batch_stream`, whatever the batch size. With
            ``len(x_train) // batch_size`` it trains exactly as None does.

    Returns:
        dict of arrays: ``step_loss`` (every step), and per epoch ``train_loss``,
        ``train_acc``, ``test_loss``, ``test_acc`` (eval mode), plus
        ``test_acc_recal`` when ``recalibrate``.
    """
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    history = {key: [] for key in ("step_loss", "train_loss", "train_acc", "test_loss", "test_acc")}
    if recalibrate:
        history["test_acc_recal"] = []
    batches = None if steps_per_epoch is None else batch_stream(len(x_train), batch_size, rng)
    for _ in progress(range(epochs), desc=desc, leave=False):
        if batches is None:
            history["step_loss"].extend(train_epoch(model, x_train, y_train, lr, batch_size, rng))
        else:
            history["step_loss"].extend(train_steps(model, x_train, y_train, lr, batches, steps_per_epoch))
        for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
            loss, acc = evaluate(model, xs, ys)
            history[f"{split}_loss"].append(loss)
            history[f"{split}_acc"].append(acc)
        if recalibrate:
            twin = copy.deepcopy(model)
            recalibrate_bn(twin, x_train)
            history["test_acc_recal"].append(evaluate(twin, x_test, y_test)[1])
    return {key: np.array(value) for key, value in history.items()}
