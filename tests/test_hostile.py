"""Hostile input, round two (issue 25): each class of finding, reproduced and refused with one clear message."""

import json

import numpy as np
import pytest
import yaml

from tests.conftest import TINY
from tests.helpers import runner
from tests.test_errors import expect_error


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY.replace("epochs: 2", "epochs: 1"))
    res = runner.invoke(__import__("cnnctl.cli", fromlist=["app"]).app,
                        ["train", str(cfg), "--runs-dir", str(tmp / "runs")])
    assert res.exit_code == 0, res.output
    return next((tmp / "runs").iterdir())


# ---------------------------------------------------------------- output paths and terminals

UNWRITABLE = "/proc/cnnctl-no/out.png"  # a folder that can never be made, whoever runs the tests


@pytest.mark.parametrize("verb", [
    lambda run, cfg: ["plot", run, "--out", UNWRITABLE],
    lambda run, cfg: ["viz", run, "--out", UNWRITABLE],
    lambda run, cfg: ["eval", run, "--plot", UNWRITABLE],
    lambda run, cfg: ["lr-find", cfg, "--out", UNWRITABLE, "--steps", "3"],
    lambda run, cfg: ["export", run, "--out", "/proc/cnnctl-no/m.onnx"],
    lambda run, cfg: ["schema", "--out", "/proc/cnnctl-no/s.json"],
    lambda run, cfg: ["data", cfg, "--out", UNWRITABLE],
])
def test_unwritable_outputs_are_refused_before_any_work(tiny_run, tmp_path, verb):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    text = expect_error(verb(tiny_run, cfg), "/proc/cnnctl-no", "cannot write there")
    assert "accuracy" not in text  # eval --plot: refused before the evaluation, not after


def test_a_folder_given_as_the_output_file_is_refused(tiny_run, tmp_path):
    expect_error(["plot", tiny_run, "--out", tmp_path], "it is a folder")


def test_picture_writers_turn_os_errors_into_one_message(tmp_path):
    pytest.importorskip("matplotlib")
    from cnnctl import plots
    from cnnctl.errors import CnnctlError

    (tmp_path / "file").write_text("")  # a file where the folder should be (root ignores permissions)
    with pytest.raises(CnnctlError, match="cannot write the picture"):
        plots.plot_lr_find([1e-3, 1e-2], [1.0, 0.5], None, tmp_path / "file" / "x.png", "t")


ESCAPES = ["\x1b]0;pwned\x07", "\x1b[2J\x1b[Hwiped", "c\x9b31m"]


def test_class_names_with_escape_sequences_never_reach_the_terminal(tmp_path):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (60, 16, 16), dtype=np.uint8)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x, y_train=np.arange(60) % 3, x_test=x[:12], y_test=np.arange(12) % 3)
    spec = yaml.safe_load(TINY)
    spec["data"] = {"dataset": "npz", "root": str(npz), "classes": ESCAPES, "batch_size": 16}
    spec["model"]["layers"][-1]["units"] = 3
    spec["train"] = {"epochs": 1, "test_at_end": True}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    from cnnctl.cli import app

    outputs = []
    for args in (["train", cfg, "--runs-dir", tmp_path / "runs"], ["inspect", cfg], ["data", cfg]):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        outputs.append(res.output)
    run = next((tmp_path / "runs").iterdir())
    np.savez(tmp_path / "x.npz", x=x[:2])
    for args in (["eval", run], ["predict", run, tmp_path / "x.npz"]):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        outputs.append(res.output)
    for text in outputs:
        assert "\x1b" not in text and "\x9b" not in text and "\x07" not in text, repr(text)
    assert "\ufffd]0;pwned" in outputs[-2]  # shown, made harmless
    res = runner.invoke(app, ["predict", str(run), str(tmp_path / "x.npz"), "--json"])
    assert json.loads(res.stdout)[0]["top"][0]["class"] in ESCAPES  # JSON keeps the names (escaped by JSON)
