"""What a probe recorded, as a trusted verdict reads it: through the shape of the value it expects.

A verdict never takes a value as it comes. It asks for the record of one key *like* the expected value that it
computed from its own inputs (:meth:`Results.get`): the structure (tuple length, dict keys), each array's shape
and dtype kind are checked against that expectation before any data is read, so nothing is broadcast, and an
array is only read once its header is accepted (a result of 8 million rows for an expected (8, 3) is refused
unread). A student's exception, an odd result or a missing record becomes an ``AssertionError`` written for
the student.
"""
import numpy as np

from bncapture import codec

#: dtype kinds that may stand for an expected kind: a float result must be float; integers and bools mix
KINDS = {"f": "f", "i": "biu", "u": "biu", "b": "biu", "c": "c"}


def _expected(like):
    """Words for the structure of ``like``."""
    if isinstance(like, np.ndarray):
        return f"an array of shape {like.shape}"
    if isinstance(like, tuple):
        return f"a tuple of {len(like)} results"
    if isinstance(like, list):
        return f"a list of {len(like)} results"
    return f"a {type(like).__name__}"


class Wrong(Exception):
    """A value that does not have the structure the verdict expects; the message says how."""


class Results:
    """The records of one probe.

    Args:
        tree: the probe's JSON tree (``{"records", "names", "error"}``), untrusted.
        arrays: a :class:`bncapture.codec.LazyArrays` of its arrays, untrusted.
        prefix: prefix of this probe's array keys in ``arrays``.
        sources: {name: source of the answer cell that defines it} (None in-process).
    """

    def __init__(self, tree, arrays, prefix="", sources=None):
        tree = tree if isinstance(tree, dict) else {}
        records = tree.get("records")
        self.records = records if isinstance(records, dict) else {}
        self.error = str(tree.get("error") or "")[:600] or None
        self.arrays, self.prefix, self.sources = arrays, prefix, sources

    def record(self, key, name, label):
        """The raw record of ``key``; AssertionError when the probe never made it."""
        record = self.records.get(key)
        if not isinstance(record, dict):
            why = f": the test stopped before it ({self.error})" if self.error else ""
            raise AssertionError(f"{name}: no result came back for input {label}{why}")
        return record

    def raised(self, key, name, label):
        """The student's exception at ``key`` as {"type", "bases", "message"}, or None if the call returned."""
        error = self.record(key, name, label).get("error")
        if error is None:
            return None
        if not isinstance(error, dict):
            return {"type": "Error", "bases": [], "message": ""}
        return {"type": str(error.get("type", "Error"))[:200],
                "bases": [str(b) for b in error.get("bases", []) if isinstance(b, str)][:30],
                "message": str(error.get("message", ""))[:2000]}

    def get(self, key, like, name, label):
        """The value recorded at ``key``, shaped like ``like`` (the expected value); AssertionError otherwise."""
        record = self.record(key, name, label)
        error = self.raised(key, name, label)
        if error is not None:
            if error["type"] == "NotImplementedError":
                raise AssertionError(f"{name} is not implemented yet.")
            raise AssertionError(f"{name} raised {error['type']}: {error['message'][:1000]} (input: {label})")
        if "bad" in record:
            raise AssertionError(f"{name} {str(record['bad'])[:200]}, which is not what the docstring asks for "
                                 f"(input: {label})")
        return self.decode(record.get("value"), like, name, label)

    def after(self, key, index, like, name, label):
        """Argument ``index`` of the call at ``key`` as the call left it, shaped like ``like``."""
        states = self.record(key, name, label).get("after")
        if not isinstance(states, list) or index >= len(states):
            raise AssertionError(f"{name}: no record of its arguments came back (input: {label})")
        return self.decode(states[index], like, name, label)

    def decode(self, tree, like, name, label):
        try:
            return self._decode(tree, like)
        except (Wrong, codec.Malformed) as exc:
            raise AssertionError(f"{name} returned {exc} (input: {label})") from None

    def _decode(self, tree, like):
        if isinstance(like, (np.ndarray, np.generic)) and not isinstance(tree, dict):
            if isinstance(tree, (int, float)) and not isinstance(tree, bool) and np.ndim(like) == 0:
                return np.asarray(tree)
            raise Wrong(f"a {type(tree).__name__}, expected {_expected(np.asarray(like))}")
        if isinstance(like, (np.ndarray, np.generic)):
            like = np.asarray(like)
            if "s" in tree and like.ndim == 0:
                value = np.asarray(codec.decode_scalar(tree))
            elif "a" in tree:
                value = self.arrays.load(f"{self.prefix}{tree['a']}", like.shape)
            else:
                raise Wrong(f"{self._what(tree)}, expected {_expected(like)}")
            if value.dtype.kind not in KINDS.get(like.dtype.kind, like.dtype.kind):
                raise Wrong(f"an array of dtype {value.dtype}, expected a {like.dtype.kind!r}-kind dtype like "
                            f"{like.dtype}")
            if value.shape != like.shape:
                raise Wrong(f"shape {value.shape}, expected {like.shape}")
            return value
        if isinstance(like, (tuple, list)):
            tag = "t" if isinstance(like, tuple) else "l"
            items = tree.get(tag, tree.get("l" if tag == "t" else "t")) if isinstance(tree, dict) else None
            if not isinstance(items, list) or len(items) != len(like):
                raise Wrong(f"{self._what(tree)}, expected {_expected(like)}")
            return type(like)(self._decode(t, e) for t, e in zip(items, like))
        if isinstance(like, dict):
            items = tree.get("d") if isinstance(tree, dict) else None
            if not isinstance(items, dict) or set(items) != set(like):
                raise Wrong(f"{self._what(tree)}, expected a dict with keys {sorted(like)}")
            return {k: self._decode(items[k], v) for k, v in like.items()}
        if isinstance(like, bool):
            if isinstance(tree, bool):
                return tree
            raise Wrong(f"{self._what(tree)}, expected True or False")
        if isinstance(like, (int, float)):
            if isinstance(tree, dict) and "s" in tree:
                tree = codec.decode_scalar(tree).item()
            elif isinstance(tree, dict) and "a" in tree:  # a 0-d array is a number too
                tree = self.arrays.load(f"{self.prefix}{tree['a']}", ()).item()
            if isinstance(tree, (int, float)) and not isinstance(tree, bool) and not isinstance(tree, complex):
                return tree
            raise Wrong(f"{self._what(tree)}, expected a number")
        if isinstance(like, str):
            if isinstance(tree, str):
                return tree
            raise Wrong(f"{self._what(tree)}, expected a string")
        if like is None:
            return None
        raise TypeError(f"a verdict cannot expect a {type(like).__name__}")

    @staticmethod
    def _what(tree):
        """Words for an encoded value's kind, without reading it."""
        if not isinstance(tree, dict):
            return "None" if tree is None else f"a {type(tree).__name__}"
        for tag, words in (("a", "an array"), ("s", "a NumPy scalar"), ("t", "a tuple"), ("l", "a list"),
                           ("d", "a dict")):
            if tag in tree:
                size = len(tree[tag]) if tag in "tld" and hasattr(tree[tag], "__len__") else None
                return f"{words} of {size} items" if size is not None else words
        return f"an object ({str(tree.get('opaque', '?'))[:60]})"
