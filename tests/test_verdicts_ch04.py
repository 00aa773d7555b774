"""Chapter 4's hidden checks, differential: the solution, correct alternatives, every seeded mistake and hostile
answers, each run through its probe and its verdict (``check("ch04.<name>", namespace)``), in-process.

A student's namespace is built as the sandbox builds it (:func:`bncapture.answers.build_namespace`): the answer
cells and the locked cells' definitions, among them the ``framework`` cell's ``MLP``, on which the probes run.
"""
import copy
import functools

import jupytext
import numpy as np
import pytest

import differential
from bncapture import ch04 as probes
from bncapture.answers import build_namespace
from bngrade.judge import check as check_module
from bngrade.judge.check import check
from bngrade.pipeline.course import SOURCES
from bngrade.verdicts import ch04
from class_roster import ROSTER
from submissions import solution_cells

ASSIGNMENT = "ch04_training_with_bn"
CHECKS = ("evaluate", "train_epoch", "recalibrate")
NOTEBOOK = jupytext.read(SOURCES / f"{ASSIGNMENT}.md")


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("BNREF_PROGRESS", "0")


def namespace_of(replace=None, **cells):
    """The probe's namespace of the solved source, its answer cells replaced by ``cells[grade_id]`` if given and
    edited by ``replace`` {grade_id: [(old, new)]} (each ``old`` must occur), as tests/class_roster.py seeds them."""
    answers = {**solution_cells(ASSIGNMENT), **cells}
    notebook = copy.deepcopy(NOTEBOOK)
    for cell in notebook.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
            for old, new in (replace or {}).get(grade_id, []):
                assert old in cell.source, old
                cell.source = cell.source.replace(old, new)
    namespace, problems = build_namespace(notebook.cells, 60, isolate=False)
    assert problems == {}, problems
    return namespace


fails = functools.partial(differential.fails, "ch04")


def test_the_solution_passes():
    differential.passes("ch04", CHECKS, namespace_of())


# Correct alternatives, each written differently from the solution

EVALUATE_BY_BATCHES = '''
def evaluate(model, x, y):
    """Mini-batches of 100 in eval mode, the loss weighted by batch size; the mode it found is restored."""
    was_training = model.training
    model.eval()
    total, hits = 0.0, 0
    for start in range(0, len(x), 100):
        xb, yb = x[start:start + 100], y[start:start + 100]
        scores = model.forward(xb)
        loss, _ = softmax_cross_entropy(scores, yb)
        total += loss * len(yb)
        hits += int((scores.argmax(axis=1) == yb).sum())
    if was_training:
        model.train()
    return total / len(x), hits / len(x)
'''

EVALUATE_OWN_LOSS = '''
def evaluate(model, x, y):
    """Its own log-softmax, a list of two Python floats."""
    model.eval()
    scores = model.forward(x)
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -np.mean(log_probs[np.arange(len(y)), y])
    return [float(loss), np.count_nonzero(np.argmax(scores, 1) == y) / len(y)]
'''

TRAIN_UPDATES_AFTER_THE_STEP = '''
def train_epoch(model, x, y, lr, batch_size, rng):
    """The update ops after the SGD step (which does not touch the queued statistics); a list of losses."""
    model.train()
    order = rng.permutation(len(x))
    losses = []
    for i in range(len(x) // batch_size):
        batch = order[i * batch_size:(i + 1) * batch_size]
        loss, dscores = softmax_cross_entropy(model.forward(x[batch]), y[batch])
        model.backward(dscores)
        model.sgd_step(lr)
        model.run_update_ops()
        losses.append(loss)
    return losses
'''

TRAIN_OWN_SGD = '''
def train_epoch(model, x, y, lr, batch_size, rng):
    """Batches as rows of a reshaped permutation; the update ops right after the forward pass; every gradient
    computed first, then all parameters updated at the end of the step by its own SGD."""
    order = rng.permutation(len(x))
    steps = len(x) // batch_size
    losses = np.zeros(steps)
    for step, batch in enumerate(order[:steps * batch_size].reshape(steps, batch_size)):
        model.train()
        scores = model.forward(x[batch])
        model.run_update_ops()
        losses[step], dscores = softmax_cross_entropy(scores, y[batch])
        model.backward(dscores)
        params = model.weights + [model.bias] + [p for layer in model.bn_layers for p in (layer.gamma, layer.beta)]
        grads = model.dweights + [model.dbias] + [g for layer in model.bn_layers for g in (layer.dgamma, layer.dbeta)]
        for param, grad in zip(params, grads):
            param -= lr * grad
    return losses
'''

RECALIBRATE_FROM_PENDING = '''
def recalibrate(model, x):
    """The queued full-batch statistics assigned directly, instead of a momentum of 1."""
    model.train()
    model.forward(x)
    for layer in model.bn_layers:
        layer.running_mean, layer.running_var = layer.pending
        layer.pending = None
    model.eval()
'''

RECALIBRATE_CUMULATIVE = '''
def recalibrate(model, x):
    """Layer by layer, cumulative averages over chunks of the layer's input (Chan et al.'s update), each layer
    then normalized as a full-batch training pass would (biased variance); no forward pass of the model."""
    h = x
    for w, layer in zip(model.weights, model.bn_layers):
        z = h @ w
        count, mean, m2 = 0, np.zeros(z.shape[1]), np.zeros(z.shape[1])
        for chunk in np.array_split(z, 7):
            n = len(chunk)
            chunk_mean = chunk.mean(axis=0)
            delta = chunk_mean - mean
            total = count + n
            mean = mean + delta * n / total
            m2 = m2 + ((chunk - chunk_mean) ** 2).sum(axis=0) + delta ** 2 * count * n / total
            count = total
        layer.running_mean, layer.running_var = mean, m2 / (count - 1)
        h = np.maximum(layer.gamma * (z - mean) / np.sqrt(m2 / count + layer.eps) + layer.beta, 0.0)
    model.eval()
'''

RECALIBRATE_MOMENTUM_NONE = '''
def recalibrate(model, x):
    """PyTorch's momentum=None: a cumulative moving average of the batches (here one, the whole set, so a
    momentum of 1/1); the modes set by hand."""
    saved = {id(layer): layer.momentum for layer in model.bn_layers}
    model.train()
    for seen, batch in enumerate([x], start=1):
        for layer in model.bn_layers:
            layer.momentum = 1.0 / seen
        model.forward(batch)
        model.run_update_ops()
    for layer in model.bn_layers:
        layer.momentum = saved[id(layer)]
        layer.training = False
    model.training = False
'''

ALTERNATIVES = {"evaluate": [EVALUATE_BY_BATCHES, EVALUATE_OWN_LOSS],
                "train_epoch": [TRAIN_UPDATES_AFTER_THE_STEP, TRAIN_OWN_SGD],
                "recalibrate": [RECALIBRATE_FROM_PENDING, RECALIBRATE_CUMULATIVE, RECALIBRATE_MOMENTUM_NONE]}


@pytest.mark.parametrize("name,source", [(n, s) for n, sources in ALTERNATIVES.items() for s in sources],
                         ids=lambda v: v.split('"""')[1][:40] if "def " in v else v)
def test_a_correct_alternative_passes(name, source):
    check(f"ch04.{name}", namespace_of(**{name: source}))


# Every seeded mistake of the verdicts, answered by a student: named by its own message

MISTAKES = ([("evaluate", m) for m in ch04.EVALUATE_MISTAKES] + [("train_epoch", m) for m in ch04.TRAIN_MISTAKES]
            + [("recalibrate", m) for m in ch04.RECALIBRATE_MISTAKES])


@pytest.mark.parametrize("name,mistake", MISTAKES, ids=lambda v: v if isinstance(v, str) else v.message[:40])
def test_each_mistake_is_named(name, mistake, monkeypatch):
    """The mistake itself as the student's function, on the notebook's MLP (it is written with bnref.mlp's
    softmax, which the reference-package guard would refuse: the guard is tested apart)."""
    monkeypatch.setattr(check_module, "_reference_names", lambda names, namespace: [])
    namespace = namespace_of()
    namespace[name] = mistake.fn
    fails(name, namespace, f"{name}: {mistake.message}")


def test_the_messages_name_the_fix():
    messages = " ".join(m.message for _, m in MISTAKES)
    for fix in ("call model.eval() first", "model.run_update_ops()", "UPDATE_OPS", "call model.train()",
                "momentum to 1"):
        assert fix in messages


def test_update_ops_never_run_is_named_even_when_the_batching_differs():
    source = '''
def train_epoch(model, x, y, lr, batch_size, rng):
    model.train()
    for start in range(0, len(x) - batch_size + 1, batch_size):
        scores = model.forward(x[start:start + batch_size])
        model.backward(softmax_cross_entropy(scores, y[start:start + batch_size])[1])
        model.sgd_step(lr)
    return np.zeros(len(x) // batch_size)
'''
    fails("train_epoch", namespace_of(train_epoch=source), "the running statistics are never updated")


def test_other_train_epoch_differences_get_a_clear_message():
    two_epochs = '''
def train_epoch(model, x, y, lr, batch_size, rng):
    for _ in range(2):
        losses = train_epoch_buggy(model, x, y, lr, batch_size, rng)
        model.run_update_ops()
    return losses
'''
    fails("train_epoch", namespace_of(train_epoch=two_epochs), "keep the given shuffling")


def test_losses_that_are_not_the_step_losses_are_named():
    means = '''
def train_epoch(model, x, y, lr, batch_size, rng):
    model.train()
    order = rng.permutation(len(x))
    losses = []
    for start in range(0, len(x) - batch_size + 1, batch_size):
        batch = order[start:start + batch_size]
        loss, dscores = softmax_cross_entropy(model.forward(x[batch]), y[batch])
        model.backward(dscores)
        model.run_update_ops()
        model.sgd_step(lr)
        losses.append(loss)
    return np.cumsum(losses) / np.arange(1, len(losses) + 1)
'''
    fails("train_epoch", namespace_of(train_epoch=means), "return the loss of every step, in order")
    one_more = means.replace("return np.cumsum(losses) / np.arange(1, len(losses) + 1)", "return losses + [0.0]")
    fails("train_epoch", namespace_of(train_epoch=one_more), "one per batch")


def test_a_crashing_or_unfinished_function_is_reported():
    namespace = namespace_of(evaluate="def evaluate(model, x, y):\n    raise NotImplementedError()\n",
                             recalibrate="def recalibrate(model, x):\n    model.no_such_method()\n")
    fails("evaluate", namespace, "evaluate is not implemented yet")
    fails("recalibrate", namespace, "recalibrate raised AttributeError")
    fails("evaluate", namespace_of(evaluate="def evaluate(model, x, y):\n    return 0.5\n"),
          "return (loss, accuracy)")


def test_recalibrate_must_leave_eval_mode():
    source = solution_cells(ASSIGNMENT)["recalibrate"].replace("model.eval()", "model.train()")
    fails("recalibrate", namespace_of(recalibrate=source), "in eval mode")


# Hostile answers: no gain over an honest wrong answer, and a message that says why

HOSTILE = {
    "trains on labels it zeroed in place": ("train_epoch", TRAIN_UPDATES_AFTER_THE_STEP.replace(
        "model.train()", "y[...] = 0\n    model.train()"), "after one epoch the parameters differ"),
    "evaluates on data it zeroed in place": ("evaluate", '''
def evaluate(model, x, y):
    x[...] = 0.0
    model.eval()
    scores = model.forward(x)
    return softmax_cross_entropy(scores, y)[0], np.mean(scores.argmax(axis=1) == y)
''', "evaluate: it returned (loss, accuracy)"),
    "running statistics that read as zeros once": ("recalibrate", '''
class _Once:
    def __get__(self, layer, owner):
        if not layer.__dict__.get("read"):
            layer.__dict__["read"] = True
            return np.zeros_like(layer.__dict__["_mean"])
        return layer.__dict__["_mean"]

    def __set__(self, layer, value):
        layer.__dict__["_mean"] = value


class _Sneaky(BatchNormLayer):
    running_mean = _Once()


def recalibrate(model, x):
    """Right, but the running mean reads as zeros the first time."""
    _recalibrate(model, x)
    for layer in model.bn_layers:
        mean = layer.__dict__.pop("running_mean")
        layer.__class__ = _Sneaky
        layer.running_mean = mean
''' + RECALIBRATE_FROM_PENDING.replace("def recalibrate", "def _recalibrate"), "recalibrate:"),
    "running statistics kept as (1, D) rows": ("recalibrate", '''
def recalibrate(model, x):
    model.train()
    model.forward(x)
    for layer in model.bn_layers:
        mean, var = layer.pending
        layer.running_mean, layer.running_var, layer.pending = mean[None, :], var[None, :], None
    model.eval()
''', "model.bn_layers[0].running_mean returned shape (1, 40), expected (40,)"),
    "running statistics of shape (0, D)": ("recalibrate", '''
def recalibrate(model, x):
    for layer in model.bn_layers:
        layer.running_mean = layer.running_var = np.zeros((0, len(layer.gamma)))
    model.eval()
''', "returned shape (0, 40), expected (40,)"),
    "a huge running mean": ("recalibrate", '''
def recalibrate(model, x):
    for layer in model.bn_layers:
        layer.running_mean = np.zeros((1_000_000, 1, 1))
    model.eval()
''', "returned shape (1000000, 1, 1), expected (40,)"),
    "no BN layers left": ("recalibrate", '''
def recalibrate(model, x):
    model.bn_layers = []
''', "model.bn_layers[0].gamma raised AttributeError"),
    "a huge result": ("evaluate", '''
def evaluate(model, x, y):
    return np.ones((1_000_000, 1))
''', "return (loss, accuracy)"),
    "swaps the framework's MLP for its own": ("evaluate", '''
class MLP:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("no model today")


def evaluate(model, x, y):
    return 0.0, 1.0
''', "MLP raised RuntimeError"),
}


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_a_hostile_answer_gets_nothing(what):
    name, source, says = HOSTILE[what]
    fails(name, namespace_of(**{name: source}), says)


def test_the_reference_package_is_refused():
    from bnref import mlp

    namespace = namespace_of()
    namespace["recalibrate"] = mlp.recalibrate_bn
    fails("recalibrate", namespace, "reference package")


def test_the_cases_tell_the_modes_and_the_statistics_apart():
    """Models in training mode with running statistics unlike any batch's; an epoch that starts in eval mode."""
    for (state, training, *data) in (c.args for c in probes.evaluate_cases()):
        assert training and all(np.ptp(layer["running_var"]) > 1 for layer in state["layers"])
    assert [c.args[1] for c in probes.train_cases()][0] is False  # as evaluate leaves a model
    assert len(probes.digits()[0]) == probes.N_TRAIN and len(probes.digits()[2]) == probes.N_TEST


# The seeded class of the grading tests, judged in-process

@pytest.mark.parametrize("student", [s for s, spec in ROSTER[ASSIGNMENT].items() if spec is not None])
def test_the_roster_loses_exactly_its_cells(student):
    spec = ROSTER[ASSIGNMENT][student]
    namespace = namespace_of(spec.get("replace"), **spec.get("override", {}))
    lost, messages = differential.lost_cells(ASSIGNMENT, namespace)
    assert lost == spec.get("lose", set()), messages
    if "says" in spec:
        assert any(spec["says"] in m for m in messages), messages
