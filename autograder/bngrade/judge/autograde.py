"""nbgrader's autograde, split at the trust boundary: sandboxed execution, then a trusted judge.

``c.Autograde.autograde_preprocessors`` (see ``autograder/nbgrader_config.py``) runs, after nbgrader's own
sanitizing steps (which restore every test and locked cell from the gradebook):

1. :class:`SandboxedExecute`: two sandboxes at once, one run each, a pure function of the submission and the
   grader's files (:func:`execute`):

   * the **notebook** (:mod:`bncapture.notebook`): every cell in order, the hidden blocks removed, with nbgrader's
     own Execute; its outputs and the visible tests' errors come back for the feedback;
   * the **probes** (:mod:`bncapture.answers`): a fresh interpreter runs the answer cells alone, with the
     assignment's banned frameworks hidden (:mod:`bngrade.judge.frameworks`), then each test cell's public
     probes; their records come back as plain data.
2. nbgrader's ``IgnorePattern`` (warnings and progress bars on stderr are not errors).
3. :class:`Judge`: each check's trusted verdict (:mod:`bngrade.verdicts`) decides from the records and the
   grader's own inputs; a failed verdict becomes the cell's error output, so that nbgrader's own
   ``SaveAutoGrades`` scores it 0 and the feedback shows the message. A cell also fails when the notebook shows
   an error in it (a failure can only cost the student; a pass is never taken from the sandbox).

The judge's contract is in :mod:`bngrade` (``autograder/bngrade/__init__.py``).
"""
import io
import json
import os
import re
import resource
import zipfile
from contextlib import contextmanager
from pathlib import Path

import nbformat
from nbformat.v4 import new_output
from nbgrader.preprocessors import Execute, NbGraderPreprocessor

from bncapture import cases, codec

from bngrade import sandbox
from bngrade.pipeline import executors
from bngrade.sandbox import bundle
from bngrade.judge.check import judge, names_of
from bngrade.judge.hidden import (check_keys, grade_id, hidden_code, is_answer_cell, is_students, is_test_cell,
                                  without_hidden)
from bngrade.judge.scan import defined_sources, scan

OUT_NAME = re.compile(r"^out/([A-Za-z0-9_.\-]{1,100})\.json$")
MAX_TEXT = 20_000
#: memory the judging process may add while it decides one notebook (outside every sandbox)
JUDGE_MEMORY = 2 * sandbox.GiB


def work_dir():
    """The trusted folder of this grading run (reports), set by ``bngrade grade``."""
    path = os.environ.get("BNGRADE_WORK")
    if not path:
        raise RuntimeError("this nbgrader configuration grades in a sandbox: run `python -m bngrade grade`, "
                           "which sets BNGRADE_WORK")
    return Path(path)


def limits_from_env():
    return sandbox.Limits(**json.loads(os.environ.get("BNGRADE_LIMITS", "{}")))


def _clean_output(output, keep_rich):
    """A sandbox output reduced to plain, capped fields, or None to drop it."""
    kind = output.get("output_type")
    if kind == "stream" and output.get("name") in ("stdout", "stderr"):
        text = output.get("text", "")
        text = "".join(text) if isinstance(text, list) else str(text)
        return new_output("stream", name=output["name"], text=text[:MAX_TEXT])
    if kind == "error":
        ename, evalue = str(output.get("ename", "Error"))[:200], str(output.get("evalue", ""))[:MAX_TEXT]
        return new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])
    if kind in ("display_data", "execute_result") and keep_rich:
        data = output.get("data", {})
        kept = {k: data[k] for k in ("text/plain", "image/png") if isinstance(data.get(k), (str, list))}
        if kept:
            return new_output("display_data", data=kept)
    return None


def _open(blob, limits):
    """(zipfile, {name: info}) of a sandbox's results, or (None, status) when they are unusable."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
    except (zipfile.BadZipFile, ValueError):
        return None, {"ended": "error", "error": "the sandbox sent back no readable results", "cells": {}}
    infos = {i.filename: i for i in zf.infolist()[:2100]}
    if sum(i.file_size for i in infos.values()) > limits.output:
        return None, {"ended": "killed", "error": f"sent back more than {limits.output / sandbox.MiB:g} MB of "
                                                  "output; nothing of it was used", "cells": {}}
    return zf, infos


def _read(zf, infos, name, limit):
    info = infos.get(name)
    return zf.read(info) if info is not None and info.file_size <= limit else None


def _status(zf, infos):
    try:
        status = json.loads(_read(zf, infos, "status.json", 1_000_000) or b'{"ended": "error", "error": "no status"}')
        cells = status.get("cells") if isinstance(status.get("cells"), dict) else {}
        return {"ended": str(status.get("ended")), "error": str(status.get("error", ""))[:600],
                "cells": {str(k)[:100]: str(v)[:400] for k, v in list(cells.items())[:100]}}
    except (ValueError, AttributeError):
        return {"ended": "error", "error": "unreadable status", "cells": {}}


def parse_notebook(blob, limits):
    """(executed notebook or None, status) from the notebook sandbox's zip."""
    zf, infos = _open(blob, limits)
    if zf is None:
        return None, infos
    with zf:
        status = _status(zf, infos)
        try:
            text = _read(zf, infos, "notebook.ipynb", limits.output)
            executed = nbformat.reads(text.decode("utf-8"), as_version=4) if text else None
        except Exception:
            executed = None
    return executed, status


def parse_probes(blob, limits):
    """(status, {cell: (tree, LazyArrays) or error text}) from the probe sandbox's zip; arrays stay unread (the
    zip stays open for them)."""
    zf, infos = _open(blob, limits)
    if zf is None:
        return infos, {}
    status = _status(zf, infos)
    records = {}
    for name in infos:
        match = OUT_NAME.match(name)
        if not match:
            continue
        cell = match.group(1)
        prefix = f"out/{cell}/"
        members = {n[len(prefix):-4]: i for n, i in infos.items() if n.startswith(prefix) and n.endswith(".npy")}
        try:
            tree, _ = codec.loads(_read(zf, infos, name, codec.MAX_JSON_BYTES) or b"", b"")
            records[cell] = (tree, codec.LazyArrays(zf, members))
        except codec.Malformed as exc:
            records[cell] = f"its results are malformed ({exc})"
    return status, records


def salt_from_env():
    """The grading run's secret input salt (``BNGRADE_SALT``, set by ``bngrade grade``), or None."""
    value = os.environ.get("BNGRADE_SALT")
    return int(value) if value else None


@contextmanager
def salted(salt):
    """The public input builders draw with ``salt`` (:data:`bncapture.cases.SALT`) inside this block."""
    before, cases.SALT = cases.SALT, salt
    try:
        yield
    finally:
        cases.SALT = before


def _without_points(nb):
    """A copy of ``nb`` without the cells' points, which no sandbox reads: a change of points changes no
    execution cache key."""
    copy = nbformat.from_dict(json.loads(json.dumps(nb)))
    for cell in copy.cells:
        cell.metadata.get("nbgrader", {}).pop("points", None)
    return copy


def execute(nb, name, assignment, settings, limits, gpu=False, salt=None, executor=None):
    """Run the notebook and the probes of ``nb`` in two fresh sandboxes at once (one run each), through
    ``executor`` (:mod:`bngrade.pipeline.executors`; default: here, sandboxed).

    Args:
        nb: the sanitized notebook (test cells as the instructor wrote them).
        settings: keyword arguments of nbgrader's Execute (timeout, interrupt_on_timeout, error_on_timeout).
        salt: the grading run's secret input salt, sent to the probes (the judge draws with the same one).

    Returns:
        (executed notebook or None, notebook status, probe status, {cell: records}, limits exceeded).
    """
    source = _without_points(nb)
    notebook = _without_points(nb)
    plan = {}
    for cell in notebook.cells:
        if is_test_cell(cell) and hidden_code(cell):
            plan[grade_id(cell)] = check_keys(cell)
            cell.source = without_hidden(cell)
    cell_seconds = float(settings.get("timeout") or 120)
    probe_plan = {"cells": plan, "probe_seconds": cell_seconds, "cell_seconds": cell_seconds, "isolate": not gpu,
                  "salt": salt}
    blob = bundle.make_bundle(nbformat.writes(notebook), nbformat.writes(source), settings, probe_plan, limits, name,
                              assignment, gpu)
    ran, probed, ran_exceeded, probed_exceeded, _ = bundle.read_result((executor or executors.Local())(blob, gpu))
    executed, status = parse_notebook(ran, limits)
    probe_status, records = parse_probes(probed, limits)
    exceeded = list(dict.fromkeys(ran_exceeded + probed_exceeded))
    if ran_exceeded:
        status = {"ended": "killed", "error": "; ".join(ran_exceeded), "cells": {}}
    if probed_exceeded:
        probe_status = {"ended": "killed", "error": "; ".join(probed_exceeded), "cells": {}}
    return executed, status, probe_status, records, exceeded


class SandboxedExecute(Execute):
    """nbgrader's Execute step, run in a sandbox (configured as ``c.Execute.*``, limits from ``bngrade grade``)."""

    def preprocess(self, nb, resources):
        work = work_dir()
        settings = {"timeout": self.timeout, "interrupt_on_timeout": self.interrupt_on_timeout,
                    "error_on_timeout": self.error_on_timeout, "extra_arguments": list(self.extra_arguments)}
        name = Path(resources.get("metadata", {}).get("name", "notebook")).name + ".ipynb"
        assignment = resources.get("nbgrader", {}).get("assignment", "")
        executor = executors.from_env()
        executed, status, probe_status, records, _ = execute(nb, name, assignment, settings, limits_from_env(),
                                                             os.environ.get("BNGRADE_GPU") == "1",
                                                             salt_from_env(), executor)
        ran = _merge_outputs(nb, executed)
        resources["bngrade"] = {"status": status, "probe_status": probe_status, "records": records, "ran": ran,
                                "sandboxed": executor.use_sandbox,
                                "cached": getattr(executor, "hit", False), "work": work}
        return nb, resources


def _merge_outputs(nb, executed):
    """Copy the executed cells' outputs (cleaned) into the trusted notebook, cell by cell.

    Returns:
        the grade ids of the test cells that the sandbox says it ran.
    """
    same = executed is not None and len(executed.cells) == len(nb.cells)
    ran = set()
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        outputs = executed.cells[index].get("outputs", []) if same and executed.cells[index].cell_type == "code" \
            else []
        keep_rich = not is_test_cell(cell)
        cell.outputs = [o for o in (_clean_output(out, keep_rich) for out in outputs[:200]) if o is not None]
        if same and executed.cells[index].get("execution_count") is not None:
            ran.add(grade_id(cell))
        cell.execution_count = None
    return ran


def _error(message):
    return new_output("error", ename="AssertionError", evalue=message, traceback=[f"AssertionError: {message}"])


@contextmanager
def memory_limit(extra):
    """Cap this process's address space at its current size plus ``extra`` bytes while judging: an outsized
    result is refused unread, and what is read cannot grow the grader's memory past this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        size = int(fh.read().split()[0]) * resource.getpagesize()
    cap = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _probe_problem(status):
    if status.get("ended") == "ok":
        return None
    return status.get("error") or "the run of your answer cells for grading did not finish"


class Judge(NbGraderPreprocessor):
    """Decide every test cell outside the sandbox, from the probes' records and the grader's own inputs."""

    def preprocess(self, nb, resources):
        info = resources["bngrade"]
        student = resources.get("nbgrader", {}).get("student", "student")
        assignment = resources.get("nbgrader", {}).get("assignment", "")
        answers = {grade_id(c): c.source for c in nb.cells if is_answer_cell(c)}
        added = {f"cell {i + 1} (added)": c.source for i, c in enumerate(nb.cells)
                 if is_students(c) and not is_answer_cell(c)}
        banned, flags = scan(assignment, answers, added)
        sources = defined_sources(answers)
        problems = []
        status = info["status"]
        if status.get("ended") != "ok":
            problems.append(_status_problem(status))
        stopped = _probe_problem(info["probe_status"])
        if stopped and stopped not in problems:
            problems.append(stopped if info["probe_status"].get("ended") == "killed"
                            else f"the grader's run of your answer cells failed ({stopped[:200]})")
        problems += [p for p in _limit_problems(nb, limits_from_env()) if p not in " ".join(problems)]
        notes = "; ".join(f"cell {cell!r} stopped at {what}" for cell, what in info["probe_status"]["cells"].items()
                          if cell in {grade_id(c) for c in nb.cells if is_answer_cell(c)})
        with memory_limit(JUDGE_MEMORY), salted(salt_from_env()):
            for cell in nb.cells:
                if not is_test_cell(cell):
                    continue
                keys, cell_id = check_keys(cell), grade_id(cell)
                if not keys:  # nothing to judge it by but the sandbox's own word: not trusted
                    self._record(cell, "this test has no hidden check to judge it by; ask your instructor", False,
                                 flags)
                    continue
                visible_ok = cell_id in info["ran"] and not any(o.output_type == "error" for o in cell.outputs)
                verdict = self._verdict(keys, info["records"].get(cell_id), banned, sources, stopped, cell_id, flags)
                if verdict is not None and notes:
                    verdict += f" (when your answer cells were run for grading, {notes[:600]})"
                if verdict is None and cell_id not in info["ran"]:  # its visible tests never ran: no pass
                    verdict = f"your notebook did not reach this test ({_missing(status)})"
                self._record(cell, verdict, visible_ok, flags)
        if not info["sandboxed"]:
            problems.append("graded WITHOUT a sandbox (--no-sandbox): the student's code ran with the grader's rights")
            flags.append(("*", "graded without a sandbox"))
        report = info["work"] / "reports" / f"{student}.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"problems": problems, "flags": flags, "sandboxed": info["sandboxed"],
                                      "cached": info["cached"]}))
        return nb, resources

    @staticmethod
    def _record(cell, verdict, visible_ok, flags):
        """Write a cell's verdict as its outputs: an error output when it failed."""
        if verdict is None:
            return
        cell.outputs = [_error(verdict)] + list(cell.outputs)
        if visible_ok:
            flags.append((grade_id(cell), "discrepancy: the notebook's own tests passed, the hidden verdict failed"))

    @staticmethod
    def _verdict(keys, records, banned, sources, stopped, cell_id, flags):
        """The message of the first check of a cell that fails, or None when they all pass."""
        for key in keys:
            for name in names_of(key):
                if name in banned:
                    return banned[name]
        if isinstance(records, str):
            flags.append((cell_id, f"malformed results: {records}"))
            return f"no usable results came back from your notebook for this test: {records}"
        if records is None:
            return f"no results came back for this test: {stopped or 'the grader could not run your answer cells'}"
        tree, arrays = records
        for key in keys:
            try:
                judge(key, tree.get(key) if isinstance(tree, dict) else None, arrays, f"{key}/", sources)
            except AssertionError as err:
                return str(err)[:3000] or "a hidden test failed"
            except MemoryError:
                flags.append((cell_id, "its results needed more memory than the judge allows"))
                return "the grader could not judge this test: your results were too large"
            except codec.Malformed as err:
                flags.append((cell_id, f"malformed results: {str(err)[:200]}"))
                return f"no usable results came back from your notebook for this test ({str(err)[:200]})"
            except Exception as err:  # a verdict that odd records break costs this cell, never the notebook
                flags.append((cell_id, f"could not be judged: {type(err).__name__}: {str(err)[:200]}"))
                return (f"the grader could not judge this test from your notebook's results ({type(err).__name__}); "
                        "your instructor has been told")
        return None


def _limit_problems(nb, limits):
    """Limits that the notebook's own errors show it ran into, in words."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type != "error":
                continue
            text = f"{output.ename}: {output.evalue}"
            if output.ename == "MemoryError" or "Cannot allocate memory" in text:
                found.append(f"used more than {limits.memory / sandbox.GiB:g} GB of memory")
            elif "No space left on device" in text:
                found.append(f"wrote more than its disk limit ({limits.disk / sandbox.MiB:g} MB in its folder, "
                             f"{limits.tmp / sandbox.MiB:g} MB in /tmp)")
            elif "Resource temporarily unavailable" in text and "fork" in text.lower():
                found.append(f"started more than {limits.processes} processes")
    return list(dict.fromkeys(found))


def _missing(status):
    if status.get("ended") != "ok":
        return status.get("error", "")[:200] or "the notebook did not finish"
    return "it was not run"


def _status_problem(status):
    error = status.get("error", "")
    if status.get("ended") == "killed":
        return error
    if "DeadKernel" in error or "Kernel died" in error or "kernel died" in error.lower():
        return f"Kernel died in the sandbox ({error[:200]}); the tests after that point score 0"
    return f"the notebook did not finish in the sandbox ({error[:200]})"
