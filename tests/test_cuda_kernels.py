"""Chapter 5's CUDA kernels.

Without a GPU: every kernel source compiles with nvcc for sm_80 and sm_90
without register spills (ptxas' resource table is printed at the end of the
module), and the NumPy mirror of the kernels' reduction tree matches the
two-pass statistics on shapes with partial warps, partial blocks and a
grid-level merge. The kernels themselves run against bnref and torch twice: on
the CPU emulator (``bnref.cuda.emulator``, always, where a C++ compiler exists),
and on a GPU with CuPy (``-m gpu``, skipped with a reason when there is none).
"""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import bnref
from bnref.cuda import (KERNELS, NO_GPU_MESSAGE, emulator, gpu, gpu_available, kernel_source, mirror, nvcc, plan,
                        roofline)

HAS_GPU = gpu_available()
needs_cxx = pytest.mark.skipif(emulator.compiler() is None, reason="no host C++ compiler: CUDA emulator not built")
needs_nvcc = pytest.mark.skipif(nvcc.nvcc_path() is None, reason="nvcc is not on PATH: kernel sources not compiled")


# (shape, layout, G): partial warps (231 values per channel), N*H*W not a multiple of 256,
# a partial column of channels (37), a grid merge with more partials (300) than threads (256).
TREE_CASES = [
    ((3, 5, 7, 11), "NCHW", None),
    ((3, 5, 7, 11), "NCHW", 3),
    ((5, 2, 1000), "NCHW", 7),
    ((2, 1, 300 * 256 + 5), "NCHW", 300),
    ((7, 3), "NCHW", 1),
    ((1000, 37), "NCHW", 5),
    ((4, 6, 5, 37), "NHWC", 3),
    ((2, 5, 3, 3), "NHWC", None),
]


def channel_axes(shape, layout):
    lay = plan.layout_of(shape, layout)
    keep = 1 if lay.kind == "ncs" else len(shape) - 1
    return tuple(i for i in range(len(shape)) if i != keep)


# --- nvcc: the sources compile, without spills --------------------------------------------------

@pytest.fixture(scope="module")
def ptxas_rows(request):
    rows = []
    yield rows
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if rows and reporter is not None and capture is not None:   # absent in xdist workers
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_sep("-", "ptxas resources of the chapter-5 kernels (nvcc -cubin -Xptxas -v)")
            reporter.write_line(nvcc.format_table(rows))


@needs_nvcc
@pytest.mark.parametrize("arch", nvcc.ARCHS)
@pytest.mark.parametrize("file", sorted(KERNELS))
def test_kernel_source_compiles_without_spills(file, arch, tmp_path, ptxas_rows, record_property):
    rows = nvcc.compile_cubin(file, arch, tmp_path)
    ptxas_rows.extend(sorted(rows))
    record_property("ptxas", nvcc.format_table(rows))
    assert {r.kernel for r in rows} == set(KERNELS[file])
    for r in rows:
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0, f"{r.kernel} spills on {arch}: {r}"
        # 256 threads x 64 registers still lets 4 blocks share an SM (65536 registers)
        assert r.registers <= 64, f"{r.kernel} needs {r.registers} registers on {arch}"


@needs_nvcc
@pytest.mark.parametrize("grade_id,kernel", [("channel_stats", "channel_stats"),
                                             ("fused_forward_stats", "fused_stats")])
def test_the_exercise_solution_kernels_compile(grade_id, kernel, tmp_path):
    """The CUDA strings of the solved chapter-5 exercise (their grader runs them on a GPU)."""
    import jupytext
    from bngrade.course import SOURCES

    cell = next(c for c in jupytext.read(SOURCES / "ch05_cupy_kernels.md").cells
                if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
    (source,) = re.findall(r'source = r"""\n(.*?)"""', cell.source, re.S)
    (tmp_path / "exercise.cu").write_text(source)
    proc = subprocess.run([nvcc.nvcc_path(), "-cubin", "-arch=sm_80", "-Xptxas", "-v", str(tmp_path / "exercise.cu"),
                           "-o", str(tmp_path / "exercise.cubin")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = nvcc.parse_ptxas(proc.stdout + proc.stderr)
    assert row.kernel == kernel and row.spill_stores == 0


def test_kernel_sources_are_self_contained_and_name_every_kernel():
    for file, names in KERNELS.items():
        text = kernel_source(file)
        assert "#include" not in text, f"{file}: NVRTC gets one string, headers pasted in"
        defined = set(re.findall(r'extern "C" __global__ void __launch_bounds__\(256\)\n(\w+)\(', text))
        assert defined == set(names), file
    used = {f"bn_forward_stats_{k}" for k in ("ncs", "mc")} | {f"bn_backward_reduce_{k}" for k in ("ncs", "mc")}
    used |= {f"{stem}_{k}{v}" for stem in ("bn_affine", "bn_backward_dx") for k in ("ncs", "mc") for v in ("", "_vec4")}
    assert used <= {n for names in KERNELS.values() for n in names}


def test_ptxas_report_parser():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90'\nptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 70 registers, used 1 barriers, 385 bytes smem\n")
    assert nvcc.parse_ptxas(log) == [nvcc.Resources("k", "sm_90", 70, 4, 4, 8, 385)]


# --- the launch plan --------------------------------------------------------------------------

BENCH_SHAPES = [(256, 4096), (8192, 4096), (32, 64, 56, 56), (256, 256, 14, 14), (64, 256, 56, 56),
                (256, 64, 112, 112)]


@pytest.mark.parametrize("shape", BENCH_SHAPES + [(3, 5, 7, 11), (2, 7)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_launch_shapes_are_legal_and_cover_the_tensor(shape, layout):
    lay = plan.layout_of(shape, layout)
    red = plan.reduction_launch(lay, sm_count=132)
    assert red.G >= 1 and all(1 <= g <= plan.MAX_GRID_X for g in red.grid) and red.grid[1] <= plan.MAX_GRID_Y
    assert np.prod(red.block) == plan.THREADS
    for vec in (1, 4):
        if (lay.S if lay.kind == "ncs" else lay.C) % vec:
            continue
        grid, (bx, by, _) = plan.elementwise_launch(lay, vec, sm_count=132)
        assert bx % 32 == 0 and bx * by <= plan.THREADS and grid[1] <= plan.MAX_GRID_Y
        width = (lay.S if lay.kind == "ncs" else lay.C) // vec
        assert (grid[1] if lay.kind == "ncs" else grid[0]) * bx >= width


# --- the mirror of the reduction tree --------------------------------------------------------

@pytest.mark.parametrize("N,C,S", [(3, 4, 7), (2, 3, 1), (5, 2, 300), (1, 1, 1000)])
@pytest.mark.parametrize("stride", [1, 5, 256, 300, 2048])
def test_channel_walk_visits_the_right_addresses(N, C, S, stride):
    for c in range(C):
        for j0 in (0, 1, min(stride, N * S) - 1):
            steps = -(-(N * S - j0) // stride)
            got = mirror.walk_offsets(N, C, S, c, j0, stride, steps)
            js = range(j0, N * S, stride)
            assert got == [(j // S) * C * S + c * S + j % S for j in js]


def test_shuffle_down_returns_its_own_value_past_the_last_lane():
    lanes = (np.arange(32, dtype=np.float32),)
    (got,) = mirror.shfl_down(lanes, 16)
    assert list(got[:16]) == list(range(16, 32)) and list(got[16:]) == list(range(16, 32))
    total = mirror.warp_reduce(lanes, mirror.sums_combine)[0]
    assert total == sum(range(32))  # lane 0 never sees a doubled lane


@pytest.mark.parametrize("shape,layout,G", TREE_CASES)
def test_mirror_of_the_forward_tree_matches_two_pass(shape, layout, G):
    rng = np.random.default_rng(sum(shape))
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    count, mean, m2 = mirror.reduce_moments(x, layout, G)
    axes = channel_axes(shape, layout)
    ref = x.astype(np.float64)
    assert np.all(count == ref.size // ref.shape[1 if layout == "NCHW" else -1]), "each value is visited once"
    np.testing.assert_allclose(mean, ref.mean(axes), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m2 / count, ref.var(axes), rtol=1e-5)
    m, v, rstd = mirror.forward_stats(x, 1e-5, layout, G)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(ref.var(axes) + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("shape,layout,G", TREE_CASES[::2])
def test_mirror_of_the_backward_tree_matches_float64_sums(shape, layout, G):
    rng = np.random.default_rng(len(shape))
    x = (1.0 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    axes = channel_axes(shape, layout)
    mean = x.astype(np.float64).mean(axes).astype(np.float32)
    sum_dy, sum_dyxc = mirror.reduce_backward_sums(dy, x, mean, layout, G)
    centered = x.astype(np.float64) - np.expand_dims(mean, axes)
    prod = dy.astype(np.float64) * centered
    scale = np.abs(dy.astype(np.float64)).sum(axes)
    np.testing.assert_allclose(sum_dy, dy.astype(np.float64).sum(axes), atol=1e-6 * scale.max())
    np.testing.assert_allclose(sum_dyxc, prod.sum(axes), atol=1e-6 * np.abs(prod).sum(axes).max())


def test_one_pass_variance_cancels_where_welford_and_two_pass_hold():
    """float32, |mean|/std = 1e3: E[x^2] - E[x]^2 through the same tree is off by percents."""
    rng = np.random.default_rng(0)
    x = (1e3 + rng.standard_normal((16, 8, 32, 32))).astype(np.float32)
    ref = x.astype(np.float64).var((0, 2, 3))
    count, _, m2 = mirror.reduce_moments(x)
    s1, s2 = mirror.reduce_power_sums(x)
    n = count.astype(np.float32)
    one_pass = s2 / n - (s1 / n) ** 2
    welford = m2 / n
    two_pass = bnref.spatial_batchnorm_forward(x, np.ones(8, np.float32), np.zeros(8, np.float32))[1].rows.var

    def err(v):
        return float(np.max(np.abs(v.astype(np.float64) - ref) / ref))

    assert err(one_pass) > 1e-2
    assert err(welford) < 1e-4
    assert err(two_pass) < 1e-4


def test_wrappers_need_a_gpu_and_say_how_to_get_one():
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    x = np.ones((4, 3), np.float32)
    for call in (lambda: bnref.cuda.batchnorm_forward_gpu(x, np.ones(3), np.zeros(3)),
                 lambda: bnref.cuda.batchnorm_inference_gpu(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)),
                 lambda: bnref.cuda.channel_moments_gpu(x)):
        with pytest.raises(RuntimeError, match="Colab") as info:
            call()
        assert str(info.value) == NO_GPU_MESSAGE


# --- the kernels run: on a GPU, and on the CPU emulator ------------------------------------------------

GPU_SHAPES = [(2, 3, 5, 7), (3, 5, 7, 11), (16, 8, 33, 33), (4, 16, 28, 28), (1000, 37), (64, 12)]


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU here: cupy.is_available() is False")]


@pytest.fixture(params=[pytest.param("emulator", marks=needs_cxx), pytest.param("cupy", marks=ON_GPU)])
def cp(request):
    """Where the kernels run: CuPy on a GPU, or the CPU emulator of bnref.cuda.emulator (same source, same tests)."""
    if request.param == "cupy":
        import cupy
        yield cupy
        return
    backend = emulator.CupyOnCpu(sm_count=4)
    with gpu.use_backend(backend):
        yield backend


def _data(shape, loc=0.5, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def _reference_forward(x, gamma, beta, eps=1e-5):
    """float64 forward of the float32 data, with bnref's spatial or (N, D) layer."""
    args = (x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), eps)
    if x.ndim == 2:
        return bnref.batchnorm_forward(*args)
    return bnref.spatial_batchnorm_forward(*args)


@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("G", [None, 1, 3])
def test_gpu_forward_matches_the_reference(cp, shape, G):
    x = _data(shape)
    C = shape[1]
    gamma, beta = _data((C,), 1.0, 0.3, 1), _data((C,), 0.0, 1.0, 2)
    out, cache = bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta),
                                                  blocks_per_channel=G)
    expected, _ = _reference_forward(x, gamma, beta)
    np.testing.assert_allclose(cp.asnumpy(out), expected, rtol=1e-4, atol=1e-4)
    axes = channel_axes(shape, "NCHW")
    np.testing.assert_allclose(cp.asnumpy(cache.mean), x.astype(np.float64).mean(axes), rtol=1e-5, atol=1e-5)


def test_gpu_matches_the_mirror_to_float32_rounding(cp):
    for shape, layout, G in TREE_CASES:
        x = _data(shape, 3.0)
        C = shape[1] if layout == "NCHW" else shape[-1]
        _, cache = bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), cp.ones(C, cp.float32), cp.zeros(C, cp.float32),
                                                    layout=layout, blocks_per_channel=G)
        mean, _, rstd = mirror.forward_stats(x, 1e-5, layout, G)
        if isinstance(cp, emulator.CupyOnCpu):   # the same tree in the same float32 operations: to the bit
            np.testing.assert_array_equal(cp.asnumpy(cache.mean), mean)
            np.testing.assert_array_equal(cp.asnumpy(cache.rstd), rstd)
            continue
        # on a GPU, the same tree up to FMA contraction and __fdividef: agreement to a few float32 ulps
        np.testing.assert_allclose(cp.asnumpy(cache.mean), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cp.asnumpy(cache.rstd), rstd, rtol=1e-5)


def test_gpu_running_stats_follow_torch(cp):
    C = 8
    layer = torch.nn.BatchNorm2d(C, momentum=0.1, dtype=torch.float64)
    rm, rv = cp.zeros(C, cp.float32), cp.ones(C, cp.float32)
    for step in range(3):
        x = _data((5, C, 9, 7), loc=step, seed=step)
        with torch.no_grad():
            layer(torch.from_numpy(x.astype(np.float64)))
        bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), cp.ones(C, cp.float32), cp.zeros(C, cp.float32), rm, rv,
                                         momentum=0.1, blocks_per_channel=2)
    np.testing.assert_allclose(cp.asnumpy(rm), layer.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cp.asnumpy(rv), layer.running_var.numpy(), rtol=1e-5,
                               err_msg="running_var averages the unbiased batch variance")


def test_gpu_nhwc_equals_nchw_and_large_offsets_stay_accurate(cp):
    x = _data((6, 12, 11, 13), loc=1e3, scale=1.0)       # |mean| / std = 1e3
    g, b = cp.ones(12, cp.float32), cp.zeros(12, cp.float32)
    out, cache = bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), g, b)
    out_nhwc, cache_nhwc = bnref.cuda.batchnorm_forward_gpu(cp.asarray(np.moveaxis(x, 1, -1)), g, b, layout="NHWC")
    np.testing.assert_allclose(cp.asnumpy(out_nhwc), np.moveaxis(cp.asnumpy(out), 1, -1), rtol=1e-4, atol=1e-4)
    var = 1 / cp.asnumpy(cache.rstd).astype(np.float64) ** 2 - 1e-5
    ref = x.astype(np.float64).var((0, 2, 3))
    assert np.max(np.abs(var - ref) / ref) < 1e-4


@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_inference_and_backward_match_the_reference(cp, shape):
    C = shape[1]
    x, dout = _data(shape), _data(shape, 0.0, 1.0, 3)
    gamma, beta = _data((C,), 1.0, 0.3, 1), _data((C,), 0.0, 1.0, 2)
    rm, rv = _data((C,), 0.0, 1.0, 4), np.abs(_data((C,), 1.0, 0.5, 5)) + 0.1
    out = bnref.cuda.batchnorm_inference_gpu(*(cp.asarray(a) for a in (x, gamma, beta, rm, rv)))
    if x.ndim == 2:
        expected = bnref.batchnorm_inference(x.astype(np.float64), gamma, beta, rm, rv)
    else:
        expected = bnref.spatial_batchnorm_inference(x.astype(np.float64), gamma, beta, rm, rv)
    np.testing.assert_allclose(cp.asnumpy(out), expected, rtol=1e-5, atol=1e-5)

    _, cache = bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta))
    dx, dgamma, dbeta = bnref.cuda.batchnorm_backward_gpu(cp.asarray(dout), cache)
    _, ref_cache = _reference_forward(x, gamma, beta)
    backward = bnref.batchnorm_backward_alt if x.ndim == 2 else bnref.spatial_batchnorm_backward
    rdx, rdgamma, rdbeta = backward(dout.astype(np.float64), ref_cache)
    np.testing.assert_allclose(cp.asnumpy(dx), rdx, rtol=1e-4, atol=1e-4 * np.abs(rdx).max())
    np.testing.assert_allclose(cp.asnumpy(dgamma), rdgamma, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(cp.asnumpy(dbeta), rdbeta, rtol=1e-4, atol=1e-3)


def test_gpu_results_are_deterministic_and_misaligned_input_works(cp):
    x = _data((8, 16, 20, 20))
    g, b = cp.ones(16, cp.float32), cp.zeros(16, cp.float32)
    first, c1 = bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), g, b, blocks_per_channel=5)
    second, c2 = bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), g, b, blocks_per_channel=5)
    assert cp.array_equal(first, second) and cp.array_equal(c1.rstd, c2.rstd), "fixed merge order, counters reset"
    buf = cp.empty(x.size + 1, cp.float32)
    shifted = buf[1:].reshape(x.shape)                     # contiguous, but 4 bytes off a 16-byte boundary
    shifted[...] = cp.asarray(x)
    out, _ = bnref.cuda.batchnorm_forward_gpu(shifted, g, b)
    np.testing.assert_allclose(cp.asnumpy(out), cp.asnumpy(first), rtol=1e-6, atol=1e-6)


def test_gpu_simple_two_pass_reduction(cp):
    x = _data((5, 7, 9, 11), loc=50.0)
    mean, var = bnref.cuda.channel_moments_gpu(cp.asarray(x))
    ref = x.astype(np.float64)
    np.testing.assert_allclose(cp.asnumpy(mean), ref.mean((0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(cp.asnumpy(var), ref.var((0, 2, 3)), rtol=1e-4)


# --- the benchmark and the roofline page ----------------------------------------------------------

@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_benchmark_exits_with_a_message_and_writes_nothing_without_a_gpu(tmp_path):
    script = roofline.RESULTS_DIR.parents[1] / "gpu_batchnorm.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_roofline_helpers_draw_a_results_file_schema(tmp_path):
    """The page's plotting code on a made-up results dict (schema only; never written to disk)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fake = {"device": "schema test", "date": "-", "copy_gbps": 100.0, "repeats": 1, "rows": []}
    for shape in [(4, 8), (2, 3, 4, 4)]:
        numel = int(np.prod(shape))
        for p in roofline.PASSES:
            floor = roofline.floor_ms(numel, p, fake["copy_gbps"])
            fake["rows"].append({"shape": list(shape), "pass": p, "ours_ms": 2 * floor, "floor_ms": floor,
                                 "ours_over_floor": 2.0, "ours_gbps": roofline.nominal_gbps(numel, p, 2 * floor),
                                 "ours_pct_copy": 1.0, "torch_cudnn_ms": None})
    assert "schema test" in roofline.results_table(fake)
    fig, ax = plt.subplots()
    roofline.plot_results([fake], ax)
    roofline.plot_floors([(4, 8)], ax)
    plt.close(fig)
    assert roofline.load_results(tmp_path) == []
    assert roofline.floor_ms(10**9, "backward", 1000.0) == pytest.approx(20.0)


def test_every_committed_gpu_results_file_is_drawable_by_the_page():
    """The chapter-5 page plots every file in RESULTS_DIR; a file of another schema there breaks the book."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert roofline.RESULTS_DIR.name == "gpu"
    results = roofline.load_results()
    for result in results:
        assert {"device", "date", "copy_gbps", "rows"} <= set(result), result.get("device")
        assert result["device"] in roofline.results_table(result)
    fig, ax = plt.subplots()
    if results:
        roofline.plot_results(results, ax)
    plt.close(fig)
