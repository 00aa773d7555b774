"""``cupy.ElementwiseKernel`` and ``cupy.ReductionKernel`` for the CPU emulator (:mod:`bnref.cuda.emulator`).

CuPy turns the pieces of CUDA C a user writes (an operation, or map, reduce
and post-map expressions) into a kernel. Here the same pieces are pasted into a
C++ loop and compiled with the host compiler, so the *user's* code runs as
written: its types, its integer arithmetic, its indexing of ``raw`` arrays.
How CuPy splits the work across threads is not modelled (the loop is
sequential); array arguments are broadcast against each other as in CuPy.

Supported: parameters ``[raw] <dtype or type placeholder> name``, array or
NumPy-scalar arguments, the loop index ``i`` and ``_ind.size()`` (elementwise),
``_in_ind.size()`` and ``_out_ind.size()`` (reduction), ``axis`` and ``keepdims``.
"""
import ctypes
import re
from typing import NamedTuple

import numpy as np

from .emulator import Array, EmulatorError, _alloc, _check_guards, library

_CTYPES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long", "uint32": "unsigned int",
           "bool": "bool", "int8": "signed char", "uint8": "unsigned char", "int16": "short", "float16": None}


class KernelParam(NamedTuple):
    raw: bool
    type: str   # a NumPy dtype name, or a placeholder such as T
    name: str


def parse_params(text):
    """``"raw float32 a, T x"`` -> [KernelParam(True, "float32", "a"), KernelParam(False, "T", "x")]."""
    params = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        words = part.split()
        raw = words[0] == "raw"
        if raw:
            words = words[1:]
        if len(words) != 2 or not re.fullmatch(r"[A-Za-z_]\w*", words[1]):
            raise EmulatorError(f"cannot read the kernel parameter {part!r}")
        params.append(KernelParam(raw, words[0], words[1]))
    return params


def _ctype(dtype):
    name = np.dtype(dtype).name
    if _CTYPES.get(name) is None:
        raise EmulatorError(f"the emulator has no C type for {name}")
    return _CTYPES[name]


def _bind(params, args):
    """{placeholder or dtype name: dtype}, from the arguments given for ``params``."""
    types = {}
    for p, arg in zip(params, args):
        if p.type in _CTYPES:
            want = np.dtype(p.type)
            if isinstance(arg, np.ndarray) and p.raw and arg.dtype != want:
                raise EmulatorError(f"raw parameter {p.name} is {p.type}; got a {arg.dtype} array")
            types[p.type] = want
        elif isinstance(arg, (np.ndarray, np.generic)):
            if types.setdefault(p.type, arg.dtype) != arg.dtype:
                raise EmulatorError(f"type placeholder {p.type} bound to {types[p.type]} and {arg.dtype}")
    return types


def _typedefs(types):
    return "".join(f"typedef {_ctype(dt)} {name};\n" for name, dt in types.items() if name not in _CTYPES)


def _run(text, entry, pointers, *sizes):
    lib = library(text)
    fn = getattr(lib, entry)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_longlong] * len(sizes)
    fn(pointers, *sizes)
    _check_guards(entry)


def _pointers(values):
    """A void*[] of the addresses of ``values`` (Arrays, or NumPy scalars kept alive in the returned list)."""
    held = [v if isinstance(v, np.ndarray) else np.array(v) for v in values]
    table = (ctypes.c_void_p * len(held))(*[h.ctypes.data for h in held])
    return table, held


def _as_input(arg, dtype):
    """A device array (or scalar) argument converted to its parameter's dtype, as CuPy casts inputs."""
    if isinstance(arg, np.ndarray):
        if not isinstance(arg, Array):
            raise EmulatorError(f"a kernel argument must be a device array or a scalar; got a {type(arg).__name__}")
        return arg.astype(dtype, copy=False)
    return np.dtype(dtype).type(arg)


class ElementwiseKernel:
    """``cupy.ElementwiseKernel(in_params, out_params, operation, name)``: call with the inputs, then
    optionally the outputs; missing outputs are allocated with the broadcast shape."""

    def __init__(self, in_params, out_params, operation, name="kernel", **_):
        self.ins, self.outs = parse_params(in_params), parse_params(out_params)
        self.operation, self.name = operation, name

    def __call__(self, *args, size=None):
        if len(args) not in (len(self.ins), len(self.ins) + len(self.outs)):
            raise EmulatorError(f"{self.name} takes {len(self.ins)} inputs (and optionally {len(self.outs)} "
                                f"outputs); got {len(args)} arguments")
        ins, outs = args[:len(self.ins)], list(args[len(self.ins):])
        types = _bind(self.ins + self.outs[:len(outs)], list(ins) + outs)
        dtype = {p.name: types.get(p.type) for p in self.ins + self.outs}
        values = [_as_input(a, dtype[p.name]) for p, a in zip(self.ins, ins)]
        shape = np.broadcast_shapes(*[v.shape for p, v in zip(self.ins, values) if not p.raw and v.ndim], *[
            o.shape for o in outs]) if size is None else (size,)
        for p in self.outs[len(outs):]:
            if dtype[p.name] is None:
                raise EmulatorError(f"the type of output {p.name} ({p.type}) is not bound by any input")
            outs.append(_alloc(shape, dtype[p.name]))
        n = int(np.prod(shape))
        flat = [v if p.raw or v.ndim == 0 else np.ascontiguousarray(np.broadcast_to(v, shape))
                for p, v in zip(self.ins, values)]
        lines = []
        for k, (p, v) in enumerate(zip(self.ins, flat)):
            c = _ctype(v.dtype)
            if p.raw:
                lines.append(f"    const {c}* {p.name} = (const {c}*)emu_args[{k}];")
            elif v.ndim == 0:
                lines.append(f"    const {c} {p.name} = *(const {c}*)emu_args[{k}];")
        body = [f"        const {_ctype(v.dtype)} {p.name} = ((const {_ctype(v.dtype)}*)emu_args[{k}])[i];"
                for k, (p, v) in enumerate(zip(self.ins, flat)) if not p.raw and v.ndim]
        body += [f"        {_ctype(o.dtype)}& {p.name} = (({_ctype(o.dtype)}*)emu_args[{len(flat) + k}])[i];"
                 for k, (p, o) in enumerate(zip(self.outs, outs))]
        text = (_typedefs(types) + "struct EmuIndex { long long n; long long size() const { return n; } };\n"
                f'extern "C" void emu_elementwise(void** emu_args, long long n) {{\n' + "\n".join(lines) +
                "\n    const EmuIndex _ind{n};\n    for (long long i = 0; i < n; ++i) {\n" + "\n".join(body) +
                f"\n        {self.operation};\n    }}\n}}\n")
        table, held = _pointers(flat + outs)
        _run(text, "emu_elementwise", table, n)
        del held
        return outs[0] if len(outs) == 1 else tuple(outs)


class ReductionKernel:
    """``cupy.ReductionKernel(in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name)``;
    call with the inputs, ``axis`` (None: all) and ``keepdims``."""

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name="reduce_kernel",
                 reduce_type=None, **_):
        self.ins, self.outs = parse_params(in_params), parse_params(out_params)
        if len(self.outs) != 1 or any(p.raw for p in self.ins):
            raise EmulatorError("the emulator's ReductionKernel takes one output and no raw inputs")
        self.map_expr, self.reduce_expr, self.post_map_expr = map_expr, reduce_expr, post_map_expr
        self.identity, self.name, self.reduce_type = identity, name, reduce_type

    def __call__(self, *args, axis=None, keepdims=False):
        if len(args) != len(self.ins):
            raise EmulatorError(f"{self.name} takes {len(self.ins)} inputs; got {len(args)}")
        types = _bind(self.ins, args)
        values = [_as_input(a, types.get(p.type)) for p, a in zip(self.ins, args)]
        shape = np.broadcast_shapes(*[v.shape for v in values])
        axes = tuple(range(len(shape))) if axis is None else tuple(
            sorted(a % len(shape) for a in ((axis,) if np.isscalar(axis) else axis)))
        kept = [d for d in range(len(shape)) if d not in axes]
        n_red = int(np.prod([shape[d] for d in axes]))
        out_shape = tuple(1 if d in axes else shape[d] for d in range(len(shape))) if keepdims else tuple(
            shape[d] for d in kept)
        flat = [np.ascontiguousarray(np.broadcast_to(v, shape).transpose(kept + list(axes))) for v in values]
        out_p = self.outs[0]
        out_dtype = np.dtype(out_p.type) if out_p.type in _CTYPES else types.get(out_p.type)
        if out_dtype is None:
            raise EmulatorError(f"the type of output {out_p.name} ({out_p.type}) is not bound by any input")
        out = _alloc(out_shape, out_dtype)
        red = self.reduce_type or _ctype(out_dtype)
        loads = "".join(f"            const {_ctype(v.dtype)} {p.name} = ((const {_ctype(v.dtype)}*)emu_args[{k}])"
                        f"[o * n_red + r];\n" for k, (p, v) in enumerate(zip(self.ins, flat)))
        c_out = _ctype(out_dtype)
        text = (_typedefs(types) + "struct EmuIndex { long long n; long long size() const { return n; } };\n"
                'extern "C" void emu_reduce(void** emu_args, long long n_out, long long n_red) {\n'
                "    const EmuIndex _in_ind{n_out * n_red}, _out_ind{n_out};\n"
                "    for (long long o = 0; o < n_out; ++o) {\n"
                f"        {red} acc = ({red})({self.identity});\n"
                "        for (long long r = 0; r < n_red; ++r) {\n" + loads +
                f"            const {red} b = ({red})({self.map_expr});\n"
                f"            const {red} a_ = acc;\n"
                f"            {{ const {red} a = a_; acc = ({self.reduce_expr}); }}\n"
                "        }\n"
                f"        {c_out}& {out_p.name} = (({c_out}*)emu_args[{len(flat)}])[o];\n"
                f"        {{ const {red} a = acc; {self.post_map_expr}; }}\n"
                "    }\n}\n")
        table, held = _pointers(flat + [out])
        _run(text, "emu_reduce", table, int(np.prod(out_shape)), n_red)
        del held
        return out
