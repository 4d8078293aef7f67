"""Data-parallel training on MPI: `mpiexec -n 2 cnnctl train` trains the model one process would train, writes the
run directory once, resumes with another number of ranks, and ends every rank when one fails.

These run real MPI jobs (mpi4py and the MPICH wheel from cnnctl[mpi], part of the dev extra) with 1 thread per
rank; they skip when mpiexec or mpi4py is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from cnnctl.core.nn.base import Context
from cnnctl.core.nn.regularization import BatchNorm2D
from cnnctl.run import distributed
from tests.helpers import invoke

MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
CNNCTL = [sys.executable, "-m", "cnnctl"]


def _have_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401  (imports the package only; MPI starts with mpi4py.MPI)
    except ImportError:
        return False
    return True


needs_mpi = pytest.mark.skipif(MPIEXEC is None or not _have_mpi4py(), reason="mpiexec / mpi4py not installed "
                               "(pip install 'cnnctl[mpi]')")

BN_NET = """\
name: {name}
seed: 5
data:
  dataset: shapes
  batch_size: 32
  val_split: 0.2
  shapes: {{train_size: {train_size}, test_size: 100}}
model:
  input_shape: [1, 16, 16]
  layers:
    - {{type: conv2d, filters: 8, kernel_size: 3, padding: 1, bias: false}}
    - {{type: batchnorm, activation: relu}}
    - {{type: maxpool2d, kernel_size: 2}}
    - {{type: conv2d, filters: 8, kernel_size: 3, padding: 1, bias: false}}
    - {{type: batchnorm, activation: relu}}
    - {{type: flatten}}
    - {{type: dropout, rate: 0.2}}
    - {{type: dense, units: 4}}
loss: {{type: cross_entropy, label_smoothing: 0.1}}
optimizer: {{type: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}}
train: {{epochs: {epochs}, test_at_end: true{extra}}}
"""


def _config(tmp_path: Path, name="mpi", train_size=360, epochs=2, extra="") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(BN_NET.format(name=name, train_size=train_size, epochs=epochs, extra=extra))
    return path


def _env() -> dict:
    env = dict(os.environ, CNNCTL_THREADS="1", PYTHONUNBUFFERED="1")
    for name in distributed.SIZE_VARIABLES:  # a test started under MPI must not pass that on
        env.pop(name, None)
    return env


def _mpi(n: int, *args, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([MPIEXEC, "-n", str(n), *CNNCTL, *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _one(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CNNCTL, *map(str, args)], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=240)


def _weights(run: Path) -> dict[str, np.ndarray]:
    tensors = load_file(run / "checkpoints" / "last.safetensors")
    return {k: v for k, v in tensors.items() if not k.startswith("optimizer.") and v.dtype.kind == "f"}


def _assert_same_model(a: dict, b: dict) -> None:
    """Equal to 1e-5 relative, or 5e-5 of the tensor's largest value: only the order of the sums differs between
    the two runs. A convolution's bias ahead of a batchnorm gets gradients that nearly cancel, which Adam scales up:
    after two epochs of the packed test's network its elements differ by 1.3e-5 of that bias's largest value (the
    same before and after the dense layer's products were cut across threads); a wrong reduction differs by
    percents."""
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=5e-5 * float(np.abs(a[name]).max()),
                                   err_msg=name)


def _run_dir(runs: Path) -> Path:
    (found,) = [p for p in runs.iterdir() if p.is_dir()]
    return found


@needs_mpi
def test_two_ranks_train_the_model_one_process_trains(tmp_path):
    cfg = _config(tmp_path)
    one = _one("train", cfg, "-q", "--runs-dir", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = _mpi(2, "train", cfg, "-q", "--runs-dir", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    run_one, run_two = _run_dir(tmp_path / "one"), _run_dir(tmp_path / "two")
    _assert_same_model(_weights(run_one), _weights(run_two))
    # rank 0 alone wrote the run directory: one header, one row per epoch; the others printed nothing
    lines = (run_two / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,") and len(lines) == 3, lines
    assert two.stdout.count("run directory:") == 1 and two.stdout.count("epoch   1 ") == 1
    summary = json.loads((run_two / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world"]["size"] == 2
    assert [r["rank"] for r in summary["world"]["ranks"]] == [0, 1]
    # validation and test are split across the ranks and reduced: the same figures as one process
    summary_one = json.loads((run_one / "summary.json").read_text())
    assert summary["test"]["n"] == summary_one["test"]["n"] == 100
    assert summary["test"]["accuracy"] == pytest.approx(summary_one["test"]["accuracy"], abs=0.011)
    assert summary["final"]["val_loss"] == pytest.approx(summary_one["final"]["val_loss"], rel=1e-4)


@needs_mpi
def test_resume_with_one_rank_continues_a_two_rank_run(tmp_path):
    cfg = _config(tmp_path, epochs=1)
    first = _mpi(2, "train", cfg, "-q", "--runs-dir", tmp_path / "runs", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    run = _run_dir(tmp_path / "runs")
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    with_two = _mpi(2, "train", "--resume", run, "--set", "train.epochs=2", "-q", cwd=tmp_path)
    assert with_two.returncode == 0, with_two.stdout + with_two.stderr
    with_one = _one("train", "--resume", copy, "--set", "train.epochs=2", "-q", cwd=tmp_path)
    assert with_one.returncode == 0, with_one.stderr
    _assert_same_model(_weights(run), _weights(copy))
    assert len((copy / "metrics.csv").read_text().splitlines()) == 3


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.1)


def _long_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    cfg = _config(tmp_path, name="long", train_size=3000, epochs=200, extra=", checkpoint_every_steps: 5")
    proc = subprocess.Popen([MPIEXEC, "-n", "2", *CNNCTL, "train", str(cfg), "-q", "--runs-dir", "runs"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = tmp_path / "runs"
    end = time.monotonic() + 120
    while not (runs.exists() and any(runs.glob("*/checkpoints/last.safetensors"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "no checkpoint after 120 s"
        time.sleep(0.1)
    return proc, _run_dir(runs)


@needs_mpi
def test_a_killed_rank_ends_the_job_quickly_and_leaves_a_resumable_run(tmp_path):
    proc, run = _long_run(tmp_path)
    try:
        ranks = json.loads((run / "summary.json").read_text())["world"]["ranks"]
        victim = ranks[1]
        time.sleep(0.5)  # mid-epoch
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        ended = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ended <= 30, f"the job took {ended:.1f} s to end after rank 1 was killed"
    assert proc.returncode != 0
    # the start line maps every rank to its pid and host; the launcher names a rank's pid and host as the bad
    # termination (MPICH names the first process it sees end: the killed rank, or rank 0 that it ended after it)
    assert f"rank 1 pid {victim['pid']} on {victim['host']}" in output
    assert any(f"PID {r['pid']} RUNNING AT {r['host']}" in output for r in ranks), output
    resumed = _one("train", "--resume", run, "--set", "train.epochs=2", "-q", cwd=tmp_path)
    assert resumed.returncode in (0, 2), resumed.stderr  # 2: already past epoch 2 (then it says so)
    if resumed.returncode == 2:
        assert "nothing to resume" in resumed.stderr
    else:
        assert json.loads((run / "summary.json").read_text())["status"] == "finished"


@needs_mpi
def test_ctrl_c_on_mpiexec_stops_every_rank_at_one_step(tmp_path):
    proc, run = _long_run(tmp_path)
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends mpiexec; it passes it on to the ranks
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert output.count("interrupted: SIGINT: stopped at epoch") == 1, output  # rank 0 alone says so
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    epochs = summary["epochs_done"] + 1
    resumed = _one("train", "--resume", run, "--set", f"train.epochs={epochs}", "-q", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr


@needs_mpi
def test_a_bad_data_file_on_one_rank_stops_every_rank_with_its_name(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    g = np.random.default_rng(0)
    x = g.integers(0, 255, (200, 8, 8), dtype=np.uint8)
    y = np.arange(200) % 4
    np.savez(good / "npz", x_train=x, y_train=y, x_test=x[:40], y_test=y[:40])
    (good / "npz.npz").rename(good / "npz")
    (bad / "npz").write_bytes(b"not an npz archive")
    cfg = tmp_path / "npz.yaml"
    cfg.write_text("name: npz\ndata: {dataset: npz, batch_size: 20, val_split: 0.2}\nmodel:\n  input_shape: [1, 8, 8]\n"
                   "  layers: [{type: flatten}, {type: dense, units: 4}]\ntrain: {epochs: 1}\n")
    env = _env()
    env.pop("CNNCTL_DATA", None)
    t0 = time.monotonic()
    res = subprocess.run([MPIEXEC, "-n", "1", "-env", "CNNCTL_DATA", str(good), *CNNCTL, "train", str(cfg), "-q",
                          ":", "-n", "1", "-env", "CNNCTL_DATA", str(bad), *CNNCTL, "train", str(cfg), "-q"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 60
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"error (rank 1 of 2 on {distributed.World().host})" in res.stderr
    assert str(bad / "npz") in res.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing half-made


@needs_mpi
def test_a_batch_size_the_ranks_cannot_share_is_refused_with_the_fix(tmp_path):
    cfg = _config(tmp_path)
    res = _mpi(3, "train", cfg, "-q", cwd=tmp_path)
    assert res.returncode == 2
    assert "data.batch_size 32 is the global batch" in res.stderr and "--set data.batch_size=33" in res.stderr
    assert res.stderr.count("is the global batch") == 1, res.stderr  # a config error is said once, by rank 0
    assert "Traceback" not in res.stderr


@needs_mpi
def test_bench_under_mpiexec_reports_global_images_and_reduction_time(tmp_path):
    cfg = _config(tmp_path)
    res = _mpi(2, "bench", cfg, "--steps", "3", "--warmup", "1", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.strip().splitlines()  # rank 0 alone prints
    report = json.loads(line)
    assert report["ranks"] == 2 and report["batch_size"] == 32
    assert report["reduce_ms_per_step"] > 0 and report["reductions_per_step"] == 2 + 2 * 2  # loss, grads, 2 bn x 2


def test_outside_mpi_mpi4py_is_never_imported(tiny_config, tmp_path, monkeypatch):
    for name in distributed.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    code = ("import sys; from typer.testing import CliRunner; from cnnctl.cli import app; "
            f"r = CliRunner().invoke(app, ['train', {str(tiny_config)!r}, '-q']); "
            "assert r.exit_code == 0, r.output; assert 'mpi4py' not in sys.modules; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "ok", res.stderr
    assert distributed.World().sum(np.ones(3)).tolist() == [1, 1, 1]


def test_launched_size_reads_the_launchers_variables(monkeypatch):
    for name in distributed.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.launched_size() == 4
    monkeypatch.setenv("PMI_SIZE", "²")  # not a number: ignored, not a crash
    assert distributed.launched_size() == 4


def test_mpi_without_mpi4py_is_a_clear_error(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "_world", None)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py fails as if it were not installed
    monkeypatch.chdir(tmp_path)
    try:
        res = invoke("train", tiny_config, "-q", code=2)
    finally:
        distributed._world = None
    assert "mpi4py is not installed" in res.output and "cnnctl[mpi]" in res.output


class _Pair(distributed.World):
    """One of two ranks simulated by two threads of this process: sum() adds both ranks' arrays."""

    def __init__(self, rank: int, slots: list, barrier: threading.Barrier):
        super().__init__()
        self.rank, self.size, self.slots, self.barrier = rank, 2, slots, barrier

    def sum(self, a):
        self.slots[self.rank] = a.copy()
        self.barrier.wait()
        total = self.slots[0] + self.slots[1]
        self.barrier.wait()
        a[...] = total
        return a


def test_summed_batchnorm_equals_batchnorm_of_the_whole_batch():
    """BatchNorm told a Context whose sum adds two halves of a batch gives the whole batch's outputs, input gradients
    and running statistics, and the halves' parameter gradients add up to the whole's."""
    g = np.random.default_rng(0)
    x = g.standard_normal((8, 3, 5, 5)) * 2 + 3
    dy = g.standard_normal(x.shape)
    weight = np.array([0.5, 1.5, -1.0])
    whole = BatchNorm2D(3, dtype=np.float64)
    whole.params["weight"][:] = weight
    y, dx = whole.forward(x), whole.backward(dy)
    slots, barrier, results = [None, None], threading.Barrier(2, timeout=30), {}

    def rank(r):
        bn = BatchNorm2D(3, dtype=np.float64)
        bn.params["weight"][:] = weight
        rows = slice(4 * r, 4 * r + 4)
        results[r] = (bn.forward(x[rows], context=Context(sum=_Pair(r, slots, barrier).sum)), bn.backward(dy[rows]), bn)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(np.concatenate([results[0][0], results[1][0]]), y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([results[0][1], results[1][1]]), dx, rtol=1e-9, atol=1e-12)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(results[0][2].buffers[key], whole.buffers[key], rtol=1e-12)
    for key in ("weight", "bias"):
        np.testing.assert_allclose(results[0][2].grads[key] + results[1][2].grads[key], whole.grads[key], rtol=1e-10)


def test_dropout_with_a_batch_part_uses_its_rows_of_the_whole_batch_mask():
    from cnnctl.core.nn.regularization import Dropout

    x = np.ones((6, 4), np.float32)
    whole = Dropout(0.5, np.random.default_rng(1)).forward(x)
    part = Dropout(0.5, np.random.default_rng(1))
    np.testing.assert_array_equal(part.forward(x[2:5], context=Context(part=(2, 5, 6))), whole[2:5])


def test_every_layer_that_asks_is_told_the_runners_context_inside_any_container():
    """Under MPI batchnorm's statistics are summed over the ranks and dropout keeps its rows of the whole batch's
    mask: the runner's Context reaches them wherever they sit (a gate's branch, a concatenation's branch, a residual
    body), and so does it when a container runs its children itself (Layer.__call__ passes it on)."""
    from cnnctl.config.build import build_model
    from cnnctl.config.spec import ModelSpec
    from cnnctl.core.nn import Sequential
    from cnnctl.core.plan import Runner

    spec = ModelSpec.model_validate({"input_shape": [2, 6, 6], "layers": [
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1},
        {"type": "gate", "branch": [{"type": "global_avgpool2d"}, {"type": "dense", "units": 3},
                                    {"type": "batchnorm"}, {"type": "dropout", "rate": 0.5},
                                    {"type": "dense", "units": 4, "activation": "sigmoid"}]},
        {"type": "concat", "branches": [[], [{"type": "conv2d", "filters": 2, "kernel_size": 1},
                                             {"type": "batchnorm", "activation": "relu"}]]},
        {"type": "residual", "body": [{"type": "conv2d", "filters": 6, "kernel_size": 3, "padding": 1},
                                      {"type": "batchnorm"}, {"type": "dropout", "rate": 0.2}]},
        {"type": "flatten"}, {"type": "dense", "units": 3}]})
    model, _ = build_model(spec)
    context = Context(part=(0, 4, 4), sum=lambda a: a)
    told = {}
    for name, layer in model.named_layers():
        if type(layer).__name__.startswith(("BatchNorm", "Dropout")):
            def spy(x, training=True, context=None, _name=name, _forward=layer.forward):
                told[_name] = context
                return _forward(x, training, context=context)
            layer.forward = spy
    x = np.ones((4, 2, 6, 6), np.float32)
    Runner(model, context=context).forward(x, training=True)
    assert len(told) == 5 and all(c is context for c in told.values()), told
    told.clear()
    Sequential(model.layers)(x, True, context)
    assert len(told) == 5 and all(c is context for c in told.values()), told


def test_batch_checks_name_the_key_and_the_fix():
    from cnnctl.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of 3"):
        distributed.check_batches(32, 1000, 3)
    with pytest.raises(ConfigError, match="last batch of an epoch holds 1"):
        distributed.check_batches(32, 33, 2)
    distributed.check_batches(32, 34, 2)


SMOOTH_NET = """\
name: smooth
seed: 5
data:
  dataset: shapes
  batch_size: 32
  val_split: 0.2
  shapes: {{train_size: 320, test_size: 64}}
model:
  input_shape: [1, 16, 16]
  layers:
    - {{type: conv2d, filters: 6, kernel_size: 3, padding: 1, activation: tanh}}
    - {{type: avgpool2d, kernel_size: 2}}
    - {{type: conv2d, filters: 8, kernel_size: 3, padding: 1, activation: tanh}}
    - {{type: flatten}}
    - {{type: dense, units: 4}}
optimizer: {optimizer}
train: {{epochs: 4}}
"""
OPTIMIZERS = {"sgd-momentum": "{type: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}",
              "adam": "{type: adam, lr: 0.01}",
              "lookahead": "{type: adam, lr: 0.01, lookahead: {k: 3, alpha: 0.5}}"}


def _launch(ranks: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    res = _mpi(ranks, *args, cwd=cwd) if ranks > 1 else _one(*args, cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@needs_mpi
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_resumed_run_equals_the_uninterrupted_one_whatever_the_ranks(tmp_path, optimizer):
    """A network without kinks (tanh, average pooling), so that the only differences are the order of sums: 2
    epochs on 1 or 2 ranks, then resumed to 4 on 2 -> 2, 2 -> 1 and 1 -> 2 ranks, equals 4 epochs straight on 2
    ranks to 1e-5 (the optimizer state goes by parameter name, never by the order a checkpoint's tensors come in)."""
    cfg = tmp_path / "smooth.yaml"
    cfg.write_text(SMOOTH_NET.format(optimizer=OPTIMIZERS[optimizer]))
    _launch(2, "train", cfg, "-q", "--runs-dir", tmp_path / "straight", cwd=tmp_path)
    straight = _weights(_run_dir(tmp_path / "straight"))
    for first in (1, 2):
        _launch(first, "train", cfg, "-q", "--set", "train.epochs=2", "--runs-dir", tmp_path / f"from{first}",
                cwd=tmp_path)
    for first, then in ((2, 2), (2, 1), (1, 2)):
        run = tmp_path / f"{first}to{then}"
        shutil.copytree(_run_dir(tmp_path / f"from{first}"), run)
        _launch(then, "train", "--resume", run, "--set", "train.epochs=4", "-q", cwd=tmp_path)
        _assert_same_model(straight, _weights(run))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["train_loss"]) for r in rows)
