"""The verbs around training, end to end on a quickstart-style run: runs, plot, viz, eval --plot, schema,
export (checked in onnxruntime), predict, gradcheck."""

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnctl.cli import app
from cnnctl.config.reading import read_config
from cnnctl.config.schema import config_schema
from cnnctl.core import nn
from cnnctl.run import checkpoint
from tests.cases import all_cases, randomize_params
from tests.conftest import ROOT
from tests.helpers import invoke, runner, trained_run

QUICK = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
QUICK["data"]["shapes"] = {"train_size": 600, "test_size": 100}
QUICK["train"] = {"epochs": 2, "test_at_end": True}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quick")
    cfg = tmp / "quick.yaml"
    cfg.write_text(yaml.safe_dump(QUICK))
    invoke("train", cfg, "--runs-dir", tmp / "runs")
    invoke("train", cfg, "--runs-dir", tmp / "runs", "--set", "optimizer.lr=0.001", "--name", "other")
    return next(p for p in (tmp / "runs").iterdir() if p.name.startswith("quickstart-"))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_runs_table_and_json(run_dir):
    res = invoke("runs", run_dir.parent, "--json")
    rows = json.loads(res.output)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
    assert all(r["epochs_done"] == 2 and r["test_acc"] is not None and r["params"] > 0 for r in rows)
    table = invoke("runs", run_dir.parent).output
    assert "finished" in table and "2/2" in table


def test_runs_diff(run_dir):
    other = next(p for p in run_dir.parent.iterdir() if p.name.startswith("other-"))
    res = json.loads(invoke("runs", "diff", run_dir, other, "--json").output)
    keys = {d["key"] for d in res["config"]}
    assert keys == {"name", "optimizer.lr"}
    assert set(res["metrics"]) >= {"val_acc", "test_acc"}
    assert "optimizer.lr" in invoke("runs", "diff", run_dir, other).output
    invoke("runs", "diff", run_dir, code=2)


def test_plot_png_and_terminal(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    invoke("plot", run_dir, "--out", tmp_path / "c.png")
    w, h = png_size(tmp_path / "c.png")
    assert w > 800 and h > 250
    text = invoke("plot", run_dir).output
    assert "train_loss" in text and "val_acc" in text and "learning rate" in text


def test_viz_filters_and_feature_maps(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    ckpt = run_dir / "checkpoints" / "best.safetensors"
    invoke("viz", ckpt, "--out", tmp_path / "f.png")
    assert min(png_size(tmp_path / "f.png")) > 100
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(tmp_path / "img.png")
    invoke("viz", ckpt, "--image", tmp_path / "img.png", "--out", tmp_path / "m.png")
    w, h = png_size(tmp_path / "m.png")
    assert w > 400 and h > 300


def test_eval_confusion_png(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    invoke("eval", run_dir / "checkpoints" / "best.safetensors", "--plot", tmp_path / "cm.png")
    assert min(png_size(tmp_path / "cm.png")) > 150


def test_schema_validates_the_example_configs(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(invoke("schema").output)
    assert schema == json.loads(json.dumps(config_schema()))
    for path in (ROOT / "configs").glob("*.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
        jsonschema.validate(read_config(path)[0], schema)  # a config that extends another: once merged
        assert path.read_text().startswith("# yaml-language-server: $schema=../docs/cnnctl.schema.json")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**QUICK, "optimizer": {"type": "sgd", "lr": -1}}, schema)
    # the copy in docs/ is what `cnnctl schema` prints today
    assert json.loads((ROOT / "docs" / "cnnctl.schema.json").read_text()) == schema


def test_predict_images_and_npz(run_dir, tmp_path):
    from PIL import Image

    from cnnctl.data import shapes

    x, y = shapes.generate(6, ["circle", "square", "triangle", "cross"], (1, 28, 28), 0.15,
                           np.random.default_rng(1))
    Image.fromarray(x[0, 0]).save(tmp_path / "a.png")
    np.savez(tmp_path / "b.npz", x=x)
    res = json.loads(invoke("predict", run_dir / "checkpoints" / "best.safetensors", tmp_path / "a.png",
                            tmp_path / "b.npz", "--top-k", "2", "--json").output)
    assert len(res) == 7 and [len(r["top"]) for r in res] == [2] * 7
    assert res[0]["input"] == "a.png" and res[1]["input"] == "b.npz[0]"
    assert all(abs(sum(t["probability"] for t in r["top"])) <= 1.0 + 1e-6 for r in res)
    assert res[0]["prediction"] == res[1]["prediction"]  # same image as a file and in the npz
    assert {r["prediction"] for r in res} <= {"circle", "square", "triangle", "cross"}
    invoke("predict", run_dir / "checkpoints" / "best.safetensors", tmp_path / "missing.png", code=2)


@pytest.mark.parametrize(("tag", "case_id", "factory", "shape"), list(all_cases()), ids=lambda v: str(v))
def test_onnx_export_of_every_layer_case_matches_onnxruntime(tag, case_id, factory, shape, tmp_path):
    """Every registered layer type (the cases of tests/cases.py, containers included) exports to ONNX and gives
    the same outputs in onnxruntime, with non-trivial weights and BatchNorm statistics."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from cnnctl.interop.export import export_onnx

    g = np.random.default_rng(0)
    layer = factory(g)
    randomize_params(layer, g, statistics=True)
    if len(shape) != 4:  # a layer on features: feed it (F, 1, 1) images, flattened (the graph's input is images)
        model, shape = nn.Model([nn.Flatten(), layer]), (shape[0], int(np.prod(shape[1:])), 1, 1)
    else:
        model = nn.Model([layer])
    c = shape[1]
    norm = {"mean": list(g.uniform(0.3, 0.6, c)), "std": list(g.uniform(0.2, 0.4, c))}
    path = export_onnx(model, shape[1:], norm, "x", tmp_path / "m.onnx")
    x01 = g.random(shape).astype(np.float32)
    x = (x01 - np.array(norm["mean"], np.float32)[:, None, None]) / np.array(norm["std"], np.float32)[:, None, None]
    ours = model.forward(x.astype(np.float32), training=False)
    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["output"], {"input": x01})[0]
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_export_cli_on_the_quickstart_run(run_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    res = invoke("export", run_dir / "checkpoints" / "best.safetensors", "--out", tmp_path / "q.onnx", "--softmax")
    assert "probabilities" in res.output
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    probs = sess.run(["output"], {"input": np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)})[0]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    invoke("export", run_dir / "checkpoints" / "best.safetensors", "--out", tmp_path / "q.x", "--format", "tflite",
           code=2)


def test_checkpoint_loads_into_torch_via_safetensors(run_dir):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    tnn = torch.nn
    state = load_file(str(run_dir / "checkpoints" / "best.safetensors"))
    weights = {k: v for k, v in state.items() if k.startswith("layers.")}
    net = tnn.Sequential(tnn.Conv2d(1, 8, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(8, 16, 3, padding=1),
                         tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(784, 64), tnn.ReLU(),
                         tnn.Linear(64, 4))
    # our layer indices count spec entries (activations are fused), torch's count modules
    mapping = {0: 0, 2: 3, 5: 7, 6: 9}
    net.load_state_dict({f"{mapping[int(k.split('.')[1])]}.{k.split('.')[2]}": v for k, v in weights.items()})
    from cnnctl.run.loading import load_model

    ckpt = checkpoint.load(run_dir / "checkpoints" / "best.safetensors")
    _, model, _ = load_model(ckpt, "x")
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(net(torch.tensor(x)).detach().numpy(), model.forward(x, training=False),
                               rtol=1e-4, atol=1e-4)


def test_gradcheck_cli(tmp_path):
    res = json.loads(invoke("gradcheck", ROOT / "configs" / "quickstart.yaml", "--json", "--samples", "6").output)
    assert res["passed"] and {r["param"] for r in res["results"]} == {"input", "weight", "bias"}
    layer_rows = [r for r in res["results"] if r["index"] is not None]
    assert {r["index"] for r in layer_rows} == {0, 2, 5, 6}
    only = json.loads(invoke("gradcheck", ROOT / "configs" / "quickstart.yaml", "--json", "--layers", "dense_6",
                             "--samples", "4").output)
    assert {r["layer"] for r in only["results"]} == {"layers.6"}  # named as the state dict and every verb name it
    by_path = json.loads(invoke("gradcheck", ROOT / "configs" / "quickstart.yaml", "--json", "--layers", "layers.6",
                                "--samples", "4").output)
    assert [r["layer"] for r in by_path["results"]] == [r["layer"] for r in only["results"]]
    table = invoke("gradcheck", ROOT / "configs" / "quickstart.yaml", "--samples", "3").output
    assert "ok" in table and "FAIL" not in table
    invoke("gradcheck", ROOT / "configs" / "quickstart.yaml", "--layers", "nope", code=2)


def test_gradcheck_catches_a_broken_layer(monkeypatch):
    from cnnctl.core import nn

    original = nn.Dense.backward

    def broken(self, dy):
        dx = original(self, dy)
        self.grads["weight"] = self.grads["weight"] * 1.01
        return dx

    monkeypatch.setattr(nn.Dense, "backward", broken)
    res = runner.invoke(app, ["gradcheck", str(ROOT / "configs" / "quickstart.yaml"), "--json", "--samples", "4"])
    assert res.exit_code == 1
    assert not json.loads(res.output)["passed"]


def test_lr_find_suggests_a_rate_and_leaves_nothing_behind(tmp_path, tiny_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("lr-find", tiny_config, "--steps", "40", "--max-lr", "10", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out) == {"suggested_lr", "lrs", "losses"} and len(out["lrs"]) == len(out["losses"]) <= 40
    assert out["lrs"][0] == pytest.approx(1e-7) and out["lrs"] == sorted(out["lrs"])
    assert 1e-7 < out["suggested_lr"] < out["lrs"][-1]
    text = invoke("lr-find", tiny_config, "--steps", "40", "--max-lr", "10", "--out", tmp_path / "lr.png").output
    assert "--set optimizer.lr=" in text and (tmp_path / "lr.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png", "tiny.yaml"]  # no run directory
    res = runner.invoke(app, ["lr-find", str(tiny_config), "--min-lr", "1", "--max-lr", "0.1"])
    assert res.exit_code == 2 and "min-lr" in res.output




def test_export_checks_its_file_against_onnxruntime_and_names_the_classes(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    run = trained_run(tmp_path)
    res = invoke("export", run, "--out", tmp_path / "m.onnx")
    assert re.search(r"checked against onnxruntime [\d.]+: its outputs equal cnnctl's to [\d.e+-]+ of the largest",
                     res.output)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == ["circle", "square", "triangle", "cross"]
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as where it is not installed
    res = invoke("export", run, "--out", tmp_path / "n.onnx")
    assert "not checked against onnxruntime: it is not installed" in res.output
    monkeypatch.undo()
    invoke("import", tmp_path / "m.onnx", "--out", tmp_path / "back")  # and the names come back with import
    from cnnctl.run import checkpoint

    assert checkpoint.load(tmp_path / "back" / "model.safetensors").run.classes == json.loads(meta["classes"])


def test_curves_have_whole_epochs_on_their_axis(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from cnnctl.tools import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig))
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_acc": 0.5, "val_acc": 0.4, "lr": 0.1}
               for e in (1, 2, 3)]
    plots.plot_curves(history, tmp_path / "c.png")
    for ax in figures[0].axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
