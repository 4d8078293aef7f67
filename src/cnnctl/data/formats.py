"""The dataset registry: every `data.dataset` name is a format registered here by its own module (how it is found,
what it reads, its classes and image shape when known in advance, and its loader). `DataSpec.dataset`, the
`data.path` and `data.resize` checks, `cnnctl data` and the README's dataset table come from it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from cnnctl.errors import DataError

Arrays = tuple[np.ndarray, np.ndarray]  # images (N, C, H, W) and labels (N,)
DataSpec = Any  # the `data:` section (data/spec.py, which is made from this registry)


class Raw(NamedTuple):
    """What a format's loader gives: the class names, the training data, the test split (empty arrays when the
    data has none) and the validation split when the data itself names one (else None: carved by val_split)."""

    classes: list[str]
    train: Arrays
    test: Arrays
    val: Arrays | None = None


class Listing(NamedTuple):
    """A picture format's files before any is decoded: the class names and, per split ("train", "test" and
    optionally "val"), the picture files with their labels. `cnnctl pack` decodes it in parallel, a shard at a
    time; a run decodes it whole (`decoded`)."""

    classes: list[str]
    splits: dict[str, tuple[list[Path], np.ndarray]]
    where: dict[str, str]  # each split's source, for messages


def label_matrix(rows: list[list[int]], count: int) -> np.ndarray:
    """Multi-label data's labels: (len(rows), count) uint8, 1 in row i at each label index rows[i] lists."""
    y = np.zeros((len(rows), count), np.uint8)
    for i, row in enumerate(rows):
        y[i, row] = 1
    return y


def decoded(listing: Listing, input_shape, resize: int | None) -> Raw:
    """Every picture of a listing decoded (cnnctl.data.pictures): the Raw a run reads."""
    from .pictures import decode_images

    arrays = {name: (decode_images(paths, tuple(input_shape), listing.where[name], resize), labels)
              for name, (paths, labels) in listing.splits.items()}
    labels = listing.splits["train"][1]
    empty = (np.empty((0, *input_shape), np.uint8), np.empty((0, *labels.shape[1:]), labels.dtype))
    return Raw(listing.classes, arrays["train"], arrays.get("test", empty), arrays.get("val"))


@dataclass(frozen=True)
class Format:
    name: str
    load: Callable[..., Raw]  # (spec: DataSpec, input_shape, rng, progress) -> Raw
    describe: str  # one line for docs and `cnnctl data`
    located_by: Literal["root", "path", "nothing"] = "root"  # data.root (a folder or file), data.path, or neither
    path_is: str = ""  # what data.path names, for a format located by it
    pictures: bool = False  # decodes picture files: data.resize applies
    downloads: bool = False  # data.download fetches its files
    classes: Callable[[DataSpec], list[str] | None] | None = None  # known without reading any file
    image_shape: tuple[int, int, int] | None = None  # fixed by the format
    listing: Callable[[DataSpec, Any], Listing] | None = None  # picture formats: (spec, input_shape) -> Listing
    verified_in_parts: bool = False  # load takes part=(this process, processes): each verifies its part of the files
    multilabel: bool = False  # load takes multilabel=True: labels per image, y an (N, labels) 0/1 uint8 array


FORMATS: dict[str, Format] = {}


def register_format(name: str, describe: str, **options) -> Callable:
    """Decorator on a loader: registers the format `name` (see Format for the options)."""
    def add(load):
        if name in FORMATS:
            raise ValueError(f"dataset format {name!r} is registered twice")
        FORMATS[name] = Format(name, load, describe, **options)
        return load
    return add


def default_root(dataset: str) -> Path:
    """$CNNCTL_DATA/<dataset> (else ~/.cache/cnnctl/<dataset>); a folder named with hyphens (fashion-mnist, as the
    data is often kept) is taken where the underscore one (fashion_mnist) does not exist."""
    base = Path(os.environ["CNNCTL_DATA"]) if os.environ.get("CNNCTL_DATA") else Path.home() / ".cache" / "cnnctl"
    if not (base / dataset).exists() and (base / dataset.replace("_", "-")).is_dir():
        return base / dataset.replace("_", "-")
    return base / dataset


def root_of(spec: DataSpec) -> Path:
    return Path(spec.root).expanduser() if spec.root else default_root(spec.dataset)


def fetch(spec: DataSpec, progress=None) -> None:
    """A downloadable format's files fetched when the config asks for it (data.download), and nothing else read:
    what one process does before several read the same folder."""
    from . import download

    if FORMATS[spec.dataset].downloads and spec.download:
        download.ensure(spec.dataset, root_of(spec), progress, spec.mirror)


def fetched_root(spec: DataSpec, progress) -> Path:
    """The folder of a downloadable format's files: fetched first with data.download, else it must exist."""
    root = root_of(spec)
    if spec.download:
        fetch(spec, progress)
    elif not root.is_dir():
        raise DataError(f"{spec.dataset}: data folder {root} does not exist",
                        "set data.root (or --set data.root=PATH) to the folder holding the files, or set "
                        "data.download: true to fetch them")
    return root
