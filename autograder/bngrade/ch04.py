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

from .compare import Mistake, check_not_reference, close

TOL = (1e-6, 1e-9)  # float64 end to end; only the order of summation may differ
SIZES = (64, 40, 30, 10)
N_TRAIN = 640  # training samples the hidden tests use, to stay fast


@functools.lru_cache(maxsize=1)
def _digits():
    x_train, y_train, x_test, y_test = load_digits()
    return x_train[:N_TRAIN], y_train[:N_TRAIN], x_test, y_test


def _model(epochs=0, seed=0, bn=True, momentum=0.1, lr=0.1):
    """A small reference MLP, trained by the reference loop for ``epochs`` epochs, left in training mode."""
    x, y = _digits()[:2]
    model = mlp.MLP(SIZES, bn=bn, seed=seed, momentum=momentum)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        mlp.train_epoch(model, x, y, lr, 32, rng)
    return model.train()


def _state(model):
    """Every number the graded functions may change: parameters, then running statistics and momenta."""
    arrays = model.parameters() + [a for layer in model.bn_layers
                                   for a in (layer.running_mean, layer.running_var, [layer.momentum])]
    return np.concatenate([np.ravel(a) for a in arrays])


def _run(fn, name, *args):
    """Call the student's ``fn``; report a crash as a failed test that names the function."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise AssertionError(f"{name} is not implemented yet.") from None
    except Exception as exc:  # a student's bug: report it as a failed test
        raise AssertionError(f"{name} raised {type(exc).__name__}: {exc}") from None


def _check(student, reference, mistakes, name, cases, outcome, explain):
    """Compare ``outcome(student, args)`` with the reference's on every case, or name the mistake.

    Args:
        cases: (label, args) pairs; each function gets its own deep copy of ``args``.
        outcome: ``outcome(fn, args)`` runs ``fn(*args)`` and returns a flat float array.
        explain: ``explain(got, expected, label)``, the message when no known mistake matches.
    """
    check_not_reference(student, name)
    for label, args in cases:
        expected = outcome(reference, copy.deepcopy(args))
        got = outcome(lambda *a: _run(student, name, *a), copy.deepcopy(args))
        if close(got, expected, tol=TOL):
            continue
        for mistake in mistakes:
            try:
                wrong = outcome(mistake.fn, copy.deepcopy(args))
            except Exception:  # the mistake does not apply to this case
                continue
            if close(got, wrong, tol=TOL):
                raise AssertionError(f"{name}: {mistake.message} (on {label})")
        raise AssertionError(explain(got, expected, label))


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
    model, x, y = args
    result = fn(model, x, y)
    try:
        loss, accuracy = (float(v) for v in result)
    except Exception:
        raise AssertionError(f"evaluate returned {result!r}; it must return (loss, accuracy), two numbers") from None
    return np.concatenate([[loss, accuracy], _state(model)])


def _explain_evaluate(got, expected, label):
    if close(got[:2], expected[:2], tol=TOL):
        return (f"evaluate changed the model's parameters or running statistics (on {label}); "
                "evaluating must only read them")
    return (f"evaluate returned (loss, accuracy) = ({got[0]:.6g}, {got[1]:.6g}) on {label}; the model in eval "
            f"mode gives ({expected[0]:.6g}, {expected[1]:.6g})")


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
            ("a model without BN", (_model(epochs=1, bn=False), x, y))]


def check_evaluate(student):
    """Hidden test of ``evaluate(model, x, y) -> (loss, accuracy)``: eval mode, and the model is left unchanged."""
    _check(student, mlp.evaluate, EVALUATE_MISTAKES, "evaluate", _evaluate_cases(), _evaluate_outcome,
           _explain_evaluate)


# --- train_epoch ----------------------------------------------------------------------------------------------


def _variant_train_epoch(model, x, y, lr, batch_size, rng, mode="train", updates="every step"):
    """The reference loop with one knob wrong: ``mode`` "train"/"as found", ``updates`` "every step"/"never"/"once"."""
    if mode == "train":
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


TRAIN_MISTAKES = [
    Mistake("the running statistics are never updated: a training-mode forward pass only queues their update, "
            "like the ops in TensorFlow 1's tf.GraphKeys.UPDATE_OPS. Call model.run_update_ops() after every "
            "forward pass, or evaluation will use running_mean = 0 and running_var = 1",
            functools.partial(_variant_train_epoch, updates="never")),
    Mistake("train_epoch trains the network in eval mode: call model.train() at the start (evaluate() leaves "
            "the model in eval mode, so the next epoch would normalize with the running statistics and never "
            "update them)", functools.partial(_variant_train_epoch, mode="as found")),
    Mistake("the running statistics are updated once per epoch, with the last batch only: run the update ops "
            "after every training step", functools.partial(_variant_train_epoch, updates="once")),
]


def _train_outcome(fn, args):
    model = args[0]
    losses = fn(*args)
    try:
        losses = np.asarray(losses, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise AssertionError("train_epoch must return the array of the training losses of its steps") from None
    return np.concatenate([_state(model), losses])


def _explain_train(got, expected, label):
    n_state = len(expected) - len(expected[len(expected):])  # placeholder, replaced below
    return n_state


def _train_cases():
    """A fresh BN model left in eval mode (as evaluate leaves it), and one trained for an epoch."""
    x, y = _digits()[:2]
    return [("a fresh BN model in eval mode, batches of 32", (_model().eval(), x, y, 0.1, 32, np.random.default_rng(7))),
            ("a BN model after one epoch, batches of 50", (_model(epochs=1, seed=2), x, y, 0.05, 50,
                                                           np.random.default_rng(8)))]


def check_train_epoch(student):
    """Hidden test of ``train_epoch(model, x, y, lr, batch_size, rng) -> losses``."""
    cases = _train_cases()

    def explain(got, expected, label):
        model = cases[0][1][0]
        n_state = len(_state(model))
        if len(got) != len(expected):
            return (f"train_epoch returned {len(got) - n_state} losses on {label}, expected one per step "
                    f"({len(expected) - n_state}): keep the given batching")
        running = [i for i in range(n_state) if i >= len(model.parameters() and np.concatenate(
            [np.ravel(p) for p in model.parameters()]))]
        return f"{running}"

    _check(student, mlp.train_epoch, TRAIN_MISTAKES, "train_epoch", cases, _train_outcome, explain)
