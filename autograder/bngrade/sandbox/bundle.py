"""The sandboxed step as a pure function of bytes: an input bundle in, a result zip out.

A bundle (:func:`make_bundle`) holds everything the two sandboxes of one student read but the capture helper:
the notebook with its hidden blocks removed, the sanitized notebook for the probes, nbgrader's Execute
settings, the probe plan (with the salt), the limits, the assignment's name, the GPU flag and the environment
fingerprint of the grader. :func:`run_bundle` runs it with this machine's own copy of :mod:`bncapture`, after
checking that this machine's fingerprint is the grader's. Its result (:func:`read_result`) is a zip of the two
sandboxes' result zips, the limits each went past and the seconds they took. Only bytes cross: a remote worker
never unpickles student data, and the grader never unpickles anything the sandbox wrote.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import asdict
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import bncapture

from bngrade.sandbox.bwrap import Limits, bwrap, run, run_unsandboxed

CAPTURE_PACKAGE = Path(bncapture.__file__).parent
_EPOCH = (1980, 1, 1, 0, 0, 0)


class EnvironmentMismatchError(RuntimeError):
    """A machine whose environment differs from the grader's: its results would not be the grader's."""


def _zip(members):
    """Deterministic zip bytes of {name: bytes} (fixed dates, sorted names): equal inputs, equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(members):
            zf.writestr(zipfile.ZipInfo(name, _EPOCH), members[name])
    return buffer.getvalue()


def _unzip(blob):
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _dumps(value):
    return json.dumps(value, sort_keys=True).encode()


def capture_files():
    """{relative path: bytes} of this machine's capture helper (what each sandbox imports as ``bncapture``)."""
    return {str(p.relative_to(CAPTURE_PACKAGE)): p.read_bytes() for p in sorted(CAPTURE_PACKAGE.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@lru_cache(maxsize=1)
def fingerprint():
    """{part: sha256} of what this machine's sandboxes depend on besides the bundle: the capture helper, the
    packages installed in this Python's environment and their versions, bwrap's version, the Python version."""
    where = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    packages = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions(path=where)})
    tool = bwrap()
    version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout if tool else "none"
    parts = {"capture helper": _dumps({k: hashlib.sha256(v).hexdigest() for k, v in capture_files().items()}),
             "packages": "\n".join(packages).encode(), "bwrap": version.encode(), "python": sys.version.encode()}
    return {name: hashlib.sha256(value).hexdigest() for name, value in parts.items()}


def make_bundle(notebook, source, settings, plan, limits, name, assignment, gpu):
    """The input bundle (bytes) of one student.

    Args:
        notebook: the notebook the notebook sandbox runs (hidden blocks removed), as ipynb text.
        source: the sanitized notebook the probes read, as ipynb text.
        settings: nbgrader's Execute settings; plan: the probe plan (cells, seconds, salt).
    """
    job = {"name": name, "assignment": assignment, "gpu": bool(gpu), "limits": asdict(limits),
           "fingerprint": fingerprint()}
    return _zip({"notebook.ipynb": notebook.encode(), "source.ipynb": source.encode(),
                 "settings.json": _dumps({"name": name, "execute": settings}), "plan.json": _dumps(plan),
                 "job.json": _dumps(job)})


def check_fingerprint(expected):
    """Raise :class:`EnvironmentMismatchError`, naming the parts that differ, unless this machine matches."""
    mine = fingerprint()
    differ = sorted(k for k in set(mine) | set(expected) if mine.get(k) != expected.get(k))
    if differ:
        raise EnvironmentMismatchError(
            f"refused: this worker's environment differs from the grader's ({', '.join(differ)}); install the "
            "course's requirements.txt and the same autograder/bncapture on every worker")


def run_bundle(blob, use_sandbox=True, extra_ro=()):
    """Run one bundle's two sandboxes at once; returns the result zip (bytes). A pure function of the bundle
    and this machine's environment, which must match the bundle's fingerprint."""
    from concurrent.futures import ThreadPoolExecutor

    from bngrade.judge.frameworks import unavailable_paths

    files = _unzip(blob)
    job = json.loads(files["job.json"])
    check_fingerprint(job["fingerprint"])
    limits = Limits(**job["limits"])

    def stage(module, notebook, extra, hide=()):
        with tempfile.TemporaryDirectory(prefix="bngrade-in-") as tmp:
            folder = Path(tmp)
            (folder / "notebook.ipynb").write_bytes(files[notebook])
            (folder / extra).write_bytes(files[extra])
            lib = folder / "lib" / "bncapture"
            for rel, content in capture_files().items():
                (lib / rel).parent.mkdir(parents=True, exist_ok=True)
                (lib / rel).write_bytes(content)
            os.chmod(folder, 0o755)
            if use_sandbox:
                return run(folder, limits, gpu=job["gpu"], extra_ro=extra_ro, module=module, hide=hide)
            return run_unsandboxed(folder, limits, extra_ro=extra_ro, module=module)

    with ThreadPoolExecutor(2) as pool:
        ran = pool.submit(stage, "bncapture.notebook", "notebook.ipynb", "settings.json")
        probed = pool.submit(stage, "bncapture.answers", "source.ipynb", "plan.json",
                             unavailable_paths(job["assignment"]))
        ran, probed = ran.result(), probed.result()
    meta = {"notebook_exceeded": ran.exceeded, "probes_exceeded": probed.exceeded,
            "seconds": max(ran.seconds, probed.seconds)}
    return _zip({"notebook.zip": ran.results, "probes.zip": probed.results, "result.json": _dumps(meta)})


def worker_task(blob):
    """:func:`run_bundle` as a cluster task: sandboxed, extra read-only paths from the worker's own
    ``BNGRADE_SANDBOX_PYTHONPATH``. Takes and returns bytes only."""
    extra = [p for p in os.environ.get("BNGRADE_SANDBOX_PYTHONPATH", "").split(os.pathsep) if p]
    return run_bundle(blob, True, extra)


def read_result(blob):
    """(notebook zip, probe zip, notebook's limits exceeded, probes' limits exceeded, seconds) of a result."""
    files = _unzip(blob)
    meta = json.loads(files["result.json"])
    return (files["notebook.zip"], files["probes.zip"], list(meta["notebook_exceeded"]),
            list(meta["probes_exceeded"]), float(meta["seconds"]))
