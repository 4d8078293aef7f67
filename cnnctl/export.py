"""ONNX export of a trained network (the optional `onnx` extra), normalisation baked in.

The graph's input is `input` (N, C, H, W) float32 with pixels on the 0..1 scale (uint8 / 255), as
`cnnctl predict` feeds the model; a Sub and a Div node apply the checkpoint's per-channel mean and std.
The output `output` holds the logits, or probabilities with softmax=True.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import nn
from .checkpoint import atomic_write_bytes
from .errors import CnnctlError

OPSET = 17


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise CnnctlError("ONNX export needs the onnx package, which is not installed",
                          "pip install 'cnnctl[onnx]'") from None
    return onnx, helper, numpy_helper


def to_onnx(model: nn.Sequential, input_shape, normalization: dict, name: str, softmax: bool = False):
    onnx, helper, numpy_helper = _onnx()
    nodes, inits = [], []
    c = input_shape[0]

    def const(tag: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), tag))
        return tag

    mean = const("norm.mean", np.asarray(normalization.get("mean", [0.0] * c)).reshape(1, c, 1, 1))
    std = const("norm.std", np.asarray(normalization.get("std", [1.0] * c)).reshape(1, c, 1, 1))
    nodes += [helper.make_node("Sub", ["input", mean], ["centred"]),
              helper.make_node("Div", ["centred", std], ["x0"])]
    x, shape = "x0", tuple(input_shape)

    def act(a, src, out):
        """An activation layer as its ONNX op; returns the output name."""
        if a is None:
            return src
        kwargs = {"alpha": a.negative_slope} if isinstance(a, nn.LeakyReLU) else \
            {"alpha": a.alpha} if isinstance(a, nn.ELU) else {"axis": 1} if isinstance(a, nn.Softmax) else {}
        op = {nn.ReLU: "Relu", nn.LeakyReLU: "LeakyRelu", nn.ELU: "Elu", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh",
              nn.Softmax: "Softmax"}[type(a)]
        nodes.append(helper.make_node(op, [src], [out], **kwargs))
        return out

    for i, layer in enumerate(model.layers):
        p, out = f"layers.{i}.", f"layers.{i}.out"
        if isinstance(layer, nn.Conv2D):
            t, b, l, r = layer._pads(shape[1:])
            inputs = [x, const(p + "weight", layer.params["weight"])]
            if "bias" in layer.params:
                inputs.append(const(p + "bias", layer.params["bias"]))
            nodes.append(helper.make_node("Conv", inputs, [out], kernel_shape=list(layer.kernel_size),
                                          strides=list(layer.stride), dilations=list(layer.dilation),
                                          pads=[t, l, b, r]))
            out = act(layer.activation, out, p + "act")
        elif isinstance(layer, (nn.MaxPool2D, nn.AvgPool2D)):
            (ph, pw) = layer.padding
            is_max = isinstance(layer, nn.MaxPool2D)
            op, extra = ("MaxPool", {}) if is_max else ("AveragePool", {"count_include_pad": 1})
            nodes.append(helper.make_node(op, [x], [out], kernel_shape=list(layer.kernel_size),
                                          strides=list(layer.stride), pads=[ph, pw, ph, pw], **extra))
        elif isinstance(layer, nn.GlobalAvgPool2D):
            nodes += [helper.make_node("GlobalAveragePool", [x], [p + "gap"]),
                      helper.make_node("Flatten", [p + "gap"], [out], axis=1)]
        elif isinstance(layer, nn.Flatten):
            nodes.append(helper.make_node("Flatten", [x], [out], axis=1))
        elif isinstance(layer, nn.Dense):
            inputs = [x, const(p + "weight", layer.params["weight"])]
            if "bias" in layer.params:
                inputs.append(const(p + "bias", layer.params["bias"]))
            nodes.append(helper.make_node("Gemm", inputs, [out], transB=1))
            out = act(layer.activation, out, p + "act")
        elif isinstance(layer, (nn.BatchNorm1D, nn.BatchNorm2D)):
            nodes.append(helper.make_node(
                "BatchNormalization",
                [x, const(p + "weight", layer.params["weight"]), const(p + "bias", layer.params["bias"]),
                 const(p + "running_mean", layer.buffers["running_mean"]),
                 const(p + "running_var", layer.buffers["running_var"])],
                [out], epsilon=layer.eps, momentum=1 - layer.momentum))
        elif isinstance(layer, nn.Dropout):
            nodes.append(helper.make_node("Identity", [x], [out]))
        else:  # a standalone activation
            out = act(layer, x, out)
        x, shape = out, layer.output_shape(shape)
    if softmax:
        nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=1))
        x = "probabilities"
    nodes.append(helper.make_node("Identity", [x], ["output"]))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", *shape])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cnnctl")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def export_onnx(model, input_shape, normalization, name: str, out: Path, softmax: bool = False) -> Path:
    m = to_onnx(model, input_shape, normalization, name, softmax)
    atomic_write_bytes(Path(out), m.SerializeToString())
    return Path(out)
