"""The ONNX model zoo's classic classifiers as the `onnx` package ships them (onnx/backend/test/data/light/:
converted from Caffe2 at opset 9, the batch fixed at 1, every weight a ConstantOfShape of 0.02), with their weights
replaced by seeded random tensors of the same shapes: each imports, and its class scores equal onnxruntime's
(the final Softmax taken off both) to 1e-4 of the largest."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

from cnnctl.interop import onnx_import  # noqa: E402

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
IMPORTED = ["squeezenet", "vgg19", "resnet50", "densenet121", "inception_v2", "bvlc_alexnet", "zfnet512",
            "inception_v1", "shufflenet"]


def fill_weights(model, draw, declare: bool = False) -> list:
    """Each ConstantOfShape weight of a light file made an initializer of the values draw(name, shape) gives (and,
    with declare, a graph input too, as IR 3 wants); the nodes that are left."""
    inits = {t.name: t for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(int).tolist()
            out = node.output[0]
            model.graph.initializer.append(numpy_helper.from_array(draw(out, shape).astype(np.float32), out))
            if declare:
                model.graph.input.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, shape))
        else:
            kept.append(node)
    return kept


def materialize(name: str, path, seed: int = 0):
    """The zoo file with each ConstantOfShape weight made a random initializer (He-scaled; batchnorm scales and
    variances in [0.5, 1.5], so that no output is near zero) and the final Softmax taken off."""
    model = onnx.load(os.path.join(LIGHT, f"light_{name}.onnx"))
    g = np.random.default_rng(seed)

    def draw(out, shape):
        if len(shape) > 1:
            return g.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        if any(k in out for k in ("_s_", "scale", "riv", "var")):
            return g.uniform(0.5, 1.5, shape)
        return g.standard_normal(shape) * 0.1

    kept = fill_weights(model, draw, declare=True)  # IR 3
    last = next(n for n in kept if n.output[0] == model.graph.output[0].name)
    if last.op_type == "Softmax":  # compared as class scores, which the import keeps (the loss takes the softmax)
        kept.remove(last)
        model.graph.output[0].name = last.input[0]
        del model.graph.output[0].type.tensor_type.shape.dim[:]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save(model, str(path))
    data = next(v for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer})
    return path, data.name, tuple(d.dim_value for d in data.type.tensor_type.shape.dim)


@pytest.mark.parametrize("name", IMPORTED)
def test_zoo_classifiers_import_and_equal_onnxruntime(tmp_path, name):
    path, input_name, shape = materialize(name, tmp_path / f"{name}.onnx")
    _, spec, model, _, _, classes, imp = onnx_import.build(path, name, None, None, None)
    assert shape[0] == 1 and len(classes) == 1000 and imp.opset == 9
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {input_name: x})[0].reshape(1, -1)
    got = model.forward(x, training=False)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got - ref).max() / np.abs(ref).max()
    two = model.forward(np.concatenate([x, x[:, :, ::-1]]), training=False)  # the import generalises to any batch
    np.testing.assert_allclose(two[:1], got, rtol=1e-5, atol=1e-5 * np.abs(got).max())
