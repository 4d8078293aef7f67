"""CIFAR-10, binary version: cifar-10-batches-bin/data_batch_{1..5}.bin and test_batch.bin, each record one
label byte then 3,072 pixel bytes (1,024 red, 1,024 green, 1,024 blue, row-major 32x32). Nothing is unpickled."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnctl.errors import DataError

from .formats import Raw, fetched_root, register_format

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RECORD = 1 + 3 * 32 * 32
FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}


def folder(root: Path) -> Path:
    """The folder holding the .bin files: root itself or root/cifar-10-batches-bin."""
    sub = root / "cifar-10-batches-bin"
    return sub if sub.is_dir() else root


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"cifar10: missing {path.name} in {path.parent}",
                        "extract cifar-10-binary.tar.gz so that data.root/cifar-10-batches-bin/ holds "
                        "data_batch_1.bin .. data_batch_5.bin and test_batch.bin") from None
    except OSError as e:  # a folder where the file should be, no permission, ...
        raise DataError(f"cifar10: cannot read {path}: {e.strerror or e}", "replace it with the batch file") from None
    if raw.size == 0 or raw.size % RECORD:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
                        "the file is truncated or not the binary version; download it again")
    records = raw.reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label {int(labels.max())} is outside the 10 classes 0..9",
                        "this is not a CIFAR-10 binary batch (CIFAR-100 has two label bytes)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_batch(folder(root) / name) for name in FILES[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@register_format("cifar10", "CIFAR-10, 32x32 colour, 50,000 + 10,000 (binary version; data.download fetches it)",
                 downloads=True, classes=lambda spec: list(CLASSES), image_shape=(3, 32, 32))
def load(spec, input_shape, rng, progress) -> Raw:
    root = fetched_root(spec, progress)
    return Raw(list(CLASSES), load_split(root, "train"), load_split(root, "test"))
