"""A hidden check by name: its public probe (``bncapture.chNN.<name>``) and its trusted verdict
(``bngrade.verdicts.chNN.<name>``).

A test cell's hidden block is one line per check, ``check("ch02.batchnorm_forward", globals())``:

* run in-process (``nbgrader validate``, the instructor's own run of the solved source, the tests), it probes
  the namespace given, passes the records through the same plain-data encoding as the sandbox, and judges;
* in grading, the judge reads the keys from the block (:func:`keys_of`), the sandbox runs the probes on the
  answer cells alone (:mod:`bncapture.answers`), and :func:`judge` decides each from the records that came back.
"""
import ast
import importlib
import inspect
import textwrap
import types

import numpy as np
from bncapture import codec, probe

from bngrade.judge.results import Results


def verdict_of(key):
    """The verdict function of ``key`` (``"chNN.name"``)."""
    module, name = key.split(".", 1)
    return getattr(importlib.import_module(f"bngrade.verdicts.{module}"), name)


def names_of(key):
    """The student's globals that the probe of ``key`` reads, from the grader's own copy of its source (never
    from what a sandbox says it read): the constant arguments of its ``p.student(...)`` calls."""
    module, name = key.split(".", 1)
    public = importlib.import_module(f"bncapture.{module}")
    variables = getattr(public, "VARIABLES", None)
    if isinstance(variables, dict) and name in variables:  # the questions: one answer variable each
        return [variables[name]]
    tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(public, name))))
    return list(dict.fromkeys(node.args[0].value for node in ast.walk(tree)
                              if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "student"
                              and node.args and isinstance(node.args[0], ast.Constant)))


def keys_of(code):
    """The probe keys that a hidden block checks, in order (the string arguments of its ``check`` calls)."""
    keys = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "check" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            keys.append(node.args[0].value)
    return keys


def judge(key, tree, arrays, prefix="", sources=None):
    """Decide one check from a probe's records; raises AssertionError with the student's message."""
    verdict_of(key)(Results(tree, arrays, prefix, sources))


def _reference_names(names, namespace):
    """The graded names that are the course's reference package's own objects (in-process only)."""
    found = []
    for name in names:
        value = namespace.get(name)
        modules = [getattr(value, "__module__", None)]
        modules += [getattr(v, "__name__", None) if isinstance(v, types.ModuleType) else getattr(v, "__module__", None)
                    for v in (getattr(value, "__globals__", None) or {}).values()
                    if not isinstance(v, (np.ndarray, np.generic))]   # data, not code (emulated device arrays)
        if any(isinstance(m, str) and m.split(".")[0] == "bnref" for m in modules):
            found.append(name)
    return found


def check(key, namespace):
    """Probe ``namespace`` (a notebook's globals) and judge, in this process; raises AssertionError."""
    found, error = probe.run(key, namespace)
    used = _reference_names(found.names, namespace)
    if used:
        raise AssertionError(f"{used[0]}: your notebook uses the course's reference package `bnref`; grading needs "
                             "your own implementation.")
    text, blob = codec.dumps(found.tree(error), found.arrays)
    tree, _ = codec.loads(text.decode(), b"")
    judge(key, tree, codec.LazyArrays.from_npz(blob))
