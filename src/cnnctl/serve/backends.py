"""What a server runs, behind one interface: a checkpoint or run directory through cnnctl's own NumPy forward pass
(the numbers `cnnctl predict` gives, and Grad-CAM), or an .onnx file that `cnnctl export` wrote (the float or the
int8 model) through onnxruntime, its normalisation and class names read from the file's metadata."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnctl.core import functional as F
from cnnctl.errors import CnnctlError
from cnnctl.extras import require


@dataclass
class Served:
    """A model ready to serve: `probabilities(x01)` maps (N, C, H, W) float32 pixels in 0..1 to (N, classes);
    `explain(x01)`, where there is one, gives Grad-CAM pictures (PNG bytes) and the class each explains."""

    name: str
    platform: str  # "cnnctl-numpy" or "onnxruntime"
    input_shape: tuple[int, int, int]
    classes: list[str]
    resize: int | None  # data.resize of the run (pictures scaled and centre-cut as in training), else stretched
    source: str
    probabilities: Callable[[np.ndarray], np.ndarray]
    explain: Callable[[np.ndarray, list[str]], list[tuple[bytes, str]]] | None = None
    multilabel: bool = False  # each class its own label (task: multilabel): /predict lists those over a threshold


def open_model(path: Path, name: str | None = None) -> Served:
    """A checkpoint, a run directory or an .onnx file as a Served model (named `name`, else after its run)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return _onnx(path, name)
    return _checkpoint(path, name)


def _checkpoint(path: Path, name: str | None) -> Served:
    from cnnctl import api
    from cnnctl.core.functional import normalize
    from cnnctl.core.nn import LOSSES
    from cnnctl.tools import explain as explain_lib
    from cnnctl.tools import plots

    predictor = api.load(path)
    spec = predictor.spec

    def explain(x01: np.ndarray, names: list[str]) -> list[tuple[bytes, str]]:
        maps, ks, used = explain_lib.explain(predictor.model, normalize(x01, predictor.normalization), "gradcam",
                                             takes=LOSSES[spec.loss.type].takes)
        return [(plots.plot_explanation(x01[i], maps[i], None,
                                        f"{names[i]}: gradcam of {used} for class {predictor.classes[ks[i]]}"),
                 predictor.classes[ks[i]]) for i in range(len(x01))]

    return Served(name or spec.name, "cnnctl-numpy", tuple(spec.model.input_shape), list(predictor.classes),
                  spec.data.resize, str(predictor.checkpoint_path), predictor.predict, explain,
                  multilabel=spec.task == "multilabel")


# what `cnnctl export` says its output holds (label_logits: a multi-label model's, each label its own sigmoid)
OUTPUTS = ("logits", "log_probabilities", "probabilities", "scores", "label_logits")


def _onnx(path: Path, name: str | None) -> Served:
    ort = require("onnxruntime", "serve", "serving an .onnx file needs onnxruntime, which is not installed")
    if not path.is_file():
        raise CnnctlError(f"model file not found: {path}", "give a checkpoint, a run directory or an .onnx file")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own errors for a damaged or foreign file
        raise CnnctlError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e)[:200]})",
                          "give a model that `cnnctl export` wrote") from None
    meta = session.get_modelmeta()
    props = meta.custom_metadata_map
    inputs = session.get_inputs()
    if props.get("output") not in OUTPUTS or len(inputs) != 1:
        raise CnnctlError(f"{path} was not written by `cnnctl export` (no 'output' entry in its metadata)",
                          "import it (cnnctl import), then export the imported model, or serve a checkpoint")
    shape = inputs[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise CnnctlError(f"{path}: its input has shape {shape}, not N x C x H x W with a fixed C, H and W")
    try:
        classes = [str(c) for c in json.loads(props.get("classes", "[]"))]
    except ValueError:
        raise CnnctlError(f"{path}: its 'classes' metadata is not a JSON list") from None
    held = props["output"]
    outputs = session.get_outputs()[0].shape
    n = outputs[-1] if isinstance(outputs[-1], int) else None
    if n is None:
        raise CnnctlError(f"{path}: its output has shape {outputs}, no fixed number of classes")
    classes = classes if len(classes) == n else [str(i) for i in range(n)]
    input_name = inputs[0].name

    def probabilities(x01: np.ndarray) -> np.ndarray:
        out = session.run(None, {input_name: np.ascontiguousarray(x01, np.float32)})[0]
        return F.probabilities(out, held).astype(np.float32, copy=False)  # "probabilities": as they are

    graph = meta.graph_name or path.stem
    return Served(name or graph, "onnxruntime", tuple(shape[1:]), classes, None, str(path), probabilities,
                  multilabel=props.get("task") == "multilabel")
