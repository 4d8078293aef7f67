"""What a port from Keras or PyTorch needs (issue 25): the softmax-before-logits check, log_softmax + nll,
dropout2d, Adagrad/Adadelta from a config, data.eval_batch_size, and the wrong hints made right."""

import json

import numpy as np
import pytest
import yaml

from tests.conftest import TINY
from tests.helpers import invoke, metric_rows
from tests.test_errors import expect_error


def config(tmp_path, change, name="c.yaml"):
    spec = yaml.safe_load(TINY)
    change(spec)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def last(spec):
    return spec["model"]["layers"][-1]


@pytest.mark.parametrize("verb", ["train", "inspect"])
@pytest.mark.parametrize("change,words", [
    (lambda s: last(s).update(activation="softmax"), ["ends in softmax", "model.layers[4].activation: softmax",
                                                      "takes logits", "remove activation: softmax from"]),
    (lambda s: s["model"]["layers"].append({"type": "softmax"}), ["ends in softmax", "model.layers[5] (softmax)"]),
    (lambda s: s["model"]["layers"].append({"type": "log_softmax"}), ["ends in log_softmax", "loss: nll"]),
    (lambda s: s.update(loss="nll"), ["nll takes log-probabilities", "a linear layer", "{type: log_softmax}"]),
    (lambda s: (s.update(loss="nll"), last(s).update(activation="softmax")), ["ends in softmax"]),
])
def test_a_model_whose_outputs_do_not_fit_the_loss_is_refused(tmp_path, verb, change, words):
    args = [verb, config(tmp_path, change)] + (["--runs-dir", tmp_path / "runs"] if verb == "train" else [])
    expect_error(args, *words)
    assert not (tmp_path / "runs").exists()


def test_a_trailing_sequential_is_looked_into(tmp_path):
    def change(s):
        s["model"]["layers"][-1] = {"type": "sequential", "layers": [{"type": "dense", "units": 4,
                                                                      "activation": "softmax"}]}
    expect_error(["inspect", config(tmp_path, change)], "ends in softmax")


def test_mse_after_softmax_is_fine_and_label_smoothing_needs_cross_entropy(tmp_path):
    invoke("inspect", config(tmp_path, lambda s: (last(s).update(activation="softmax"), s.update(loss="mse"))))
    expect_error(["inspect", config(tmp_path, lambda s: s.update(loss={"type": "mse", "label_smoothing": 0.1}))],
                 "label_smoothing applies to cross_entropy only")


def test_log_softmax_nll_trains_like_cross_entropy_and_predicts_probabilities(tmp_path):
    """The two spellings of the same objective give the same run: losses and accuracies equal to float32
    rounding; predict turns log-probabilities into probabilities, export --softmax too."""
    ce = config(tmp_path, lambda s: None, "ce.yaml")
    nll = config(tmp_path, lambda s: (s.update(loss="nll", name="tiny-nll"),
                                      s["model"]["layers"].append({"type": "log_softmax"})), "nll.yaml")
    invoke("train", ce, "--runs-dir", tmp_path / "runs")
    invoke("train", nll, "--runs-dir", tmp_path / "runs")
    rows = {p.name.split("-")[1]: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
            for p in (tmp_path / "runs").iterdir()}
    for a, b in zip(rows["nll"], rows[next(k for k in rows if k != "nll")]):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])
    run = next(p for p in (tmp_path / "runs").iterdir() if "nll" in p.name)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).integers(0, 256, (5, 16, 16), dtype=np.uint8))
    res = json.loads(invoke("predict", run, tmp_path / "x.npz", "--json", "--top-k", "4").stdout)
    for r in res:
        assert abs(sum(t["probability"] for t in r["top"]) - 1) < 1e-5
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    invoke("export", run, "--out", tmp_path / "m.onnx", "--softmax")
    probs = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        ["output"], {"input": np.random.default_rng(1).random((3, 1, 16, 16)).astype(np.float32)})[0]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("optimizer", [{"type": "adagrad", "lr": 0.05}, {"type": "adadelta"}])
def test_adagrad_and_adadelta_train_from_a_config_and_resume_exactly(tmp_path, optimizer):
    cfg = config(tmp_path, lambda s: (s.update(optimizer=optimizer),
                                      s["model"]["layers"].insert(1, {"type": "dropout2d", "rate": 0.2})))
    invoke("train", cfg, "--runs-dir", tmp_path / "a", "--set", "train.epochs=1")
    run = next((tmp_path / "a").iterdir())
    invoke("train", "--resume", run, "--set", "train.epochs=2")
    invoke("train", cfg, "--runs-dir", tmp_path / "b")
    straight = next((tmp_path / "b").iterdir())
    assert metric_rows(run) == metric_rows(straight) and len(metric_rows(run)) == 2


def test_eval_batch_size_changes_nothing_but_the_batching(tmp_path):
    cfg = config(tmp_path, lambda s: s["train"].update(test_at_end=True))
    invoke("train", cfg, "--runs-dir", tmp_path / "a")
    invoke("train", cfg, "--runs-dir", tmp_path / "b", "--set", "data.eval_batch_size=7")
    a, b = (json.loads(next((tmp_path / d).iterdir()).joinpath("summary.json").read_text()) for d in "ab")
    assert a["test"]["accuracy"] == b["test"]["accuracy"]
    assert abs(a["test"]["loss"] - b["test"]["loss"]) < 1e-6
    assert a["final"]["val_acc"] == b["final"]["val_acc"]


def test_predict_runs_in_batches(tmp_path, monkeypatch):
    from cnnctl.tools import predict

    cfg = config(tmp_path, lambda s: s["data"].update(eval_batch_size=4))
    invoke("train", cfg, "--runs-dir", tmp_path / "runs", "--set", "train.epochs=1")
    run = next((tmp_path / "runs").iterdir())
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).integers(0, 256, (10, 16, 16), dtype=np.uint8))
    sizes = []
    real = predict.normalize
    monkeypatch.setattr(predict, "normalize", lambda x, n: sizes.append(len(x)) or real(x, n))
    res = json.loads(invoke("predict", run, tmp_path / "x.npz", "--json").stdout)
    assert len(res) == 10 and sizes == [4, 4, 2]


# ---------------------------------------------------------------- the hints a port met, made right


@pytest.fixture
def trained(tmp_path):
    cfg = config(tmp_path, lambda s: s["train"].update(epochs=1))
    invoke("train", cfg, "--runs-dir", tmp_path / "runs")
    return cfg, next((tmp_path / "runs").iterdir())


def test_missing_matplotlib_hints_fit_each_verb(trained, tmp_path, monkeypatch):
    import sys

    cfg, run = trained
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)
    viz = expect_error(["viz", run, "--out", tmp_path / "f.png"], "cnnctl[plot]")
    assert "leave out --out" not in viz  # viz has no terminal drawing
    expect_error(["plot", run, "--out", tmp_path / "c.png"], "cnnctl[plot]", "leave out --out")
    expect_error(["data", cfg, "--out", tmp_path / "g.png"], "cnnctl[plot]")


def test_set_errors_name_the_override_not_a_line_of_the_file(tmp_path):
    from tests.conftest import ROOT

    cfg = config(tmp_path, lambda s: None)
    text = expect_error(["inspect", cfg, "--set", "model.layers.0.type=conv3d"], "model.layers[0].type (from --set)")
    assert "(line" not in text.split("\n")[0]
    expect_error(["inspect", ROOT / "configs" / "resnet20-cifar10.yaml", "--set",
                  "model.blocks.basic.body.0.filters=abc"], "body[0].filters (from --set)")
    expect_error(["inspect", cfg, "--set", "optimizer.lr=-1"], "optimizer.lr (from --set)")


def test_lr_find_says_when_the_loss_never_diverged(tmp_path):
    cfg = config(tmp_path, lambda s: None)
    res = invoke("lr-find", cfg, "--steps", "8", "--max-lr", "1e-4")
    assert "the loss was still at its lowest at 0.0001" in res.stdout and "--max-lr 0.001" in res.stdout


@pytest.mark.parametrize("name", ["keras-mnist-convnet", "pytorch-mnist"])
def test_the_ported_examples_train_from_their_yaml(tmp_path, name):
    """docs/porting's configs end to end (layers, loss, optimizer, schedule) on MNIST-shaped data; their real
    MNIST accuracy is measured in docs/porting.md."""
    from tests.conftest import ROOT

    g = np.random.default_rng(0)
    x = g.integers(0, 256, (120, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "m.npz", x_train=x, y_train=np.arange(120) % 10, x_test=x[:20], y_test=np.arange(20) % 10)
    cfg = ROOT / "docs" / "porting" / f"{name}.yaml"
    res = invoke("train", cfg, "--runs-dir", tmp_path / "runs", "--set", "data.dataset=npz", "--set",
                 f"data.root={tmp_path / 'm.npz'}", "--set", "train.epochs=2")
    assert "test accuracy" in res.stdout
    rows = [json.loads(line) for line in next((tmp_path / "runs").iterdir()).joinpath("metrics.jsonl").open()]
    assert len(rows) == 2 and all(np.isfinite(r["train_loss"]) for r in rows)
