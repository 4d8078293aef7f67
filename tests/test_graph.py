"""Graph-shaped models from YAML: blocks, residual and concat containers, grouped convolutions, and everything
a model goes through (shape errors, inspect, --set, checkpoint names in torch, ONNX, random nested graphs)."""

import copy
import json

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnctl.config.build import build_model, walk
from cnnctl.config.reading import load_config, spec_to_dict, validate
from cnnctl.config.spec import Spec
from cnnctl.core import nn
from cnnctl.errors import ConfigError, ShapeError
from cnnctl.tools.gradcheck import check_network
from tests.conftest import ROOT
from tests.helpers import invoke

BASE = {"name": "g", "data": {"dataset": "shapes"}}


def spec_of(layers, blocks=None, input_shape=(3, 8, 8)):
    model = {"input_shape": list(input_shape), "layers": layers}
    if blocks:
        model["blocks"] = blocks
    return validate({**BASE, "model": model})


BASIC = {"params": {"filters": None, "stride": 1}, "type": "residual", "activation": "relu", "body": [
    {"type": "conv2d", "filters": "$filters", "kernel_size": 3, "stride": "$stride", "padding": 1, "bias": False},
    {"type": "batchnorm", "activation": "relu"},
    {"type": "conv2d", "filters": "$filters", "kernel_size": 3, "padding": 1, "bias": False},
    {"type": "batchnorm"}]}


def test_resnet20_has_the_papers_size():
    spec, _ = load_config(ROOT / "configs" / "resnet20-cifar10.yaml")
    model, rows = build_model(spec.model)
    assert model.num_params() == 272_474  # torch's ResNet-20 (He et al. 2015): 0.27M
    assert abs(sum(r.macs for r in rows) - 41e6) < 0.5e6
    assert len((ROOT / "configs" / "resnet20-cifar10.yaml").read_text().splitlines()) <= 30
    names = set(model.state_dict())
    assert {"layers.2.0.body.0.weight", "layers.3.shortcut.0.weight", "layers.3.shortcut.1.running_var"} <= names
    assert not any(n.startswith("layers.2.0.shortcut") for n in names)  # identity where the shape is kept


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    zero = copy.deepcopy(BASIC)
    zero["body"][3]["weight_init"] = 0
    spec = spec_of([{"type": "basic", "filters": 3}, {"type": "basic", "filters": 5, "stride": 2}],
                   {"basic": zero})
    model, _ = build_model(spec.model)
    identity, projection = model.layers
    assert not identity.body.layers[3].params["weight"].any()
    assert np.array_equal(identity.body.layers[1].params["weight"], np.ones(3, np.float32))
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(identity.forward(x, training=True), np.maximum(x, 0))
    h = np.maximum(x, 0)
    np.testing.assert_allclose(projection.forward(h, training=True),
                               np.maximum(projection.shortcut.forward(h, training=True), 0), atol=1e-6)


def test_blocks_substitute_defaults_and_arguments_and_repeat_makes_copies():
    spec = spec_of([{"type": "basic", "filters": 4, "repeat": 2}, {"type": "basic", "filters": 6, "stride": 2},
                    {"type": "global_avgpool2d"}, {"type": "dense", "units": 4}], {"basic": BASIC})
    model, rows = build_model(spec.model)
    assert [r.type for r in rows[:2]] == ["basic x2", "basic"]
    assert [c.output_shape for c in rows[0].children] == [(4, 8, 8), (4, 8, 8)]
    assert rows[1].output_shape == (6, 4, 4)
    a, b = model.layers[0].layers
    assert a is not b and a.body.layers[0].params["weight"] is not b.body.layers[0].params["weight"]
    assert not np.array_equal(a.body.layers[0].params["weight"], b.body.layers[0].params["weight"])
    assert spec_to_dict(Spec.model_validate(spec_to_dict(spec))) == spec_to_dict(spec)  # blocks round-trip


def error_of(layers, blocks=None, input_shape=(3, 8, 8)) -> str:
    with pytest.raises((ConfigError, ShapeError)) as e:
        build_model(spec_of(layers, blocks, input_shape).model)
    return str(e.value)


@pytest.mark.parametrize("layers,blocks,expected", [
    ([{"type": "basic", "filterz": 4}], {"basic": BASIC},
     ["model.layers[0].filterz", "block 'basic' has no parameter 'filterz'", "did you mean 'filters'"]),
    ([{"type": "basic"}], {"basic": BASIC}, ["model.layers[0]", "needs parameter filters"]),
    ([{"type": "basic", "filters": "wide"}], {"basic": BASIC},
     ["model.layers[0]", "block 'basic' body[0].filters", "integer", "from $filters = 'wide'"]),
    ([{"type": "basci", "filters": 4}], {"basic": BASIC},
     ["unknown type 'basci'", "did you mean 'basic'", "blocks: basic"]),
    ([{"type": "loop"}], {"loop": {"type": "sequential", "layers": [{"type": "loop"}]}}, ["uses itself"]),
    ([{"type": "b"}], {"b": {"type": "sequential", "layers": [{"type": "relu", "name": "$nme"}]}},
     ["uses $nme", "declares no parameter 'nme'"]),
    ([{"type": "residual", "shortcut": "identity", "body": [{"type": "conv2d", "filters": 5, "kernel_size": 1}]}],
     None, ["model.layers[0] (residual)", "(5, 8, 8)", "(3, 8, 8)", "shortcut: auto"]),
    ([{"type": "concat", "branches": [[], [{"type": "maxpool2d", "kernel_size": 2}]]}], None,
     ["model.layers[0] (concat)", "branches[0] (3, 8, 8)", "branches[1] (3, 4, 4)"]),
    ([{"type": "conv2d", "filters": 4, "kernel_size": 3, "groups": 2}], None,
     ["groups: 2 must divide", "input channels (3)", "fix"]),
    ([{"type": "basic", "filters": 4}, {"type": "residual", "body": [{"type": "concat", "branches": [
        [], [{"type": "conv2d", "filters": 2, "kernel_size": 9}]]}]}], {"basic": BASIC},
     ["model.layers[1] (residual) > body[0] (concat) > branches[1][0] (conv2d)", "input shape (4, 8, 8)"]),
])
def test_graph_errors_name_the_nested_place_and_a_fix(layers, blocks, expected):
    message = error_of(layers, blocks)
    for part in expected:
        assert part in message, message


def test_block_errors_give_yaml_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": {"input_shape": [1, 8, 8], "blocks": {"basic": BASIC},
                                                      "layers": [{"type": "basic", "filters": -1}]}}, sort_keys=False))
    res = invoke("inspect", path, code=2)
    text = path.read_text().splitlines()
    use_line = next(i for i, t in enumerate(text, 1) if "filters: -1" in t)
    def_line = next(i for i, t in enumerate(text, 1) if "filters: $filters" in t)
    assert f"(line {use_line})" in res.output and f"(line {def_line})" in res.output, res.output
    assert "greater than 0" in res.output and "Traceback" not in res.output


def test_set_reaches_nested_keys_and_block_parameters():
    path = ROOT / "configs" / "resnet20-cifar10.yaml"
    spec, _ = load_config(path, ["model.blocks.basic.params.filters=8", "model.layers.3.filters=40",
                                 "model.blocks.basic.body.0.kernel_size=5", "model.blocks.basic.body.0.padding=2"])
    _, rows = build_model(spec.model)
    assert rows[2].output_shape == (8, 32, 32) and rows[3].output_shape == (40, 16, 16)
    assert rows[2].children[0].children[0].receptive_field[0] == 5 + 2  # stem 3x3, then the 5x5


def test_inspect_shows_the_tree_receptive_fields_and_the_trainable_split():
    res = json.loads(invoke("inspect", ROOT / "configs" / "resnet20-cifar10.yaml", "--json").output)
    assert res["trainable_params"] == 272_474 and res["non_trainable_params"] == 1_589
    block = res["layers"][3]
    assert block["type"] == "basic" and [c["path"] for c in block["children"]] == [
        "layers.3.body.0", "layers.3.body.1", "layers.3.body.2", "layers.3.body.3", "layers.3.shortcut.0",
        "layers.3.shortcut.1"]
    assert res["layers"][0]["receptive_field"] == {"size": [3, 3], "stride": [1, 1]}
    assert res["layers"][6]["receptive_field"]["stride"] == [4, 4] and res["layers"][7]["receptive_field"] is None
    table = invoke("inspect", ROOT / "configs" / "resnet20-cifar10.yaml", "--depth", "0").output
    assert "basic x3" in table and "3.body" not in table and "272,474 trainable" in table
    assert "3.body.0" in invoke("inspect", ROOT / "configs" / "resnet20-cifar10.yaml").output


def test_receptive_field_follows_the_chain_rule():
    spec = spec_of([{"type": "conv2d", "filters": 2, "kernel_size": 3},
                    {"type": "maxpool2d", "kernel_size": 2},
                    {"type": "conv2d", "filters": 2, "kernel_size": 3, "dilation": 2},
                    {"type": "concat", "branches": [[], [{"type": "conv2d", "filters": 1, "kernel_size": 3,
                                                          "padding": 1}]]}], input_shape=(1, 20, 20))
    _, rows = build_model(spec.model)
    assert [r.receptive_field[:3] for r in rows] == [(3, 3, 1), (4, 4, 2), (12, 12, 2), (16, 16, 2)]


# ---------------------------------------------------------------- torch: names, graphs, gradients

torch = pytest.importorskip("torch")
from tests.torch_models import loaded  # noqa: E402


@pytest.mark.parametrize("config", ["resnet20-cifar10.yaml", "mobilenet-fashion.yaml", "resnet-fashion.yaml"])
def test_checkpoint_names_load_into_the_equivalent_torch_modules(config):
    spec, _ = load_config(ROOT / "configs" / config)
    model, _ = build_model(spec.model, np.random.default_rng(0))
    g = np.random.default_rng(1)
    for _, layer in model.named_layers():  # non-trivial running statistics
        if "running_mean" in layer.buffers:
            layer.buffers["running_mean"] = g.normal(0, 0.1, layer.num_features).astype(np.float32)
            layer.buffers["running_var"] = g.uniform(0.5, 1.5, layer.num_features).astype(np.float32)
    module = loaded(model).eval()
    x = g.standard_normal((2, *spec.model.input_shape)).astype(np.float32)
    np.testing.assert_allclose(model.forward(x, training=False), module(torch.tensor(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-4)


def layer_strategy(depth):
    """Random layer dicts that keep 4 channels and the spatial size (so any nesting fits)."""
    leaf = st.one_of(
        st.builds(lambda k, act, groups: {"type": "conv2d", "filters": 4, "kernel_size": k, "padding": "same",
                                          "activation": act, "groups": groups},
                  st.sampled_from([1, 3]), st.sampled_from([None, "relu", "tanh"]), st.sampled_from([1, 2, 4])),
        st.builds(lambda act: {"type": "batchnorm", "activation": act}, st.sampled_from([None, "relu"])),
        st.just({"type": "relu"}),
        st.just({"type": "maxpool2d", "kernel_size": 3, "stride": 1, "padding": 1}),
    )
    if depth == 0:
        return leaf
    inner = st.lists(layer_strategy(depth - 1), min_size=1, max_size=3)
    residual = st.builds(lambda body, act: {"type": "residual", "body": body, "activation": act},
                         inner, st.sampled_from([None, "relu"]))
    # concat of two 4-channel branches, then a 1x1 conv back to 4 channels
    concat = st.builds(lambda a, b: {"type": "sequential", "layers": [
        {"type": "concat", "branches": [a, b]}, {"type": "conv2d", "filters": 4, "kernel_size": 1}]},
        st.one_of(st.just([]), inner), inner)
    return st.one_of(leaf, residual, concat)


@settings(max_examples=15)
@given(st.lists(layer_strategy(2), min_size=1, max_size=3), st.integers(0, 2**16))
def test_random_nested_graphs_match_torch(layers, seed):
    spec = spec_of([{"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1}, *layers,
                    {"type": "global_avgpool2d"}, {"type": "dense", "units": 3}], input_shape=(2, 6, 5))
    model, _ = build_model(spec.model, np.random.default_rng(seed))
    model.set_input_grad(True)
    module = loaded(model).train()
    g = np.random.default_rng(seed + 1)
    x = g.standard_normal((3, 2, 6, 5)).astype(np.float32)
    y = model.forward(x, training=True)
    dy = g.standard_normal(y.shape).astype(np.float32)
    dx = model.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    yt.backward(torch.tensor(dy))
    scale = max(1.0, float(np.abs(yt.detach().numpy()).max()))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4 * max(1.0, np.abs(dx).max()))
    tparams = dict(module.named_parameters())
    for p in model.parameters():
        ref = tparams[p.name].grad.numpy()
        np.testing.assert_allclose(p.grad, ref, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(ref).max()), err_msg=p.name)


@pytest.mark.parametrize("config", ["resnet20-cifar10.yaml", "mobilenet-fashion.yaml"])
def test_gradcheck_through_whole_graph_networks(config):
    """Central differences (float64) on sampled entries of every parameter of a real graph config, at a small
    input size."""
    spec, _ = load_config(ROOT / "configs" / config, ["model.input_shape=[1, 8, 8]"] if "fashion" in config
                          else ["model.input_shape=[3, 8, 8]"])
    model, _ = build_model(spec.model, np.random.default_rng(0))
    rows = check_network(model, spec.model.input_shape, batch=3, samples=3)
    assert len(rows) > 20 and max(r["error"] for r in rows) < 1e-6, max(rows, key=lambda r: r["error"])


def test_onnx_export_of_graph_models_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from cnnctl.interop.export import export_onnx

    spec = spec_of([{"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1},
                    {"type": "basic", "filters": 8, "stride": 2},
                    {"type": "concat", "branches": [[], [{"type": "conv2d", "groups": "depthwise", "kernel_size": 3,
                                                          "padding": 1, "activation": "relu"}]]},
                    {"type": "conv2d", "filters": 8, "kernel_size": 1, "groups": 4},
                    {"type": "global_avgpool2d"}, {"type": "dense", "units": 5}], {"basic": BASIC})
    model, _ = build_model(spec.model, np.random.default_rng(0))
    g = np.random.default_rng(1)
    for p in model.parameters():
        p.value[...] += g.normal(0, 0.2, p.value.shape).astype(np.float32)
    norm = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25]}
    out = export_onnx(model, spec.model.input_shape, norm, "g", tmp_path / "g.onnx")
    x01 = g.uniform(0, 1, (4, 3, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x01})[0]
    mean, std = (np.array(norm[k], np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    expected = model.forward((x01 - mean) / std, training=False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the verbs on a graph model

GRAPH = {**BASE, "seed": 1,
         "data": {"dataset": "shapes", "batch_size": 32, "shapes": {"train_size": 256, "test_size": 64}},
         "model": {"input_shape": [1, 16, 16], "blocks": {"basic": BASIC}, "layers": [
             {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1, "activation": "relu"},
             {"type": "maxpool2d", "kernel_size": 2},
             {"type": "basic", "filters": 6, "stride": 2},
             {"type": "concat", "branches": [[], [{"type": "conv2d", "groups": "depthwise", "kernel_size": 3,
                                                   "padding": 1}]]},
             {"type": "global_avgpool2d"}, {"type": "dense", "units": 4}]},
         "optimizer": {"type": "adam", "lr": 0.01}, "train": {"epochs": 2}}


def test_graph_model_trains_evaluates_resumes_and_goes_through_every_verb(tmp_path):
    cfg = tmp_path / "graph.yaml"
    cfg.write_text(yaml.safe_dump(GRAPH, sort_keys=False))
    invoke("train", cfg, "--runs-dir", tmp_path / "runs", "--name", "g", "-q")
    run = next((tmp_path / "runs").iterdir())
    best = run / "checkpoints" / "best.safetensors"
    res = json.loads(invoke("eval", best, "--json").output)
    assert res["n"] == 64 and 0 <= res["accuracy"] <= 1
    assert json.loads(invoke("inspect", best, "--json").output)["layers"][2]["type"] == "basic"
    invoke("gradcheck", cfg, "--samples", "3")
    per_layer = json.loads(invoke("bench", cfg, "--steps", "2", "--warmup", "1", "--per-layer", "--json").output)
    assert [r["type"] for r in per_layer["layers"]][2:4] == ["basic", "concat"]
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).uniform(0, 255, (2, 16, 16)).astype(np.uint8))
    preds = json.loads(invoke("predict", best, tmp_path / "x.npz", "--json").output)
    assert len(preds) == 2
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    from PIL import Image
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "x.png")
    invoke("viz", best, "--out", tmp_path / "maps.png", "--image", tmp_path / "x.png")
    assert (tmp_path / "maps.png").stat().st_size > 0
    # resuming an extended graph run continues bit for bit like any other
    invoke("train", "--resume", run, "--set", "train.epochs=3", "-q")
    straight = copy.deepcopy(GRAPH)
    straight["train"]["epochs"] = 3
    cfg3 = tmp_path / "graph3.yaml"
    cfg3.write_text(yaml.safe_dump(straight, sort_keys=False))
    invoke("train", cfg3, "--runs-dir", tmp_path / "runs3", "--name", "g", "-q")
    a = (run / "metrics.csv").read_text().splitlines()
    b = (next((tmp_path / "runs3").iterdir()) / "metrics.csv").read_text().splitlines()
    strip = [lambda rows: [r.rsplit(",", 1)[0] for r in rows]][0]  # the seconds column differs
    assert strip(a) == strip(b)


def test_viz_records_nested_convolutions():
    spec = spec_of([{"type": "conv2d", "filters": 2, "kernel_size": 3, "padding": 1, "activation": "relu"},
                    {"type": "maxpool2d", "kernel_size": 2},
                    {"type": "residual", "body": [{"type": "conv2d", "filters": 2, "kernel_size": 3, "padding": 1}]},
                    {"type": "flatten"}, {"type": "dense", "units": 4}])
    model, _ = build_model(spec.model)
    convs = {n: layer for n, layer in model.named_layers() if isinstance(layer, nn.Conv2D)}
    assert list(convs) == ["layers.0", "layers.2.body.0"]
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    plain = model.forward(x, training=False)
    with nn.recording(convs) as outputs:
        recorded = model.forward(x, training=False)
    np.testing.assert_array_equal(plain, recorded)
    assert outputs["layers.0"].min() >= 0 and outputs["layers.0"].shape == (1, 2, 8, 8)  # its own ReLU applied
    assert outputs["layers.2.body.0"].shape == (1, 2, 4, 4)
    assert all(not layer.forward_hooks for layer in convs.values())  # the hooks are gone afterwards
    seen = []
    remove = model.layers[2].add_forward_hook(lambda layer, y: seen.append((layer, y.shape)))
    model.forward(x, training=False)
    remove()
    model.forward(x, training=False)
    assert seen == [(model.layers[2], (1, 2, 4, 4))]  # once, with the residual's output, until removed


CONV = {"type": "conv2d", "filters": 3, "kernel_size": 3, "padding": 1}
CONTAINERS = {  # one use of each container type; a test fails for a container type without one
    "sequential": {"type": "sequential", "layers": [CONV, {"type": "relu"}]},
    "residual": {"type": "residual", "body": [CONV, {"type": "batchnorm"}], "shortcut": [CONV]},
    "concat": {"type": "concat", "branches": [[], [CONV], [{"type": "maxpool2d", "kernel_size": 3, "stride": 1,
                                                             "padding": 1}]]},
    "gate": {"type": "gate", "branch": [{"type": "global_avgpool2d"}, {"type": "dense", "units": 3,
                                                                       "activation": "sigmoid"}]},
}


def test_every_container_type_is_covered_and_its_rows_are_its_layers():
    """Every registered container type (a spec holding layer lists) builds, and the builder's rows (what inspect,
    parameter groups and init_from read) name layers of the model's tree, in its order, one for every layer that
    the config wrote (every layer with parameters among them; the lists' own Sequentials have no row)."""
    from cnnctl.core.nn.base import LayerSpec

    containers = {tag for tag, spec in nn.SPECS.items() if spec.layer_lists is not LayerSpec.layer_lists}
    assert containers == set(CONTAINERS), "add a use of the new container type to CONTAINERS"
    for tag, use in CONTAINERS.items():
        model, rows = build_model(spec_of([use]).model)
        tree = dict(model.named_layers())
        paths = [r.path for r in walk(rows)]
        assert all(p in tree for p in paths) and paths == [n for n in tree if n in paths], tag
        assert {p.name.rsplit(".", 1)[0] for p in model.parameters()} <= set(paths), tag
        assert len(paths) == sum(1 for n, layer in tree.items() if n and type(layer) is not nn.Sequential) \
            + (tag == "sequential"), tag
    rows = build_model(spec_of([{"type": "basic", "filters": 3}], {"basic": BASIC}).model)[1]
    assert [r.path for r in walk(rows)] == ["layers.0", "layers.0.body.0", "layers.0.body.1", "layers.0.body.2",
                                            "layers.0.body.3"]


@pytest.mark.parametrize("depth", [40, 400])
def test_absurd_nesting_is_refused_with_exit_code_2(tmp_path, depth):
    """Containers nest to any sensible depth; a config nested hundreds of levels (which only an attacker writes)
    is one clear error, whether the YAML parser or the validator meets it first."""
    layer = {"type": "relu"}
    for _ in range(depth):
        layer = {"type": "residual", "body": [layer]}
    path = tmp_path / "deep.yaml"
    path.write_text(json.dumps({**BASE, "model": {"input_shape": [1, 4, 4], "layers": [layer]}}))
    res = invoke("inspect", path, code=2)
    assert "nests" in res.output and "Traceback" not in res.output
    ten = {"type": "relu"}
    for _ in range(10):
        ten = {"type": "residual", "body": [ten]}
    _, rows = build_model(spec_of([ten, {"type": "flatten"}, {"type": "dense", "units": 4}]).model)
    assert rows[0].output_shape == (3, 8, 8)


def test_repeat_is_bounded():
    with pytest.raises(ConfigError, match="less than or equal to 1000"):
        spec_of([{"type": "b", "repeat": 10**6}], {"b": {"type": "relu"}})
