"""The spec: example configs validate and round-trip; spec tags and the layer registry cannot drift apart."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnctl.config.build import Scope, build_model
from cnnctl.config.reading import apply_overrides, load_config, spec_to_dict
from cnnctl.config.spec import LAYER_SPECS, Spec
from cnnctl.core import nn
from cnnctl.errors import ConfigError
from tests.conftest import ROOT, TINY
from tests.helpers import invoke, write_tiny
from tests.test_errors import expect_error

CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "docs" / "porting").glob("*.yaml"))


def test_spec_tags_match_the_layer_registry():
    """Every layer class has a spec under its own tag; the one spec tag without a class picks one (batchnorm)."""
    assert set(nn.REGISTRY) <= set(LAYER_SPECS)
    assert set(LAYER_SPECS) - set(nn.REGISTRY) == {"batchnorm"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_validate_build_and_round_trip(path: Path):
    spec, _ = load_config(path)
    again = Spec.model_validate(spec_to_dict(spec))
    assert again == spec and spec_to_dict(again) == spec_to_dict(spec)
    model, rows = build_model(spec.model)
    assert model.num_params() == sum(r.params for r in rows) > 0


def test_every_config_the_docs_name_is_shipped():
    """The README and docs/ name configs (configs/...yaml) that a new user will run: each exists (and so is
    validated and built by the test above)."""
    root = Path(__file__).resolve().parents[1]
    texts = [root / "README.md", root / "CONTRIBUTING.md", *sorted((root / "docs").glob("*.md"))]
    named = {m for t in texts for m in re.findall(r"configs/[\w/.-]+?\.yaml", t.read_text())}
    assert {"configs/quickstart.yaml", "configs/lenet5-mnist.yaml", "configs/resnet-fashion.yaml"} <= named
    missing = sorted(n for n in named if not (root / n).is_file())
    assert not missing, f"named in the docs but not shipped: {missing}"


def test_every_layer_spec_builds_its_registered_layer():
    shapes = {3: (2, 8, 8), 1: (6,)}
    relu = [{"type": "relu"}]
    examples = {"conv2d": {"filters": 3, "kernel_size": 3}, "maxpool2d": {"kernel_size": 2},
                "avgpool2d": {"kernel_size": 2}, "dense": {"units": 3}, "sequential": {"layers": relu},
                "residual": {"body": relu}, "concat": {"branches": [relu, []]},
                "gate": {"branch": [{"type": "global_avgpool2d"}, {"type": "dense", "units": 2}]},
                "channel_shuffle": {"groups": 2}, "split": {"take": 1}}
    for tag, cls in LAYER_SPECS.items():
        spec = cls.model_validate({"type": tag, **examples.get(tag, {})})
        in_shape = shapes[1] if tag in ("dense", "batchnorm1d") else shapes[3]
        layer = spec.build(in_shape, Scope(np.random.default_rng(0), "", "test", 0, (1, 1, 1, 1), []))
        assert layer.tag == (tag if tag != "batchnorm" else "batchnorm2d")
        layer.output_shape(in_shape)


def test_batchnorm_picks_1d_or_2d_from_its_input():
    spec = Spec.model_validate({
        "name": "bn", "data": {"dataset": "shapes"},
        "model": {"input_shape": [1, 8, 8], "layers": [
            {"type": "conv2d", "filters": 2, "kernel_size": 3}, {"type": "batchnorm"}, {"type": "flatten"},
            {"type": "dense", "units": 4}, {"type": "batchnorm"}]}})
    model, _ = build_model(spec.model)
    assert [type(layer).__name__ for layer in model.layers][1::3] == ["BatchNorm2D", "BatchNorm1D"]


def test_overrides_parse_yaml_values():
    data = {"a": {"b": 1}, "l": [{"x": 1}, {"x": 2}]}
    out = apply_overrides(data, ["a.b=0.5", "l.1.x=[1, 2]", "a.c=true", "new=hello"])
    assert out == {"a": {"b": 0.5, "c": True}, "l": [{"x": 1}, {"x": [1, 2]}], "new": "hello"}
    assert data["a"]["b"] == 1  # the input is not modified
    with pytest.raises(ConfigError):
        apply_overrides(data, ["l.5.x=1"])
    for index in ("²", "١"):  # digits to str.isdigit (int() refuses the first): not list indices here
        with pytest.raises(ConfigError, match="does not exist"):
            apply_overrides(data, [f"l.{index}.x=1"])


def test_shorthands():
    base = {"name": "s", "data": {"dataset": "shapes"},
            "model": {"input_shape": [1, 8, 8], "layers": [{"type": "flatten"}, {"type": "dense", "units": 4}]}}
    spec = Spec.model_validate({**base, "loss": "mse", "optimizer": {"lr": 0.3}})
    assert spec.loss.type == "mse" and spec.optimizer.type == "sgd" and spec.optimizer.lr == 0.3


def _described(text: str, tag: str) -> list[str]:
    """Where docs/config.md describes a type: each table row naming `tag`, and in prose the words from `tag` to
    the first closing parenthesis after it (`sgd` (lr, momentum, ...), `adam` and `adamw` (lr, betas, ...))."""
    found = []
    for para in re.split(r"\n\s*\n", text):
        rows = [line for line in para.splitlines() if line.startswith("|")]
        if rows:
            found += [row for row in rows if f"`{tag}`" in row]
            continue
        for m in re.finditer(re.escape(f"`{tag}`"), para):
            end = para.find(")", m.end())
            found.append(para[m.start() : end + 1 if end >= 0 else len(para)])
    return found


def test_every_registered_type_is_documented_with_its_own_keys():
    """Each layer type, optimizer and schedule of the registries appears in docs/config.md as `tag`, and each of
    its own keys (those its spec adds) in a row or paragraph that names it: an optimizer added without a word of
    documentation fails here, whatever other optimizers' rows say."""
    from cnnctl.core import optim, schedules
    from cnnctl.core.nn.base import LayerSpec

    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    undocumented = []
    for kind, table in (("layer", LAYER_SPECS), ("optimizer", optim.OPTIMIZER_SPECS),
                        ("schedule", schedules.SCHEDULE_SPECS)):
        # keys every type of the kind has (a layer's name, an optimizer's lr) are the other test's
        common = set.intersection(*(set(spec.model_fields) for spec in table.values())) | set(LayerSpec.model_fields)
        for tag, spec in table.items():
            where = _described(text, tag)
            if not where:
                undocumented.append(f"{kind} `{tag}`")
                continue
            for key in sorted(set(spec.model_fields) - common):
                if not any(re.search(rf"(?<![\w.]){key}(?![\w])", b) for b in where):
                    undocumented.append(f"{kind} {tag}: {key}")
    assert not undocumented, f"not in docs/config.md beside their type: {undocumented}"


def test_every_config_key_is_in_the_config_reference():
    """docs/config.md documents every key of every spec (layers, optimizers and schedules from their registries)."""
    from cnnctl.core import optim, schedules

    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    missing = []

    def walk(model, where, seen):
        for name, field in model.model_fields.items():
            if not re.search(rf"[\s(,{{.`]{name}[\s,):=}}`.]", text):  # as a key: `name`, name:, a.name, ...
                missing.append(f"{where}{name}")
            ann = field.annotation
            for sub in (*getattr(ann, "__args__", ()), ann):
                if isinstance(sub, type) and hasattr(sub, "model_fields") and sub not in seen:
                    walk(sub, f"{where}{name}.", seen | {sub})

    walk(Spec, "", {Spec})
    for kind, table in (("layer", LAYER_SPECS), ("optimizer", optim.OPTIMIZER_SPECS),
                        ("schedule", schedules.SCHEDULE_SPECS)):
        for tag, spec in table.items():
            walk(spec, f"{kind} {tag}: ", {spec})
    assert not missing, f"keys without a word in docs/config.md: {missing}"


BASE = """name: base
data: {dataset: shapes, batch_size: 16}
model:
  input_shape: [1, 8, 8]
  layers:
    - {type: conv2d, filters: 4, kernel_size: 3}
    - {type: flatten}
    - {type: dense, units: 4}
optimizer: {type: sgd, lr: 0.1, momentum: 0.9}
train: {epochs: 2}
"""


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    """A config that `extends:` a base holds what it changes: mappings merge key by key, lists and scalars are
    replaced whole; a base may extend another (paths relative to the file that names them); the result is the
    config written out in full."""
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\nname: mid\noptimizer: {lr: 0.05}\n")
    (tmp_path / "sub" / "top.yaml").write_text(
        "extends: mid.yaml\nname: top\ntrain: {epochs: 3}\n"
        "model:\n  layers: [{type: flatten}, {type: dense, units: 4}]\n")
    spec, raw = load_config(tmp_path / "sub" / "top.yaml", ["train.epochs=4"])
    assert "extends" not in raw
    written = BASE.replace("name: base", "name: top").replace("lr: 0.1", "lr: 0.05").replace("epochs: 2", "epochs: 4")
    written = written.replace("    - {type: conv2d, filters: 4, kernel_size: 3}\n", "")
    (tmp_path / "full.yaml").write_text(written)
    assert spec == load_config(tmp_path / "full.yaml")[0]
    assert spec.optimizer.momentum == 0.9 and spec.data.batch_size == 16  # kept from the base


def test_extends_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE.replace("filters: 4", "filters: -4"))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\ntrain: {epochs: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "child.yaml")
    text = str(e.value)
    # the inherited bad value: the base's line and file; the config's own: its line alone
    assert f"model.layers[0].filters (line 6 of {tmp_path / 'base.yaml'})" in text
    assert "train.epochs (line 3)" in text
    (tmp_path / "list.yaml").write_text("- 1\n")
    loop = tmp_path / "loop.yaml"
    cases = {"extends: missing.yaml\n": f"{loop}: extends (line 1): config file not found",
             "extends: [base.yaml]\n": f"{loop}: extends (line 1): expected the path of a config file",
             "extends: loop.yaml\n": f"{loop}: extends (line 1): the configs extend each other in a loop "
                                     "(loop.yaml -> loop.yaml)",
             "extends: list.yaml\n": f"{tmp_path / 'list.yaml'}: the config must be a YAML mapping"}
    for text, message in cases.items():
        loop.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(loop)
        assert str(e.value).startswith(message) and e.value.hint
    with pytest.raises(ConfigError, match="read from the config file"):
        load_config(tmp_path / "base.yaml", ["extends=other.yaml"])


def test_a_shipped_config_that_extends_equals_its_base_with_the_changes(tmp_path):
    """configs/resnet-fashion-fast.yaml is resnet-fashion.yaml with other widths, epochs and name."""
    fast, _ = load_config(ROOT / "configs" / "resnet-fashion-fast.yaml")
    base, _ = load_config(ROOT / "configs" / "resnet-fashion.yaml", [
        "name=resnet-fashion-fast", "train.epochs=23", "train.validate_every=23", "model.layers.0.filters=16",
        "model.layers.2.filters=32", "model.layers.3.filters=64", "model.layers.4.filters=128"])
    assert fast == base


def _extends(tmp_path, target):
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"extends": target, "name": "e"}))
    return path


def _loop(tmp_path):
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    return True


def _sparse(path, size):
    with path.open("wb") as f:
        f.truncate(size)
    return True


def test_data_paths_are_the_configs_folders_and_recorded_absolute(tmp_path, monkeypatch):
    import numpy as np

    (tmp_path / "project" / "data").mkdir(parents=True)
    x = np.random.default_rng(0).integers(0, 256, (40, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "project" / "data" / "d.npz", x_train=x, y_train=np.arange(40) % 4, x_test=x[:8],
             y_test=np.arange(8) % 4)
    spec = yaml.safe_load(TINY)
    spec["data"] = {"dataset": "npz", "root": "data/d.npz", "batch_size": 8}
    spec["train"]["epochs"] = 1
    (tmp_path / "project" / "c.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)  # the config is in project/, the shell elsewhere
    invoke("train", "project/c.yaml", "--runs-dir", "runs")
    (run,) = (tmp_path / "runs").iterdir()
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    assert recorded == str(tmp_path / "project" / "data" / "d.npz")
    monkeypatch.chdir(tmp_path / "project")
    invoke("eval", run)  # from another folder
    # --set is the shell's: relative to the working directory
    res = invoke("inspect", "c.yaml", "--set", "data.root=data/d.npz", "--json")
    assert json.loads(res.stdout)["dataset"]["train"] == 36


@pytest.mark.parametrize("name, ours, who", [
    ("categorical_crossentropy", "cross_entropy", "Keras's"),
    ("sparse_categorical_crossentropy", "cross_entropy", "Keras's"),
    ("CrossEntropyLoss", "cross_entropy", "PyTorch's"),
    ("NLLLoss", "nll", "PyTorch's"),
    ("mean_squared_error", "mse", "Keras's"),
    ("BCEWithLogitsLoss", "bce_with_logits", "task: multilabel"),
    ("binary_crossentropy", "bce_with_logits", "no sigmoid before it"),
])
def test_keras_and_pytorch_loss_names_get_a_did_you_mean(tmp_path, name, ours, who):
    (tmp_path / "c.yaml").write_text(TINY)
    expect_error(["inspect", tmp_path / "c.yaml", "--set", f"loss={name}"], f"did you mean '{ours}'", who)


def test_the_softmax_message_names_the_key(tmp_path):
    spec = yaml.safe_load(TINY)
    spec["model"]["layers"][-1]["activation"] = "softmax"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    expect_error(["inspect", tmp_path / "c.yaml"], "(model.layers[4].activation: softmax)",
                 "remove activation: softmax from model.layers[4]")
    spec["model"]["layers"][-1].pop("activation")
    spec["model"]["layers"].append({"type": "softmax"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    expect_error(["inspect", tmp_path / "c.yaml"], "remove the layer model.layers[5] (softmax)")


@pytest.mark.parametrize("make, words", [
    (lambda t: _loop(t) and "loop1", ["extends (line 1)", "Too many levels of symbolic links"]),
    (lambda t: "a\0b", ["extends (line 1)", "NUL character"]),
    (lambda t: "x" * 6000, ["extends (line 1)", "File name too long"]),
    (lambda t: (t / "d").mkdir() or "d", ["extends (line 1)", "it is a folder, not a regular file"]),
    (lambda t: os.mkfifo(t / "f") or "f", ["extends (line 1)", "it is a FIFO, not a regular file"]),
    (lambda t: "/dev/zero", ["extends (line 1)", "it is a device, not a regular file"]),
    (lambda t: _sparse(t / "big.yaml", 3 << 30) and "big.yaml", ["3,221,225,472 bytes", "1,048,576 allowed"]),
    (lambda t: "missing.yaml", ["extends (line 1)", "config file not found"]),
])
def test_every_bad_extends_path_is_one_message(tmp_path, make, words):
    expect_error(["inspect", _extends(tmp_path, make(tmp_path))], *words, "fix:")


@pytest.mark.parametrize("make, words", [
    (lambda t: _loop(t) and t / "loop1", ["Too many levels of symbolic links"]),
    (lambda t: "/dev/zero", ["it is a device, not a regular file"]),
    (lambda t: os.mkfifo(t / "f") or t / "f", ["it is a FIFO, not a regular file"]),
    (lambda t: _sparse(t / "big.yaml", 3 << 30) and t / "big.yaml", ["more than the 1,048,576 allowed", "1 MB"]),
])
@pytest.mark.parametrize("verb", ["inspect", "train"])
def test_a_config_that_is_not_a_small_regular_file_is_one_message(tmp_path, make, words, verb):
    expect_error([verb, make(tmp_path)], "cannot read config", *words)


@pytest.mark.parametrize("override, words", [
    ("model.layers.1={type: celu, alpha: 1e39}", ["model.layers[1].alpha", "not representable in float32"]),
    ("model.layers.1={type: celu, alpha: 1e-300}", ["model.layers[1].alpha", "1.2e-38 and 3.4e38"]),
    ("optimizer={type: adadelta, eps: 5e-324}", ["optimizer.eps", "not representable in float32"]),
    ("optimizer.lr=1e39", ["optimizer.lr", "not representable in float32"]),
    ("model.layers.1={type: batchnorm, ghost_batch: 1}", ["model.layers[1].ghost_batch", "greater than or equal to 2"]),
])
def test_numbers_float32_cannot_hold_are_refused_at_validation(tmp_path, override, words):
    expect_error(["inspect", write_tiny(tmp_path), "--set", override], *words)


def test_a_test_time_shift_as_large_as_the_image_is_a_config_error(tmp_path):
    spec = yaml.safe_load(TINY)
    spec["data"]["test_time_augment"] = {"shifts": [[1, 1], [0, 16]]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    expect_error(["train", path, "--runs-dir", tmp_path / "runs"], "[0, 16]", "16x16 image")
    assert not (tmp_path / "runs").exists()


def test_nested_repeats_are_refused_before_they_expand(tmp_path):
    import time

    spec = yaml.safe_load(TINY)
    spec["model"]["blocks"] = {"a": {"type": "relu"},
                               "b": {"type": "sequential", "layers": [{"type": "a", "repeat": 1000}]},
                               "c": {"type": "sequential", "layers": [{"type": "b", "repeat": 1000}]}}
    spec["model"]["layers"].insert(0, {"type": "c", "repeat": 1000})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    expect_error(["inspect", path], "more than 100,000 layers", "model.blocks.c.layers[0].repeat",
                 "nested repeats multiply")
    assert time.perf_counter() - t0 < 30  # refused, not expanded (10^9 copies would take hours)


@pytest.mark.parametrize("key,value,words", [
    ("model.layers.0.padding", 2147483647, ["model.layers[4] (dense)", "more than any machine can"]),
    ("model.layers.0.filters", 2147483647, []),
])
def test_inspect_of_huge_layers_allocates_nothing(tmp_path, key, value, words):
    import resource

    from tests.helpers import invoke

    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if words:
        expect_error(["inspect", cfg, "--set", f"{key}={value}"], *words)
    else:
        assert "total parameters" in invoke("inspect", cfg, "--set", f"{key}={value}").stdout
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # kB: under 0.5 GB


def test_set_into_a_section_written_as_a_name_expands_it(tmp_path):
    """`loss: cross_entropy` is {type: cross_entropy}: --set loss.class_weights=auto sets into that (it used to
    fail with "its parent is not a mapping"); the same for optimizer and schedule."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text((ROOT / "configs" / "quickstart.yaml").read_text())
    spec, _ = load_config(cfg, ["loss.class_weights=auto"])
    assert spec.loss.type == "cross_entropy" and spec.loss.class_weights == "auto"
    text = cfg.read_text().replace("optimizer: {type: adam, lr: 0.003}", "optimizer: adam")
    assert "optimizer: adam\n" in text
    cfg.write_text(text)
    spec, _ = load_config(cfg, ["optimizer.lr=0.01"])
    assert spec.optimizer.type == "adam" and spec.optimizer.lr == 0.01
    out = invoke("inspect", cfg, "--set", "name.first=x", code=2).output
    assert "'name' is 'quickstart', not a mapping" in " ".join(out.split()) and "name={...}" in out
