"""Chapter 5's hidden checks, on the CPU: ``xp=numpy``, with NumPy stand-ins for the students' GPU code.

The correct stand-in of the statistics kernel is the NumPy mirror of the
package's reduction tree; the seeded mistakes must each be named.
"""
import linecache
import re

import jupytext
import numpy as np
import pytest

import bnref
from bnref.cuda import emulator, gpu_available, mirror
from bngrade.verdicts import ch05
from bngrade.judge import compare
from bngrade.pipeline.course import SOURCES
from class_roster import REDUCTION_VAR, ROSTER


@pytest.fixture(autouse=True)
def no_reference_detection(request, monkeypatch):
    """Stand-ins are written in this module, which imports bnref; detection is tested apart."""
    if "reference_package" not in request.node.name:
        monkeypatch.setattr(compare, "uses_reference", lambda fn: False)


def solution_function(grade_id, *needs, cp=None, edit=lambda source: source):
    """The solved cell ``grade_id`` of the exercise source (after the cells ``needs``), executed; its function.

    ``cp`` is the array module the cells see (CuPy, which imports without a GPU, by default); ``edit``
    rewrites the source of cell ``grade_id`` first (to seed a mistake).
    """
    if cp is None:
        import cupy as cp  # get_array_module works on NumPy arrays

    cells = {c.metadata.get("nbgrader", {}).get("grade_id"): c.source
             for c in jupytext.read(SOURCES / "ch05_cupy_kernels.md").cells}
    namespace = {"np": np, "cp": cp}
    for cell_id in (*needs, grade_id):
        source = re.sub(r"^\s*### (BEGIN|END) SOLUTION\n", "", cells[cell_id], flags=re.M)
        source = edit(source) if cell_id == grade_id else source
        run_cell(source, namespace)
    return namespace[grade_id]


def run_cell(source, namespace):
    """exec ``source`` as a notebook cell, its text kept where ``inspect.getsource`` finds it (as IPython does)."""
    filename = f"<cell {hash(source)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)


def stats_by_mirror(x):
    """channel_stats as the package's kernel tree computes it (Welford, Chan, float32)."""
    count, mean, m2 = mirror.reduce_moments(np.asarray(x, np.float32))
    return mean, (m2 / count.astype(np.float32)).astype(np.float32)


def one_pass_stats(x):
    x = np.asarray(x, np.float32)
    mean = x.mean(axis=(0, 2, 3))
    return mean, (x * x).mean(axis=(0, 2, 3)) - mean * mean


def forward_from(stats):
    def forward(x, gamma, beta, eps=1e-5):
        mean, var = stats(x)
        a = (gamma / np.sqrt(var + np.float32(eps))).astype(np.float32)
        b = (beta - mean * a).astype(np.float32)
        return x * a[None, :, None, None] + b[None, :, None, None]
    return forward


# --- chan_merge ---

def test_the_exercise_solution_of_chan_merge_passes_on_numpy_arrays():
    ch05.check_chan_merge(solution_function("chan_merge"), xp=np)


@pytest.mark.parametrize("mistake", ch05.MERGE_MISTAKES, ids=lambda m: m.message[:40])
def test_each_merge_mistake_is_named(mistake):
    def student(a, b):
        return tuple(np.asarray(v, dtype=a[1].dtype) if i else v for i, v in enumerate(mistake.fn(a, b)))

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        ch05.check_chan_merge(student, xp=np)


def test_a_merge_that_divides_by_zero_is_named():
    def student(a, b):
        (na, ma, qa), (nb, mb, qb) = a, b
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            w = (nb / n).astype(ma.dtype)
        d = mb - ma
        return n, ma + d * w, qa + qb + d * d * na * w

    with pytest.raises(AssertionError, match="nan when both counts are 0"):
        ch05.check_chan_merge(student, xp=np)


def test_a_merge_that_returns_float64_for_float32_means_is_named():
    good = solution_function("chan_merge")

    def student(a, b):
        n, mean, m2 = good(a, b)
        return n, mean.astype(np.float64), m2.astype(np.float64)

    with pytest.raises(AssertionError, match="keep the dtype of the means"):
        ch05.check_chan_merge(student, xp=np)


# --- channel_stats ---

needs_cxx = pytest.mark.skipif(emulator.compiler() is None, reason="no host C++ compiler: CUDA emulator not built")


def edits(*pairs):
    """An edit of a cell's source: each (old, new) replaces text that must occur exactly once."""
    def edit(source):
        for old, new in pairs:
            assert source.count(old) == 1, f"the solution no longer contains {old!r} exactly once"
            source = source.replace(old, new)
        return source
    return edit


ON_GPU = [pytest.mark.gpu,
          pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU here: cupy.is_available() is False")]
EMULATED = [pytest.param(order, marks=needs_cxx) for order in ("forward", "reverse", "shuffled")]


@pytest.mark.parametrize("where", [*EMULATED, pytest.param("cupy", marks=ON_GPU)])
def test_the_whole_solution_passes_every_hidden_check(where):
    """The exercise's CuPy code itself (RawKernels, ReductionKernels, ElementwiseKernel): on a GPU, or run by
    bnref.cuda.emulator with its blocks and threads in forward, reverse or shuffled order."""
    if where == "cupy":
        import cupy as cp
    else:
        cp = emulator.CupyOnCpu(order=where)
    ch05.check_chan_merge(solution_function("chan_merge", cp=cp), xp=cp)
    ch05.check_reduction_moments(solution_function("reduction_moments", cp=cp), xp=cp)
    stats = solution_function("channel_stats", cp=cp)
    ch05.check_channel_stats(stats, xp=cp)
    ch05.check_channel_stats_large_offset(stats, xp=cp)
    ch05.check_batchnorm_forward_cupy(solution_function("batchnorm_forward_cupy", "channel_stats", cp=cp), xp=cp)
    ch05.check_fused_forward_stats(solution_function("fused_forward_stats", cp=cp), xp=cp)


CH05_ROSTER = ROSTER["ch05_cupy_kernels"]
REDUCTION_MISTAKES = {
    "cancellation of the one-pass": CH05_ROSTER["one-pass-reduction"]["replace"]["reduction_moments"],
    "divides by the count minus 1": [(REDUCTION_VAR, REDUCTION_VAR.replace("/ count", "/ (count - 1)"))],
    "does not use ReductionKernel": [
        ('total = cp.ReductionKernel("T v", "T s", "v", "a + b", "s = a", "0", "bn_sum")',
         "total = lambda v, axis: v.sum(axis=axis)"),
        ('squares = cp.ReductionKernel("T v, T m", "T s", "(v - m) * (v - m)", "a + b", "s = a", "0", '
         '"bn_centred_squares")', "squares = lambda v, m, axis: ((v - m) ** 2).sum(axis=axis)")],
}


def test_the_fused_reference_follows_torch_batchnorm2d():
    import torch

    for case in ch05._fused_cases():
        x, rm, rv, momentum, eps = case.args
        layer = torch.nn.BatchNorm2d(x.shape[1], eps=eps, momentum=momentum, dtype=torch.float64)
        layer.running_mean.copy_(torch.from_numpy(rm.astype(np.float64)))
        layer.running_var.copy_(torch.from_numpy(rv.astype(np.float64)))
        with torch.no_grad():
            layer(torch.from_numpy(x.astype(np.float64)))
        mean, rstd, new_rm, new_rv = ch05.reference_fused_stats(x, rm, rv, momentum, eps)
        np.testing.assert_allclose(new_rm, layer.running_mean.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(new_rv, layer.running_var.numpy(), rtol=1e-10)


FUSED_MISTAKES = {
    "unbiased one": CH05_ROSTER["biased-running-var"]["replace"]["fused_forward_stats"],
    "TensorFlow's convention": [("(1.0f - momentum) * running_mean[c] + momentum * p.mean",
                                 "momentum * running_mean[c] + (1.0f - momentum) * p.mean"),
                                ("(1.0f - momentum) * running_var[c] + momentum * p.m2",
                                 "momentum * running_var[c] + (1.0f - momentum) * p.m2")],
    "not updated": [("            running_mean[c] = ", "            // running_mean[c] = "),
                    ("            running_var[c] = ", "            // running_var[c] = ")],
    "cancellation of the one-pass": [("""            const float step = v - p.mean;
            p.mean += step / p.n;
            p.m2 += step * (v - p.mean);""", """            p.mean += v;
            p.m2 += v * v;"""), ("""    p = warp_merge(p);
    if (lane == 0) warps[warp] = p;""", """    if (p.n > 0.0f) { p.m2 -= p.mean * p.mean / p.n; p.mean /= p.n; }
    p = warp_merge(p);
    if (lane == 0) warps[warp] = p;""")],
    # a shuffle that only lane 0 reaches: undefined on a GPU, reported by the emulator
    "full mask in a warp": [
        ("        p = warp_merge(lane < blockDim.x / 32 ? warps[lane] : empty);\n        if (lane == 0) {",
         "        p = lane < blockDim.x / 32 ? warps[lane] : empty;\n        if (lane == 0) {\n"
         "            p = warp_merge(p);")],
}


SEEDED = [("reduction_moments", ch05.check_reduction_moments, message, pairs)
          for message, pairs in REDUCTION_MISTAKES.items()]
SEEDED += [("fused_forward_stats", ch05.check_fused_forward_stats, message, pairs)
           for message, pairs in FUSED_MISTAKES.items()]


@needs_cxx
@pytest.mark.parametrize("grade_id,check,message,pairs", SEEDED, ids=[f"{g}: {m}" for g, _, m, _ in SEEDED])
def test_each_seeded_mistake_in_the_cupy_code_is_named_on_the_emulator(grade_id, check, message, pairs):
    cp = emulator.CupyOnCpu()
    with pytest.raises(AssertionError, match=message):
        check(solution_function(grade_id, cp=cp, edit=edits(*pairs)), xp=cp)


def test_the_kernel_requirement_sees_calls_and_global_kernels_but_not_docstrings():
    class ReductionKernel:
        pass

    namespace = {"ReductionKernel": ReductionKernel}
    run_cell('K = ReductionKernel()\n'
             'def built_here():\n    return ReductionKernel()\n'
             'def built_before():\n    return K\n'
             'def only_named():\n    """Sums with a ReductionKernel."""\n    return 0  # ReductionKernel\n', namespace)
    for name in ("built_here", "built_before"):
        compare.require_construct(namespace[name], "ReductionKernel", name, "why")
    with pytest.raises(AssertionError, match="only_named does not use ReductionKernel: why"):
        compare.require_construct(namespace["only_named"], "ReductionKernel", "only_named", "why")


@needs_cxx
def test_a_one_pass_kernel_fails_the_large_offset_check_with_its_name():
    one_pass = edits(*CH05_ROSTER["one-pass-kernel"]["replace"]["channel_stats"])
    cp = emulator.CupyOnCpu()
    stats = solution_function("channel_stats", cp=cp, edit=one_pass)
    ch05.check_channel_stats(stats, xp=cp)      # fine near 0 ...
    with pytest.raises(AssertionError, match="cancellation of the one-pass"):
        ch05.check_channel_stats_large_offset(stats, xp=cp)   # ... wrong at |mean|/std = 1e3


@needs_cxx
def test_a_tree_without_a_barrier_per_level_is_caught():
    """A classic student bug: no __syncthreads() between the levels of the shared-memory tree."""
    racy = edits(("""            cnt[tid] = kab;
        }
        __syncthreads();""", """            cnt[tid] = kab;
        }"""))
    cp = emulator.CupyOnCpu()
    with pytest.raises(AssertionError, match="channel_stats"):
        ch05.check_channel_stats(solution_function("channel_stats", cp=cp, edit=racy), xp=cp)

def test_the_mirror_of_the_kernel_tree_passes_both_statistics_checks():
    ch05.check_channel_stats(stats_by_mirror, xp=np)
    ch05.check_channel_stats_large_offset(stats_by_mirror, xp=np)


def test_one_pass_variance_passes_small_means_and_is_named_at_a_large_offset():
    ch05.check_channel_stats(one_pass_stats, xp=np)
    with pytest.raises(AssertionError, match=r"E\[x\^2\] - E\[x\]\^2"):
        ch05.check_channel_stats_large_offset(one_pass_stats, xp=np)


@pytest.mark.parametrize("mistake", ch05.STATS_MISTAKES, ids=lambda m: m.message[:40])
def test_each_statistics_mistake_is_named(mistake):
    def student(x):
        try:
            mean, var = mistake.fn(x)
        except ValueError:  # the mistake makes no difference on this input
            mean, var = ch05.reference_channel_stats(x)
        return np.asarray(mean, np.float32), np.asarray(var, np.float32)

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        ch05.check_channel_stats(student, xp=np)


# --- the forward pass ---

def test_a_correct_forward_passes():
    ch05.check_batchnorm_forward_cupy(forward_from(stats_by_mirror), xp=np)


@pytest.mark.parametrize("mistake", ch05.FORWARD_MISTAKES, ids=lambda m: m.message[:40])
def test_each_forward_mistake_is_named(mistake):
    def student(x, gamma, beta, eps=1e-5):
        return mistake.fn(x, gamma, beta, eps).astype(np.float32)

    with pytest.raises(AssertionError, match=re.escape(mistake.message[:30])):
        ch05.check_batchnorm_forward_cupy(student, xp=np)


def test_using_the_reference_package_is_refused():
    namespace = {"bnref": bnref}
    exec("def batchnorm_forward_cupy(x, gamma, beta, eps=1e-5):\n"
         "    return bnref.spatial_batchnorm_forward(x, gamma, beta, eps)[0]", namespace)
    with pytest.raises(AssertionError, match="reference package"):
        ch05.check_batchnorm_forward_cupy(namespace["batchnorm_forward_cupy"], xp=np)


def test_the_fused_check_judges_the_student_not_its_own_wrapper_for_the_reference_package():
    """The check wraps the student's function in bngrade.verdicts.ch05, which imports bnref; only the student's counts."""
    namespace = {"np": np}
    exec("def fused_forward_stats(x, rm, rv, momentum=0.1, eps=1e-5):\n    return x, x", namespace)
    assert not compare.uses_reference(ch05._fused_on_device(namespace["fused_forward_stats"], np))
    namespace["bnref"] = bnref
    assert compare.uses_reference(ch05._fused_on_device(namespace["fused_forward_stats"], np))
