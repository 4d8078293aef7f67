"""dataset: digits: scikit-learn's 8x8 handwritten digits (the `digits` extra), no download."""

from __future__ import annotations

import numpy as np

from cnnctl.errors import DataError
from cnnctl.extras import require

from .formats import Raw, register_format

CLASSES = [str(d) for d in range(10)]


def load_digits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits (values 0..16, scaled to 0..255), with a fixed 20% test split
    (drawn once with seed 0, the same for every run, since the set has no test split of its own)."""
    sk_digits = require("sklearn.datasets", "digits", "dataset: digits needs scikit-learn, which is not installed",
                        DataError).load_digits
    d = sk_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    n_test = len(y) // 5
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return (x[train], y[train]), (x[test], y[test])


@register_format("digits", "scikit-learn's 8x8 digits, 1,797 images (no download)", located_by="nothing",
                 classes=lambda spec: list(CLASSES), image_shape=(1, 8, 8))
def load(spec, input_shape, rng, progress) -> Raw:
    train, test = load_digits()
    return Raw(list(CLASSES), train, test)
