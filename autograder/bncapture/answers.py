"""Inside the sandbox, in a fresh interpreter: the graded functions, built from the answer cells alone, probed.

``python -m bncapture.answers INPUT WORK`` reads ``INPUT/notebook.ipynb`` (the submission as nbgrader sanitized
it: test and locked cells restored from the gradebook) and ``INPUT/plan.json``::

    {"cells": {grade id: [probe key, ...]}, "probe_seconds": s, "cell_seconds": s, "isolate": bool, "salt": int}

It runs, in order, every answer cell (nbgrader ``solution``) and the definitions of the instructor's locked
cells (imports, ``def``, ``class`` and assignments; not their experiments), one top-level statement at a time:
a statement that fails (``import torch`` where the grader has made torch unavailable) is reported and the rest
still runs. Cells without nbgrader metadata, which a student may add, are never run: a redefinition there does
not count. Then it runs each probe (:mod:`bncapture.probe`) within its time limit, and writes one zip to its
standard output: ``status.json``, and for each test cell ``out/<cell>.json`` (``{probe key: records}``) and its
arrays as ``out/<cell>/<key>.npy`` members, which the judge reads one at a time. Nothing else leaves.

With ``isolate`` (every assignment but the GPU one, whose CUDA context does not survive a fork), each answer
cell is tried, and each probe runs, in a forked child: a crash, or a hang that ignores the time limit, costs that
cell or that check alone.
"""
import ast
import io
import json
import os
import re
import select
import signal
import sys
import time
import zipfile
from pathlib import Path

from . import cases, codec
from .probe import Deadline, describe_error, run

#: statements of a locked (instructor) cell that define something; its loops, prints and trials are not run
DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
MAGIC = re.compile(r"(?m)^[ \t]*[!%].*$")
END = b"\x00bncapture: complete"   # what a forked child writes last, so that an early exit(0) is a crash too


def _kind(cell):
    meta = cell.get("metadata", {}).get("nbgrader", {})
    if cell.get("cell_type") != "code" or not meta:
        return None
    if meta.get("solution"):
        return "answer"
    return None if meta.get("grade") else "locked"


def _source(cell):
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


class _Alarm:
    """``with _Alarm(seconds, what):`` raises :class:`Deadline` in this thread after ``seconds``."""

    def __init__(self, seconds, what):
        self.seconds, self.what = seconds, what

    def _fire(self, *_):
        raise Deadline(f"{self.what} ran past the grader's time limit ({self.seconds:g} s) and was stopped")

    def __enter__(self):
        signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)


def _forked(work, seconds):
    """Run ``work()`` (which returns bytes) in a forked child within ``seconds``: (bytes or None, why not).

    A child that crashes (``os._exit``, a segfault), hangs in C code or swallows the time limit costs only this
    piece of work: the parent goes on with the next.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        code = 1
        try:
            data = work()
            with os.fdopen(write, "wb") as out:
                out.write(data + END)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    chunks, deadline = [], time.monotonic() + seconds
    with os.fdopen(read, "rb", buffering=0) as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None, f"ran past the grader's time limit ({seconds:g} s) and was stopped"
            chunk = pipe.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if status != 0 or not data.endswith(END):
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit code {os.WEXITSTATUS(status)}"
        return None, f"crashed the Python process ({how})"
    return data[:-len(END)], None


def _exec_cell(kind, cell_id, tree, namespace, seconds):
    """Run a cell's statements one at a time; returns the first failure of an answer cell, in words, or None."""
    problem = None
    for stmt in tree.body:
        if kind == "locked" and not isinstance(stmt, DEFINITIONS):
            continue
        code = compile(ast.Module(body=[stmt], type_ignores=[]), f"<cell {cell_id}>", "exec")
        try:
            with _Alarm(seconds, f"cell {cell_id!r}"):
                exec(code, namespace)
        except BaseException as exc:  # SystemExit and the time limit too: the next statement still runs
            if kind == "answer" and problem is None:
                error = describe_error(exc)
                problem = f"{error['type']}: {error['message'][:300]} (line {stmt.lineno})"
    return problem


def build_namespace(cells, cell_seconds, isolate):
    """Run the answer cells and the locked cells' definitions; returns (namespace, {grade id: problem}).

    With ``isolate``, each answer cell is first tried in a forked child: one that crashes the process is
    skipped (and reported), so the cells before and after it still count.
    """
    namespace = {"__name__": "__main__"}
    problems = {}
    for cell in cells:
        kind = _kind(cell)
        if kind is None:
            continue
        cell_id = cell["metadata"]["nbgrader"].get("grade_id", "?")
        try:
            tree = ast.parse(MAGIC.sub("", _source(cell)))
        except SyntaxError as exc:
            problems[cell_id] = f"SyntaxError: {exc.msg} (line {exc.lineno})"
            continue
        if kind == "answer" and isolate:
            _, crashed = _forked(lambda: (_exec_cell(kind, cell_id, tree, namespace, cell_seconds), b"")[1],
                                 cell_seconds * max(1, len(tree.body)))
            if crashed:
                problems[cell_id] = f"the cell {crashed}; it was skipped"
                continue
        problem = _exec_cell(kind, cell_id, tree, namespace, cell_seconds)
        if problem:
            problems[cell_id] = problem
    return namespace, problems


def probe_cells(plan, namespace):
    """{grade id: (tree, arrays)} of every planned probe, each within ``plan["probe_seconds"]`` (in a forked
    child with ``isolate``, so that a crash or a hang costs that check alone)."""
    results, isolate = {}, plan.get("isolate", True)
    for cell_id, keys in plan["cells"].items():
        tree, arrays = {}, {}
        for key in keys:
            found, error = _run_probe(key, namespace, plan["probe_seconds"], isolate)
            if found is None:
                tree[key] = {"records": {}, "names": [], "error": f"the hidden test of {cell_id!r} {error}"}
                continue
            tree[key], probe_arrays = found
            arrays.update({f"{key}/{name}": value for name, value in probe_arrays.items()})
        results[cell_id] = (tree, arrays)
    return results


def _run_probe(key, namespace, seconds, isolate):
    """((records tree, arrays) or None, why not) of one probe."""
    if not isolate:
        try:
            with _Alarm(seconds, "it"):
                probe, error = run(key, namespace)
        except Deadline as exc:  # fired between two calls of the probe's own code
            return None, str(exc)
        return (probe.tree(error), probe.arrays), None

    def work():
        probe, error = run(key, namespace)
        text, blob = codec.dumps(probe.tree(error), probe.arrays)
        return len(text).to_bytes(8, "little") + text + blob

    data, why = _forked(work, seconds)
    if data is None:
        return None, why
    size = int.from_bytes(data[:8], "little")
    return codec.loads(data[8:8 + size].decode(), data[8 + size:]), None


def main(argv=None):
    source, work = (Path(a) for a in (argv or sys.argv[1:]))
    channel = os.fdopen(os.dup(1), "wb")   # the results pipe: student code never gets it
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.chdir(work)
    plan = json.loads((source / "plan.json").read_text())
    cases.SALT = plan.get("salt")
    nb = json.loads((source / "notebook.ipynb").read_text())
    sys.argv = ["answers"]
    isolate = plan.get("isolate", True)
    namespace, problems = build_namespace(nb.get("cells", []), plan["cell_seconds"], isolate)
    results = probe_cells(plan, namespace)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("status.json", json.dumps({"ended": "ok", "cells": problems}))
        for cell_id, (tree, arrays) in results.items():
            zf.writestr(f"out/{cell_id}.json", json.dumps(tree))
            codec.write_arrays(zf, f"out/{cell_id}/", arrays)
    channel.write(buffer.getvalue())
    channel.flush()


if __name__ == "__main__":
    main()
