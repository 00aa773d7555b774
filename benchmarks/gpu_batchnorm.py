"""GPU benchmark: the chapter-5 CuPy kernels against PyTorch (cuDNN on and off), float32.

For every shape and pass (training forward, inference forward, backward) it
reports the median time over CUDA events with the L2 cache flushed before
each run, the GB/s by the convention 2 * numel * 4 bytes (forward) and
3 * numel * 4 (backward), that bandwidth as a % of the device-to-device copy
bandwidth measured in the same run, the time over the pass's floor (8, 12
and 20 bytes per value at the copy bandwidth; see bnref.cuda.roofline), and
torch's time over ours. Outputs are checked against torch (or bnref) first.

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
from pathlib import Path

import numpy as np

import bnref
from bnref.cuda import gpu_available, roofline
from bnref.cuda.gpu import batchnorm_backward_gpu, batchnorm_forward_gpu, batchnorm_inference_gpu

SHAPES = [(256, 4096), (8192, 4096), (32, 64, 56, 56), (256, 256, 14, 14), (64, 256, 56, 56), (256, 64, 112, 112)]
EPS, MOMENTUM = 1e-5, 0.1


def parse_shape(text):
    return tuple(int(v) for v in text.split(","))


def median_ms_cupy(cp, fn, flush, repeats, warmup=3):
    """Median of CUDA-event times of ``fn()`` on the current stream; ``flush`` is overwritten before each run."""
    for _ in range(warmup):
        fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        flush.fill(0)  # evicts x and y from L2, so every run reads from HBM
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def median_ms_torch(torch, fn, flush, repeats, warmup=3):
    """As :func:`median_ms_cupy`, with torch's events and stream."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbps(cp, flush, repeats, nbytes=1 << 30):
    """Device-to-device copy bandwidth, counting the read and the write: 2 * nbytes per copy."""
    src = cp.ones(nbytes // 4, cp.float32)
    dst = cp.empty_like(src)
    ms = median_ms_cupy(cp, lambda: cp.copyto(dst, src), flush, repeats)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def cuda_torch():
    """torch, when it is installed with CUDA on this machine; else None (its columns stay empty)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def torch_runners(torch, x, gamma, beta, dy):
    """{pass: callable} for torch.nn.functional.batch_norm on the same data (already on the GPU)."""
    F = torch.nn.functional
    rm, rv = torch.zeros_like(gamma), torch.ones_like(gamma)
    xg = x.detach().clone().requires_grad_()
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


def check(name, got, expected, tol=2e-3):
    err = float(np.max(np.abs(got - expected)) / max(1.0, float(np.max(np.abs(expected)))))
    if not err < tol:
        raise SystemExit(f"error: {name} differs from the reference by {err:.2e} (relative); not benchmarking it")
    return err


def bench_shape(cp, torch, shape, flush, repeats, copy_bw):
    rng = np.random.default_rng(0)
    C = shape[1]
    numel = int(np.prod(shape))
    x = cp.asarray(rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5)
    dy = cp.asarray(rng.standard_normal(shape, dtype=np.float32))
    gamma = cp.asarray(rng.uniform(0.5, 1.5, C).astype(np.float32))
    beta = cp.asarray(rng.normal(size=C).astype(np.float32))
    rm, rv = cp.zeros(C, cp.float32), cp.ones(C, cp.float32)
    _, cache = batchnorm_forward_gpu(x, gamma, beta)
    ours = {
        "forward_train": lambda: batchnorm_forward_gpu(x, gamma, beta, rm, rv, MOMENTUM, EPS),
        "forward_inference": lambda: batchnorm_inference_gpu(x, gamma, beta, rm, rv, EPS),
        "backward": lambda: batchnorm_backward_gpu(dy, cache),
    }
    theirs = {}
    errors = {}
    if torch is not None:
        tx, tdy, tg, tb = (torch.as_tensor(a, device="cuda") for a in (x, dy, gamma, beta))
        theirs = torch_runners(torch, tx, tg, tb, tdy)
        torch.backends.cudnn.enabled = True
        errors["forward_train"] = check("forward", cp.asnumpy(ours["forward_train"]()[0]),
                                        theirs["forward_train"]().cpu().numpy())
        errors["forward_inference"] = check("inference", cp.asnumpy(ours["forward_inference"]()),
                                            theirs["forward_inference"]().cpu().numpy())
        errors["backward"] = check("backward dx", cp.asnumpy(ours["backward"]()[0]),
                                   theirs["backward"]()[0].cpu().numpy())
    else:  # check a slice against the NumPy reference instead
        xs = cp.asnumpy(x[:8]).astype(np.float64)
        out, _ = batchnorm_forward_gpu(x[:8], gamma, beta)
        ref = (bnref.batchnorm_forward if len(shape) == 2 else bnref.spatial_batchnorm_forward)(
            xs, cp.asnumpy(gamma), cp.asnumpy(beta), EPS)[0]
        errors["forward_train"] = check("forward", cp.asnumpy(out), ref)
    rows = []
    for pass_name in roofline.PASSES:
        row = {"shape": list(shape), "numel": numel, "pass": pass_name}
        ms = median_ms_cupy(cp, ours[pass_name], flush, repeats)
        gbps = roofline.nominal_gbps(numel, pass_name, ms)
        floor = roofline.floor_ms(numel, pass_name, copy_bw)
        row.update(ours_ms=ms, ours_gbps=gbps, ours_pct_copy=100 * gbps / copy_bw, floor_ms=floor,
                   ours_over_floor=ms / floor, max_rel_error_vs_reference=errors.get(pass_name))
        if torch is not None:
            tflush = torch.as_tensor(flush, device="cuda")
            for label, cudnn in (("torch_cudnn", True), ("torch_native", False)):
                torch.backends.cudnn.enabled = cudnn
                tms = median_ms_torch(torch, theirs[pass_name], tflush, repeats)
                row.update({f"{label}_ms": tms, f"{label}_over_ours": tms / ms})
            torch.backends.cudnn.enabled = True
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row):
    def num(key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "-"

    return (f"{str(tuple(row['shape'])):22s} {row['pass']:18s} {num('ours_ms', '9.3f')} ms "
            f"{num('ours_gbps', '7.0f')} GB/s {num('ours_pct_copy', '5.1f')}% of copy  "
            f"x{num('ours_over_floor', '.2f')} floor  torch/ours: cuDNN {num('torch_cudnn_over_ours', '.2f')}, "
            f"native {num('torch_native_over_ours', '.2f')}")


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

    torch = cuda_torch()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    l2 = int(props.get("l2CacheSize", 50 << 20))
    flush = cp.empty(max(4 * l2, 64 << 20) // 4, cp.float32)
    copy_bw = copy_gbps(cp, flush, args.repeats)
    print(f"# {name}: {props['multiProcessorCount']} SMs, L2 {l2 >> 20} MiB, measured copy {copy_bw:.0f} GB/s; "
          f"torch: {'CUDA ' + torch.__version__ if torch else 'not available with CUDA (torch columns empty)'}")
    rows = []
    for shape in args.shapes:
        rows += bench_shape(cp, torch, shape, flush, args.repeats, copy_bw)
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
        "floor_bytes_per_value": roofline.FLOOR_BYTES,
        "gbps_bytes_per_value": roofline.NOMINAL_BYTES,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".json")
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
