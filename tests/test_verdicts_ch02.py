"""Differential tests of chapter 2's checks: the solution, every seeded mistake, correct alternatives written
differently from the solution, and the free-points holes of the old judge."""
import re

import numpy as np
import pytest

import bnref
from bngrade.judge import check as checking
from bngrade.judge.check import check
from bngrade.verdicts import ch02
from bngrade.verdicts.questions import QUESTIONS


@pytest.fixture(autouse=True)
def own_code_here(request, monkeypatch):
    """Student code written in this module may use bnref as a building block; that rule is tested apart."""
    if "reference_package" not in request.node.name:
        monkeypatch.setattr(checking, "_reference_names", lambda names, namespace: [])


def _shape_checks(x, gamma, beta):
    if np.ndim(x) != 2:
        raise ValueError(f"x must be (N, D), got {np.shape(x)}")
    if np.shape(gamma) != (x.shape[1],) or np.shape(beta) != (x.shape[1],):
        raise ValueError(f"gamma and beta must be ({x.shape[1]},)")
    if x.shape[0] < 2:
        raise ValueError("N >= 2 in training mode")


def forward_cs231n(x, gamma, beta, eps=1e-5):
    """CS231n's layout: a 7-tuple cache, keepdims statistics, float64 internals."""
    _shape_checks(x, gamma, beta)
    mu = x.mean(axis=0, keepdims=True, dtype=np.float64)
    var = ((x - mu) ** 2).mean(axis=0, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + eps)
    out = (gamma * x_hat + beta).astype(x.dtype)
    return out, (x, x_hat, mu, var, gamma, beta, eps)


def forward_einsum(x, gamma, beta, eps=1e-5):
    """einsum sums and a dict cache with many keys."""
    _shape_checks(x, gamma, beta)
    n = x.shape[0]
    mu = np.einsum("nd->d", x) / n
    xc = x - mu
    var = np.einsum("nd,nd->d", xc, xc) / n
    out = xc * (gamma / np.sqrt(var + eps)) + beta
    return out.astype(x.dtype), {k: v for k, v in zip("abcdefghijklmn", (x, xc, mu, var, gamma, beta, eps, out))}


def forward_welford(x, gamma, beta, eps=1e-5):
    """Welford's one pass over the rows in float64, an empty cache."""
    _shape_checks(x, gamma, beta)
    mean, m2 = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for k, row in enumerate(x.astype(np.float64), start=1):
        delta = row - mean
        mean += delta / k
        m2 += delta * (row - mean)
    var = m2 / x.shape[0]
    return (gamma * ((x - mean) / np.sqrt(var + eps)) + beta).astype(x.dtype), ()


def forward_np_var(x, gamma, beta, eps=1e-5):
    """np.var in float64, a list cache."""
    _shape_checks(x, gamma, beta)
    var = np.var(x, axis=0, dtype=np.float64)
    out = gamma * (x - x.mean(axis=0, dtype=np.float64)) / np.sqrt(var + eps) + beta
    return out.astype(x.dtype), [var, gamma]


FORWARDS = [bnref.batchnorm_forward, forward_cs231n, forward_einsum, forward_welford, forward_np_var]


def inference_folded(x, gamma, beta, running_mean, running_var, eps=1e-5):
    scale = gamma / np.sqrt(running_var + eps)
    return (x * scale + (beta - running_mean * scale)).astype(x.dtype)


def inference_rows(x, gamma, beta, running_mean, running_var, eps=1e-5):
    out = np.empty_like(x)
    for i, row in enumerate(x):
        out[i] = gamma * (row - running_mean) / np.sqrt(running_var + eps) + beta
    return out


def running_in_place_on_copies(running_mean, running_var, x, momentum=0.1):
    mean, var = running_mean.copy(), running_var.copy()
    mean *= 1 - momentum
    mean += momentum * x.mean(0)
    var *= 1 - momentum
    var += momentum * x.var(0) * x.shape[0] / (x.shape[0] - 1)
    return mean, var


def running_lerp(running_mean, running_var, x, momentum=0.1):
    n = x.shape[0]
    unbiased = ((x - x.mean(0)) ** 2).sum(0) / (n - 1)
    return running_mean + momentum * (x.mean(0) - running_mean), running_var + momentum * (unbiased - running_var)


class LayerDictState:
    """Another layer: state in a dict behind properties, the functional forms inlined, train/eval as flags."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        self.state = {"gamma": np.ones(num_features), "beta": np.zeros(num_features),
                      "running_mean": np.zeros(num_features), "running_var": np.ones(num_features)}
        self.eps, self.momentum, self.mode = eps, momentum, "train"

    gamma = property(lambda s: s.state["gamma"], lambda s, v: s.state.__setitem__("gamma", v))
    beta = property(lambda s: s.state["beta"], lambda s, v: s.state.__setitem__("beta", v))
    running_mean = property(lambda s: s.state["running_mean"])
    running_var = property(lambda s: s.state["running_var"])

    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"

    def forward(self, x):
        if self.mode == "eval":
            return inference_folded(x, self.gamma, self.beta, self.running_mean, self.running_var, self.eps)
        out, _ = forward_einsum(x, self.gamma, self.beta, self.eps)
        self.state["running_mean"], self.state["running_var"] = running_lerp(
            self.running_mean, self.running_var, x, self.momentum)
        return out


@pytest.mark.parametrize("forward", FORWARDS, ids=lambda f: f.__name__)
def test_every_correct_forward_passes_both_checks(forward):
    check("ch02.batchnorm_forward", {"batchnorm_forward": forward})
    check("ch02.forward_rejects_bad_input", {"batchnorm_forward": forward})


@pytest.mark.parametrize("inference", [bnref.batchnorm_inference, inference_folded, inference_rows],
                         ids=lambda f: f.__name__)
def test_every_correct_inference_passes(inference):
    check("ch02.batchnorm_inference", {"batchnorm_inference": inference})


@pytest.mark.parametrize("update", [bnref.update_running_stats, running_in_place_on_copies, running_lerp],
                         ids=lambda f: f.__name__)
def test_every_correct_running_update_passes(update):
    check("ch02.update_running_stats", {"update_running_stats": update})


@pytest.mark.parametrize("layer", [bnref.BatchNorm1d, LayerDictState], ids=lambda c: c.__name__)
def test_every_correct_layer_passes(layer):
    check("ch02.batchnorm1d", {"BatchNorm1d": layer})


@pytest.mark.parametrize("convert", [lambda m: 1 - m, lambda m: round(1.0 - m, 12), lambda m: np.subtract(1.0, m)])
def test_keras_momentum_conversions_pass(convert):
    check("ch02.keras_momentum_to_torch", {"keras_momentum_to_torch": convert})


@pytest.mark.parametrize("mistake", ch02.FORWARD_MISTAKES, ids=lambda m: m.message[:40])
def test_each_forward_mistake_is_named(mistake):
    def student(x, gamma, beta, eps=1e-5):
        _shape_checks(x, gamma, beta)
        return mistake.fn(x, gamma, beta, eps).astype(x.dtype), (x, gamma)

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        check("ch02.batchnorm_forward", {"batchnorm_forward": student})


@pytest.mark.parametrize("mistake", ch02.INFERENCE_MISTAKES, ids=lambda m: m.message[:40])
def test_each_inference_mistake_is_named(mistake):
    with pytest.raises(AssertionError, match=re.escape(mistake.message[:25])):
        check("ch02.batchnorm_inference", {"batchnorm_inference": mistake.fn})


@pytest.mark.parametrize("mistake", ch02.RUNNING_MISTAKES, ids=lambda m: m.message[:40])
def test_each_running_stats_mistake_is_named(mistake):
    with pytest.raises(AssertionError, match=re.escape(mistake.message[:25])):
        check("ch02.update_running_stats", {"update_running_stats": mistake.fn})


def test_a_forward_without_input_checks_is_named():
    def student(x, gamma, beta, eps=1e-5):
        return gamma * (x - x.mean(0)) / np.sqrt(x.var(0) + eps) + beta, None

    with pytest.raises(AssertionError, match="batchnorm_forward accepted a 1-D x; it must raise ValueError"):
        check("ch02.forward_rejects_bad_input", {"batchnorm_forward": student})


def test_in_place_modification_is_named():
    def student(rm, rv, x, momentum=0.1):
        rm *= 1 - momentum
        rm += momentum * x.mean(0)
        rv *= 1 - momentum
        rv += momentum * x.var(0, ddof=1)
        return rm, rv

    with pytest.raises(AssertionError, match="modifies its input arrays in place"):
        check("ch02.update_running_stats", {"update_running_stats": student})


def test_float64_output_for_float32_input_is_named():
    def student(x, gamma, beta, eps=1e-5):
        out, cache = bnref.batchnorm_forward(x.astype(np.float64), gamma.astype(np.float64),
                                             beta.astype(np.float64), eps)
        return out, cache

    with pytest.raises(AssertionError, match="float32 in, float32 out"):
        check("ch02.batchnorm_forward", {"batchnorm_forward": student})


def test_eval_mode_with_batch_statistics_is_named():
    class EvalUsesBatch(bnref.BatchNorm1d):
        def forward(self, x):
            self.train()
            return super().forward(x)

    with pytest.raises(AssertionError, match="in eval mode your layer normalizes with the batch statistics"):
        check("ch02.batchnorm1d", {"BatchNorm1d": EvalUsesBatch})


def test_a_layer_that_computes_nothing_gains_nothing_from_its_own_attributes():
    """The old judge built torch's reference from ``layer.gamma`` read back, and broadcast (0, D) buffers."""
    class Nothing:
        def __init__(self, d, momentum=0.1):
            self.d = d

        gamma = property(lambda s: np.zeros(s.d), lambda s, v: None)
        beta = property(lambda s: np.zeros(s.d), lambda s, v: None)
        running_mean = property(lambda s: np.zeros((0, s.d)))
        running_var = running_mean

        def train(self):
            pass

        def eval(self):
            pass

        def forward(self, x):
            return np.zeros_like(x)

    with pytest.raises(AssertionError, match="differs from torch"):
        check("ch02.batchnorm1d", {"BatchNorm1d": Nothing})

    class EmptyBuffers(bnref.BatchNorm1d):
        running_mean = property(lambda s: np.zeros((0, len(s.gamma))), lambda s, v: None)

    with pytest.raises(AssertionError, match=r"shape \(0, 3\), expected \(3,\)"):
        check("ch02.batchnorm1d", {"BatchNorm1d": EmptyBuffers})


@pytest.mark.parametrize("result,words", [
    (lambda x: (np.zeros((8_000_000, 1, 1)), None), r"shape \(8000000, 1, 1\), expected"),
    (lambda x: (np.zeros((1, x.shape[1])), None), r"shape \(1, 3\), expected \(2, 3\)"),
    (lambda x: (x.astype(np.int64), None), "dtype int64"),
    (lambda x: x, "not what the docstring asks for"),
    (lambda x: ("out", None), "a str, expected an array"),
])
def test_results_of_the_wrong_shape_or_kind_are_refused_before_any_arithmetic(result, words):
    with pytest.raises(AssertionError, match=words):
        check("ch02.batchnorm_forward", {"batchnorm_forward": lambda x, g, b, eps=1e-5: result(x)})


def test_a_missing_name_and_a_student_error_are_reported_in_words():
    with pytest.raises(AssertionError, match="batchnorm_forward raised NameError: batchnorm_forward is not defined"):
        check("ch02.batchnorm_forward", {})

    def unfinished(x, gamma, beta, eps=1e-5):
        raise NotImplementedError()

    with pytest.raises(AssertionError, match="not implemented yet"):
        check("ch02.batchnorm_forward", {"batchnorm_forward": unfinished})


def test_using_the_reference_package_is_refused():
    namespace = {"bnref": bnref}
    exec("def batchnorm_forward(x, gamma, beta, eps=1e-5):\n    return bnref.batchnorm_forward(x, gamma, beta, eps)",
         namespace)
    with pytest.raises(AssertionError, match="reference package"):
        check("ch02.batchnorm_forward", namespace)
    with pytest.raises(AssertionError, match="reference package"):
        check("ch02.batchnorm_forward", {"batchnorm_forward": bnref.batchnorm_forward})


@pytest.mark.parametrize("question", sorted(QUESTIONS))
def test_questions_accept_only_the_key(question):
    variable = __import__("bncapture.questions", fromlist=["VARIABLES"]).VARIABLES[question]
    check(f"questions.{question}", {variable: QUESTIONS[question]["answer"].lower()})
    for wrong in set("ABCD") - {QUESTIONS[question]["answer"]}:
        with pytest.raises(AssertionError, match=re.escape(QUESTIONS[question]["why"][wrong][:20])):
            check(f"questions.{question}", {variable: wrong})
    with pytest.raises(AssertionError, match="expected a string"):
        check(f"questions.{question}", {variable: 3})
