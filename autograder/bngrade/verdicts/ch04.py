"""Hidden tests of chapter 4, *Training with batch norm*: the find-and-fix-the-bug exercise.

The student's ``evaluate``, ``train_epoch`` and ``recalibrate`` run on models
of the reference package (``bnref.mlp.MLP``, whose interface the notebook's
own ``MLP`` shares) and are compared with the reference functions. Each known
pitfall is a :class:`Mistake` whose ``fn`` is a buggy version of the graded
function; when the student's outcome matches one, the message names it.
"""
import copy
import functools

import numpy as np

from bnref import mlp
from bnref.data import load_digits

from bngrade.judge.compare import Mistake, check_not_reference, close
from bngrade.judge.remote import OBJECT_CODECS

TOL = (1e-6, 1e-9)  # float64 end to end; only the order of summation may differ
# recalibrate: a float64 mean or variance of N <= 2000 samples is exact to N * 2**-53 ~ 2e-13 of the largest
# statistic even with naive summation. On the cases below the reference is exact to 2e-15 (measured against
# 80-bit long double), and other correct implementations (the notebook's layer, a one-pass E[z^2] - E[z]^2)
# agree with it to 4e-15. An atol of 1e-11 (scaled by the largest statistic) is 50 times the summation bound
# and over 2000 times what was measured; the nearest wrong answer, the biased variance, is off by
# 1 / (N - 1) = 1.6e-3 (N = 640 here).
RECALIBRATE_TOL = (1e-9, 1e-11)
SIZES = (64, 40, 30, 10)
N_TRAIN = 640  # training samples the hidden tests use, to stay fast


@functools.lru_cache(maxsize=1)
def _digits():
    x_train, y_train, x_test, y_test = load_digits()
    return x_train[:N_TRAIN], y_train[:N_TRAIN], x_test, y_test


def _model(epochs=0, seed=0, bn=True, momentum=0.1):
    """A small reference MLP, trained by the reference loop for ``epochs`` epochs, left in training mode."""
    x, y = _digits()[:2]
    model = mlp.MLP(SIZES, bn=bn, seed=seed, momentum=momentum)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        mlp.train_epoch(model, x, y, 0.1, 32, rng)
    return model.train()


# The sandbox gets a model as data: the notebook's own MLP and BatchNormLayer classes, built with the state of
# a reference model (same attribute names; one output bias); what the student's call left in it comes back.
LAYER_STATE = ("gamma", "beta", "running_mean", "running_var")


def _model_tree(model, encode):
    layers = [{"obj": "BatchNormLayer", "attrs": {
        **{name: encode(getattr(layer, name)) for name in LAYER_STATE},
        "momentum": float(layer.momentum), "eps": float(layer.eps), "training": bool(layer.training),
        "pending": None}} for layer in model.bn_layers]
    return {"obj": "MLP", "attrs": {"weights": encode(list(model.weights)), "bias": encode(model.biases[-1]),
                                    "bn_layers": {"l": layers}, "training": bool(model.training)}}


def _plain(tree, arrays):
    """An array or scalar of a state that came back from the sandbox."""
    if isinstance(tree, dict) and "a" in tree:
        return np.array(arrays[tree["a"]], dtype=np.float64)
    if isinstance(tree, dict) and "s" in tree:
        return float(tree["s"])
    if isinstance(tree, (bool, int, float)):
        return tree
    raise ValueError("a model came back with an attribute that is not an array or a number")


def _apply_model(model, tree, arrays, session):
    """Give the reference ``model`` the state the student's call left the sandbox's model in."""
    attrs = tree["attrs"]
    weights = attrs["weights"]["l"]
    if len(weights) != len(model.weights):
        raise ValueError("a model came back with a different number of layers")
    for i, item in enumerate(weights):
        model.weights[i] = _plain(item, arrays)
    model.biases[-1] = _plain(attrs["bias"], arrays)
    model.training = bool(attrs["training"])
    for layer, sub in zip(model.bn_layers, attrs["bn_layers"]["l"]):
        for name in LAYER_STATE:
            setattr(layer, name, _plain(sub["attrs"][name], arrays))
        layer.momentum = float(_plain(sub["attrs"]["momentum"], arrays))
        layer.training = bool(sub["attrs"]["training"])


OBJECT_CODECS[mlp.MLP] = (_model_tree, _apply_model)


def _parts(model):
    """(parameters, running statistics, momenta) of a model, each flattened."""
    flat = [np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0) for arrays in (
        model.parameters(),
        [a for layer in model.bn_layers for a in (layer.running_mean, layer.running_var)],
        [[layer.momentum] for layer in model.bn_layers])]
    return tuple(flat)


def _run(fn, name, *args):
    """Call the student's ``fn``; report a crash as a failed test that names the function."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise AssertionError(f"{name} is not implemented yet.") from None
    except Exception as exc:  # a student's bug: report it as a failed test
        raise AssertionError(f"{name} raised {type(exc).__name__}: {exc}") from None


def _check(student, reference, mistakes, name, cases, outcome, explain, tol=TOL):
    """Compare ``outcome(student, args)`` with the reference's on every case, or name the mistake.

    Args:
        cases: (label, args) pairs; each function runs on its own deep copy of ``args``.
        tol: (rtol, atol) of :func:`close` for every comparison.
        outcome: ``outcome(fn, args)`` runs ``fn(*args)`` and returns a tuple of arrays.
        explain: ``explain(got, expected, args)`` returns the message when no known mistake
            matches; ``args`` are the inputs as they were before the call.
    """
    check_not_reference(student, name)
    for label, args in cases:
        expected = outcome(reference, copy.deepcopy(args))
        got = outcome(lambda *a: _run(student, name, *a), copy.deepcopy(args))
        if close(got, expected, tol=tol):
            continue
        for mistake in mistakes:
            try:
                wrong = outcome(mistake.fn, copy.deepcopy(args))
            except Exception:  # the mistake does not apply to this case
                continue
            if close(got, wrong, tol=tol):
                raise AssertionError(f"{name}: {mistake.message} (on {label})")
        raise AssertionError(f"{name}: {explain(got, expected, args)} (on {label})")


# --- evaluate -------------------------------------------------------------------------------------------------


def _evaluate_in_training_mode(model, x, y):
    model.train()
    scores = model.forward(x)
    loss, _ = mlp.softmax_cross_entropy(scores, y)
    return loss, float(np.mean(scores.argmax(axis=1) == y))


def _evaluate_and_update(model, x, y):
    result = _evaluate_in_training_mode(model, x, y)
    model.run_update_ops()
    return result


EVALUATE_MISTAKES = [
    Mistake("your evaluation runs the network in training mode: call model.eval() first. In training mode "
            "the test set is normalized with its own batch statistics, so a prediction depends on the other "
            "samples in the batch, and the running statistics are never used", _evaluate_in_training_mode),
    Mistake("your evaluation runs the network in training mode, and runs the update ops too, so evaluating "
            "changes the model: call model.eval() first, and leave the running statistics alone",
            _evaluate_and_update),
    Mistake("evaluate returns (accuracy, loss); return (loss, accuracy)",
            lambda model, x, y: mlp.evaluate(model, x, y)[::-1]),
]


def _evaluate_outcome(fn, args):
    result = fn(*args)
    try:
        loss, accuracy = (float(v) for v in result)
    except Exception:
        raise AssertionError(f"evaluate returned {result!r}; it must return (loss, accuracy), two numbers") from None
    return (np.array([loss, accuracy]),) + _parts(args[0])


def _explain_evaluate(got, expected, args):
    if close(got[0], expected[0], tol=TOL):
        return "evaluate changed the model's parameters or running statistics; evaluating must only read them"
    return (f"evaluate returned (loss, accuracy) = ({got[0][0]:.6g}, {got[0][1]:.6g}); the model in eval mode "
            f"gives ({expected[0][0]:.6g}, {expected[0][1]:.6g})")


def _evaluate_cases():
    """Models left in training mode, as a training loop leaves them, with the test set."""
    random_stats = _model(seed=1)
    rng = np.random.default_rng(3)
    for layer in random_stats.bn_layers:
        layer.running_mean = rng.normal(0.0, 0.5, layer.running_mean.shape)
        layer.running_var = rng.uniform(0.3, 3.0, layer.running_var.shape)
    x, y = _digits()[2:]
    return [("a BN model after 2 epochs of training", (_model(epochs=2), x, y)),
            ("an untrained BN model with random running statistics", (random_stats, x, y)),
            ("a BN model after 1 epoch, momentum 0.5", (_model(epochs=1, seed=3, momentum=0.5), x, y))]


def check_evaluate(student):
    """Hidden test of ``evaluate(model, x, y) -> (loss, accuracy)``: eval mode, and the model left unchanged."""
    _check(student, mlp.evaluate, EVALUATE_MISTAKES, "evaluate", _evaluate_cases(), _evaluate_outcome,
           _explain_evaluate)


# --- train_epoch ----------------------------------------------------------------------------------------------


def _train_epoch_variant(model, x, y, lr, batch_size, rng, set_train_mode=True, updates="every step"):
    """The reference loop with one thing wrong: no ``model.train()``, or ``updates`` "never" or "once"."""
    if set_train_mode:
        model.train()
    order = rng.permutation(len(x))
    losses = []
    for start in range(0, len(x) - batch_size + 1, batch_size):
        batch = order[start:start + batch_size]
        loss, dscores = mlp.softmax_cross_entropy(model.forward(x[batch]), y[batch])
        model.backward(dscores)
        if updates == "every step":
            model.run_update_ops()
        model.sgd_step(lr)
        losses.append(loss)
    if updates == "once":
        model.run_update_ops()
    return np.array(losses)


UPDATE_OPS_MESSAGE = ("the running statistics are never updated: a training-mode forward pass only queues their "
                      "update, like the ops in TensorFlow 1's tf.GraphKeys.UPDATE_OPS. Call model.run_update_ops() "
                      "after every forward pass, or evaluation will use running_mean = 0 and running_var = 1")

TRAIN_MISTAKES = [
    Mistake(UPDATE_OPS_MESSAGE, functools.partial(_train_epoch_variant, updates="never")),
    Mistake("the network trains in eval mode: call model.train() at the start of train_epoch. evaluate() leaves "
            "the model in eval mode, and an epoch in eval mode normalizes with the running statistics and "
            "never updates them", functools.partial(_train_epoch_variant, set_train_mode=False)),
    Mistake("the running statistics are updated once per epoch, from the last batch only: run the update ops "
            "after every training step", functools.partial(_train_epoch_variant, updates="once")),
]


def _train_outcome(fn, args):
    losses = fn(*args)
    try:
        losses = np.asarray(losses, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise AssertionError("train_epoch must return the array of the training losses of its steps") from None
    return _parts(args[0]) + (losses,)


def _explain_train(got, expected, args):
    params, running, momenta = _parts(args[0])  # before the epoch
    if close(got[1], running, tol=TOL) and not close(got[0], params, tol=TOL):
        return UPDATE_OPS_MESSAGE
    if not close(got[0], expected[0], tol=TOL):
        return ("after one epoch the parameters differ from the reference's: keep the given shuffling (one "
                "rng.permutation(len(x))) and batching, and take one SGD step per batch")
    if not close(got[1:3], expected[1:3], tol=TOL):
        return ("after one epoch the running statistics differ from the reference's: run model.run_update_ops() "
                "once after each training forward pass, and leave the momentum alone")
    return (f"train_epoch returned {got[3].size} losses that differ from the {expected[3].size} expected: "
            "return the training loss of every step, in order")


def _train_cases():
    """A fresh BN model left in eval mode (as evaluate leaves it), and a BN model trained for an epoch."""
    x, y = _digits()[:2]
    return [("a fresh BN model in eval mode, batches of 32",
             (_model().eval(), x, y, 0.1, 32, np.random.default_rng(7))),
            ("a BN model after one epoch, batches of 50",
             (_model(epochs=1, seed=2), x, y, 0.05, 50, np.random.default_rng(8)))]


def check_train_epoch(student):
    """Hidden test of ``train_epoch(model, x, y, lr, batch_size, rng) -> losses``."""
    _check(student, mlp.train_epoch, TRAIN_MISTAKES, "train_epoch", _train_cases(), _train_outcome, _explain_train)


# --- recalibrate ----------------------------------------------------------------------------------------------


def _recalibrate_blend(model, x):
    """The buggy version of the notebook: one training-mode pass, then the update ops at the layers' momentum."""
    model.train()
    model.forward(x)
    model.run_update_ops()
    model.eval()


def _recalibrate_without_restoring(model, x):
    for layer in model.bn_layers:
        layer.momentum = 1.0
    _recalibrate_blend(model, x)


def _recalibrate_in_eval_mode(model, x):
    model.eval()
    model.forward(x)
    model.run_update_ops()


def _recalibrate_by_batches(model, x, batch_size=64):
    momenta = [layer.momentum for layer in model.bn_layers]
    for layer in model.bn_layers:
        layer.momentum = 1.0
    model.train()
    for start in range(0, len(x) - batch_size + 1, batch_size):
        model.forward(x[start:start + batch_size])
        model.run_update_ops()
    for layer, momentum in zip(model.bn_layers, momenta):
        layer.momentum = momentum
    model.eval()


def _recalibrate_biased(model, x):
    mlp.recalibrate_bn(model, x)
    n = len(x)
    for layer in model.bn_layers:
        layer.running_var = layer.running_var * ((n - 1) / n)


RECALIBRATE_MISTAKES = [
    Mistake("recalibration blends the full-training-set statistics into the old running averages (one "
            "moving-average step at the layers' momentum) instead of replacing them: set each BN layer's "
            "momentum to 1 for this pass, then restore it", _recalibrate_blend),
    Mistake("recalibrate leaves momentum = 1 in the BN layers: restore each layer's momentum afterwards, or every "
            "later training step will overwrite the running statistics with those of a single batch",
            _recalibrate_without_restoring),
    Mistake("the running statistics did not change: the statistics come from a training-mode forward pass, "
            "whose queued updates model.run_update_ops() applies", _recalibrate_in_eval_mode),
    Mistake("the running statistics are those of the last mini-batch: pass the whole training set as one batch",
            _recalibrate_by_batches),
    Mistake("running_var is the biased variance of the training set (divided by N): the running statistics keep "
            "the unbiased one, divided by N - 1, as the queued batch statistics in layer.pending do",
            _recalibrate_biased),
]


def _recalibrate_outcome(fn, args):
    fn(*args)
    return _parts(args[0])


def _explain_recalibrate(got, expected, args):
    if not close(got[0], expected[0], tol=RECALIBRATE_TOL):
        return "recalibrate changed the weights; it must only replace the running statistics"
    if not close(got[2], expected[2], tol=RECALIBRATE_TOL):
        return "recalibrate changed the layers' momentum; restore the momentum each layer had"
    return ("the running statistics are not the mean and unbiased variance of each BN layer's input over the whole "
            "training set, computed in one training-mode pass")


def _recalibrate_cases():
    x = _digits()[0]
    return [("a BN model after 3 epochs, momentum 0.1", (_model(epochs=3), x)),
            ("a BN model after 1 epoch, momentum 0.01", (_model(epochs=1, seed=4, momentum=0.01), x)),
            ("an untrained BN model in eval mode", (_model(seed=5).eval(), x))]


def check_recalibrate(student):
    """Hidden test of ``recalibrate(model, x)``: running statistics of the whole training set, momentum kept."""
    _check(student, mlp.recalibrate_bn, RECALIBRATE_MISTAKES, "recalibrate", _recalibrate_cases(),
           _recalibrate_outcome, _explain_recalibrate, tol=RECALIBRATE_TOL)
