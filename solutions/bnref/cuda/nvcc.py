"""Static checks of the kernel sources with ``nvcc`` (no GPU needed): compile, and read ptxas' resource report.

    python -m bnref.cuda.nvcc [--arch sm_75 sm_80 sm_90] [--write]

prints one row per kernel and architecture: registers per thread, spill stores/loads, stack frame, static
shared memory, the resident blocks per SM that follow (:func:`bnref.cuda.plan.blocks_per_sm`), and, where
``nvdisasm`` or ``cuobjdump`` is there to read the machine code (:mod:`bnref.cuda.sass`), the bytes the hot
loop's step loads and how many of them it issues before it uses any. The string compiled is
:func:`bnref.cuda.kernel_source`, the one CuPy hands to NVRTC. ``--write`` also stores the rows in the module
``ptxas_report.py`` (:data:`REPORT`), from which the launch planner and the chapter page take the occupancy
and the bytes in flight on a machine without nvcc or a GPU (it needs the disassembler). Exits with 1 if a
kernel spills.
"""
import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from . import COMPILE_OPTIONS, KERNELS, kernel_source, plan, ptxas_report, sass

ARCHS = tuple(plan.SM_LIMITS)
REPORT = Path(ptxas_report.__file__).with_suffix(".py")
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_RELEASE = re.compile(r"release (\d+\.\d+)")


class Resources(NamedTuple):
    kernel: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int
    step_bytes: int = None        # bytes the hot loop loads per iteration (sass.LoadOrder), None unread
    bytes_before_use: int = None  # of those, the bytes issued before the first use of one

    @property
    def blocks_per_sm(self):
        """Resident blocks of 256 threads per SM that these registers and this shared memory allow."""
        return plan.blocks_per_sm(self.registers, self.smem, self.arch)


def nvcc_path():
    """The nvcc on PATH, or None."""
    return shutil.which("nvcc")


def nvcc_release():
    """The CUDA release of the nvcc on PATH, e.g. "13.0" (None without nvcc)."""
    if nvcc_path() is None:
        return None
    found = _RELEASE.search(subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True).stdout)
    return found.group(1) if found else None


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
        the list of :class:`Resources`, one per kernel, with the load order of its hot loop where a
        disassembler is there (:func:`bnref.cuda.sass.tool`).

    Raises:
        RuntimeError with nvcc's output when compilation fails.
    """
    workdir = Path(workdir)
    src, cubin = workdir / file, workdir / f"{Path(file).stem}.{arch}.cubin"
    src.write_text(kernel_source(file))
    cmd = [nvcc_path() or "nvcc", "-cubin", f"-arch={arch}", *COMPILE_OPTIONS, "-Xptxas", "-v", str(src), "-o",
           str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log}")
    rows = parse_ptxas(log)
    if sass.tool()[0] is None:
        return rows
    loads = sass.report(cubin)
    return [r._replace(step_bytes=loads[r.kernel].step_bytes, bytes_before_use=loads[r.kernel].bytes_before_use)
            if r.kernel in loads else r for r in rows]


def report(archs=ARCHS):
    """Every kernel of every file compiled for each of ``archs``: :class:`Resources` rows, file by file."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for file in KERNELS:
            for arch in archs:
                rows += sorted(compile_cubin(file, arch, tmp))
    return rows


def write_report(rows, path=REPORT):
    """Store ``rows`` as the module ``ptxas_report`` that :func:`bnref.cuda.plan.ptxas_table` reads."""
    body = "".join(f"    {tuple(r)!r},\n" for r in rows)
    Path(path).write_text(
        '"""ptxas\' resource report of the chapter-5 kernels, with the load order of their machine code, written by '
        '`python -m bnref.cuda.nvcc --write`: do not edit."""\n'
        f"NVCC = {nvcc_release()!r}\nOPTIONS = {(*COMPILE_OPTIONS, '-Xptxas', '-v')!r}\n"
        f"FIELDS = {Resources._fields!r}\nROWS = [\n{body}]\n")


def committed_rows():
    """The rows of the committed report, as :class:`Resources`, and the nvcc release that wrote them."""
    return [Resources(*row) for row in ptxas_report.ROWS], ptxas_report.NVCC


def format_table(rows):
    """A plain-text table of :class:`Resources` rows (loads: bytes issued before the first use / bytes of the
    hot loop's step, "-" where unread)."""
    head = (f"{'kernel':28s} {'arch':6s} {'regs':>4s} {'spill st':>8s} {'spill ld':>8s} {'stack':>5s} "
            f"{'smem B':>6s} {'blocks/SM':>9s} {'loads B':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        loads = "-" if r.step_bytes is None else f"{r.bytes_before_use}/{r.step_bytes}"
        lines.append(f"{r.kernel:28s} {r.arch:6s} {r.registers:4d} {r.spill_stores:8d} {r.spill_loads:8d} "
                     f"{r.stack:5d} {r.smem:6d} {r.blocks_per_sm:9d} {loads:>7s}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--write", action="store_true",
                        help=f"store the rows of every architecture in {REPORT.name} (--arch ignored)")
    args = parser.parse_args(argv)
    if nvcc_path() is None:
        print("nvcc is not on PATH: install the CUDA toolkit to compile the kernels without a GPU.")
        return 1
    if args.write and sass.tool()[0] is None:
        print("--write needs nvdisasm or cuobjdump on PATH (the report holds the load order of the machine code).")
        return 1
    rows = report(ARCHS if args.write else args.arch)
    print(format_table(rows))
    if args.write:
        write_report(rows)
        print(f"wrote {REPORT}")
    return 0 if all(r.spill_stores == r.spill_loads == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
