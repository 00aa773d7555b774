"""Offline datasets for the book and the exercises.

The default is scikit-learn's 8x8 digits set, which ships inside the
scikit-learn package: no download, so the book builds offline.
:func:`load_mnist` reads the real 28x28 MNIST from its standard IDX files in
a local cache, and downloads them there only when asked to.
"""
import gzip
import hashlib
import os
import urllib.request
from pathlib import Path

import numpy as np


def load_digits(test_fraction=0.25, seed=0, dtype=np.float64):
    """The 1797 8x8 digit images, pixel values scaled to [0, 1], split at random.

    Returns:
        x_train: (N_train, 64), y_train: (N_train,) int labels 0..9,
        x_test: (N_test, 64), y_test: (N_test,).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = (bunch.data / 16.0).astype(dtype)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {  # split -> (images file, labels file); md5 of each file
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def default_cache_dir():
    """``$BNREF_DATA/mnist`` if that variable is set, else ``~/.cache/bnref/mnist``."""
    root = os.environ.get("BNREF_DATA")
    return Path(root) / "mnist" if root else Path.home() / ".cache" / "bnref" / "mnist"


def read_idx(path):
    """Read an IDX file (the format of MNIST), gzip-compressed or not, into an array.

    The header is two zero bytes, a type code (0x08 = unsigned byte), the number of
    dimensions, and one big-endian int32 per dimension; the data follow in C order.

    Raises:
        ValueError: the file is not IDX, or its size does not match its header.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic number
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(data[4:header], dtype=">i4"))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(shape) != ndim or len(data) != expected:
        raise ValueError(f"{path}: the header announces shape {shape} ({expected} bytes in all), "
                         f"but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _fetch(name, folder, base_url):
    """Download one MNIST file into ``folder`` (atomically) and check its md5."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (name + ".part")
    try:
        with urllib.request.urlopen(base_url + name, timeout=60) as response:
            partial.write_bytes(response.read())
    except OSError as err:  # URLError, HTTPError and timeouts are OSErrors
        raise OSError(f"could not download {base_url + name} into {folder} (offline?): {err}") from err
    digest = hashlib.md5(partial.read_bytes()).hexdigest()
    if name in MNIST_MD5 and digest != MNIST_MD5[name]:
        partial.unlink()
        raise OSError(f"downloaded {name} has md5 {digest}, expected {MNIST_MD5[name]}")
    partial.replace(folder / name)


def load_mnist(cache_dir=None, download=False, dtype=np.float64, base_url=MNIST_URL):
    """The 70 000 28x28 MNIST digits, flattened, pixel values scaled to [0, 1].

    Reads the four standard IDX files (``train-images-idx3-ubyte.gz`` and the
    like) from ``cache_dir``. A missing file is downloaded there only with
    ``download=True`` (this needs internet); otherwise it is an error.

    Args:
        cache_dir: folder of the IDX files; default :func:`default_cache_dir`.
        download: fetch missing files from ``base_url``.

    Returns:
        x_train: (60000, 784), y_train: (60000,) int labels 0..9,
        x_test: (10000, 784), y_test: (10000,).

    Raises:
        FileNotFoundError: a file is missing and ``download`` is False.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    arrays = []
    for images_name, labels_name in MNIST_FILES.values():
        for name in (images_name, labels_name):
            if not (folder / name).exists():
                if not download:
                    raise FileNotFoundError(
                        f"MNIST file {name} is not in {folder}. Call load_mnist(download=True) once "
                        f"(needs internet) to fetch it there, or copy the four IDX files into that folder; "
                        f"the book itself uses the offline digits set (load_digits).")
                _fetch(name, folder, base_url)
        images, labels = read_idx(folder / images_name), read_idx(folder / labels_name)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"{folder}: {images_name} has shape {images.shape} but {labels_name} "
                             f"has shape {labels.shape}")
        arrays += [(images.reshape(len(images), -1) / 255.0).astype(dtype), labels.astype(np.int64)]
    return tuple(arrays)
