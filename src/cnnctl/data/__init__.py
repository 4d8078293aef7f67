"""Datasets: a registered format (one module each, `formats.FORMATS`) loads a split into memory as stored (uint8
stays uint8); here the validation split is carved from the seed, and batches are normalised (and, for training,
augmented) as they are drawn. `spec` holds the `data:` section's models. It imports `core` and the base modules,
never config, runs or tools.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from cnnctl.errors import DataError

from . import augment, download, prefetch  # noqa: F401  (cnnctl.data.prefetch)
from .formats import FORMATS, default_root, fetch, root_of  # noqa: F401  (cnnctl.data.default_root, fetch, root_of)
from .packed import rows_of
from .spec import DataSpec


@dataclass
class Split:
    x: np.ndarray  # (N, C, H, W), uint8 (or float32 for float npz data); packed data: memory-mapped `Rows`
    y: np.ndarray  # (N,) integer class indices (a split carved by load_dataset: int16 where the classes allow);
    # multi-label data: (N, labels) uint8, 1 where the image has the label

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    mean: np.ndarray  # per channel, on the 0..1 scale of pixels / pixel_scale
    std: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def pixel_scale(self) -> float:
        return 255.0 if self.train.x.dtype == np.uint8 else 1.0

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def describe(self) -> dict:
        return {"name": self.name, "train": len(self.train), "val": len(self.val), "test": len(self.test),
                "image_shape": list(self.image_shape), "classes": self.classes}


def dataset_info(spec: DataSpec) -> tuple[list[str] | None, tuple[int, int, int] | None]:
    """Class names and image shape when known without reading any file (None where the data decides)."""
    fmt = FORMATS[spec.dataset]
    return (fmt.classes(spec) if fmt.classes else None), fmt.image_shape


def _load_raw(spec: DataSpec, input_shape, rng, progress, part,
              multilabel: bool) -> tuple[list[str], Split, Split, Split | None]:
    """(classes, training data, test split, and the validation split when the data itself gives one)."""
    fmt = FORMATS[spec.dataset]
    raw = fmt.load(spec, input_shape, rng, progress, **({"part": part} if fmt.verified_in_parts else {}),
                   **({"multilabel": True} if multilabel else {}))
    return raw.classes, Split(*raw.train), Split(*raw.test), None if raw.val is None else Split(*raw.val)


def load_dataset(spec: DataSpec, input_shape, rng: np.random.Generator,
                 normalization: tuple[list[float], list[float]] | None = None,
                 progress: download.Progress | None = None, *, part: tuple[int, int] = (0, 1),
                 statistics: Callable | None = None, multilabel: bool = False) -> Dataset:
    """Load the dataset, split off validation data (deterministic from rng) and fix the normalisation.

    `normalization` (mean, std), when given (from a checkpoint), overrides what the spec would compute.
    Several processes sharing the work (MPI ranks): `part` (this one, how many) has a format that verifies its
    files verify this one's part of them, and `statistics` (training images -> mean, std) replaces
    channel_statistics for normalize: auto. `multilabel`: labels per image (the format must list them).
    """
    classes, full, test, given_val = _load_raw(spec, input_shape, rng, progress, part, multilabel)
    if tuple(full.x.shape[1:]) != tuple(input_shape):
        raise DataError(f"dataset '{spec.dataset}' has images of shape {tuple(full.x.shape[1:])} but "
                        f"model.input_shape is {list(input_shape)}",
                        f"set model.input_shape: {list(full.x.shape[1:])}")
    order = permutation(rng, len(full))
    if spec.stratify:  # val_split of each class: the same shuffled order, taken class by class
        val_idx = np.concatenate([members[: int(round(len(members) * spec.val_split))]
                                  for members in (order[full.y[order] == c] for c in np.unique(full.y))])
        val_idx = np.sort(val_idx)
        train_idx = np.setdiff1d(np.arange(len(full)), val_idx)
    else:
        n_val = int(round(len(full) * spec.val_split))
        val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]
        train_idx.sort()  # in place: the shuffled order's memory becomes the training rows
    kind = label_type(full.y) if full.y.ndim == 1 else None
    train = Split(rows_of(full.x, train_idx), labels_at(full.y, train_idx, kind))  # packed data: views, nothing read
    val = Split(rows_of(full.x, val_idx), labels_at(full.y, val_idx, kind))
    if given_val is not None:  # the data names its validation images (a CSV's split column): val_split is not used
        train, val = full, given_val
    if len(train) == 0:
        raise DataError(f"dataset '{spec.dataset}': no training images left after val_split={spec.val_split}")
    channels = full.x.shape[1]
    scale = 255.0 if full.x.dtype == np.uint8 else 1.0
    if normalization is not None:
        mean, std = normalization
    elif spec.normalize == "none":
        mean, std = [0.0] * channels, [1.0] * channels
    elif spec.normalize == "auto":
        mean, std = (statistics or channel_statistics)(train.x)
        mean, std = (mean / scale).tolist(), np.maximum(std / scale, 1e-3).tolist()
    else:
        mean, std = spec.normalize["mean"], spec.normalize["std"]
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"data.normalize: give {channels} mean and std values (one per channel), got "
                            f"{len(mean)} and {len(std)}")
    return Dataset(spec.dataset, classes, train, val, test, np.asarray(mean, np.float32),
                   np.asarray(std, np.float32))


def channel_sums(x: np.ndarray, rows: slice = slice(None), chunk_values: int = 1 << 22) -> np.ndarray:
    """(C, 2) int64: per channel, the sum of the integer pixels (uint8) of x[rows] and the sum of their squares,
    a group of images at a time. Exact, so sums of parts (chunks, MPI ranks) add up to the whole's."""
    lo, hi, _ = rows.indices(len(x))
    out = np.zeros((x.shape[1], 2), np.int64)
    step = max(1, chunk_values // max(1, x[0].size))
    for i in range(lo, hi, step):  # each image read once (packed data: a group of rows), all its channels
        v = x[i : min(i + step, hi)].astype(np.uint16)  # 255 ** 2 fits: the squares need no wider copy
        out[:, 0] += v.sum(axis=(0, 2, 3), dtype=np.int64)
        out[:, 1] += np.square(v, out=v).sum(axis=(0, 2, 3), dtype=np.int64)
    return out


def statistics_of(sums: np.ndarray, values: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per channel from channel_sums over `values` pixels a channel: computed in
    Python's integers, then rounded once (the same float64 whatever the order the sums were made in)."""
    mean = np.array([int(s) / values for s, _ in sums])
    var = np.array([(int(q) * values - int(s) ** 2) / values**2 for s, q in sums])
    return mean, np.sqrt(var)


def channel_statistics(x: np.ndarray, chunk_values: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (float64) of an (N, C, H, W) array, over groups of images of about
    `chunk_values` values: nothing the size of the data is made. uint8 pixels: exact (channel_sums); float data:
    two passes."""
    n, c, h, w = x.shape
    if x.dtype == np.uint8:
        return statistics_of(channel_sums(x, chunk_values=chunk_values), n * h * w)
    step = max(1, chunk_values // max(1, h * w))
    groups = [(ch, slice(i, i + step)) for ch in range(c) for i in range(0, n, step)]
    mean = np.zeros(c)
    for ch, part in groups:
        mean[ch] += x[part, ch].sum(dtype=np.float64)
    mean /= n * h * w
    var = np.zeros(c)
    for ch, part in groups:
        var[ch] += np.square(x[part, ch] - mean[ch]).sum()
    return mean, np.sqrt(var / (n * h * w))


def class_counts(ds: Dataset) -> dict:
    """Images per class in each split, and the totals (what `cnnctl data` reports)."""
    k = len(ds.classes)
    count = lambda y: y.sum(axis=0, dtype=np.int64) if y.ndim == 2 else np.bincount(y, minlength=k)[:k]  # noqa: E731
    return {name: {"total": len(split), "per_class": count(split.y).tolist()}
            for name, split in (("train", ds.train), ("val", ds.val), ("test", ds.test))}


def samples(ds: Dataset, split: Split, count: int, rng: np.random.Generator, augment_spec=None) -> tuple:
    """`count` images of a split drawn without replacement (in the stored pixel scale, augmented as in training
    when augment_spec is given) and their labels, in the order drawn."""
    idx = np.sort(rng.choice(len(split), size=min(count, len(split)), replace=False))
    x = split.x[idx]
    if augment_spec is not None:
        x = augment.apply(x, augment_spec, rng)
    return x, split.y[idx]


def epoch_order(split: Split, sampler: str, rng: np.random.Generator) -> np.ndarray:
    """The training images of one epoch, in order: a permutation (shuffle), or as many draws with
    replacement with every class equally likely (balanced: each image's chance 1 / (classes * its count))."""
    n = len(split)
    if sampler == "balanced":
        counts = np.bincount(split.y)
        p = 1.0 / (np.count_nonzero(counts) * counts[split.y])
        return rng.choice(n, size=n, replace=True, p=p / p.sum())
    return permutation(rng, n)


def permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """rng.permutation(n), as int32 where n allows: the same order and the same draws (shuffled in place, so no
    second array is made), half the memory."""
    order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    rng.shuffle(order)
    return order


LABEL_CHUNK = 1 << 20  # labels gathered at a time: a memory-mapped file's labels are never copied whole


def label_type(y: np.ndarray) -> type:
    """The smallest integer type that holds y's classes: int16 for up to 32,767 classes, else int32 or int64 (one
    pass over the labels, which may be a memory-mapped file's)."""
    top = int(np.max(y, initial=0)) if len(y) else 0
    return np.int16 if top < 2**15 else np.int32 if top < 2**31 else np.int64


def labels_at(y: np.ndarray, idx: np.ndarray, kind: type | None) -> np.ndarray:
    """y[idx] as `kind` (label_type(y)), gathered a chunk at a time: a split of a million images holds 2 MB of
    labels, whatever y's type. Multi-label data's 0/1 rows are gathered as they are (uint8; kind None)."""
    if y.ndim == 2:
        return y[idx]
    out = np.empty(len(idx), kind)
    for lo in range(0, len(idx), LABEL_CHUNK):
        out[lo : lo + LABEL_CHUNK] = y[idx[lo : lo + LABEL_CHUNK]]
    return out


def batches(ds: Dataset, split: Split, batch_size: int, order: np.ndarray | None = None, start: int = 0,
            augment_spec=None, rng: np.random.Generator | None = None,
            flips: np.ndarray | None = None, share=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Float32, normalised batches of split in the given order (default: as stored), from batch `start` on;
    augmented with augment_spec and rng when given (training batches only); `flips` (per image of the split)
    says which are mirrored under alternating flip. With `share` (n -> (lo, hi): an MPI rank's rows of a batch
    of n) only those rows are read and yielded, augmented as they are in the whole batch."""
    n = len(split)
    order = np.arange(n) if order is None else order
    per_channel = (1, -1) + (1,) * (split.x.ndim - 2)  # images (N, C, H, W), or features (N, C)
    scale = (1.0 / (ds.pixel_scale * ds.std)).astype(np.float32).reshape(per_channel)
    shift = (ds.mean / ds.std).astype(np.float32).reshape(per_channel)
    for b in range(start, -(-n // batch_size)):
        idx_ = order[b * batch_size : (b + 1) * batch_size]
        part = None
        if share is not None:
            lo, hi = share(len(idx_))
            idx_, part = idx_[lo:hi], (lo, hi, len(idx_))
        x = split.x[idx_]
        if augment_spec is not None:
            x = augment.apply(x, augment_spec, rng, None if flips is None else flips[idx_], part)
        x = x.astype(np.float32)
        x *= scale
        x -= shift
        yield x, split.y[idx_]
