"""Grading the GPU assignment without a GPU: its notebooks' ``import cupy`` gets the CPU emulator instead."""
import os
import shutil
import sys
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from bnref.cuda import emulator
from bngrade.pipeline import device

SHIM = Path(__file__).parent / "emulated_cupy"
NO_WAY = "no CUDA GPU, and no host C++ compiler for the CPU emulator: the GPU assignment cannot run here"
#: marks a test that builds CUDA C on the emulator (it needs the host C++ compiler)
needs_cxx = pytest.mark.skipif(emulator.compiler() is None, reason="no host C++ compiler: CUDA emulator not built")


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


def cupy_module(order="forward"):
    """A module named ``cupy`` backed by ``CupyOnCpu(order)``, as ``tests/emulated_cupy`` is: what an in-process run
    on the emulator puts in ``sys.modules`` (a probe's ``import cupy``) and in a notebook's namespace (its ``cp``)."""
    module = types.ModuleType("cupy")
    backend = emulator.CupyOnCpu(order=order)
    module.is_available = lambda: True
    module.__getattr__ = lambda name: getattr(backend, name)
    return module


@contextmanager
def emulated_cupy(order="forward"):
    """Within the block, ``import cupy`` gives a fresh :func:`cupy_module` (``order``), which is yielded."""
    module = cupy_module(order)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "cupy", module)
        yield module


def notebook(cells, cp, replace=None):
    """The namespace of answer cells ({grade_id: source}) run in order with ``np`` and ``cp`` (a cupy module).

    Args:
        replace: {grade_id: [(old, new), ...]} edits of the sources first; each ``old`` must occur exactly once.
    """
    namespace = {"np": np, "cp": cp}
    for grade_id, source in cells.items():
        for old, new in (replace or {}).get(grade_id, []):
            assert source.count(old) == 1, f"cell {grade_id} no longer contains {old!r} exactly once"
            source = source.replace(old, new)
        exec(compile(source, f"<cell {grade_id}>", "exec"), namespace)
    return namespace


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
