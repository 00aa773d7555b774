"""A race check of the chapter-5 kernels that can see races, for the benchmark, the GPU tests and the GPU run.

The grid-level merge has a fixed order, so the same input must give the same bits on every run; a difference
is a race (a missing fence, a counter shared by overlapping launches, a block that reads a slot before it is
written). Rerunning one input is not enough to see one, because CuPy's memory pool hands back the blocks the
last run freed: a partial slot that a block read before another block wrote it still holds last run's
bits, identical ones, and an output that no block wrote still holds last run's correct values. So
:func:`race_free`

* alternates between several inputs, and compares each run with the first run of the same input;
* runs every call under :func:`bnref.cuda.gpu.poisoned`: every output and workspace array the wrappers
  allocate starts as NaN, so a value read before it is written, or never written, shows.

tests/test_cuda_emulator.py shows, on the CPU emulator (whose pool hands memory back as CuPy's does), that it
fails on kernels with the release fence or the last-block merge removed, where rerunning one input without
the poison does not.
"""
from contextlib import nullcontext

import numpy as np

from . import gpu

RACE_RUNS = 100


def race_free(cp, inputs, gamma, beta, layout="NCHW", runs=RACE_RUNS, blocks=None, poison=True):
    """Run the training forward and the backward ``runs`` times, input after input, and compare.

    Args:
        cp: cupy, or a stand-in (``bnref.cuda.emulator.CupyOnCpu``) whose wrappers are in use.
        inputs: [(x, dy), ...] device arrays of one shape and layout; run r uses inputs[r % len(inputs)].
        gamma, beta: (C,) device arrays.
        blocks: the statistics' and the backward's grid, as in the wrappers (None: the planner's).
        poison: False leaves the wrappers' arrays as the pool hands them back (only to show what that hides).

    Returns:
        None if every run matched the first run of its input bit for bit, with no NaN; else a message naming
        the first run that did not.
    """
    first = []
    for run in range(runs):
        x, dy = inputs[run % len(inputs)]
        with gpu.poisoned() if poison else nullcontext():
            out, cache = gpu.batchnorm_forward_gpu(x, gamma, beta, layout=layout, blocks=blocks)
            dx, dgamma, dbeta = gpu.batchnorm_backward_gpu(dy, cache, blocks=blocks)
        got = {"y": out, "mean": cache.mean, "rstd": cache.rstd, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}
        if run < len(inputs):
            first.append(got)
            bad = [name for name, a in got.items() if bool(cp.isnan(a).any())]
            if bad:
                return f"run {run} on {x.shape} ({layout}): NaN in {', '.join(bad)}: a value was never written"
            continue
        want = first[run % len(inputs)]
        bad = [name for name, a in got.items() if not bool(cp.array_equal(a, want[name]))]
        if bad:
            return (f"run {run} on {x.shape} ({layout}) gave other {', '.join(bad)} than run {run % len(inputs)} "
                    f"on the same input: a race in the kernels")
    return None


def memory_shape(shape, layout):
    """The memory shape of a logical (N, C, ...) ``shape`` in ``layout``: (N, ..., C) for "NHWC"."""
    return tuple(shape) if layout == "NCHW" else (shape[0], *shape[2:], shape[1])


def alternating_inputs(cp, shape, layout, count=2, seed=0):
    """``count`` different (x, dy) pairs of ``shape`` (the memory layout's shape: channels last for "NHWC"), on
    the device, with different means and scales so that no two runs agree by chance."""
    rng = np.random.default_rng(seed)
    return [(cp.asarray((k + 0.5 + (k + 1) * rng.standard_normal(shape)).astype(np.float32)),
             cp.asarray(rng.standard_normal(shape).astype(np.float32))) for k in range(count)]


def main(argv=None):
    """``python -m bnref.cuda.checks [--runs 200] [--shapes 32,64,56,56 ...]``: :func:`race_free` on each logical
    (N, C, ...) shape, in NCHW and, for 4-D shapes, NHWC. Exits with 1 on a race, 2 without a GPU."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--runs", type=int, default=RACE_RUNS)
    parser.add_argument("--shapes", nargs="+", type=lambda t: tuple(int(v) for v in t.split(",")),
                        default=[(32, 64, 56, 56), (256, 512, 7, 7), (256, 4096)])
    args = parser.parse_args(argv)
    if not gpu.gpu_available():
        print(gpu.NO_GPU_MESSAGE)
        return 2
    import cupy as cp

    failed = 0
    for shape in args.shapes:
        rng = np.random.default_rng(len(shape))
        gamma = cp.asarray(rng.uniform(0.5, 1.5, shape[1]).astype(np.float32))
        beta = cp.asarray(rng.normal(size=shape[1]).astype(np.float32))
        for layout in ("NCHW", "NHWC") if len(shape) == 4 else ("NCHW",):
            inputs = alternating_inputs(cp, memory_shape(shape, layout), layout)
            problem = race_free(cp, inputs, gamma, beta, layout, args.runs)
            print(f"{str(shape):22s} {layout}: {problem or f'{args.runs} runs, each bit-identical to its first'}",
                  flush=True)
            failed += problem is not None
            cp.get_default_memory_pool().free_all_blocks()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
