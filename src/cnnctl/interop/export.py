"""ONNX export of a trained network (the optional `onnx` extra), normalisation baked in.

The graph's input is `input` (N, C, H, W) float32 with pixels on the 0..1 scale (uint8 / 255), as
`cnnctl predict` feeds the model; a Sub and a Div node apply the checkpoint's per-channel mean and std.
The output `output` holds the logits, or probabilities with softmax=True.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnnctl.core import nn
from cnnctl.core.fileio import atomic_write_bytes
from cnnctl.errors import CnnctlError
from cnnctl.extras import require

OPSET = 17

NORMALIZATION_OPS = ("Sub", "Div")  # the data's normalisation at the graph's start: (x - mean) / std


def _onnx():
    onnx = require("onnx", "onnx", "ONNX export needs the onnx package, which is not installed")
    from onnx import helper, numpy_helper
    return onnx, helper, numpy_helper


class OnnxGraph:
    """What layers' `onnx` methods add nodes and constants to (they never import onnx themselves)."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits = [], []

    def const(self, name: str, value) -> str:
        self.inits.append(self.numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def ints(self, name: str, values) -> str:
        """An int64 constant (shapes, axes)."""
        self.inits.append(self.numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def arrays(self, name: str, layer, keys: tuple[str, ...]) -> list[str]:
        """The layer's parameters and buffers under these keys (those it has, in this order) as constants named
        after its state-dict path."""
        store = {**layer.params, **layer.buffers}
        return [self.const(f"{name}.{k}", store[k]) for k in keys if k in store]

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        """Add one node named after the layer's state-dict path; returns its output's name."""
        out = f"{name}.out"
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out


def to_onnx(model: nn.Layer, input_shape, normalization: dict, name: str, softmax: bool = False,
            outputs: str = "logits", classes: list[str] | None = None):
    """The ONNX model; with softmax, its output made probabilities from what the model's outputs are (`outputs`,
    what its loss takes: logits get a Softmax, log-probabilities an Exp)."""
    onnx, helper, numpy_helper = _onnx()
    g = OnnxGraph(helper, numpy_helper)
    c = input_shape[0]
    mean = g.const("norm.mean", np.asarray(normalization.get("mean", [0.0] * c)).reshape(1, c, 1, 1))
    std = g.const("norm.std", np.asarray(normalization.get("std", [1.0] * c)).reshape(1, c, 1, 1))
    centre, scale = NORMALIZATION_OPS
    x = g.node(scale, [g.node(centre, ["input", mean], "norm.centre"), std], "norm.scale")
    x = model.onnx(g, x, tuple(input_shape), "")
    shape = model.output_shape(tuple(input_shape))
    if softmax and outputs == "log_probabilities":
        x = g.node("Exp", [x], "probabilities")
    elif softmax and outputs == "label_logits":  # multi-label: each label's own probability
        x = g.node("Sigmoid", [x], "probabilities")
    elif softmax:
        x = g.node(nn.ONNX_OPS["softmax"], [x], "probabilities", axis=1)
    g.nodes.append(helper.make_node("Identity", [x], ["output"], name="output"))
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", *shape])],
        g.inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cnnctl")
    m.ir_version = 8
    meta = {"classes": json.dumps(list(classes or [])), "normalization": json.dumps(normalization or {}),
            "input": "N x C x H x W pixels in 0..1", "output": "probabilities" if softmax else outputs,
            **({"task": "multilabel"} if outputs == "label_logits" else {})}  # each output its own label
    for key, value in meta.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(m)
    return m


def export_onnx(model, input_shape, normalization, name: str, out: Path, softmax: bool = False,
                outputs: str = "logits", classes: list[str] | None = None) -> Path:
    m = to_onnx(model, input_shape, normalization, name, softmax, outputs, classes)
    atomic_write_bytes(Path(out), m.SerializeToString())
    return Path(out)


def verify(path: Path, model, input_shape, normalization: dict, softmax: bool = False,
           outputs: str = "logits") -> tuple[str, float] | None:
    """Run the written file in onnxruntime on random pixels and compare with cnnctl's own outputs: (onnxruntime's
    version, the largest difference relative to the largest output), or None when onnxruntime is not installed.
    A difference above 1e-4 is a CnnctlError (the file is left for inspection)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from cnnctl.core.functional import normalize
    from cnnctl.core.plan import Runner

    x01 = np.random.default_rng(0).random((4, *input_shape), dtype=np.float32)
    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x01})[0]
    ours = Runner(model).forward(normalize(x01, normalization), training=False)
    if softmax and outputs == "log_probabilities":
        ours = np.exp(ours)
    elif softmax and outputs == "label_logits":
        from cnnctl.core.functional import sigmoid

        ours = sigmoid(ours)
    elif softmax:
        from cnnctl.core.functional import softmax as softmax_fn

        ours = softmax_fn(ours, axis=1)
    error = float(np.abs(theirs - ours).max() / max(float(np.abs(ours).max()), 1e-12))
    if error > 1e-4:
        raise CnnctlError(f"{path}: onnxruntime's outputs differ from cnnctl's by {error:.2e} of the largest",
                          "report this network to cnnctl (the file is kept for a look)")
    return ort.__version__, error
