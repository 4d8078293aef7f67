"""Fine-tuning: frozen layers and blocks (trainable: false), unfreezing at an epoch, exact resume."""

import json

import numpy as np
import yaml
from safetensors.numpy import load_file

from cnnctl.cli import app
from cnnctl.config.build import build_model
from cnnctl.config.reading import validate
from tests.conftest import TINY
from tests.helpers import invoke, runner, trained_run

BN_NET = """\
name: ft
seed: 1
data: {dataset: shapes, batch_size: 32, val_split: 0.2, shapes: {train_size: 200, test_size: 60}}
model:
  input_shape: [1, 16, 16]
  blocks:
    stem:
      params: {}
      type: sequential
      layers:
        - {type: conv2d, filters: 4, kernel_size: 3, padding: 1, bias: false}
        - {type: batchnorm, activation: relu}
  layers:
    - {type: stem, trainable: false}
    - {type: maxpool2d, kernel_size: 2}
    - {type: conv2d, filters: 6, kernel_size: 3, padding: 1, activation: relu}
    - {type: global_avgpool2d}
    - {type: dense, units: 4}
optimizer: {type: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.01}
train: {epochs: 2}
"""


def train(tmp_path, text, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    res = runner.invoke(app, ["train", str(cfg), "--runs-dir", str(tmp_path / "runs"), "-q", *map(str, extra)])
    assert res.exit_code == 0, res.output
    return max((tmp_path / "runs").iterdir(), key=lambda p: p.stat().st_mtime)


def weights(run):
    return load_file(run / "checkpoints" / "last.safetensors")


def initial(text):
    spec = validate(yaml.safe_load(text))
    from cnnctl.run.start import Seeds

    return build_model(spec.model, Seeds.from_seed(spec.seed).init)[0].state_dict()


def test_a_frozen_block_keeps_its_weights_and_statistics(tmp_path):
    start, end = initial(BN_NET), weights(train(tmp_path, BN_NET))
    for name in ("layers.0.0.weight", "layers.0.1.weight", "layers.0.1.bias", "layers.0.1.running_mean",
                 "layers.0.1.running_var"):
        np.testing.assert_array_equal(end[name], start[name], err_msg=name)  # not updated, not decayed
    assert not np.array_equal(end["layers.2.weight"], start["layers.2.weight"])
    assert "optimizer.layers.0.0.weight.momentum_buffer" not in end and not any(
        k.startswith("optimizer.layers.0.") for k in end)


def test_backward_stops_below_the_lowest_trainable_layer():
    spec = validate(yaml.safe_load(BN_NET))
    model, _ = build_model(spec.model)
    assert [layer.needs_input_grad for layer in model.layers] == [False, False, False, True, True]
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    out = model.forward(x)
    model.backward(np.ones_like(out))
    assert not model.layers[0].layers[0].grads["weight"].any()  # never reached
    assert model.layers[2].grads["weight"].any()


def test_inspect_counts_frozen_parameters(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BN_NET)
    res = runner.invoke(app, ["inspect", str(cfg), "--json"])
    report = json.loads(res.output)
    assert report["frozen_params"] == 4 * 9 + 8 and report["trainable_params"] == report["total_params"] - 44
    assert "44 frozen" in runner.invoke(app, ["inspect", str(cfg)]).output


def test_unfreeze_at_epoch_and_resume_are_exact(tmp_path):
    text = BN_NET.replace("train: {epochs: 2}", "train: {epochs: 3, unfreeze_at_epoch: 2}")
    whole = weights(train(tmp_path / "a", text))
    start = initial(text)
    assert not np.array_equal(whole["layers.0.0.weight"], start["layers.0.0.weight"])  # trained from epoch 2
    first = train(tmp_path / "b", text, "--set", "train.epochs=1")
    np.testing.assert_array_equal(weights(first)["layers.0.0.weight"], start["layers.0.0.weight"])
    res = runner.invoke(app, ["train", "--resume", str(first), "-q", "--set", "train.epochs=3"])
    assert res.exit_code == 0, res.output
    resumed = weights(first)
    for name, value in whole.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_trainable_false_on_a_single_layer_and_block_argument_errors(tmp_path):
    data = yaml.safe_load(TINY)
    data["model"]["layers"][0]["trainable"] = False
    spec = validate(data)
    model, rows = build_model(spec.model)
    assert model.layers[0].frozen and not model.layers[4].frozen and rows[0].frozen == rows[0].params
    bad = BN_NET.replace("{type: stem, trainable: false}", "{type: stem, trainable: 3}")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(bad)
    res = runner.invoke(app, ["inspect", str(cfg)])
    assert res.exit_code == 2 and "trainable" in res.output


def test_init_from_copies_what_matches_and_says_what_starts_fresh(tmp_path):
    from cnnctl.run import checkpoint
    from cnnctl.run.trainer import Trainer

    source = train(tmp_path / "a", TINY)
    best = source / "checkpoints" / "best.safetensors"
    wider = yaml.safe_load(TINY)  # a dense layer of 8 inserted: layers.4 changes shape, layers.5 is new
    wider["model"]["layers"].insert(4, {"type": "dense", "units": 8, "activation": "relu"})
    text = yaml.safe_dump(wider)
    (tmp_path / "b").mkdir()
    cfg = tmp_path / "b" / "c.yaml"
    cfg.write_text(text)
    res = runner.invoke(app, ["train", str(cfg), "--init-from", str(best), "--runs-dir", str(tmp_path / "b" / "runs"),
                              "-q", "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert f"initialised from {best}: copied 2 of 6 parameters and buffers" in res.output
    assert "fresh: layers.4.weight (shape (4, 256) in the file, (8, 256) here)" in res.output
    assert "fresh: layers.5.weight (not in the file)" in res.output
    (run,) = (tmp_path / "b" / "runs").iterdir()
    report = json.loads((run / "summary.json").read_text())["init_from"]
    assert report["copied"] == ["layers.0.bias", "layers.0.weight"]
    data = yaml.safe_load(text)
    data["model"]["init_from"] = {"checkpoint": str(best)}
    trainer = Trainer(validate(data))
    np.testing.assert_array_equal(trainer.model.layers[0].params["weight"],
                                  checkpoint.load(best).model_state["layers.0.weight"])
    res = runner.invoke(app, ["train", str(cfg), "--init-from", str(best), "--set", "model.init_from.strict=true",
                              "--runs-dir", str(tmp_path / "b" / "runs")])
    assert res.exit_code == 2 and "strict" in res.output and "layers.4.weight" in res.output, res.output
    res = runner.invoke(app, ["train", str(cfg), "--init-from", str(tmp_path / "nope.safetensors")])
    assert res.exit_code == 2 and "not found" in res.output


def test_init_from_a_pytorch_state_dict_saved_with_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from cnnctl.run.trainer import Trainer
    from tests.torch_models import to_torch

    data = yaml.safe_load(BN_NET)
    spec = validate(data)
    module = to_torch(build_model(spec.model)[0])
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1, 1)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, tmp_path / "torch.safetensors")
    data["model"]["init_from"] = {"checkpoint": str(tmp_path / "torch.safetensors"), "strict": True}
    trainer = Trainer(validate(data))
    assert not trainer.init_report["fresh"] and not trainer.init_report["unused"]
    for name, value in trainer.model.state_dict().items():
        np.testing.assert_allclose(value, state[name].numpy(), err_msg=name)


def test_resume_is_exact_with_init_from(tmp_path):
    best = train(tmp_path / "src", TINY) / "checkpoints" / "best.safetensors"
    text = TINY.replace("train: {epochs: 2}", "train: {epochs: 3}").replace(
        "model:\n", f"model:\n  init_from: {{checkpoint: {best}}}\n")
    whole = weights(train(tmp_path / "a", text))
    part = train(tmp_path / "b", text, "--set", "train.epochs=1")
    res = runner.invoke(app, ["train", "--resume", str(part), "-q", "--set", "train.epochs=3"])
    assert res.exit_code == 0, res.output
    resumed = weights(part)
    for name, value in whole.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)




def test_a_run_directory_works_for_init_from(tmp_path):
    run = trained_run(tmp_path)
    res = invoke("train", tmp_path / "r.yaml", "--init-from", run, "--runs-dir", tmp_path / "again")
    assert "checkpoints/best.safetensors: copied 4 of 4 parameters and buffers" in res.output
    spec = yaml.safe_load(TINY)
    spec["model"]["init_from"] = {"checkpoint": str(run)}
    (tmp_path / "i.yaml").write_text(yaml.safe_dump(spec))
    invoke("train", tmp_path / "i.yaml", "--set", "train.epochs=1", "--runs-dir", tmp_path / "third")
