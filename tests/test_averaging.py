"""train.ema_decay: the moving average of the weights is what validation, the test and the checkpoints' model
hold; the weights training updates are untouched by it, and resuming continues both exactly."""

import json

import numpy as np
import yaml

from cnnctl.config.build import build_model
from cnnctl.config.reading import validate
from cnnctl.core.averaging import WeightAverage, decay_at
from cnnctl.run import checkpoint
from tests.helpers import invoke
from tests.test_training_engine import CONFIG, assert_same_run, metric_rows, only_run, write_config


def test_the_average_follows_the_num_updates_rule():
    spec = validate(CONFIG)
    model, _ = build_model(spec.model, np.random.default_rng(0))
    avg = WeightAverage(model, 0.9)
    expected = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(1)
    for step in range(1, 30):
        for _, layer in model.named_layers():
            for store in (layer.params, layer.buffers):
                for key, value in store.items():
                    store[key] = (value + rng.normal(size=value.shape)).astype(value.dtype)
        avg.update(step)
        d = min(0.9, (1 + step) / (10 + step))
        assert decay_at(0.9, step) == d
        for k, v in model.state_dict().items():  # counters (num_batches_tracked) are copied, not averaged
            expected[k] = d * expected[k] + (1 - d) * v if v.dtype.kind == "f" else v.copy()
    for k in expected:
        np.testing.assert_allclose(avg.average[k], expected[k], rtol=1e-5, atol=1e-5, err_msg=k)
    own = {k: v.copy() for k, v in model.state_dict().items()}
    with avg.applied():
        for k, v in model.state_dict().items():
            assert np.array_equal(v, avg.average[k])
    for k, v in model.state_dict().items():  # and back to its own weights
        assert np.array_equal(v, own[k])


def test_averaging_leaves_training_alone_and_is_what_is_evaluated_and_saved(tmp_path):
    plain = write_config(tmp_path, train__epochs=3, train__test_at_end=True)
    averaged = write_config(tmp_path, train__epochs=3, train__test_at_end=True, train__ema_decay=0.9)
    invoke("train", plain, "--runs-dir", tmp_path / "plain")
    invoke("train", averaged, "--runs-dir", tmp_path / "ema")
    a, b = only_run(tmp_path / "plain"), only_run(tmp_path / "ema")
    pa, pb = metric_rows(a), metric_rows(b)
    assert [r["train_loss"] for r in pa] == [r["train_loss"] for r in pb]  # the average never feeds back
    assert [r["val_loss"] for r in pa] != [r["val_loss"] for r in pb]  # ... but is what validation measures
    ca, cb = (checkpoint.load(r / "checkpoints" / "last.safetensors") for r in (a, b))
    assert not ca.training_state and cb.training_state.keys() == cb.model_state.keys()
    for k in ca.model_state:  # the weights training updated are the plain run's, bit for bit
        assert np.array_equal(cb.training_state[k], ca.model_state[k]), k
    assert any(not np.array_equal(cb.model_state[k], ca.model_state[k]) for k in ca.model_state)
    summary = json.loads((b / "summary.json").read_text())
    out = json.loads(invoke("eval", b / "checkpoints" / "last.safetensors", "--json").stdout)
    assert out["accuracy"] == summary["test"]["accuracy"]  # eval loads the average, as the test used
    assert abs(out["loss"] - summary["test"]["loss"]) < 1e-6
    best = checkpoint.load(b / "checkpoints" / "best.safetensors")
    val = json.loads(invoke("eval", b / "checkpoints" / "best.safetensors", "--data-split", "val", "--json").stdout)
    assert val["accuracy"] == best.metrics["val_acc"]
    text = yaml.safe_load((b / "config.yaml").read_text())
    assert text["train"]["ema_decay"] == 0.9


def test_resume_continues_the_average_exactly(tmp_path):
    cfg = write_config(tmp_path, train__ema_decay=0.95,
                       schedule={"type": "step", "step_size": 1, "gamma": 0.7, "warmup_epochs": 0.5})
    invoke("train", cfg, "--runs-dir", tmp_path / "straight")
    invoke("train", cfg, "--runs-dir", tmp_path / "split", "--set", "train.epochs=2")
    b = only_run(tmp_path / "split")
    invoke("train", "--resume", b, "--set", "train.epochs=4")
    assert_same_run(only_run(tmp_path / "straight"), b)


def test_init_from_an_averaged_checkpoint_takes_the_average(tmp_path):
    from cnnctl.run.trainer import Trainer

    cfg = write_config(tmp_path, train__epochs=1, train__ema_decay=0.9)
    invoke("train", cfg, "--runs-dir", tmp_path / "r")
    last = only_run(tmp_path / "r") / "checkpoints" / "last.safetensors"
    spec = validate({**CONFIG, "model": {**CONFIG["model"], "init_from": {"checkpoint": str(last), "strict": True}}})
    trainer = Trainer(spec)
    ckpt = checkpoint.load(last)
    for k, v in trainer.model.state_dict().items():
        assert np.array_equal(v, ckpt.model_state[k].reshape(v.shape)), k


def test_bench_times_the_averaging_as_part_of_a_step(monkeypatch):
    from cnnctl.tools.bench import bench

    calls = []
    monkeypatch.setattr(WeightAverage, "update", lambda self, step: calls.append(step))
    bench(validate({**CONFIG, "train": {"ema_decay": 0.99}}), steps=2, warmup=1)
    assert calls == [1, 2, 3]
    calls.clear()
    bench(validate(CONFIG), steps=2, warmup=1)
    assert calls == []
