"""A user's own data: an `.npz` of arrays, or an ImageFolder tree of PNG/JPEG files (Pillow, optional)."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from cnnctl.core.fileio import Unreadable, read_regular
from cnnctl.core.memory import refuse_over
from cnnctl.errors import DataError
from cnnctl.extras import require

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _nchw(x: np.ndarray, path: Path, key: str) -> np.ndarray:
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
        x = _nchw(x, path, f"x_{split}")
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


def _pillow():
    require("PIL.Image", "images", "decoding picture files (PNG, JPEG, ...) needs Pillow, which is not installed",
            DataError)
    from PIL import Image
    return Image


# the formats cnnctl decodes, by Pillow's name: nothing else is opened whatever a file's name or content (a
# PostScript file named .png would otherwise run Ghostscript, an external program)
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # 16-bit (and 32-bit integer) grayscale


def decode_image(path: Path, input_shape, resize: int | None = None) -> np.ndarray:
    """One picture file as uint8 (C, H, W) of the input shape: grayscale (C 1) or RGB (C 3), resized bilinearly
    (with `resize`: its shorter side to `resize` pixels, aspect kept, then the centre H x W cut out).
    16-bit grayscale keeps its range (0..65535 becomes 0..255; Pillow's convert would clip it to 255). Raises
    ValueError with the reason for anything that is not a readable image of a documented format."""
    Image = _pillow()
    c, h, w = input_shape
    try:
        with Image.open(path, formats=FORMATS) as im:
            if im.mode in WIDE_MODES:
                wide = np.asarray(im, dtype=np.float64)  # only 16-bit PNGs decode to these modes
                im = Image.fromarray(np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
            im = im.convert("L" if c == 1 else "RGB")
            if resize is None:
                im = im.resize((w, h), Image.BILINEAR)
            else:  # torchvision's Resize(resize) then CenterCrop((h, w))
                short, long_ = sorted(im.size)
                scaled = (resize, int(resize * long_ / short))
                im = im.resize(scaled if im.size[0] <= im.size[1] else scaled[::-1], Image.BILINEAR)
                top, left = int(round((im.size[1] - h) / 2.0)), int(round((im.size[0] - w) / 2.0))
                im = im.crop((left, top, left + w, top + h))
            arr = np.asarray(im, dtype=np.uint8)
    except MemoryError:
        raise
    except Image.UnidentifiedImageError:
        raise ValueError(f"not a picture in one of the formats cnnctl reads ({', '.join(FORMATS)})") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for damaged files
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


def decode_images(paths: list[Path], input_shape, where: str, resize: int | None = None) -> np.ndarray:
    """Every file decoded into one uint8 (N, C, H, W) array, allocated once after a memory check; every file
    that cannot be decoded is named in one error."""
    refuse_over(f"{len(paths):,} images of shape {tuple(input_shape)} from {where}",
                len(paths) * math.prod(input_shape), 4, DataError,  # a quarter: the splits are copied once more
                "use a smaller model.input_shape, or fewer images")
    out = np.empty((len(paths), *input_shape), np.uint8)
    bad = []
    for i, f in enumerate(paths):
        try:
            out[i] = decode_image(f, input_shape, resize)
        except ValueError as e:
            bad.append(f"{f}: {e}")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} of {len(paths):,} files in {where} cannot be decoded:\n  {shown}",
                        "remove or replace them (cnnctl reads " + ", ".join(FORMATS) + ")")
    return out


def load_folder(root: Path, input_shape, resize: int | None = None) -> tuple[list[str], tuple, tuple]:
    """ImageFolder: root/train/<class>/*.png|jpg and, when present, root/test/<class>/... (else an empty test
    split), resized to the input shape."""
    _pillow()
    c, h, w = input_shape
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
    splits = []
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
        images = decode_images(paths, (c, h, w), str(root / split), resize)
        splits.append((images, np.asarray(labels, np.int64)))
    return classes, splits[0], splits[1]


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


MAX_CSV_BYTES = 64 << 20  # a list of picture paths; a million rows is about 50 MB
MAX_CLASS_NAME = 1000  # characters of one label
MAX_NUMBERED_CLASSES = 100_000  # integer labels may leave classes out, up to this many (or one per row)
CSV_SPLITS = ("train", "val", "test")


def load_csv(path: Path, input_shape, resize: int | None = None):
    """A CSV of pictures: columns `path` and `label` (and optionally `split`: train, val or test; default train),
    paths relative to the CSV's folder, labels as class names (sorted) or as integers 0..K-1. Decoded as the folder
    dataset decodes. Returns (classes, train, val or None, test); every missing file, unknown split and picture
    that cannot be decoded is named in one message."""
    import csv
    import io

    _pillow()
    c = input_shape[0]
    if c not in (1, 3):
        raise DataError(f"dataset: csv decodes grayscale (1 channel) or RGB (3), but input_shape has {c} channels")
    try:
        text = read_regular(path, MAX_CSV_BYTES).decode("utf-8-sig")
    except Unreadable as e:
        raise DataError(f"data.path {path}: " + ("no such file" if e.missing else f"cannot read it ({e.reason})"),
                        "give the CSV of pictures: columns path,label (and optionally split)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"data.path {path}: not UTF-8 text ({e.reason})", "save the CSV as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [f.strip() for f in reader.fieldnames or []]
    if "path" not in columns or "label" not in columns:
        raise DataError(f"{path}: its header is {', '.join(columns) or 'empty'}; it needs the columns path and label",
                        "first line: path,label (and ,split to choose each row's split)")
    rows, bad = [], []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # a field over csv's limit, a NUL byte, an unclosed quote at the end
            bad.append(f"line {reader.line_num + 1}: {e}")
            break  # the reader cannot go on past it
        line = reader.line_num
        if None in row or None in row.values():  # more fields than the header (under None), or fewer (None values)
            given = len(columns) + len(row.get(None) or []) if None in row else \
                sum(v is not None for v in row.values())
            bad.append(f"line {line}: {given} fields, the header has {len(columns)}")
            continue
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        split = row.get("split") or "train"
        file = path.parent / row["path"]
        label = row["label"]
        if not row["path"] or not label:
            bad.append(f"line {line}: an empty path or label")
        elif split not in CSV_SPLITS:
            bad.append(f"line {line}: split {split!r} is not train, val or test")
        elif label.isdigit() and not label.isascii():
            bad.append(f"line {line}: label {label!r} is written with digits other than 0-9")
        elif len(label) > MAX_CLASS_NAME:
            bad.append(f"line {line}: a label of {len(label):,} characters (at most {MAX_CLASS_NAME})")
        elif not file.is_file():
            bad.append(f"line {line}: {file} does not exist")
        else:
            rows.append((line, split, file, label))
    numbered = rows and all(label.isascii() and label.isdigit() for *_, label in rows)
    limit = max(len(rows), MAX_NUMBERED_CLASSES)
    for line, _, _, label in rows if numbered else []:
        if int(label) >= limit:  # the class list is 0..K-1: a label's value would size it
            bad.append(f"line {line}: label {label} is beyond the data: integer labels number the classes "
                       f"0..K-1, and this CSV has {len(rows):,} rows")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{path}: {len(bad)} rows cannot be used:\n  {shown}", "fix or remove those rows "
                        "(one picture per row: path,label[,split]; labels as class names or as 0..K-1)")
    if not any(split == "train" for _, split, _, _ in rows):
        raise DataError(f"{path}: no training rows", "give rows with split train (or no split column)")
    labels = [label for *_, label in rows]
    if numbered:
        classes = [str(i) for i in range(max(int(v) for v in labels) + 1)]
        index = {str(int(v)): int(v) for v in labels}
        labels = [str(int(v)) for v in labels]
    else:
        classes = sorted(set(labels))
        index = {name: i for i, name in enumerate(classes)}
    rows = [(split, f, label) for _, split, f, label in rows]
    out = []
    for name in CSV_SPLITS:
        picked = [(f, index[label]) for (split, f, _), label in zip(rows, labels) if split == name]
        if not picked:
            out.append(None)
            continue
        images = decode_images([f for f, _ in picked], tuple(input_shape), f"{path} ({name} rows)", resize)
        out.append((images, np.asarray([y for _, y in picked], np.int64)))
    train, val, test = out
    empty = (np.empty((0, *input_shape), np.uint8), np.empty(0, np.int64))
    return classes, train, val, test if test is not None else empty
