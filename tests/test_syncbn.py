"""Merged moments and synchronized batch norm against one PyTorch batch norm over the whole batch.

The ranks run as threads (:func:`bncapture.ranks.run_threads`), as forked processes joined by pipes
(:func:`bncapture.ranks.run_processes`, the grader's multi-process case) and as gloo processes
(:func:`bncapture.ranks.run_gloo`, the book's); all must give the full-batch results. The runners' own
failure handling is tested in test_ranks.py.
"""
import multiprocessing
import time

import numpy as np
import pytest
import torch

import bnref
from bncapture.ranks import run_gloo, run_processes, run_threads

TOL = {np.float64: 1e-10, np.float32: 5e-5}


def run_ranks(fn, per_rank_args, timeout=30.0):
    """The ranks' results on threads."""
    return run_threads(fn, per_rank_args, timeout)[0]


def random_batch(rng, shape, dtype, offset=0.0):
    """(N, C) or (N, C, H, W); each channel has its own mean (``offset`` + spread ~3) and scale (0.5..3)."""
    bcast = (1, shape[1]) + (1,) * (len(shape) - 2)
    means = offset + rng.normal(0.0, 3.0, bcast)
    return (means + rng.uniform(0.5, 3.0, bcast) * rng.standard_normal(shape)).astype(dtype)


def moments_of(shard):
    """(count, mean, m2) of a shard, computed directly in float64."""
    rows = np.moveaxis(np.asarray(shard, np.float64), 1, -1).reshape(-1, shard.shape[1])
    if len(rows) == 0:
        return 0, np.zeros(shard.shape[1]), np.zeros(shard.shape[1])
    return len(rows), rows.mean(0), ((rows - rows.mean(0)) ** 2).sum(0)


# merge_moments and shard_moments

@pytest.mark.parametrize("shape", [(26, 3), (26, 4, 2, 3)])
def test_merged_moments_are_those_of_the_concatenated_shards(shape):
    rng = np.random.default_rng(0)
    x = random_batch(rng, shape, np.float64)
    shards = np.split(x, [7, 7, 20, 21, 21])  # 7, 0, 13, 1, 0 and 5 samples
    parts = [bnref.shard_moments(s) for s in shards]
    for got, shard in zip(parts, shards):
        want = moments_of(shard)
        assert got[0] == want[0] and isinstance(got[0], int)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-12, atol=1e-12)
    count, mean, m2 = bnref.merge_moments(parts)
    n_all, mean_all, m2_all = moments_of(x)
    assert count == n_all == x.size // x.shape[1]
    np.testing.assert_allclose(mean, mean_all, rtol=1e-12)
    np.testing.assert_allclose(m2, m2_all, rtol=1e-12)
    float_counts = bnref.merge_moments([(float(n), m, q) for n, m, q in parts])  # counts may be floats
    np.testing.assert_allclose(float_counts[2], m2_all, rtol=1e-12)
    one = bnref.merge_moments(parts[:2])  # the empty shard is skipped
    assert one[0] == parts[0][0] and np.array_equal(one[1], parts[0][1]) and np.array_equal(one[2], parts[0][2])


def test_merge_moments_refuses_a_batch_with_no_values():
    empty = (0, np.zeros(3), np.zeros(3))
    for parts in ([], [empty, empty]):
        with pytest.raises(ValueError, match="count > 0"):
            bnref.merge_moments(parts)


def test_merged_float32_moments_stay_accurate_far_from_zero():
    """Shards with mean ~1e4 and std ~1 in float32: the variance within 1e-4 of float64; the naive merge fails."""
    rng = np.random.default_rng(1)
    sizes = [3000, 1, 0, 517, 2048, 5, 1200, 9, 0, 4000]
    x = (1e4 + rng.standard_normal((sum(sizes), 8))).astype(np.float32)
    shards = np.split(x, np.cumsum(sizes)[:-1])
    parts = [bnref.shard_moments(s) for s in shards]
    assert all(p[1].dtype == p[2].dtype == np.float32 for p in parts)
    count, mean, m2 = bnref.merge_moments(parts)
    exact = x.astype(np.float64)
    assert count == len(x) and mean.dtype == m2.dtype == np.float32
    np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-7)
    assert np.max(np.abs(m2 / count / exact.var(0) - 1)) < 1e-4
    # naive: all-reduce sum x and sum x^2 per shard, in float32, then E[x^2] - E[x]^2
    sums = sum(s.sum(0) for s in shards)
    squares = sum((s * s).sum(0) for s in shards)
    naive = squares / np.float32(len(x)) - (sums / np.float32(len(x))) ** 2
    assert np.max(np.abs(naive / exact.var(0) - 1)) > 1e-2, "the input must defeat the naive merge"


# syncbn_forward / syncbn_backward

MOMENTUM, EPS = 0.1, 1e-3


def sync_step(x, dout, gamma, beta, running_mean, running_var, all_reduce):
    """One training step of one rank: forward, backward; returns everything to compare."""
    out, cache = bnref.syncbn_forward(x, gamma, beta, running_mean, running_var, all_reduce,
                                      momentum=MOMENTUM, eps=EPS)
    dx, dgamma, dbeta = bnref.syncbn_backward(dout, cache, all_reduce)
    return out, dx, dgamma, dbeta, running_mean, running_var


def torch_step(x, dout, gamma, beta, running_mean, running_var):
    """The same step with one torch.nn.BatchNorm1d/2d over the whole batch."""
    cls = torch.nn.BatchNorm2d if x.ndim == 4 else torch.nn.BatchNorm1d
    bn = cls(x.shape[1], eps=EPS, momentum=MOMENTUM, dtype=torch.from_numpy(x).dtype)
    with torch.no_grad():
        for name, value in dict(weight=gamma, bias=beta, running_mean=running_mean, running_var=running_var).items():
            getattr(bn, name).copy_(torch.from_numpy(value))
    xt = torch.tensor(x, requires_grad=True)
    out = bn(xt)
    out.backward(torch.from_numpy(dout))
    return dict(out=out.detach().numpy(), dx=xt.grad.numpy(), dgamma=bn.weight.grad.numpy(),
                dbeta=bn.bias.grad.numpy(), running_mean=bn.running_mean.numpy(), running_var=bn.running_var.numpy())


def sync_case(seed, shape, sizes, dtype):
    """A global batch split into shards of ``sizes`` samples, each rank with its own copy of the buffers."""
    rng = np.random.default_rng(seed)
    x = random_batch(rng, shape, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    gamma, beta = rng.uniform(0.5, 2, c).astype(dtype), rng.normal(size=c).astype(dtype)
    running = rng.normal(size=c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    cuts = np.cumsum(sizes)[:-1]
    args = [(xs, ds, gamma, beta, running[0].copy(), running[1].copy())
            for xs, ds in zip(np.split(x, cuts), np.split(dout, cuts))]
    return x, dout, gamma, beta, running, args


def check_against_torch(results, x, dout, gamma, beta, running, sizes, dtype):
    tol = TOL[dtype]
    want = torch_step(x, dout, gamma, beta, *running)
    outs, dxs, dgammas, dbetas, means, variances = zip(*results)
    scale = max(1.0, float(np.abs(want["dx"]).max()))
    assert all(a.dtype == dtype for a in outs + dxs + dgammas + dbetas)
    np.testing.assert_allclose(np.concatenate(outs), want["out"], rtol=tol, atol=tol, err_msg="out")
    np.testing.assert_allclose(np.concatenate(dxs), want["dx"], rtol=tol, atol=tol * scale, err_msg="dx")
    big = tol * x.size
    np.testing.assert_allclose(sum(dgammas), want["dgamma"], rtol=tol, atol=big, err_msg="dgamma summed over ranks")
    np.testing.assert_allclose(sum(dbetas), want["dbeta"], rtol=tol, atol=big, err_msg="dbeta summed over ranks")
    # dgamma and dbeta are each rank's LOCAL sums over its shard, with x_hat from the global statistics
    axes = (0,) + tuple(range(2, x.ndim))
    x64 = x.astype(np.float64)
    x_hat = (x64 - x64.mean(axes, keepdims=True)) / np.sqrt(x64.var(axes, keepdims=True) + EPS)
    cuts = np.cumsum(sizes)[:-1]
    for r, (xh, d) in enumerate(zip(np.split(x_hat, cuts), np.split(dout.astype(np.float64), cuts))):
        np.testing.assert_allclose(dgammas[r], (d * xh).sum(axes), rtol=tol, atol=big, err_msg=f"rank {r} dgamma")
        np.testing.assert_allclose(dbetas[r], d.sum(axes), rtol=tol, atol=big, err_msg=f"rank {r} dbeta")
    for r in range(len(results)):
        np.testing.assert_array_equal(means[r], means[0], err_msg=f"running_mean of rank {r}")
        np.testing.assert_array_equal(variances[r], variances[0], err_msg=f"running_var of rank {r}")
    np.testing.assert_allclose(means[0], want["running_mean"], rtol=tol, atol=tol, err_msg="running_mean")
    np.testing.assert_allclose(variances[0], want["running_var"], rtol=tol, atol=tol, err_msg="running_var")
    # torch averages the UNBIASED variance of the GLOBAL batch: neither a shard's nor the biased one
    shard = np.split(x64, cuts)[0]
    per_shard = (1 - MOMENTUM) * running[1] + MOMENTUM * shard.var(axes, ddof=1)
    biased = (1 - MOMENTUM) * running[1] + MOMENTUM * x64.var(axes)
    for wrong in (per_shard, biased):
        assert np.abs(wrong - want["running_var"]).max() > 100 * tol


THREAD_CASES = [((13, 4), [5, 8]), ((13, 4), [5, 1, 7]), ((7, 3), [4, 0, 3]),
                ((6, 3, 2, 4), [2, 4]), ((13, 3, 2, 2), [5, 1, 7])]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,sizes", THREAD_CASES)
def test_syncbn_on_threads_equals_one_batch_norm_over_the_whole_batch(shape, sizes, dtype):
    x, dout, gamma, beta, running, args = sync_case(2, shape, sizes, dtype)
    results = run_ranks(sync_step, args, timeout=30)
    for (shard, *_, rm, rv), (r_out, r_dx, _, _, mean_r, var_r) in zip(args, results):
        assert rm is mean_r and rv is var_r  # updated in place: the caller's arrays
        assert r_out.shape == r_dx.shape == shard.shape
    check_against_torch(results, x, dout, gamma, beta, running, sizes, dtype)


@pytest.mark.parametrize("run", [run_gloo, run_processes], ids=["gloo", "processes"])
@pytest.mark.parametrize("shape,sizes,dtype", [((13, 4), [6, 7], np.float64), ((13, 3, 2, 2), [5, 1, 7], np.float32)])
def test_syncbn_on_processes_equals_one_batch_norm_over_the_whole_batch(shape, sizes, dtype, run):
    x, dout, gamma, beta, running, args = sync_case(3, shape, sizes, dtype)
    start = time.monotonic()
    results, _ = run(sync_step, args, 30)
    assert time.monotonic() - start < 15
    check_against_torch(results, x, dout, gamma, beta, running, sizes, dtype)
    assert not multiprocessing.active_children()


def test_syncbn_in_float32_stays_accurate_far_from_zero():
    """Mean ~1e4, std ~1 in float32: the global variance within 1e-4 of float64 (E[x^2] - E[x]^2 fails)."""
    rng = np.random.default_rng(4)
    x = (1e4 + rng.standard_normal((3000, 5))).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    ones, zeros = np.ones(5, np.float32), np.zeros(5, np.float32)

    def step(shard, d, running_mean, running_var, all_reduce):  # momentum 1: the buffers get the batch statistics
        out, cache = bnref.syncbn_forward(shard, ones, zeros, running_mean, running_var, all_reduce,
                                          momentum=1.0, eps=EPS)
        return out, bnref.syncbn_backward(d, cache, all_reduce)[0], running_mean, running_var

    cuts = [700, 1900]
    shards = zip(np.split(x, cuts), np.split(dout, cuts))
    results = run_ranks(step, [(s, d, zeros.copy(), ones.copy()) for s, d in shards])
    out, dx, mean, var = (np.concatenate(a) for a in zip(*results))
    assert out.dtype == dx.dtype == mean.dtype == var.dtype == np.float32
    exact = torch_step(x.astype(np.float64), dout.astype(np.float64), np.ones(5), np.zeros(5), np.zeros(5), np.ones(5))
    np.testing.assert_allclose(results[0][2], x.astype(np.float64).mean(0), rtol=1e-7)
    assert np.max(np.abs(results[0][3] / x.astype(np.float64).var(0, ddof=1) - 1)) < 1e-4
    # out and dx are as exact as float32 allows: the mean itself rounds by up to ulp(1e4) / 2 = 4.9e-4
    np.testing.assert_allclose(out, exact["out"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(dx, exact["dx"], rtol=0, atol=1e-3)
    one_pass = (x * x).mean(0) - x.mean(0) ** 2
    assert np.max(np.abs(one_pass / x.astype(np.float64).var(0) - 1)) > 1e-2, "the input must defeat one pass"


def test_syncbn_refuses_a_global_batch_of_one_value_per_channel():
    x = np.ones((1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm1d(3)(torch.from_numpy(x))
    step = lambda s, ar: bnref.syncbn_forward(s, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), ar)  # noqa: E731
    with pytest.raises(ValueError, match="N >= 2"):
        run_ranks(step, [(x,), (x[:0],)])
    run_ranks(step, [(x,), (x,)])  # one sample per rank is fine: the global batch has 2


def test_syncbn_refuses_bad_buffers_and_shapes():
    one_rank = lambda a: a  # noqa: E731 - the sum over a single rank
    x, g = np.ones((4, 3)), np.ones(3)
    with pytest.raises(ValueError, match=r"\(n, C\) or \(n, C, H, W\)"):
        bnref.syncbn_forward(np.ones((4, 3, 2)), g, g, np.zeros(3), np.ones(3), one_rank)
    with pytest.raises(ValueError, match=r"running_var must have shape \(C,\) = \(3,\)"):
        bnref.syncbn_forward(x, g, g, np.zeros(3), np.ones(4), one_rank)
    with pytest.raises(ValueError, match="updated in place"):
        bnref.syncbn_forward(x, g, g, [0.0, 0.0, 0.0], np.ones(3), one_rank)
    _, cache = bnref.syncbn_forward(x, g, g, np.zeros(3), np.ones(3), one_rank)
    with pytest.raises(ValueError, match=r"dout must have the shape of this rank's x, \(4, 3\)"):
        bnref.syncbn_backward(np.ones((3, 3)), cache, one_rank)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3, 2)])
def test_bytes_reduced_per_step_are_4c_plus_1_values_whatever_the_batch(shape, dtype):
    c, itemsize = shape[1], np.dtype(dtype).itemsize
    for n in (6, 40):
        _, _, _, _, _, args = sync_case(5, (n,) + shape[1:], [n // 3, n // 2, n - n // 3 - n // 2], dtype)
        _, traffic = run_threads(sync_step, args)
        for t in traffic:
            assert t.bytes == [itemsize * (c + 1), itemsize * c, itemsize * 2 * c]
            assert t.summary() == {"calls": 3, "values": 4 * c + 1, "bytes": itemsize * (4 * c + 1)}


def test_gloo_ranks_can_use_bnrefs_thread_pool_after_fork():
    """bnref's kernels split large arrays over a thread pool, whose threads a forked child does not inherit."""
    rng = np.random.default_rng(6)
    x = random_batch(rng, (2 * 50_000, 4), np.float64)
    bnref.batchnorm_forward(x, np.ones(4), np.zeros(4))  # the parent's pool has run
    step = lambda s, ar: bnref.syncbn_forward(s, np.ones(4), np.zeros(4), np.zeros(4), np.ones(4), ar)[0]  # noqa: E731
    outs, _ = run_gloo(step, [(s,) for s in np.split(x, 2)], 20)
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True).numpy()
    np.testing.assert_allclose(np.concatenate(outs), expected, rtol=1e-9, atol=1e-9)
    assert not multiprocessing.active_children()
