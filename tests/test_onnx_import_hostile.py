"""`cnnctl import` on malformed and hostile ONNX files, each built with onnx.helper as an attacker would write it:
one message naming the node, tensor or attribute (exit 2), never a traceback, never a large allocation, never a
file read from outside the model's folder; and what it writes: quoted names, a per-pixel normalisation kept or
refused, an --out folder that is not silently replaced, config and weights written as a pair."""

import os

import numpy as np
import pytest
import yaml

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cnnctl.interop import onnx_import  # noqa: E402
from tests.helpers import invoke  # noqa: E402
from tests.test_errors import expect_error  # noqa: E402

G = np.random.default_rng(0)


def conv_net(w=None, b=None, conv_attrs=None, extra_nodes=(), extra_inits=None, head=None):
    """input (N, 1, 8, 8) -> Conv(w, b) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(3 classes)."""
    conv_attrs = {"kernel_shape": [3, 3], **(conv_attrs or {})}
    inits = {"w": G.standard_normal((4, 1, 3, 3)).astype(np.float32) if w is None else w,
             "b": G.standard_normal(4).astype(np.float32) if b is None else b,
             "fw": G.standard_normal((3, 4)).astype(np.float32), "fb": G.standard_normal(3).astype(np.float32),
             **(extra_inits or {})}
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", **conv_attrs),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), *extra_nodes,
             helper.make_node("GlobalAveragePool", [head or "r"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], axis=1, name="flat"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["output"], transB=1, name="fc")]
    return nodes, inits


def tensor(name, value):
    return value if isinstance(value, TensorProto) else numpy_helper.from_array(np.asarray(value), name)


def write(path, nodes, inits, opset=17, in_shape=(1, 8, 8)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                         ["N", *in_shape])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              [tensor(k, v) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path.write_bytes(model.SerializeToString())
    return path


def refused(tmp_path, nodes, inits, *words, opset=17):
    path = write(tmp_path / "m.onnx", nodes, inits, opset)
    text = expect_error(["import", path, "--out", tmp_path / "out"], *words)
    assert not (tmp_path / "out" / "config.yaml").exists()
    return text


def test_the_base_graph_imports(tmp_path):
    nodes, inits = conv_net()
    invoke("import", write(tmp_path / "m.onnx", nodes, inits), "--out", tmp_path / "out")


def _raw(name, dims, data_type=TensorProto.FLOAT, raw=b""):
    t = TensorProto()
    t.name, t.data_type = name, data_type
    t.dims.extend(dims)
    t.raw_data = raw
    return t


def _bad_tensor_cases():
    ok = np.zeros((4, 1, 3, 3), np.float32)
    yield "dims-disagree-with-data", {"w": _raw("w", [4, 1, 3, 3], raw=ok.tobytes()[:40])}, ["'w'", "bytes"]
    yield "undefined-dtype", {"w": _raw("w", [4, 1, 3, 3], 0, ok.tobytes())}, ["'w'", "data type"]
    yield "string-dtype", {"w": helper.make_tensor("w", TensorProto.STRING, [1], [b"x"])}, ["'w'", "STRING"]
    yield "negative-dim", {"w": _raw("w", [4, -1, 3, 3], raw=ok.tobytes())}, ["'w'", "dimension"]
    yield "scalar-weight", {"w": np.float32(1.0)}, ["'conv'", "weight", "4 dimensions"]
    yield "wrong-length-bias", {"b": np.zeros(5, np.float32)}, ["'conv'", "bias", "4"]
    yield "nan-weight", {"w": np.full((4, 1, 3, 3), np.nan, np.float32)}, ["'w'", "NaN or infinite"]
    yield "inf-bias", {"b": np.array([0, np.inf, 0, 0], np.float32)}, ["'b'", "NaN or infinite"]
    yield "huge-declared-dims", {"w": _raw("w", [1 << 20, 1 << 20, 3, 3])}, ["'w'", "bytes"]


@pytest.mark.parametrize("inits, words", [pytest.param(i, w, id=n) for n, i, w in _bad_tensor_cases()])
def test_broken_initializers_are_one_message(tmp_path, inits, words):
    nodes, base = conv_net()
    refused(tmp_path, nodes, {**base, **inits}, *words)


@pytest.mark.parametrize("attrs, words", [
    ({"strides": [1.5, 1.5]}, ["'conv'", "strides", "integers"]),
    ({"pads": [1]}, ["'conv'", "pads", "4 values"]),
    ({"strides": [1, 1, 1]}, ["'conv'", "strides", "2 values"]),
    ({"kernel_shape": [5, 5]}, ["'conv'", "kernel_shape"]),
    ({"group": 3}, ["'conv'", "group"]),
], ids=["float-strides", "one-value-pads", "three-strides", "kernel-disagrees", "group"])
def test_conv_attributes_of_the_wrong_type_or_length(tmp_path, attrs, words):
    nodes, inits = conv_net(conv_attrs=attrs)
    refused(tmp_path, nodes, inits, *words)


def test_vector_clip_bounds_and_dropout_ratio(tmp_path):
    clip = helper.make_node("Clip", ["r", "lo", "hi"], ["k"], name="clip")
    nodes, inits = conv_net(extra_nodes=[clip], head="k",
                            extra_inits={"lo": np.zeros(2, np.float32), "hi": np.full(2, 6, np.float32)})
    refused(tmp_path, nodes, inits, "'clip'", "one number")
    drop = helper.make_node("Dropout", ["r", "ratio"], ["d"], name="drop")
    nodes, inits = conv_net(extra_nodes=[drop, helper.make_node("Relu", ["d"], ["d2"])], head="d2",
                            extra_inits={"ratio": np.array([0.1, 0.2], np.float32)})
    refused(tmp_path, nodes, inits, "'drop'", "one number")


def test_nodes_missing_inputs_or_required_attributes(tmp_path):
    nodes, inits = conv_net()
    nodes[0] = helper.make_node("Conv", ["input"], ["c"], name="conv", kernel_shape=[3, 3])
    refused(tmp_path, nodes, inits, "'conv'", "input")
    nodes, inits = conv_net(extra_nodes=[helper.make_node("MaxPool", ["r"], ["p"], name="pool2")], head="p")
    refused(tmp_path, nodes, inits, "'pool2'", "kernel_shape")
    nodes, inits = conv_net(extra_nodes=[helper.make_node("Constant", [], ["k"], name="empty-constant")])
    refused(tmp_path, nodes, inits, "'empty-constant'", "value")


def test_a_node_that_feeds_itself_is_a_cycle(tmp_path):
    nodes, inits = conv_net(extra_nodes=[helper.make_node("Add", ["r", "loop"], ["loop"], name="self-feeding")],
                            head="loop")
    refused(tmp_path, nodes, inits, "cycle", "'self-feeding'")


def nested_residuals(depth):
    """r + relu(r1 + relu(r2 + ...)): each residual join inside the body of the one around it, `depth` deep."""
    inner = []
    for k in range(depth):  # going in: t_k -> relu -> t_{k+1}
        inner.append(helper.make_node("Relu", [f"t{k}" if k else "r"], [f"t{k + 1}"], name=f"relu{k}"))
    inner.append(helper.make_node("Relu", [f"t{depth}"], [f"o{depth}"], name="core"))
    for k in reversed(range(depth)):  # coming out: o_k = t_k + o_{k+1}
        inner.append(helper.make_node("Add", [f"t{k}" if k else "r", f"o{k + 1}"], [f"o{k}"], name=f"join{k}"))
    nodes, inits = conv_net(extra_nodes=inner, head="o0")
    return nodes, inits


def test_nested_residual_joins_import_to_24_deep_and_more_are_one_message(tmp_path):
    nodes, inits = nested_residuals(3)
    _, _, _, _, _, _, imp = onnx_import.build(write(tmp_path / "m.onnx", nodes, inits), "m", None, None, None)
    assert imp.layers[1]["type"] == "residual" and imp.layers[1]["body"][1]["type"] == "residual"
    nodes, inits = nested_residuals(24)  # as deep as a config may nest
    invoke("import", write(tmp_path / "m24.onnx", nodes, inits), "--out", tmp_path / "o24")
    nodes, inits = nested_residuals(400)
    path = write(tmp_path / "deep.onnx", nodes, inits)
    expect_error(["import", path, "--out", tmp_path / "out"], "nested more than 24 deep")


def test_the_walk_takes_no_python_stack_per_level(tmp_path, monkeypatch):
    """The walk runs on an explicit stack: 24 nested joins import with Python's recursion limit at 80 frames more
    than the walk's start needs (a recursive walk took about three frames a level)."""
    import inspect
    import sys

    from cnnctl.interop.onnx_import.read import read_model
    from cnnctl.interop.onnx_import.walk import import_model

    nodes, inits = nested_residuals(24)
    proto = read_model(write(tmp_path / "m24.onnx", nodes, inits))
    monkeypatch.setattr(sys, "getrecursionlimit", sys.getrecursionlimit)  # restored after the test
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(len(inspect.stack()) + 80)
        imp = import_model(proto, "m24")
    finally:
        sys.setrecursionlimit(limit)
    depth, layers = 0, imp.layers
    while any(s["type"] == "residual" for s in layers):
        layers = next(s for s in layers if s["type"] == "residual")["body"]
        depth += 1
    assert depth == 24


@pytest.mark.parametrize("fold, inits, words", [
    (("Reshape", ["k", "shape"]), {"k": np.zeros(6, np.float32), "shape": np.array([4, 4], np.int64)}, "'fold'"),
    (("Gather", ["k", "idx"]), {"k": np.zeros(3, np.int64), "idx": np.array([7], np.int64)}, "'fold'"),
    (("Slice", ["k", "st", "en", "ax", "step"]), {"k": np.zeros(3, np.int64), "st": np.array([0], np.int64),
                                                  "en": np.array([3], np.int64), "ax": np.array([0], np.int64),
                                                  "step": np.array([0], np.int64)}, "step"),
    (("ConstantOfShape", ["k"]), {"k": np.array([-5, 3], np.int64)}, "negative"),
    (("ConstantOfShape", ["k"]), {"k": np.array([1 << 20, 1 << 20], np.int64)}, "GB"),
    (("Range", ["a", "b", "c"]), {"a": np.array(0, np.int64), "b": np.array(1 << 40, np.int64),
                                  "c": np.array(1, np.int64)}, "GB"),
    (("Cast", ["k"]), {"k": np.zeros(3, np.int64)}, "'fold'"),
], ids=["reshape-sizes", "gather-range", "slice-step-0", "constantofshape-negative", "constantofshape-huge",
        "range-huge", "cast-undefined"])
def test_constant_folds_that_cannot_fold(tmp_path, fold, inits, words):
    op, inputs = fold
    attrs = {"to": 0} if op == "Cast" else {}
    node = helper.make_node(op, inputs, ["folded"], name="fold", **attrs)
    use = helper.make_node("Add", ["r", "folded"], ["k2"], name="use")  # makes the fold reachable
    nodes, base = conv_net(extra_nodes=[node, use], head="k2", extra_inits=inits)
    refused(tmp_path, nodes, base, words)


# ---------------------------------------------------------------- external data


def _external(tmp_path, location, data=None):
    """The model with the conv weight in an external file at `location` (as written into the file)."""
    w = G.standard_normal((4, 1, 3, 3)).astype(np.float32)
    t = _raw("w", [4, 1, 3, 3])
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in {"location": location, "offset": "0", "length": str(w.nbytes)}.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    nodes, inits = conv_net(w=t)
    (tmp_path / "model").mkdir(exist_ok=True)
    return write(tmp_path / "model" / "m.onnx", nodes, inits), w


def test_external_data_beside_the_model_is_read(tmp_path):
    path, w = _external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(w.tobytes())
    _, _, model, _, _, _, _ = onnx_import.build(path, "m", None, None, None)
    np.testing.assert_array_equal(model.state_dict()["layers.0.weight"], w)


def test_external_data_is_never_taken_from_the_working_directory(tmp_path, monkeypatch):
    path, w = _external(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(np.ones_like(w).tobytes())  # the working directory's, not the model's
    monkeypatch.chdir(tmp_path)
    expect_error(["import", path, "--out", tmp_path / "out"], "'w'", "weights.bin", "not found")


@pytest.mark.parametrize("location, make, words", [
    ("/etc/passwd", None, ["'w'", "inside the model's folder"]),
    ("../secret.bin", "outside", ["'w'", "inside the model's folder"]),
    ("fifo.bin", "fifo", ["'w'", "FIFO"]),
    ("short.bin", "short", ["'w'", "bytes"]),
    ("sub", "folder", ["'w'", "folder"]),
], ids=["absolute", "dotdot", "fifo", "too-short", "folder"])
def test_external_data_locations_that_are_refused(tmp_path, location, make, words):
    path, w = _external(tmp_path, location)
    if make == "outside":
        (tmp_path / "secret.bin").write_bytes(w.tobytes())
    elif make == "fifo":
        os.mkfifo(path.parent / location)
    elif make == "short":
        (path.parent / location).write_bytes(b"\0" * 10)
    elif make == "folder":
        (path.parent / location).mkdir()
    expect_error(["import", path, "--out", tmp_path / "out"], *words)


# ---------------------------------------------------------------- what is written


@pytest.mark.parametrize("name", ["2024", "yes", "null", "0x1F", "1e3", "on", "true", ".inf", "0o17", "1_000"])
def test_names_yaml_would_read_as_another_type_are_quoted(tmp_path, name):
    nodes, inits = conv_net()
    path = write(tmp_path / f"{name}.onnx", nodes, inits)
    invoke("import", path, "--out", tmp_path / "out")  # the name from the file's
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["name"] == name
    invoke("inspect", tmp_path / "out" / "config.yaml")


@pytest.mark.parametrize("stem, name", [("~", "_"), ("my model (v2)", "my_model__v2_"), ("a: b", "a__b")])
def test_a_file_name_that_is_no_config_name_is_made_one(tmp_path, stem, name):
    nodes, inits = conv_net()
    invoke("import", write(tmp_path / f"{stem}.onnx", nodes, inits), "--out", tmp_path / "out")
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["name"] == name
    expect_error(["import", tmp_path / f"{stem}.onnx", "--out", tmp_path / "o2", "--name", stem], "name")


def _normalised(tmp_path, mean):
    sub = helper.make_node("Sub", ["input", "mean"], ["x0"], name="sub")
    div = helper.make_node("Div", ["x0", "std"], ["x1"], name="div")
    nodes, inits = conv_net()
    nodes[0] = helper.make_node("Conv", ["x1", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3])
    return write(tmp_path / "m.onnx", [sub, div, *nodes],
                 {**inits, "mean": mean, "std": np.full((1, 1, 1, 1), 0.5, np.float32)})


def test_a_per_channel_normalisation_broadcast_as_an_image_is_kept(tmp_path):
    path = _normalised(tmp_path, np.full((1, 1, 8, 8), 0.25, np.float32))  # one value, written per pixel
    spec_dict, *_ = onnx_import.build(path, "m", None, None, None)
    assert spec_dict["data"]["normalize"] == {"mean": [0.25], "std": [0.5]}


def test_a_per_pixel_normalisation_is_refused_not_dropped(tmp_path):
    path = _normalised(tmp_path, G.random((1, 1, 8, 8)).astype(np.float32))
    expect_error(["import", path, "--out", tmp_path / "out"], "'sub'", "per pixel", "--mean")


def test_out_refuses_a_folder_with_other_files_unless_forced(tmp_path):
    nodes, inits = conv_net()
    path = write(tmp_path / "m.onnx", nodes, inits)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: mine\n")
    (run / "metrics.jsonl").write_text("{}\n")
    expect_error(["import", path, "--out", run], str(run), "--force")
    assert (run / "config.yaml").read_text() == "name: mine\n"
    invoke("import", path, "--out", run, "--force")
    assert "Imported" in (run / "config.yaml").read_text() and (run / "metrics.jsonl").read_text() == "{}\n"
    invoke("import", path, "--out", tmp_path / "earlier")
    invoke("import", path, "--out", tmp_path / "earlier")  # a folder holding only an earlier import is replaced


def test_a_failed_write_leaves_neither_file(tmp_path, monkeypatch):
    from cnnctl.run import checkpoint

    nodes, inits = conv_net()
    path = write(tmp_path / "m.onnx", nodes, inits)
    invoke("import", path, "--out", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    nodes, inits = conv_net(w=G.standard_normal((4, 1, 3, 3)).astype(np.float32))
    write(tmp_path / "m.onnx", nodes, inits)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: full())
    res = invoke("import", path, "--out", tmp_path / "out", code=2)
    assert "No space left" in res.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_a_tiny_file_cannot_make_a_large_constant(tmp_path):
    """A few hundred bytes that ask for gigabytes: refused before anything is allocated, whatever the machine."""
    node = helper.make_node("ConstantOfShape", ["k"], ["folded"], name="fold")
    use = helper.make_node("Add", ["r", "folded"], ["k2"], name="use")
    nodes, inits = conv_net(extra_nodes=[node, use], head="k2",
                            extra_inits={"k": np.array([1 << 15, 1 << 15], np.int64)})  # 4 GB of floats
    path = write(tmp_path / "m.onnx", nodes, inits)
    assert path.stat().st_size < 2000
    expect_error(["import", path, "--out", tmp_path / "out"], "'fold'", "GB", "generated constant")
