"""CPU benchmark: the NumPy reference against PyTorch at the same thread count.

Prints one table per pass, measured in this run: median wall time of each side
(blocks of calls alternating over rounds, after warm-up) and the ratio ours / torch (goal: <= 1.2),
plus the closed-form backward's speed-up over the staged one, backward alone (goal: >= 3).

    python benchmarks/cpu_batchnorm.py [--repeats 30]
"""
import argparse
import os
import platform
import time

import numpy as np
import torch

import bnref
from bnref import _kernels

SHAPES = [(4096, 1024), (256, 4096)]


def median_ms(fns, repeats, rounds=3):
    """Median milliseconds of each callable.

    Each callable runs in blocks of consecutive calls (after two untimed ones),
    and the blocks alternate over several rounds so drift hits all alike. Blocks,
    not single alternating calls: torch's OpenMP workers spin for a while after
    each call and would steal the cores from the next call of the other side.
    """
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, acc in zip(fns, times):
            fn()
            fn()
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - start)
    return [1e3 * float(np.median(t)) for t in times]


def torch_forward(x, gamma, beta):
    xt, gt, bt = (torch.from_numpy(a) for a in (x, gamma, beta))
    rm, rv = torch.zeros_like(gt), torch.ones_like(gt)

    def run():
        with torch.no_grad():
            torch.nn.functional.batch_norm(xt, rm, rv, gt, bt, training=True, momentum=0.1, eps=1e-5)

    return run


def torch_forward_backward(x, gamma, beta, dout):
    xt = torch.from_numpy(x).requires_grad_()
    gt, bt = (torch.from_numpy(a).requires_grad_() for a in (gamma, beta))
    dt = torch.from_numpy(dout)

    def run():
        y = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-5)
        torch.autograd.grad(y, (xt, gt, bt), dt)

    return run


def ours_forward_backward(x, gamma, beta, dout, backward):
    def run():
        _, cache = bnref.batchnorm_forward(x, gamma, beta)
        backward(dout, cache)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per block (3 rounds)")
    args = parser.parse_args()
    torch.set_num_threads(_kernels.THREADS)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; threads: ours "
          f"{_kernels.THREADS}, torch {torch.get_num_threads()}; numpy {np.__version__}, torch {torch.__version__}")
    rng = np.random.default_rng(0)
    rows, speedups = [], []
    for shape in SHAPES:
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal(shape).astype(dtype)
            gamma, beta = np.ones(shape[1], dtype), np.zeros(shape[1], dtype)
            ours, theirs = median_ms([lambda: bnref.batchnorm_forward(x, gamma, beta), torch_forward(x, gamma, beta)],
                                     args.repeats)
            rows.append(("forward", shape, np.dtype(dtype).name, ours, theirs))
        x = rng.standard_normal(shape).astype(np.float32)
        dout = rng.standard_normal(shape).astype(np.float32)
        gamma, beta = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)
        ours, staged, theirs = median_ms([
            ours_forward_backward(x, gamma, beta, dout, bnref.batchnorm_backward_alt),
            ours_forward_backward(x, gamma, beta, dout, bnref.batchnorm_backward),
            torch_forward_backward(x, gamma, beta, dout)], args.repeats)
        rows.append(("fwd+bwd", shape, "float32", ours, theirs))
        rows.append(("fwd+bwd staged", shape, "float32", staged, theirs))
        _, cache = bnref.batchnorm_forward(x, gamma, beta)
        closed, staged = median_ms([lambda: bnref.batchnorm_backward_alt(dout, cache),
                                    lambda: bnref.batchnorm_backward(dout, cache)], args.repeats)
        speedups.append((shape, staged, closed))
    print(f"\n| pass | shape | dtype | ours ms | torch ms | ours/torch |\n|---|---|---|---|---|---|")
    for name, shape, dtype, ours, theirs in rows:
        print(f"| {name} | {shape} | {dtype} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} |")
    print("\n| shape (float32) | staged backward ms | closed-form backward ms | speed-up |\n|---|---|---|---|")
    for shape, staged, closed in speedups:
        print(f"| {shape} | {staged:.2f} | {closed:.2f} | {staged / closed:.2f}x |")

if __name__ == "__main__":
    main()
