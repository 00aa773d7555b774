"""GPU benchmark: the chapter-5 CuPy kernels against PyTorch (cuDNN on and off), float32.

For every shape, layout (NCHW; for 4-D shapes also NHWC, against torch's ``channels_last``) and pass
(training forward, inference forward, backward) it

* checks first, and stops at the first failure: the outputs against torch (or bnref); the forward's
  statistics over 100 runs, which must be bit-identical (the merge order is fixed, so a difference is a
  race: a cheap detector of a missing fence or barrier); the variance at |mean|/std = 1e3 against float64;
* times the median over CUDA events, with the L2 cache flushed before each run by a read-only pass over
  four times its size (a fill would leave dirty lines, written back during the timed run), and with the
  host's launch gaps kept out of the window: a spin kernel holds the stream while the function enqueues its
  launches, which then run back to back between the two events. The host time of one call is reported
  separately (``host_us``), and a row says whether the spin outlasted the enqueueing (``gaps_hidden``);
* records the CUDA kernels torch ran (torch.profiler): torch uses cuDNN only for inputs of 3 or more
  dimensions, so for 2-D shapes "cuDNN on" runs torch's native kernels too.

Columns (see bnref.cuda.roofline): GB/s by the convention 2 * numel * 4 bytes (forward) and 3 * numel * 4
(backward); effective GB/s counting the floor's bytes (12 and 20 per value for the two-pass kernels); that
bandwidth as a % of the device-to-device copy bandwidth measured in the same run; the time over the pass's
floor; ``l2_resident`` where the tensors read twice fit in L2 (the re-read may hit there, and the floor is
no floor); torch's time over ours.

    python benchmarks/gpu_batchnorm.py [--repeats 50] [--shapes 32,64,56,56 ...] [--out benchmarks/results/gpu]

Writes <out>/<gpu-name>.json with the device, the date and the versions.
Exits with status 2 and a message, and writes nothing, when there is no GPU.
"""
import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import bnref
from bnref.cuda import gpu_available, roofline
from bnref.cuda.gpu import batchnorm_backward_gpu, batchnorm_forward_gpu, batchnorm_inference_gpu

SHAPES = [(256, 4096), (8192, 4096), (32, 64, 56, 56), (256, 256, 14, 14), (64, 256, 56, 56), (256, 64, 112, 112)]
EPS, MOMENTUM = 1e-5, 0.1
RACE_RUNS = 100
SPIN = r"""
extern "C" __global__ void bench_spin(unsigned long long ns) {   // one thread waits ns nanoseconds
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""
METHOD = ("L2 flushed by a read-only pass; launch gaps hidden behind a spin kernel; host time per call reported "
          "separately")


def parse_shape(text):
    return tuple(int(v) for v in text.split(","))


class Timer:
    """GPU time of a function on the current stream, shared by CuPy and torch (both on the legacy default stream).

    Before each run: a read-only pass over ``4 * l2_bytes`` (at least 64 MiB) evicts the tensors from L2, then a
    spin kernel holds the stream for four times the host time of a call (at least 50 us), so that the
    function's launches are all queued when the start event fires and run without gaps until the end event.
    """

    def __init__(self, cp, l2_bytes):
        self.cp = cp
        self.flush_buffer = cp.ones(max(4 * l2_bytes, 64 << 20) // 4, cp.float32)
        self.spin = cp.RawKernel(SPIN, "bench_spin")
        self.start, self.end = cp.cuda.Event(), cp.cuda.Event()

    def flush(self):
        self.flush_buffer.sum()

    def host_us(self, fn, repeats=20):
        """Median host time of one call of ``fn``, the stream idle before each: what the launches cost the CPU."""
        stream = self.cp.cuda.get_current_stream()
        times = []
        for _ in range(repeats):
            stream.synchronize()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        stream.synchronize()
        return statistics.median(times) * 1e6

    def __call__(self, fn, repeats, warmup=3):
        """(median GPU ms between the events, host us per call, True if every run's launches beat the spin)."""
        for _ in range(warmup):
            fn()
        host_us = self.host_us(fn)
        spin_ns = int(max(50e3, 4e3 * host_us))
        times, hidden = [], True
        for _ in range(repeats):
            self.flush()
            self.spin((1,), (1,), (np.uint64(spin_ns),))
            self.start.record()
            t0 = time.perf_counter()
            fn()
            hidden &= (time.perf_counter() - t0) * 1e9 < spin_ns
            self.end.record()
            self.end.synchronize()
            times.append(self.cp.cuda.get_elapsed_time(self.start, self.end))
        return statistics.median(times), host_us, hidden


def copy_gbps(cp, timer, repeats, nbytes=1 << 30):
    """Device-to-device copy bandwidth, counting the read and the write: 2 * nbytes per copy."""
    src = cp.ones(nbytes // 4, cp.float32)
    dst = cp.empty_like(src)
    ms, _, _ = timer(lambda: cp.copyto(dst, src), repeats)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def cuda_torch(cp):
    """torch, when it is installed with CUDA here and launches on CuPy's stream; else None (its columns empty)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or torch.cuda.current_stream().cuda_stream != cp.cuda.get_current_stream().ptr:
        return None
    return torch


def torch_runners(torch, x, gamma, beta, dy):
    """{pass: callable} for torch.nn.functional.batch_norm on the same data (already on the GPU, in x's layout)."""
    F = torch.nn.functional
    rm, rv = torch.zeros_like(gamma), torch.ones_like(gamma)
    xg = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    gg, bg = gamma.detach().clone().requires_grad_(), beta.detach().clone().requires_grad_()
    graph = {}

    def train():
        with torch.no_grad():
            return F.batch_norm(x, rm, rv, gamma, beta, training=True, momentum=MOMENTUM, eps=EPS)

    def infer():
        with torch.no_grad():
            return F.batch_norm(x, rm, rv, gamma, beta, training=False, eps=EPS)

    def backward():
        # One forward per cuDNN setting (it picks the backward kernel); only the backward is timed.
        key = torch.backends.cudnn.enabled
        if key not in graph:
            graph[key] = F.batch_norm(xg, None, None, gg, bg, training=True, eps=EPS)
        return torch.autograd.grad(graph[key], (xg, gg, bg), dy, retain_graph=True)

    return {"forward_train": train, "forward_inference": infer, "backward": backward}


def torch_kernels(torch, fn):
    """The names of the CUDA kernels one call of ``fn`` runs, by torch.profiler (None if the profiler fails)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
    except Exception:  # the kernel names are a label; never let them stop the benchmark
        return None


def check(name, got, expected, tol=2e-3):
    err = float(np.max(np.abs(got - expected)) / max(1.0, float(np.max(np.abs(expected)))))
    if not err < tol:
        raise SystemExit(f"error: {name} differs from the reference by {err:.2e} (relative); not benchmarking it")
    return err


def check_race_free(cp, x, gamma, beta, layout, runs=RACE_RUNS):
    """The forward's statistics, ``runs`` times: the merge order is fixed, so they must be bit-identical."""
    _, first = batchnorm_forward_gpu(x, gamma, beta, layout=layout)
    for run in range(1, runs):
        _, cache = batchnorm_forward_gpu(x, gamma, beta, layout=layout)
        if not (cp.array_equal(cache.mean, first.mean) and cp.array_equal(cache.rstd, first.rstd)):
            raise SystemExit(f"error: run {run} of the forward on {x.shape} ({layout}) gave other statistics than "
                             f"run 0: a race in the kernels; not benchmarking")


def check_large_offset(cp, shape, layout):
    """The variance at |mean|/std = 1e3 against float64: power sums would be off by percents, Welford is not."""
    x = cp.random.standard_normal(shape, dtype=cp.float32) + cp.float32(1e3)
    C = shape[-1] if layout == "NHWC" else shape[1]
    _, cache = batchnorm_forward_gpu(x, cp.ones(C, cp.float32), cp.zeros(C, cp.float32), layout=layout)
    axes = tuple(a for a in range(len(shape)) if a != (len(shape) - 1 if layout == "NHWC" else 1))
    ref = x.astype(cp.float64).var(axis=axes)
    var = 1 / cache.rstd.astype(cp.float64) ** 2 - EPS
    err = float(cp.max(cp.abs(var - ref) / ref))
    if not err < 1e-4:
        raise SystemExit(f"error: at |mean|/std = 1e3 the variance of {shape} ({layout}) is off by {err:.1e}")
    return err


def layouts_of(shape):
    return ("NCHW", "NHWC") if len(shape) == 4 else ("NCHW",)


def bench_layout(cp, torch, timer, shape, layout, repeats, copy_bw, l2_bytes):
    """The rows of one shape in one layout: ``shape`` is the logical (N, C, ...) shape, NHWC its memory order."""
    rng = np.random.default_rng(0)
    C = shape[1]
    numel = int(np.prod(shape))
    x = cp.asarray(rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5)
    dy = cp.asarray(rng.standard_normal(shape, dtype=np.float32))
    gamma = cp.asarray(rng.uniform(0.5, 1.5, C).astype(np.float32))
    beta = cp.asarray(rng.normal(size=C).astype(np.float32))
    to_ours = (lambda a: cp.ascontiguousarray(cp.moveaxis(a, 1, -1))) if layout == "NHWC" else (lambda a: a)
    from_ours = (lambda a: np.moveaxis(a, -1, 1)) if layout == "NHWC" else (lambda a: a)
    xl, dyl = to_ours(x), to_ours(dy)
    rm, rv = cp.zeros(C, cp.float32), cp.ones(C, cp.float32)
    check_race_free(cp, xl, gamma, beta, layout)
    offset_err = check_large_offset(cp, tuple(xl.shape), layout)
    _, cache = batchnorm_forward_gpu(xl, gamma, beta, layout=layout)
    ours = {
        "forward_train": lambda: batchnorm_forward_gpu(xl, gamma, beta, rm, rv, MOMENTUM, EPS, layout=layout),
        "forward_inference": lambda: batchnorm_inference_gpu(xl, gamma, beta, rm, rv, EPS, layout=layout),
        "backward": lambda: batchnorm_backward_gpu(dyl, cache),
    }
    theirs, errors = {}, {}
    if torch is not None:
        memory = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        tx, tdy = (torch.as_tensor(a, device="cuda").contiguous(memory_format=memory) for a in (x, dy))
        tg, tb = (torch.as_tensor(a, device="cuda") for a in (gamma, beta))
        theirs = torch_runners(torch, tx, tg, tb, tdy)
        torch.backends.cudnn.enabled = True
        errors["forward_train"] = check("forward", from_ours(cp.asnumpy(ours["forward_train"]()[0])),
                                        theirs["forward_train"]().cpu().numpy())
        errors["forward_inference"] = check("inference", from_ours(cp.asnumpy(ours["forward_inference"]())),
                                            theirs["forward_inference"]().cpu().numpy())
        errors["backward"] = check("backward dx", from_ours(cp.asnumpy(ours["backward"]()[0])),
                                   theirs["backward"]()[0].cpu().numpy())
    else:  # check a slice against the NumPy reference instead
        xs = cp.asnumpy(x[:8]).astype(np.float64)
        out, _ = batchnorm_forward_gpu(to_ours(x[:8]), gamma, beta, layout=layout)
        ref = (bnref.batchnorm_forward if len(shape) == 2 else bnref.spatial_batchnorm_forward)(
            xs, cp.asnumpy(gamma), cp.asnumpy(beta), EPS)[0]
        errors["forward_train"] = check("forward", from_ours(cp.asnumpy(out)), ref)
    rows = []
    for pass_name in roofline.PASSES:
        row = {"shape": list(shape), "layout": layout, "numel": numel, "pass": pass_name}
        ms, host_us, hidden = timer(ours[pass_name], repeats)
        gbps = roofline.nominal_gbps(numel, pass_name, ms)
        floor = roofline.floor_ms(numel, pass_name, copy_bw)
        row.update(ours_ms=ms, ours_host_us=host_us, gaps_hidden=hidden, ours_gbps=gbps,
                   ours_eff_gbps=roofline.effective_gbps(numel, pass_name, ms), ours_pct_copy=100 * gbps / copy_bw,
                   floor_ms=floor, ours_over_floor=ms / floor,
                   l2_resident=roofline.l2_resident(numel, pass_name, l2_bytes),
                   max_rel_error_vs_reference=errors.get(pass_name), var_rel_error_at_offset_1e3=offset_err)
        if torch is not None:
            for label, cudnn in (("torch_cudnn", True), ("torch_native", False)):
                torch.backends.cudnn.enabled = cudnn
                tms, thost, thidden = timer(theirs[pass_name], repeats)
                row.update({f"{label}_ms": tms, f"{label}_over_ours": tms / ms, f"{label}_host_us": thost,
                            f"{label}_gaps_hidden": thidden,
                            f"{label}_kernels": torch_kernels(torch, theirs[pass_name])})
            torch.backends.cudnn.enabled = True
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row):
    def num(key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "-"

    flags = "" if row["gaps_hidden"] else " [launch gaps not hidden]"
    flags += " [L2-resident: the floor is no floor]" if row["l2_resident"] else ""
    return (f"{str(tuple(row['shape'])):22s} {row['layout']:4s} {row['pass']:18s} {num('ours_ms', '9.3f')} ms "
            f"(host {num('ours_host_us', '.0f')} us) {num('ours_gbps', '7.0f')} GB/s, effective "
            f"{num('ours_eff_gbps', '.0f')}, {num('ours_pct_copy', '5.1f')}% of copy  x{num('ours_over_floor', '.2f')} "
            f"floor  torch/ours: cuDNN {num('torch_cudnn_over_ours', '.2f')}, native "
            f"{num('torch_native_over_ours', '.2f')}{flags}")


def versions(cp, torch):
    v = {"python": platform.python_version(), "numpy": np.__version__, "cupy": cp.__version__,
         "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "cuda_driver": cp.cuda.runtime.driverGetVersion()}
    if torch is not None:
        v.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return v


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=SHAPES)
    parser.add_argument("--out", type=Path, default=roofline.RESULTS_DIR)
    args = parser.parse_args(argv)
    if not gpu_available():
        print("gpu_batchnorm.py: no CUDA GPU here (cupy.is_available() is False); nothing was measured and no "
              "results file was written. Run it on a machine with an NVIDIA GPU (e.g. Colab: Runtime -> Change "
              "runtime type -> GPU; pip install cupy-cuda12x).", file=sys.stderr)
        return 2
    import cupy as cp

    torch = cuda_torch(cp)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    l2 = int(props.get("l2CacheSize", 50 << 20))
    timer = Timer(cp, l2)
    copy_bw = copy_gbps(cp, timer, args.repeats)
    print(f"# {name}: {props['multiProcessorCount']} SMs, L2 {l2 >> 20} MiB, measured copy {copy_bw:.0f} GB/s; "
          f"torch: {'CUDA ' + torch.__version__ if torch else 'not available with CUDA (torch columns empty)'}")
    rows = []
    for shape in args.shapes:
        for layout in layouts_of(shape):
            rows += bench_layout(cp, torch, timer, shape, layout, args.repeats, copy_bw, l2)
            cp.get_default_memory_pool().free_all_blocks()
            if torch is not None:
                torch.cuda.empty_cache()
    result = {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(cp, torch),
        "sm_count": int(props["multiProcessorCount"]),
        "l2_bytes": l2,
        "copy_gbps": copy_bw,
        "repeats": args.repeats,
        "method": METHOD,
        "race_check_runs": RACE_RUNS,
        "floor_bytes_per_value": roofline.FLOOR_BYTES,
        "gbps_bytes_per_value": roofline.NOMINAL_BYTES,
        "reread_bytes_per_value": roofline.REREAD_BYTES,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".json")
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
