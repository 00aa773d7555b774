"""Run chapter 5's CUDA kernels on a CPU: a CuPy stand-in for tests on machines without a GPU.

The kernels' exact source (:func:`bnref.cuda.kernel_source`, the string CuPy
hands to NVRTC) is compiled with the host C++ compiler and ``emulator.hpp``,
which supplies CUDA's thread model: blocks run one at a time, the threads of a
block are fibers switched at ``__syncthreads`` and warp shuffles. See that
header for what is and is not modelled. It is slow (about a microsecond per
thread per barrier) and meant for small tensors.

What it catches that a code review may not, without a GPU:

* wrong results: the wrappers of :mod:`bnref.cuda.gpu` run end to end
  (planner, workspace, grid-level merge, the elementwise pass) and are compared
  with bnref, and with :mod:`bnref.cuda.mirror` to the bit;
* order dependence: ``CupyOnCpu(order="reverse" | "shuffled")`` runs the blocks
  and the threads between barriers in another order (a missing barrier or a
  merge that depends on which block finishes last changes the result);
* out-of-bounds writes: every array sits between guard bytes, checked after
  each launch; reads of memory never written give NaN, because fresh memory
  and each block's shared memory are filled with 0xFF bytes (reads past an
  array give -1.7e38, the guard bytes as float);
* a partial published without a fence: stores through ``__stcg`` reach the
  other blocks only after a ``__threadfence`` (or at the end of the launch),
  so the last block of a merge reads what the slot held before; with
  ``CupyOnCpu(pool=True)`` memory is handed back as CuPy's pool does, old
  contents included, which is what a race check must see through
  (:mod:`bnref.cuda.checks`);
* a misaligned ``float4*``, a scalar passed with the wrong width, a host array
  passed as a pointer, threads of a block at different ``__syncthreads``, a
  full-mask shuffle in a partial warp: each raises :class:`EmulatorError`.

It runs one block at a time, so it cannot show a load performed early (before
the ticket it follows: the acquire side of a fence), nor two blocks or
launches working at once; tests/test_cuda_sass.py checks the fences in the
compiled code instead.

Usage::

    from bnref.cuda import emulator, gpu
    cp = emulator.CupyOnCpu()
    with gpu.use_backend(cp):
        out, cache = gpu.batchnorm_forward_gpu(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta))
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

HEADER = Path(__file__).resolve().parent / "emulator.hpp"
CXX_FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math",
             "-Wno-unknown-pragmas")
GUARD = 4096                     # bytes of GUARD_BYTE on both sides of every array
GUARD_BYTE = 0xFE                # not 0xFF, the fill of fresh memory: a NaN copied past the end is still seen
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}

_SIGNATURE = re.compile(r'extern "C" __global__ void\s+(?:__launch_bounds__\((\w+)[^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')
_DEFINE = re.compile(r"^#define (\w+) (\d+)\b", re.M)
_SCALARS = {"int": np.int32, "unsigned int": np.uint32, "long long": np.int64, "float": np.float32,
            "double": np.float64, "bool": np.bool_}
_POINTEES = {"float": (np.float32, 4), "float4": (np.float32, 16), "int": (np.int32, 4),
             "unsigned int": (np.uint32, 4), "double": (np.float64, 8)}


class EmulatorError(RuntimeError):
    """A kernel did something that is an error on a GPU, or that the emulator cannot model."""


def compiler():
    """The host C++ compiler (``$CXX``, ``g++`` or ``c++``), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Param(NamedTuple):
    ctype: str      # as written, without __restrict__: "const float*", "int", ...
    base: str       # "float", "float4", "int", "unsigned int", "long long", ...
    pointer: bool


class Signature(NamedTuple):
    params: list        # [Param, ...]
    max_threads: int    # __launch_bounds__, or CUDA's limit of 1024 threads per block


def signatures(source):
    """{kernel name: Signature} of the ``extern "C" __global__`` kernels of a CUDA source. A launch bound may
    be a number or the name of a ``#define``d one."""
    found = {}
    defines = dict(_DEFINE.findall(source))
    for bound, name, params in _SIGNATURE.findall(source):
        found[name] = Signature([], int(defines.get(bound, bound) or 1024))
        for p in params.split(","):
            words = p.replace("__restrict__", " ").replace("*", " * ").split()
            ctype = " ".join(words[:-1]).replace(" *", "*")
            base = " ".join(w for w in words[:-1] if w not in ("const", "*"))
            found[name].params.append(Param(ctype, base, "*" in words))
    return found


def _thunks(sigs):
    """C entry points emu_thunk_<name>(void** args): each argument read from args[i], as cuLaunchKernel does."""
    lines = []
    for name, (params, _) in sigs.items():
        unpacked = ", ".join(f"*({p.ctype}*)a[{i}]" for i, p in enumerate(params))
        lines.append(f'extern "C" void emu_thunk_{name}(void** a) {{ {name}({unpacked}); }}')
    return "\n".join(lines) + "\n"


def _cache_dir():
    path = Path(os.environ.get("BNREF_EMULATOR_CACHE", Path(tempfile.gettempdir()) / f"bnref-emulator-{os.getuid()}"))
    path.mkdir(parents=True, exist_ok=True)
    return path


_LIBRARIES = {}


def library(text):
    """``text`` (C++ with CUDA's syntax) compiled with ``emulator.hpp`` into a shared library, cached on disk by
    content; the ctypes handle, with ``emu_launch`` typed."""
    cxx = compiler()
    if cxx is None:
        raise EmulatorError("the CUDA emulator needs a host C++ compiler (g++ or c++ on PATH, or $CXX)")
    key = hashlib.sha256("\0".join((HEADER.read_text(), text, cxx, *CXX_FLAGS)).encode()).hexdigest()[:24]
    if key not in _LIBRARIES:
        lib = _cache_dir() / f"{key}.so"
        if not lib.exists():
            with tempfile.TemporaryDirectory(dir=_cache_dir()) as tmp:
                src, out = Path(tmp) / "kernels.cpp", Path(tmp) / "kernels.so"
                src.write_text(text)
                proc = subprocess.run([cxx, *CXX_FLAGS, "-include", str(HEADER), str(src), "-o", str(out)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise EmulatorError(f"the kernel source does not compile for the emulator:\n{proc.stderr}")
                os.replace(out, lib)   # atomic: parallel test workers may build the same library
        handle = ctypes.CDLL(str(lib))
        handle.emu_launch.restype = ctypes.c_int
        handle.emu_launch.argtypes = ([ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_uint] * 6
                                      + [ctypes.c_int, ctypes.c_uint, ctypes.c_char_p, ctypes.c_int])
        _LIBRARIES[key] = handle
    return _LIBRARIES[key]


def build(source):
    """A CUDA source with its ``extern "C"`` kernels compiled for the emulator: (ctypes library, signatures)."""
    sigs = signatures(source)
    return library(source + "\n" + _thunks(sigs)), sigs


# --- device memory ------------------------------------------------------------------------------

class MemoryPointer(NamedTuple):
    """``cupy.cuda.MemoryPointer``: an address, and a copy into it."""

    ptr: int

    def copy_from_device_async(self, src, size, stream=None):
        ctypes.memmove(self.ptr, src.ptr, size)


class Array(np.ndarray):
    """A NumPy array standing for device memory; ``a.data.ptr`` is its address, as in CuPy."""

    @property
    def data(self):
        return MemoryPointer(self.__array_interface__["data"][0])

    def get(self):
        """A host copy, as ``cupy.ndarray.get()``."""
        return CupyOnCpu.asnumpy(self)


_GUARDED = {}   # id(raw buffer) -> (raw buffer's weak reference, start, end) of every live allocation


class Pool:
    """Device memory handed back, contents and all, as CuPy's memory pool does: an allocation takes a buffer
    of the same size that no array uses any more (none views it), else a fresh one."""

    def __init__(self):
        self.buffers = []

    def take(self, nbytes):
        """A free buffer (raw bytes, start) for ``nbytes``, or None."""
        for raw, start, size in self.buffers:
            # references: the list's tuple, this loop's name, getrefcount's argument; no array views it
            if size == nbytes and sys.getrefcount(raw) == 3:
                return raw, start
        return None


def _alloc(shape, dtype, pool=None):
    """An uninitialised Array between two guard zones: fresh memory is 0xFF in every byte (NaN as float);
    memory from ``pool`` (a :class:`Pool`) holds what its last array left there."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    reused = pool.take(nbytes) if pool is not None else None
    if reused:
        raw, start = reused
    else:
        raw = np.full(2 * GUARD + nbytes + 16, GUARD_BYTE, np.uint8)
        start = GUARD + (-raw.ctypes.data - GUARD) % 16      # 16-byte aligned, as cudaMalloc is (more, in fact)
        raw[start:start + nbytes] = 0xFF
        _GUARDED[id(raw)] = (weakref.ref(raw), start, start + nbytes)
        weakref.finalize(raw, _GUARDED.pop, id(raw), None)
        if pool is not None:
            pool.buffers.append((raw, start, nbytes))
    return raw[start:start + nbytes].view(dtype).reshape(shape).view(Array)


def _check_guards(kernel):
    """Raise if any live allocation's guard bytes changed (the kernel wrote past an array)."""
    for ref, start, end in list(_GUARDED.values()):
        raw = ref()
        if raw is not None and (np.any(raw[:start] != GUARD_BYTE) or np.any(raw[end:] != GUARD_BYTE)):
            raw[:start], raw[end:] = GUARD_BYTE, GUARD_BYTE   # re-arm, so that the next launch is judged on its own
            raise EmulatorError(f"{kernel}: out-of-bounds write next to an array of {end - start} bytes")


class Kernel:
    """One kernel of an emulated module; called like CuPy's: ``kernel(grid, block, args)``."""

    def __init__(self, backend, library, name, signature):
        self.backend, self.library, self.name = backend, library, name
        self.params, self.max_threads = signature
        self.thunk = ctypes.cast(getattr(library, f"emu_thunk_{name}"), ctypes.c_void_p)
        self.kernel = SimpleNamespace(ptr=self.thunk.value)   # as RawKernel.kernel: the handle the occupancy API takes

    def _marshal(self, args):
        if len(args) != len(self.params):
            raise EmulatorError(f"{self.name} takes {len(self.params)} arguments; got {len(args)}")
        held = []
        for i, (arg, p) in enumerate(zip(args, self.params)):
            where = f"{self.name}, argument {i} ({p.ctype})"
            if p.pointer:
                if not isinstance(arg, Array):
                    raise EmulatorError(f"{where}: expects a device array; got {type(arg).__name__}")
                dtype, align = _POINTEES[p.base]
                if arg.dtype != dtype:
                    raise EmulatorError(f"{where}: expects {np.dtype(dtype).name} memory; got {arg.dtype}")
                if arg.data.ptr % align:
                    raise EmulatorError(f"{where}: misaligned address (a {p.base}* must be {align}-byte aligned)")
                held.append(ctypes.c_void_p(arg.data.ptr))
            else:
                if not (isinstance(arg, np.generic) and arg.dtype == _SCALARS[p.base]):
                    raise EmulatorError(f"{where}: pass np.{np.dtype(_SCALARS[p.base]).name}(...), so that the "
                                        f"kernel reads the bytes meant for it; got {arg!r} ({type(arg).__name__})")
                held.append(np.ctypeslib.as_ctypes(np.array(arg)))
        return held

    def __call__(self, grid, block, args):
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        if min(grid + block) < 1 or grid[1] > 65535 or grid[2] > 65535 or block[2] > 64:
            raise EmulatorError(f"{self.name}: invalid launch grid {grid}, block {block}")
        if np.prod(block) > self.max_threads:
            raise EmulatorError(f"{self.name}: a block of {int(np.prod(block))} threads exceeds the kernel's "
                                f"limit of {self.max_threads} (__launch_bounds__, or 1024)")
        held = self._marshal(tuple(args))
        pointers = (ctypes.c_void_p * len(held))(*[ctypes.addressof(h) for h in held])
        err = ctypes.create_string_buffer(512)
        rc = self.library.emu_launch(self.thunk, pointers, *grid, *block, ORDERS[self.backend.order],
                                     self.backend.seed, err, len(err))
        if rc:
            raise EmulatorError(f"{self.name}: {err.value.decode()}")
        _check_guards(self.name)


class RawModule:
    """``cupy.RawModule(code=..., options=...)`` for the emulator (options are NVRTC's, and ignored here)."""

    def __init__(self, backend, code, options=()):
        self.backend = backend
        self.library, self.sigs = build(code)

    def get_function(self, name):
        if name not in self.sigs:
            raise EmulatorError(f"no extern \"C\" __global__ kernel named {name!r} in the module")
        return Kernel(self.backend, self.library, name, self.sigs[name])


class Stream:
    """The emulator's one stream (``cupy.cuda.get_current_stream()``): launches run one after the other."""

    ptr = 0


class CupyOnCpu:
    """The part of CuPy's interface that bnref.cuda's wrappers and tests use, backed by the emulator.

    Args:
        order: "forward", "reverse" or "shuffled": the order of the blocks of a
            grid, and of the threads of a block between two barriers.
        seed: the shuffle's seed.
        sm_count: the multiprocessor count the launch planner sees.
        blocks_per_sm: what the occupancy API answers for every kernel (a GPU's driver answers from the
            kernel's registers and shared memory); the planner's persistent grids get sm_count * blocks_per_sm
            blocks.
        pool: hand memory back as CuPy's pool does (:class:`Pool`), old contents included, instead of
            giving every allocation fresh memory that reads as NaN.
    """

    ndarray = Array
    float32, float64, int32, uint32 = np.float32, np.float64, np.int32, np.uint32

    def __init__(self, order="forward", seed=0, sm_count=4, blocks_per_sm=2, pool=False):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}; got {order!r}")
        self.order, self.seed = order, seed
        self.pool = Pool() if pool else None
        self.__name__ = f"bnref.cuda.emulator[{order},{seed},{sm_count},{blocks_per_sm}]"
        props = {"multiProcessorCount": sm_count}
        stream = Stream()
        self.cuda = SimpleNamespace(
            Device=lambda *a: SimpleNamespace(id=0), get_current_stream=lambda: stream,
            runtime=SimpleNamespace(getDeviceProperties=lambda dev: props),
            driver=SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=lambda func, threads, smem: blocks_per_sm))

    def RawModule(self, code, options=()):  # noqa: N802 (CuPy's name)
        return RawModule(self, code, options)

    def RawKernel(self, code, name, options=()):  # noqa: N802
        return RawModule(self, code, options).get_function(name)

    @staticmethod
    def ElementwiseKernel(*args, **kwargs):  # noqa: N802
        from .emulated_kernels import ElementwiseKernel
        return ElementwiseKernel(*args, **kwargs)

    @staticmethod
    def ReductionKernel(*args, **kwargs):  # noqa: N802
        from .emulated_kernels import ReductionKernel
        return ReductionKernel(*args, **kwargs)

    def get_array_module(self, *args):
        """This module for device arrays, NumPy otherwise (as cupy.get_array_module)."""
        return self if any(isinstance(a, Array) for a in args) else np

    def __getattr__(self, name):
        """Everything else (sqrt, float32, ...) from NumPy: on an Array, a ufunc returns an Array."""
        return getattr(np, name)

    def empty(self, shape, dtype=np.float32):
        return _alloc(shape, dtype, self.pool)

    def empty_like(self, a):
        return _alloc(a.shape, a.dtype, self.pool)

    def zeros(self, shape, dtype=np.float32):
        out = _alloc(shape, dtype, self.pool)
        out[...] = 0
        return out

    def ones(self, shape, dtype=np.float32):
        out = _alloc(shape, dtype, self.pool)
        out[...] = 1
        return out

    def asarray(self, a, dtype=None):
        """Like cupy.asarray: a device array is returned as is (if the dtype fits), anything else is copied."""
        if isinstance(a, Array) and (dtype is None or a.dtype == dtype):
            return a
        host = np.asarray(a, dtype=dtype)
        out = _alloc(host.shape, host.dtype, self.pool)
        out[...] = host
        return out

    def ascontiguousarray(self, a, dtype=None):
        if isinstance(a, Array) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
            return a
        return self.asarray(np.ascontiguousarray(a, dtype=dtype))

    @staticmethod
    def asnumpy(a):
        return np.array(a).view(np.ndarray)   # a copy, as from the device

    @staticmethod
    def array_equal(a, b):
        return np.array_equal(a, b)
