"""Writes light_<name>.onnx beside this file: torchvision's ShuffleNetV2 x0.5, ConvNeXt-tiny and DenseNet-121 as
torch.onnx.export writes them (TorchScript exporter, opset 17, dynamic batch, constant folding), each weight then
replaced by a ConstantOfShape of its shape, as the onnx package ships the model zoo's files (tests fill in seeded
random weights). torchvision does not install beside the test suite's torch 2.13.0 (docs/transfer.md), so this runs
in a venv of its own:

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx
    /tmp/tv/bin/python tests/data/torchvision/export_light.py
"""

import os
import tempfile

import numpy as np
import onnx
import torch
import torchvision
from onnx import helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"shufflenet_v2_x0_5": torchvision.models.shufflenet_v2_x0_5,
          "convnext_tiny": torchvision.models.convnext_tiny,
          "densenet121": torchvision.models.densenet121}
SMALL = 64  # values: a tensor this small (reshape targets, axes) stays as it is


def light(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer larger than SMALL values made a ConstantOfShape node of its shape (float zeros)."""
    kept, nodes = [], []
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) <= SMALL or t.data_type != onnx.TensorProto.FLOAT:
            kept.append(t)
            continue
        shape = numpy_helper.from_array(np.array(list(t.dims), np.int64), f"{t.name}/shape")
        kept.append(shape)
        nodes.append(helper.make_node("ConstantOfShape", [shape.name], [t.name], name=f"{t.name}/fill"))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    body = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + body)
    return model


def main():
    torch.manual_seed(0)
    for name, make in MODELS.items():
        net = make(weights=None).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.onnx")
            torch.onnx.export(net, torch.zeros(1, 3, 224, 224), path, dynamo=False, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                              opset_version=17, do_constant_folding=True)
            model = onnx.load(path)
        model.producer_version = f"{model.producer_version}; torchvision {torchvision.__version__}"
        onnx.save(light(model), os.path.join(HERE, f"light_{name}.onnx"))


if __name__ == "__main__":
    main()
