"""Hostile input, round three (issue 39): output paths that are not plain files, the autotune cache, config paths
and sizes, memory limits of the process, numbers float32 cannot hold, numerical warnings, damaged records."""

import json
import os
import socket
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
import yaml

from cnnctl.core import memory, plan
from cnnctl.errors import CnnctlWarning
from tests.conftest import TINY
from tests.helpers import invoke
from tests.test_errors import expect_error


def _config(tmp_path, change=None, name="c.yaml"):
    spec = yaml.safe_load(TINY)
    if change:
        change(spec)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


# ---------------------------------------------------------------- output paths

def _device(tmp_path, name, minor):
    """A character device of our own (1, minor: 3 is null, 7 is full), never the machine's /dev entries."""
    path = tmp_path / name
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


@pytest.mark.parametrize("verb", [
    lambda run, cfg, out: ["schema", "--out", out],
    lambda run, cfg, out: ["plot", run, "--out", out],
    lambda run, cfg, out: ["data", cfg, "--out", out],
    lambda run, cfg, out: ["export", run, "--out", out],
])
def test_a_device_at_the_output_path_is_written_in_place_never_replaced(tiny_run, tmp_path, verb):
    pytest.importorskip("matplotlib")
    pytest.importorskip("onnx")
    null = _device(tmp_path, "null", 3)
    invoke(*verb(tiny_run, _config(tmp_path), null))
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.stat(null).st_rdev == os.makedev(1, 3)


def test_a_full_device_is_one_message_and_stays_a_device(tmp_path):
    full = _device(tmp_path, "full", 7)
    expect_error(["schema", "--out", full], f"cannot write {full}", "No space left on device")
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_a_fifo_at_the_output_path_gets_the_bytes_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    invoke("schema", "--out", fifo)
    reader.join(30)
    assert json.loads(got[0])["title"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_symlink_is_followed_and_stays_a_link(tmp_path):
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target.name)
    invoke("schema", "--out", link)
    assert link.is_symlink() and json.loads(target.read_text())["title"]
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to("made.json")  # a link to nothing yet: the file it names is made, as `>` does
    invoke("schema", "--out", dangling)
    assert dangling.is_symlink() and (tmp_path / "made.json").is_file()


def test_a_socket_or_a_link_loop_at_the_output_path_is_refused(tmp_path):
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        expect_error(["schema", "--out", path], "it is a socket")
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    expect_error(["schema", "--out", tmp_path / "a"], "Too many levels of symbolic links")


# ---------------------------------------------------------------- the autotune cache

def _make_cache(path, kind):
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "deeply nested":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "a folder":
        path.mkdir()
    elif kind == "too large":
        with path.open("wb") as f:
            f.truncate(plan.MAX_CACHE_BYTES + 1)
    elif kind == "not an object":
        path.write_text("[1, 2]")


@pytest.mark.parametrize("kind", ["deeply nested", "link to /dev/zero", "fifo", "a folder", "too large",
                                  "not an object"])
def test_a_bad_autotune_cache_costs_a_warning_and_training_goes_on(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = plan.cache_path()
    _make_cache(path, kind)
    with pytest.warns(CnnctlWarning, match="autotune cache"):
        invoke("train", _config(tmp_path), "--runs-dir", tmp_path / "runs", "--autotune")
    assert stat.S_ISCHR(os.stat("/dev/zero").st_mode)  # a link in the cache is replaced, never written through
    if kind != "a folder":
        assert path.is_file() and not path.is_symlink() and isinstance(json.loads(path.read_text()), dict)


def test_an_unwritable_cache_costs_one_warning_line_and_training_goes_on(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "cnnctl", "train", _config(tmp_path), "--runs-dir", tmp_path / "r",
                          "--autotune", "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert [line.startswith("warning: autotune cache") for line in lines] == [True, True], lines  # read, write
    assert "Traceback" not in res.stderr and "best val_acc" in res.stdout


# ---------------------------------------------------------------- config paths and sizes

def _extends(tmp_path, target):
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"extends": target, "name": "e"}))
    return path


@pytest.mark.parametrize("make, words", [
    (lambda t: _loop(t) and "loop1", ["extends (line 1)", "Too many levels of symbolic links"]),
    (lambda t: "a\0b", ["extends (line 1)", "NUL character"]),
    (lambda t: "x" * 6000, ["extends (line 1)", "File name too long"]),
    (lambda t: (t / "d").mkdir() or "d", ["extends (line 1)", "it is a folder, not a regular file"]),
    (lambda t: os.mkfifo(t / "f") or "f", ["extends (line 1)", "it is a FIFO, not a regular file"]),
    (lambda t: "/dev/zero", ["extends (line 1)", "it is a device, not a regular file"]),
    (lambda t: _sparse(t / "big.yaml", 3 << 30) and "big.yaml", ["3,221,225,472 bytes", "1,048,576 allowed"]),
    (lambda t: "missing.yaml", ["extends (line 1)", "config file not found"]),
])
def test_every_bad_extends_path_is_one_message(tmp_path, make, words):
    expect_error(["inspect", _extends(tmp_path, make(tmp_path))], *words, "fix:")


def _loop(tmp_path):
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    return True


def _sparse(path, size):
    with path.open("wb") as f:
        f.truncate(size)
    return True


@pytest.mark.parametrize("make, words", [
    (lambda t: _loop(t) and t / "loop1", ["Too many levels of symbolic links"]),
    (lambda t: "/dev/zero", ["it is a device, not a regular file"]),
    (lambda t: os.mkfifo(t / "f") or t / "f", ["it is a FIFO, not a regular file"]),
    (lambda t: _sparse(t / "big.yaml", 3 << 30) and t / "big.yaml", ["more than the 1,048,576 allowed", "1 MB"]),
])
@pytest.mark.parametrize("verb", ["inspect", "train"])
def test_a_config_that_is_not_a_small_regular_file_is_one_message(tmp_path, make, words, verb):
    expect_error([verb, make(tmp_path)], "cannot read config", *words)


# ---------------------------------------------------------------- memory

def test_patch_whitening_with_a_kernel_larger_than_the_image_is_a_shape_error(tmp_path):
    cfg = _config(tmp_path, lambda s: s["model"]["layers"][0].update(kernel_size=17, init="patch_whitening"))
    expect_error(["train", cfg], "patch_whitening", "17x17", "16x16", "larger than the image")


def test_patch_whitening_and_evaluation_batches_pass_the_memory_check(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "budget", lambda: (64 << 20, "a test's limit"))  # 64 MiB: tiny trains, no more
    cfg = _config(tmp_path, lambda s: s["model"]["layers"][0].update(kernel_size=7, init="patch_whitening"))
    cfg_big = _config(tmp_path, lambda s: s["data"]["shapes"].update(train_size=3000), "big.yaml")
    expect_error(["train", cfg_big, "--set", "model.layers.0.kernel_size=7", "--set",
                  "model.layers.0.init=patch_whitening"], "patch_whitening of layers.0", "of a test's limit")
    invoke("train", cfg, "--runs-dir", tmp_path / "runs")  # 240 images: fits
    evals = _config(tmp_path, lambda s: s["data"].update(eval_batch_size=100_000, shapes={"train_size": 300,
                                                                                           "test_size": 5000}))
    expect_error(["train", evals], "evaluating tiny at batch size 5000", "lower data.eval_batch_size")


def test_the_budget_honours_the_address_space_limit():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY)); "
            "from cnnctl.core import memory; print(*memory.budget(), sep='|')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    left, bound = res.stdout.strip().split("|")
    assert 0 < int(left) < 3 << 30 and "ulimit -v" in bound, res.stdout + res.stderr


def test_an_allocation_that_fails_anyway_is_one_message(tmp_path, monkeypatch):
    from cnnctl.run import trainer as train

    def fail(*args, **kwargs):
        raise MemoryError("Unable to allocate 6.01 GiB for an array")

    monkeypatch.setattr(train, "evaluate", fail)
    expect_error(["train", _config(tmp_path), "--runs-dir", tmp_path / "runs"], "out of memory: Unable to allocate",
                 "lower data.batch_size")


# ---------------------------------------------------------------- numbers

@pytest.mark.parametrize("override, words", [
    ("model.layers.1={type: celu, alpha: 1e39}", ["model.layers[1].alpha", "not representable in float32"]),
    ("model.layers.1={type: celu, alpha: 1e-300}", ["model.layers[1].alpha", "1.2e-38 and 3.4e38"]),
    ("optimizer={type: adadelta, eps: 5e-324}", ["optimizer.eps", "not representable in float32"]),
    ("optimizer.lr=1e39", ["optimizer.lr", "not representable in float32"]),
    ("model.layers.1={type: batchnorm, ghost_batch: 1}", ["model.layers[1].ghost_batch", "greater than or equal to 2"]),
])
def test_numbers_float32_cannot_hold_are_refused_at_validation(tmp_path, override, words):
    expect_error(["inspect", _config(tmp_path), "--set", override], *words)


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
    text = expect_error(["train", _config(tmp_path), "--runs-dir", tmp_path / "runs"], "the loss became nan",
                        "before it numpy warned of: divide by zero encountered in log", code=1)
    assert "RuntimeWarning" not in text


# ---------------------------------------------------------------- records

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
