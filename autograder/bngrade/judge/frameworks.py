"""Banned means unavailable: the packages whose folders the probe's sandbox hides, per assignment.

Where an exercise is "from scratch", a graded function must not be able to reach the framework that does its
work, whatever name, string or cell it uses: the probe (:mod:`bncapture.answers`) runs in a sandbox in which
these packages' folders are empty, so ``import torch`` fails there however it is spelled. The notebook itself,
with its visible tests (which compare with torch), runs in a separate sandbox that has everything.
"""
import importlib.util
from pathlib import Path

TORCH = ("torch", "functorch", "torchgen")
#: assignment -> top-level packages the probe cannot import
UNAVAILABLE = {
    "ch01_why_normalize": ("sklearn",),
    "ch02_batchnorm_forward": TORCH,
    "ch03_batchnorm_backward": TORCH,
    "ch05_cupy_kernels": TORCH,
    "ch06_batchnorm_cnn": TORCH,
    "ch07_dropout": TORCH,
    "ch08_beyond_bn": TORCH,
}


def unavailable_paths(assignment):
    """The installed folders of the packages that ``assignment`` bans (without importing them)."""
    paths = []
    for name in UNAVAILABLE.get(assignment, ()):
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            if Path(location).is_dir():
                paths.append(str(Path(location).resolve()))
    return paths
