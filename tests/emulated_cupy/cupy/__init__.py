"""A stand-in for CuPy that runs everything on bnref.cuda.emulator, for tests that grade the GPU assignment on a
machine without a GPU. Put its parent folder first on PYTHONPATH (tests/emulated_gpu.py does) and
``import cupy`` gets this; it is never installed and never used where a GPU exists."""
from bnref.cuda.emulator import CupyOnCpu

_BACKEND = CupyOnCpu()


def is_available():
    return True


def __getattr__(name):
    return getattr(_BACKEND, name)
