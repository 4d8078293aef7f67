"""The import's rewrite passes, each on a small hand-written graph in the spelling of the exporter it is for,
checked against onnxruntime."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper  # noqa: E402

from cnnctl.interop import onnx_import  # noqa: E402
from tests.test_errors import expect_error  # noqa: E402
from tests.test_onnx_import_hostile import G, conv_net, write  # noqa: E402


def equal_to_onnxruntime(path, model, shape=(1, 8, 8)):
    x = np.random.default_rng(1).random((2, *shape), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    got = model.forward(x, training=False)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_sum_of_two_branches_is_a_residual_join_and_of_one_an_identity(tmp_path):
    extra = [helper.make_node("Conv", ["r", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Sum", ["r", "c2"], ["s"], name="join"),
             helper.make_node("Sum", ["s"], ["s1"], name="alone")]
    nodes, inits = conv_net(extra_nodes=extra, head="s1",
                            extra_inits={"w2": G.standard_normal((4, 4, 3, 3)).astype(np.float32)})
    path = write(tmp_path / "m.onnx", nodes, inits, opset=9)
    _, _, model, _, _, _, imp = onnx_import.build(path, "m", None, None, None)
    assert [s["type"] for s in imp.layers] == ["conv2d", "residual", "global_avgpool2d", "dense"]
    equal_to_onnxruntime(path, model)


def test_a_one_input_concat_is_the_tensor(tmp_path):
    nodes, inits = conv_net(extra_nodes=[helper.make_node("Concat", ["r"], ["k"], axis=1, name="one")], head="k")
    path = write(tmp_path / "m.onnx", nodes, inits)
    _, _, model, _, _, _, imp = onnx_import.build(path, "m", None, None, None)
    assert [s["type"] for s in imp.layers] == ["conv2d", "global_avgpool2d", "dense"]
    equal_to_onnxruntime(path, model)


def _scaled_batchnorm(tmp_path, after="bn"):
    """Conv, BatchNormalization, then Caffe's Scale as Unsqueeze + Mul + Add of per-channel constants."""
    nodes, inits = conv_net()
    bn = helper.make_node("BatchNormalization", ["c", "gm", "be", "mu", "var"], ["y"], name="bn")
    unsq = [helper.make_node("Unsqueeze", [k], [f"{k}u"], axes=[1, 2], name=f"u{k}") for k in ("s", "t")]
    source = "y" if after == "bn" else "y2"
    mul = helper.make_node("Mul", [source, "su"], ["m"], name="scale")
    add = helper.make_node("Add", ["m", "tu"], ["a"], name="shift")
    relu = helper.make_node("Relu", ["a"], ["r"], name="relu")
    middle = [bn, *unsq] + ([helper.make_node("Relu", ["y"], ["y2"], name="first")] if after != "bn" else [])
    nodes = [nodes[0], *middle, mul, add, relu, *nodes[2:]]
    inits.update(gm=G.uniform(0.5, 1.5, 4).astype(np.float32), be=G.standard_normal(4).astype(np.float32),
                 mu=G.standard_normal(4).astype(np.float32), var=G.uniform(0.5, 1.5, 4).astype(np.float32),
                 s=G.uniform(0.5, 1.5, 4).astype(np.float32), t=G.standard_normal(4).astype(np.float32))
    return write(tmp_path / "m.onnx", nodes, inits, opset=9)


def test_a_per_channel_scale_and_shift_after_batchnorm_fold_into_it(tmp_path):
    path = _scaled_batchnorm(tmp_path)
    _, _, model, _, _, _, imp = onnx_import.build(path, "m", None, None, None)
    assert [s["type"] for s in imp.layers] == ["conv2d", "batchnorm", "global_avgpool2d", "dense"]
    assert imp.layers[1]["activation"] == "relu"
    equal_to_onnxruntime(path, model)


def test_a_per_channel_scale_elsewhere_is_a_scale_layer(tmp_path):
    """Where the Mul and Add of per-channel constants follow something else than a batchnorm (here a ReLU): a
    `scale` layer, its bias from the Add."""
    path = _scaled_batchnorm(tmp_path, after="relu")
    _, _, model, _, _, _, imp = onnx_import.build(path, "m", None, None, None)
    assert [s["type"] for s in imp.layers] == ["conv2d", "batchnorm", "scale", "relu", "global_avgpool2d", "dense"]
    assert "bias" not in imp.layers[2]
    equal_to_onnxruntime(path, model)


@pytest.mark.parametrize("size", [1, 2, 4, 5])
def test_lrn_of_any_size_exports_and_imports_equal_to_onnxruntime(tmp_path, size):
    """ONNX's window for even sizes (one more channel after the centre than before), through export and import;
    against onnx's reference evaluator, as onnxruntime takes odd sizes only."""
    from onnx.reference import ReferenceEvaluator

    from cnnctl.core import nn
    from cnnctl.interop.export import to_onnx

    g = np.random.default_rng(size)
    model = nn.Model([nn.Conv2D(2, 6, 3, padding=1, rng=g), nn.LRN(size, 0.7, 0.75, 1.5), nn.GlobalAvgPool2D(),
                      nn.Dense(6, 3, rng=g)])
    proto = to_onnx(model, (2, 5, 5), {"mean": [0.0, 0.0], "std": [1.0, 1.0]}, "lrn")
    path = tmp_path / "lrn.onnx"
    path.write_bytes(proto.SerializeToString())
    x = g.random((6, 2, 5, 5), dtype=np.float32)  # as many images as channels: onnx 1.23's reference LRN loops over
    ref = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x})[0]  # the batch for the channels
    if size % 2:
        session = ort.InferenceSession(str(path))
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.forward(x, training=False), ref, rtol=1e-5, atol=1e-5)
    _, _, imported, _, _, _, imp = onnx_import.build(path, "lrn", None, None, None)
    assert imp.layers[1] == {"type": "lrn", "size": size, "alpha": 0.7, "beta": 0.75, "k": 1.5}
    np.testing.assert_allclose(imported.forward(x, training=False), ref, rtol=1e-5, atol=1e-5)


def test_a_dynamic_height_and_width_import_at_the_size_given(tmp_path):
    """A torch export with dynamic height and width (paddle2onnx's files have them too): without --input-size one
    message that names the flag; with it, the network at that size, equal to onnxruntime."""
    torch = pytest.importorskip("torch")
    from tests.helpers import invoke

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), str(path), dynamo=False, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}}, opset_version=17)
    expect_error(["import", path, "--out", tmp_path / "o"], "height and width are not fixed", "--input-size H,W")
    expect_error(["import", path, "--out", tmp_path / "o", "--input-size", "nan,3"], "two whole numbers")
    invoke("import", path, "--out", tmp_path / "o", "--input-size", "20,24")
    _, spec, model, _, _, _, _ = onnx_import.build(path, "dyn", None, None, None, (20, 24))
    assert list(spec.model.input_shape) == [3, 20, 24]
    equal_to_onnxruntime(path, model, (3, 20, 24))
    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), str(fixed), dynamo=False, input_names=["input"],
                      output_names=["output"], opset_version=17)
    expect_error(["import", fixed, "--out", tmp_path / "o2", "--input-size", "20,24"], "fixed at [1, 3, 16, 16]")


def _constant(name, value):
    return helper.make_node("Constant", [], [name], name=f"const-{name}",
                            value=onnx.numpy_helper.from_array(np.asarray(value), name))


def _paddle_style(tmp_path, with_hardsigmoid=True):
    """paddle2onnx's idiom: weights in Constant nodes, hardswish and hardsigmoid written out (Clip's bounds as
    inputs), the flatten as Shape, Slice, Concat, Reshape, a MatMul and an Add for the classifier, and a dynamic
    height and width."""
    from onnx import TensorProto

    g = np.random.default_rng(3)
    consts = [_constant("w1", g.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.5),
              _constant("b1", g.standard_normal(6).astype(np.float32)),
              _constant("w2", g.standard_normal((6, 6, 1, 1)).astype(np.float32) * 0.5),
              _constant("three", np.float32(3)), _constant("zero", np.float32(0)), _constant("six", np.float32(6)),
              _constant("sixth", np.float32(1 / 6)), _constant("fc", g.standard_normal((6, 4)).astype(np.float32)),
              _constant("fcb", g.standard_normal(4).astype(np.float32)),
              _constant("starts", np.array([0], np.int64)), _constant("ends", np.array([1], np.int64)),
              _constant("rest", np.array([-1], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "three"], ["p1"]), helper.make_node("Clip", ["p1", "zero", "six"], ["k1"]),
             helper.make_node("Mul", ["c1", "k1"], ["m1"]), helper.make_node("Div", ["m1", "six"], ["hswish"]),
             helper.make_node("Conv", ["hswish", "w2"], ["c2"], kernel_shape=[1, 1])]
    last = "c2"
    if with_hardsigmoid:
        nodes += [helper.make_node("Add", ["c2", "three"], ["p2"]), helper.make_node("Clip", ["p2", "zero", "six"],
                                                                                     ["k2"]),
                  helper.make_node("Mul", ["k2", "sixth"], ["hsig"])]
        last = "hsig"
    nodes += [helper.make_node("GlobalAveragePool", [last], ["gap"]), helper.make_node("Shape", ["gap"], ["shape"]),
              helper.make_node("Slice", ["shape", "starts", "ends"], ["batch"]),
              helper.make_node("Concat", ["batch", "rest"], ["target"], axis=0),
              helper.make_node("Reshape", ["gap", "target"], ["flat"]),
              helper.make_node("MatMul", ["flat", "fc"], ["mm"]), helper.make_node("Add", ["mm", "fcb"], ["output"])]
    graph = helper.make_graph(consts + nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                       ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)])
    path = tmp_path / "paddle.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    return path


def test_a_paddle2onnx_style_graph_imports_at_the_size_given(tmp_path):
    path = _paddle_style(tmp_path)
    _, spec, model, _, _, _, imp = onnx_import.build(path, "p", None, None, None, (12, 10))
    assert [s["type"] for s in imp.layers] == ["conv2d", "conv2d", "global_avgpool2d", "dense"]
    assert [imp.layers[0].get("activation"), imp.layers[1].get("activation")] == ["hardswish", "hardsigmoid"]
    x = np.random.default_rng(1).random((2, 3, 12, 10), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = model.forward(x, training=False)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_x_times_hardsigmoid_of_x_is_hardswish(tmp_path):
    nodes, inits = conv_net(extra_nodes=[helper.make_node("HardSigmoid", ["r"], ["h"], alpha=1 / 6, beta=0.5),
                                         helper.make_node("Mul", ["r", "h"], ["hs"])], head="hs")
    path = write(tmp_path / "m.onnx", nodes, inits)
    _, _, model, _, _, _, imp = onnx_import.build(path, "m", None, None, None)
    assert [s["type"] for s in imp.layers][:2] == ["conv2d", "hardswish"]
    equal_to_onnxruntime(path, model)


def test_a_tf2onnx_style_graph_with_nhwc_input_imports(tmp_path):
    """tf2onnx's Keras idiom: an N x H x W x C input transposed into NCHW first, the maps transposed back into NHWC
    before the classifier's flatten, MatMul + Add. The import takes N x C x H x W images (the input transpose
    absorbed) and reorders the dense weight's columns."""
    from onnx import TensorProto

    g = np.random.default_rng(5)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Conv", ["xt", "w", "b"], ["c"], kernel_shape=[3, 3], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Transpose", ["p"], ["pt"], perm=[0, 2, 3, 1], name="to_nhwc"),
             helper.make_node("Reshape", ["pt", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["mm"]), helper.make_node("Add", ["mm", "fcb"], ["output"])]
    inits = {"w": g.standard_normal((4, 3, 3, 3)).astype(np.float32), "b": g.standard_normal(4).astype(np.float32),
             "shape": np.array([-1, 36], np.int64), "fc": g.standard_normal((36, 5)).astype(np.float32),
             "fcb": g.standard_normal(5).astype(np.float32)}
    graph = helper.make_graph(nodes, "tf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    path = tmp_path / "tf.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    _, spec, model, _, _, _, imp = onnx_import.build(path, "tf", None, None, None)
    assert list(spec.model.input_shape) == [3, 8, 8]
    assert [s["type"] for s in imp.layers] == ["conv2d", "maxpool2d", "flatten", "dense"]
    x = g.random((2, 8, 8, 3), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = model.forward(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), training=False)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_convnext_style_layernorm_over_channels_imports(tmp_path):
    """ConvNeXt's LayerNorm as torch exports it (permute, LayerNormalization over the last axis, permute back)
    becomes `layernorm2d`; exported again, cnnctl writes the same three nodes."""
    torch = pytest.importorskip("torch")
    from tests.torch_models import TorchLayerNorm2d

    torch.manual_seed(0)
    ln = TorchLayerNorm2d(6, eps=1e-6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), ln, torch.nn.GELU(),
                              torch.nn.Conv2d(6, 6, 7, padding=3, groups=6), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(6, 4)).eval()
    path = tmp_path / "convnext.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 12, 12), str(path), dynamo=False, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "N"}}, opset_version=17)
    _, _, model, _, _, _, imp = onnx_import.build(path, "c", None, None, None)
    assert [s["type"] for s in imp.layers][:3] == ["conv2d", "layernorm2d", "gelu"]
    assert imp.layers[1]["eps"] == 1e-6
    equal_to_onnxruntime(path, model, (3, 12, 12))


@pytest.mark.parametrize("opset", [7, 9, 10])
def test_opset_7_to_10_attribute_forms_import(tmp_path, opset):
    """Older exporters' attribute forms: Pad's pads and value as attributes, BatchNormalization's spatial,
    Dropout's ratio as an attribute; each imports and equals onnxruntime."""
    nodes, inits = conv_net()
    pad = helper.make_node("Pad", ["input"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.0, name="pad")
    conv = helper.make_node("Conv", ["p", "w", "b"], ["c"], kernel_shape=[3, 3], name="conv")
    bn = helper.make_node("BatchNormalization", ["c", "gm", "be", "mu", "var"], ["y"], spatial=1, name="bn") \
        if opset < 9 else helper.make_node("BatchNormalization", ["c", "gm", "be", "mu", "var"], ["y"], name="bn")
    relu = helper.make_node("Relu", ["y"], ["r0"], name="relu")
    drop = helper.make_node("Dropout", ["r0"], ["r"], ratio=0.3, name="drop")
    nodes = [pad, conv, bn, relu, drop, *nodes[2:]]
    inits.update(gm=G.uniform(0.5, 1.5, 4).astype(np.float32), be=G.standard_normal(4).astype(np.float32),
                 mu=G.standard_normal(4).astype(np.float32), var=G.uniform(0.5, 1.5, 4).astype(np.float32))
    path = write(tmp_path / "m.onnx", nodes, inits, opset=opset)
    _, _, model, _, _, _, imp = onnx_import.build(path, "m", None, None, None)
    assert [s["type"] for s in imp.layers] == ["conv2d", "batchnorm", "dropout", "global_avgpool2d", "dense"]
    assert imp.layers[0]["padding"] in (1, [1, 1]) and imp.layers[2]["rate"] == 0.3 and imp.opset == opset
    equal_to_onnxruntime(path, model)


def test_a_per_channel_scale_and_shift_after_a_convolution_fold_into_it(tmp_path):
    """Mul and Add of per-channel constants right after a Conv (with a bias, and without): its weights and bias
    take them; no scale layer is left."""
    for bias in (True, False):
        nodes, inits = conv_net()
        if not bias:
            nodes[0] = helper.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[3, 3], name="conv")
        unsq = [helper.make_node("Unsqueeze", [k], [f"{k}u"], axes=[1, 2], name=f"u{k}") for k in ("s", "t")]
        mul = helper.make_node("Mul", ["c", "su"], ["m"], name="scale")
        add = helper.make_node("Add", ["tu", "m"], ["a"], name="shift")  # the constant first
        relu = helper.make_node("Relu", ["a"], ["r"], name="relu")
        nodes = [nodes[0], *unsq, mul, add, relu, *nodes[2:]]
        inits.update(s=G.uniform(0.5, 1.5, 4).astype(np.float32), t=G.standard_normal(4).astype(np.float32))
        path = write(tmp_path / f"m{bias}.onnx", nodes, inits, opset=9)
        _, _, model, _, _, _, imp = onnx_import.build(path, "m", None, None, None)
        assert [s["type"] for s in imp.layers] == ["conv2d", "global_avgpool2d", "dense"]
        assert imp.layers[0]["activation"] == "relu" and imp.layers[0].get("bias", True) is True
        equal_to_onnxruntime(path, model)
