"""`cnnctl report`, `runs`, `plot` and every picture on run directories an attacker or an accident left: strings
with `$` drawn as plain text (never mathtext), damaged metrics rows shown as n/a, run files that are FIFOs or
devices never waited on or read without bound, and a report page that a browser is told to run no script in."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import invoke

pytest.importorskip("matplotlib")
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cnnctl.run import runs
from cnnctl.tools import markup, plots  # noqa: E402
from tests.conftest import TINY
from tests.helpers import runner, strict_json
from tests.test_errors import expect_error

EVIL = ["$\\evil$", "invoice_$100_to_$200.png", "$x^{", "a$b", "\\$", "$$"]


def _copy(run, tmp_path):
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


def _png(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_picture_draws_dollar_signs_as_text():
    g = np.random.default_rng(0)
    k = len(EVIL)
    _png(plots.plot_confusion(g.integers(0, 9, (k, k)), EVIL, None, EVIL[0]))
    _png(plots.plot_samples(g.random((k, 1, 8, 8)).astype(np.float32), EVIL, None, EVIL[1]))
    _png(plots.plot_explanation(g.random((3, 8, 8)), g.random((8, 8)), None, EVIL[2]))
    _png(plots.plot_filters(g.standard_normal((4, 1, 3, 3)).astype(np.float32), None, EVIL[3]))
    _png(plots.plot_curves([{"epoch": 1, "train_loss": 1.0, "lr": 0.1}], None, EVIL[0]))
    rows = [{"best": 0.5 + i / 100, "values": {EVIL[0]: e}} for i, e in enumerate(EVIL)]
    _png(plots.plot_sweep(rows, EVIL[5], None, EVIL[4]))


DAMAGED = [
    {"train_loss": 1.0, "lr": 0.1},  # no epoch
    {"epoch": 2, "train_loss": None, "lr": None, "val_acc": "high"},  # nulls, a string
    {"epoch": 3, "train_loss": float("nan"), "lr": "0.1", "train_acc": True},  # NaN, a number as text, a boolean
    {"epoch": "4", "val_loss": [1], "lr": {"x": 1}},
    {"epoch": 5, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.6, "val_acc": 0.8, "lr": 0.01},
]


def _damage(run):
    lines = [json.dumps(r) for r in DAMAGED] + ["{torn", "[1, 2]", '"a string"']
    (run / "metrics.jsonl").write_text("\n".join(lines).replace("NaN", "NaN") + "\n")


def test_damaged_metrics_rows_read_as_n_a(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    _damage(run)
    history = runs.read_history(run)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[1]["lr"] is None and history[1]["val_acc"] is None and history[2]["train_loss"] is None
    assert history[2]["train_acc"] is None and history[3]["lr"] is None and history[4]["lr"] == 0.01


def test_report_and_plot_take_damaged_metrics_rows(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    _damage(run)
    invoke("plot", run)  # the terminal chart
    invoke("plot", run, "--out", tmp_path / "curves.png")
    _png((tmp_path / "curves.png").read_bytes())
    invoke("report", run, "--out", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "n/a" in page
    invoke("runs", run.parent)


def _special(path, kind):
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind", ["fifo", "zero"])
@pytest.mark.parametrize("name", ["summary.json", "metrics.jsonl"])
def test_run_files_that_are_fifos_or_devices_are_never_waited_on(tiny_run, tmp_path, kind, name):
    """In a subprocess with a time limit: a hang or an unbounded read fails the test instead of the suite."""
    run = _copy(tiny_run, tmp_path)
    _special(run / name, kind)
    for args in (["runs", str(run.parent)], ["report", str(run), "--out", str(tmp_path / "r.html")],
                 ["plot", str(run)]):
        res = subprocess.run([sys.executable, "-m", "cnnctl", *args], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in res.stderr, res.stderr
        if args[0] == "plot" and name == "metrics.jsonl":
            assert res.returncode == 2 and "no metrics.jsonl" in res.stderr, res.stderr
        else:
            assert res.returncode == 0, res.stderr


def test_the_report_tells_the_browser_to_run_no_script(tiny_run, tmp_path):
    invoke("report", tiny_run, "--out", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert f'<meta http-equiv="Content-Security-Policy" content="{markup.CSP}">' in page
    assert "default-src 'none'" in markup.CSP and "script-src" not in markup.CSP
    assert "<script" not in page.lower()


@pytest.fixture
def interrupted_run(tmp_path):
    """A run that stopped after one of its two epochs (so --resume has work to do)."""
    from tests.helpers import invoke

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    invoke("train", cfg, "--runs-dir", tmp_path / "runs", "--set", "train.epochs=1")
    run = next((tmp_path / "runs").iterdir())
    return run


DAMAGE = st.sampled_from([
    ("summary.json", b""), ("summary.json", b'{"status": "running", "pid": 1, "epochs_done": "x"}'),
    ("summary.json", b"NaN"), ("metrics.jsonl", b'{"epoch": 1}\n{"epoch": '), ("metrics.csv", b"epoch\nzz\n"),
    ("config.yaml", b"name: [unclosed"), ("config.yaml", b""), (".lock", None), ("checkpoints/last.safetensors", b""),
    ("checkpoints/last.safetensors", None), ("checkpoints/best.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
    ("checkpoints/.last.safetensors.abc.tmp", b"partial"),
])


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory):
    from cnnctl.cli import app

    tmp = tmp_path_factory.mktemp("pristine")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY)
    res = runner.invoke(app, ["train", str(cfg), "--runs-dir", str(tmp / "runs"), "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    return next((tmp / "runs").iterdir())


def test_runs_shows_damaged_summary_fields_as_missing(tiny_run, tmp_path):
    import shutil

    runs_dir = tmp_path / "runs"
    shutil.copytree(tiny_run, runs_dir / "good")
    shutil.copytree(tiny_run, runs_dir / "bad")
    (runs_dir / "bad" / "summary.json").write_text(json.dumps({
        "status": 3, "started": 5, "name": ["x"], "epochs_done": "one", "epochs": -2, "best": {"val_acc": "high"},
        "test": {"accuracy": [1]}, "params": 1.5, "wall_seconds": "long", "pid": "me"}))
    text = invoke("runs", runs_dir).output
    assert "good" in text and "bad" in text and "unknown" in text
    rows = {r["run"]: r for r in json.loads(invoke("runs", runs_dir, "--json").output)}
    assert {k for k, v in rows["bad"].items() if v is None} == {"name", "started", "epochs_done", "epochs",
                                                                "best_val_acc", "test_acc", "params", "wall_seconds"}
    assert rows["good"]["epochs_done"] == 1


@pytest.mark.parametrize("history", [[{}], [{"epoch": "1", "step": 8}], [{"epoch": 0, "step": 1}]])
def test_a_checkpoints_history_rows_without_their_counts_are_damage(tiny_run, tmp_path, history):
    """Found by the fuzzed-metadata test in CI: an epoch's row of {} reached the trainer and ended in KeyError."""
    import shutil

    from safetensors import safe_open
    from safetensors.numpy import save_file

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    last = run / "checkpoints" / "last.safetensors"
    with safe_open(str(last), "numpy") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    trainer = json.loads(meta["trainer"])
    trainer["history"] = history
    save_file(tensors, str(last), metadata={**meta, "trainer": json.dumps(trainer)})
    expect_error(["train", "--resume", run, "--set", "train.epochs=2", "--force"],
                 "damaged checkpoint metadata: trainer.history.0")


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "directory", "fifo"])
def test_a_lock_that_is_not_a_plain_file_of_its_own_is_refused_untouched(interrupted_run, tmp_path, kind):
    import os

    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me")
    lock = interrupted_run / ".lock"
    lock.unlink(missing_ok=True)
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, lock)
    elif kind == "directory":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    for args in (["train", "--resume", interrupted_run, "--set", "train.epochs=2"],
                 ["train", "--resume", interrupted_run, "--set", "train.epochs=1"]):  # refused, and also when
        expect_error(args, "cannot lock the run directory", ".lock")            # the resume would be refused
    assert victim.read_text() == "do not truncate me"


def test_a_lock_is_written_only_once_it_is_held(interrupted_run):
    import fcntl
    import os

    from tests.helpers import invoke

    fd = os.open(interrupted_run / ".lock", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        expect_error(["train", "--resume", interrupted_run, "--set", "train.epochs=2"], "pid 4242")
        assert (interrupted_run / ".lock").read_text() == "4242\n"
    finally:
        os.close(fd)
    invoke("train", "--resume", interrupted_run, "--set", "train.epochs=2")


def test_json_is_strict_everywhere(tmp_path):
    from cnnctl.core.fileio import json_text
    from cnnctl.run import checkpoint, runs

    assert json_text({"a": [float("nan"), 1.0, float("-inf")], "b": (2, float("inf"))}) == \
        '{"a": [null, 1.0, null], "b": [2, null]}'
    runs.write_json(tmp_path / "s.json", {"loss": math.nan})
    runs.append_metrics(tmp_path, {"epoch": 1, "val_loss": math.inf})
    assert strict_json(tmp_path / "s.json") == {"loss": None}
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["val_loss"] is None
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, checkpoint.Checkpoint(config={"name": "x"}, model_state={"w": np.zeros(2, np.float32)},
                                                metrics={"val_loss": math.nan}))
    assert checkpoint.load(path).metrics == {"val_loss": None}


@pytest.mark.parametrize("make,words", [
    (lambda p: "/dev/zero", ["not a regular file"]),
    (lambda p: p / "fifo", ["not a regular file"]),
    (lambda p: (p / "h.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}") and p / "h.safetensors",
     ["not a safetensors file"]),
    (lambda p: (p / "s.safetensors").write_bytes(b"abc") and p / "s.safetensors", ["empty or truncated"]),
])
def test_checkpoints_are_checked_before_their_body_is_read(tmp_path, make, words):
    import os

    os.mkfifo(tmp_path / "fifo")
    target = make(tmp_path)
    expect_error(["eval", target], *words)
    spec = yaml.safe_load(TINY)
    spec["model"]["init_from"] = {"checkpoint": str(target)}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    expect_error(["train", path, "--runs-dir", tmp_path / "runs"], "model.init_from", *words)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(DAMAGE, min_size=1, max_size=3))
def test_run_directories_damaged_by_kills_give_results_or_clear_errors(tmp_path_factory, pristine_run, damage):
    """What a kill at any moment (or a full disk) can leave: truncated or missing files, stale temporaries.
    Every verb that reads a run answers or refuses with exit 2 (1 for a training failure), never a traceback."""
    import shutil

    from cnnctl.cli import app

    run = tmp_path_factory.mktemp("damaged") / pristine_run.name
    shutil.copytree(pristine_run, run)
    for name, raw in damage:
        if raw is None:
            (run / name).unlink(missing_ok=True)
        else:
            (run / name).write_bytes(raw)
    for args in (["runs", run.parent], ["runs", run.parent, "--json"], ["plot", run], ["eval", run],
                 ["inspect", run], ["train", "--resume", run, "--set", "train.epochs=2"]):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code in (0, 1, 2), (args, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception))
        assert "Traceback" not in res.output
