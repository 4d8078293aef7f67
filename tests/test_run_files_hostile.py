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
from cnnctl.run import runs
from cnnctl.tools import plots, report  # noqa: E402

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
    assert f'<meta http-equiv="Content-Security-Policy" content="{report.CSP}">' in page
    assert "default-src 'none'" in report.CSP and "script-src" not in report.CSP
    assert "<script" not in page.lower()
