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


def test_a_per_channel_scale_elsewhere_is_named(tmp_path):
    path = _scaled_batchnorm(tmp_path, after="relu")
    expect_error(["import", path, "--out", tmp_path / "out"], "'scale'", "Mul")


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
