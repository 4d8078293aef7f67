"""dataset: packed: a dataset decoded once by `cnnctl pack` into uint8 N x C x H x W shards (.npy files of a few
hundred MB) and a manifest, read memory-mapped: a batch reads its own rows, so a run's memory does not grow with
the dataset.

    DIR/manifest.json      classes, image shape, the source and resize that made it, per split its count, its
                           shards (file, rows, sha256) and its labels file (int64, sha256)
    DIR/train-00000.npy    rows 0.. of the training data as stored (the validation split is carved from the run's
    DIR/train-labels.npy   seed, as for the source), likewise test- (and val- where the source names one)

`pack` writes each shard atomically as it is made and the manifest last; a killed pack continues with the shards
it has (each checked against its planned rows). It refuses a folder holding anything else, or another pack.
A run checks every file's size and header, and its sha256 unless `data.verify: false`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cnnctl.core.fileio import Unreadable, atomic_write_bytes, read_regular
from cnnctl.errors import CnnctlWarning, DataError

from .formats import FORMATS, Raw, register_format
from .pictures import decode_images

MANIFEST = "manifest.json"
PLAN = "pack-plan.json"  # what a pack in progress is made from: a resumed pack must be the same one
SHARD_BYTES = 256 << 20
KIND = "cnnctl pack 1"


class Rows:
    """Rows of images held in shard files (memory-mapped) as one read-only array: `x[i]`, `x[a:b]`, `x[idx]`
    and `x[idx, c]` read those rows only and give an ndarray; `take(idx)` is a view of some rows, copying
    nothing (a split carved from a split)."""

    def __init__(self, parts: list[np.ndarray], index: np.ndarray | None = None):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.index = index  # the rows of the shards, in order (None: all of them; no array for that)
        self.dtype = parts[0].dtype if parts else np.dtype(np.uint8)
        self.row_shape = tuple(parts[0].shape[1:]) if parts else ()

    @property
    def shape(self) -> tuple:
        return (len(self), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return int(self.starts[-1]) if self.index is None else len(self.index)

    def _rows(self, rows) -> np.ndarray:
        if self.index is not None:
            return self.index[rows]
        return np.arange(*rows.indices(len(self))) if isinstance(rows, slice) else np.asarray(rows)

    def take(self, idx) -> Rows:
        return Rows(self.parts, self._rows(idx))

    def __getitem__(self, key):
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, (int, np.integer)):
            return self[(np.asarray([rows]), *rest)][0]
        wanted = self._rows(rows)
        out = np.empty((len(wanted), *self.row_shape), self.dtype)
        shard = np.searchsorted(self.starts, wanted, side="right") - 1
        for s in np.unique(shard):
            here = shard == s
            local = wanted[here] - self.starts[s]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            out[np.flatnonzero(here)[order]] = self.parts[s][local[order]]
        return out[(slice(None), *rest)] if rest else out

    def astype(self, dtype) -> np.ndarray:
        return self[:].astype(dtype)

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)


def rows_of(x, idx):
    """x[idx] for an array (a copy), a view of the rows for `Rows` (nothing read)."""
    return x.take(idx) if isinstance(x, Rows) else x[idx]


# ------------------------------------------------------------------ reading


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _again(folder: Path) -> str:
    return f"pack the data again: cnnctl pack CONFIG --out {folder}"


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    fix = _again(folder)
    try:
        m = json.loads(read_regular(path, 64 << 20))
    except Unreadable as e:
        what = "no such file" if e.missing else f"cannot read it ({e.reason})"
        raise DataError(f"{path}: {what}" + (" (a pack not finished, or not a pack)" if e.missing else ""),
                        "give data.path a folder that cnnctl pack wrote; " + fix) from None
    except ValueError as e:
        raise DataError(f"{path}: not a complete JSON manifest ({e})", fix) from None
    if not isinstance(m, dict) or m.get("kind") != KIND or not isinstance(m.get("splits"), dict) \
            or not isinstance(m.get("classes"), list):
        raise DataError(f"{path}: not a manifest of cnnctl pack", fix)
    return m


def _open_array(folder: Path, entry: dict, shape: tuple, dtype, verify: bool) -> np.ndarray:
    path = folder / entry["file"]
    fix = _again(folder)
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot be read as the shard the manifest lists ({type(e).__name__}: {e})",
                        fix) from None
    if a.shape != shape or a.dtype != dtype:
        raise DataError(f"{path}: holds {a.dtype} {a.shape}, the manifest says {np.dtype(dtype)} {shape}", fix)
    if verify and _sha256(path) != entry["sha256"]:
        raise DataError(f"{path}: its sha256 differs from the manifest's: the file changed or is damaged", fix)
    return a


def open_pack(folder: Path, verify: bool = True, part: tuple[int, int] = (0, 1)
              ) -> tuple[dict, dict[str, tuple[Rows, np.ndarray]]]:
    """The manifest and, per split, its images (memory-mapped `Rows`) and labels; every file's size and header
    checked, and its sha256 when verify. Processes sharing a pack (MPI ranks, `part` = (this one, how many))
    each hash every how-many-th shard, so that the shards are read once between them."""
    m = read_manifest(folder)
    splits = {}
    mine, ranks = part
    try:
        shape = tuple(int(d) for d in m["image_shape"])
        k = 0
        for name, split in m["splits"].items():
            parts = []
            for e in split["shards"]:
                parts.append(_open_array(folder, e, (e["rows"][1] - e["rows"][0], *shape), np.uint8,
                                         verify and k % ranks == mine))
                k += 1
            # memory-mapped like the shards: a split's own labels are gathered from it (data.labels_at)
            labels = _open_array(folder, split["labels"], (split["count"],), np.int64, verify)
            x = Rows(parts) if parts else Rows([np.empty((0, *shape), np.uint8)])
            if len(x) != split["count"]:
                raise DataError(f"{folder / MANIFEST}: split {name} lists {len(x)} rows in its shards and "
                                f"{split['count']} as its count")
            splits[name] = (x, labels)
    except (KeyError, TypeError, IndexError) as e:
        raise DataError(f"{folder / MANIFEST}: an entry is missing or malformed ({type(e).__name__}: {e})",
                        _again(folder)) from None
    return m, splits


@register_format("packed", "a folder written by cnnctl pack given as data.path: memory-mapped shards",
                 located_by="path", path_is="the folder cnnctl pack wrote, given as data.path", verified_in_parts=True)
def load(spec, input_shape, rng, progress, part: tuple[int, int] = (0, 1)) -> Raw:
    folder = Path(spec.path).expanduser()
    if not spec.verify:
        warnings.warn(f"data.verify is false: the sha256 of {folder}'s shards are not checked (their sizes and "
                      "headers are)", CnnctlWarning, stacklevel=2)
    m, splits = open_pack(folder, spec.verify, part)
    if tuple(m["image_shape"]) != tuple(input_shape):
        raise DataError(f"{folder} holds images of shape {tuple(m['image_shape'])}, model.input_shape is "
                        f"{list(input_shape)}", f"set model.input_shape: {list(m['image_shape'])}, or pack again")
    empty = (Rows([np.empty((0, *input_shape), np.uint8)]), np.empty(0, np.int64))
    return Raw(list(m["classes"]), splits["train"], splits.get("test", empty), splits.get("val"))


# ------------------------------------------------------------------ writing


def _source(spec, input_shape) -> dict:
    """What a pack is made from: the data section's keys that decide the pixels, and the input shape."""
    keys = ("dataset", "root", "path", "resize", "classes", "shapes")
    data = spec.model_dump(mode="json")
    return {"data": {k: data[k] for k in keys if k in data}, "input_shape": list(input_shape)}


def _plan(spec, input_shape, rng) -> tuple[list[str], dict]:
    """(classes, per split (count, labels, images)): images are (picture files, where) for a picture format,
    decoded a shard at a time, else the array a run reads (other formats are bounded by their files)."""
    fmt = FORMATS[spec.dataset]
    if fmt.name == "packed":
        raise DataError("the data is packed already", "give the config the pack was made from")
    if fmt.listing is not None:
        listing = fmt.listing(spec, input_shape)
        return listing.classes, {name: (len(paths), labels, (paths, listing.where[name]))
                                 for name, (paths, labels) in listing.splits.items()}
    raw = fmt.load(spec, input_shape, rng, None)
    out = {"train": raw.train, "test": raw.test, **({"val": raw.val} if raw.val is not None else {})}
    for x, _ in out.values():
        if x.dtype != np.uint8:
            raise DataError(f"dataset '{spec.dataset}' stores {x.dtype} pixels: cnnctl pack stores uint8 images")
    return raw.classes, {name: (len(y), np.asarray(y, np.int64), x) for name, (x, y) in out.items() if len(y)}


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _existing(path: Path, rows: int, shape: tuple) -> str | None:
    """The sha256 of a shard a killed pack left, when it holds exactly the planned rows; else None."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return _sha256(path) if a.shape == (rows, *shape) and a.dtype == np.uint8 else None


def pack(spec, input_shape, rng, out: Path, workers: int | None = None,
         progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Decode the dataset of a config's data section once into DIR (see the module's docstring); returns the
    manifest. Picture files are decoded in `workers` processes (default: the usable cores), a shard at a time."""
    out = Path(out)
    source = _source(spec, input_shape)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder", "give --out a new or empty folder")
    plan_path = out / PLAN
    if (out / MANIFEST).is_file() or plan_path.is_file():
        finished = read_manifest(out) if (out / MANIFEST).is_file() else None
        made_from = finished.get("source") if finished else json.loads(plan_path.read_text()).get("source")
        if made_from != source:
            raise DataError(f"{out} holds a pack of other data ({json.dumps(made_from)[:200]})",
                            "give --out a new folder, or delete that pack first")
        if finished:
            return finished  # packed already
    elif out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out} is not empty and holds no pack", "give --out a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(plan_path, json.dumps({"source": source}).encode())
    classes, plan = _plan(spec, input_shape, rng)
    shape = tuple(input_shape)
    per_shard = max(1, SHARD_BYTES // int(np.prod(shape)))
    total = sum(n for n, _, _ in plan.values())
    written, done = {}, 0
    workers = workers or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        run = map if pool is None else pool.map
        for name, (n, labels, images) in plan.items():
            shards = []
            ranges = [(lo, min(lo + per_shard, n)) for lo in range(0, n, per_shard)]
            todo = []
            for k, (lo, hi) in enumerate(ranges):
                entry = {"file": f"{name}-{k:05d}.npy", "rows": [lo, hi]}
                entry["sha256"] = _existing(out / entry["file"], hi - lo, shape)
                shards.append(entry)
                if entry["sha256"] is None:
                    todo.append(entry)
                else:
                    done += hi - lo
                    progress(done, total)
            for entry in todo:
                lo, hi = entry["rows"]
                if isinstance(images, tuple):  # picture files: decoded in the workers, a slice each
                    paths, where = images
                    step = -(-(hi - lo) // workers)
                    decode = functools.partial(decode_images, input_shape=shape, where=where, resize=spec.resize)
                    x = np.concatenate(list(run(decode, [paths[a:min(a + step, hi)] for a in range(lo, hi, step)])))
                else:
                    x = np.ascontiguousarray(images[lo:hi])
                entry["sha256"] = write_array(out / entry["file"], x)
                done += hi - lo
                progress(done, total)
            written[name] = {"count": n, "shards": shards, "labels": {
                "file": f"{name}-labels.npy", "sha256": write_array(out / f"{name}-labels.npy", labels)}}
    manifest = write_manifest(out, classes, shape, source, written)
    plan_path.unlink()
    return manifest


def write_array(path: Path, a: np.ndarray) -> str:
    """a as a .npy file, written atomically (labels as int64, images as they are); its sha256."""
    blob = _npy_bytes(np.ascontiguousarray(a, np.int64 if a.ndim == 1 else a.dtype))
    atomic_write_bytes(path, blob)
    return hashlib.sha256(blob).hexdigest()


def write_manifest(out: Path, classes: list[str], image_shape, source: dict, splits: dict) -> dict:
    """The manifest of a pack whose files are written (`splits`: name -> {count, shards, labels}, the entries
    `write_array` made): what `pack` writes last, and what a program that makes shards itself writes."""
    manifest = {"kind": KIND, "classes": list(classes), "image_shape": list(image_shape), "dtype": "uint8",
                "source": source, "splits": splits}
    atomic_write_bytes(Path(out) / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest
