"""CPU benchmark: the NumPy layer norm and group norm of chapter 8 against PyTorch at the same thread count.

Prints one table, measured in this run: the median wall time of each side (blocks of calls alternating over
rounds, after warm-up, with the timing helper of ``cpu_batchnorm.py``) and the ratio ours / torch, for the
forward pass alone and for forward + backward, in float32 (and float64 for the forward pass).

Threads are matched: the NumPy layer norm and group norm (``bnref.norms``) are plain NumPy array operations,
which run on one thread (no BLAS call, none of ``bnref._kernels``' worker threads), so torch runs with
``torch.set_num_threads(1)`` by default. ``--threads N`` gives torch N threads instead (then the comparison is
no longer at equal threads, and on a busy machine torch's OpenMP threads wait for each other).

    python benchmarks/cpu_norms.py [--repeats 20] [--threads N]
"""
import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_batchnorm import median_ms  # noqa: E402 - the shared timing helper

import bnref  # noqa: E402

LN_SHAPES = [(4096, 1024), (256, 4096)]  # (N, D): features of fully connected layers, or tokens
GN_SHAPES = [((32, 64, 32, 32), 32), ((8, 256, 14, 14), 32), ((32, 64, 32, 32), 64)]  # (N, C, H, W), groups


def norm_case(shape, dtype, rng, ours_forward, ours_backward, torch_forward):
    """Callables (ours forward, torch forward, ours fwd+bwd, torch fwd+bwd) for one layer on ``shape``.

    ``ours_forward(x, gamma, beta) -> (out, cache)``, ``ours_backward(dout, cache)`` and
    ``torch_forward(x, gamma, beta) -> out`` (tensors) with gamma, beta of shape (C,) = (shape[1],).
    """
    x = rng.standard_normal(shape).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    gamma, beta = np.ones(shape[1], dtype), np.zeros(shape[1], dtype)
    xt, gt, bt, dt = (torch.from_numpy(a) for a in (x, gamma, beta, dout))
    xg, gg, bg = (t.clone().requires_grad_() for t in (xt, gt, bt))

    def ours_fwd_bwd():
        ours_backward(dout, ours_forward(x, gamma, beta)[1])

    def torch_fwd():
        with torch.no_grad():
            torch_forward(xt, gt, bt)

    def torch_fwd_bwd():
        torch.autograd.grad(torch_forward(xg, gg, bg), (xg, gg, bg), dt)

    return lambda: ours_forward(x, gamma, beta), torch_fwd, ours_fwd_bwd, torch_fwd_bwd


def ln_case(shape, dtype, rng):
    """Layer norm over the D features of an (N, D) batch."""
    return norm_case(shape, dtype, rng, bnref.layernorm_forward, bnref.layernorm_backward,
                     lambda x, g, b: F.layer_norm(x, (shape[1],), g, b, eps=1e-5))


def gn_case(shape, groups, dtype, rng):
    """Group norm with ``groups`` groups of an (N, C, H, W) batch."""
    return norm_case(shape, dtype, rng, lambda x, g, b: bnref.groupnorm_forward(x, g, b, groups),
                     bnref.groupnorm_backward, lambda x, g, b: F.group_norm(x, groups, g, b, eps=1e-5))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per block (3 rounds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the NumPy code)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; threads: bnref.norms 1 "
          f"(NumPy ops), torch {torch.get_num_threads()}; numpy {np.__version__}, torch {torch.__version__}")
    rng = np.random.default_rng(0)
    cases = [("layer norm", f"{shape}", lambda dt, s=shape: ln_case(s, dt, rng)) for shape in LN_SHAPES]
    cases += [("group norm", f"{shape}, G={g}", lambda dt, s=shape, g=g: gn_case(s, g, dt, rng))
              for shape, g in GN_SHAPES]
    rows = []
    for name, label, make in cases:
        for dtype in (np.float32, np.float64):
            ours_fwd, torch_fwd, ours_both, torch_both = make(dtype)
            ours, theirs = median_ms([ours_fwd, torch_fwd], args.repeats)
            rows.append((name, "forward", label, np.dtype(dtype).name, ours, theirs))
            if dtype is np.float32:
                ours, theirs = median_ms([ours_both, torch_both], args.repeats)
                rows.append((name, "fwd+bwd", label, "float32", ours, theirs))
    print("\n| layer | pass | shape | dtype | ours ms | torch ms | ours/torch |\n|---|---|---|---|---|---|---|")
    for name, kind, label, dtype, ours, theirs in rows:
        print(f"| {name} | {kind} | {label} | {dtype} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
