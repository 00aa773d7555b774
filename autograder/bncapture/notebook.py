"""Inside the sandbox: execute one notebook with nbgrader's own Execute preprocessor, send back the results.

``python -m bncapture.notebook INPUT WORK`` copies ``INPUT/notebook.ipynb`` (its test cells without their hidden
blocks: those are probed apart, by :mod:`bncapture.answers`) into ``WORK``, runs every cell (``INPUT/settings.json``
holds the Execute settings: per-cell timeout, interrupt on timeout, the timeout error), and writes one zip to its
standard output: the executed notebook and ``status.json`` (how the run ended). Nothing else leaves the sandbox.
"""
import io
import json
import os
import shutil
import sys
import traceback
import zipfile
from pathlib import Path


def main(argv=None):
    source, work = (Path(a) for a in (argv or sys.argv[1:]))
    channel = os.fdopen(os.dup(1), "wb")          # the results pipe; the notebook's kernel never gets it
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    settings = json.loads((source / "settings.json").read_text())
    notebook_path = work / settings["name"]
    shutil.copyfile(source / "notebook.ipynb", notebook_path)

    import nbformat
    from nbgrader.preprocessors import Execute

    nb = nbformat.read(notebook_path, as_version=4)
    status = {"ended": "ok"}
    try:
        Execute(**settings["execute"]).preprocess(nb, {"metadata": {"path": str(work)}})
    except Exception as exc:  # a dead kernel, or nbclient giving up: report it, keep the cells run so far
        status = {"ended": "error", "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                  "trace": traceback.format_exc()[-2000:]}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("notebook.ipynb", nbformat.writes(nb))
        zf.writestr("status.json", json.dumps(status))
    channel.write(buffer.getvalue())
    channel.flush()


if __name__ == "__main__":
    main()
