"""Prediction: inputs from image files (Pillow) or an .npz as the model's input shape (also for visualisation),
and the top classes with their probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnctl.core import functional as F
from cnnctl.core.functional import normalize
from cnnctl.core.nn import LOSSES
from cnnctl.data import dataset_info, npz
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


def top_classes(names: list[str], probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    """Per input, the k most probable classes: {input, prediction, top: [{class, probability}]}."""
    k = min(k, len(classes))
    results = []
    for name, p in zip(names, probs):
        order = np.argsort(-p, kind="stable")[:k]
        results.append({"input": name, "prediction": classes[order[0]],
                        "top": [{"class": classes[j], "probability": float(p[j])} for j in order]})
    return results
