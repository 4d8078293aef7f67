"""What a new user tripped on (issue 43), each fixed and held here."""

import json
import re

import pytest
import yaml

from tests.conftest import ROOT, TINY
from tests.helpers import invoke
from tests.test_errors import expect_error


def _run(tmp_path, name="r", **train):
    spec = yaml.safe_load(TINY)
    spec["train"].update(epochs=1, **train)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    invoke("train", tmp_path / f"{name}.yaml", "--runs-dir", tmp_path / f"runs-{name}")
    return next((tmp_path / f"runs-{name}").iterdir())


def test_a_run_directory_works_for_init_from(tmp_path):
    run = _run(tmp_path)
    res = invoke("train", tmp_path / "r.yaml", "--init-from", run, "--runs-dir", tmp_path / "again")
    assert "checkpoints/best.safetensors: copied 4 of 4 parameters and buffers" in res.output
    spec = yaml.safe_load(TINY)
    spec["model"]["init_from"] = {"checkpoint": str(run)}
    (tmp_path / "i.yaml").write_text(yaml.safe_dump(spec))
    invoke("train", tmp_path / "i.yaml", "--set", "train.epochs=1", "--runs-dir", tmp_path / "third")


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


def test_a_hyphenated_dataset_folder_under_cnnctl_data_is_found(tmp_path, monkeypatch, fashion_root):
    (tmp_path / "fashion-mnist").symlink_to(fashion_root)
    monkeypatch.setenv("CNNCTL_DATA", str(tmp_path))
    spec = yaml.safe_load((ROOT / "configs" / "lenet5-mnist.yaml").read_text())
    spec["data"]["dataset"] = "fashion_mnist"
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(spec))
    info = json.loads(invoke("data", tmp_path / "f.yaml", "--json").stdout)
    assert info["splits"]["test"]["total"] == 10_000


def test_the_default_dataset_folder_takes_the_hyphenated_name(tmp_path, monkeypatch):
    from cnnctl.data import default_root

    monkeypatch.setenv("CNNCTL_DATA", str(tmp_path))
    assert default_root("fashion_mnist") == tmp_path / "fashion_mnist"
    (tmp_path / "fashion-mnist").mkdir()
    assert default_root("fashion_mnist") == tmp_path / "fashion-mnist"
    (tmp_path / "fashion_mnist").mkdir()
    assert default_root("fashion_mnist") == tmp_path / "fashion_mnist"


@pytest.mark.parametrize("name, ours, who", [
    ("categorical_crossentropy", "cross_entropy", "Keras's"),
    ("sparse_categorical_crossentropy", "cross_entropy", "Keras's"),
    ("CrossEntropyLoss", "cross_entropy", "PyTorch's"),
    ("NLLLoss", "nll", "PyTorch's"),
    ("mean_squared_error", "mse", "Keras's"),
    ("BCEWithLogitsLoss", "cross_entropy", "no binary loss"),
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


def _sweep(tmp_path, space_extra=None):
    base = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    base["data"]["shapes"] = {"train_size": 400, "test_size": 50}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": "grid", "base": "base.yaml", "metric": "val_acc", "mode": "max",
             "space": {"optimizer.lr": {"choice": [0.001, 0.003]}, "train.epochs": 1, **(space_extra or {})},
             "search": {"type": "grid"}, "executor": {"type": "local", "max_concurrent": 2}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "sweep.yaml"


def test_sweep_set_constants_once_percent_and_the_sweeps_name_in_runs(tmp_path):
    res = invoke("sweep", _sweep(tmp_path), "--set", "model.layers.0.filters=4", "--runs-dir", tmp_path / "runs",
                 "-q")
    out = res.output
    assert out.count("every trial: train.epochs=1 model.layers.0.filters=4") == 1
    assert re.search(r"trial-000: finished, best val_acc \d+\.\d\d%", out)  # percent, as `runs` shows it
    table = out[out.index("┏"):]
    assert "train.epochs" not in table and "filters" not in table and "optimizer.lr=0.001" in table
    assert "best: trial-" in out and "% (epoch 1) with optimizer.lr=" in out
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    base = yaml.safe_load((sweep_dir / "base.yaml").read_text())
    assert base["model"]["layers"][0]["filters"] == 4  # every trial had it
    runs = json.loads(invoke("runs", tmp_path / "runs", "--json").output)
    assert sorted(r["run"] for r in runs) == [f"{sweep_dir.name}/trial-000", f"{sweep_dir.name}/trial-001"]
    report = invoke("sweep", "--report", sweep_dir).output
    assert "train.epochs" not in report and "%" in report
    expect_error(["sweep", "--resume", sweep_dir, "--set", "train.epochs=2"], "--set applies to a new sweep")


def test_a_finished_trial_at_chance_accuracy_is_flagged_diverged(tmp_path):
    from cnnctl.run import runs as runs_lib
    from cnnctl.tools.sweep import trial_result

    run = tmp_path / "trial-000"
    run.mkdir()
    runs_lib.write_json(run / "summary.json", {"status": "finished", "stopped_early": False,
                                                "dataset": {"classes": [str(i) for i in range(10)]}})
    rows = [{"epoch": e, "step": e, "train_loss": 2.31, "train_acc": 0.1, "val_loss": 2.31, "val_acc": acc,
             "lr": 0.1, "seconds": 1.0} for e, acc in ((1, 0.098), (2, 0.1025))]
    runs_lib.rewrite_metrics(run, rows)
    res = trial_result(run, "val_acc", "max")
    assert res["status"] == "diverged" and "chance for 10 classes" in res["error"]
    rows[1]["val_acc"] = 0.45
    runs_lib.rewrite_metrics(run, rows)
    assert trial_result(run, "val_acc", "max")["status"] == "finished"


def test_export_checks_its_file_against_onnxruntime_and_names_the_classes(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    run = _run(tmp_path)
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


def test_lr_find_says_when_the_loss_never_beat_a_uniform_guess():
    res = invoke("lr-find", ROOT / "configs" / "quickstart.yaml")
    assert "stayed above 1.39 (ln 4: a uniform guess over 4 classes)" in res.stdout
    assert "never diverged" not in res.stdout


def test_lr_find_verdicts_follow_the_curve():
    from cnnctl.tools.lr_find import verdict

    lrs = [10 ** (-7 + i / 10) for i in range(71)]
    rising = [2.0 - i / 100 for i in range(40)] + [1.6 + i / 50 for i in range(31)]
    notes = verdict({"losses": rising, "lrs": lrs, "stopped_early": False, "classes": 10, "chance_loss": 2.3}, 1.0)
    assert len(notes) == 1 and "rose from its minimum 1.6 at 0.001 to 2.2" in notes[0] and "do not help" in notes[0]
    notes = verdict({"losses": [3.0, 2.5, 2.4], "lrs": lrs[:3], "stopped_early": False, "classes": 4,
                     "chance_loss": 1.386}, 1.0)
    assert "stayed above 1.39" in notes[0] and "still at its lowest" in notes[1]


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
