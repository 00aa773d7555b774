"""Progress bars for training loops that stay quiet where nobody watches them.

The book build, the test suite and the autograder run code without anybody
watching; a progress bar there is only noise on stderr. :func:`progress`
shows a bar

* when the environment variable ``BNREF_PROGRESS`` is set to ``1``
  (``0`` always hides it, whatever follows);
* in a terminal, i.e. when stderr is a TTY;
* in a Jupyter kernel (JupyterLab, Notebook, VS Code, Colab), whose stderr is
  not a TTY, when the cell being run comes from a frontend that accepts input.
  Batch executors (nbclient, hence ``jupyter-book build``, ``jupytext
  --execute``, nbconvert, papermill) send their cells with ``allow_stdin``
  false, so the same notebook executed by the book build shows no bar.

A shown bar is a ``tqdm.auto`` bar: a widget in Jupyter, text in a terminal.
"""
import os
import sys

ENV_VAR = "BNREF_PROGRESS"


def _jupyter_frontend():
    """True inside an IPython kernel running a request from an interactive frontend."""
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return False
    try:
        kernel = getattr(ipython.get_ipython(), "kernel", None)
        parent = kernel.get_parent() if kernel is not None else None
    except Exception:  # another shell, or an ipykernel without get_parent
        return False
    return bool(isinstance(parent, dict) and parent.get("content", {}).get("allow_stdin", False))


def interactive():
    """True when progress bars should be shown (see the module docstring)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        return forced not in ("0", "false", "no", "off")
    stream = sys.stderr
    if stream is not None and hasattr(stream, "isatty") and stream.isatty():
        return True
    return _jupyter_frontend()


def progress(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, disabled unless :func:`interactive` (an explicit ``disable=`` wins)."""
    if kwargs.setdefault("disable", not interactive()) is True:
        from tqdm import tqdm  # a disabled bar: never load the notebook machinery
    else:
        from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)
