"""Prediction: inputs from image files (Pillow) or an .npz as the model's input shape (also for visualisation),
and the top classes with their probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnctl.core import functional as F
from cnnctl.core.functional import normalize
from cnnctl.core.nn import LOSSES
from cnnctl.data import dataset_info, npz
from cnnctl.data.csvfile import label_names
from cnnctl.data.pictures import decode_images
from cnnctl.errors import DataError


def load_inputs(paths: list[Path], input_shape, resize: int | None = None) -> tuple[list[str], np.ndarray]:
    """(names, images (N, C, H, W)) from image files (decoded as the folder dataset decodes them: `resize` is
    data.resize) and/or .npz files (array `x`, `x_test` or `images`)."""
    c, h, w = input_shape
    names, arrays, pictures = [], [], []
    for path in map(Path, paths):
        if path.suffix == ".npz":
            if not path.is_file():
                raise DataError(f"file not found: {path}", "check the path")
            try:
                with npz.open_npz(path) as z:
                    key = next((k for k in ("x", "x_test", "images") if k in z.files), None)
                    if key is None:
                        raise DataError(f"{path}: no array named x, x_test or images (found {', '.join(z.files)})")
                    x = npz.nchw(npz.read_array(z, key, path), path, key)
            except npz.NPZ_ERRORS as e:
                raise DataError(f"{path}: cannot read as a plain .npz ({e})", "store numeric arrays with np.savez") \
                    from None
            if x.shape[1:] != (c, h, w):
                raise DataError(f"{path}: images of shape {x.shape[1:]}, the model takes {(c, h, w)}")
            arrays.extend(x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0))
            names.extend(f"{path.name}[{i}]" for i in range(len(x)))
            continue
        if not path.is_file():
            raise DataError(f"image not found: {path}", "check the path; pass picture files or .npz arrays")
        pictures.append((len(arrays), path))
        arrays.append(None)  # decoded below, all pictures at once
        names.append(path.name)
    if not arrays:
        raise DataError("no inputs given", "pass image files or an .npz")
    if pictures:
        decoded = decode_images([p for _, p in pictures], (c, h, w), "the inputs", resize)
        for (i, _), image in zip(pictures, decoded):
            arrays[i] = image.astype(np.float32) / 255.0
    return names, np.stack(arrays).astype(np.float32)


def expand(inputs: list[Path]) -> list[tuple[Path, str | None]]:
    """What predict reads, one (file, true class name or None) per file: a picture or .npz file as given; a
    folder, its picture files found recursively (sorted), each labelled by its first folder under the given one
    (ImageFolder's layout: FOLDER/<class>/...); a .csv, its `path` column (relative to the CSV) with its `label`
    column when there is one."""
    from cnnctl.data.pictures import IMAGE_SUFFIXES

    found = []
    for path in map(Path, inputs):
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                raise DataError(f"{path}: no picture files in it ({', '.join(sorted(IMAGE_SUFFIXES))})",
                                "give a folder of pictures, picture files, a CSV of paths or an .npz")
            found += [(f, parts[0] if len(parts) > 1 else None)
                      for f, parts in ((f, f.relative_to(path).parts) for f in files)]
        elif path.suffix.lower() == ".csv":
            found += _csv_rows(path)
        else:
            found.append((path, None))
    return found


def _csv_rows(path: Path) -> list[tuple[Path, str | None]]:
    import csv
    import io

    from cnnctl.data.csvfile import csv_text

    reader = csv.DictReader(io.StringIO(csv_text(path, str(path))))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "path" not in columns:
        raise DataError(f"{path}: its header is {', '.join(columns) or 'empty'}; predict needs a path column "
                        "(and optionally label)", "first line: path or path,label")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    # an empty label is kept as "": a multi-label image with no labels (a single-label model judges it not)
    return [(path.parent / row["path"], row.get("label")) for row in rows if row.get("path")]


def with_labels(results: list[dict], labels: list[str | None], classes: list[str]) -> list[dict]:
    """Each result with its true class and whether the prediction is right, where the input names a class of
    the model (a folder's class subfolder, a CSV's label); a multi-label result (with `labels`) is right when
    its labels are exactly the CSV's (a|b|c, an empty one for none)."""
    known = set(classes)
    for res, label in zip(results, labels):
        if "labels" in res:
            names = set(label_names(label or ""))
            if label is not None and names <= known:
                res["label"], res["correct"] = "|".join(sorted(names)), set(res["labels"]) == names
        elif label is not None and label in known:
            res["label"], res["correct"] = label, res["prediction"] == label
    return results


def outputs(model, x01: np.ndarray, normalization: dict, tta, batch_size: int) -> np.ndarray:
    """The model's outputs for inputs on the 0..1 scale, batch_size at a time: memory stays that of one batch
    however many inputs there are."""
    from cnnctl.core.plan import Runner
    from cnnctl.run.evaluation import infer  # the trainer's own inference (test-time views included)

    model = Runner(model)

    return np.concatenate([infer(model, normalize(x01[i : i + batch_size], normalization), tta)
                           for i in range(0, len(x01), batch_size)])


def probabilities(spec, outputs: np.ndarray) -> np.ndarray:
    """Class probabilities from a model's outputs, by what its loss takes: the softmax of logits
    (cross_entropy), the exponential of log-probabilities (nll); scores (mse) as they are."""
    return F.probabilities(outputs, LOSSES[spec.loss.type].takes)


def class_names(spec, n: int, ckpt) -> list[str]:
    """The class names a checkpoint's run saw (else the dataset's, else 0..n-1)."""
    names = (ckpt.run.classes if ckpt.run else None) or dataset_info(spec.data)[0]
    return list(names) if names and len(names) == n else [str(i) for i in range(n)]


def top_classes(names: list[str], probs: np.ndarray, classes: list[str], k: int,
                threshold: float | None = None) -> list[dict]:
    """Per input, the k most probable classes: {input, prediction, top: [{class, probability}]}. A multi-label
    model's (`threshold` given): also `labels`, every label of probability `threshold` or more (by probability),
    and the prediction is those labels as a|b|c (empty for none)."""
    k = min(k, len(classes))
    results = []
    for name, p in zip(names, probs):
        order = np.argsort(-p, kind="stable")
        res = {"input": name, "prediction": classes[order[0]],
               "top": [{"class": classes[j], "probability": float(p[j])} for j in order[:k]]}
        if threshold is not None:
            res["labels"] = [classes[j] for j in order if p[j] >= threshold]
            res["prediction"] = "|".join(res["labels"])
        results.append(res)
    return results


def table_bytes(results: list[dict], kind: str) -> bytes:
    """Predictions as a file: `.jsonl`, one result per line; `.csv`, columns input, prediction, probability, the
    other top classes and their probabilities, and label and correct when any input has a true class."""
    import csv
    import io
    import json

    if kind == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in results).encode()
    k = max((len(r["top"]) for r in results), default=0)
    multilabel = any("labels" in r for r in results)  # prediction: the labels over the threshold, a|b|c
    labelled = any("label" in r for r in results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    tops = [f"{c}_{i}" for i in range(1 if multilabel else 2, k + 1) for c in ("class", "probability")]
    w.writerow(["input", "prediction", *([] if multilabel else ["probability"]), *tops,
                *(["label", "correct"] if labelled else [])])
    for r in results:
        rest = [v for t in r["top"][0 if multilabel else 1:] for v in (t["class"], f"{t['probability']:.6g}")]
        w.writerow([r["input"], r["prediction"], *([] if multilabel else [f"{r['top'][0]['probability']:.6g}"]),
                    *rest, *([""] * (2 * (k - len(r["top"])))),
                    *([r.get("label", ""), "" if "correct" not in r else int(r["correct"])] if labelled else [])])
    return buf.getvalue().encode()
