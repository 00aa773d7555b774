"""Static checks of the kernel sources with ``nvcc`` (no GPU needed): compile, and read ptxas' resource report.

    python -m bnref.cuda.nvcc [--arch sm_80 sm_90]

prints one row per kernel and architecture: registers per thread, spill
stores/loads, stack frame and static shared memory. The string compiled is
:func:`bnref.cuda.kernel_source`, the one CuPy hands to NVRTC.
"""
import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from . import COMPILE_OPTIONS, KERNELS, kernel_source

ARCHS = ("sm_80", "sm_90")
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


class Resources(NamedTuple):
    kernel: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int


def nvcc_path():
    """The nvcc on PATH, or None."""
    return shutil.which("nvcc")


def parse_ptxas(log):
    """The :class:`Resources` of every entry function in a ``-Xptxas -v`` log."""
    found = []
    blocks = _ENTRY.split(log)
    # split gives [before, name1, arch1, text1, name2, arch2, text2, ...]
    for name, arch, text in zip(blocks[1::3], blocks[2::3], blocks[3::3]):
        frame, used = _FRAME.search(text), _USED.search(text)
        if not (frame and used):
            raise ValueError(f"unexpected ptxas report for {name}:\n{text}")
        found.append(Resources(name, arch, int(used.group(1)), int(frame.group(2)), int(frame.group(3)),
                               int(frame.group(1)), int(used.group(2) or 0)))
    return found


def compile_cubin(file, arch, workdir):
    """Compile kernel file ``file`` (a key of ``KERNELS``) to a cubin for ``arch`` in ``workdir``.

    Returns:
        the list of :class:`Resources`, one per kernel.

    Raises:
        RuntimeError with nvcc's output when compilation fails.
    """
    workdir = Path(workdir)
    src = workdir / file
    src.write_text(kernel_source(file))
    cmd = [nvcc_path() or "nvcc", "-cubin", f"-arch={arch}", *COMPILE_OPTIONS, "-Xptxas", "-v",
           str(src), "-o", str(src.with_suffix(f".{arch}.cubin"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log}")
    return parse_ptxas(log)


def format_table(rows):
    """A plain-text table of :class:`Resources` rows."""
    head = f"{'kernel':26s} {'arch':6s} {'regs':>4s} {'spill st':>8s} {'spill ld':>8s} {'stack':>5s} {'smem B':>6s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.kernel:26s} {r.arch:6s} {r.registers:4d} {r.spill_stores:8d} {r.spill_loads:8d} "
                     f"{r.stack:5d} {r.smem:6d}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS))
    args = parser.parse_args(argv)
    if nvcc_path() is None:
        print("nvcc is not on PATH: install the CUDA toolkit to compile the kernels without a GPU.")
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for file in KERNELS:
            for arch in args.arch:
                rows += sorted(compile_cubin(file, arch, tmp))
    print(format_table(rows))
    return 0 if all(r.spill_stores == r.spill_loads == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
