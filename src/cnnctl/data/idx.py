"""IDX files (MNIST, Fashion-MNIST, KMNIST), gzip-compressed or not, read with checks on every header field."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from cnnctl.errors import DataError

from .formats import Raw, fetched_root, register_format

CLASSES = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle-boot"],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find(root: Path, stem: str, dataset: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    wanted = ", ".join(f"{a}.gz" for pair in FILES.values() for a in pair)
    raise DataError(
        f"{dataset}: missing {stem}(.gz) in {root}",
        f"place the four IDX files ({wanted}) in {root}, or point data.root at the folder holding them "
        f"(e.g. --set data.root=PATH)",
    )


MAX_BYTES = 2**32  # 4 GB: far beyond any IDX set (MNIST's largest file is 47 MB)


def read(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with ndim dimensions (3 for images, 1 for labels). The header is checked
    before the body is read, and a gzip file is inflated only as far as the header's shape needs (a small file
    that would inflate to gigabytes is refused after reading one byte past that)."""
    try:
        with path.open("rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if compressed else path.open("rb")) as f:
            head = f.read(4 + 4 * ndim)
            if len(head) < 4 + 4 * ndim or head[0:2] != b"\x00\x00" or head[2] != 0x08 or head[3] != ndim:
                raise DataError(
                    f"{path}: not an IDX file of {ndim}-D unsigned bytes (magic {head[:4].hex() or 'empty'}, "
                    f"expected 0000080{ndim})",
                    "check that images and labels are not swapped and the file is not truncated; download it again",
                )
            dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            expected = math.prod(dims)  # Python integers: no overflow
            if expected > MAX_BYTES:
                raise DataError(f"{path}: header says {dims} ({expected:,} bytes), more than any IDX data set",
                                "the file is corrupt; download it again")
            body = f.read(expected + 1)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read or decompress: {e}", "download the file again") from None
    if len(body) != expected:
        held = f"only {len(body):,} bytes" if len(body) < expected else "more (it was read no further)"
        raise DataError(f"{path}: header says {dims} ({expected:,} bytes) but the file holds {held}",
                        "the file is truncated or corrupt; download it again")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_split(root: Path, split: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 of one split."""
    img_path, lab_path = (find(root, stem, dataset) for stem in FILES[split])
    images, labels = read(img_path, 3), read(lab_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{dataset}: {img_path.name} holds {len(images)} images but {lab_path.name} holds "
                        f"{len(labels)} labels", "the two files are from different sets; download them again")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lab_path}: label {int(labels.max())} is outside the 10 classes 0..9",
                        "the file is corrupt; download it again")
    return images[:, None], labels.astype(np.int64)


def _load(spec, input_shape, rng, progress) -> Raw:
    root = fetched_root(spec, progress)
    return Raw(list(CLASSES[spec.dataset]), load_split(root, "train", spec.dataset),
               load_split(root, "test", spec.dataset))


for _name, _what in (("mnist", "MNIST handwritten digits"), ("fashion_mnist", "Fashion-MNIST clothing"),
                     ("kmnist", "Kuzushiji-MNIST cursive Japanese")):
    register_format(_name, f"{_what}, 28x28 grayscale, 60,000 + 10,000 IDX files (data.download fetches them)",
                    downloads=True, classes=lambda spec: list(CLASSES[spec.dataset]), image_shape=(1, 28, 28))(_load)
