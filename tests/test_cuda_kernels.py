"""Chapter 5's CUDA kernels.

Without a GPU: every kernel source compiles with nvcc for sm_75, sm_80 and sm_90
without register spills (ptxas' resource table is printed at the end of the
module) and matches the committed table the planner reads; the launch planner
sizes every persistent grid to the resident slots, in balanced shares; and the
NumPy mirror of the kernels' reduction tree matches the two-pass statistics on
shapes with partial warps, partial blocks and a grid-level merge. The kernels
themselves run against bnref and torch twice: on the CPU emulator
(``bnref.cuda.emulator``, always, where a C++ compiler exists), and on a GPU
with CuPy (``-m gpu``, skipped with a reason when there is none).
"""
import gc
import re
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
import torch

import bnref
from bnref.cuda import (KERNELS, NO_GPU_MESSAGE, checks, emulator, gpu, gpu_available, kernel_source, mirror, nvcc,
                        plan, roofline, sass)

HAS_GPU = gpu_available()
needs_cxx = pytest.mark.skipif(emulator.compiler() is None, reason="no host C++ compiler: CUDA emulator not built")
needs_nvcc = pytest.mark.skipif(nvcc.nvcc_path() is None, reason="nvcc is not on PATH: kernel sources not compiled")


# (shape, layout, blocks): partial warps (231 values per channel), N*H*W not a multiple of 256, shares that
# cross channel boundaries, float4 loads (S % 4 == 0), a partial column of channels (37), a grid merge
# with more partials (300) than threads (256), in two levels (runs of FANIN = 32), and channels-last float4
# lanes: C = 64 (a row of 16 float4s, no idle lane; 45 blocks on one column, two runs) and C = 36 (9 float4s,
# columns of 2).
TREE_CASES = [
    ((3, 40, 7, 64), "NHWC", 45),
    ((2000, 36), "NCHW", 40),
    ((3, 5, 7, 11), "NCHW", None),
    ((3, 5, 7, 11), "NCHW", 3),
    ((5, 2, 1000), "NCHW", 7),
    ((4, 6, 8, 8), "NCHW", 5),
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
    bounds = declared_blocks(arch)
    for r in rows:
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0, f"{r.kernel} spills on {arch}: {r}"
        # __launch_bounds__(256, N): ptxas fits the registers to N resident blocks, and they do fit
        assert r.blocks_per_sm >= bounds[r.kernel], (f"{r.kernel} on {arch}: {r.registers} registers allow "
                                                     f"{r.blocks_per_sm}/SM, not {bounds[r.kernel]}")


def declared_blocks(arch):
    """{kernel: the resident blocks per SM its __launch_bounds__ asks for on ``arch``}: BN_BLOCKS_PER_SM or
    BN_BLOCKS_PER_SM_WIDE, whose first definitions in bn_common.cuh are Turing's and the second the rest's."""
    defines = re.findall(r"^#define (BN_BLOCKS_PER_SM\w*) (\d+)", bnref.cuda.raw_source("bn_common.cuh"), re.M)
    value = {name: int(n) for name, n in (defines[:2] if arch == "sm_75" else defines[2:])}
    return {kernel: value[bound] for file in KERNELS for bound, kernel in re.findall(
        r'__launch_bounds__\(BN_THREADS, (\w+)\)\n(\w+)\(', bnref.cuda.raw_source(file))}


def test_the_committed_ptxas_table_covers_every_kernel_without_spills():
    """The planner and the page read ptxas.json where there is no GPU: it must list every kernel on every arch."""
    rows, _ = nvcc.committed_rows()
    assert {(r.kernel, r.arch) for r in rows} == {(k, a) for names in KERNELS.values() for k in names
                                                 for a in nvcc.ARCHS}
    assert all(r.spill_stores == r.spill_loads == r.stack == 0 for r in rows)


@needs_nvcc
def test_the_committed_ptxas_table_is_what_nvcc_reports_now():
    """A kernel edit that changes its registers must come with `python -m bnref.cuda.nvcc --write`."""
    rows, release = nvcc.committed_rows()
    if release != nvcc.nvcc_release():
        pytest.skip(f"the table was written by nvcc {release}, this machine has {nvcc.nvcc_release()}")
    now = nvcc.report()
    if sass.tool()[0] is None:   # no disassembler: the ptxas columns alone
        now, rows = [r[:7] for r in now], [r[:7] for r in rows]
    assert sorted(now) == sorted(rows), "stale ptxas_report.py: run python -m bnref.cuda.nvcc --write"


@needs_nvcc
@pytest.mark.parametrize("grade_id,kernel", [("channel_stats", "channel_stats"),
                                             ("fused_forward_stats", "fused_stats")])
def test_the_exercise_solution_kernels_compile(grade_id, kernel, tmp_path):
    """The CUDA strings of the solved chapter-5 exercise (their grader runs them on a GPU)."""
    import jupytext
    from bngrade.pipeline.course import SOURCES

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
        bounds = r'extern "C" __global__ void __launch_bounds__\(BN_THREADS, BN_BLOCKS_PER_SM(?:_WIDE)?\)\n(\w+)\('
        assert set(re.findall(bounds, text)) == set(names), f"{file}: every kernel states its launch bounds"
    used = {f"{stem}_{k}{v}" for stem in ("bn_forward_stats", "bn_backward_reduce", "bn_affine", "bn_backward_dx")
            for k in ("ncs", "mc") for v in ("", "_vec4")}
    assert used <= {n for names in KERNELS.values() for n in names}


def test_the_header_and_the_planner_agree_on_their_constants():
    """plan.py computes the split the kernels compute: the constants they share must be equal."""
    header = dict(re.findall(r"^#define (BN_\w+) (\d+)", bnref.cuda.raw_source("bn_common.cuh"), re.M))
    assert int(header["BN_THREADS"]) == plan.THREADS
    assert int(header["BN_CHUNK"]) == plan.CHUNK
    assert int(header["BN_LOAD_BYTES"]) == plan.LOAD_BYTES
    assert int(header["BN_FANIN"]) == plan.FANIN


def test_ptxas_report_parser():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90'\nptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 70 registers, used 1 barriers, 385 bytes smem\n")
    assert nvcc.parse_ptxas(log) == [nvcc.Resources("k", "sm_90", 70, 4, 4, 8, 385)]


# --- the launch plan --------------------------------------------------------------------------

BENCH_SHAPES = [(256, 4096), (8192, 4096), (32, 64, 56, 56), (256, 256, 14, 14), (256, 512, 7, 7),
                (64, 256, 56, 56), (256, 64, 112, 112)]


def planned_launches(shape, layout, gpu_name):
    """Every launch the wrappers plan for ``shape`` on ``gpu_name`` (a key of plan.GPUS), aligned arrays:
    (kernel name, Launch, slots of that kernel, values in the tensor)."""
    lay = plan.layout_of(shape, layout)
    vec = plan.vector_width(lay, True)
    out = []
    for stems, launch in ((("bn_forward_stats", "bn_backward_reduce"), plan.reduction_launch),
                          (("bn_affine", "bn_backward_dx"), plan.elementwise_launch)):
        for stem in stems:
            name = f"{stem}_{lay.kind}" + ("_vec4" if vec == 4 else "")
            slots = plan.resident_blocks(name, gpu_name)
            out.append((name, launch(lay, vec, slots), slots))
    return out


@pytest.mark.parametrize("gpu_name", ["H200", "T4"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", BENCH_SHAPES)
def test_every_grid_is_one_whole_wave_of_balanced_shares(shape, layout, gpu_name):
    """Each grid has exactly as many blocks as the GPU holds at once (the kernel's occupancy from ptxas times
    the SMs): no second, partial wave. Fewer blocks, in one wave, only where the work has fewer units than
    slots, or (reductions) too few values for MIN_PER_THREAD per thread in every slot. And no block's share
    exceeds another's by more than one unit (one chunk of 32 values or float4s, or one row of a column)."""
    for name, launch, slots in planned_launches(shape, layout, gpu_name):
        if launch.blocks < slots and launch.blocks < launch.units:
            assert "reduce" in name or "stats" in name, f"{name}: {launch.blocks} blocks for {slots} slots"
            vec = 4 if name.endswith("_vec4") else 1
            thread_values = launch.units * (plan.CHUNK if "_ncs" in name else launch.block[0] * vec)
            assert thread_values < slots * plan.THREADS * plan.MIN_PER_THREAD, f"{name}: needless partial wave"
        elif launch.blocks < slots:
            assert launch.blocks == launch.units, f"{name}: one unit per block, and still a slot to spare"
        else:
            assert launch.blocks == slots, f"{name}: {launch.blocks} blocks for {slots} slots"
        shares = [hi - lo for lo, hi in map(launch.share, range(launch.blocks))]
        assert sum(shares) == launch.units and max(shares) - min(shares) <= 1, name


@pytest.mark.parametrize("shape,layout,blocks", TREE_CASES + [((1, 3, 5000), "NCHW", 40), ((64, 300), "NHWC", 13)])
def test_the_segments_cover_every_unit_once_in_distinct_slots(shape, layout, blocks):
    lay = plan.layout_of(shape, layout)
    launch = plan.reduction_launch(lay, plan.vector_width(lay, True), 8, blocks)
    segs = plan.segments(launch)
    covered = np.zeros(launch.units, int)
    for s in segs:
        assert s.lo < s.hi <= launch.per_group
        covered[s.group * launch.per_group + s.lo:s.group * launch.per_group + s.hi] += 1
    assert np.all(covered == 1)
    slots = [s.block + s.group for s in segs]
    assert slots == sorted(set(slots)) and max(slots) < launch.partial_slots, "slot b + g is unique, in order"


def test_occupancy_follows_the_registers_as_cuda_counts_them():
    """The figures of the review: 32 registers -> 8 blocks of 256 per SM, 40 -> 6, 48 -> 5 on an H100/H200;
    a T4 holds 4 such blocks whatever their registers (1024 threads per SM); shared memory can limit too."""
    assert [plan.blocks_per_sm(r, 0, "sm_90") for r in (32, 40, 48, 64)] == [8, 6, 5, 4]
    assert [plan.blocks_per_sm(r, 0, "sm_75") for r in (32, 48, 64)] == [4, 4, 4]
    assert plan.blocks_per_sm(32, 48 * 1024, "sm_90") == 4


@pytest.mark.parametrize("shape", BENCH_SHAPES + [(3, 5, 7, 11), (2, 7)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_launch_shapes_are_legal(shape, layout):
    for name, launch, slots in planned_launches(shape, layout, "H200"):
        assert 1 <= launch.blocks <= min(slots, launch.units) and launch.grid[1:] == (1, 1)
        bx, by, _ = launch.block
        assert bx & (bx - 1) == 0 and bx * by == plan.THREADS, f"{name}: by a power of two, for the row tree"


@pytest.mark.parametrize("C,bx", [(64, 16), (96, 8), (128, 32), (256, 32), (4096, 32), (12, 4)])
def test_channels_last_reductions_read_float4s_with_no_idle_lane(C, bx):
    """NHWC with C % 4 == 0: a thread holds a float4 (4 channels) and a row of a block bx float4s, a power of two
    that divides C / 4 where one does, up to 32 (128 channels, 512 B per warp and row): at C = 64 that is 16
    float4s, and a warp covers two whole rows."""
    lay = plan.layout_of((32, 56, 56, C), "NHWC")
    launch = plan.reduction_launch(lay, plan.vector_width(lay, True), 792)
    assert launch.block[:2] == (bx, plan.THREADS // bx)
    assert launch.groups * bx * 4 - C == (0 if C != 12 else 4)


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


@pytest.mark.parametrize("shape,layout,blocks", TREE_CASES)
def test_mirror_of_the_forward_tree_matches_two_pass(shape, layout, blocks):
    rng = np.random.default_rng(sum(shape))
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    count, mean, m2 = mirror.reduce_moments(x, layout, blocks)
    axes = channel_axes(shape, layout)
    ref = x.astype(np.float64)
    assert np.all(count == ref.size // ref.shape[1 if layout == "NCHW" else -1]), "each value is visited once"
    np.testing.assert_allclose(mean, ref.mean(axes), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m2 / count, ref.var(axes), rtol=1e-5)
    m, v, rstd = mirror.forward_stats(x, 1e-5, layout, blocks)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(ref.var(axes) + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("shape,layout,blocks", TREE_CASES[::2])
def test_mirror_of_the_backward_tree_matches_float64_sums(shape, layout, blocks):
    rng = np.random.default_rng(len(shape))
    x = (1.0 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    axes = channel_axes(shape, layout)
    mean = x.astype(np.float64).mean(axes).astype(np.float32)
    sum_dy, sum_dyxc = mirror.reduce_backward_sums(dy, x, mean, layout, blocks)
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
    backend = emulator.CupyOnCpu(sm_count=4, blocks_per_sm=2)
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
@pytest.mark.parametrize("blocks", [None, 1, 3])
def test_gpu_forward_matches_the_reference(cp, shape, blocks):
    x = _data(shape)
    C = shape[1]
    gamma, beta = _data((C,), 1.0, 0.3, 1), _data((C,), 0.0, 1.0, 2)
    out, cache = bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta),
                                                  blocks=blocks)
    expected, _ = _reference_forward(x, gamma, beta)
    np.testing.assert_allclose(cp.asnumpy(out), expected, rtol=1e-4, atol=1e-4)
    axes = channel_axes(shape, "NCHW")
    np.testing.assert_allclose(cp.asnumpy(cache.mean), x.astype(np.float64).mean(axes), rtol=1e-5, atol=1e-5)


def reduction_slots(cp, file, stem, shape, layout):
    """The slots the wrappers plan the reduction ``stem`` of an aligned ``shape`` for, on backend ``cp``."""
    lay = plan.layout_of(shape, layout)
    vec = plan.vector_width(lay, True)
    return gpu._slots(cp, gpu._kernel(cp, file, f"{stem}_{lay.kind}" + ("_vec4" if vec == 4 else "")))


def test_gpu_matches_the_mirror_to_float32_rounding(cp):
    for shape, layout, blocks in TREE_CASES:
        x, dy = _data(shape, 3.0), _data(shape, 0.0, 1.0, 3)
        C = shape[1] if layout == "NCHW" else shape[-1]
        _, cache = bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), cp.ones(C, cp.float32), cp.zeros(C, cp.float32),
                                                    layout=layout, blocks=blocks)
        _, dgamma, dbeta = bnref.cuda.batchnorm_backward_gpu(cp.asarray(dy), cache, blocks=blocks)
        slots = reduction_slots(cp, "bn_forward.cu", "bn_forward_stats", shape, layout)
        mean, _, rstd = mirror.forward_stats(x, 1e-5, layout, blocks, slots)
        slots = reduction_slots(cp, "bn_backward.cu", "bn_backward_reduce", shape, layout)
        sum_dy, sum_dyxc = mirror.reduce_backward_sums(dy, x, cp.asnumpy(cache.mean), layout, blocks, slots)
        got = [cp.asnumpy(a) for a in (cache.mean, cache.rstd, dbeta, dgamma)]
        want = [mean, rstd, sum_dy, (sum_dyxc * cp.asnumpy(cache.rstd)).astype(np.float32)]
        for g, w in zip(got, want):
            if isinstance(cp, emulator.CupyOnCpu):   # the same tree in the same float32 operations: to the bit
                np.testing.assert_array_equal(g, w, err_msg=f"{shape} {layout} blocks={blocks}")
            else:   # on a GPU, the same tree up to FMA contraction and __fdividef: a few float32 ulps
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(w).max())))


def test_gpu_running_stats_follow_torch(cp):
    C = 8
    layer = torch.nn.BatchNorm2d(C, momentum=0.1, dtype=torch.float64)
    rm, rv = cp.zeros(C, cp.float32), cp.ones(C, cp.float32)
    for step in range(3):
        x = _data((5, C, 9, 7), loc=step, seed=step)
        with torch.no_grad():
            layer(torch.from_numpy(x.astype(np.float64)))
        bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), cp.ones(C, cp.float32), cp.zeros(C, cp.float32), rm, rv,
                                         momentum=0.1, blocks=2)
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


@pytest.mark.parametrize("layout,shape", [("NCHW", (8, 16, 20, 20)), ("NHWC", (8, 20, 20, 16))])
def test_gpu_results_are_deterministic_on_alternating_poisoned_runs(cp, layout, shape):
    """Fixed merge order and counters reset: two different inputs in turn, every array the wrappers allocate
    filled with NaN first (bnref.cuda.checks), and each run bit-identical to the first run of its input."""
    runs = 6 if isinstance(cp, emulator.CupyOnCpu) else 50
    g, b = cp.ones(16, cp.float32), cp.zeros(16, cp.float32)
    inputs = checks.alternating_inputs(cp, shape, layout)
    assert checks.race_free(cp, inputs, g, b, layout, runs=runs, blocks=5) is None
    assert checks.race_free(cp, inputs, g, b, layout, runs=runs) is None


def test_gpu_misaligned_input_works(cp):
    x = _data((8, 16, 20, 20))
    g, b = cp.ones(16, cp.float32), cp.zeros(16, cp.float32)
    first, _ = bnref.cuda.batchnorm_forward_gpu(cp.asarray(x), g, b)
    buf = cp.empty(x.size + 1, cp.float32)
    shifted = buf[1:].reshape(x.shape)                     # contiguous, but 4 bytes off a 16-byte boundary
    shifted[...] = cp.asarray(x)
    out, _ = bnref.cuda.batchnorm_forward_gpu(shifted, g, b)
    np.testing.assert_allclose(cp.asnumpy(out), cp.asnumpy(first), rtol=1e-6, atol=1e-6)


def test_each_stream_and_host_thread_gets_its_own_arrival_counters(monkeypatch):
    """Launches that may overlap (other streams, other host threads) must not share counters[0..C-1]; launches
    on one stream run in order and may. A stream's counters go when the stream does."""
    backend = emulator.CupyOnCpu()
    monkeypatch.setattr(gpu, "_COUNTERS", weakref.WeakKeyDictionary())

    current = []
    monkeypatch.setattr(backend.cuda, "get_current_stream", lambda: current[-1])

    def counters_on(stream):
        current.append(stream)
        counters = gpu._counters(backend, 64)
        current.pop()
        return counters

    a, b = emulator.Stream(), emulator.Stream()
    first = counters_on(a)
    assert counters_on(a) is first and counters_on(b) is not first
    other = []
    worker = threading.Thread(target=lambda: other.append(counters_on(a)))
    worker.start()
    worker.join()
    assert other[0] is not first
    del b
    gc.collect()
    assert len(gpu._COUNTERS) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU here: cupy.is_available() is False")
def test_the_drivers_occupancy_is_the_planners_rule_on_the_compiled_kernels():
    """On a GPU the grids are sized by the driver's occupancy of each compiled kernel; where the architecture
    is one plan.SM_LIMITS knows, it must equal the rule the page and the tests use with ptxas' numbers."""
    import cupy

    arch = f"sm_{cupy.cuda.Device().compute_capability}"
    if arch not in plan.SM_LIMITS:
        pytest.skip(f"{arch} is not in plan.SM_LIMITS")
    for file, names in KERNELS.items():
        for name in names:
            kernel = gpu._kernel(cupy, file, name)
            regs, smem = kernel.num_regs, kernel.shared_size_bytes
            per_sm = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, plan.THREADS, 0)
            assert per_sm == plan.blocks_per_sm(regs, smem, arch), f"{name}: {regs} registers, {smem} B smem"


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
    """The page's plotting code on made-up results dicts (schema only; never written to disk): the rows
    benchmarks/gpu_batchnorm.py writes now (layouts, host time, percentiles, effective GB/s, L2 flag, our
    kernels' launches and shares, torch's kernels, the host-inclusive ratio) as its own row printer shows them,
    and rows of the first schema, without those columns."""
    import importlib.util

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = importlib.util.spec_from_file_location("gpu_batchnorm", roofline.RESULTS_DIR.parents[1] / "gpu_batchnorm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fake = {"device": "schema test", "date": "-", "copy_gbps": 100.0, "memcpy_gbps": 90.0, "copy4_gbps": 100.0,
            "read_gbps": 110.0, "repeats": 1, "method": "made up", "rows": []}
    old = {"device": "first schema", "date": "-", "copy_gbps": 100.0, "repeats": 1, "rows": []}
    for shape in [(4, 8), (2, 3, 4, 4)]:
        numel = int(np.prod(shape))
        for p in roofline.PASSES:
            floor = roofline.floor_ms(numel, p, fake["copy_gbps"])
            row = {"shape": list(shape), "pass": p, "ours_ms": 2 * floor, "floor_ms": floor, "ours_over_floor": 2.0,
                   "ours_gbps": roofline.nominal_gbps(numel, p, 2 * floor), "ours_pct_copy": 1.0,
                   "torch_cudnn_ms": None}
            old["rows"].append(row)
            for layout in ("NCHW", "NHWC") if len(shape) == 4 else ("NCHW",):
                kernels = [{"kernel": "bn_forward_stats_ncs_vec4", "vec": 4, "grid": [792, 1, 1], "block": [256, 1, 1],
                            "blocks_per_sm": 6, "registers": 40, "smem": 385, "ms": floor, "share": 0.5}]
                fake["rows"].append({**row, "layout": layout, "ours_host_us": 30.0, "gaps_hidden": True,
                                     "ours_p10_ms": 1.9 * floor, "ours_p90_ms": 2.1 * floor,
                                     "ours_user_ms": 2 * floor, "ours_kernels": kernels,
                                     "torch_cudnn_user_over_ours": 1.25,
                                     "ours_eff_gbps": roofline.effective_gbps(numel, p, 2 * floor),
                                     "l2_resident": roofline.l2_resident(numel, p, 50 << 20),
                                     "torch_cudnn_ms": 3 * floor, "torch_cudnn_over_ours": 1.5,
                                     "torch_cudnn_kernels": ["void cudnn::bn_fw_tr_1C11_kernel_NCHW<float>()"]
                                     if len(shape) > 2 else ["void at::native::batch_norm_collect_statistics()"],
                                     "torch_native_ms": 4 * floor, "torch_native_over_ours": 2.0,
                                     "torch_native_kernels": ["void at::native::batch_norm_collect_statistics()"]})
    table = roofline.results_table(fake)
    assert "schema test" in table and "2×3×4×4 NHWC" in table and " L2 " in table and "read 110" in table
    assert " cuDNN " in table and " native " in table, "what torch ran with cuDNN enabled: cuDNN only from 3-D"
    assert " 1.25 " in table, "torch over ours with the host time counted"
    shares = roofline.kernel_shares_table(fake)
    assert "bn_forward_stats_ncs_vec4      792 x  256x1 vec 4  6/SM  40 regs  50.0 %" in shares
    assert "first schema" in roofline.results_table(old) and roofline.kernel_shares_table(old) == ""
    assert "goals met: 9 of 18" in roofline.goals_table(fake), "twice the floor misses; torch at 1.5x meets its"
    line = bench.format_row(fake["rows"][-1])
    assert "forward_stats_ncs_vec4 50%" in line and "(with host 1.25)" in line
    fig, ax = plt.subplots()
    roofline.plot_results([fake, old], ax)
    roofline.plot_floors([(4, 8)], ax)
    plt.close(fig)
    assert roofline.load_results(tmp_path) == []
    assert roofline.floor_ms(10**9, "backward", 1000.0) == pytest.approx(20.0)
    assert roofline.effective_gbps(10**9, "forward_train", 12.0) == pytest.approx(1000.0)
    assert roofline.l2_resident(10**6, "forward_train", 50 << 20)
    assert not roofline.l2_resident(10**8, "backward", 50 << 20)
    assert not roofline.l2_resident(10, "forward_inference", 50 << 20), "inference reads x once: its floor holds"


def test_littles_law_and_the_kernels_bytes_in_flight():
    """4.8 TB/s x 700 ns over 132 SMs is about 25 KB per SM; 6 resident blocks of 256 threads x 32 B are 48 KB,
    5 are 40 KB: what the committed machine-code report gives every kernel of a step (all but the simple one)."""
    assert roofline.bytes_in_flight_needed(4800, 700, 132) == pytest.approx(25454, rel=1e-3)
    assert roofline.bytes_in_flight("bn_forward_stats_ncs_vec4", "H200") == 6 * 256 * 32
    assert roofline.bytes_in_flight("bn_forward_stats_mc_vec4", "H200") == 5 * 256 * 32
    for kernel in {k for names in KERNELS.values() for k in names} - {"bn_channel_moments_ncs"}:
        assert roofline.bytes_in_flight(kernel, "H200") >= 5 * 256 * plan.LOAD_BYTES, kernel


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
