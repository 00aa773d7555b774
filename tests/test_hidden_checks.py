"""The hidden-test checks themselves: the reference passes, and each known mistake is named."""
import re

import numpy as np
import pytest

import bnref
from bngrade import ch01, ch02, compare
from bngrade.questions import QUESTIONS, check_choice


@pytest.fixture(autouse=True)
def no_reference_detection(request, monkeypatch):
    """Student code here is written in this test module, which imports bnref; detection is tested apart."""
    if "reference_package" not in request.node.name:
        monkeypatch.setattr(compare, "uses_reference", lambda fn: False)


@pytest.mark.parametrize("check,fn", [
    (ch02.check_batchnorm_forward, bnref.batchnorm_forward),
    (ch02.check_batchnorm_inference, bnref.batchnorm_inference),
    (ch02.check_update_running_stats, bnref.update_running_stats),
    (ch02.check_batchnorm1d, bnref.BatchNorm1d),
    (ch01.check_standardize, ch01.reference_standardize),
    (ch01.check_condition_number, ch01.reference_condition_number),
])
def test_correct_code_passes(check, fn):
    check(fn)


@pytest.mark.parametrize("mistake", ch02.FORWARD_MISTAKES, ids=lambda m: m.message[:40])
def test_each_forward_mistake_is_named(mistake):
    def student(x, gamma, beta, eps=1e-5):
        return mistake.fn(x, gamma, beta, eps).astype(x.dtype), None

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        ch02.check_batchnorm_forward(student)


@pytest.mark.parametrize("mistake", ch02.RUNNING_MISTAKES, ids=lambda m: m.message[:40])
def test_each_running_stats_mistake_is_named(mistake):
    with pytest.raises(AssertionError, match=re.escape(mistake.message[:25])):
        ch02.check_update_running_stats(mistake.fn)


@pytest.mark.parametrize("mistake", ch02.INFERENCE_MISTAKES, ids=lambda m: m.message[:40])
def test_each_inference_mistake_is_named(mistake):
    with pytest.raises(AssertionError, match=re.escape(mistake.message[:25])):
        ch02.check_batchnorm_inference(mistake.fn)


def test_using_the_reference_package_is_refused():
    namespace = {"bnref": bnref}
    exec("def batchnorm_forward(x, gamma, beta, eps=1e-5):\n    return bnref.batchnorm_forward(x, gamma, beta, eps)",
         namespace)
    with pytest.raises(AssertionError, match="reference package"):
        ch02.check_batchnorm_forward(namespace["batchnorm_forward"])


def test_own_code_is_not_taken_for_the_reference_package():
    namespace = {"np": np}
    exec("def batchnorm_forward(x, gamma, beta, eps=1e-5):\n    return x, None", namespace)
    assert not compare.uses_reference(namespace["batchnorm_forward"])


def test_reference_package_itself_is_refused():
    with pytest.raises(AssertionError, match="reference package"):
        ch02.check_batchnorm_forward(bnref.batchnorm_forward)


def test_in_place_modification_is_named():
    def student(rm, rv, x, momentum=0.1):
        rm *= 1 - momentum
        rm += momentum * x.mean(0)
        rv *= 1 - momentum
        rv += momentum * x.var(0, ddof=1)
        return rm, rv

    with pytest.raises(AssertionError, match="modifies its input arrays in place"):
        ch02.check_update_running_stats(student)


def test_float64_output_for_float32_input_is_named():
    def student(x, gamma, beta, eps=1e-5):
        return bnref.batchnorm_forward(x.astype(np.float64), gamma.astype(np.float64),
                                       beta.astype(np.float64), eps)[0], None

    with pytest.raises(AssertionError, match="float32 in, float32 out|does not match"):
        ch02.check_batchnorm_forward(student)


def test_batchnorm1d_check_names_eval_mode_with_batch_statistics():
    class EvalUsesBatch(bnref.BatchNorm1d):
        def forward(self, x):
            self.train()
            return super().forward(x)

    with pytest.raises(AssertionError, match="in eval mode your layer normalizes with the batch statistics"):
        ch02.check_batchnorm1d(EvalUsesBatch)


@pytest.mark.parametrize("question", sorted(QUESTIONS))
def test_questions_accept_only_the_key(question):
    check_choice(question, QUESTIONS[question]["answer"].lower())
    for wrong in set("ABCD") - {QUESTIONS[question]["answer"]}:
        with pytest.raises(AssertionError, match=re.escape(QUESTIONS[question]["why"][wrong][:20])):
            check_choice(question, wrong)
