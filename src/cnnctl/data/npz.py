"""dataset: npz: a user's arrays in one .npz file (x_train, y_train, x_test, y_test), read without pickles, every
array's declared size checked before it is read."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from cnnctl.core.memory import refuse_over
from cnnctl.errors import DataError

from .formats import Raw, register_format, root_of

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def nchw(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); NHWC with 1, 3 or 4 channels last -> NCHW."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: {key} has shape {x.shape}; expected images (N, C, H, W), (N, H, W, C) or (N, H, W)")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


MAX_CLASSES = 100_000  # class names are listed; more is not a classification set


# what reading an .npz raises for a file that is not a plain one: object arrays (they need pickle), a torn or
# foreign zip, an unreadable file
NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile)


def open_npz(path: Path):
    """np.load of an .npz archive without pickles; a lone .npy array (renamed) is refused by name."""
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single .npy array, not an .npz archive of named arrays",
                        "save with np.savez(path, x_train=..., y_train=..., ...)")
    return z


def read_array(z, key: str, path: Path) -> np.ndarray:
    """One array of an open .npz, its declared size checked against this machine's memory before it is read
    (a header can claim any size)."""
    try:
        with z.zip.open(f"{key}.npy") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = header(f)
    except KeyError:
        shape, dtype = (), np.dtype(np.uint8)  # not stored as key.npy: let np.load say what it is
    refuse_over(f"{path}: array {key} of shape {tuple(shape)} {dtype}", math.prod(shape) * dtype.itemsize, 2,
                DataError, "the file is damaged, or too large for this machine")
    return z[key]


def load_npz(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(x_train, y_train), (x_test, y_test) from an .npz, read with allow_pickle=False."""
    if not path.is_file():
        raise DataError(f"npz file not found: {path}", "set data.root to the .npz file holding "
                        "x_train, y_train, x_test and y_test")
    try:
        with open_npz(path) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)} (found {', '.join(z.files) or 'none'})",
                                "save the file with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
            arrays = {k: read_array(z, k, path) for k in NPZ_KEYS}
    except DataError:
        raise
    except NPZ_ERRORS as e:
        raise DataError(f"{path}: cannot read as a plain .npz ({e})",
                        "store numeric arrays only (no object arrays), e.g. with np.savez") from None
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8:
            if x.dtype.kind not in "fiu":
                raise DataError(f"{path}: x_{split} has dtype {x.dtype}; expected uint8 or float images")
            with np.errstate(over="ignore"):  # values beyond float32 become inf, counted below
                x = x.astype(np.float32)
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))  # NaN, inf, or beyond float32's range
            if bad:
                raise DataError(f"{path}: x_{split} holds {bad:,} values that are not finite float32 numbers",
                                "repair or drop those images")
        if y.dtype.kind not in "iu" or y.ndim != 1:
            raise DataError(f"{path}: y_{split} must be a 1-D integer array of class labels, got {y.dtype} {y.shape}")
        x = nchw(x, path, f"x_{split}")
        if len(x) != len(y):
            raise DataError(f"{path}: x_{split} holds {len(x)} images but y_{split} holds {len(y)} labels")
        if len(y) and y.min() < 0:
            raise DataError(f"{path}: y_{split} has a negative label {int(y.min())}")
        if len(y) and int(y.max()) > MAX_CLASSES - 1:  # before int64: a uint64 2^64-1 would wrap to -1
            raise DataError(f"{path}: y_{split} has label {int(y.max())}; at most {MAX_CLASSES} classes are supported",
                            "labels are class indices 0..K-1")
        out.append((x, y.astype(np.int64)))
    if out[0][0].shape[1:] != out[1][0].shape[1:]:
        raise DataError(f"{path}: train images {out[0][0].shape[1:]} and test images {out[1][0].shape[1:]} differ")
    return out[0], out[1]


@register_format("npz", "arrays in one .npz file (data.root): x_train, y_train, x_test, y_test; data.classes "
                 "names the labels", classes=lambda spec: list(spec.classes) if spec.classes else None)
def load(spec, input_shape, rng, progress) -> Raw:
    root = root_of(spec)
    train, test = load_npz(root)
    classes = list(spec.classes) if spec.classes else None
    n = int(max(train[1].max(initial=-1), test[1].max(initial=-1))) + 1
    if classes is not None and n > len(classes):
        raise DataError(f"{root}: label {n - 1} is outside the {len(classes)} classes of data.classes",
                        "list every class in data.classes, or fix the labels")
    return Raw(classes or [str(i) for i in range(n)], train, test)
