"""Probes of chapter 4, *Training with batch norm*: the models, the data and the calls; the verdicts are the grader's.

The graded functions take a model. The notebook's locked ``framework`` cell defines ``MLP`` (with its
``BatchNormLayer``), and the definitions of locked cells run in the probe's namespace, so a probe builds each
model there: ``MLP(SIZES)`` given the parameters and running statistics of a public :func:`model_state`, put in
training or eval mode. The student's function then runs on that live model, with copies of the data (a subset of
scikit-learn's digits, :func:`digits`), and the probe records what the call returned and the state it left the
model in (:func:`record_state`). The verdict runs the reference (``bnref.mlp``) from the same state on its own
copy of the data; nothing that the student's call returned or left in the model goes into it.
"""
import functools

import numpy as np

from .cases import Case, generator

SIZES = (64, 40, 30, 10)
N_TRAIN, N_TEST = 640, 449
#: what a verdict reads of each BN layer after a call
LAYER_STATE = ("gamma", "beta", "running_mean", "running_var", "momentum", "training")


@functools.lru_cache(maxsize=1)
def _digit_images():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data / 16.0, bunch.target.astype(np.int64)


def digits():
    """(x_train (640, 64), y_train (640,), x_test (449, 64), y_test (449,)): the 8x8 digits, pixels scaled to
    [0, 1], test set and training subset drawn by one permutation (seed 0); fresh arrays on every call."""
    x, y = _digit_images()
    order = generator(0).permutation(len(y))
    test, train = order[:N_TEST], order[N_TEST:N_TEST + N_TRAIN]
    return x[train], y[train], x[test], y[test]


def model_state(seed, momentum=0.1):
    """A random state of ``MLP(SIZES)``, unlike that of any batch.

    Returns:
        {"weights": [(D_in, D_out)] He-scaled, "bias": (10,), "layers": [{"gamma", "beta", "running_mean",
        "running_var": (width,) each, "momentum": float}] one per BN layer}.
    """
    rng = generator(seed)
    weights = [rng.normal(0.0, np.sqrt(2.0 / a), (a, b)) for a, b in zip(SIZES[:-1], SIZES[1:])]
    layers = [{"gamma": rng.uniform(0.5, 1.5, d), "beta": rng.normal(0.0, 0.3, d),
               "running_mean": rng.normal(0.0, 0.5, d), "running_var": rng.uniform(0.3, 3.0, d),
               "momentum": momentum} for d in SIZES[1:-1]]
    return {"weights": weights, "bias": rng.normal(0.0, 0.1, SIZES[-1]), "layers": layers}


def evaluate_cases():
    """Cases (state, training, x_test, y_test): models left in training mode, as a training loop leaves them."""
    _, _, x, y = digits()
    return [Case((model_state(1), True, x, y), "a BN model in training mode with random running statistics"),
            Case((model_state(2, momentum=0.5), True, x, y), "a BN model in training mode, momentum 0.5"),
            Case((model_state(3), True, x[:45], y[:45]), "a BN model in training mode, the first 45 test images")]


def train_cases():
    """Cases (state, training, x, y, lr, batch_size, rng): a fresh shuffling generator on every call."""
    x, y, _, _ = digits()
    return [Case((model_state(4), False, x, y, 0.1, 32, generator(7)),
                 "a BN model in eval mode (as evaluate leaves it), batches of 32"),
            Case((model_state(5, momentum=0.3), True, x, y, 0.05, 50, generator(8)),
                 "a BN model in training mode, momentum 0.3, batches of 50")]


def recalibrate_cases():
    """Cases (state, training, x_train)."""
    x = digits()[0]
    return [Case((model_state(6), True, x), "a BN model in training mode, momentum 0.1"),
            Case((model_state(7, momentum=0.01), True, x), "a BN model in training mode, momentum 0.01"),
            Case((model_state(8), False, x), "a BN model in eval mode")]


def build_model(cls, state, training):
    """``cls(SIZES)`` (the notebook's ``MLP``) given ``state`` (:func:`model_state`) and a mode."""
    model = cls(SIZES)
    model.weights, model.bias = list(state["weights"]), state["bias"]
    for layer, values in zip(model.bn_layers, state["layers"]):
        for attr, value in values.items():
            setattr(layer, attr, value)
    return model.train() if training else model.eval()


def state_fields():
    """[(field, BN layer index or None, attribute)]: what :func:`record_state` reads, in order."""
    fields = [("weights", None, "weights"), ("bias", None, "bias"), ("training", None, "training")]
    return fields + [(f"bn{i}.{attr}", i, attr) for i in range(len(SIZES) - 2) for attr in LAYER_STATE]


def _layer(model, index):
    """``model.bn_layers[index]``, or None when the student's call left no such layer."""
    try:
        return model.bn_layers[index]
    except Exception:
        return None


def record_state(p, key, model):
    """Record the model's state under ``key.<field>`` for every field of :func:`state_fields`."""
    for field, index, attr in state_fields():
        p.read(f"{key}.{field}", model if index is None else _layer(model, index), attr)


def _on_model(p, key, fn, case, keep=None):
    """Build the case's model (``key.model``), call ``fn(model, *data)`` on it (``key``), record its state."""
    state, training, *data = case.args
    model = p.call(f"{key}.model", build_model, p.student("MLP"), state, training, keep=lambda m: None)
    if model is None:
        return
    p.call(key, lambda *args: fn(model, *args), *data, keep=keep)
    record_state(p, key, model)


def _sequence(result):
    """A tuple or list result as a tuple, anything else as it is (a verdict reads it against what it expects)."""
    return tuple(result) if isinstance(result, (tuple, list)) else result


def _losses(result):
    """A list or tuple of losses as a float array, anything else as it is."""
    return np.asarray(result, dtype=np.float64) if isinstance(result, (tuple, list)) else result


def evaluate(p):
    """(loss, accuracy) and the model's state after ``evaluate(model, x, y)``, on every case."""
    fn = p.student("evaluate")
    for index, case in enumerate(evaluate_cases()):
        _on_model(p, f"case{index}", fn, case, keep=_sequence)


def train_epoch(p):
    """The losses and the model's state after ``train_epoch(model, x, y, lr, batch_size, rng)``, on every case."""
    fn = p.student("train_epoch")
    for index, case in enumerate(train_cases()):
        _on_model(p, f"case{index}", fn, case, keep=_losses)


def recalibrate(p):
    """The model's state after ``recalibrate(model, x)``, on every case (what it returns is not read)."""
    fn = p.student("recalibrate")
    for index, case in enumerate(recalibrate_cases()):
        _on_model(p, f"case{index}", fn, case, keep=lambda result: None)
