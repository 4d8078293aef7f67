"""Datasets: load a split into uint8 memory, carve the validation split, normalise batches as they are drawn."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataSpec
from ..errors import DataError
from . import cifar, idx, shapes

IDX_CLASSES = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle-boot"],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}


@dataclass
class Split:
    x: np.ndarray  # (N, C, H, W) uint8
    y: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    mean: np.ndarray  # per channel, on the 0..1 scale
    std: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def default_root(dataset: str) -> Path:
    base = os.environ.get("CNNCTL_DATA")
    return Path(base) / dataset if base else Path.home() / ".cache" / "cnnctl" / dataset


def dataset_info(spec: DataSpec) -> tuple[list[str], tuple[int, int, int] | None]:
    """Class names and image shape known without loading (None: the shape follows the model)."""
    if spec.dataset == "shapes":
        return list(spec.shapes.kinds), None
    if spec.dataset == "cifar10":
        return cifar.CLASSES, (3, 32, 32)
    return IDX_CLASSES[spec.dataset], (1, 28, 28)


def _load_raw(spec: DataSpec, input_shape, rng: np.random.Generator) -> tuple[Split, Split]:
    if spec.dataset == "shapes":
        o = spec.shapes
        train = shapes.generate(o.train_size, list(o.kinds), tuple(input_shape), o.noise, rng)
        test = shapes.generate(o.test_size, list(o.kinds), tuple(input_shape), o.noise, rng)
        return Split(*train), Split(*test)
    root = Path(spec.root).expanduser() if spec.root else default_root(spec.dataset)
    if not root.is_dir():
        raise DataError(f"{spec.dataset}: data folder {root} does not exist",
                        "set data.root (or --set data.root=PATH) to the folder holding the dataset files")
    if spec.dataset == "cifar10":
        return Split(*cifar.load_split(root, "train")), Split(*cifar.load_split(root, "test"))
    return Split(*idx.load_split(root, "train", spec.dataset)), Split(*idx.load_split(root, "test", spec.dataset))


def load_dataset(spec: DataSpec, input_shape, rng: np.random.Generator,
                 normalization: tuple[list[float], list[float]] | None = None) -> Dataset:
    """Load the dataset, split off validation data (deterministic from rng) and fix the normalisation.

    `normalization` (mean, std), when given (from a checkpoint), overrides what the spec would compute.
    """
    classes, _ = dataset_info(spec)
    full, test = _load_raw(spec, input_shape, rng)
    if tuple(full.x.shape[1:]) != tuple(input_shape):
        raise DataError(f"dataset '{spec.dataset}' has images of shape {tuple(full.x.shape[1:])} but "
                        f"model.input_shape is {list(input_shape)}",
                        f"set model.input_shape: {list(full.x.shape[1:])}")
    order = rng.permutation(len(full))
    n_val = int(round(len(full) * spec.val_split))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    train, val = Split(full.x[train_idx], full.y[train_idx]), Split(full.x[val_idx], full.y[val_idx])
    if len(train) == 0:
        raise DataError(f"dataset '{spec.dataset}': no training images left after val_split={spec.val_split}")
    channels = full.x.shape[1]
    if normalization is not None:
        mean, std = normalization
    elif spec.normalize == "none":
        mean, std = [0.0] * channels, [1.0] * channels
    elif spec.normalize == "auto":
        pixels = train.x.transpose(1, 0, 2, 3).reshape(channels, -1)
        mean = (pixels.mean(axis=1, dtype=np.float64) / 255).tolist()
        std = (np.maximum(pixels.std(axis=1, dtype=np.float64), 1e-3) / 255).tolist()
    else:
        mean, std = spec.normalize["mean"], spec.normalize["std"]
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"data.normalize: give {channels} mean and std values (one per channel), got "
                            f"{len(mean)} and {len(std)}")
    return Dataset(spec.dataset, classes, train, val, test, np.asarray(mean, np.float32), np.asarray(std, np.float32))


def batches(ds: Dataset, split: Split, batch_size: int, order: np.ndarray | None = None,
            start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Float32, normalised batches of split in the given order (default: as stored), from batch `start` on."""
    n = len(split)
    order = np.arange(n) if order is None else order
    scale = (1.0 / (255.0 * ds.std)).astype(np.float32)[None, :, None, None]
    shift = (ds.mean / ds.std).astype(np.float32)[None, :, None, None]
    for b in range(start, -(-n // batch_size)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        x = split.x[idx].astype(np.float32)
        x *= scale
        x -= shift
        yield x, split.y[idx]
