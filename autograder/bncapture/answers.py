"""Inside the sandbox, in a fresh interpreter: the graded functions, built from the answer cells alone, probed.

``python -m bncapture.answers INPUT WORK`` reads ``INPUT/notebook.ipynb`` (the submission as nbgrader sanitized
it: test and locked cells restored from the gradebook) and ``INPUT/plan.json``::

    {"cells": {grade id: [probe key, ...]}, "probe_seconds": s, "cell_seconds": s}

It runs, in order, every answer cell (nbgrader ``solution``) and the definitions of the instructor's locked
cells (imports, ``def``, ``class`` and assignments; not their experiments), one top-level statement at a time:
a statement that fails (``import torch`` where the grader has made torch unavailable) is reported and the rest
still runs. Cells without nbgrader metadata, which a student may add, are never run: a redefinition there does
not count. Then it runs each probe (:mod:`bncapture.probe`) within its time limit, and writes one zip to its
standard output: ``status.json`` and ``out/<cell>.json|.npz``, each ``{probe key: records}``. Nothing else leaves.
"""
import ast
import io
import json
import os
import re
import signal
import sys
import zipfile
from pathlib import Path

from . import codec
from .probe import Deadline, describe_error, run

#: statements of a locked (instructor) cell that define something; its loops, prints and trials are not run
DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
MAGIC = re.compile(r"(?m)^[ \t]*[!%].*$")


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


def build_namespace(cells, cell_seconds):
    """Run the answer cells and the locked cells' definitions; returns (namespace, {grade id: problem})."""
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
        for stmt in tree.body:
            if kind == "locked" and not isinstance(stmt, DEFINITIONS):
                continue
            code = compile(ast.Module(body=[stmt], type_ignores=[]), f"<cell {cell_id}>", "exec")
            try:
                with _Alarm(cell_seconds, f"cell {cell_id!r}"):
                    exec(code, namespace)
            except BaseException as exc:  # SystemExit and the time limit too: the next statement still runs
                if kind == "answer":
                    error = describe_error(exc)
                    problems.setdefault(cell_id, f"{error['type']}: {error['message'][:300]} (line {stmt.lineno})")
    return namespace, problems


def probe_cells(plan, namespace):
    """{grade id: (tree, arrays)} of every planned probe, each within ``plan["probe_seconds"]``."""
    results = {}
    for cell_id, keys in plan["cells"].items():
        tree, arrays = {}, {}
        for key in keys:
            try:
                with _Alarm(plan["probe_seconds"], f"the hidden test of {cell_id!r}"):
                    probe, error = run(key, namespace)
            except Deadline as exc:  # fired between two calls of the probe's own code
                probe, error = None, str(exc)
            if probe is None:
                tree[key] = {"records": {}, "names": [], "error": error}
                continue
            tree[key] = probe.tree(error)
            arrays.update({f"{key}/{name}": value for name, value in probe.arrays.items()})
        results[cell_id] = (tree, arrays)
    return results


def main(argv=None):
    source, work = (Path(a) for a in (argv or sys.argv[1:]))
    channel = os.fdopen(os.dup(1), "wb")   # the results pipe: student code never gets it
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.chdir(work)
    plan = json.loads((source / "plan.json").read_text())
    nb = json.loads((source / "notebook.ipynb").read_text())
    sys.argv = ["answers"]
    namespace, problems = build_namespace(nb.get("cells", []), plan["cell_seconds"])
    results = probe_cells(plan, namespace)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("status.json", json.dumps({"ended": "ok", "cells": problems}))
        for cell_id, (tree, arrays) in results.items():
            json_bytes, npz_bytes = codec.dumps(tree, arrays)
            zf.writestr(f"out/{cell_id}.json", json_bytes)
            zf.writestr(f"out/{cell_id}.npz", npz_bytes)
    channel.write(buffer.getvalue())
    channel.flush()


if __name__ == "__main__":
    main()
