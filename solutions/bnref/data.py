"""Offline datasets for the book and the exercises.

The default is scikit-learn's 8x8 digits set, which ships inside the
scikit-learn package: no download, so the book builds offline.
"""
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
