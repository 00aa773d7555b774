"""The execution cache: a sandboxed step's result, kept under the hash of everything it read.

The key is the sha256 of the input bundle (:mod:`bngrade.sandbox.bundle`: both notebooks, the settings, the
plan and salt, the limits, and the environment fingerprint, which covers the capture helper, the packages, bwrap
and Python) and of how it runs (sandboxed or not, extra read-only paths). A verdict-only change (a tolerance, a
message, the points) leaves every key alone, so a regrade re-judges without re-executing anyone. Each entry
starts with the sha256 of its bytes: a corrupted entry is dropped and recomputed.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path


def key(bundle, use_sandbox=True, extra_ro=()):
    """The cache key of one run of ``bundle``."""
    how = json.dumps({"sandbox": bool(use_sandbox), "extra_ro": list(extra_ro)}).encode()
    return hashlib.sha256(hashlib.sha256(bundle).digest() + how).hexdigest()


class Cache:
    """Results by key in ``folder`` (the course's ``.bngrade/cache/``), one file each."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def _path(self, name):
        return self.folder / name[:2] / name

    def get(self, name):
        """The stored result, or None when absent or corrupted (a corrupted entry is removed)."""
        try:
            data = self._path(name).read_bytes()
        except OSError:
            return None
        digest, blob = data[:64], data[64:]
        if digest == hashlib.sha256(blob).hexdigest().encode():
            return blob
        self._path(name).unlink(missing_ok=True)
        return None

    def put(self, name, blob):
        """Store ``blob`` atomically (parallel graders may write the same key)."""
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(hashlib.sha256(blob).hexdigest().encode() + blob)
        os.replace(tmp, path)
