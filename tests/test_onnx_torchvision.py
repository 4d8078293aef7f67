"""torchvision's ShuffleNetV2 x0.5, ConvNeXt-tiny and DenseNet-121 as torch.onnx.export writes them
(tests/data/torchvision/export_light.py made the files, weights as ConstantOfShape), filled with seeded random
weights and batchnorm statistics (scales and variances in [0.5, 1.5], so that no output is near zero): each imports,
and its class scores equal onnxruntime's to 1e-4 of the largest, at a batch of 2 though the export's was 1."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from cnnctl.interop import onnx_import  # noqa: E402
from tests.test_onnx_zoo import fill_weights  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "torchvision")
NETWORKS = {"shufflenet_v2_x0_5": ["split", "channel_shuffle", "concat"],
            "convnext_tiny": ["layernorm2d", "scale", "residual", "gelu"],
            "densenet121": ["concat", "batchnorm2d", "avgpool2d"]}


def _scales(model) -> set[str]:
    """The batchnorms' scales and variances, the layer norms' scales and the layer scales (ConvNeXt's Mul)."""
    names = set()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            names |= {node.input[1], node.input[4]}
        elif node.op_type == "LayerNormalization":
            names.add(node.input[1])
        elif node.op_type == "Mul":
            names |= set(node.input)
    return names


def materialize(name: str, path, seed: int = 0):
    """The light file with each ConstantOfShape weight made a seeded random initializer (He-scaled)."""
    model = onnx.load(os.path.join(HERE, f"light_{name}.onnx"))
    g = np.random.default_rng(seed)
    scales = _scales(model)

    def draw(out, shape):
        if out in scales:
            return g.uniform(0.5, 1.5, shape)
        if len(shape) > 1:
            return g.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        return g.standard_normal(shape) * 0.1

    kept = fill_weights(model, draw)
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
