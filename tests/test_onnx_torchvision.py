"""torchvision's ShuffleNetV2 x0.5, ConvNeXt-tiny and DenseNet-121 as torch.onnx.export writes them
(tests/data/torchvision/export_light.py made the files, weights as ConstantOfShape), filled with seeded random
weights and batchnorm statistics (scales and variances in [0.5, 1.5], so that no output is near zero): each imports,
and its class scores equal onnxruntime's to 1e-4 of the largest, at a batch of 2 though the export's was 1."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from cnnctl.interop import onnx_import  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "torchvision")
NETWORKS = {"shufflenet_v2_x0_5": ["split", "channel_shuffle", "concat"],
            "convnext_tiny": ["layernorm2d", "scale", "residual", "gelu"],
            "densenet121": ["concat", "batchnorm2d", "avgpool2d"]}


def _is_scale(model, name: str) -> bool:
    """Whether a tensor is a batchnorm's scale or variance, a layer norm's scale or a layer scale (ConvNeXt's)."""
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and name in (node.input[1], node.input[4]):
            return True
        if node.op_type == "LayerNormalization" and name == node.input[1]:
            return True
        if node.op_type == "Mul" and name in node.input:
            return True
    return False


def materialize(name: str, path, seed: int = 0):
    """The light file with each ConstantOfShape weight made a seeded random initializer (He-scaled)."""
    model = onnx.load(os.path.join(HERE, f"light_{name}.onnx"))
    g = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(int).tolist()
            out = node.output[0]
            if _is_scale(model, out):
                value = g.uniform(0.5, 1.5, shape)
            elif len(shape) > 1:
                value = g.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
            else:
                value = g.standard_normal(shape) * 0.1
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), out))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name", NETWORKS)
def test_torchvision_exports_import_and_equal_onnxruntime(tmp_path, name):
    path = materialize(name, tmp_path / f"{name}.onnx")
    _, spec, model, _, _, classes, imp = onnx_import.build(path, name, None, None, None)
    assert tuple(spec.model.input_shape) == (3, 224, 224) and len(classes) == 1000 and imp.opset == 17

    layers = [layer for _, layer in model.named_layers()]
    tags = {layer.tag for layer in layers} | {layer.activation.tag for layer in layers if layer.activation}
    assert set(NETWORKS[name]) <= tags, tags
    x = np.random.default_rng(1).random((2, 3, 224, 224), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    got = model.forward(x, training=False)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), (np.abs(got - ref).max(), np.abs(ref).max())
