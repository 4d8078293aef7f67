"""Patch-whitening initialisation of the first convolution (airbench; Coates and Ng 2011): its filters start as
the whitening transform of the training images' k x k patches, so the first layer's outputs are decorrelated
with unit variance over the training data."""

from __future__ import annotations

import numpy as np

from cnnctl import data
from cnnctl.core.memory import refuse_over
from cnnctl.core.nn import Conv2D, Model
from cnnctl.errors import ShapeError

IMAGES = 5000  # the first images of the training split (a fixed choice: no random stream is used)
EPS = 5e-4  # added to the eigenvalues, as airbench does


def patches(ds: data.Dataset, kernel: tuple[int, int], images: int = IMAGES) -> np.ndarray:
    """Every k x k patch (stride 1, no padding) of the first `images` normalised training images, as rows of
    (C * kh * kw) float64 values."""
    n, (c, h, w) = min(images, len(ds.train)), ds.image_shape
    kh, kw = kernel
    if kh > h or kw > w:
        raise ShapeError(f"layers.0: patch_whitening takes the {kh}x{kw} patches of the {h}x{w} training images, "
                         "but the kernel is larger than the image", "use a smaller kernel_size, or another init")
    d, count = c * kh * kw, n * (h - kh + 1) * (w - kw + 1)
    # the images, the patches in float32 and in float64, their centred copy, the covariance
    refuse_over(f"patch_whitening of layers.0 ({count:,} patches of {d} values)",
                4 * n * c * h * w + (4 + 8 + 8) * count * d + 8 * d * d, 2, ShapeError,
                "use a smaller kernel_size (the patches grow with its square), or another init")
    x, _ = next(data.batches(ds, ds.train, n))
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(2, 3))  # N, C, OH, OW, kh, kw
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kernel[0] * kernel[1]).astype(np.float64)


def whitening_filters(rows: np.ndarray, eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """(filters (d, d), eigenvalues (d,)): the eigenvectors of the patch covariance, largest eigenvalue first,
    each scaled by 1 / sqrt(eigenvalue + eps)."""
    centred = rows - rows.mean(axis=0)
    cov = centred.T @ centred / len(rows)
    values, vectors = np.linalg.eigh(cov)
    order = values.argsort()[::-1]
    values, vectors = values[order], vectors[:, order]
    return (vectors / np.sqrt(values + eps)).T, values


def apply(model: Model, ds: data.Dataset) -> dict | None:
    """Set the first convolution's filters (if its init is patch_whitening): the first min(filters, d) are the
    whitening filters of its d = C*kh*kw patch values, the next up to d their negatives (so a ReLU keeps both
    signs, as airbench does); any beyond 2d keep their He-normal draw; the bias starts at 0. Returns what the
    run records (None without patch whitening)."""
    first = model.layers[0]
    if not isinstance(first, Conv2D) or first.init != "patch_whitening":
        return None
    w = first.params["weight"]
    filters, values = whitening_filters(patches(ds, first.kernel_size))
    d, o = len(filters), w.shape[0]
    both = np.concatenate([filters, -filters])[: min(o, 2 * d)]
    w[: len(both)] = both.reshape(len(both), *w.shape[1:]).astype(w.dtype)
    if "bias" in first.params:
        first.params["bias"][:] = 0
    return {"layer": "layers.0", "images": min(IMAGES, len(ds.train)), "patch_values": d,
            "whitened_filters": len(both), "eigenvalues": values.tolist()}
