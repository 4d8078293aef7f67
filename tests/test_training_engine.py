"""The training loop: resume bit for bit (also after SIGINT mid-epoch and kill -9), NaN stops, early stopping,
clipping, epoch checkpoints, and refusing to resume an edited config."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnctl.run import checkpoint, loading
from tests.helpers import invoke, runner, strict_json, write_tiny
from tests.test_errors import expect_error

CONFIG = {
    "name": "eng", "seed": 1,
    "data": {"dataset": "shapes", "batch_size": 32, "val_split": 0.1, "shapes": {"train_size": 1200, "test_size": 100}},
    "model": {"input_shape": [1, 20, 20], "layers": [
        {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same"},
        {"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2}, {"type": "flatten"},
        {"type": "dropout", "rate": 0.2}, {"type": "dense", "units": 4}]},
    "optimizer": {"type": "adam", "lr": 0.003},
    "schedule": {"type": "cosine", "warmup_epochs": 0.5},
    "train": {"epochs": 4},
}


def write_config(tmp_path, **changes) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def only_run(runs_dir: Path) -> Path:
    (run_dir,) = list(runs_dir.iterdir())
    return run_dir


def metric_rows(run_dir):
    """metrics.csv without the wall-clock column."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader((run_dir / "metrics.csv").open())]


def assert_same_run(a: Path, b: Path):
    assert metric_rows(a) == metric_rows(b)
    ca, cb = (checkpoint.load(r / "checkpoints" / "last.safetensors") for r in (a, b))
    assert ca.model_state.keys() == cb.model_state.keys()
    for k in ca.model_state:
        assert np.array_equal(ca.model_state[k], cb.model_state[k]), k
    for k in ca.optimizer_state:
        assert np.array_equal(ca.optimizer_state[k], cb.optimizer_state[k]), k
    assert ca.training_state.keys() == cb.training_state.keys()
    for k in ca.training_state:
        assert np.array_equal(ca.training_state[k], cb.training_state[k]), k
    assert (ca.epoch, ca.step) == (cb.epoch, cb.step)


@pytest.fixture
def straight(tmp_path):
    cfg = write_config(tmp_path)
    invoke("train", cfg, "--runs-dir", tmp_path / "straight")
    return cfg, only_run(tmp_path / "straight")


def test_two_plus_two_epochs_equal_four_straight(tmp_path):
    # a schedule that does not depend on the total epochs, so "2 then extend to 4" is the same run as 4
    cfg = write_config(tmp_path, schedule={"type": "step", "step_size": 1, "gamma": 0.7, "warmup_epochs": 0.5})
    invoke("train", cfg, "--runs-dir", tmp_path / "straight")
    a = only_run(tmp_path / "straight")
    invoke("train", cfg, "--runs-dir", tmp_path / "split", "--set", "train.epochs=2")
    b = only_run(tmp_path / "split")
    assert len(metric_rows(b)) == 2
    assert json.loads((b / "summary.json").read_text())["status"] == "finished"
    invoke("train", "--resume", b, "--set", "train.epochs=4")
    assert_same_run(a, b)
    assert json.loads((b / "summary.json").read_text())["epochs_done"] == 4


def test_finished_run_needs_more_epochs_to_resume(straight):
    _, a = straight
    res = invoke("train", "--resume", a, code=2)
    assert "finished 4 of 4" in res.output and "train.epochs" in res.output


def test_edited_config_is_refused_unless_forced(tmp_path):
    cfg = write_config(tmp_path)
    invoke("train", cfg, "--runs-dir", tmp_path / "r", "--set", "train.epochs=1")
    run_dir = only_run(tmp_path / "r")
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("lr: 0.003", "lr: 0.01"))
    res = invoke("train", "--resume", run_dir, "--set", "train.epochs=2", code=2)
    assert "differs" in res.output and "-  lr: 0.003" in res.output and "+  lr: 0.01" in res.output
    assert "--force" in res.output
    invoke("train", "--resume", run_dir, "--set", "train.epochs=2", "--force")
    assert [r["epoch"] for r in metric_rows(run_dir)] == ["1", "2"]
    assert checkpoint.load(run_dir / "checkpoints" / "last.safetensors").config["optimizer"]["lr"] == 0.01


def test_resume_needs_a_run_directory(tmp_path):
    res = invoke("train", "--resume", tmp_path, code=2)
    assert "not a run directory" in res.output
    res = invoke("train", code=2)
    assert "--resume" in res.output


def test_nan_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = write_config(tmp_path, optimizer={"type": "sgd", "lr": 0.01})
    invoke("train", cfg, "--runs-dir", tmp_path / "r", "--set", "train.epochs=1")
    run_dir = only_run(tmp_path / "r")
    last = run_dir / "checkpoints" / "last.safetensors"
    before = last.read_bytes()
    res = invoke("train", "--resume", run_dir, "--force", "--set", "train.epochs=3", "--set", "optimizer.lr=1e30",
                 code=1)
    assert "epoch 2, step" in res.output and "optimizer.lr" in res.output and "Traceback" not in res.output
    assert last.read_bytes() == before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "epoch 2" in summary["error"]
    assert len(metric_rows(run_dir)) == 1


def test_early_stopping(tmp_path):
    # train_acc can't fall below its first value by more than 1.0, so with mode min it never improves
    cfg = write_config(tmp_path, train={"epochs": 10, "early_stopping": {"monitor": "train_acc", "mode": "min",
                                                                        "patience": 2, "min_delta": 1.0}})
    res = invoke("train", cfg, "--runs-dir", tmp_path / "r")
    run_dir = only_run(tmp_path / "r")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] and summary["epochs_done"] == 3 and "early stopping" in res.output


def test_epoch_checkpoints_keep_last_and_best_monitor(tmp_path):
    cfg = write_config(tmp_path, train={"epochs": 5, "checkpoint_every": 1, "keep_last": 2, "monitor": "val_loss"})
    invoke("train", cfg, "--runs-dir", tmp_path / "r")
    run_dir = only_run(tmp_path / "r")
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best.safetensors", "epoch-0004.safetensors", "epoch-0005.safetensors", "last.safetensors"]
    best = checkpoint.load(run_dir / "checkpoints" / "best.safetensors")
    assert best.metrics["val_loss"] == min(float(r["val_loss"]) for r in metric_rows(run_dir))


def test_val_monitor_needs_validation_data(tmp_path):
    cfg = write_config(tmp_path, data={**CONFIG["data"], "val_split": 0.0})
    res = invoke("train", cfg, code=2)
    assert "train.monitor" in res.output and "val_split" in res.output
    invoke("inspect", cfg, "--set", "train.monitor=train_acc")


def test_grad_clip_matches_torch():
    torch = pytest.importorskip("torch")
    from cnnctl.config.spec import Spec
    from cnnctl.run.step import clip_gradients
    from cnnctl.run.trainer import Trainer

    spec = Spec.model_validate({**CONFIG, "train": {"epochs": 1, "grad_clip_norm": 0.5}})
    trainer = Trainer(spec)
    g = np.random.default_rng(0)
    grads = []
    for _, layer, key in trainer.model.parameters():
        layer.grads[key] = g.standard_normal(layer.params[key].shape).astype(np.float32)
        grads.append(torch.tensor(layer.grads[key], requires_grad=False))
    clip_gradients(trainer.model.trainable_parameters(), 0.5)
    tensors = [torch.zeros_like(t, requires_grad=True) for t in grads]
    for t, gr in zip(tensors, grads):
        t.grad = gr.clone()
    torch.nn.utils.clip_grad_norm_(tensors, 0.5)
    for (_, layer, key), t in zip(trainer.model.parameters(), tensors):
        np.testing.assert_allclose(layer.grads[key], t.grad.numpy(), rtol=1e-5)


# ---------------------------------------------------------------- real processes and signals

SLOW = {"data__shapes": {"train_size": 20000, "test_size": 100}}


def start(cfg, runs_dir, *args):
    return subprocess.Popen([sys.executable, "-m", "cnnctl", "train", str(cfg), "--runs-dir", str(runs_dir), "-q",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def epochs_logged(runs_dir):
    files = list(Path(runs_dir).glob("*/metrics.csv"))
    return len(files[0].read_text().splitlines()) - 1 if files else 0


def first_epoch_seconds(runs_dir) -> float:
    (path,) = Path(runs_dir).glob("*/metrics.csv")
    return float(next(csv.DictReader(path.open()))["seconds"])


AUGMENTED = {"data__augment": {"horizontal_flip": True, "random_shift": 0.1, "random_erasing": 0.3}}


@pytest.mark.parametrize("sig,code,changes", [(signal.SIGINT, 130, {}), (signal.SIGTERM, 143, {}),
                                              (signal.SIGINT, 130, AUGMENTED)], ids=["int", "term", "augmented"])
def test_signal_mid_epoch_then_resume_is_bit_identical(tmp_path, sig, code, changes):
    """Also with augmentation, whose generator the prefetching thread has moved a batch ahead when the signal
    comes: the checkpoint records it as it was before the first batch not trained on."""
    cfg = write_config(tmp_path, **SLOW, **changes)
    invoke("train", cfg, "--runs-dir", tmp_path / "straight")
    proc = start(cfg, tmp_path / "b")
    wait_for(lambda: epochs_logged(tmp_path / "b") >= 1)
    time.sleep(0.4 * first_epoch_seconds(tmp_path / "b"))  # well inside epoch 2, however fast the machine
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    run_dir = only_run(tmp_path / "b")
    assert f"cnnctl train --resume {run_dir}" in err and "Traceback" not in err
    ckpt = checkpoint.load(run_dir / "checkpoints" / "last.safetensors")
    assert ckpt.run.partial is not None and ckpt.run.partial.position > 0, "not mid-epoch"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    invoke("train", "--resume", run_dir)
    assert_same_run(only_run(tmp_path / "straight"), run_dir)


def test_kill_9_at_random_moments_leaves_a_resumable_run(tmp_path):
    cfg = write_config(tmp_path, **SLOW, train={"epochs": 4, "checkpoint_every_steps": 25})
    invoke("train", cfg, "--runs-dir", tmp_path / "straight")
    rnd = random.Random(os.getpid())
    proc = start(cfg, tmp_path / "b")
    wait_for(lambda: list((tmp_path / "b").glob("*/checkpoints/last.safetensors")))
    run_dir = only_run(tmp_path / "b")
    kills = 0
    while kills < 3:
        time.sleep(rnd.uniform(0.05, 1.2))
        if proc.poll() is not None:
            break
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
        kills += 1
        ckpt = checkpoint.load(run_dir / "checkpoints" / "last.safetensors")  # always loadable
        lines = (run_dir / "metrics.csv").read_text().split("\n") if (run_dir / "metrics.csv").exists() else [""]
        assert lines[-1] == "" and all(len(line.split(",")) == 8 for line in lines[:-1]), lines
        for f in (run_dir / "checkpoints").glob("*.safetensors"):  # a leftover temp file never has this name
            checkpoint.load(f)
        if ckpt.epoch == 4:
            break
        proc = subprocess.Popen([sys.executable, "-m", "cnnctl", "train", "--resume", str(run_dir), "-q"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.poll() is None:
        proc.communicate(timeout=300)
    if checkpoint.load(run_dir / "checkpoints" / "last.safetensors").epoch < 4:
        invoke("train", "--resume", run_dir)
    assert kills >= 1
    assert_same_run(only_run(tmp_path / "straight"), run_dir)


def test_test_time_flip_averages_the_image_and_its_mirror(tmp_path):
    from cnnctl.data import augment, batches
    from cnnctl.data.spec import TestTimeAugmentSpec
    from cnnctl.run.evaluation import evaluate, infer
    from cnnctl.run.start import run_data

    cfg = write_config(tmp_path, data__test_time_augment={"horizontal_flip": True}, train__epochs=1,
                       train__test_at_end=True)
    invoke("train", cfg, "--runs-dir", tmp_path / "runs")
    run = only_run(tmp_path / "runs")
    path = run / "checkpoints" / "last.safetensors"
    ckpt = checkpoint.load(path)
    spec, model, rows = loading.load_model(ckpt, path)
    ds = run_data(spec, rows, ckpt.normalization)
    flip = TestTimeAugmentSpec(horizontal_flip=True)
    x, y = next(batches(ds, ds.test, 50))
    plain = model.forward(x, training=False).copy()
    mirrored = model.forward(np.ascontiguousarray(x[..., ::-1]), training=False).copy()
    np.testing.assert_allclose(infer(model, x, flip), (plain + mirrored) / 2, rtol=1e-6, atol=1e-6)
    assert np.array_equal(infer(model, x), plain)
    shifted = model.forward(augment.shift(x, 1, -1), training=False).copy()
    shifted_mirrored = model.forward(np.ascontiguousarray(augment.shift(x, 1, -1)[..., ::-1]), training=False).copy()
    four = TestTimeAugmentSpec(horizontal_flip=True, shifts=[[1, -1]])
    np.testing.assert_allclose(infer(model, x, four), (plain + mirrored + shifted + shifted_mirrored) / 4,
                               rtol=1e-5, atol=1e-6)

    summary = json.loads((run / "summary.json").read_text())
    from cnnctl.config.build import build_loss
    from cnnctl.core.plan import Runner

    loss_fn = build_loss(spec, ds.train.y, len(ds.classes))
    with_flip = evaluate(Runner(model), loss_fn, ds, ds.test, 32, len(ds.classes), flip)
    without = evaluate(Runner(model), loss_fn, ds, ds.test, 32, len(ds.classes))
    assert summary["test"]["accuracy"] == with_flip["accuracy"]
    assert abs(summary["test"]["loss"] - with_flip["loss"]) < 1e-6
    assert with_flip["loss"] != without["loss"]
    out = invoke("eval", path, "--json").stdout
    assert json.loads(out)["loss"] == pytest.approx(with_flip["loss"], abs=1e-6)
    out = invoke("eval", path, "--json", "--set", "data.test_time_augment.horizontal_flip=false").stdout
    assert json.loads(out)["loss"] == pytest.approx(without["loss"], abs=1e-6)

    from cnnctl.core import functional as F
    from cnnctl.tools import predict

    images = np.random.default_rng(2).integers(0, 256, (5, 20, 20), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", x=images)
    res = json.loads(invoke("predict", path, tmp_path / "x.npz", "--top-k", "4", "--json").stdout)
    _, x01 = predict.load_inputs([tmp_path / "x.npz"], spec.model.input_shape)
    xn = predict.normalize(x01, ckpt.normalization)
    probs = F.softmax(infer(model, xn, flip), axis=1)
    for r, p in zip(res, probs):
        got = {t["class"]: t["probability"] for t in r["top"]}
        assert got == pytest.approx(dict(zip(ds.classes, p.tolist())), abs=1e-5)


def test_validate_every_skips_validation_between_and_validates_the_last_epoch(tmp_path):
    cfg = write_config(tmp_path, train__epochs=5, train__validate_every=2,
                       train__early_stopping={"monitor": "val_loss", "patience": 1, "min_delta": 10.0})
    invoke("train", cfg, "--runs-dir", tmp_path / "r")
    run_dir = only_run(tmp_path / "r")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # validated after epochs 2 and 4; early stopping (nothing improves by 10) counts only those, so it stops at 4
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["val_acc"] is not None for r in rows] == [False, True, False, True]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["epoch"] in (2, 4) and summary["stopped_early"]
    best = checkpoint.load(run_dir / "checkpoints" / "best.safetensors")
    assert best.epoch == summary["best"]["epoch"]
    cfg = write_config(tmp_path, train__epochs=3, train__validate_every=2)
    invoke("train", cfg, "--runs-dir", tmp_path / "s")
    rows = [json.loads(line) for line in (only_run(tmp_path / "s") / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc"] is not None for r in rows] == [False, True, True]  # the last epoch always


def test_epoch_checkpoints_are_ordered_by_number_past_epoch_9999(tmp_path):
    """keep_last deletes the oldest: epoch-10000 is newer than epoch-9999 although it sorts first by name."""
    from cnnctl.run import runs

    (tmp_path / "checkpoints").mkdir()
    for n in (9998, 10000, 9999, 10001):
        (tmp_path / "checkpoints" / f"epoch-{n:04d}.safetensors").write_bytes(b"")
    assert [p.name for p in runs.epoch_checkpoints(tmp_path)] == [
        "epoch-9998.safetensors", "epoch-9999.safetensors", "epoch-10000.safetensors", "epoch-10001.safetensors"]


def _patched_evaluate(monkeypatch, when):
    """train.evaluate, with `when(split_name, epoch_rows, result)` able to change or raise."""
    from cnnctl.run import trainer as train

    real = train.evaluate

    def evaluate(model, loss_fn, ds, split, *args, **kwargs):
        res = real(model, loss_fn, ds, split, *args, **kwargs)
        return when("test" if split is ds.test else "val", res) or res

    monkeypatch.setattr(train, "evaluate", evaluate)


def test_numerical_warnings_are_counted_into_the_divergence_message(tmp_path, monkeypatch):
    from cnnctl.core.nn import losses

    real, calls = losses.CrossEntropyLoss.forward, []

    def forward(self, outputs, targets):
        calls.append(1)
        if len(calls) < 3:
            return real(self, outputs, targets)
        np.log(np.zeros(4, np.float32))  # numpy: "divide by zero encountered in log"
        return float("nan")

    monkeypatch.setattr(losses.CrossEntropyLoss, "forward", forward)
    text = expect_error(["train", write_tiny(tmp_path), "--runs-dir", tmp_path / "runs"], "the loss became nan",
                        "before it numpy warned of: divide by zero encountered in log", code=1)
    assert "RuntimeWarning" not in text


def test_a_non_finite_validation_loss_fails_the_run_and_its_records_stay_readable(tmp_path, monkeypatch):
    from tests.helpers import invoke

    calls = []
    _patched_evaluate(monkeypatch, lambda split, res: calls.append(split) or (
        {**res, "loss": float("nan")} if len(calls) == 2 else None))
    text = expect_error(["train", write_tiny(tmp_path, epochs=3), "--runs-dir", tmp_path / "runs"],
                        "validation loss became nan after epoch 2", code=1)
    assert "lower optimizer.lr" in text
    run = next((tmp_path / "runs").iterdir())
    summary = strict_json(run / "summary.json")
    assert summary["status"] == "failed" and summary["epochs_done"] == 1
    # epoch 2 was trained: its row is kept, the loss as null (strict JSON); its checkpoint was not written
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["val_loss"] is None and rows[1]["train_loss"] > 0
    monkeypatch.undo()
    invoke("eval", run)  # every checkpoint it wrote loads
    invoke("train", "--resume", run)


def test_a_non_finite_test_loss_fails_the_run(tmp_path, monkeypatch):
    _patched_evaluate(monkeypatch, lambda split, res: {**res, "loss": float("inf")} if split == "test" else None)
    expect_error(["train", write_tiny(tmp_path, test_at_end=True), "--runs-dir", tmp_path / "runs"],
                 "test loss became inf at the end", code=1)
    summary = strict_json(next((tmp_path / "runs").iterdir()) / "summary.json")
    assert summary["status"] == "failed" and summary["epochs_done"] == 2


def test_summary_follows_every_epoch_and_a_kill_during_the_test_resumes_to_it(tmp_path, monkeypatch):
    from tests.helpers import invoke

    seen = []

    def when(split, res):
        run = next((tmp_path / "runs").iterdir())
        seen.append(json.loads((run / "summary.json").read_text()))
        if split == "test":
            raise KeyboardInterrupt  # the process is killed while it evaluates the test split

    _patched_evaluate(monkeypatch, when)
    res = invoke("train", write_tiny(tmp_path, epochs=3, test_at_end=True), "--runs-dir", tmp_path / "runs", code=130)
    assert "Traceback" not in res.output
    assert [(s["status"], s["epochs_done"]) for s in seen] == [("running", 0), ("running", 1), ("running", 2),
                                                              ("testing", 3)]
    run = next((tmp_path / "runs").iterdir())
    row = json.loads(invoke("runs", tmp_path / "runs", "--json").stdout)[0]
    assert row["epochs_done"] == 3 and row["status"] != "finished"
    monkeypatch.undo()
    invoke("train", "--resume", run)  # all epochs are done: only the test evaluation is left
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["test"]["n"] == 100
    assert len((run / "metrics.csv").read_text().splitlines()) == 4
    expect_error(["train", "--resume", run], "nothing to resume")


def test_a_failed_metrics_write_leaves_a_summary_that_claims_no_more(tmp_path, monkeypatch):
    from cnnctl.errors import CnnctlError
    from cnnctl.run import runs
    from tests.helpers import invoke

    real = runs.append_metrics

    def append(run_dir, row):
        if row["epoch"] == 2:
            raise CnnctlError(f"cannot append to {run_dir / 'metrics.csv'}: No space left on device")
        real(run_dir, row)

    monkeypatch.setattr(runs, "append_metrics", append)
    expect_error(["train", write_tiny(tmp_path, epochs=3), "--runs-dir", tmp_path / "runs"], "No space left")
    run = next((tmp_path / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs_done"] == 1 and summary["final"]["epoch"] == 1
    monkeypatch.undo()
    invoke("train", "--resume", run)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_rewriting_the_metrics_on_resume_never_loses_them(tmp_path, monkeypatch):
    from cnnctl.errors import CnnctlError
    from cnnctl.run import runs

    runs.rewrite_metrics(tmp_path, [{"epoch": 1, "step": 1}])
    before = (tmp_path / "metrics.csv").read_text(), (tmp_path / "metrics.jsonl").read_text()

    def full(path, data):
        raise CnnctlError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(runs, "atomic_write_bytes", full)
    with pytest.raises(CnnctlError):
        runs.rewrite_metrics(tmp_path, [{"epoch": 1, "step": 1}, {"epoch": 2, "step": 2}])
    assert ((tmp_path / "metrics.csv").read_text(), (tmp_path / "metrics.jsonl").read_text()) == before


def test_a_crash_in_the_first_epoch_keeps_the_run_and_says_why(tmp_path, monkeypatch):
    def crash(split, res):
        raise IndexError("a bug")

    _patched_evaluate(monkeypatch, crash)
    from cnnctl.cli import app

    res = runner.invoke(app, ["train", str(write_tiny(tmp_path)), "--runs-dir", str(tmp_path / "runs")])
    assert isinstance(res.exception, IndexError)
    run = next((tmp_path / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "IndexError: a bug" in summary["error"]


def test_a_closed_pipe_does_not_stop_training(tmp_path):
    import subprocess
    import sys

    cfg = write_tiny(tmp_path, epochs=4, test_at_end=True)
    done = subprocess.run(f"{sys.executable} -m cnnctl train {cfg} --runs-dir {tmp_path / 'runs'} | head -1",
                          shell=True, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    summary = json.loads(next((tmp_path / "runs").iterdir()).joinpath("summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 4 and "test" in summary
    done = subprocess.run(f"{sys.executable} -m cnnctl runs {tmp_path / 'runs'} --json | head -c 3",
                          shell=True, capture_output=True, text=True, timeout=60)
    assert done.stderr == "", done.stderr


def test_validation_at_chance_beside_high_training_accuracy_with_batchnorm_gets_one_hint(tmp_path):
    """Batchnorm whose running statistics cannot follow the batches (momentum 1e-6, inputs far from 0 mean unit
    variance): training accuracy climbs, validation stays near chance; one `warning:` line says why and what to do.
    The same network with the default momentum trains without it."""
    import yaml

    spec = {"name": "bn", "seed": 0, "data": {"dataset": "digits", "batch_size": 32, "val_split": 0.2,
                                              "normalize": {"mean": [-5.0], "std": [0.1]}},
            "model": {"input_shape": [1, 8, 8], "layers": [
                {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same"},
                {"type": "batchnorm", "momentum": 1e-6, "activation": "relu"}, {"type": "flatten"},
                {"type": "dense", "units": 10}]},
            "optimizer": {"type": "adam", "lr": 0.01}, "train": {"epochs": 3}}
    def train():  # its own process, as a user runs it (pytest would catch the warning in-process)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
        res = subprocess.run([sys.executable, "-m", "cnnctl", "train", tmp_path / "c.yaml", "--runs-dir",
                              tmp_path / "runs"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return res.stderr

    err = train()
    assert err.count("near chance") == 1 and "warning: epoch 2" in err and "trainable: false" in err, err
    spec["model"]["layers"][1]["momentum"] = 0.1
    assert "near chance" not in train()


def test_no_batchnorm_hint_for_a_multilabel_run():
    """A multi-label run's accuracy (every label right) has no chance level of 1 / classes: the rows that give the
    hint for a classifier give none for it."""
    import warnings

    from cnnctl.core.nn.regularization import BatchNorm2D
    from cnnctl.run.numerics import batchnorm_hint

    model = BatchNorm2D(3)
    row = {"epoch": 2, "train_acc": 0.98, "val_acc": 0.1}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert batchnorm_hint(model, row, None) is False and not seen
        assert batchnorm_hint(model, row, 10) is True and len(seen) == 1
