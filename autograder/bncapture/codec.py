"""Plain data out of the sandbox: a JSON tree plus numeric arrays (``.npy`` members of a zip).

A recorded value is a JSON tree whose leaves are JSON scalars or tagged objects:

=====================  ======================================================================
``{"a": key}``         a numeric NumPy array, stored under ``key``
``{"s": v, "dtype"}``  a NumPy scalar
``{"t": [...]}``       a tuple (``"l"`` a list, ``"d"`` a dict with string keys)
``{"opaque": type}``   an object that is not plain data: only its type's name is recorded
=====================  ======================================================================

Everything read back is checked against hard limits and loaded with ``allow_pickle=False``;
anything else is a :class:`Malformed` error, which costs the cells it concerns.
"""
import json
import math
import zipfile

import numpy as np

#: dtype kinds an array may have: bool, signed/unsigned int, float, complex
NUMERIC_KINDS = frozenset("biufc")
MAX_DEPTH = 32
MAX_ITEMS = 4096           # elements of one tuple/list/dict
MAX_STRING = 20_000        # characters of one string
MAX_ARRAY_BYTES = 1 << 28  # 256 MiB of arrays per file
MAX_JSON_BYTES = 1 << 24   # 16 MiB of JSON per file


class Malformed(ValueError):
    """Data that does not follow this format, or is over a limit."""


def jsonable_scalar(value):
    """True for the Python scalars that JSON carries as they are."""
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float))


def encode_scalar(value):
    """A NumPy scalar as ``{"s": python value, "dtype": name}``; Python scalars as they are."""
    if isinstance(value, np.generic):
        if value.dtype.kind not in NUMERIC_KINDS:
            raise Malformed(f"a NumPy scalar of dtype {value.dtype} is not plain data")
        item = value.item()
        return {"s": [item.real, item.imag] if isinstance(item, complex) else item, "dtype": value.dtype.str}
    if isinstance(value, str) and len(value) > MAX_STRING:
        return value[:MAX_STRING] + " [cut]"
    return value


def decode_scalar(tree):
    dtype = np.dtype(tree["dtype"])
    if dtype.kind not in NUMERIC_KINDS:
        raise Malformed(f"scalar dtype {dtype} is not numeric")
    value = tree["s"]
    if dtype.kind == "c":
        value = complex(*value)
    return dtype.type(value)


def check_array(array, where="array"):
    """Raise Malformed unless ``array`` is a plain numeric ndarray."""
    if type(array) is not np.ndarray or array.dtype.kind not in NUMERIC_KINDS or array.dtype.fields is not None:
        raise Malformed(f"{where} is not a numeric array")
    return array


def write_arrays(zf, prefix, arrays):
    """Write each array of ``arrays`` into the open zip ``zf`` as the member ``<prefix><key>.npy``."""
    for key, array in arrays.items():
        with zf.open(f"{prefix}{key}.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)


def dumps(tree, arrays):
    """(JSON bytes, ``.npz`` bytes) of ``tree`` and ``arrays``."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return json.dumps(tree).encode(), buffer.getvalue()


class LazyArrays:
    """The arrays of untrusted zip members, read one at a time, each only once its header's shape is accepted.

    ``load(key, shape)`` refuses, before reading any data, an array whose header is not a plain numeric
    dtype of exactly ``shape`` (None: any shape, bounded by :data:`MAX_ARRAY_BYTES`).

    Args:
        zf: an open ``zipfile.ZipFile`` (kept open while the arrays are read).
        members: {array key: ZipInfo of its ``.npy`` member}.
    """

    def __init__(self, zf=None, members=None):
        self.zf, self.members = zf, dict(members or {})
        if len(self.members) > MAX_ITEMS:
            raise Malformed("the arrays are more than the limit")

    @classmethod
    def from_npz(cls, blob):
        """The arrays of the bytes of an ``.npz``."""
        import io

        if not blob:
            return cls()
        try:
            zf = zipfile.ZipFile(io.BytesIO(blob))
            infos = zf.infolist()
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise Malformed(f"not a valid .npz ({exc})") from None
        return cls(zf, {i.filename[:-4]: i for i in infos if i.filename.endswith(".npy")})

    def __contains__(self, key):
        return key in self.members

    def header(self, key):
        """(shape, dtype) from an array's header, without reading its data."""
        from numpy.lib import format as npy

        info = self.members.get(key)
        if info is None:
            raise Malformed(f"array {key!r} is missing")
        try:
            with self.zf.open(info) as fh:
                version = npy.read_magic(fh)
                reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape, _, dtype = reader(fh, max_header_size=10_000)
        except Exception as exc:
            raise Malformed(f"array {key!r} has no valid header ({type(exc).__name__})") from None
        if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.hasobject:
            raise Malformed(f"array {key!r} is not numeric ({dtype})")
        return tuple(int(n) for n in shape), dtype

    def load(self, key, shape=None):
        """The array ``key``; Malformed unless its header says ``shape`` (when given) and a numeric dtype."""
        from numpy.lib import format as npy

        found, dtype = self.header(key)
        if shape is not None and found != tuple(shape):
            raise Malformed(f"shape {found}, expected {tuple(shape)}")
        if int(np.prod(found, dtype=np.int64)) * dtype.itemsize > MAX_ARRAY_BYTES:
            raise Malformed(f"array {key!r} is larger than the limit")
        with self.zf.open(self.members[key]) as fh:
            array = npy.read_array(fh, allow_pickle=False)
        return check_array(array, f"array {key!r}")


def loads(text, blob):
    """Parse a JSON text and the bytes of an ``.npz``, distrusting both.

    Returns:
        (tree, {key: ndarray}).
    Raises:
        Malformed: bad JSON or npz, a non-numeric or pickled array, or data over a limit.
    """
    import io

    if len(text) > MAX_JSON_BYTES:
        raise Malformed("the JSON is larger than the limit")
    try:
        tree = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Malformed(f"not valid JSON ({exc})") from None
    check_tree(tree)
    arrays = {}
    if blob:
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as zf:
                total = sum(info.file_size for info in zf.infolist())
                if total > MAX_ARRAY_BYTES or len(zf.infolist()) > MAX_ITEMS:
                    raise Malformed("the arrays are larger than the limit")
            with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
                for key in npz.files:
                    arrays[key] = check_array(npz[key], f"array {key!r}")
        except Malformed:
            raise
        except Exception as exc:  # zip, npy header, or pickled-object errors
            raise Malformed(f"not a valid .npz of numeric arrays ({type(exc).__name__}: {str(exc)[:200]})") from None
    return tree, arrays


def check_tree(tree, depth=0):
    """Raise Malformed when a JSON tree is too deep, too wide or holds over-long strings."""
    if depth > MAX_DEPTH:
        raise Malformed("the data is nested too deeply")
    if isinstance(tree, str):
        if len(tree) > MAX_STRING + 10:
            raise Malformed("a string is longer than the limit")
    elif isinstance(tree, float):
        if math.isnan(tree) or math.isinf(tree):
            return
    elif isinstance(tree, list):
        if len(tree) > MAX_ITEMS:
            raise Malformed("a list is longer than the limit")
        for item in tree:
            check_tree(item, depth + 1)
    elif isinstance(tree, dict):
        if len(tree) > MAX_ITEMS:
            raise Malformed("a mapping is larger than the limit")
        for key, item in tree.items():
            check_tree(key, depth + 1)
            check_tree(item, depth + 1)
    elif not jsonable_scalar(tree):
        raise Malformed(f"unexpected JSON value {type(tree).__name__}")


def encode_result(value, arrays, prefix, depth=0):
    """A value returned by student code as a JSON tree (numeric arrays go into ``arrays``).

    CuPy arrays (anything with ``.get()`` and ``.shape``) are copied to the host first. Objects that are
    not plain data become ``{"opaque": type name}``: nothing of them leaves the sandbox.
    """
    if depth > MAX_DEPTH - 2:
        return {"opaque": "deeply nested data"}
    if hasattr(value, "get") and hasattr(value, "shape") and not isinstance(value, (np.ndarray, dict)):
        try:
            value = value.get()
        except Exception:
            return {"opaque": type(value).__name__}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in NUMERIC_KINDS or value.dtype.fields is not None:
            return {"opaque": f"ndarray of dtype {value.dtype}"}
        key = f"{prefix}_{len(arrays)}"
        arrays[key] = np.array(value)  # a base-class copy: subclasses and views leave as plain arrays
        return {"a": key}
    if isinstance(value, np.generic) and value.dtype.kind in NUMERIC_KINDS:
        return encode_scalar(value)
    if jsonable_scalar(value):
        return encode_scalar(value)
    if isinstance(value, (tuple, list)) and len(value) <= MAX_ITEMS:
        tag = "t" if isinstance(value, tuple) else "l"
        return {tag: [encode_result(v, arrays, prefix, depth + 1) for v in value]}
    if isinstance(value, dict) and len(value) <= MAX_ITEMS and all(isinstance(k, str) for k in value):
        return {"d": {k: encode_result(v, arrays, prefix, depth + 1) for k, v in value.items()}}
    return {"opaque": type(value).__name__[:100]}
