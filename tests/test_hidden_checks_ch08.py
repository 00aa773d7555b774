"""Chapter 8's hidden checks: the reference passes, each known mistake is named, SyncBN on threads and gloo."""
import functools
import re

import numpy as np
import pytest

import bnref
from bngrade.verdicts import ch08
from bngrade.judge import compare


@pytest.fixture(autouse=True)
def no_reference_detection(monkeypatch):
    """Student code here is written in this test module, which imports bnref; detection is tested elsewhere."""
    monkeypatch.setattr(compare, "uses_reference", lambda fn: False)


def test_the_reference_passes_every_check():
    ch08.check_layernorm_forward(bnref.layernorm_forward)
    ch08.check_layernorm_backward(bnref.layernorm_forward, bnref.layernorm_backward)
    ch08.check_groupnorm_forward(bnref.groupnorm_forward)
    ch08.check_groupnorm_rejects_bad_input(bnref.groupnorm_forward)
    ch08.check_groupnorm_backward(bnref.groupnorm_forward, bnref.groupnorm_backward)
    ch08.check_merge_moments(bnref.merge_moments)
    ch08.check_syncbn_forward(bnref.syncbn_forward)
    ch08.check_syncbn_backward(bnref.syncbn_forward, bnref.syncbn_backward)


def _forward_student(mistake, reference):
    """A forward pass whose output is the mistake's, with the reference's cache (so validation still works)."""
    def student(x, gamma, beta, *rest):
        reference(x, gamma, beta, *rest)
        return mistake.fn(x, gamma, beta, *rest).astype(np.asarray(x).dtype), None
    return student


def _backward_students(mistake):
    """(forward, backward) whose gradients are the mistake's: the cache carries the forward's arguments."""
    def forward(x, gamma, beta, *rest):
        return None, (x, gamma, beta, *rest)

    def backward(dout, cache):
        return tuple(np.asarray(g).astype(dout.dtype) for g in mistake.fn(*cache, dout))
    return forward, backward


FORWARD_MISTAKES = ([(ch08.check_layernorm_forward, bnref.layernorm_forward, m) for m in ch08.LN_LAYOUTS]
                    + [(ch08.check_groupnorm_forward, bnref.groupnorm_forward, m) for m in ch08.GN_LAYOUTS])


@pytest.mark.parametrize("check,reference,mistake", FORWARD_MISTAKES, ids=lambda v: v[0][:40] if isinstance(v, tuple)
                         else None)
def test_each_forward_mistake_is_named(check, reference, mistake):
    message, fn = mistake
    with pytest.raises(AssertionError, match=re.escape(message[:30])):
        check(_forward_student(ch08.Mistake(message, ch08._wrong(fn, False)), reference))


@pytest.mark.parametrize("check,message,fn", [
    (ch08.check_layernorm_backward, "dx is missing the path through the mean",
     functools.partial(ch08._ln_partial_backward, mean_path=False)),
    (ch08.check_layernorm_backward, "dx is missing the path through the variance",
     functools.partial(ch08._ln_partial_backward, var_path=False)),
    (ch08.check_groupnorm_backward, "dx is missing the path through the group mean",
     functools.partial(ch08._gn_partial_backward, mean_path=False)),
    (ch08.check_groupnorm_backward, "dx is missing the path through the group variance",
     functools.partial(ch08._gn_partial_backward, var_path=False)),
    (ch08.check_groupnorm_backward, "the groups are not consecutive channels",
     ch08._wrong(ch08.GN_LAYOUTS[0][1], True)),
], ids=lambda v: v if isinstance(v, str) else None)
def test_backward_mistakes_are_named(check, message, fn):
    forward, backward = _backward_students(ch08.Mistake(message, fn))
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(forward, backward)


def test_groupnorm_that_falls_back_to_one_group_is_refused():
    def student(x, gamma, beta, groups, eps=1e-5):
        return bnref.groupnorm_forward(x, gamma, beta, groups if x.shape[1] % groups == 0 else 1, eps)

    with pytest.raises(AssertionError, match=re.escape("accepted C = 6 channels with groups = 4")):
        ch08.check_groupnorm_rejects_bad_input(student)


@pytest.mark.parametrize("mistake", ch08.MERGE_MISTAKES, ids=lambda m: m.message[:40])
def test_each_merge_mistake_is_named(mistake):
    def student(parts):
        if not any(n > 0 for n, _, _ in parts):
            raise ValueError("empty")
        return mistake.fn(parts)

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        ch08.check_merge_moments(student)


def test_the_float32_case_separates_chan_from_the_sums():
    """At a mean offset of 1e4 in float32, Chan's merge passes the tolerance and the sums do not."""
    (parts,), _ = ch08._merge_cases()[-1]
    assert parts[0][1].dtype == np.float32
    expected = ch08._merge_reference(parts)
    assert compare.close(bnref.merge_moments(parts), expected, np.float32, (2e-4, 1e-6))
    assert not compare.close(ch08._merge_with(parts, "sums"), expected, np.float32, (2e-4, 1e-6))


# --- SyncBN -----------------------------------------------------------------------------------------

def _sync_variant(local=False, biased_running=False, copy_running=False, global_grads=False, gather=False):
    """bnref's SyncBN with one known mistake."""
    def forward(x, gamma, beta, running_mean, running_var, all_reduce, momentum=0.1, eps=1e-5):
        if gather:  # all-reduces a padded copy of the activations (correct numbers, wrong cost)
            all_reduce(np.zeros(1000))
        reduce = (lambda a: np.array(a, copy=True)) if local else all_reduce
        mean, var = np.array(running_mean), np.array(running_var)
        if local and len(x) == 1:  # bnref refuses a batch of one; a student's local version gives beta
            return np.broadcast_to(beta.reshape((1, -1) + (1,) * (x.ndim - 2)), x.shape).copy(), None
        out, cache = bnref.syncbn_forward(x, gamma, beta, mean, var, reduce, momentum, eps)
        if biased_running:
            n = reduce(np.array([x.size // x.shape[1]], dtype=np.float64))[0]
            var = (var - (1 - momentum) * running_var) * (n - 1) / n + (1 - momentum) * running_var
        if copy_running:
            running_mean = mean  # rebinds the name: the caller's buffer stays as it was
        else:
            running_mean[...] = mean
        running_var[...] = var
        return out, (cache, reduce)

    def backward(dout, cache, all_reduce):
        cache, reduce = cache
        dx, dgamma, dbeta = bnref.syncbn_backward(dout, cache, reduce)
        if global_grads:
            dgamma, dbeta = all_reduce(dgamma), all_reduce(dbeta)
        return dx, dgamma, dbeta
    return forward, backward


@pytest.mark.parametrize("variant,says", [
    ({"local": True}, "statistics of its own shard"),
    ({"biased_running": True}, "it uses the biased variance"),
    ({"copy_running": True}, "running_mean is not updated in place"),
    ({"gather": True}, "never the activations"),
])
def test_syncbn_forward_mistakes_are_named(variant, says):
    forward, _ = _sync_variant(**variant)
    with pytest.raises(AssertionError, match=re.escape(says)):
        ch08.check_syncbn_forward(forward)


@pytest.mark.parametrize("variant,says", [
    ({"global_grads": True}, "already summed over the ranks"),
])
def test_syncbn_backward_mistakes_are_named(variant, says):
    forward, backward = _sync_variant(**variant)
    with pytest.raises(AssertionError, match=re.escape(says)):
        ch08.check_syncbn_backward(forward, backward)


def test_syncbn_backward_blames_a_wrong_forward():
    def forward(x, gamma, beta, running_mean, running_var, all_reduce, momentum=0.1, eps=1e-5):
        return bnref.syncbn_forward(x, gamma, beta, running_mean, running_var, all_reduce, momentum, eps + 0.5)

    with pytest.raises(AssertionError, match="syncbn_forward is not right yet"):
        ch08.check_syncbn_backward(forward, bnref.syncbn_backward)


@pytest.mark.parametrize("count", ["global", "local"])
def test_syncbn_backward_with_local_sums_is_named(count):
    def backward(dout, cache, all_reduce):
        if count == "local":
            cache = cache._replace(count=len(dout) * int(np.prod(dout.shape[2:])))
        return bnref.syncbn_backward(dout, cache, lambda a: np.array(a, copy=True))  # no synchronization

    with pytest.raises(AssertionError, match="own sums of dy"):
        ch08.check_syncbn_backward(bnref.syncbn_forward, backward)


def test_a_rank_that_skips_an_all_reduce_fails_with_a_message_not_a_hang(monkeypatch):
    monkeypatch.setitem(ch08.TIMEOUT, "gloo", 3.0)

    def forward(x, gamma, beta, running_mean, running_var, all_reduce, momentum=0.1, eps=1e-5):
        if len(x) == 1:
            return np.zeros_like(x), None
        return bnref.syncbn_forward(x, gamma, beta, running_mean, running_var, all_reduce, momentum, eps)

    with pytest.raises(AssertionError, match="the same number of times"):
        ch08.check_syncbn_forward(forward)


@pytest.mark.parametrize("cell,source,banned", [
    ("groupnorm_forward", "def groupnorm_forward(x, gamma, beta, groups, eps=1e-5):\n"
     "    return torch.nn.functional.group_norm(torch.from_numpy(x), groups).numpy(), None\n", "group_norm"),
    ("layernorm_forward", "from torch.nn import LayerNorm\ndef layernorm_forward(x, gamma, beta, eps=1e-5):\n"
     "    return LayerNorm(x.shape[1])(x), None\n", "LayerNorm"),
    ("syncbn", "import torch.distributed as dist\ndef syncbn_forward(x, *args):\n"
     "    dist.all_reduce(x)\n    return x, None\n", "all_reduce"),
])
def test_the_scan_bans_framework_norms_and_collectives_in_chapter_8(cell, source, banned):
    from bngrade.judge import scan

    names, _ = scan.scan("ch08_beyond_bn", {cell: source})
    assert banned in next(iter(names.values()))


def test_the_scan_leaves_numpy_reductions_alone_in_chapter_8():
    from bngrade.judge import scan

    source = ("def merge_moments(parts):\n    counts = np.add.reduce([p[0] for p in parts])\n"
              "    return counts, np.broadcast_to(parts[0][1], (2,)), parts[0][2]\n")
    assert scan.scan("ch08_beyond_bn", {"merge_moments": source})[0] == {}
