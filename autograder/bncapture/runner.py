"""Perform a test cell's prepared calls on the student's code and save what came back.

A cell's *script* (``<dir>/script/<cell>.json`` and ``.npz``, written by the grader) is a list of operations:

* ``{"op": "global", "name": n}``: look up the notebook's global ``n``;
* ``{"op": "call", "fn": ref, "args": [...], "kwargs": {...}}``: call a result of an earlier operation;
* ``{"op": "getattr", "obj": ref, "name": n}`` and ``{"op": "setattr", "obj": ref, "name": n, "value": v}``.

Every operation runs, whatever happened to the ones before; its outcome is ``{"value": tree}`` or
``{"error": {"type", "bases", "message"}}``, and a call also reports the state of the arguments it was given
by value after the call (``"after"``), so that the grader sees in-place changes. The outcomes go to
``<dir>/out/<cell>.json`` and ``.npz`` (see :mod:`bncapture.codec`).

The same code runs the instructor's solution, outside any sandbox, when the grader records a script.
"""
import builtins
import os
from pathlib import Path

import numpy as np

from . import codec, functions

#: where the grader puts the scripts and collects the outcomes (relative to the notebook's folder)
DIR = Path(os.environ.get("BNCAPTURE_DIR", ".bncapture"))
BUILTIN_ERRORS = [name for name, value in vars(builtins).items()
                  if isinstance(value, type) and issubclass(value, BaseException)]


class Failed(Exception):
    """An argument refers to an operation that failed."""


def _index(value, path):
    for step in path:
        value = value[step]
    return value


class Runner:
    """Runs operations against ``namespace`` (the notebook's globals), keeping every result by index."""

    def __init__(self, namespace, arrays):
        self.namespace, self.arrays = namespace, arrays
        self.results = []   # live objects, or a Failed marker
        self.out_arrays = {}

    def decode(self, tree):
        """An argument tree as a live value."""
        if not isinstance(tree, (dict, list)):
            return tree
        if isinstance(tree, list):
            raise codec.Malformed("bare list in an argument tree")
        if "a" in tree:
            return np.array(self.arrays[tree["a"]])
        if "s" in tree:
            return codec.decode_scalar(tree)
        if "t" in tree:
            return tuple(self.decode(v) for v in tree["t"])
        if "l" in tree:
            return [self.decode(v) for v in tree["l"]]
        if "d" in tree:
            return {k: self.decode(v) for k, v in tree["d"].items()}
        if "ref" in tree:
            index, *path = tree["ref"]
            target = self.results[index]
            if isinstance(target, Failed):
                raise target
            return _index(target, path)
        if "dev" in tree:
            import cupy
            return cupy.asarray(self.decode(tree["dev"]))
        if "rng" in tree:
            return codec.make_rng(tree["rng"])
        if "fn" in tree:
            return functions.build(tree["fn"], *(self.decode(a) for a in tree["args"]))
        if "obj" in tree:
            cls = self.namespace[tree["obj"]]
            obj = cls.__new__(cls)
            for name, value in tree["attrs"].items():
                setattr(obj, name, self.decode(value))
            return obj
        raise codec.Malformed(f"unknown argument tag {sorted(tree)}")

    def after(self, tree, value, prefix):
        """The state after a call of an argument passed by value, or None for one passed by reference."""
        if not isinstance(tree, dict) or not ({"a", "dev", "rng", "obj", "t", "l"} & set(tree)):
            return None
        if "rng" in tree:
            return {"rng": codec.rng_state(value)}
        if "obj" in tree:
            return {"obj": tree["obj"], "attrs": {name: self.after(sub, getattr(value, name, None), prefix)
                                                  if isinstance(sub, dict) and ({"obj", "l", "t"} & set(sub))
                                                  else codec.encode_result(getattr(value, name, None),
                                                                           self.out_arrays, prefix)
                                                  for name, sub in tree["attrs"].items()}}
        if "t" in tree or "l" in tree:
            items = tree.get("t", tree.get("l"))
            if not isinstance(value, (tuple, list)) or len(value) != len(items):
                return codec.encode_result(value, self.out_arrays, prefix)
            return {"t" if "t" in tree else "l": [self.after(t, v, prefix) for t, v in zip(items, value)]}
        return codec.encode_result(value, self.out_arrays, prefix)

    def run(self, op, index):
        """Perform one operation; returns its outcome tree."""
        prefix = f"r{index}"
        try:
            kind = op["op"]
            if kind == "global":
                value = self.namespace[op["name"]]
                outcome = {}
            elif kind == "getattr":
                value = getattr(self.decode(op["obj"]), op["name"])
                outcome = {}
            elif kind == "setattr":
                setattr(self.decode(op["obj"]), op["name"], self.decode(op["value"]))
                value, outcome = None, {}
            elif kind == "call":
                fn = self.decode(op["fn"])
                args = [self.decode(a) for a in op["args"]]
                kwargs = {k: self.decode(v) for k, v in op["kwargs"].items()}
                value = fn(*args, **kwargs)
                outcome = {"after": {"args": [self.after(t, v, prefix) for t, v in zip(op["args"], args)],
                                     "kwargs": {k: self.after(op["kwargs"][k], v, prefix)
                                                for k, v in kwargs.items()}}}
            else:
                raise codec.Malformed(f"unknown operation {kind!r}")
        except Exception as exc:  # the student's error, reported as data
            self.results.append(Failed(f"{type(exc).__name__}: {exc}"))
            bases = [c.__name__ for c in type(exc).__mro__ if c.__name__ in BUILTIN_ERRORS
                     and getattr(builtins, c.__name__) is c]
            return {"error": {"type": type(exc).__name__[:200], "bases": bases,
                              "message": str(exc)[:codec.MAX_STRING]}}
        self.results.append(value)
        outcome["value"] = codec.encode_result(value, self.out_arrays, prefix)
        return outcome

    def run_all(self, ops):
        return [self.run(op, i) for i, op in enumerate(ops)]


def load_script(cell, folder=None):
    folder = Path(folder or DIR) / "script"
    text = (folder / f"{cell}.json").read_text()
    blob = (folder / f"{cell}.npz").read_bytes()
    return codec.loads(text, blob)


def capture(cell, namespace):
    """Run the prepared operations of grade cell ``cell`` on ``namespace`` and save their outcomes.

    Never raises for the student's errors: every outcome, good or bad, is saved for the grader.
    """
    tree, arrays = load_script(cell)
    runner = Runner(namespace, arrays)
    outcomes = []
    try:
        for index, op in enumerate(tree["ops"]):
            outcomes.append(runner.run(op, index))
    finally:  # an interrupt (the cell's time limit) still saves what was done
        out = DIR / "out"
        out.mkdir(parents=True, exist_ok=True)
        codec.save(out / cell, {"outcomes": outcomes, "complete": len(outcomes) == len(tree["ops"])},
                   runner.out_arrays)
