"""The trusted side of a test cell: run the hidden checks on stand-ins for the student's code.

The hidden part of a test cell (``check_batchnorm_forward(batchnorm_forward)``) runs here, outside the
sandbox, with each of the student's names bound to a :class:`Remote`. Every use of a Remote (a call, an
attribute) is one operation of :mod:`bncapture.runner`, encoded as plain data by a :class:`Session`:

* **record** (once per class): each operation is performed at once on the instructor's solution by an
  in-process :class:`bncapture.runner.Runner`; the operations make the cell's *script*, which goes into
  every sandbox as data. Outcomes are never written into a script.
* **replay** (per student): each operation must be the next one of the script (arrays equal, or within
  round-off when they were computed from earlier results); its outcome is the one the sandbox saved.
  A different or extra operation (a check that goes down another path for a wrong answer) raises
  :class:`Diverged`, with the operations asked so far, so that the grader can run the sandbox again
  with a longer script.

Only plain data crosses: arrays, scalars, tuples, and references to objects that stay in the sandbox.
"""
import builtins
import re

import numpy as np

from bncapture import codec, functions
from bncapture.runner import Runner


class Unjudgeable(BaseException):
    """A cell that cannot be judged from the sandbox's outcomes (not a student's AssertionError)."""


class NoResult(Unjudgeable):
    """The sandbox saved no outcome for an operation."""


class Diverged(Unjudgeable):
    """The check asked for an operation that is not in the script; ``ops`` are those asked so far."""

    def __init__(self, message, ops, arrays):
        super().__init__(message)
        self.ops, self.arrays = ops, arrays


#: type -> (to_tree(obj, encode), apply(obj, after_tree, arrays)): judge-side objects sent by value
OBJECT_CODECS = {}


class OnDevice:
    """A host array that the sandbox moves to the GPU before the call (``{"dev": ...}``)."""

    def __init__(self, array):
        self.array = np.array(array)
        self.shape = self.array.shape

    def get(self):
        return self.array


class Device:
    """The ``xp`` that the GPU checks use on the trusted side: ``asarray`` marks data for the device."""

    @staticmethod
    def asarray(array):
        return OnDevice(array)


DEVICE = Device()


class Remote:
    """A student's object that stays in the sandbox; calls and attributes become operations."""

    def __init__(self, session, ref, kind):
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_name", None)   # the student's global it is, if any

    def __call__(self, *args, **kwargs):
        return self._session.call(self, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._session.op({"op": "getattr", "obj": {"ref": self._ref}, "name": name}, {})

    def __setattr__(self, name, value):
        arrays = {}
        tree = self._session.encode(value, arrays, f"s{len(self._session.asked)}")
        self._session.op({"op": "setattr", "obj": {"ref": self._ref}, "name": name, "value": tree}, arrays)

    def __deepcopy__(self, memo):
        return self

    def __bool__(self):  # an object of the student's is not a truth value the judge could take on trust
        raise TypeError("the student's code returned an object where plain data was expected")

    def __repr__(self):
        return f"<student's {self._kind}>"


def _exception(error):
    """The exception a student's code raised, rebuilt from its description (a builtin type or a stand-in)."""
    name = re.sub(r"\W", "", str(error.get("type", "Error")))[:100] or "Error"
    message = str(error.get("message", ""))
    for base in error.get("bases", []):
        cls = getattr(builtins, str(base), None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            if cls.__name__ == name:
                return cls(message)
            return type(name, (cls,), {})(message)
    return type(name, (Exception,), {})(message)


def _same(a, arrays_a, b, arrays_b):
    """Whether two encoded operations are the same (arrays equal, or close for computed ones)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return False
        if "a" in a:
            x, y = arrays_a.get(a["a"]), arrays_b.get(b["a"])
            if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
                return False
            if np.array_equal(x, y, equal_nan=True):
                return True
            if x.dtype.kind not in "fc":
                return False
            scale = max(1.0, float(np.max(np.abs(y), initial=0.0)))
            return bool(np.allclose(x, y, rtol=1e-5, atol=1e-7 * scale, equal_nan=True))
        return all(_same(a[k], arrays_a, b[k], arrays_b) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, arrays_a, y, arrays_b) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= 1e-9 * max(1.0, abs(b))
    return type(a) is type(b) and a == b


class Session:
    """The operations of one test cell.

    Args:
        record: the instructor's solution namespace, to record a script; or None to replay.
        script: ({"ops": [...]}, arrays) to replay.
        outcomes: (outcome trees, arrays) that the sandbox saved, or None with ``missing`` saying why.
    """

    def __init__(self, record=None, script=None, outcomes=None, missing="no outcome was saved"):
        self.asked, self.asked_arrays = [], {}
        self.known = {}   # id(value) -> (value, ref): results, so that passing one back sends a reference
        self.contents = {}  # (dtype, shape, bytes) of result arrays -> ref
        if record is not None:
            self.runner = Runner(record, {})
        else:
            self.runner = None
            tree, self.script_arrays = script
            self.script_ops = tree["ops"]
            self.outcomes, self.out_arrays = outcomes if outcomes is not None else ([], {})
        self.missing = missing
        self.sources = {}   # {global name: source of the answer cell that defines it}, for static checks

    # encoding of arguments --------------------------------------------------------------------------
    def encode(self, value, arrays, prefix):
        """A judge-side value as an argument tree; results passed back become references."""
        hit = self.known.get(id(value))
        if hit is not None and hit[0] is value:
            return {"ref": hit[1]}
        if isinstance(value, Remote):
            return {"ref": value._ref}
        if isinstance(value, OnDevice):
            return {"dev": self.encode(value.array, arrays, prefix)}
        if isinstance(value, np.ndarray):
            value = codec.check_array(np.array(value), "an argument")
            ref = self.contents.get((value.dtype.str, value.shape, value.tobytes()))
            if ref is not None:
                return {"ref": ref}
            key = f"{prefix}_{len(arrays)}"
            arrays[key] = value
            return {"a": key}
        if isinstance(value, np.random.Generator):
            return {"rng": codec.rng_state(value)}
        if isinstance(value, functions.Function):
            return {"fn": value.name, "args": [self.encode(p, arrays, prefix) for p in value.params]}
        if type(value) in OBJECT_CODECS:
            return OBJECT_CODECS[type(value)][0](value, lambda v: self.encode(v, arrays, prefix))
        if isinstance(value, tuple):
            return {"t": [self.encode(v, arrays, prefix) for v in value]}
        if isinstance(value, list):
            return {"l": [self.encode(v, arrays, prefix) for v in value]}
        if isinstance(value, dict):
            return {"d": {str(k): self.encode(v, arrays, prefix) for k, v in value.items()}}
        if isinstance(value, np.generic) or codec.jsonable_scalar(value):
            return codec.encode_scalar(value)
        raise TypeError(f"the grader cannot send a {type(value).__name__} to the sandbox")

    # decoding of outcomes ---------------------------------------------------------------------------
    def decode(self, tree, arrays, ref):
        """An outcome tree as judge-side values; objects left in the sandbox become Remotes."""
        if not isinstance(tree, dict):
            if isinstance(tree, list):
                raise codec.Malformed("bare list in an outcome")
            return tree
        if "a" in tree:
            value = arrays[tree["a"]]
            self.contents.setdefault((value.dtype.str, value.shape, value.tobytes()), ref)
        elif "s" in tree:
            return codec.decode_scalar(tree)
        elif "t" in tree or "l" in tree:
            items = [self.decode(v, arrays, ref + [i]) for i, v in enumerate(tree.get("t", tree.get("l")))]
            value = tuple(items) if "t" in tree else items
        elif "d" in tree:
            value = {str(k): self.decode(v, arrays, ref + [str(k)]) for k, v in tree["d"].items()}
        elif "opaque" in tree:
            value = Remote(self, ref, str(tree["opaque"])[:100])
        else:
            raise codec.Malformed(f"unknown outcome tag {sorted(tree)[:3]}")
        self.known[id(value)] = (value, ref)
        return value

    def apply_after(self, local, tree, arrays):
        """Bring a by-value argument up to the state the student's call left it in."""
        if tree is None:
            return
        if isinstance(local, OnDevice):
            local = local.array
        if isinstance(local, np.ndarray) and isinstance(tree, dict) and "a" in tree:
            new = arrays[tree["a"]]
            if new.shape == local.shape:
                local[...] = new
        elif isinstance(local, np.random.Generator) and isinstance(tree, dict) and "rng" in tree:
            try:
                local.bit_generator.state = tree["rng"]
            except Exception:
                raise codec.Malformed("a random generator came back in a state that is not valid") from None
        elif type(local) in OBJECT_CODECS:
            OBJECT_CODECS[type(local)][1](local, tree, arrays, self)
        elif isinstance(local, (tuple, list)) and isinstance(tree, dict) and ("t" in tree or "l" in tree):
            for item, sub in zip(local, tree.get("t", tree.get("l"))):
                self.apply_after(item, sub, arrays)

    # operations -------------------------------------------------------------------------------------
    def _exchange(self, op, arrays):
        """Perform (record) or look up (replay) one operation: (outcome tree, arrays)."""
        index = len(self.asked)
        self.asked.append(op)
        self.asked_arrays.update(arrays)
        if self.runner is not None:
            self.runner.arrays.update(arrays)
            return self.runner.run(op, index), self.runner.out_arrays
        if index >= len(self.script_ops) or not _same(op, arrays, self.script_ops[index], self.script_arrays):
            raise Diverged("the hidden test took another path for your answer than the grader prepared",
                           list(self.asked), dict(self.asked_arrays))
        if index >= len(self.outcomes):
            raise NoResult(self.missing)
        return self.outcomes[index], self.out_arrays

    def _value(self, outcome, out_arrays, index):
        """The value of an outcome, or the student's exception raised again."""
        if not isinstance(outcome, dict):
            raise codec.Malformed("an outcome is not a mapping")
        if "error" in outcome:
            raise _exception(outcome["error"] if isinstance(outcome["error"], dict) else {})
        return self.decode(outcome.get("value"), out_arrays, [index])

    def op(self, op, arrays):
        index = len(self.asked)
        return self._value(*self._exchange(op, arrays), index)

    def call(self, target, args, kwargs):
        """Call a student's object (a :class:`Remote`) or a public harness applied to some (a Function)."""
        index = len(self.asked)
        arrays = {}
        op = {"op": "call", "fn": self.encode(target, arrays, f"c{index}"),
              "args": [self.encode(a, arrays, f"c{index}") for a in args],
              "kwargs": {k: self.encode(v, arrays, f"c{index}") for k, v in kwargs.items()}}
        outcome, out_arrays = self._exchange(op, arrays)
        after = outcome.get("after") if isinstance(outcome, dict) else None
        if isinstance(after, dict):
            for local, tree in zip(args, after.get("args") or []):
                self.apply_after(local, tree, out_arrays)
            for key, tree in (after.get("kwargs") or {}).items():
                if key in kwargs:
                    self.apply_after(kwargs[key], tree, out_arrays)
        return self._value(outcome, out_arrays, index)

    def global_(self, name):
        value = self.op({"op": "global", "name": name}, {})
        if isinstance(value, Remote):
            object.__setattr__(value, "_name", name)
        return value


def in_sandbox(harness, *args):
    """Apply a public harness (a :class:`bncapture.functions.Function` whose parameters include the student's
    functions) where those functions live: in the sandbox for Remotes, here for plain functions (tests)."""
    session = next((p._session for p in harness.params if isinstance(p, Remote)), None)
    return harness(*args) if session is None else session.call(harness, args, {})


class StudentNames(dict):
    """The local namespace that a hidden block runs in: unknown names are the student's globals."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def __missing__(self, name):
        if hasattr(builtins, name):
            raise KeyError(name)
        try:
            value = self.session.global_(name)
        except (KeyError, NameError):
            raise AssertionError(f"{name} is not defined in your notebook: keep the names the exercise gives") from None
        self[name] = value
        return value


def run_hidden(code, session):
    """Run a hidden block (trusted source text) against ``session``; raises what the checks raise."""
    from bngrade.pipeline import device

    names = StudentNames(session)
    with device.default_device(DEVICE):
        exec(compile(code, "<hidden test>", "exec"), {"__name__": "bngrade_hidden"}, names)
