"""dataset: csv: a CSV of picture files (columns path, label and optionally split), given as data.path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnctl.core.fileio import Unreadable, read_regular
from cnnctl.errors import DataError

from .formats import Listing, Raw, decoded, label_matrix, register_format
from .pictures import pillow

MAX_CSV_BYTES = 64 << 20  # a list of picture paths; a million rows is about 50 MB
MAX_CLASS_NAME = 1000  # characters of one label
MAX_NUMBERED_CLASSES = 100_000  # integer labels may leave classes out, up to this many (or one per row)
MAX_LABEL_BYTES = 1 << 30  # a multi-label CSV's 0/1 matrix (a byte per picture and label): 1 GB
CSV_SPLITS = ("train", "val", "test")


def csv_text(path: Path, named: str, fix: str | None = None) -> str:
    """The text of a CSV file (UTF-8, at most MAX_CSV_BYTES), or a DataError starting with `named` (the file as
    the message calls it) and, for a file that is missing or unreadable, `fix`."""
    try:
        return read_regular(path, MAX_CSV_BYTES).decode("utf-8-sig")
    except Unreadable as e:
        raise DataError(f"{named}: " + ("no such file" if e.missing else f"cannot read it ({e.reason})"), fix) \
            from None
    except UnicodeDecodeError as e:
        raise DataError(f"{named}: not UTF-8 text ({e.reason})", "save the CSV as UTF-8") from None


def list_csv(path: Path, input_shape, multilabel: bool = False) -> Listing:
    """A CSV of pictures: columns `path` and `label` (and optionally `split`: train, val or test; default train),
    paths relative to the CSV's folder, labels as class names (sorted) or as integers 0..K-1. Every missing file,
    unknown split and bad row is named in one message. `multilabel`: the label column lists an image's labels
    as a|b|c (none for an empty one), the labels sorted by name, y one 0/1 column per label."""
    pillow()
    c = input_shape[0]
    if c not in (1, 3):
        raise DataError(f"dataset: csv decodes grayscale (1 channel) or RGB (3), but input_shape has {c} channels")
    text = csv_text(path, f"data.path {path}", "give the CSV of pictures: columns path,label (and optionally split)")
    rows, bad = _rows(path, text, multilabel)
    if multilabel:
        return _label_lists(path, rows, bad)
    numbered = rows and all(label.isascii() and label.isdigit() for *_, label in rows)
    limit = max(len(rows), MAX_NUMBERED_CLASSES)
    for line, _, _, label in rows if numbered else []:
        if int(label) >= limit:  # the class list is 0..K-1: a label's value would size it
            bad.append(f"line {line}: label {label} is beyond the data: integer labels number the classes "
                       f"0..K-1, and this CSV has {len(rows):,} rows")
    _refuse(path, rows, bad, "labels as class names or as 0..K-1")
    labels = [label for *_, label in rows]
    if numbered:
        classes = [str(i) for i in range(max(int(v) for v in labels) + 1)]
        index = {str(int(v)): int(v) for v in labels}
        labels = [str(int(v)) for v in labels]
    else:
        classes = sorted(set(labels))
        index = {name: i for i, name in enumerate(classes)}
    rows = [(split, f, label) for _, split, f, label in rows]
    splits = {}
    for name in CSV_SPLITS:
        picked = [(f, index[label]) for (split, f, _), label in zip(rows, labels) if split == name]
        if picked:
            splits[name] = ([f for f, _ in picked], np.asarray([y for _, y in picked], np.int64))
    return Listing(classes, splits, {name: f"{path} ({name} rows)" for name in splits})


def _refuse(path: Path, rows: list, bad: list[str], labels: str) -> None:
    """The one message for a CSV with bad rows, or without training rows."""
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{path}: {len(bad)} rows cannot be used:\n  {shown}",
                        f"fix or remove those rows (one picture per row: path,label[,split]; {labels})")
    if not any(split == "train" for _, split, _, _ in rows):
        raise DataError(f"{path}: no training rows", "give rows with split train (or no split column)")


def label_names(label: str) -> list[str]:
    """A multi-label CSV's label cell as the names it lists (a|b|c; none for an empty cell)."""
    return [name.strip() for name in label.split("|")] if label else []


def _label_lists(path: Path, rows: list, bad: list[str]) -> Listing:
    """A multi-label CSV's listing: every label named in the label columns (a|b|c), sorted; y (N, labels) 0/1."""
    lists = [label_names(label) for *_, label in rows]
    for (line, *_), names in zip(rows, lists):
        if "" in names:
            bad.append(f"line {line}: an empty label between '|'s")
    _refuse(path, rows, bad, "labels listed as a|b|c")
    classes = sorted({name for names in lists for name in names})
    if len(rows) * len(classes) > MAX_LABEL_BYTES:
        raise DataError(f"{path}: {len(rows):,} pictures and {len(classes):,} different labels: their 0/1 matrix "
                        f"would take {len(rows) * len(classes) / 1e9:.1f} GB", "check the label column (labels "
                        "separated by |); keep the labels a model should learn")
    index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for name in CSV_SPLITS:
        mine = [(f, names) for (_, split, f, _), names in zip(rows, lists) if split == name]
        if mine:
            splits[name] = ([f for f, _ in mine], label_matrix([[index[n] for n in names] for _, names in mine],
                                                                len(classes)))
    return Listing(classes, splits, {name: f"{path} ({name} rows)" for name in splits})


def load_csv(path: Path, input_shape, resize: int | None = None):
    """The CSV's pictures decoded as the folder dataset decodes them: (classes, train, val or None, test)."""
    raw = decoded(list_csv(path, input_shape), input_shape, resize)
    return raw.classes, raw.train, raw.val, raw.test


def _rows(path: Path, text: str, multilabel: bool = False) -> tuple[list[tuple[int, str, Path, str]], list[str]]:
    """The usable rows of the CSV's text as (line, split, file, label), and what is wrong with the others."""
    import csv
    import io

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
        if not row["path"] or not (label or multilabel):  # an image may have no labels of a list
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
    return rows, bad


def _listing(spec, input_shape, multilabel: bool = False) -> Listing:
    return list_csv(Path(spec.path).expanduser(), input_shape, multilabel)


@register_format("csv", "a CSV of picture files given as data.path: columns path,label[,split]", located_by="path",
                 path_is="the CSV given as data.path (columns path,label[,split])", pictures=True, listing=_listing,
                 multilabel=True)
def load(spec, input_shape, rng, progress, multilabel: bool = False) -> Raw:
    return decoded(_listing(spec, input_shape, multilabel), input_shape, spec.resize)
