"""Every verb with live output, run as a user runs it: its own process in a pseudo-terminal (not a pipe), at 80
and 200 columns. Each must end within a bound, show the cursor again and put its final lines on the screen.
(Rich's live display replaces sys.stdout while it runs: output written back through it once looped for ever.)"""

import json
import re
from importlib.metadata import version

import numpy as np
import pytest
import yaml
from packaging.version import Version

from tests.conftest import ROOT, TINY
from tests.helpers import runner
from tests.terminal import emulated, run_in_terminal

COLUMNS = [80, 200]
HIDE, SHOW = "\x1b[?25l", "\x1b[?25h"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A small quick-start config, a sweep over it, an image array, and one run trained in a terminal."""
    d = tmp_path_factory.mktemp("terminal")
    spec = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    spec["data"]["shapes"] = {"train_size": 400, "test_size": 100}
    spec["train"]["epochs"] = 2
    (d / "quick.yaml").write_text(yaml.safe_dump(spec))
    (d / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "s", "base": "quick.yaml", "metric": "val_acc", "mode": "max",
        "space": {"optimizer.lr": {"choice": [0.001, 0.003]}}, "search": {"type": "grid"},
        "executor": {"type": "local", "max_concurrent": 2}}))
    np.savez(d / "x.npz", x=np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    screen = run_in_terminal(["train", "quick.yaml", "--runs-dir", "runs"], cwd=d)
    assert screen.code == 0, screen.text
    (run,) = (d / "runs").iterdir()
    return d, run


def _check(screen, *final):
    assert screen.code == 0, screen.text[-3000:]
    if HIDE in screen.raw:  # a live display hid the cursor: it is shown again before the end
        assert screen.raw.rindex(SHOW) > screen.raw.rindex(HIDE)
    tail = "\n".join(screen.last_lines(len(final) + 4))
    for text in final:
        assert text in tail, screen.text[-3000:]


@pytest.mark.parametrize("columns", COLUMNS)
def test_train_ends_on_a_terminal(work, columns):
    d, _ = work
    screen = run_in_terminal(["train", "quick.yaml", "--runs-dir", f"runs-{columns}"], columns=columns, cwd=d)
    _check(screen, "best val_acc", "run directory:")
    assert HIDE in screen.raw and "epoch   2  train loss" in screen.text  # the live bars ran, the epoch lines too


@pytest.mark.parametrize("columns", COLUMNS)
def test_sweep_ends_on_a_terminal(work, columns):
    d, _ = work
    screen = run_in_terminal(["sweep", "sweep.yaml", "--runs-dir", f"sweeps-{columns}"], columns=columns, cwd=d)
    _check(screen, "best: trial-", "results:")
    assert HIDE in screen.raw  # the live table ran
    shown = emulated(screen, columns)  # what stays on the screen: the final table once, not the live one again
    assert shown.count("val_acc (max)") == 1 and shown.count("│ trial-000 │") == 1, shown


@pytest.mark.parametrize("columns", COLUMNS)
@pytest.mark.parametrize("verb", ["eval", "bench", "gradcheck", "lr-find", "data", "predict"])
def test_verb_ends_on_a_terminal(work, verb, columns):
    d, run = work
    args, final = {
        "eval": (["eval", run], ["└"]),
        "bench": (["bench", "quick.yaml", "--steps", "2", "--warmup", "1"], ["images/s", "peak RSS"]),
        "gradcheck": (["gradcheck", "quick.yaml"], ["largest relative error"]),
        "lr-find": (["lr-find", "quick.yaml", "--steps", "8"], ["8 steps from 1e-07 to 1"]),
        "data": (["data", "quick.yaml"], ["normalisation"]),
        "predict": (["predict", run, "x.npz"], ["x.npz[2]"]),
    }[verb]
    _check(run_in_terminal(args, columns=columns, cwd=d), *final)


def test_explain_by_occlusion_shows_its_squares_on_a_terminal(work):
    """Occlusion takes a forward pass per few squares: a bar counts them (on stderr) and leaves the screen when the
    maps are done; the table of explanations stays."""
    d, run = work
    screen = run_in_terminal(["explain", run, "x.npz", "--method", "occlusion", "--patch", "4", "--stride", "2",
                              "--out", "explained"], cwd=d)
    _check(screen, "x.npz[2]")
    assert "explanations (occlusion)" in screen.text
    assert re.search(r"occlusion: squares.*\b169/169\b", screen.text), screen.text[-2000:]  # 13 x 13 squares
    assert "squares" not in emulated(screen, 80)


def test_a_run_records_the_command_that_made_it(work):
    """summary.json's command (the report shows it) is what the user typed, ready to be typed again."""
    from cnnctl.run.runs import command_line

    _, run = work
    assert json.loads((run / "summary.json").read_text())["command"] == "python -m cnnctl train quick.yaml " \
        "--runs-dir runs"
    assert command_line(["/venv/bin/cnnctl", "train", "my config.yaml", "--set", "optimizer.lr=0.1"]) == \
        "cnnctl train 'my config.yaml' --set optimizer.lr=0.1"
    assert command_line(["fit.py", "--fast"]) == "python fit.py --fast"


def test_the_rich_version_is_one_the_project_allows():
    """pyproject pins rich to the majors these tests were run with: a new major is tried here before it is let in."""
    assert '"rich>=13,<16"' in (ROOT / "pyproject.toml").read_text()
    assert Version("13") <= Version(version("rich")) < Version("16")


def test_the_python_api_shows_progress_on_a_terminal_and_none_when_quiet(work):
    """cnnctl.train(quiet=False) in a terminal draws the bars (a script run by a user); quiet=True prints nothing."""
    d, _ = work
    for quiet in (False, True):
        script = d / f"api_{quiet}.py"
        script.write_text(f"import cnnctl\nrun = cnnctl.train('quick.yaml', runs_dir='api-runs', quiet={quiet})\n"
                          "print('done', run.summary['status'])\n")
        screen = _in_terminal_python(script, d)
        assert screen.code == 0, screen.text[-2000:]
        assert "done finished" in screen.text
        assert ("epoch   2  train loss" in screen.text) != quiet and (HIDE in screen.raw) != quiet


def _in_terminal_python(script, cwd):
    """A Python script in the pseudo-terminal (the harness runs `python -m cnnctl`; this runs the script)."""
    import sys

    return run_in_terminal([], cwd=cwd, argv=[sys.executable, str(script)])


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


@pytest.mark.parametrize("columns", [60, 120])
def test_plot_draws_its_charts_across_the_terminal(work, columns):
    d, run = work
    screen = run_in_terminal(["plot", run], columns=columns, cwd=d)
    assert screen.code == 0, screen.text
    rows = [line for line in screen.text.splitlines() if " |" in line]
    assert len(rows) == 30 and max(len(line.rstrip("\n")) for line in rows) == columns  # three charts, 10 rows each
