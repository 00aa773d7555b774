"""The order of the loads in the kernels' hot loops, read off the machine code (SASS) that ptxas emitted.

A kernel keeps ``plan.LOAD_BYTES`` per thread in flight only if the compiled loop issues all the loads of a
step before the first instruction that reads one of their results: the source asks for that, ptxas decides
(under a register cap it may move a load after the first use of an earlier one, and a thread then has fewer
bytes on their way). This module disassembles a cubin (``nvdisasm``, or ``cuobjdump -sass``, which calls it)
and measures, for each kernel, the loop that loads the most bytes from global memory:

* ``step_loads``, ``step_bytes``: its ``LDG`` instructions (the grid-level merge's ``LDG.E.STRONG`` loads of
  the partials excluded), and their bytes per thread;
* ``before_use``, ``bytes_before_use``: the loads (bytes) issued, in program order, before the first
  instruction that reads a register one of them wrote.

The rule for what an instruction reads: every ``R<n>`` operand but the first when the first is a register
(the destination); ``R<n>.64`` inside an address is two registers, and the data operand of a 64- or 128-bit
access two or four. :func:`fences` checks, in the same code, that the grid-level merge's tickets have a fence
on both sides. ``python -m bnref.cuda.nvcc --write`` commits the load order with ptxas' report
(``ptxas_report.py``), for machines without the tools.
"""
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P\w+)\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNCTION = re.compile(r"^\s*(?:Function : (\w+)|\.text\.(\w+):)\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"(0x[0-9a-f]+)|`\((\.L_x_\d+)\)")
_REGISTER = re.compile(r"\bR(\d+)(\.64)?\b")


class Instruction(NamedTuple):
    address: int
    opcode: str      # with its modifiers: "LDG.E.128.CONSTANT"
    operands: str    # as printed, predicate guard excluded
    target: int      # branch target address, or -1


class LoadOrder(NamedTuple):
    kernel: str
    loop: tuple          # (first, last) address of the hot loop's body
    step_loads: int
    step_bytes: int
    before_use: int
    bytes_before_use: int


def tool():
    """(path, kind) of a disassembler: ``nvdisasm`` on PATH, beside nvcc (or in CUDA_HOME), or from the pip
    wheel nvidia-cuda-nvdisasm; else ``cuobjdump`` (which calls nvdisasm since CUDA 13); (None, None) if there is
    neither."""
    homes = [Path(h) for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
    if shutil.which("nvcc"):
        homes.append(Path(os.path.realpath(shutil.which("nvcc"))).parents[1])
    wheels = importlib.util.find_spec("nvidia")
    homes += [home for root in (wheels.submodule_search_locations if wheels else []) for home in Path(root).glob("cu*")]
    for name in ("nvdisasm", "cuobjdump"):
        found = shutil.which(name) or next((str(home / "bin" / name) for home in homes
                                            if os.access(home / "bin" / name, os.X_OK)), None)
        if found:
            return found, name
    return None, None


def disassemble(cubin):
    """The SASS text of a cubin, from the disassembler :func:`tool` finds (RuntimeError if it fails)."""
    path, kind = tool()
    if path is None:
        raise RuntimeError("neither nvdisasm nor cuobjdump is on PATH")
    cmd = [path, "-c", str(cubin)] if kind == "nvdisasm" else [path, "-sass", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def parse(text):
    """{kernel: [Instruction, ...]} of a disassembly by nvdisasm or cuobjdump (branch targets resolved)."""
    functions, labels, pending = {}, {}, []
    current = None
    for line in text.splitlines():
        head = _FUNCTION.match(line)
        if head:
            current = functions.setdefault(head.group(1) or head.group(2), [])
            continue
        label = _LABEL.match(line.strip())
        if label:
            pending.append(label.group(1))
            continue
        ins = _INSTRUCTION.search(line)
        if ins is None or current is None:
            continue
        address = int(ins.group(1), 16)
        for name in pending:
            labels[(id(current), name)] = address
        pending = []
        target = _TARGET.search(ins.group(4)) if ins.group(3).startswith(("BRA", "JMP")) else None
        current.append((Instruction(address, ins.group(3), ins.group(4).strip(), -1), target))
    resolved = {}
    for name, rows in functions.items():
        resolved[name] = [i._replace(target=-1 if t is None else int(t.group(1), 16) if t.group(1)
                                     else labels[(id(rows), t.group(2))]) for i, t in rows]
    return resolved


def _width(opcode):
    """32-bit registers an access of ``opcode`` moves: 4 for .128, 2 for .64, else 1."""
    return 4 if ".128" in opcode else 2 if ".64" in opcode else 1


def _registers(ins):
    """(registers read, registers written) by an instruction, by the rule of the module's docstring."""
    ops = [o.strip() for o in ins.operands.split(",")]
    written = set()
    first = _REGISTER.fullmatch(ops[0].replace(".reuse", "")) if ops else None
    if first:
        n = int(first.group(1))
        written = set(range(n, n + (_width(ins.opcode) if ins.opcode.startswith(("LD", "ATOM")) else 1)))
        ops = ops[1:]
    read = set()
    for op in ops:
        for m in _REGISTER.finditer(op):
            n = int(m.group(1))
            wide = 2 if m.group(2) else _width(ins.opcode) if "[" not in op and ins.opcode.startswith("ST") else 1
            read |= set(range(n, n + wide))
    return read, written


def _is_stream_load(ins):
    return ins.opcode.startswith("LDG") and ".STRONG" not in ins.opcode


def loops(instructions):
    """The bodies of the innermost loops: the instructions from a backward branch's target to the branch, where
    no other backward branch lies between."""
    spans = [(ins.target, ins.address) for ins in instructions if 0 <= ins.target <= ins.address]
    inner = [s for s in spans if not any(s[0] <= o[0] and o[1] <= s[1] and o != s for o in spans)]
    return [[i for i in instructions if lo <= i.address <= hi] for lo, hi in inner]


def load_order(kernel, instructions):
    """The :class:`LoadOrder` of the innermost loop of ``instructions`` that loads the most bytes (None if no
    loop loads)."""
    def loaded(body):
        return sum(4 * _width(i.opcode) for i in body if _is_stream_load(i))

    bodies = [b for b in loops(instructions) if loaded(b)]
    if not bodies:
        return None
    body = max(bodies, key=loaded)
    pending, issued, issued_bytes = set(), 0, 0
    for ins in body:
        read, written = _registers(ins)
        if read & pending:
            break
        pending -= written
        if _is_stream_load(ins):
            pending |= written
            issued += 1
            issued_bytes += 4 * _width(ins.opcode)
    loads = [i for i in body if _is_stream_load(i)]
    return LoadOrder(kernel, (body[0].address, body[-1].address), len(loads), loaded(body), issued, issued_bytes)


def report(cubin):
    """{kernel: LoadOrder} of every kernel of a cubin that has a loading loop."""
    found = {name: load_order(name, ins) for name, ins in parse(disassemble(cubin)).items()}
    return {name: order for name, order in found.items() if order is not None}


class Fences(NamedTuple):
    ticket: int      # address of the ticket's atomic add
    release: bool    # a MEMBAR between the partial's last store (STG.E.STRONG) before it and the ticket
    acquire: bool    # a MEMBAR between the ticket and the next load of a partial (LDG.E.STRONG)


def fences(instructions):
    """The :class:`Fences` of every ticket (``ATOMG.E.ADD``) of a kernel, read in program order: the grid-level
    merge publishes a partial before its ticket and reads the others' only after a fence that follows it."""
    found = []
    for k, ins in enumerate(instructions):
        if not ins.opcode.startswith("ATOMG.E.ADD"):
            continue
        before = next((i for i in range(k - 1, -1, -1) if instructions[i].opcode.startswith("STG.E.STRONG")), None)
        after = next((i for i in range(k + 1, len(instructions)) if instructions[i].opcode.startswith("LDG.E.STRONG")),
                     len(instructions))
        found.append(Fences(ins.address,
                            before is not None and any(i.opcode.startswith("MEMBAR") for i in instructions[before:k]),
                            any(i.opcode.startswith("MEMBAR") for i in instructions[k + 1:after])))
    return found
