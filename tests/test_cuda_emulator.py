"""The CPU emulator of bnref.cuda.emulator: that it runs CUDA's thread model, and that it catches kernel bugs.

The chapter-5 kernels are tested on it in test_cuda_kernels.py; here, small
kernels check the model itself (indices, shuffles, barriers, shared memory),
each fault it promises to report, and seeded bugs in the real kernel sources
that the kernel tests must then fail on.
"""
import weakref

import numpy as np
import pytest

import bnref
from bnref.cuda import checks, emulator, gpu, mirror

pytestmark = pytest.mark.skipif(emulator.compiler() is None,
                                reason="no host C++ compiler: CUDA emulator not built")

INDEX_KERNEL = r"""
extern "C" __global__ void where(int* out, int n) {
    const int tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const int i = block * blockDim.x * blockDim.y * blockDim.z + tid;
    if (i < n) out[i] = 1000 * block + tid;
}
"""

WARP_SUM = r"""
extern "C" __global__ void warp_sum(const float* x, float* out) {
    float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if ((threadIdx.x & 31) == 0) out[(blockIdx.x * blockDim.x + threadIdx.x) / 32] = v;
}
"""

BLOCK_SUM = r"""
extern "C" __global__ void block_sum(const float* x, float* out) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) s[t] += s[t + half];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}
"""


def test_thread_and_block_indices_cover_a_3d_launch_once():
    cp = emulator.CupyOnCpu()
    grid, block = (3, 2, 2), (4, 3, 2)
    n = int(np.prod(grid) * np.prod(block))
    out = cp.zeros(n, np.int32)
    cp.RawKernel(INDEX_KERNEL, "where")(grid, block, (out, np.int32(n)))
    i = np.arange(n)
    np.testing.assert_array_equal(out, 1000 * (i // 24) + i % 24)


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
def test_warp_shuffles_and_a_shared_memory_tree_sum_exactly(order):
    cp = emulator.CupyOnCpu(order=order, seed=7)
    x = np.arange(3 * 256, dtype=np.float32)
    warps, blocks = cp.empty(24), cp.empty(3)
    cp.RawKernel(WARP_SUM, "warp_sum")((3,), (256,), (cp.asarray(x), warps))
    cp.RawKernel(BLOCK_SUM, "block_sum")((3,), (256,), (cp.asarray(x), blocks))
    np.testing.assert_array_equal(warps, x.reshape(24, 32).sum(1))
    np.testing.assert_array_equal(blocks, x.reshape(3, 256).sum(1))


def test_a_missing_barrier_changes_the_result():
    racy = BLOCK_SUM.replace("s[t + half];\n        __syncthreads();", "s[t + half];")
    x = np.arange(256, dtype=np.float32)
    results = set()
    for order in ("forward", "reverse", "shuffled"):
        cp = emulator.CupyOnCpu(order=order)
        out = cp.empty(1)
        cp.RawKernel(racy, "block_sum")((1,), (256,), (cp.asarray(x), out))
        results.add(float(out[0]))
    assert results != {float(x.sum())}


@pytest.mark.parametrize("kernel,launch,message", [
    (r"""extern "C" __global__ void k(float* y) {
        if (threadIdx.x < 32) {
            __syncthreads();
        } else {
            __syncthreads();
        }
        y[threadIdx.x] = 1.0f; }""", ((1,), (64,)), "divergent __syncthreads"),
    (r"""extern "C" __global__ void k(float* y) {
        float v = 1.0f;
        if (threadIdx.x % 32 < 16) __syncthreads(); else v = __shfl_down_sync(0xffffffffu, v, 1);
        y[threadIdx.x] = v; }""", ((1,), (64,)), "deadlock"),
    (r"""extern "C" __global__ void k(float* y) {
        y[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1); }""", ((1,), (48,)), "16 live lanes"),
    (r"""extern "C" __global__ void k(float* y) {
        y[threadIdx.x + 1] = 1.0f; }""", ((1,), (64,)), "out-of-bounds write"),
])
def test_each_fault_is_reported_not_hung(kernel, launch, message):
    cp = emulator.CupyOnCpu()
    with pytest.raises(emulator.EmulatorError, match=message):
        cp.RawKernel(kernel, "k")(*launch, (cp.empty(64),))


def test_arguments_are_checked_as_a_gpu_would_need_them():
    cp = emulator.CupyOnCpu()
    kernel = cp.RawKernel(INDEX_KERNEL, "where")
    out = cp.zeros(8, np.int32)
    for args, message in [((out, 8), "pass np.int32"), ((out, np.int64(8)), "pass np.int32"),
                          ((np.zeros(8, np.int32), np.int32(8)), "expects a device array"),
                          ((cp.zeros(8, np.float32), np.int32(8)), "expects int32 memory"),
                          ((out,), "takes 2 arguments")]:
        with pytest.raises(emulator.EmulatorError, match=message):
            kernel((1,), (8,), args)
    affine = cp.RawModule(code=bnref.cuda.kernel_source("bn_affine.cu")).get_function("bn_affine_ncs_vec4")
    buf = cp.zeros(17)
    c = cp.ones(1)
    args = (buf[1:], buf[1:], np.int64(1), np.int32(1), np.int32(4), c, c, c, c, np.float32(1e-5), np.int32(0))
    with pytest.raises(emulator.EmulatorError, match="misaligned address"):
        affine((1, 1), (32, 8), args)
    with pytest.raises(emulator.EmulatorError, match="exceeds the kernel's limit of 256"):
        affine((1, 1), (32, 16), (buf[:16], buf[:16]) + args[2:])   # __launch_bounds__(BN_THREADS = 256, ...)


def test_fresh_memory_reads_as_nan_and_the_guards_rearm():
    cp = emulator.CupyOnCpu()
    assert np.all(np.isnan(cp.empty(5)))
    oob = cp.RawKernel(r'extern "C" __global__ void k(float* y) { y[threadIdx.x + 1] = 1.0f; }', "k")
    with pytest.raises(emulator.EmulatorError):
        oob((1,), (4,), (cp.empty(4),))
    cp.RawKernel(INDEX_KERNEL, "where")((1,), (8,), (cp.zeros(8, np.int32), np.int32(8)))   # no stale report


# --- seeded bugs in the real kernels: the kernel tests' checks must catch each ------------------------------------

def _forward_stats(cp, x, blocks):
    C = x.shape[1]
    _, cache = gpu.batchnorm_forward_gpu(cp.asarray(x), cp.ones(C), cp.zeros(C), blocks=blocks)
    return cp.asnumpy(cache.mean), cp.asnumpy(cache.rstd)


@pytest.fixture
def mutate(monkeypatch):
    """mutate(file, old, new): the wrappers compile kernel file ``file`` (its header pasted in) with ``old``
    replaced by ``new``, which must occur once. The test fails if the mutated file was never compiled."""
    original = bnref.cuda.kernel_source
    compiled = []

    def apply(file, old, new):
        def source(name):
            text = original(name)
            if name == file:
                assert text.count(old) == 1, f"{old!r} is not in {file} exactly once"
                text = text.replace(old, new)
                compiled.append(name)
            return text
        monkeypatch.setattr(bnref.cuda, "kernel_source", source)
        monkeypatch.setattr(gpu, "_MODULES", {})
        monkeypatch.setattr(gpu, "_COUNTERS", weakref.WeakKeyDictionary())
    yield apply
    assert compiled, "the mutated kernel file was never compiled: the test tested nothing"


@pytest.fixture
def cp():
    backend = emulator.CupyOnCpu()
    with gpu.use_backend(backend):
        yield backend


X = (3.0 + 2.0 * np.random.default_rng(0).standard_normal((3, 5, 7, 11))).astype(np.float32)


def test_the_unmutated_kernels_match_the_mirror(cp):
    mean, rstd = _forward_stats(cp, X, 3)
    ref_mean, _, ref_rstd = mirror.forward_stats(X, 1e-5, "NCHW", 3)
    np.testing.assert_array_equal(mean, ref_mean)
    np.testing.assert_array_equal(rstd, ref_rstd)


def test_a_missing_barrier_in_the_block_tree_is_caught(cp, mutate):
    """Warp 0 reads the other warps' totals before they are written: it sees shared memory as the block found
    it (NaN) in a block's first segment, and the previous segment's totals in the next."""
    mutate("bn_forward.cu", "    if (lane == 0) smem[warp] = v;\n    __syncthreads();\n",
           "    if (lane == 0) smem[warp] = v;\n")
    mean, _ = _forward_stats(cp, X, 3)
    wrong = np.abs(mean - X.astype(np.float64).mean((0, 2, 3))) > 1e-3
    assert np.isnan(mean).any() and np.all(np.isnan(mean) | wrong)


def test_a_counter_that_is_not_reset_breaks_the_second_launch(cp, mutate):
    """10 blocks over 5 channels of 8 chunks: every channel is shared by two blocks, and has a counter."""
    mutate("bn_forward.cu", "        *counter = 0u;\n", "")
    first, _ = _forward_stats(cp, X, 10)
    second, _ = _forward_stats(cp, X, 10)
    np.testing.assert_allclose(first, X.astype(np.float64).mean((0, 2, 3)), rtol=1e-5)
    assert np.all(np.isnan(second)), "no block sees itself last: the statistics are never written"


def test_a_last_chunk_not_cut_at_the_end_is_an_out_of_bounds_write(cp, mutate):
    """3*5*7*11 = 1155 values are 36 chunks of 32 and 3 more: the last block must stop at the end, not at its
    chunk's."""
    mutate("bn_affine.cu", "hi = end < R * S ? end : R * S;", "hi = end;")  # row_windows, from bn_common.cuh
    with pytest.raises(emulator.EmulatorError, match="out-of-bounds write"):
        gpu.batchnorm_forward_gpu(cp.asarray(X), cp.ones(5), cp.zeros(5))


def test_merging_the_partials_in_arrival_order_depends_on_the_block_order(mutate):
    """The last block merges a channel's partials in slot order, so the result is the same whichever block is last;
    storing each partial at its arrival position instead would not be (on some inputs: float32 rounding
    differs between two merge orders only now and then)."""
    counter = "counters + groups + sh.first + run"
    mutate("bn_forward.cu", f"arrive(v, partials, sh.first + k, {counter},",
           f"arrive(v, partials, sh.first + run + *({counter}), {counter},")
    x = (3.0 + 2.0 * np.random.default_rng(1).standard_normal((3, 5, 4, 1000))).astype(np.float32)
    results = []
    for order in ("forward", "reverse", "shuffled"):
        backend = emulator.CupyOnCpu(order=order)
        with gpu.use_backend(backend):
            results.append(np.concatenate([np.concatenate(_forward_stats(backend, xs, 40)) for xs in x]))
    assert not all(np.array_equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
def test_the_kernels_do_not_depend_on_block_or_thread_order(order):
    """Forward, backward and inference, bit for bit, whichever block finishes last and whichever thread runs first."""
    x = (1.0 + 2.0 * np.random.default_rng(2).standard_normal((4, 6, 9, 13))).astype(np.float32)
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    results = []
    for backend in (emulator.CupyOnCpu(), emulator.CupyOnCpu(order=order, seed=11)):
        with gpu.use_backend(backend):
            for layout, xl, dyl in (("NCHW", x, dy), ("NHWC", np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1))):
                rm, rv = backend.zeros(6), backend.ones(6)
                out, cache = gpu.batchnorm_forward_gpu(backend.asarray(xl), backend.ones(6), backend.zeros(6), rm, rv,
                                                       layout=layout, blocks=3)
                grads = gpu.batchnorm_backward_gpu(backend.asarray(dyl), cache, blocks=5)
                infer = gpu.batchnorm_inference_gpu(backend.asarray(xl), backend.ones(6), backend.zeros(6), rm, rv,
                                                    layout=layout)
                results.append([backend.asnumpy(a) for a in (out, cache.mean, cache.rstd, rm, rv, *grads, infer)])
    half = len(results) // 2
    for first, second in zip(results[:half], results[half:]):
        for a, b in zip(first, second):
            assert not np.isnan(a).any()
            np.testing.assert_array_equal(a, b)


# --- the race check (bnref.cuda.checks) sees the races that rerunning one input hides ----------------------------

RACE_SHAPE, RACE_BLOCKS = (4, 5, 8, 8), 10   # 10 blocks over 5 channels of 8 chunks: every channel is merged


def _race_check(cp, inputs, **kwargs):
    return checks.race_free(cp, inputs, cp.ones(5), cp.zeros(5), runs=2 * len(inputs) + 2, blocks=RACE_BLOCKS,
                            **kwargs)


@pytest.mark.parametrize("layout,shape", [("NCHW", RACE_SHAPE), ("NHWC", (4, 8, 8, 8))])
def test_the_race_check_passes_on_the_kernels(layout, shape):
    cp = emulator.CupyOnCpu(pool=True)
    with gpu.use_backend(cp):
        inputs = checks.alternating_inputs(cp, shape, layout)
        C = shape[1] if layout == "NCHW" else shape[-1]
        assert checks.race_free(cp, inputs, cp.ones(C), cp.zeros(C), layout, runs=6, blocks=RACE_BLOCKS) is None


def test_the_race_check_sees_a_partial_published_without_a_fence(mutate):
    """Without the release fence the other blocks' partials are not yet in memory when the last block reads
    them: it merges what the slots held. Rerunning one input, the pool hands back last run's partials, the
    same bits, and the check is blind; with the slots poisoned (and two inputs) it fails."""
    cp = emulator.CupyOnCpu(pool=True)
    with gpu.use_backend(cp):
        inputs = checks.alternating_inputs(cp, RACE_SHAPE, "NCHW")
        assert _race_check(cp, inputs[:1]) is None            # correct kernels: the pool now holds right partials
        mutate("bn_forward.cu", "store_partial(partials, slot * team.lanes + team.lane, v);\n        __threadfence();",
               "store_partial(partials, slot * team.lanes + team.lane, v);")
        assert _race_check(cp, inputs[:1], poison=False) is None, "one input, no poison: stale slots, same bits"
        assert "NaN in y, mean, rstd" in _race_check(cp, inputs)


def test_the_race_check_sees_a_channel_that_no_block_finalizes(mutate):
    """With the last-block merge gone, no block writes the statistics of a channel that several blocks share:
    mean and rstd hold whatever the pool handed back, a last run's values, or (poisoned) NaN."""
    cp = emulator.CupyOnCpu(pool=True)
    with gpu.use_backend(cp):
        inputs = checks.alternating_inputs(cp, RACE_SHAPE, "NCHW")
        assert _race_check(cp, inputs) is None
        mutate("bn_forward.cu", "!merge_blocks(m, partials, counters, C, c, sh, blockIdx.x + c - sh.first, team, tree)",
               "true")
        assert "NaN in y, mean, rstd" in _race_check(cp, inputs)


def test_the_pool_hands_memory_back_with_its_contents():
    cp = emulator.CupyOnCpu(pool=True)
    a = cp.empty(8)
    a[...] = 3.0
    address = a.data.ptr
    view = a[2:]
    del a
    assert cp.empty(8).data.ptr != address, "a view still uses the memory"
    del view
    b = cp.empty(8)
    assert b.data.ptr == address and np.all(b == 3.0)
    assert np.all(np.isnan(emulator.CupyOnCpu().empty(8))), "without a pool, fresh memory reads as NaN"
