"""Chapter 5's hidden checks on the exercise's own CuPy code: the solved source on a GPU or on the CPU emulator
(blocks and threads in forward, reverse or shuffled order), and the seeded mistakes of its kernels, each named.

In-process, ``import cupy`` (the probes') and the notebook's ``cp`` are :func:`emulated_gpu.cupy_module`, or the
real CuPy on a machine with a GPU. The NumPy stand-ins of the named mistakes and the correct alternatives are in
``tests/test_verdicts_ch05.py``.
"""
import contextlib
import io

import jupytext
import numpy as np
import pytest

from bngrade.judge.check import check
from bngrade.pipeline import device
from bngrade.pipeline.course import SOURCES
from bngrade.verdicts import ch05
from bncapture import ch05 as probes
from class_roster import REDUCTION_VAR, ROSTER
from emulated_gpu import emulated_cupy, needs_cxx, notebook
from submissions import solution_cells

ASSIGNMENT = "ch05_cupy_kernels"
SOLVED = solution_cells(ASSIGNMENT)
KEYS = ["chan_merge", "reduction_moments", "channel_stats", "channel_stats_large_offset", "batchnorm_forward_cupy",
        "fused_forward_stats"]
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not device.gpu_available(),
                                              reason="no CUDA GPU here: cupy.is_available() is False")]


@contextlib.contextmanager
def cupy_on(where):
    """The real CuPy (``where == "cupy"``) or the emulated one with its blocks and threads in order ``where``."""
    if where == "cupy":
        import cupy
        yield cupy
    else:
        with emulated_cupy(where) as module:
            yield module


@pytest.mark.parametrize("where", [*(pytest.param(order, marks=needs_cxx) for order in ("reverse", "shuffled")),
                                   pytest.param("cupy", marks=ON_GPU)])
def test_the_whole_solution_passes_every_hidden_check(where):
    """The exercise's CuPy code itself (RawKernels, ReductionKernels, ElementwiseKernel)."""
    with cupy_on(where) as cp:
        namespace = notebook(SOLVED, cp)
        for key in KEYS:
            check(f"ch05.{key}", namespace)


@needs_cxx
def test_the_solved_source_passes_its_visible_and_hidden_tests():
    """Every code cell of the solved source as the instructor runs it, hidden blocks included, on the emulator.

    Before each cell, the device arrays that earlier visible tests left in the globals are dropped: the emulator's
    arrays are of a bnref type (``bnref.cuda.emulator.Array``), which ``check`` takes for the reference package's
    code; CuPy's own arrays are not, and no visible test reads an earlier cell's arrays.
    """
    failures = {}
    with emulated_cupy() as cp:
        namespace = {}
        for cell in jupytext.read(SOURCES / f"{ASSIGNMENT}.md").cells:
            if cell.cell_type != "code":
                continue
            for name in [k for k, v in namespace.items() if isinstance(v, cp.ndarray)]:
                del namespace[name]
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(cell.source, namespace)
            except Exception as err:
                failures[cell.metadata.get("nbgrader", {}).get("grade_id")] = f"{type(err).__name__}: {err}"
    assert failures == {}


def test_the_fused_reference_follows_torch_batchnorm2d():
    import torch

    for case in probes.fused_cases():
        x, rm, rv, momentum, eps = case.args
        layer = torch.nn.BatchNorm2d(x.shape[1], eps=eps, momentum=momentum, dtype=torch.float64)
        layer.running_mean.copy_(torch.from_numpy(rm.astype(np.float64)))
        layer.running_var.copy_(torch.from_numpy(rv.astype(np.float64)))
        with torch.no_grad():
            layer(torch.from_numpy(x.astype(np.float64)))
        _, new_rm, new_rv = ch05.reference_fused_stats(x, rm, rv, momentum, eps)
        np.testing.assert_allclose(new_rm, layer.running_mean.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(new_rv, layer.running_var.numpy(), rtol=1e-10)


# --- the seeded mistakes of the exercise's kernels: {grade_id: {what the message says: [(old, new), ...]}} ---

CH05_ROSTER = ROSTER[ASSIGNMENT]
SEEDED = {
    "reduction_moments": {
        "cancellation of the one-pass": CH05_ROSTER["one-pass-reduction"]["replace"]["reduction_moments"],
        "divides by the count minus 1": [(REDUCTION_VAR, REDUCTION_VAR.replace("/ count", "/ (count - 1)"))],
    },
    "fused_forward_stats": {
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
    },
    "batchnorm_forward_cupy": {
        "the channel of element i is computed wrongly": CH05_ROSTER["channel-last-index"]["replace"][
            "batchnorm_forward_cupy"],
    },
}
SEEDED_CASES = [(grade_id, says, pairs) for grade_id, named in SEEDED.items() for says, pairs in named.items()]


@needs_cxx
@pytest.mark.parametrize("grade_id,says,pairs", SEEDED_CASES, ids=[f"{g}: {s}" for g, s, _ in SEEDED_CASES])
def test_each_seeded_mistake_in_the_cupy_code_is_named_on_the_emulator(grade_id, says, pairs):
    with emulated_cupy() as cp, pytest.raises(AssertionError, match=says):
        check(f"ch05.{grade_id}", notebook(SOLVED, cp, {grade_id: pairs}))


@needs_cxx
def test_a_one_pass_kernel_fails_the_large_offset_check_with_its_name():
    with emulated_cupy() as cp:
        namespace = notebook(SOLVED, cp, CH05_ROSTER["one-pass-kernel"]["replace"])
        check("ch05.channel_stats", namespace)   # fine near 0 ...
        with pytest.raises(AssertionError, match="cancellation of the one-pass"):
            check("ch05.channel_stats_large_offset", namespace)   # ... wrong at |mean|/std = 1e3


@needs_cxx
def test_a_tree_without_a_barrier_per_level_is_caught():
    """A classic student bug: no __syncthreads() between the levels of the shared-memory tree."""
    racy = [("""            cnt[tid] = kab;
        }
        __syncthreads();""", """            cnt[tid] = kab;
        }""")]
    with emulated_cupy() as cp, pytest.raises(AssertionError, match="channel_stats"):
        check("ch05.channel_stats", notebook(SOLVED, cp, {"channel_stats": racy}))
