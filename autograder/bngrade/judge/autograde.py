"""nbgrader's autograde, split at the trust boundary: a sandboxed execute step, then a trusted judge.

``c.Autograde.autograde_preprocessors`` (see ``autograder/nbgrader_config.py``) runs, after nbgrader's own
sanitizing steps (which restore every test cell from the gradebook):

1. :class:`SandboxedExecute`: the notebook, with each hidden block replaced by a capture call, runs in a
   fresh :mod:`bngrade.sandbox`; the executed cells' outputs and the captured outcomes come back as data.
2. nbgrader's ``IgnorePattern`` (warnings and progress bars on stderr are not errors).
3. :class:`Judge`: each test cell's hidden block runs here, on the outcomes (:mod:`bngrade.judge.remote`); a failed
   verdict becomes the cell's error output, so that nbgrader's own ``SaveAutoGrades`` scores it 0 and the
   feedback shows the message. A cell also fails when the sandbox shows an error in it (a failure can only
   cost the student; a pass is never taken from the sandbox).

The sandboxed step is a pure function of the submission and the release files (:func:`execute`).
"""
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_output
from nbgrader.preprocessors import Execute, NbGraderPreprocessor

import bncapture
from bncapture import codec

from bngrade import sandbox
from bngrade.judge.hidden import grade_id, hidden_code, is_test_cell, sandboxed_source, student_names
from bngrade.judge.remote import Diverged, NoResult, Session, Unjudgeable, run_hidden
from bngrade.judge.scan import defined_sources, scan

CAPTURE_PACKAGE = Path(bncapture.__file__).parent
OUT_NAME = re.compile(r"^out/([A-Za-z0-9_.\-]{1,100})\.(json|npz)$")
MAX_TEXT = 20_000
EXTRA_ROUNDS = 2


def work_dir():
    """The trusted folder of this grading run (scripts, reports), set by ``bngrade grade``."""
    path = os.environ.get("BNGRADE_WORK")
    if not path:
        raise RuntimeError("this nbgrader configuration grades in a sandbox: run `python -m bngrade grade`, "
                           "which records the scripts and sets BNGRADE_WORK")
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


def _parse(blob, limits):
    """(executed notebook or None, status, {cell: (tree, arrays) or error text}) from the sandbox's zip.

    The output limit applies to what the zip holds once unpacked: over it, nothing is used.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
    except (zipfile.BadZipFile, ValueError):
        return None, {"ended": "error", "error": "the sandbox sent back no readable results"}, {}
    with zf:
        infos = {i.filename: i for i in zf.infolist()[:2100]}
        if sum(i.file_size for i in infos.values()) > limits.output:
            return None, {"ended": "killed", "error": f"sent back more than {limits.output / sandbox.MiB:g} MB of "
                                                      "output; nothing of it was used"}, {}

        def read(name, limit):
            info = infos.get(name)
            return zf.read(info) if info is not None and info.file_size <= limit else None

        try:
            status = json.loads(read("status.json", 100_000) or b'{"ended": "error", "error": "no status"}')
            status = {"ended": str(status.get("ended")), "error": str(status.get("error", ""))[:600]}
        except (ValueError, AttributeError):
            status = {"ended": "error", "error": "unreadable status"}
        try:
            text = read("notebook.ipynb", limits.output)
            executed = nbformat.reads(text.decode("utf-8"), as_version=4) if text else None
        except Exception:
            executed = None
        outcomes = {}
        for name in infos:
            match = OUT_NAME.match(name)
            if not match or match.group(2) != "json":
                continue
            cell = match.group(1)
            try:
                outcomes[cell] = codec.loads(read(name, codec.MAX_JSON_BYTES) or b"",
                                             read(f"out/{cell}.npz", codec.MAX_ARRAY_BYTES) or b"")
            except codec.Malformed as exc:
                outcomes[cell] = f"its results are malformed ({exc})"
    return executed, status, outcomes


def execute(nb, name, scripts, settings, limits, gpu=False, extra_ro=(), use_sandbox=True):
    """Run ``nb`` in a fresh sandbox: a pure function of the notebook, the scripts and the settings.

    Args:
        nb: the sanitized notebook (test cells as the instructor wrote them).
        scripts: {grade id: (tree, arrays)} of the cells' scripts.
        settings: keyword arguments of nbgrader's Execute (timeout, interrupt_on_timeout, error_on_timeout).

    Returns:
        (executed notebook or None, status, outcomes, limits exceeded).
    """
    copy = nbformat.from_dict(json.loads(json.dumps(nb)))
    for cell in copy.cells:
        if is_test_cell(cell) and hidden_code(cell):
            cell.source = sandboxed_source(cell)
    with tempfile.TemporaryDirectory(prefix="bngrade-in-") as tmp:
        folder = Path(tmp)
        nbformat.write(copy, folder / "notebook.ipynb")
        (folder / "settings.json").write_text(json.dumps({"name": name, "execute": settings}))
        (folder / "script").mkdir()
        for cell, (tree, arrays) in scripts.items():
            codec.save(folder / "script" / cell, tree, arrays)
        shutil.copytree(CAPTURE_PACKAGE, folder / "lib" / "bncapture", ignore=shutil.ignore_patterns("__pycache__"))
        os.chmod(folder, 0o755)
        if use_sandbox:
            outcome = sandbox.run(folder, limits, gpu=gpu, extra_ro=extra_ro)
        else:
            outcome = sandbox.run_unsandboxed(folder, limits, extra_ro=extra_ro)
    executed, status, outcomes = _parse(outcome.results, limits)
    if outcome.exceeded:
        status = {"ended": "killed", "error": "; ".join(outcome.exceeded)}
    return executed, status, outcomes, outcome.exceeded


def _load_scripts(folder):
    scripts = {}
    for path in sorted(Path(folder).glob("*.json")):
        scripts[path.stem] = codec.loads(path.read_text(), path.with_suffix(".npz").read_bytes(),
                                         max_array_bytes=1 << 40)
    return scripts


class SandboxedExecute(Execute):
    """nbgrader's Execute step, run in a sandbox (configured as ``c.Execute.*``, limits from ``bngrade grade``)."""

    def preprocess(self, nb, resources):
        work = work_dir()
        scripts = _load_scripts(work / "scripts")
        settings = {"timeout": self.timeout, "interrupt_on_timeout": self.interrupt_on_timeout,
                    "error_on_timeout": self.error_on_timeout, "extra_arguments": list(self.extra_arguments)}
        name = Path(resources.get("metadata", {}).get("name", "notebook")).name + ".ipynb"
        options = {"limits": limits_from_env(), "gpu": os.environ.get("BNGRADE_GPU") == "1",
                   "extra_ro": [p for p in os.environ.get("BNGRADE_SANDBOX_PYTHONPATH", "").split(os.pathsep) if p],
                   "use_sandbox": os.environ.get("BNGRADE_NO_SANDBOX") != "1"}
        trusted = nbformat.from_dict(json.loads(json.dumps(nb)))

        def run(cell_scripts):
            return execute(trusted, name, cell_scripts, settings, **options)

        executed, status, outcomes, exceeded = run(scripts)
        ran = _merge_outputs(nb, executed)
        resources["bngrade"] = {"scripts": scripts, "status": status, "outcomes": outcomes, "run": run, "ran": ran,
                                "sandboxed": options["use_sandbox"], "work": work}
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


def _missing_reason(cell, status):
    errors = [o for o in cell.outputs if o.output_type == "error"]
    if errors:
        return f"the cell stopped with {errors[0].ename}"
    if status.get("ended") != "ok":
        return status.get("error") or "the notebook did not finish"
    return "the notebook did not reach this test"


def _error(message):
    return new_output("error", ename="AssertionError", evalue=message, traceback=[f"AssertionError: {message}"])


class Judge(NbGraderPreprocessor):
    """Decide every test cell outside the sandbox, from the captured outcomes and the grader's own inputs."""

    def preprocess(self, nb, resources):
        info = resources["bngrade"]
        student = resources.get("nbgrader", {}).get("student", "student")
        answers = {grade_id(c): c.source for c in nb.cells
                   if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"}
        assignment = resources.get("nbgrader", {}).get("assignment", "")
        banned, flags = scan(assignment, answers)
        info = dict(info, sources=defined_sources(answers))
        problems = []
        status = info["status"]
        if status.get("ended") != "ok":
            problems.append(_status_problem(status))
        problems += [p for p in _limit_problems(nb, limits_from_env()) if p not in " ".join(problems)]
        pending = {}
        for cell in nb.cells:
            if not is_test_cell(cell):
                continue
            code, cell_id = hidden_code(cell), grade_id(cell)
            if not code:  # nothing to judge it by but the sandbox's own word: not trusted
                self._record(cell, "this test has no hidden check to judge it by; ask your instructor", False, flags)
                continue
            visible_ok = cell_id in info["ran"] and not any(o.output_type == "error" for o in cell.outputs)
            verdict, diverged = self._verdict(cell, code, cell_id, info, banned, flags)
            if diverged is not None:
                pending[cell_id] = (cell, code, visible_ok, diverged)
                continue
            self._record(cell, verdict, visible_ok, flags)
        for _ in range(EXTRA_ROUNDS):
            if not pending:
                break
            scripts = dict(info["scripts"])
            scripts.update({cid: ({"ops": d.ops}, d.arrays) for cid, (_, _, _, d) in pending.items()})
            _, status2, outcomes2, _ = info["run"](scripts)
            info = dict(info, scripts=scripts, outcomes={**info["outcomes"], **outcomes2}, status=status2)
            still = {}
            for cid, (cell, code, visible_ok, _) in pending.items():
                verdict, diverged = self._verdict(cell, code, cid, info, banned, flags)
                if diverged is not None:
                    still[cid] = (cell, code, visible_ok, diverged)
                else:
                    self._record(cell, verdict, visible_ok, flags)
            pending = still
        for cid, (cell, code, visible_ok, diverged) in pending.items():
            self._record(cell, f"{', '.join(student_names(code))} does not match the reference on the hidden tests",
                         visible_ok, flags)
        if not info["sandboxed"]:
            problems.append("graded WITHOUT a sandbox (--no-sandbox): the student's code ran with the grader's rights")
            flags.append(("*", "graded without a sandbox"))
        report = info["work"] / "reports" / f"{student}.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"problems": problems, "flags": flags, "sandboxed": info["sandboxed"]}))
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
    def _verdict(cell, code, cell_id, info, banned, flags):
        """(message or None when the cell passes, Diverged or None)."""
        names = student_names(code)
        for name in names:
            if name in banned:
                return banned[name], None
        if cell_id not in info["scripts"]:
            return "this test was not prepared by the grader (no script); ask your instructor", None
        outcome = info["outcomes"].get(cell_id)
        if isinstance(outcome, str):
            flags.append((cell_id, f"malformed results: {outcome}"))
            return f"no usable results came back from your notebook for this test: {outcome}", None
        if outcome is None:
            session = Session(script=info["scripts"][cell_id], outcomes=None,
                              missing=_missing_reason(cell, info["status"]))
        else:
            tree, arrays = outcome
            outcomes = tree.get("outcomes") if isinstance(tree, dict) else None
            if not isinstance(outcomes, list):
                flags.append((cell_id, "malformed results: no outcome list"))
                return "no usable results came back from your notebook for this test", None
            session = Session(script=info["scripts"][cell_id], outcomes=(outcomes, arrays),
                              missing=_missing_reason(cell, info["status"]))
        session.sources = info["sources"]
        try:
            run_hidden(code, session)
        except AssertionError as err:
            return str(err) or "a hidden test failed", None
        except Diverged as err:
            return None, err
        except NoResult as err:
            return f"no results came back from your notebook for this test: {err}", None
        except (Unjudgeable, codec.Malformed) as err:
            flags.append((cell_id, f"could not be judged: {type(err).__name__}: {str(err)[:200]}"))
            return f"the grader could not judge this test from your notebook's results ({type(err).__name__})", None
        except NotImplementedError:
            return f"{', '.join(student_names(code))}: not implemented yet", None
        except Exception as err:  # the student's own error, passed on by a check
            return f"{type(err).__name__}: {str(err)[:2000]}", None
        return None, None


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


def _status_problem(status):
    error = status.get("error", "")
    if status.get("ended") == "killed":
        return error
    if "DeadKernel" in error or "Kernel died" in error or "kernel died" in error.lower():
        return f"Kernel died in the sandbox ({error[:200]}); the tests after that point score 0"
    return f"the notebook did not finish in the sandbox ({error[:200]})"
