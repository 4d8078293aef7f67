"""The Python API: docs/library.md's example run as written, a config given as a dict, and the errors."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

import cnnctl
from cnnctl.errors import CnnctlError, DataError
from tests.conftest import ROOT, TINY


def test_the_library_example_runs_as_written(tmp_path):
    example = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "library.md").read_text(), re.S)[0]
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    res = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "finished" in lines[0] and [line.split()[0] for line in lines[1:4]] == ["1", "2", "3"]
    assert lines[4].startswith("['circle', 'square', 'triangle', 'cross']")
    assert 0.25 < float(lines[5].split()[0]) <= 1.0  # the test accuracy after 3 epochs
    assert "epoch   1" not in res.stdout  # quiet: no progress


def test_train_takes_a_dict_and_the_run_reads_back(tmp_path):
    config = yaml.safe_load(TINY)
    run = cnnctl.train(config, overrides=["train.epochs=1"], runs_dir=tmp_path / "runs")
    assert run.summary["status"] == "finished" and len(run.history) == 1
    assert run.best_checkpoint.name == "best.safetensors" and run.dir.parent == tmp_path / "runs"
    again = cnnctl.train(resume=run.dir, overrides=["train.epochs=2"])
    assert again.dir == run.dir and len(again.history) == 2
    predictor = cnnctl.load(run.best_checkpoint)
    probs = predictor.predict(np.zeros((3, 1, 16, 16), np.uint8))
    assert probs.shape == (3, 4) and np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    report = cnnctl.evaluate(run.dir, split="val")
    assert report["split"] == "val" and len(report["f1"]) == 4 and np.array(report["confusion_matrix"]).sum() == 60


def test_api_mistakes_are_cnnctl_errors(tmp_path):
    with pytest.raises(CnnctlError, match="give a config to start a run, or resume"):
        cnnctl.train()
    with pytest.raises(CnnctlError, match="config must be a path, a dict or a Spec"):
        cnnctl.train(42)
    with pytest.raises(CnnctlError, match="model.layers"):
        cnnctl.train({"name": "x", "data": {"dataset": "shapes"}, "model": {"input_shape": [1, 8, 8]}})
    config = yaml.safe_load(TINY)
    run = cnnctl.train(config, overrides=["train.epochs=1"], runs_dir=tmp_path / "runs")
    with pytest.raises(DataError, match=r"the model takes \(N, 1, 16, 16\)"):
        cnnctl.load(run.dir).predict(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(CnnctlError, match="split must be test, val or train"):
        cnnctl.evaluate(run.dir, split="everything")


@pytest.mark.parametrize("images, words", [
    (np.zeros((0, 1, 16, 16), np.float32), "no images given"),
    ([], "no images given"),
    (np.array([["a"]]), "dtype <U1: pixels are numbers"),
    (np.full((1, 1, 16, 16), np.nan, np.float32), "NaN or infinite"),
    (42, "images must be an array or a list of picture files, got int"),
    ([3.5], "each picture must be a path"),
    ("missing.png", "image not found: missing.png"),
], ids=["empty-array", "empty-list", "strings", "nan", "int", "list-of-floats", "one-path"])
def test_predict_mistakes_are_cnnctl_errors_with_a_fix(tiny_run, images, words):
    with pytest.raises(CnnctlError, match=re.escape(words)) as e:
        cnnctl.load(tiny_run).predict(images)
    assert e.value.hint


def test_paths_and_overrides_of_the_wrong_type(tiny_run, tmp_path):
    with pytest.raises(CnnctlError, match="path must be a path"):
        cnnctl.load(42)
    with pytest.raises(CnnctlError, match="path must be a path"):
        cnnctl.evaluate(None)
    with pytest.raises(CnnctlError, match="overrides must be a list"):
        cnnctl.evaluate(tiny_run, overrides=[1, 2])
    # a dict, as Python users write it, and one string
    assert cnnctl.evaluate(tiny_run, split="val", overrides={"data.eval_batch_size": 7})["split"] == "val"
    run = cnnctl.train(yaml.safe_load(TINY), overrides={"train.epochs": 1, "optimizer.lr": 0.01},
                       runs_dir=tmp_path / "runs")
    assert len(run.history) == 1
    assert cnnctl.train(yaml.safe_load(TINY), overrides="train.epochs=1", runs_dir=tmp_path / "r2").summary[
        "epochs"] == 1


def test_a_script_beside_the_clone_imports_the_installed_package(tmp_path):
    """The usual layout: `git clone ... cnnctl`, then a script in the folder that holds the clone. With the src
    layout the clone's own folder is no package, so `import cnnctl` is the installed one."""
    (tmp_path / "cnnctl").symlink_to(ROOT, target_is_directory=True)
    (tmp_path / "my_script.py").write_text("import cnnctl\nprint(cnnctl.train.__module__, cnnctl.__file__)\n")
    res = subprocess.run([sys.executable, "my_script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    module, file = res.stdout.split()
    assert module == "cnnctl.api" and file.endswith("src/cnnctl/__init__.py")
