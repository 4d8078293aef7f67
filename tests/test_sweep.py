"""Sweeps: the local executor end to end, Ray Tune on a local instance, failures, resume, ASHA, validation."""

import csv
import json
import re

import pytest
import yaml

from cnnctl.config.spec import Spec
from cnnctl.errors import CnnctlError
from cnnctl.tools import sweep as sweep_lib
from tests.conftest import ROOT
from tests.helpers import invoke
from tests.test_errors import expect_error

BASE = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
BASE["data"]["shapes"] = {"train_size": 500, "test_size": 50}


def write_sweep(tmp_path, **changes):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    sweep = {"name": "grid", "base": "base.yaml", "metric": "val_acc", "mode": "max",
             "space": {"optimizer.lr": {"choice": [0.001, 0.003]}, "model.layers.0.filters": {"choice": [4, 8]},
                       "train.epochs": 2},
             "search": {"type": "grid"}, "executor": {"type": "local", "max_concurrent": 2}}
    sweep.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def results(sweep_dir):
    return list(csv.DictReader((sweep_dir / "results.csv").open()))


def only_dir(runs_dir):
    (d,) = list(runs_dir.iterdir())
    return d


def check_finished_grid(sweep_dir):
    rows = results(sweep_dir)
    assert [r["trial"] for r in rows] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    assert {r["status"] for r in rows} == {"finished"} and all(r["epochs"] == "2" for r in rows)
    best = max(rows, key=lambda r: float(r["best"]))
    spec = Spec.model_validate(yaml.safe_load((sweep_dir / "best.yaml").read_text()))
    assert spec.name == f"grid.{best['trial']}"
    for item in best["overrides"].split():  # the winning spec carries the winning overrides
        key, _, value = item.partition("=")
        node = spec.model_dump(mode="json")
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert node == yaml.safe_load(value)
    # the best trial's checkpoint evaluates to the metric the sweep reports
    ckpt = sweep_dir / "trials" / best["trial"] / "checkpoints" / "best.safetensors"
    report = json.loads(invoke("eval", ckpt, "--data-split", "val", "--json").output)
    assert report["accuracy"] == pytest.approx(float(best["best"]), abs=1e-12)
    return rows


def test_local_grid_end_to_end(tmp_path):
    res = invoke("sweep", write_sweep(tmp_path), "--runs-dir", tmp_path / "runs", "-q")
    sweep_dir = only_dir(tmp_path / "runs")
    rows = check_finished_grid(sweep_dir)
    assert "best: trial-" in res.output
    # each trial is an ordinary run: runs lists them, runs SWEEP_DIR ranks them, plot draws the sweep
    listed = json.loads(invoke("runs", tmp_path / "runs", "--json").output)
    assert len(listed) == 4
    ranked = invoke("runs", sweep_dir).output
    assert "ranked by val_acc" in ranked and ranked.index(max(rows, key=lambda r: float(r["best"]))["trial"]) \
        < ranked.index(min(rows, key=lambda r: float(r["best"]))["trial"])
    pytest.importorskip("matplotlib")
    invoke("plot", sweep_dir, "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_ray_grid_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    path = write_sweep(tmp_path, executor={"type": "ray", "num_cpus": 2})
    invoke("sweep", path, "--runs-dir", tmp_path / "runs", "-q")
    ray_rows = check_finished_grid(only_dir(tmp_path / "runs"))
    # the same trials and seeds give the same numbers as the local executor
    invoke("sweep", path, "--runs-dir", tmp_path / "local", "--executor", "local", "-q")
    local_rows = results(only_dir(tmp_path / "local"))
    assert [r["best"] for r in ray_rows] == [r["best"] for r in local_rows]


def test_a_failing_trial_does_not_stop_the_sweep(tmp_path):
    path = write_sweep(tmp_path, space={"optimizer.lr": {"choice": [0.003, 1e30]}, "train.epochs": 2})
    res = invoke("sweep", path, "--runs-dir", tmp_path / "runs", "-q", code=1)  # not every trial completed
    rows = results(only_dir(tmp_path / "runs"))
    assert [r["status"] for r in rows] == ["finished", "failed"]
    assert "loss became" in rows[1]["error"] and "best: trial-000" in res.output
    assert "1 of 2 trials failed: trial-001" in res.output


def test_resume_skips_finished_trials(tmp_path):
    path = write_sweep(tmp_path)
    invoke("sweep", path, "--runs-dir", tmp_path / "runs", "-q")
    sweep_dir = only_dir(tmp_path / "runs")
    rows = results(sweep_dir)
    # pretend the sweep was stopped after two trials: their rows stay, the others must run again
    with (sweep_dir / "results.csv").open("w") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[:2] + [{**r, "status": "pending", "best": ""} for r in rows[2:]])
    kept = {t: (sweep_dir / "trials" / t / "summary.json").stat().st_mtime_ns for t in ("trial-000", "trial-001")}
    for t in ("trial-002", "trial-003"):
        for f in (sweep_dir / "trials" / t).rglob("*"):
            if f.is_file():
                f.unlink()
    res = invoke("sweep", "--resume", sweep_dir, "-q")
    assert "2 finished before" in res.output
    assert {t: (sweep_dir / "trials" / t / "summary.json").stat().st_mtime_ns for t in kept} == kept
    assert [r["best"] for r in results(sweep_dir)] == [r["best"] for r in rows]


def test_asha_stops_a_poor_trial(tmp_path):
    path = write_sweep(tmp_path, space={"optimizer.lr": {"choice": [0.003, 0.00001]}, "train.epochs": 4},
                       scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                       executor={"type": "local", "max_concurrent": 1})
    invoke("sweep", path, "--runs-dir", tmp_path / "runs", "-q")
    sweep_dir = only_dir(tmp_path / "runs")
    rows = results(sweep_dir)
    assert rows[0]["status"] == "finished" and rows[0]["epochs"] == "4"
    assert rows[1]["status"] == "stopped" and int(rows[1]["epochs"]) < 4
    summary = json.loads((sweep_dir / "trials" / "trial-001" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["status"] == "finished"


def test_asha_rule():
    record, lock = {}, __import__("threading").Lock()
    asha = sweep_lib.Asha(sweep_lib.AshaSpec(type="asha", grace_period=1, reduction_factor=2), 8, "max", record, lock)
    assert asha.rungs == [1, 2, 4]
    assert asha.keep_going(1, 0.5)       # the first at a rung always goes on
    assert not asha.keep_going(1, 0.4)   # worse than the best half of [0.5, 0.4]
    assert asha.keep_going(1, 0.9)       # the new best
    assert asha.keep_going(3, 0.0)       # not a rung


def test_invalid_combination_is_reported_before_anything_runs(tmp_path):
    path = write_sweep(tmp_path, space={"model.layers.0.padding": 0,
                                        "model.layers.0.kernel_size": {"choice": [3, 31]}})
    res = invoke("sweep", path, "--runs-dir", tmp_path / "runs", code=2)
    assert "trial-001" in res.output and "model.layers.0.kernel_size=31" in res.output
    assert "larger than" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


def test_bad_sweep_files(tmp_path):
    res = invoke("sweep", write_sweep(tmp_path, space={"optimizer.lr": {"normal": [0, 1]}}), code=2)
    assert "choice" in res.output
    res = invoke("sweep", write_sweep(tmp_path, space={"optimizer.lr": {"uniform": [0.1, 0.2]}}), code=2)
    assert "grid search needs" in res.output
    res = invoke("sweep", write_sweep(tmp_path, serach={"type": "grid"}), code=2)
    assert "did you mean 'search'" in res.output
    res = invoke("sweep", write_sweep(tmp_path, base="nope.yaml"), code=2)
    assert "not found" in res.output


def test_random_search_is_reproducible():
    spec = sweep_lib.SweepSpec.model_validate({
        "name": "r", "base": "x.yaml", "space": {"a": {"loguniform": [0.001, 0.1]}, "b": {"choice": [1, 2, 3]},
                                                 "c": {"randint": [0, 5]}, "d": 7},
        "search": {"type": "random", "samples": 5, "seed": 3}})
    a, b = sweep_lib.draw_trials(spec), sweep_lib.draw_trials(spec)
    assert [t.overrides for t in a] == [t.overrides for t in b] and len(a) == 5
    assert all(0.001 <= t.overrides["a"] <= 0.1 and t.overrides["d"] == 7 for t in a)
    assert len({t.overrides["a"] for t in a}) == 5
    with pytest.raises(CnnctlError):
        sweep_lib.draw_trials(spec.model_copy(update={"search": sweep_lib.GridSearch(type="grid")}))


def test_ctrl_c_stops_cleanly_and_resume_matches_an_uninterrupted_sweep(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    path = write_sweep(tmp_path, space={"optimizer.lr": {"choice": [0.001, 0.003]}, "train.epochs": 6})
    invoke("sweep", path, "--runs-dir", tmp_path / "straight", "-q")
    # Ctrl-C in a terminal reaches the whole process group: the sweep and its workers
    proc = subprocess.Popen([sys.executable, "-m", "cnnctl", "sweep", str(path), "--runs-dir", str(tmp_path / "b"),
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / "b").glob("*/trials/*/metrics.csv")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    sweep_dir = only_dir(tmp_path / "b")
    assert f"cnnctl sweep --resume {sweep_dir}" in err and "Traceback" not in err
    invoke("sweep", "--resume", sweep_dir, "-q")
    straight = results(only_dir(tmp_path / "straight"))
    assert [(r["trial"], r["best"], r["epochs"]) for r in results(sweep_dir)] == \
        [(r["trial"], r["best"], r["epochs"]) for r in straight]


def test_sweep_over_block_parameters_of_a_graph_model(tmp_path):
    """A sweep reaches into blocks: each trial is an ordinary graph-model run with its own block arguments."""
    from tests.test_graph import GRAPH

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(GRAPH))
    sweep = {"name": "blocks", "base": "base.yaml", "metric": "val_acc", "mode": "max",
             "space": {"model.layers.2.filters": {"choice": [5, 7]}, "model.blocks.basic.activation": "tanh",
                       "train.epochs": 1},
             "search": {"type": "grid"}, "executor": {"type": "local", "max_concurrent": 2}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    invoke("sweep", tmp_path / "sweep.yaml", "--runs-dir", tmp_path / "runs", "-q")
    rows = results(only_dir(tmp_path / "runs"))
    assert all(r["status"] in ("finished", "diverged") for r in rows)  # one epoch may leave a trial at chance
    shapes = []
    for r in rows:
        report = json.loads(invoke("inspect", only_dir(tmp_path / "runs") / "trials" / r["trial"] / "checkpoints" /
                                   "best.safetensors", "--json").output)
        shapes.append(report["layers"][2]["output_shape"])
    assert shapes == [[5, 4, 4], [7, 4, 4]]
    best = yaml.safe_load((only_dir(tmp_path / "runs") / "best.yaml").read_text())
    assert best["model"]["blocks"]["basic"]["activation"] == "tanh"


def test_a_sweep_base_may_extend_another_config(tmp_path):
    path = write_sweep(tmp_path)
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\ntrain: {epochs: 5}\n")
    _, base, _ = sweep_lib.load_sweep(path, tmp_path / "child.yaml")
    assert "extends" not in base and base["name"] == "child" and base["train"]["epochs"] == 5
    assert base["model"] == BASE["model"]


def _grid_sweep(tmp_path, space_extra=None):
    base = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    base["data"]["shapes"] = {"train_size": 400, "test_size": 50}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": "grid", "base": "base.yaml", "metric": "val_acc", "mode": "max",
             "space": {"optimizer.lr": {"choice": [0.001, 0.003]}, "train.epochs": 1, **(space_extra or {})},
             "search": {"type": "grid"}, "executor": {"type": "local", "max_concurrent": 2}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "sweep.yaml"


def _lr_sweep(tmp_path, epochs=40, **space):
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


def test_sweep_set_constants_once_percent_and_the_sweeps_name_in_runs(tmp_path):
    res = invoke("sweep", _grid_sweep(tmp_path), "--set", "model.layers.0.filters=4", "--runs-dir", tmp_path / "runs",
                 "-q")
    out = res.output
    assert out.count("every trial: train.epochs=1 model.layers.0.filters=4") == 1
    assert re.search(r"trial-000: finished, best val_acc \d+\.\d\d%", out)  # percent, as `runs` shows it
    table = out[out.index("┏"):]
    assert "train.epochs" not in table and "filters" not in table and "optimizer.lr=0.001" in table
    assert "best: trial-" in out and "% (epoch 1) with optimizer.lr=" in out
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    base = yaml.safe_load((sweep_dir / "base.yaml").read_text())
    assert base["model"]["layers"][0]["filters"] == 4  # every trial had it
    runs = json.loads(invoke("runs", tmp_path / "runs", "--json").output)
    assert sorted(r["run"] for r in runs) == [f"{sweep_dir.name}/trial-000", f"{sweep_dir.name}/trial-001"]
    report = invoke("sweep", "--report", sweep_dir).output
    assert "train.epochs" not in report and "%" in report
    expect_error(["sweep", "--resume", sweep_dir, "--set", "train.epochs=2"], "--set applies to a new sweep")


def test_a_finished_trial_at_chance_accuracy_is_flagged_diverged(tmp_path):
    from cnnctl.run import runs as runs_lib
    from cnnctl.tools.sweep import trial_result

    run = tmp_path / "trial-000"
    run.mkdir()
    runs_lib.write_json(run / "summary.json", {"status": "finished", "stopped_early": False,
                                                "dataset": {"classes": [str(i) for i in range(10)]}})
    rows = [{"epoch": e, "step": e, "train_loss": 2.31, "train_acc": 0.1, "val_loss": 2.31, "val_acc": acc,
             "lr": 0.1, "seconds": 1.0} for e, acc in ((1, 0.098), (2, 0.1025))]
    runs_lib.rewrite_metrics(run, rows)
    res = trial_result(run, "val_acc", "max")
    assert res["status"] == "diverged" and "chance for 10 classes" in res["error"]
    rows[1]["val_acc"] = 0.45
    runs_lib.rewrite_metrics(run, rows)
    assert trial_result(run, "val_acc", "max")["status"] == "finished"


def test_sigterm_stops_the_sweep_and_every_trial_and_a_second_sweep_is_refused(tmp_path):
    import signal
    import time

    path = _lr_sweep(tmp_path)
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

    proc = _start_sweep(_lr_sweep(tmp_path), tmp_path / "runs")
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

    path = _lr_sweep(tmp_path, epochs=25)
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
    path = _lr_sweep(tmp_path, **{"seed": {"randint": [0, 10**23]}})
    text = yaml.safe_load(path.read_text())
    text["search"] = {"type": "random", "samples": 2}
    path.write_text(yaml.safe_dump(text))
    expect_error(["sweep", path, "--runs-dir", tmp_path / "runs"], "64-bit integers")
