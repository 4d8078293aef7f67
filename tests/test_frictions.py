"""What a new user tripped on (issue 43), each fixed and held here."""

import json

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
