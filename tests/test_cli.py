"""The CLI verbs through typer's runner and through real subprocesses."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnctl.cli import app
from tests.conftest import ROOT
from tests.helpers import runner


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def train_tiny(config, runs_dir, *extra):
    res = run("train", config, "--runs-dir", runs_dir, *extra)
    assert res.exit_code == 0, res.output
    (run_dir,) = [p for p in Path(runs_dir).iterdir()]
    return run_dir, res


def test_train_writes_a_complete_run_directory(tiny_config, tmp_path):
    run_dir, res = train_tiny(tiny_config, tmp_path / "runs", "--set", "train.epochs=3")
    assert run_dir.name.startswith("tiny-") and str(run_dir) in res.output.replace("\n", "")
    for f in ("config.yaml", "metrics.csv", "metrics.jsonl", "summary.json", "checkpoints/last.safetensors",
              "checkpoints/best.safetensors"):
        assert (run_dir / f).is_file(), f
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["params"] == 4 * 9 + 4 + 4 * 64 * 4 + 4 and summary["epochs"] == 3
    assert summary["best"]["val_acc"] == max(float(r["val_acc"]) for r in rows)
    assert "train.epochs" not in (run_dir / "config.yaml").read_text()  # resolved, not the override text
    assert "epochs: 3" in (run_dir / "config.yaml").read_text()
    assert not list(run_dir.rglob("*.tmp"))


def test_eval_reproduces_the_logged_validation_accuracy(tiny_config, tmp_path):
    run_dir, _ = train_tiny(tiny_config, tmp_path / "runs")
    best = json.loads((run_dir / "summary.json").read_text())["best"]
    res = run("eval", run_dir / "checkpoints" / "best.safetensors", "--data-split", "val", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["accuracy"] == best["val_acc"]
    assert report["loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    assert np.array(report["confusion_matrix"]).sum() == report["n"] == 60
    table = run("eval", run_dir / "checkpoints" / "best.safetensors")
    assert table.exit_code == 0 and "confusion matrix" in table.output and "precision" in table.output


def test_same_seed_same_numbers(tiny_config, tmp_path):
    a, _ = train_tiny(tiny_config, tmp_path / "a")
    b, _ = train_tiny(tiny_config, tmp_path / "b")

    def numbers(run_dir):
        rows = csv.DictReader((run_dir / "metrics.csv").open())
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert numbers(a) == numbers(b)
    c, _ = train_tiny(tiny_config, tmp_path / "c", "--set", "seed=4")
    assert numbers(a) != numbers(c)


def test_inspect_lenet5_shapes_and_parameters():
    res = run("inspect", ROOT / "configs" / "lenet5-mnist.yaml", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert [tuple(layer["output_shape"]) for layer in report["layers"]] == [
        (6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (400,), (120,), (84,), (10,)]
    assert report["total_params"] == 61706
    assert report["layers"][0]["macs"] == 6 * 28 * 28 * 25
    table = run("inspect", ROOT / "configs" / "lenet5-mnist.yaml")
    assert "61,706" in table.output and "(16, 5, 5)" in table.output


def test_inspect_a_checkpoint(tiny_config, tmp_path):
    run_dir, _ = train_tiny(tiny_config, tmp_path / "runs")
    res = run("inspect", run_dir / "checkpoints" / "last.safetensors", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["total_params"] == 1068


def test_quiet_prints_plain_epoch_lines(tiny_config, tmp_path):
    _, res = train_tiny(tiny_config, tmp_path / "runs", "--quiet")
    assert "epoch   1" in res.output and "epoch   2" in res.output


def test_name_option_names_the_run(tiny_config, tmp_path):
    run_dir, _ = train_tiny(tiny_config, tmp_path / "runs", "--name", "other")
    assert run_dir.name.startswith("other-")


def test_real_subprocess_train_eval_and_error(tiny_config, tmp_path):
    env_cmd = [sys.executable, "-m", "cnnctl"]
    done = subprocess.run([*env_cmd, "train", str(tiny_config), "--runs-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "r").iterdir()
    ev = subprocess.run([*env_cmd, "eval", str(run_dir / "checkpoints" / "best.safetensors"), "--json"],
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0 and json.loads(ev.stdout)["n"] == 100
    bad = subprocess.run([*env_cmd, "train", str(tiny_config), "--set", "model.layers.0.filters=0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr + bad.stdout
    assert "model.layers[0].filters" in bad.stderr and "greater than 0" in bad.stderr


def test_help_keeps_brackets_and_reads_like_a_cli():
    """-h works; text in square brackets survives (no markup); flags show no <bool>, options name their value;
    shell completion can be installed."""
    r = runner
    text = r.invoke(app, ["eval", "-h"]).output
    assert "cnnctl[plot]" in text and "<bool>" not in text and "<list[str]>" not in text, text
    assert "--set KEY=VALUE" in text and "--threads N" in text and "--plot FILE.png" in text
    assert "--install-completion" in r.invoke(app, ["-h"]).output
    for verb in ("train", "eval", "inspect", "bench", "sweep", "runs", "plot", "viz", "export", "predict",
                 "gradcheck", "lr-find", "schema"):
        assert "<" not in r.invoke(app, [verb, "-h"]).output, verb  # no <bool>, <path>, <list[str]>, <int>


def test_a_run_directory_stands_for_its_best_checkpoint(tmp_path, tiny_config):
    """eval, inspect, predict, export and viz take a run directory and say which checkpoint they use."""
    assert run("train", tiny_config, "--runs-dir", tmp_path / "runs", "-q").exit_code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    best = run_dir / "checkpoints" / "best.safetensors"
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 16, 16), np.uint8))
    for args in (["eval", run_dir, "--json"], ["inspect", run_dir], ["predict", run_dir, tmp_path / "x.npz"],
                 ["export", run_dir, "--out", tmp_path / "m.onnx"], ["viz", run_dir, "--out", tmp_path / "v.png"]):
        res = run(*args)
        assert res.exit_code == 0, (args, res.output)
        assert f"using {best} (best checkpoint of the run)" in res.output, res.output
    res = run("eval", tmp_path)
    assert res.exit_code == 2 and "without checkpoints/best.safetensors" in res.output


def test_summary_and_checkpoints_record_the_environment(tmp_path, tiny_config):
    import platform

    from cnnctl import __version__
    from cnnctl.run import checkpoint

    assert run("train", tiny_config, "--runs-dir", tmp_path / "runs", "-q", "--threads", "1").exit_code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    env = json.loads((run_dir / "summary.json").read_text())["environment"]
    assert env["cnnctl"] == __version__ and env["numpy"] == np.__version__
    assert env["python"] == platform.python_version() and env["threads"] == 1 and "blas" in env
    assert env["platform"] and isinstance(env["command"], list)
    assert checkpoint.load(run_dir / "checkpoints" / "best.safetensors").environment == env


def test_tensorboard_logger_writes_what_tensorboard_reads(tmp_path, tiny_config):
    pytest.importorskip("tensorboardX")
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    res = run("train", tiny_config, "--runs-dir", tmp_path / "runs", "-q", "--logger", "tensorboard")
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    acc = ea_mod.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [m["epoch"] for m in metrics]
        assert [e.value for e in events] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    assert len(acc.Scalars("lr")) == metrics[-1]["step"]  # one rate per optimizer step
    assert any("hparams" in d.name for d in (run_dir / "tensorboard").iterdir() if d.is_dir())
    res = run("train", tiny_config, "--runs-dir", tmp_path / "r2", "--logger", "wandb")
    assert res.exit_code == 2 and "train.loggers" in res.output


def test_mlflow_logger_writes_a_run_that_mlflow_reads(tmp_path, tiny_config, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    res = run("train", tiny_config, "--runs-dir", tmp_path / "runs", "-q", "--logger", "mlflow",
              "--set", "train.test_at_end=true")
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    client = mlflow.MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "tiny"]
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.run_name == run_dir.name and found.info.status == "FINISHED"
    assert found.data.params["optimizer.lr"] == "0.01" and found.data.params["data.batch_size"] == "32"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(found.info.run_id, "val_acc")
    assert [(h.step, h.value) for h in history] == [(m["epoch"], pytest.approx(m["val_acc"])) for m in metrics]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert found.data.metrics["test_acc"] == pytest.approx(summary["test"]["accuracy"])
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {"best.safetensors", "summary.json"}
