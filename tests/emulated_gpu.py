"""Grading the GPU assignment without a GPU: its notebooks' ``import cupy`` gets the CPU emulator instead."""
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from bnref.cuda import emulator
from bngrade import device

SHIM = Path(__file__).parent / "emulated_cupy"
NO_WAY = "no CUDA GPU, and no host C++ compiler for the CPU emulator: the GPU assignment cannot run here"


def can_run(assignment):
    """True when ``assignment``'s notebooks can run here: a CPU assignment, a GPU, or the emulator's compiler."""
    return assignment not in device.GPU_ASSIGNMENTS or device.gpu_available() or emulator.compiler() is not None


@contextmanager
def gpu_for(assignment):
    """Run the block where ``assignment`` can be graded: as is for a CPU assignment or where there is a GPU;
    otherwise with ``tests/emulated_cupy`` first on the notebooks' PYTHONPATH and the GPU check answered yes."""
    if not can_run(assignment):
        pytest.skip(NO_WAY)
    if assignment not in device.GPU_ASSIGNMENTS or device.gpu_available():
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(SHIM), os.environ.get("PYTHONPATH")))))
        patch.setattr(device, "gpu_available", lambda: True)
        yield
