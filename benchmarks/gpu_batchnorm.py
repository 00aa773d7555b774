"""GPU benchmark: the chapter-5 CuPy kernels against PyTorch (cuDNN on and off), float32.

For every shape, layout (NCHW; for 4-D shapes also NHWC, against torch's ``channels_last``) and pass
(training forward, inference forward, backward) it

* checks first, and stops at the first failure: the outputs against torch (or bnref), the backward's dx,
  dgamma and dbeta all three; the race check of bnref.cuda.checks (forward and backward ``--race-runs``
  times, two different inputs in turn, every array the wrappers allocate filled with NaN first, each run
  bit-identical to the first of its input); the variance at |mean|/std = 1e3 against float64;
* times the median and the 10th and 90th percentiles over CUDA events, with the L2 cache flushed before each
  run by a read-only pass over four times its size (a fill would leave dirty lines, written back during the
  timed run), and with the host's launch gaps kept out of the window: a spin kernel holds the stream while
  the function enqueues its launches, which then run back to back between the two events. An event after
  each of our kernels splits the pass into the kernels' shares. The host time of one call is reported
  separately (``host_us``), and a row says whether the spin outlasted the enqueueing (``gaps_hidden``);
  a user calling from Python sees about max(GPU time, host time) per call (``*_user_ms``), so the rows
  give a ratio to torch on that too;
* records each of our kernels' launch: grid, block, vector width, the driver's resident blocks per SM, the
  registers and static shared memory of the compiled kernel, and its share of the pass; and the CUDA kernels
  torch ran (torch.profiler): torch uses cuDNN only for inputs of 3 or more dimensions, so for 2-D shapes
  "cuDNN on" runs torch's native kernels too.

Bandwidth references, measured in the same run: cudaMemcpyAsync, a float4 copy kernel (both counting the
read and the write) and a float4 read-only kernel; the floors divide by the better copy. nvidia-smi's clocks,
power limit and ECC state are recorded before and after. Columns (see bnref.cuda.roofline): GB/s by the
convention 2 * numel * 4 bytes (forward) and 3 * numel * 4 (backward); effective GB/s counting the floor's
bytes (12 and 20 per value for the two-pass kernels); that bandwidth as a % of the copy bandwidth; the time
over the pass's floor; ``l2_resident`` where the tensors read twice fit in L2 (the re-read may hit there, and
the floor is no floor), with ``reread_over_l2`` beside it: (256, 256, 14, 14)'s forward re-reads 0.98 of an
H100's 50 MiB L2, which is split in two partitions, so it is expected to behave like HBM there; torch's time
over ours.

    python benchmarks/gpu_batchnorm.py [--repeats 50] [--race-runs 100] [--shapes 32,64,56,56 ...]
                                       [--out benchmarks/results/gpu]
    python benchmarks/gpu_batchnorm.py --profile [--shapes ...]   # one forward and one backward each, for ncu

Writes <out>/<gpu-name>.json with the device, the date and the versions.
Exits with status 2 and a message, and writes nothing, when there is no GPU.
"""
import argparse
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import bnref
from bnref.cuda import KERNELS, checks, gpu, gpu_available, roofline
from bnref.cuda.gpu import batchnorm_backward_gpu, batchnorm_forward_gpu, batchnorm_inference_gpu

SHAPES = [(256, 4096), (8192, 4096), (32, 64, 56, 56), (256, 256, 14, 14), (256, 512, 7, 7), (64, 256, 56, 56),
          (256, 64, 112, 112)]
EPS, MOMENTUM = 1e-5, 0.1
SPIN = r"""
extern "C" __global__ void bench_spin(unsigned long long ns) {   // one thread waits ns nanoseconds
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""
# Bandwidth references: n float4s read (summed, and the sum kept only if it is -1, which it never is for the
# ones read, so that no load is dropped), or copied; a grid-stride loop on a whole wave of blocks.
REFERENCES = r"""
extern "C" __global__ void __launch_bounds__(256) bench_read4(const float4* __restrict__ x, long long n,
                                                               float* __restrict__ sink) {
    float acc = 0.0f;
#pragma unroll 4
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        const float4 v = __ldg(x + i);
        acc += (v.x + v.y) + (v.z + v.w);
    }
    if (acc == -1.0f) sink[0] = acc;
}
extern "C" __global__ void __launch_bounds__(256) bench_copy4(const float4* __restrict__ x, float4* __restrict__ y,
                                                               long long n) {
#pragma unroll 4
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = __ldg(x + i);
    }
}
"""
METHOD = ("L2 flushed by a read-only pass; launch gaps hidden behind a spin kernel; host time per call reported "
          "separately; median, p10 and p90 of the runs; an event after each of our kernels")
SMI_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "power.draw", "power.limit", "enforced.power.limit", "ecc.mode.current", "temperature.gpu",
              "clocks_throttle_reasons.active")


def parse_shape(text):
    return tuple(int(v) for v in text.split(","))


def device_state():
    """nvidia-smi's view of GPU 0 ({field: text} of SMI_FIELDS), or {"error": why}."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi is not on PATH"}
    proc = subprocess.run(["nvidia-smi", "--id=0", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                          capture_output=True, text=True)
    values = [v.strip() for v in proc.stdout.strip().split(",")]
    if proc.returncode != 0 or len(values) != len(SMI_FIELDS):
        return {"error": (proc.stdout + proc.stderr).strip()}
    return dict(zip(SMI_FIELDS, values))


class Timing(NamedTuple):
    ms: float          # median GPU time between the events
    p10: float
    p90: float
    host_us: float     # median host time of one call, the stream idle before it
    hidden: bool       # every run's launches were queued before the spin kernel ended
    kernels: list      # our kernels, in launch order: [(gpu.Launched, median ms)]


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
        return float(np.median(times)) * 1e6

    def __call__(self, fn, repeats, warmup=3):
        """The :class:`Timing` of ``fn`` over ``repeats`` runs."""
        for _ in range(warmup):
            fn()
        host_us = self.host_us(fn)
        spin_ns = int(max(50e3, 4e3 * host_us))
        times, shares, hidden, launches = [], [], True, []

        def mark(launch):
            event = self.cp.cuda.Event()
            event.record()
            launches.append((launch, event))

        for _ in range(repeats):
            self.flush()
            self.spin((1,), (1,), (np.uint64(spin_ns),))
            launches.clear()
            self.start.record()
            t0 = time.perf_counter()
            with gpu.observed(mark):
                fn()
            hidden &= (time.perf_counter() - t0) * 1e9 < spin_ns
            self.end.record()
            self.end.synchronize()
            times.append(self.cp.cuda.get_elapsed_time(self.start, self.end))
            edges = [self.start] + [event for _, event in launches]
            shares.append([self.cp.cuda.get_elapsed_time(a, b) for a, b in zip(edges, edges[1:])])
        p10, ms, p90 = (float(v) for v in np.percentile(times, [10, 50, 90]))
        per_kernel = np.median(shares, axis=0) if shares[0] else []
        kernels = [(launch, float(t)) for (launch, _), t in zip(launches, per_kernel)]
        return Timing(ms, p10, p90, host_us, hidden, kernels)


def bandwidths(cp, timer, repeats, nbytes=1 << 30):
    """GB/s (1e9 B/s) of cudaMemcpyAsync and of the float4 copy kernel (counting the read and the write), and of
    the float4 read-only kernel, over ``nbytes``."""
    src, dst, sink = cp.ones(nbytes // 4, cp.float32), cp.empty(nbytes // 4, cp.float32), cp.empty(1, cp.float32)
    module = cp.RawModule(code=REFERENCES)
    read, copy = module.get_function("bench_read4"), module.get_function("bench_copy4")
    per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(copy.kernel.ptr, 256, 0)
    grid = (cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"] * max(1, per_sm),)
    n = np.int64(nbytes // 16)
    runs = {"memcpy_gbps": (lambda: dst.data.copy_from_device_async(src.data, nbytes), 2),
            "copy4_gbps": (lambda: copy(grid, (256,), (src, dst, n)), 2),
            "read_gbps": (lambda: read(grid, (256,), (src, n, sink)), 1)}
    return {key: moved * nbytes / (timer(fn, repeats).ms * 1e-3) / 1e9 for key, (fn, moved) in runs.items()}


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


def check_race_free(cp, shape, gamma, beta, layout, runs):
    """bnref.cuda.checks.race_free on two different inputs of (memory) ``shape``; stops the benchmark on a race."""
    problem = checks.race_free(cp, checks.alternating_inputs(cp, shape, layout), gamma, beta, layout, runs)
    if problem:
        raise SystemExit(f"error: {problem}; not benchmarking")


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


def kernel_record(cp, launch, ms, pass_ms):
    """One of our kernels in a row: its launch, the driver's occupancy, its compiled resources, its time."""
    file = next(f for f, names in KERNELS.items() if launch.kernel in names)
    compiled = gpu._kernel(cp, file, launch.kernel)
    return {"kernel": launch.kernel, "vec": 4 if launch.kernel.endswith("_vec4") else 1, "grid": list(launch.grid),
            "block": list(launch.block), "blocks_per_sm": launch.slots // gpu._sm_count(cp),
            "registers": int(compiled.num_regs), "smem": int(compiled.shared_size_bytes), "ms": ms,
            "share": ms / pass_ms}


def timing_columns(label, timing):
    return {f"{label}_ms": timing.ms, f"{label}_p10_ms": timing.p10, f"{label}_p90_ms": timing.p90,
            f"{label}_host_us": timing.host_us, f"{label}_user_ms": max(timing.ms, timing.host_us * 1e-3),
            f"{label}_gaps_hidden": timing.hidden}


def bench_layout(cp, torch, timer, shape, layout, repeats, copy_bw, l2_bytes, race_runs):
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
    check_race_free(cp, tuple(xl.shape), gamma, beta, layout, race_runs)
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
        grads = zip(("dx", "dgamma", "dbeta"), ours["backward"](), theirs["backward"]())
        errors["backward"] = max(check(f"backward {name}", from_ours(cp.asnumpy(g)) if name == "dx" else cp.asnumpy(g),
                                       t.cpu().numpy()) for name, g, t in grads)
    else:  # check a slice against the NumPy reference instead
        xs = cp.asnumpy(x[:8]).astype(np.float64)
        out, _ = batchnorm_forward_gpu(to_ours(x[:8]), gamma, beta, layout=layout)
        ref = (bnref.batchnorm_forward if len(shape) == 2 else bnref.spatial_batchnorm_forward)(
            xs, cp.asnumpy(gamma), cp.asnumpy(beta), EPS)[0]
        errors["forward_train"] = check("forward", from_ours(cp.asnumpy(out)), ref)
    rows = []
    for pass_name in roofline.PASSES:
        row = {"shape": list(shape), "layout": layout, "numel": numel, "pass": pass_name}
        timing = timer(ours[pass_name], repeats)
        ms = timing.ms
        gbps = roofline.nominal_gbps(numel, pass_name, ms)
        floor = roofline.floor_ms(numel, pass_name, copy_bw)
        row.update(timing_columns("ours", timing), gaps_hidden=timing.hidden, ours_gbps=gbps,
                   ours_eff_gbps=roofline.effective_gbps(numel, pass_name, ms), ours_pct_copy=100 * gbps / copy_bw,
                   floor_ms=floor, ours_over_floor=ms / floor,
                   l2_resident=roofline.l2_resident(numel, pass_name, l2_bytes),
                   reread_over_l2=roofline.REREAD_BYTES[pass_name] * numel / l2_bytes,
                   ours_kernels=[kernel_record(cp, launch, k_ms, ms) for launch, k_ms in timing.kernels],
                   max_rel_error_vs_reference=errors.get(pass_name), var_rel_error_at_offset_1e3=offset_err)
        if torch is not None:
            for label, cudnn in (("torch_cudnn", True), ("torch_native", False)):
                torch.backends.cudnn.enabled = cudnn
                columns = timing_columns(label, timer(theirs[pass_name], repeats))
                row.update(columns, **{f"{label}_over_ours": columns[f"{label}_ms"] / ms,
                                       f"{label}_user_over_ours": columns[f"{label}_user_ms"] / row["ours_user_ms"],
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
    shares = " + ".join(f"{k['kernel'].replace('bn_', '')} {100 * k['share']:.0f}%" for k in row["ours_kernels"])
    return (f"{str(tuple(row['shape'])):22s} {row['layout']:4s} {row['pass']:18s} {num('ours_ms', '9.3f')} ms "
            f"[{num('ours_p10_ms', '.3f')}-{num('ours_p90_ms', '.3f')}] (host {num('ours_host_us', '.0f')} us) "
            f"{num('ours_gbps', '7.0f')} GB/s, effective {num('ours_eff_gbps', '.0f')}, "
            f"{num('ours_pct_copy', '5.1f')}% of copy  x{num('ours_over_floor', '.2f')} floor  torch/ours: cuDNN "
            f"{num('torch_cudnn_over_ours', '.2f')} (with host {num('torch_cudnn_user_over_ours', '.2f')}), native "
            f"{num('torch_native_over_ours', '.2f')}  {shares}{flags}")


def profile_once(cp, shapes):
    """One training forward and one backward per shape and layout, nothing else (for ncu: -k regex:^bn_)."""
    for shape in shapes:
        for layout in layouts_of(shape):
            x, dy = checks.alternating_inputs(cp, checks.memory_shape(shape, layout), layout, count=1)[0]
            C = shape[1]
            _, cache = batchnorm_forward_gpu(x, cp.ones(C, cp.float32), cp.zeros(C, cp.float32), layout=layout)
            batchnorm_backward_gpu(dy, cache)
            cp.cuda.get_current_stream().synchronize()
            print(f"profiled {shape} {layout}", flush=True)


def versions(cp, torch):
    v = {"python": platform.python_version(), "numpy": np.__version__, "cupy": cp.__version__,
         "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "cuda_driver": cp.cuda.runtime.driverGetVersion()}
    if torch is not None:
        v.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return v


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--race-runs", type=int, default=checks.RACE_RUNS)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=SHAPES)
    parser.add_argument("--out", type=Path, default=roofline.RESULTS_DIR)
    parser.add_argument("--profile", action="store_true", help="run one forward and one backward per shape, only")
    args = parser.parse_args(argv)
    if not gpu_available():
        print("gpu_batchnorm.py: no CUDA GPU here (cupy.is_available() is False); nothing was measured and no "
              "results file was written. Run it on a machine with an NVIDIA GPU (e.g. Colab: Runtime -> Change "
              "runtime type -> GPU; pip install cupy-cuda12x).", file=sys.stderr)
        return 2
    import cupy as cp

    if args.profile:
        profile_once(cp, args.shapes)
        return 0
    state_before = device_state()
    torch = cuda_torch(cp)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    l2 = int(props.get("l2CacheSize", 50 << 20))
    timer = Timer(cp, l2)
    references = bandwidths(cp, timer, args.repeats)
    copy_bw = max(references["memcpy_gbps"], references["copy4_gbps"])
    print(f"# {name}: {props['multiProcessorCount']} SMs, L2 {l2 >> 20} MiB; GB/s: memcpy "
          f"{references['memcpy_gbps']:.0f}, float4 copy {references['copy4_gbps']:.0f}, float4 read "
          f"{references['read_gbps']:.0f}; floors at {copy_bw:.0f}; torch: "
          f"{'CUDA ' + torch.__version__ if torch else 'not available with CUDA (torch columns empty)'}; "
          f"nvidia-smi: {state_before}", flush=True)
    rows = []
    for shape in args.shapes:
        for layout in layouts_of(shape):
            rows += bench_layout(cp, torch, timer, shape, layout, args.repeats, copy_bw, l2, args.race_runs)
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
        **references,
        "device_state_before": state_before,
        "device_state_after": device_state(),
        "repeats": args.repeats,
        "method": METHOD,
        "race_check_runs": args.race_runs,
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
