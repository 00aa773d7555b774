"""benchmarks/gpu_batchnorm.py without a GPU: its checks, timer and rows on the CPU emulator.

No number here means anything (the emulator's clock is the host's); what is tested is that the code a GPU run
would execute runs: the race check, the timing with an event after each kernel, the bandwidth references, the
records of each kernel (launch, vector width, occupancy, share) and the printed row. torch's columns need
CUDA torch and stay empty here.
"""
import importlib.util
import time
from types import SimpleNamespace

import numpy as np
import pytest

from bnref.cuda import emulator, gpu, roofline

pytestmark = pytest.mark.skipif(emulator.compiler() is None, reason="no host C++ compiler: CUDA emulator not built")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_batchnorm", roofline.RESULTS_DIR.parents[1] / "gpu_batchnorm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Event:
    """A CUDA event on the host clock (the emulator's launches run at once)."""

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class CupyForTheBenchmark(emulator.CupyOnCpu):
    """The emulator, plus the few CuPy calls the benchmark makes beyond the wrappers': events, a spin kernel that
    does not spin (its PTX cannot run here), cupy.random, a device-to-device copy of MemoryPointers."""

    def __init__(self):
        super().__init__(pool=True)
        self.cuda.Event = Event
        self.cuda.get_elapsed_time = lambda a, b: (b.t - a.t) * 1e3
        self.cuda.get_current_stream().synchronize = lambda: None
        generator = np.random.default_rng(0)
        self.random = SimpleNamespace(standard_normal=lambda shape, dtype: self.asarray(
            generator.standard_normal(shape, dtype=dtype)))

    def RawKernel(self, code, name, options=()):  # noqa: N802 (CuPy's name)
        if name == "bench_spin":
            return lambda grid, block, args: None
        return super().RawKernel(code, name, options)


@pytest.fixture
def bench(monkeypatch):
    cp = CupyForTheBenchmark()
    monkeypatch.setattr(emulator.Kernel, "num_regs", 40, raising=False)   # what CuPy reads off the cubin
    monkeypatch.setattr(emulator.Kernel, "shared_size_bytes", 0, raising=False)
    with gpu.use_backend(cp):
        yield load_benchmark(), cp


@pytest.mark.parametrize("shape,layout", [((4, 8, 6, 6), "NCHW"), ((4, 8, 6, 6), "NHWC"), ((6, 10), "NCHW")])
def test_the_benchmark_checks_times_and_records_every_pass(bench, shape, layout):
    module, cp = bench
    timer = module.Timer(cp, l2_bytes=1 << 10)
    rows = module.bench_layout(cp, None, timer, shape, layout, repeats=2, copy_bw=100.0, l2_bytes=1 << 10,
                               race_runs=4)
    assert [r["pass"] for r in rows] == list(roofline.PASSES)
    for r in rows:
        assert r["ours_p10_ms"] <= r["ours_ms"] <= r["ours_p90_ms"] and r["ours_user_ms"] >= r["ours_ms"]
        kernels = r["ours_kernels"]
        assert len(kernels) == (1 if r["pass"] == "forward_inference" else 2), "an event after each of our kernels"
        assert all(k["blocks_per_sm"] == 2 and k["registers"] == 40 and k["grid"][0] >= 1 for k in kernels)
        row = shape[1] if layout == "NHWC" or len(shape) == 2 else int(np.prod(shape[2:]))   # C, or H * W
        assert {k["vec"] for k in kernels} == {4 if row % 4 == 0 else 1}
        assert "% of copy" in module.format_row(r)


def test_the_bandwidth_references_run(bench):
    module, cp = bench
    found = module.bandwidths(cp, module.Timer(cp, 1 << 10), repeats=2, nbytes=1 << 16)
    assert set(found) == {"memcpy_gbps", "copy4_gbps", "read_gbps"} and all(v > 0 for v in found.values())


def test_the_race_check_stops_the_benchmark_on_a_race(bench, monkeypatch):
    module, cp = bench
    monkeypatch.setattr(module.checks, "race_free", lambda *a, **k: "run 3 gave other mean")
    with pytest.raises(SystemExit, match="run 3 gave other mean; not benchmarking"):
        module.check_race_free(cp, (4, 8, 6, 6), cp.ones(8), cp.zeros(8), "NCHW", 4)


def test_device_state_without_nvidia_smi(bench, monkeypatch):
    module, _ = bench
    monkeypatch.setattr(module.shutil, "which", lambda name: None)
    assert module.device_state() == {"error": "nvidia-smi is not on PATH"}


def test_the_profile_mode_launches_a_forward_and_a_backward_per_layout(bench):
    """What ncu sees (-k regex:^bn_): the four kernels of a training forward and a backward, NCHW then NHWC."""
    module, cp = bench
    launched = []
    with gpu.observed(lambda launch: launched.append(launch.kernel)):
        module.profile_once(cp, [(4, 8, 6, 6)])
    kinds = [f"bn_{stem}_{kind}_vec4" for kind in ("ncs", "mc")
             for stem in ("forward_stats", "affine", "backward_reduce", "backward_dx")]
    assert launched == kinds
