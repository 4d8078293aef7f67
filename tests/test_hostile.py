"""Hostile input, round two (issue 25): each class of finding, reproduced and refused with one clear message."""

import json
import math

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
    from cnnctl.errors import CnnctlError
    from cnnctl.tools import plots

    (tmp_path / "file").write_text("")  # a file where the folder should be (root ignores permissions)
    with pytest.raises(CnnctlError, match="cannot write .*x.png: Not a directory"):
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


# ---------------------------------------------------------------- images read wrong or dangerously


def _png16(path, value):
    from PIL import Image

    Image.fromarray(np.full((6, 6), value, np.uint16)).save(path)  # mode I;16: a 16-bit grayscale PNG


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_keep_their_brightness(tmp_path, channels):
    pytest.importorskip("PIL")
    from cnnctl.data import pictures

    for value, expected in ((0, 0), (16448, 64), (32896, 128), (65535, 255)):
        _png16(tmp_path / "x.png", value)
        np.testing.assert_array_equal(pictures.decode_image(tmp_path / "x.png", (channels, 4, 4)),
                                      np.full((channels, 4, 4), expected, np.uint8))


def test_two_brightness_classes_of_16_bit_pngs_stay_apart_in_a_folder(tmp_path):
    pytest.importorskip("PIL")
    from cnnctl.data import folder

    for split in ("train", "test"):
        for cls, value in (("dark", 12000), ("bright", 50000)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                _png16(tmp_path / split / cls / f"{i}.png", value + i)
    classes, (x, y), _ = folder.load_folder(tmp_path, (1, 6, 6))
    means = {classes[k]: x[y == k].mean() for k in range(2)}
    assert abs(means["dark"] - 12000 / 257) < 1 and abs(means["bright"] - 50000 / 257) < 1


def test_only_documented_formats_are_decoded_whatever_the_name(tmp_path, monkeypatch):
    """A PostScript file named .png must never reach Pillow's EPS plugin (which runs Ghostscript)."""
    PIL = pytest.importorskip("PIL")
    from PIL import EpsImagePlugin

    from cnnctl.data import pictures

    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a))
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", "/bin/false", raising=False)
    (tmp_path / "x.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    with pytest.raises(ValueError, match="not a picture in one of the formats"):
        pictures.decode_image(tmp_path / "x.png", (1, 8, 8))
    assert not called and PIL


def _damaged_png(path, length=0):
    """A PNG whose IDAT chunk length is damaged (Pillow raises SyntaxError), or with length=5 its IHDR's
    (ValueError)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    at = 33 if length == 0 else 8  # the IDAT length field follows the 25-byte IHDR chunk
    raw[at : at + 4] = length.to_bytes(4, "big")
    path.write_bytes(bytes(raw))


def test_every_bad_file_of_a_folder_is_named_in_one_message(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from cnnctl.data import folder
    from cnnctl.errors import DataError

    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "good.png")
    (d / "text.png").write_bytes(b"not an image")
    _damaged_png(d / "chunk.png")
    _damaged_png(d / "header.png", 5)
    (d / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    with pytest.raises(DataError) as e:
        folder.load_folder(tmp_path, (1, 8, 8))
    text = str(e.value)
    assert "4 of 5 files" in text and all(n in text for n in ("text.png", "chunk.png", "header.png", "trunc.jpg"))
    assert "SyntaxError" in text and "ValueError" in text
    assert "good.png" not in text


def test_predict_names_every_bad_picture_and_reads_16_bit(tiny_run, tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad1.png").write_bytes(b"junk")
    _damaged_png(tmp_path / "bad2.png")
    expect_error(["predict", tiny_run, tmp_path / "ok.png", tmp_path / "bad1.png", tmp_path / "bad2.png"],
                 "2 of 3 files in the inputs cannot be decoded", "bad1.png", "bad2.png")
    _png16(tmp_path / "wide.png", 65535)
    from cnnctl.tools.predict import load_inputs

    _, x = load_inputs([tmp_path / "wide.png"], (1, 16, 16))
    assert x.min() == 1.0


def test_pictures_without_pillow_name_the_images_extra(tiny_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "PIL", None)
    (tmp_path / "a.png").write_bytes(b"x")
    text = expect_error(["predict", tiny_run, tmp_path / "a.png"], "cnnctl[images]", "Pillow")
    assert "dataset: folder" not in text


# ---------------------------------------------------------------- memory with no bound


def test_an_npz_header_claiming_a_terabyte_is_refused_before_reading(tmp_path):
    from cnnctl.data import npz
    from cnnctl.errors import DataError

    path = tmp_path / "huge.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, int),
             x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.zeros(1, int))
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    raw = members["x_train.npy"]
    members["x_train.npy"] = raw.replace(b"'shape': (2, 4, 4), ", b"'shape': (1000000000000,), ")
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(DataError, match="more than can be spared"):
        npz.load_npz(path)


# ---------------------------------------------------------------- sweeps

def _sweep(tmp_path, epochs=40, **space):
    from tests.test_sweep import write_sweep

    return write_sweep(tmp_path, space={"optimizer.lr": {"choice": [0.001, 0.003]}, "train.epochs": epochs,
                                        **space})


def _start_sweep(path, runs_dir, *args):
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "cnnctl", "sweep", str(path), "--runs-dir", str(runs_dir), "-q",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list(runs_dir.glob("*/trials/*/metrics.csv"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() < deadline, "the trials never started"
    return proc


def _lock_free(run_dir) -> bool:
    """Whether no process holds the run directory's lock (every trial process holds its trial's)."""
    from cnnctl.errors import CnnctlError
    from cnnctl.run import runs

    try:
        with runs.locked(run_dir):
            return True
    except CnnctlError:
        return False


def test_sigterm_stops_the_sweep_and_every_trial_and_a_second_sweep_is_refused(tmp_path):
    import signal
    import time

    path = _sweep(tmp_path)
    proc = _start_sweep(path, tmp_path / "runs")
    sweep_dir = next((tmp_path / "runs").iterdir())
    trials = sorted((sweep_dir / "trials").iterdir())
    assert not any(_lock_free(t) for t in trials)  # trials hold their run directories' locks
    # beside it: a second sweep on the same directory, and a train --resume of one of its trials
    expect_error(["sweep", "--resume", sweep_dir, "-q"], "being trained by another process", f"pid {proc.pid}")
    expect_error(["train", "--resume", trials[0]], "being trained by another process")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted" in err and f"cnnctl sweep --resume {sweep_dir}" in err and "Traceback" not in err
    time.sleep(0.5)
    assert all(_lock_free(t) for t in trials), "a trial process outlived the sweep"
    epochs = [len((t / "metrics.csv").read_text().splitlines()) - 1 for t in trials]
    time.sleep(2)
    assert epochs == [len((t / "metrics.csv").read_text().splitlines()) - 1 for t in trials]


def test_trials_stop_when_the_sweep_process_is_killed(tmp_path):
    import signal
    import time

    proc = _start_sweep(_sweep(tmp_path), tmp_path / "runs")
    trials = sorted(next((tmp_path / "runs").iterdir()).joinpath("trials").iterdir())
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.time() + 60
    while not all(_lock_free(t) for t in trials) and time.time() < deadline:
        time.sleep(0.2)
    assert all(_lock_free(t) for t in trials), "orphaned trials kept training"


def test_a_killed_trial_process_fails_alone_and_is_never_named_best(tmp_path):
    import os
    import signal

    path = _sweep(tmp_path, epochs=25)
    proc = _start_sweep(path, tmp_path / "runs")
    sweep_dir = next((tmp_path / "runs").iterdir())
    victim = sweep_dir / "trials" / "trial-001"
    pid = int((victim / ".lock").read_text())
    os.kill(pid, signal.SIGKILL)  # what the out-of-memory killer does
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    rows = {r["trial"]: r for r in __import__("csv").DictReader((sweep_dir / "results.csv").open())}
    assert rows["trial-000"]["status"] == "finished" and rows["trial-000"]["epochs"] == "25"
    assert rows["trial-001"]["status"] == "failed" and "SIGKILL" in rows["trial-001"]["error"]
    assert "best: trial-000" in out and "1 of 2 trials failed: trial-001" in err
    assert yaml.safe_load((sweep_dir / "best.yaml").read_text())["name"].endswith("trial-000")


def test_hand_edited_results_and_list_valued_keys(tmp_path):
    import csv

    from tests.test_sweep import write_sweep

    path = write_sweep(tmp_path, space={"optimizer.lr": {"choice": [0.001, 0.003]}, "train.epochs": 1,
                                        "data.test_time_augment.shifts": {"choice": [[], [[1, 1], [-1, -1]]]}})
    from tests.helpers import invoke

    invoke("sweep", path, "--runs-dir", tmp_path / "runs", "-q")
    sweep_dir = next((tmp_path / "runs").iterdir())
    text = invoke("plot", sweep_dir).stdout  # in the terminal, values whole
    assert "[[1, 1], [-1, -1]]" in text and "val_acc against data.test_time_augment.shifts" in text
    pytest.importorskip("matplotlib")
    invoke("plot", sweep_dir, "--out", tmp_path / "s.png")
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    rows[0].update(best="n/a", epochs="n/a", seconds="inf")
    with (sweep_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for args in (["runs", sweep_dir], ["sweep", "--report", sweep_dir], ["plot", sweep_dir]):
        res = invoke(*args)
        assert "Traceback" not in res.output
    invoke("sweep", "--resume", sweep_dir, "-q")  # the n/a trial counts as not done: it runs again
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert rows[0]["best"] not in ("", "n/a")


def test_randint_bounds_beyond_64_bits_are_refused(tmp_path):
    path = _sweep(tmp_path, **{"seed": {"randint": [0, 10**23]}})
    text = yaml.safe_load(path.read_text())
    text["search"] = {"type": "random", "samples": 2}
    path.write_text(yaml.safe_dump(text))
    expect_error(["sweep", path, "--runs-dir", tmp_path / "runs"], "64-bit integers")


# ---------------------------------------------------------------- writing through a run's .lock


@pytest.fixture
def interrupted_run(tmp_path):
    """A run that stopped after one of its two epochs (so --resume has work to do)."""
    from tests.helpers import invoke

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    invoke("train", cfg, "--runs-dir", tmp_path / "runs", "--set", "train.epochs=1")
    run = next((tmp_path / "runs").iterdir())
    return run


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


# ---------------------------------------------------------------- non-finite numbers and records after a crash


def _strict(path):
    """Parse a JSON file refusing NaN and Infinity tokens, as strict readers do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _patched_evaluate(monkeypatch, when):
    """train.evaluate, with `when(split_name, epoch_rows, result)` able to change or raise."""
    from cnnctl.run import trainer as train

    real = train.evaluate

    def evaluate(model, loss_fn, ds, split, *args, **kwargs):
        res = real(model, loss_fn, ds, split, *args, **kwargs)
        return when("test" if split is ds.test else "val", res) or res

    monkeypatch.setattr(train, "evaluate", evaluate)


def _config(tmp_path, **train):
    spec = yaml.safe_load(TINY)
    spec["train"].update(train)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_non_finite_validation_loss_fails_the_run_and_its_records_stay_readable(tmp_path, monkeypatch):
    from tests.helpers import invoke

    calls = []
    _patched_evaluate(monkeypatch, lambda split, res: calls.append(split) or (
        {**res, "loss": float("nan")} if len(calls) == 2 else None))
    text = expect_error(["train", _config(tmp_path, epochs=3), "--runs-dir", tmp_path / "runs"],
                        "validation loss became nan after epoch 2", code=1)
    assert "lower optimizer.lr" in text
    run = next((tmp_path / "runs").iterdir())
    summary = _strict(run / "summary.json")
    assert summary["status"] == "failed" and summary["epochs_done"] == 1
    # epoch 2 was trained: its row is kept, the loss as null (strict JSON); its checkpoint was not written
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["val_loss"] is None and rows[1]["train_loss"] > 0
    monkeypatch.undo()
    invoke("eval", run)  # every checkpoint it wrote loads
    invoke("train", "--resume", run)


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e300])
def test_float_images_that_are_not_finite_float32_are_refused_at_load(tmp_path, value):
    from cnnctl.data import npz
    from cnnctl.errors import DataError

    x = np.random.default_rng(0).random((20, 4, 4))
    x[7, 1, 2] = value
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(20) % 2, x_test=x[:4], y_test=np.arange(4) % 2)
    with pytest.raises(DataError, match="x_train holds 1 values that are not finite"):
        npz.load_npz(tmp_path / "d.npz")


def test_a_non_finite_test_loss_fails_the_run(tmp_path, monkeypatch):
    _patched_evaluate(monkeypatch, lambda split, res: {**res, "loss": float("inf")} if split == "test" else None)
    expect_error(["train", _config(tmp_path, test_at_end=True), "--runs-dir", tmp_path / "runs"],
                 "test loss became inf at the end", code=1)
    summary = _strict(next((tmp_path / "runs").iterdir()) / "summary.json")
    assert summary["status"] == "failed" and summary["epochs_done"] == 2


def test_json_is_strict_everywhere(tmp_path):
    from cnnctl.core.fileio import json_text
    from cnnctl.run import checkpoint, runs

    assert json_text({"a": [float("nan"), 1.0, float("-inf")], "b": (2, float("inf"))}) == \
        '{"a": [null, 1.0, null], "b": [2, null]}'
    runs.write_json(tmp_path / "s.json", {"loss": math.nan})
    runs.append_metrics(tmp_path, {"epoch": 1, "val_loss": math.inf})
    assert _strict(tmp_path / "s.json") == {"loss": None}
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["val_loss"] is None
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, checkpoint.Checkpoint(config={"name": "x"}, model_state={"w": np.zeros(2, np.float32)},
                                                metrics={"val_loss": math.nan}))
    assert checkpoint.load(path).metrics == {"val_loss": None}


def test_summary_follows_every_epoch_and_a_kill_during_the_test_resumes_to_it(tmp_path, monkeypatch):
    from tests.helpers import invoke

    seen = []

    def when(split, res):
        run = next((tmp_path / "runs").iterdir())
        seen.append(json.loads((run / "summary.json").read_text()))
        if split == "test":
            raise KeyboardInterrupt  # the process is killed while it evaluates the test split

    _patched_evaluate(monkeypatch, when)
    res = invoke("train", _config(tmp_path, epochs=3, test_at_end=True), "--runs-dir", tmp_path / "runs", code=130)
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
    expect_error(["train", _config(tmp_path, epochs=3), "--runs-dir", tmp_path / "runs"], "No space left")
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

    res = runner.invoke(app, ["train", str(_config(tmp_path)), "--runs-dir", str(tmp_path / "runs")])
    assert isinstance(res.exception, IndexError)
    run = next((tmp_path / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "IndexError: a bug" in summary["error"]


def test_a_test_time_shift_as_large_as_the_image_is_a_config_error(tmp_path):
    spec = yaml.safe_load(TINY)
    spec["data"]["test_time_augment"] = {"shifts": [[1, 1], [0, 16]]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    expect_error(["train", path, "--runs-dir", tmp_path / "runs"], "[0, 16]", "16x16 image")
    assert not (tmp_path / "runs").exists()


def test_a_closed_pipe_does_not_stop_training(tmp_path):
    import subprocess
    import sys

    cfg = _config(tmp_path, epochs=4, test_at_end=True)
    done = subprocess.run(f"{sys.executable} -m cnnctl train {cfg} --runs-dir {tmp_path / 'runs'} | head -1",
                          shell=True, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    summary = json.loads(next((tmp_path / "runs").iterdir()).joinpath("summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 4 and "test" in summary
    done = subprocess.run(f"{sys.executable} -m cnnctl runs {tmp_path / 'runs'} --json | head -c 3",
                          shell=True, capture_output=True, text=True, timeout=60)
    assert done.stderr == "", done.stderr


# ---------------------------------------------------------------- memory with no bound (continued)


def test_nested_repeats_are_refused_before_they_expand(tmp_path):
    import time

    spec = yaml.safe_load(TINY)
    spec["model"]["blocks"] = {"a": {"type": "relu"},
                               "b": {"type": "sequential", "layers": [{"type": "a", "repeat": 1000}]},
                               "c": {"type": "sequential", "layers": [{"type": "b", "repeat": 1000}]}}
    spec["model"]["layers"].insert(0, {"type": "c", "repeat": 1000})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    expect_error(["inspect", path], "more than 100,000 layers", "model.blocks.c.layers[0].repeat",
                 "nested repeats multiply")
    assert time.perf_counter() - t0 < 30  # refused, not expanded (10^9 copies would take hours)


@pytest.mark.parametrize("key,value,words", [
    ("model.layers.0.padding", 2147483647, ["model.layers[4] (dense)", "more than any machine can"]),
    ("model.layers.0.filters", 2147483647, []),
])
def test_inspect_of_huge_layers_allocates_nothing(tmp_path, key, value, words):
    import resource

    from tests.helpers import invoke

    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if words:
        expect_error(["inspect", cfg, "--set", f"{key}={value}"], *words)
    else:
        assert "total parameters" in invoke("inspect", cfg, "--set", f"{key}={value}").stdout
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # kB: under 0.5 GB


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


def test_gradcheck_refuses_a_batch_beyond_memory_and_eval_an_empty_split(tiny_run, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    expect_error(["gradcheck", cfg, "--batch", "100000000"], "more than can be spared", "smaller --batch")
    expect_error(["gradcheck", cfg, "--tol", "nan"], "give a positive number")
    expect_error(["eval", tiny_run, "--data-split", "val", "--set", "data.val_split=0", "--set",
                  "train.monitor=train_loss"],
                 "the val split of the shapes data holds no images", "val_split is 0")


def test_a_folder_without_a_test_split_trains_and_says_where_it_is_measured(tmp_path):
    pytest.importorskip("PIL")
    from tests.helpers import invoke
    from tests.test_datasets import make_folder

    make_folder(tmp_path / "imgs")
    import shutil

    shutil.rmtree(tmp_path / "imgs" / "test")
    spec = yaml.safe_load(TINY)
    spec["data"] = {"dataset": "folder", "root": str(tmp_path / "imgs"), "val_split": 0.25, "batch_size": 4}
    spec["model"]["input_shape"] = [3, 16, 16]
    spec["model"]["layers"][-1]["units"] = 2
    spec["train"] = {"epochs": 1, "test_at_end": True}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    res = invoke("train", cfg, "--runs-dir", tmp_path / "runs")
    assert "no test accuracy: the folder data has no test split" in res.output
    run = next((tmp_path / "runs").iterdir())
    ev = invoke("eval", run, "--json")
    assert _json_split(ev.stdout) == "val" and "evaluating the validation split" in ev.stderr
    expect_error(["eval", run, "--data-split", "test"], "the test split of the folder data holds no images")


def _json_split(text):
    return json.loads(text)["split"]


# ---------------------------------------------------------------- fuzzers over the new surfaces

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _png_bytes(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 5), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# a damaged picture: a valid PNG with bytes flipped, cut short, or followed by junk; or arbitrary bytes
PICTURES = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.integers(0, 5), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
              st.integers(0, 400)).map(lambda t: bytes(
                  b if i not in dict(t[1]) else dict(t[1])[i] for i, b in enumerate(_png_bytes(t[0])))[: t[2] or None]),
)


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(PICTURES, min_size=1, max_size=4), st.sampled_from([(1, 8, 8), (3, 5, 7)]))
def test_fuzzed_folder_images_give_data_or_one_clear_error(tmp_path_factory, pictures, shape):
    pytest.importorskip("PIL")
    from cnnctl.data import folder
    from cnnctl.errors import DataError

    root = tmp_path_factory.mktemp("folder")
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "ok.png").write_bytes(_png_bytes(99))
    for i, raw in enumerate(pictures):
        (root / "train" / "a" / f"f{i}.{'png' if i % 2 else 'jpg'}").write_bytes(raw)
    try:
        classes, (x, y), _ = folder.load_folder(root, shape)
    except DataError as e:
        assert "cannot be decoded" in e.message
    else:
        assert classes == ["a"] and x.shape[1:] == shape and x.dtype == np.uint8 and len(y) == len(x)


ARRAYS = st.one_of(
    st.builds(lambda n, h, w, dt: np.zeros((n, h, w), dt), st.integers(0, 4), st.integers(1, 5), st.integers(1, 5),
              st.sampled_from([np.uint8, np.float32, np.float64, np.int16, np.bool_, np.complex64])),
    st.builds(lambda shape: np.ones(shape, np.uint8), st.lists(st.integers(0, 3), max_size=5).map(tuple)),
    st.builds(lambda v: np.array(v), st.lists(st.integers(-5, 2**40), max_size=5)),
    st.just(np.array(["a", "b"])),
    st.just(np.array([np.nan, np.inf])),
)


@settings(max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["x_train", "y_train", "x_test", "y_test", "other"]), ARRAYS, max_size=5),
       st.integers(0, 64))
def test_fuzzed_npz_contents_give_data_or_one_clear_error(tmp_path_factory, arrays, cut):
    from cnnctl.data import npz
    from cnnctl.errors import DataError

    path = tmp_path_factory.mktemp("npz") / "d.npz"
    np.savez(path, **arrays)
    if cut:  # also a file cut short
        path.write_bytes(path.read_bytes()[:-cut])
    try:
        (x, y), (xt, yt) = npz.load_npz(path)
    except DataError:
        return
    assert x.ndim == 4 and y.dtype == np.int64 and len(x) == len(y) and x.shape[1:] == xt.shape[1:]


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
