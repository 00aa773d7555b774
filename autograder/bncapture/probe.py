"""The public half of every hidden check: a *probe* calls the student's code and writes down what came back.

A probe (``bncapture.chNN.<check>(p)``) names its inputs (built by the public case builders of its chapter
module), makes the calls, chains them where the API chains them (the student's own forward feeds the student's
own backward; a layer steps through its modes), and records each result under a key of its own choosing.
It holds no reference, no expected value and no mistake, and it never decides anything: the trusted verdict
(``bngrade.verdicts.chNN.<check>``) rebuilds the same inputs from the same public builders, computes the
reference and every named mistake, and compares.

Every call a verdict might need is always made, whatever the answer: a probe's calls never depend on what the
student's code returned, so one run of the sandbox serves every verdict. Opaque values (a cache, a layer) stay
here, in live objects, and are only handed back to the student's own functions.

A record is plain data (:mod:`bncapture.codec`):

* ``{"value": tree}`` what the call returned (``keep`` picks the parts the verdict reads; a cache is never sent);
* ``{"error": {"type", "bases", "message"}}`` what it raised;
* ``{"bad": text}`` a result that ``keep`` could not take apart (not the tuple the API returns, for instance);
* ``"after"``: for ``after=True``, the array arguments as the call left them (a verdict checks they are intact).
"""
import builtins
import copy

import numpy as np

from . import codec

BUILTIN_ERRORS = frozenset(name for name, value in vars(builtins).items()
                           if isinstance(value, type) and issubclass(value, BaseException))


def describe_error(exc):
    """An exception as plain data: its type's name, the builtin exception types it derives from, its message."""
    bases = [c.__name__ for c in type(exc).__mro__ if c.__name__ in BUILTIN_ERRORS
             and getattr(builtins, c.__name__) is c]
    return {"type": type(exc).__name__[:200], "bases": bases, "message": str(exc)[:codec.MAX_STRING]}


class Deadline(BaseException):
    """Raised in a probe when its check runs past its time limit (not an Exception: no call records it)."""


class Missing:
    """A name the notebook's answer cells do not define: calling it raises NameError."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise NameError(f"{self.name} is not defined in your answer cells: keep the names the exercise gives, "
                        "and define them in the cells that say YOUR CODE HERE")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return self


class Probe:
    """The records of one check's calls on a notebook's namespace.

    Args:
        namespace: the globals built from the notebook's answer cells (or a test's own functions).
    """

    def __init__(self, namespace):
        self.namespace = namespace
        self.records = {}
        self.arrays = {}
        self.names = []      # the student's globals this probe read, in order

    def student(self, name):
        """The notebook's global ``name`` (a :class:`Missing` stand-in when it is not defined)."""
        if name not in self.names:
            self.names.append(name)
        return self.namespace[name] if name in self.namespace else Missing(name)

    def _encode(self, value, key):
        return codec.encode_result(value, self.arrays, f"{key}#")

    def call(self, key, fn, *args, keep=None, after=False, **kwargs):
        """Call ``fn`` on copies of the arguments; record ``keep(result)`` under ``key``.

        Args:
            keep: picks what the verdict reads from the result, e.g. ``lambda r: r[0]`` for the ``out`` of
                ``(out, cache)``; the default records the whole result.
            after: also record the array arguments as the call left them.

        Returns:
            the live result (for chaining into the student's next call), or None when the call raised.
        """
        if key in self.records:
            raise KeyError(f"probe key {key!r} used twice")
        try:  # the student's call gets its own copies (a cache that cannot be copied is passed as it is)
            args, kwargs = copy.deepcopy((args, kwargs))
        except Exception:
            pass
        try:
            result = fn(*args, **kwargs)
        except Deadline:
            raise
        except BaseException as exc:  # the student's error (SystemExit included) is data for the verdict
            self.records[key] = {"error": describe_error(exc)}
            return None
        try:
            kept = result if keep is None else keep(result)
            record = {"value": self._encode(kept, key)}
        except Exception:
            record = {"bad": f"returned {type(result).__name__}"[:200]}
        if after:
            record["after"] = [self._encode(a, key) if isinstance(a, np.ndarray) else None for a in args]
        self.records[key] = record
        return result

    def put(self, key, value):
        """Record a value read from the student's objects (an attribute, a buffer) under ``key``."""
        if key in self.records:
            raise KeyError(f"probe key {key!r} used twice")
        try:
            self.records[key] = {"value": self._encode(value, key)}
        except Exception as exc:
            self.records[key] = {"error": describe_error(exc)}

    def read(self, key, obj, attr):
        """Record ``getattr(obj, attr)`` under ``key`` (an AttributeError or a property's error is data too)."""
        try:
            value = getattr(obj, attr)
        except Exception as exc:
            self.records[key] = {"error": describe_error(exc)}
            return None
        self.put(key, value)
        return value

    def tree(self, error=None):
        """The JSON tree of this probe's records (``error``: why the probe stopped early, if it did)."""
        return {"records": self.records, "names": self.names, "error": error}


def part(result, index):
    """``result[index]`` of a tuple or list result, else None (a probe never fails on a student's odd result)."""
    if isinstance(result, (tuple, list)) and -len(result) <= index < len(result):
        return result[index]
    return None


def run(key, namespace):
    """Run the probe ``key`` (``"chNN.check"``) on ``namespace``; returns the :class:`Probe` and its stop error.

    A probe that stops on an exception of its own (an odd result it could not chain) keeps what it recorded.
    """
    import importlib

    module, name = key.split(".", 1)
    fn = getattr(importlib.import_module(f"bncapture.{module}"), name)
    probe = Probe(namespace)
    try:
        fn(probe)
    except Deadline as exc:
        return probe, str(exc)
    except Exception as exc:
        return probe, f"{type(exc).__name__}: {str(exc)[:500]}"
    return probe, None
