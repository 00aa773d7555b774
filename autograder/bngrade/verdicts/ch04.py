"""Verdicts of chapter 4, *Training with batch norm*: the find-and-fix-the-bug exercise (probes:
:mod:`bncapture.ch04`).

The probe ran the student's ``evaluate``, ``train_epoch`` and ``recalibrate`` on the notebook's own ``MLP``, built
from a public state, and recorded what each returned and the state it left the model in. Here the reference
(``bnref.mlp``, whose ``MLP`` the notebook's shares in behaviour) runs from the same state on the grader's own
copy of the data, and so does each known pitfall, a :class:`Mistake` whose ``fn`` is a buggy version of the
graded function: when the student's outcome matches one, the message names it.
"""
import copy
import functools

import numpy as np
from bnref import mlp

from bncapture import ch04 as probes

from bngrade.judge.compare import Mistake, close

TOL = (1e-6, 1e-9)  # float64 end to end; only the order of summation may differ
# recalibrate: a float64 mean or variance of N <= 2000 samples is exact to N * 2**-53 ~ 2e-13 of the largest
# statistic even with naive summation. On these cases the reference is exact to 1.6e-15 (measured against
# 80-bit long double), and the notebook's own layer and the correct alternatives of tests/test_verdicts_ch04.py
# (among them Chan's chunked update) agree with it to under 1e-4 of this tolerance. An atol of 1e-11 (scaled by
# the largest statistic) is 50 times the summation bound and over 5000 times the reference's error; the nearest
# wrong answer, the biased variance, is off by 1 / (N - 1) = 1.6e-3 (N = 640 here).
RECALIBRATE_TOL = (1e-9, 1e-11)
HIDDEN = range(len(probes.SIZES) - 2)  # the BN layers


def _reference_model(state, training):
    """``bnref.mlp.MLP(SIZES, bn=True)`` given ``state`` (:func:`bncapture.ch04.model_state`) and a mode."""
    model = mlp.MLP(probes.SIZES, bn=True)
    model.weights, model.biases[-1] = list(state["weights"]), state["bias"]
    for layer, values in zip(model.bn_layers, state["layers"]):
        for attr, value in values.items():
            setattr(layer, attr, value)
    return model.train() if training else model.eval()


def _state(model):
    """{field: value} of a reference model, for every field of :func:`bncapture.ch04.state_fields`."""
    top = {"weights": list(model.weights), "bias": model.biases[-1], "training": model.training}
    return {field: top[field] if index is None else getattr(model.bn_layers[index], attr)
            for field, index, attr in probes.state_fields()}


def _run(fn, case):
    """(result, state after) of ``fn(model, *data)`` on the reference model of ``case``, from the grader's own
    copy of the case (rebuilt by the public builders; nothing recorded in the sandbox goes in)."""
    state, training, *data = copy.deepcopy(case.args)
    model = _reference_model(state, training)
    result = fn(model, *data)
    return result, _state(model)


def _before(case):
    """The state of the case's model before any call."""
    return _run(lambda model, *data: None, case)[1]


def _recorded_state(r, key, case, name, expected):
    """{field: value} of the state the student's call left the model in, each shaped like ``expected``'s."""
    state = {}
    for field, index, attr in probes.state_fields():
        what = f"model.{attr}" if index is None else f"model.bn_layers[{index}].{attr}"
        state[field] = r.get(f"{key}.{field}", expected[field], f"{name}: {what}", f"{case.label}, read after the call")
    return state


def _result(r, key, like, name, label, hint):
    """The student's result at ``key``, shaped like ``like``; a result of another structure fails with ``hint``."""
    try:
        return r.get(key, like, name, label)
    except AssertionError as exc:
        if r.raised(key, name, label) is not None:
            raise
        raise AssertionError(f"{exc}: {hint}") from None


def _parts(state):
    """(parameters, running statistics, momenta) of a state, each flattened into one float array."""
    params = [*state["weights"], state["bias"]] + [state[f"bn{i}.{a}"] for i in HIDDEN for a in ("gamma", "beta")]
    running = [state[f"bn{i}.{a}"] for i in HIDDEN for a in ("running_mean", "running_var")]
    momenta = [[state[f"bn{i}.momentum"]] for i in HIDDEN]
    return tuple(np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in arrays])
                 for arrays in (params, running, momenta))


def _judge(r, name, cases, reference, mistakes, outcome, explain, tol, hint=None):
    """Compare ``outcome(result, state after)`` of the student's call with the reference's on every case, or name
    the mistake; returns the reference's results.

    Args:
        outcome: a tuple of arrays from a call's result and the state it left (:func:`_state`).
        explain: ``explain(got, expected, case)``, the message when no known mistake matches.
        hint: what to say of a result of the wrong structure; None: the result is not read here.
    """
    results = []
    for index, case in enumerate(cases):
        key = f"case{index}"
        result, state = _run(reference, case)
        results.append(result)
        r.get(f"{key}.model", None, "MLP", case.label)
        got_result = r.get(key, None, name, case.label) if hint is None else _result(r, key, result, name,
                                                                                     case.label, hint)
        got = outcome(got_result, _recorded_state(r, key, case, name, state))
        expected = outcome(result, state)
        if close(got, expected, tol=tol):
            continue
        for mistake in mistakes:
            try:
                wrong = outcome(*_run(mistake.fn, case))
            except Exception:  # the mistake does not apply to this case
                continue
            if close(got, wrong, tol=tol):
                raise AssertionError(f"{name}: {mistake.message} (on {case.label})")
        raise AssertionError(f"{name}: {explain(got, expected, case)} (on {case.label})")
    return results


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


def _evaluate_outcome(result, state):
    return (np.array(result, dtype=np.float64),) + _parts(state)


def _explain_evaluate(got, expected, case):
    if close(got[0], expected[0], tol=TOL):
        return "evaluate changed the model's parameters or running statistics; evaluating must only read them"
    return (f"it returned (loss, accuracy) = ({got[0][0]:.6g}, {got[0][1]:.6g}); the model in eval mode "
            f"gives ({expected[0][0]:.6g}, {expected[0][1]:.6g})")


def evaluate(r):
    """``evaluate(model, x, y) -> (loss, accuracy)``: eval mode, and the model's parameters and statistics kept."""
    _judge(r, "evaluate", probes.evaluate_cases(), mlp.evaluate, EVALUATE_MISTAKES, _evaluate_outcome,
           _explain_evaluate, TOL, hint="it must return (loss, accuracy), two numbers")


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


def _train_outcome(result, state):
    return _parts(state)


def _explain_train(got, expected, case):
    params, running, _ = _parts(_before(case))
    if close(got[1], running, tol=TOL) and not close(got[0], params, tol=TOL):
        return UPDATE_OPS_MESSAGE
    if not close(got[0], expected[0], tol=TOL):
        return ("after one epoch the parameters differ from the reference's: keep the given shuffling (one "
                "rng.permutation(len(x))) and batching, and take one SGD step per batch")
    return ("after one epoch the running statistics differ from the reference's: run model.run_update_ops() "
            "once after each training forward pass, and leave the momentum alone")


def train_epoch(r):
    """``train_epoch(model, x, y, lr, batch_size, rng) -> losses``: the model after one epoch, then the losses."""
    cases = probes.train_cases()
    expected = _judge(r, "train_epoch", cases, mlp.train_epoch, TRAIN_MISTAKES, _train_outcome, _explain_train, TOL)
    for index, (case, losses) in enumerate(zip(cases, expected)):
        got = _result(r, f"case{index}", losses, "train_epoch", case.label,
                      "train_epoch must return the array of the training losses of its steps, one per batch")
        if not close(got, losses, tol=TOL):
            raise AssertionError(f"train_epoch returned losses that differ from the training losses of the steps: "
                                 f"return the loss of every step, in order (on {case.label})")


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


def _recalibrate_outcome(result, state):
    """(parameters, running statistics, momenta, modes): modes 1 for training, 0 for eval."""
    modes = [state["training"]] + [state[f"bn{i}.training"] for i in HIDDEN]
    return _parts(state) + (np.array(modes, dtype=np.float64),)


def _explain_recalibrate(got, expected, case):
    if not close(got[0], expected[0], tol=RECALIBRATE_TOL):
        return "recalibrate changed the weights; it must only replace the running statistics"
    if not close(got[2], expected[2], tol=RECALIBRATE_TOL):
        return "recalibrate changed the layers' momentum; restore the momentum each layer had"
    if not close(got[1], expected[1], tol=RECALIBRATE_TOL):
        return ("the running statistics are not the mean and unbiased variance of each BN layer's input over the "
                "whole training set, computed in one training-mode pass")
    return "recalibrate should leave the model and each of its BN layers in eval mode: call model.eval() at the end"


def recalibrate(r):
    """``recalibrate(model, x)``: running statistics of the whole training set, momentum kept, eval mode."""
    _judge(r, "recalibrate", probes.recalibrate_cases(), mlp.recalibrate_bn, RECALIBRATE_MISTAKES,
           _recalibrate_outcome, _explain_recalibrate, RECALIBRATE_TOL)
