"""Grading the GPU assignment without a GPU: its notebooks' ``import cupy`` gets the CPU emulator instead."""
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from bnref.cuda import emulator
from bngrade.pipeline import device

SHIM = Path(__file__).parent / "emulated_cupy"
NO_WAY = "no CUDA GPU, and no host C++ compiler for the CPU emulator: the GPU assignment cannot run here"


def can_run(assignment):
    """True when ``assignment``'s notebooks can run here: a CPU assignment, a GPU, or the emulator's compiler."""
    return assignment not in device.GPU_ASSIGNMENTS or device.gpu_available() or emulator.compiler() is not None


@contextmanager
def gpu_for(assignment):
    """Run the block where ``assignment`` can be graded: as is for a CPU assignment or where there is a GPU;
    otherwise with ``tests/emulated_cupy`` first on PYTHONPATH (the grader's own processes) and a copy of it with
    bnref's emulator alone on the sandbox's, and the GPU check answered yes."""
    if not can_run(assignment):
        pytest.skip(NO_WAY)
    if assignment not in device.GPU_ASSIGNMENTS or device.gpu_available():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="emulated-cupy-") as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(SHIM), os.environ.get("PYTHONPATH")))))
        # the sandbox sees only this folder of it, read-only: the stand-in cupy and, of bnref, the emulator alone
        patch.setenv("BNGRADE_SANDBOX_PYTHONPATH", str(_shim(Path(tmp))))
        patch.setattr(device, "gpu_available", lambda: True)
        yield


def _shim(folder):
    """``folder`` with the emulated ``cupy`` and, of bnref, only the emulator (no reference solution)."""
    shutil.copytree(SHIM / "cupy", folder / "cupy", ignore=shutil.ignore_patterns("__pycache__"))
    package = folder / "bnref" / "cuda"
    package.mkdir(parents=True)
    (folder / "bnref" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    for name in ("emulator.py", "emulator.hpp", "emulated_kernels.py"):
        shutil.copyfile(Path(emulator.__file__).with_name(name), package / name)
    os.chmod(folder, 0o755)
    return folder
