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


# Chapter 6: spatial batch norm and folding; chapter 7: dropout.
from bngrade import ch06, ch07  # noqa: E402


def _spatial_student(to_rows, from_rows):
    """A student's spatial forward/backward built on the 1-D reference through a given layout."""
    def forward(x, gamma, beta, eps=1e-5):
        if np.ndim(x) != 4:
            raise ValueError("x must be (N, C, H, W)")
        out, cache = bnref.batchnorm_forward(to_rows(x), gamma, beta, eps)
        return from_rows(out, x.shape), (cache, x.shape)

    def backward(dout, cache):
        inner, shape = cache
        dx, dgamma, dbeta = bnref.batchnorm_backward(to_rows(dout), inner)
        return from_rows(dx, shape), dgamma, dbeta

    return forward, backward


SPATIAL_LAYOUTS = {
    "transpose": (lambda x: x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1]),
                  lambda r, s: r.reshape(s[0], s[2], s[3], s[1]).transpose(0, 3, 1, 2)),
    "swapaxes": (lambda x: x.swapaxes(1, 3).reshape(-1, x.shape[1]),
                 lambda r, s: r.reshape(s[0], s[3], s[2], s[1]).swapaxes(1, 3)),
    "naive reshape": (lambda x: x.reshape(-1, x.shape[1]), lambda r, s: r.reshape(s)),
}


@pytest.mark.parametrize("layout", ["transpose", "swapaxes"])
def test_spatial_checks_pass_any_correct_layout(layout):
    forward, backward = _spatial_student(*SPATIAL_LAYOUTS[layout])
    ch06.check_spatial_forward(forward)
    ch06.check_spatial_backward(forward, backward)
    ch06.check_spatial_rejects_bad_input(forward)


def test_spatial_checks_pass_the_reference_and_direct_axis_statistics():
    ch06.check_spatial_forward(bnref.spatial_batchnorm_forward)
    ch06.check_spatial_backward(bnref.spatial_batchnorm_forward, bnref.spatial_batchnorm_backward)
    ch06.check_spatial_rejects_bad_input(bnref.spatial_batchnorm_forward)
    ch06.check_fold_batchnorm(bnref.fold_batchnorm)

    def direct(x, gamma, beta, eps=1e-5):
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
        return ((x - mean) / np.sqrt(var + eps) * gamma[:, None, None] + beta[:, None, None]).astype(x.dtype), None

    ch06.check_spatial_forward(direct)


def test_naive_reshape_is_named_in_forward_and_backward():
    forward, backward = _spatial_student(*SPATIAL_LAYOUTS["naive reshape"])
    with pytest.raises(AssertionError, match=re.escape("x.reshape(-1, C)")):
        ch06.check_spatial_forward(forward)
    with pytest.raises(AssertionError, match=re.escape("x.reshape(-1, C)")):
        ch06.check_spatial_backward(forward, backward)


def _numpy_stats_student(axes):
    """A student who normalizes an NCHW array with statistics over ``axes``."""
    def forward(x, gamma, beta, eps=1e-5):
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        return ((x - mean) / np.sqrt(var + eps) * gamma[:, None, None] + beta[:, None, None]).astype(x.dtype), None
    return forward


@pytest.mark.parametrize("axes,says", [((0,), "statistics are per pixel"), ((1, 2, 3), "over (C, H, W)")])
def test_wrong_statistics_axes_are_named(axes, says):
    with pytest.raises(AssertionError, match=re.escape(says)):
        ch06.check_spatial_forward(_numpy_stats_student(axes))


@pytest.mark.parametrize("mistake", ch06.FORWARD_MISTAKES, ids=lambda m: m.message[:40])
def test_each_spatial_forward_mistake_is_named(mistake):
    def student(x, gamma, beta, eps=1e-5):
        return mistake.fn(x, gamma, beta, eps).astype(x.dtype), None

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        ch06.check_spatial_forward(student)


@pytest.mark.parametrize("mistake", ch06.BACKWARD_MISTAKES, ids=lambda m: m.message[:40])
def test_each_spatial_backward_mistake_is_named(mistake):
    def forward(x, gamma, beta, eps=1e-5):
        return bnref.spatial_batchnorm_forward(x, gamma, beta, eps)[0], (x, gamma, beta, eps)

    def backward(dout, cache):
        return tuple(g.astype(dout.dtype) for g in mistake.fn(*cache, dout))

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        ch06.check_spatial_backward(forward, backward)


def test_spatial_forward_that_accepts_any_shape_is_refused():
    def student(x, gamma, beta, eps=1e-5):
        return x, None

    with pytest.raises(AssertionError, match="accepted a 2-D x"):
        ch06.check_spatial_rejects_bad_input(student)


@pytest.mark.parametrize("mistake", ch06.FOLD_MISTAKES, ids=lambda m: m.message[:40])
def test_each_fold_mistake_is_named(mistake):
    def student(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
        return tuple(a.astype(weight.dtype) for a in mistake.fn(weight, bias, gamma, beta, running_mean,
                                                                   running_var, eps))

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        ch06.check_fold_batchnorm(student)


@pytest.mark.parametrize("forget,says", [("mean", "running mean is missing"), ("eps", "eps is missing")])
def test_folding_that_forgets_the_mean_or_eps_is_named(forget, says):
    def student(weight, bias, gamma, beta, running_mean, running_var, eps=1e-5):
        scale = gamma / np.sqrt(running_var + (0.0 if forget == "eps" else eps))
        bias = np.zeros_like(gamma) if bias is None else bias
        shift = bias * scale + beta if forget == "mean" else (bias - running_mean) * scale + beta
        return weight * scale.reshape(-1, *[1] * (weight.ndim - 1)), shift

    with pytest.raises(AssertionError, match=re.escape(says)):
        ch06.check_fold_batchnorm(student)


def _dropout_student(draw="random", train_scale=True, eval_scale=False, p_is_keep=False, eval_mask=False,
                     new_mask=False, cache_scaled_mask=False, rng_source=None):
    """A student's dropout forward/backward; the defaults are correct, each flag is one mistake or variant."""
    def forward(x, p, train, rng, mode="inverted"):
        keep = p if p_is_keep else 1.0 - p
        if rng_source is not None:
            rng = rng_source()
        if not train and not eval_mask:
            scale = keep if (mode == "classic") != eval_scale else 1.0
            return x * scale, (None, scale)
        if draw == "binomial":
            mask = rng.binomial(1, keep, size=x.shape)
        elif draw == "uniform":
            mask = rng.uniform(size=x.shape) >= 1.0 - keep
        else:
            mask = rng.random(x.shape) < keep
        scale = 1.0 / keep if mode == "inverted" and train_scale else 1.0
        if cache_scaled_mask:
            return x * (mask * scale), (mask * scale, 1.0)
        return x * mask * scale, (mask, scale)

    def backward(dout, cache):
        mask, scale = cache
        if mask is None:
            return dout * scale
        if new_mask:
            mask = np.random.default_rng().random(dout.shape) < mask.mean()
        return dout * mask * scale

    return forward, backward


def _all_dropout_checks(forward, backward):
    ch07.check_dropout_train(forward)
    ch07.check_dropout_eval(forward)
    ch07.check_dropout_classic(forward)
    ch07.check_dropout_backward(forward, backward)


@pytest.mark.parametrize("variant", [{}, {"draw": "binomial"}, {"draw": "uniform"}, {"cache_scaled_mask": True}],
                         ids=["random", "binomial", "uniform", "scaled-mask-cache"])
def test_dropout_checks_pass_correct_code_whatever_the_random_stream(variant):
    _all_dropout_checks(*_dropout_student(**variant))


def test_dropout_checks_pass_the_reference():
    _all_dropout_checks(bnref.dropout_forward, bnref.dropout_backward)


@pytest.mark.parametrize("flags,check,says", [
    ({"train_scale": False}, "train", "no scaling at train time"),
    ({"eval_scale": True}, "eval", "scaling in eval mode"),
    ({"p_is_keep": True}, "train", "p is used as the keep probability"),
    ({"p_is_keep": True}, "classic", "p is used as the keep probability"),
    ({"eval_mask": True}, "eval", "a mask is applied in eval mode"),
    ({"eval_mask": True}, "backward", "a mask is applied in eval mode"),
    ({"new_mask": True}, "backward", "a new mask is drawn in the backward pass"),
    ({"train_scale": False}, "backward", "dx is not divided by the keep probability"),
    ({"eval_scale": True}, "classic", "classic dropout multiplies every unit by the keep probability"),
    ({"rng_source": np.random.default_rng}, "train", "does not take its randomness from the rng argument"),
    ({"rng_source": lambda: np.random.default_rng(0)}, "train", "same mask twice"),
])
def test_each_dropout_mistake_is_named(flags, check, says):
    forward, backward = _dropout_student(**flags)
    run = {"train": lambda: ch07.check_dropout_train(forward), "eval": lambda: ch07.check_dropout_eval(forward),
           "classic": lambda: ch07.check_dropout_classic(forward),
           "backward": lambda: ch07.check_dropout_backward(forward, backward)}[check]
    with pytest.raises(AssertionError, match=re.escape(says)):
        run()


def test_a_mask_shared_across_samples_is_named():
    def student(x, p, train, rng, mode="inverted"):
        if not train:
            return x, None
        mask = rng.random(x.shape[-1]) < 1 - p  # one decision per feature, broadcast over the batch
        return x * mask / (1 - p), mask

    with pytest.raises(AssertionError, match="decisions are shared"):
        ch07.check_dropout_train(student)
