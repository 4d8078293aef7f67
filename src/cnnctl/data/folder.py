"""dataset: folder: an ImageFolder tree of picture files, ROOT/train/<class>/*.png (and ROOT/test/<class>/...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnctl.errors import DataError

from .formats import Listing, Raw, decoded, label_matrix, register_format, root_of
from .pictures import IMAGE_SUFFIXES, pillow


def list_folder(root: Path, input_shape, multilabel: bool = False) -> Listing:
    """ImageFolder: root/train/<class>/*.png|jpg and, when present, root/test/<class>/... (else no test split).
    `multilabel`: each label folder lists the pictures that have the label, and a picture under several of them
    (the same file name, and the same bytes: a copy or a link) has all of them; y (N, labels) 0/1."""
    pillow()
    c = input_shape[0]
    if c not in (1, 3):
        raise DataError(f"dataset: folder decodes grayscale (1 channel) or RGB (3), but input_shape has {c} channels")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{train_dir} does not exist", "lay the images out as ROOT/train/<class>/*.png (and "
                        "optionally ROOT/test/<class>/*.png), and set data.root to ROOT")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir} has no class folders", "put each class's images in train/<class name>/")
    test_dir = root / "test"
    if test_dir.is_dir():
        extra = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise DataError(f"{test_dir} has classes {extra} that train/ does not have")
    splits = {}
    for split in ("train", "test"):
        paths, labels = [], []
        for label, name in enumerate(classes):
            folder = root / split / name
            found = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) \
                if folder.is_dir() else []  # regular files only: a named pipe would block the read forever
            paths += found
            labels += [label] * len(found)
        if not paths and (split == "train" or test_dir.is_dir()):
            raise DataError(f"{root / split} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
                            f"put images in {root / split}/<class>/")
        if paths:
            splits[split] = _label_lists(paths, labels, len(classes)) if multilabel else \
                (paths, np.asarray(labels, np.int64))
    return Listing(classes, splits, {name: str(root / name) for name in splits})


def _label_lists(paths: list[Path], labels: list[int], count: int) -> tuple[list[Path], np.ndarray]:
    """One row per picture name with a 0/1 column per label folder it is in; a name shared by pictures that
    differ is an error (two pictures, not one with two labels)."""
    first: dict[str, int] = {}
    rows: list[list[int]] = []
    files: list[Path] = []
    for path, label in zip(paths, labels):
        i = first.setdefault(path.name, len(files))
        if i == len(files):
            files.append(path)
            rows.append([])
        elif not _same_picture(files[i], path):
            raise DataError(f"{files[i]} and {path} share a name but are different pictures",
                            "in a multi-label folder the same picture goes under each of its labels' folders "
                            "(a copy or a link, the same file name); give different pictures different names")
        rows[i].append(label)
    return files, label_matrix(rows, count)


def _same_picture(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b) or (a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes())
    except OSError as e:
        raise DataError(f"cannot read {b}: {e.strerror}", "check the file's permissions") from None


def load_folder(root: Path, input_shape, resize: int | None = None) -> tuple[list[str], tuple, tuple]:
    """(classes, train, test) of an ImageFolder tree, decoded and resized to the input shape (test empty without
    root/test)."""
    raw = decoded(list_folder(root, input_shape), input_shape, resize)
    return raw.classes, raw.train, raw.test


def _listing(spec, input_shape, multilabel: bool = False) -> Listing:
    return list_folder(root_of(spec), input_shape, multilabel)


@register_format("folder", "picture files in ROOT/train/<class>/ (and ROOT/test/<class>/), data.root ROOT",
                 pictures=True, listing=_listing, multilabel=True)
def load(spec, input_shape, rng, progress, multilabel: bool = False) -> Raw:
    return decoded(_listing(spec, input_shape, multilabel), input_shape, spec.resize)
