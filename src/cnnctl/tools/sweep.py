"""Sweeps: a search over config overrides, run as ordinary cnnctl runs, locally or on a Ray cluster.

The trials are drawn here, up front and from the sweep's seed (so both executors run the same trials), and
every trial's spec is validated and shape-checked before anything starts. Each trial trains in
SWEEP_DIR/trials/trial-NNN/ with the usual run layout. ASHA (asynchronous successive halving) stops poor
trials at rungs of grace_period * reduction_factor^k epochs: a trial continues past a rung only if its metric
is in the best 1/reduction_factor of the trials that reached that rung before it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import math
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Annotated, Any, Literal, Union

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator

from cnnctl.config.build import describe
from cnnctl.config.messages import format_validation_error
from cnnctl.config.reading import apply_overrides, read_config, read_yaml, spec_to_dict, validate
from cnnctl.config.spec import Monitor, Strict
from cnnctl.core import parallel
from cnnctl.core.fileio import atomic_write_bytes
from cnnctl.core.schedules import resolve_mode
from cnnctl.errors import CnnctlError, ConfigError
from cnnctl.extras import require
from cnnctl.run import runs
from cnnctl.run.start import check_known_data

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
MAX_TRIALS = 10_000  # every trial's spec is drawn and checked before the first one runs


class RandomSearch(Strict):
    type: Literal["random"]
    samples: int = Field(10, gt=0, le=10_000, description="Number of trials to draw (at most 10,000).")
    seed: int = Field(0, ge=0)


class GridSearch(Strict):
    type: Literal["grid"]


class AshaSpec(Strict):
    type: Literal["asha"]
    grace_period: int = Field(1, gt=0, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: int = Field(3, gt=1, description="Keep the best 1/reduction_factor at each rung.")


class LocalExecutor(Strict):
    type: Literal["local"]
    max_concurrent: int = Field(2, gt=0, description="Trials training at the same time.")
    blas_threads: int = Field(1, gt=0, description="Threads per trial (cnnctl's own, BLAS single-threaded; "
                              "cnnctl sweep --threads N overrides it).")


class RayExecutor(Strict):
    type: Literal["ray"]
    address: str | None = Field(None, description="Ray cluster address ('auto' joins the running one); "
                                "without it a local Ray instance is started.")
    cpus_per_trial: float = Field(1.0, gt=0)
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local Ray instance (default: all).")


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(description="The cnnctl config to vary; a path relative to the sweep file.")
    metric: Monitor = "val_acc"
    mode: Literal["auto", "min", "max"] = "auto"
    space: dict[str, Any] = Field(description="Dotted config keys: a value, or {choice: [...]}, "
                                  "{uniform: [a, b]}, {loguniform: [a, b]}, {randint: [a, b]} (b excluded).")
    search: Annotated[Union[RandomSearch, GridSearch], Field(discriminator="type")] = Field(  # noqa: UP007
        default_factory=lambda: GridSearch(type="grid"))
    scheduler: AshaSpec | None = None
    executor: Annotated[Union[LocalExecutor, RayExecutor], Field(discriminator="type")] = Field(  # noqa: UP007
        default_factory=lambda: LocalExecutor(type="local"))

    @field_validator("space")
    @classmethod
    def _distributions(cls, space):
        for key, value in space.items():
            if isinstance(value, dict):
                if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
                    raise ValueError(f"{key}: give one of {', '.join(DISTRIBUTIONS)} (e.g. {{choice: [1, 2]}}), "
                                     f"got {value}")
                kind, args = next(iter(value.items()))
                if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
                    raise ValueError(f"{key}: {kind} takes a list" + ("" if kind == "choice" else " [low, high]"))
                if kind != "choice":
                    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
                               for a in args):
                        raise ValueError(f"{key}: {kind} bounds must be finite numbers, got {args}")
                    if kind == "randint" and not all(isinstance(a, int) for a in args):
                        raise ValueError(f"{key}: randint bounds must be integers, got {args}")
                    if kind == "randint" and not all(-(2**63) <= a <= 2**63 - 1 for a in args):
                        raise ValueError(f"{key}: randint bounds must lie within +-9.2e18 (64-bit integers), "
                                         f"got {args}")
                    if args[0] >= args[1]:
                        raise ValueError(f"{key}: {kind} needs low < high, got {args}")
                if kind == "loguniform" and min(args) <= 0:
                    raise ValueError(f"{key}: loguniform bounds must be positive")
        return space


DONE = ("finished", "stopped", "diverged")  # trials with a result: ranked, and kept by --resume


def _as_set(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in overrides.items()]


@dataclass
class Trial:
    id: str
    overrides: dict[str, Any]
    varied: tuple[str, ...] = ()  # the keys the search draws (the others are the space's constants)

    def as_set(self) -> list[str]:
        return _as_set(self.overrides)

    def drawn(self) -> list[str]:
        """The overrides that differ between trials, as --set takes them (what the tables show)."""
        return _as_set({k: v for k, v in self.overrides.items() if k in self.varied})


def constants(sweep) -> list[str]:
    """The space's constant keys, as --set takes them: the same for every trial, shown once."""
    return _as_set({k: v for k, v in sweep.space.items() if not isinstance(v, dict)})


def load_sweep(path: str | Path, base_path: Path | None = None) -> tuple[SweepSpec, dict, Path]:
    """The sweep spec, its base config (raw mapping) and the base config's path (default: `base`, relative
    to the sweep file)."""
    path = Path(path)
    raw, root = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a YAML mapping")
    try:
        sweep = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise format_validation_error(e, raw, str(path), root) from None
    base_path = base_path or (path.parent / sweep.base).resolve()
    base, _ = read_config(base_path)
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: the base config must be a YAML mapping")
    return sweep, base, base_path


def draw_trials(sweep: SweepSpec) -> list[Trial]:
    """The trials, in order: the grid's cartesian product, or `samples` draws from the sweep's seed."""
    fixed = {k: v for k, v in sweep.space.items() if not isinstance(v, dict)}
    varied = {k: v for k, v in sweep.space.items() if isinstance(v, dict)}
    combos: list[dict] = []
    if sweep.search.type == "grid":
        for key, dist in varied.items():
            if "choice" not in dist:
                raise ConfigError(f"space.{key}: grid search needs {{choice: [...]}}, got {dist}",
                                  "use search: {type: random, samples: N} for continuous distributions")
        keys = list(varied)
        size = math.prod(len(varied[k]["choice"]) for k in keys)
        if size > MAX_TRIALS:
            raise ConfigError(f"the grid has {size:,} trials (the product of the choices' lengths); at most "
                              f"{MAX_TRIALS:,} are run", "search fewer values, or use search: {type: random, "
                              "samples: N}")
        for values in itertools.product(*(varied[k]["choice"] for k in keys)):
            combos.append(dict(zip(keys, values)))
    else:
        g = np.random.default_rng(sweep.search.seed)
        for _ in range(sweep.search.samples):
            combo = {}
            for key, dist in varied.items():
                kind, args = next(iter(dist.items()))
                if kind == "choice":
                    v = args[int(g.integers(len(args)))]
                elif kind == "uniform":
                    v = float(g.uniform(args[0], args[1]))
                elif kind == "loguniform":
                    v = float(math.exp(g.uniform(math.log(args[0]), math.log(args[1]))))
                else:
                    v = int(g.integers(args[0], args[1]))
                combo[key] = v
            combos.append(combo)
    return [Trial(f"trial-{i:03d}", {**combo, **fixed}, tuple(varied)) for i, combo in enumerate(combos or [{}])]


def trial_spec(base: dict, trial: Trial, sweep_name: str, source: str):
    """The validated spec of one trial, with every shape check that needs no data."""
    raw = apply_overrides(base, trial.as_set())
    raw["name"] = f"{sweep_name}.{trial.id}"
    try:
        spec = validate(raw, f"{source} with {trial.id} {trial.overrides}")
        check_known_data(spec, describe(spec.model))
    except CnnctlError as e:
        raise type(e)(f"{trial.id} ({', '.join(trial.as_set())}) gives an invalid spec: {e.message}", e.hint) \
            from None
    return spec


# ---------------------------------------------------------------- running one trial


class Asha:
    """The asynchronous successive-halving rule over a shared record {rung epoch: [metric, ...]}."""

    def __init__(self, spec: AshaSpec, max_epochs: int, mode: str, record, lock):
        self.rungs, r = [], spec.grace_period
        while r < max_epochs:
            self.rungs.append(r)
            r *= spec.reduction_factor
        self.rf, self.mode, self.record, self.lock = spec.reduction_factor, mode, record, lock

    def keep_going(self, epoch: int, value: float) -> bool:
        if epoch not in self.rungs:
            return True
        with self.lock:
            seen = list(self.record.get(epoch, [])) + [value]
            self.record[epoch] = seen
        if len(seen) < self.rf:
            return True
        ordered = sorted(seen, reverse=self.mode == "max")
        cutoff = ordered[max(len(seen) // self.rf, 1) - 1]
        return value >= cutoff if self.mode == "max" else value <= cutoff


def run_trial(spec_dict: dict, run_dir: str, metric: str, stop_rule=None, report=None,
              parent: int | None = None) -> dict:
    """Train one trial into run_dir (resuming it when it has a checkpoint), holding the run directory's lock;
    returns its result row. With `parent` (the sweep's pid), the trial stops at the next batch once that
    process is gone (killed with SIGKILL, say): no orphan trains on."""
    from cnnctl.config.spec import Spec
    from cnnctl.run.callbacks import Callback
    from cnnctl.run.distributed import World
    from cnnctl.run.session import session

    spec = Spec.model_validate(spec_dict)
    run_dir = Path(run_dir)

    class Hooks(Callback):
        def on_batch_end(self, batch, loss, acc, images_per_second):
            if parent is not None and os.getppid() != parent:
                raise CnnctlError("the sweep process is gone; the trial stops (its last checkpoint stays)")

        def on_epoch_end(self, row):
            if report is not None:
                report(row)

        def should_stop(self, row):
            return stop_rule is not None and row.get(metric) is not None and not stop_rule(row["epoch"], row[metric])

    t0 = time.time()
    try:  # the same session as cnnctl train: a trial with a checkpoint resumes, its config checked against it
        resume = run_dir if (run_dir / "checkpoints" / "last.safetensors").is_file() else None
        done = runs.read_json(run_dir / "summary.json") or {} if resume is not None else {}
        if done.get("status") == "finished":  # killed after its end, before the sweep recorded it
            summary = done
        else:
            with session(None if resume else spec, [], run_dir.parent, resume, False, Hooks(), World(),
                         into=run_dir) as (trainer, _):
                summary = trainer.fit(run_dir, resumed=resume is not None)
    except CnnctlError as e:
        return {"status": "failed", "error": e.message, "seconds": round(time.time() - t0, 2)}
    except Exception as e:  # a crash in one trial must not end the sweep
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "seconds": round(time.time() - t0, 2)}
    best = summary["best"] or {}
    return {"status": "stopped" if summary.get("stopped_early") else "finished", "best": best.get(metric),
            "best_epoch": best.get("epoch"), "epochs": summary["final"]["epoch"],
            "seconds": round(time.time() - t0, 2), "error": None}


def _local_worker(trial_id, spec_dict, run_dir, metric, asha, record, lock, threads, parent, results) -> None:
    """One trial in its own process; its result row goes on the `results` queue."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the sweep, which stops its trials itself
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked since its start: a pending one is dropped
    parallel.use(threads)
    rule = None
    if asha is not None:
        spec_asha, max_epochs, mode = asha
        rule = Asha(spec_asha, max_epochs, mode, record, lock).keep_going
    results.put((trial_id, run_trial(spec_dict, run_dir, metric, rule, parent=parent)))


# ---------------------------------------------------------------- the sweep directory


RESULT_FIELDS = ["trial", "status", "best", "best_epoch", "epochs", "seconds", "error", "overrides"]


def write_results(sweep_dir: Path, trials: list[Trial], results: dict[str, dict], sweep: SweepSpec,
                  specs: dict[str, dict]) -> dict | None:
    """results.csv (one row per trial) and best.yaml (the winning resolved spec); returns the best row."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, lineterminator="\n")
    w.writeheader()
    for t in trials:
        r = results.get(t.id, {"status": "pending"})
        w.writerow({"trial": t.id, "overrides": " ".join(t.as_set()), **{k: r.get(k) for k in RESULT_FIELDS[1:-1]}})
    atomic_write_bytes(sweep_dir / "results.csv", buf.getvalue().encode())
    mode = resolve_mode(sweep.metric, sweep.mode)
    # only trials that ran to their end (or that ASHA stopped): a failed trial's metric is of a shorter run
    done = [(t, results[t.id]) for t in trials if results.get(t.id, {}).get("best") is not None
            and results[t.id]["status"] in DONE]
    if not done:
        return None
    best_t, best_r = (max if mode == "max" else min)(done, key=lambda tr: tr[1]["best"])
    runs.write_yaml(sweep_dir / "best.yaml", specs[best_t.id])
    return {"trial": best_t.id, **best_r, "overrides": best_t.overrides}


def _number(cell, kind=float):
    """A results.csv cell as a number, or None when it is empty or not a finite number (a hand-edited n/a)."""
    try:
        value = kind(float(cell)) if kind is int else float(cell)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def read_report(sweep_dir: Path) -> tuple[str, str, list[dict]]:
    """(metric, resolved mode, every row of results.csv, parsed): numbers are numbers or None, and `values` holds
    the trial's overrides as the sweep drew them (from sweep.yaml, never by splitting the text)."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / "results.csv"
    if not path.is_file():
        raise CnnctlError(f"{sweep_dir} has no results.csv", "pass a directory that cnnctl sweep wrote")
    sweep, _, _ = load_sweep(sweep_dir / "sweep.yaml", sweep_dir / "base.yaml")
    trials = draw_trials(sweep)
    drawn = {t.id: t.overrides for t in trials}
    shown = {t.id: " ".join(t.drawn()) for t in trials}
    try:
        with path.open(newline="") as f:
            raw = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CnnctlError(f"{path}: cannot read ({e})", "rerun the sweep with --resume to rewrite it") from None
    rows = []
    for r in raw:
        rows.append({"trial": r.get("trial") or "?", "status": r.get("status") or "?", "best": _number(r.get("best")),
                     "best_epoch": _number(r.get("best_epoch"), int), "epochs": _number(r.get("epochs"), int),
                     "seconds": _number(r.get("seconds")), "error": r.get("error") or None,
                     "overrides": r.get("overrides") or "", "values": drawn.get(r.get("trial"), {}),
                     "drawn": shown.get(r.get("trial"), r.get("overrides") or "")})
    return sweep.metric, resolve_mode(sweep.metric, sweep.mode), rows


def ranked(rows: list[dict], mode: str) -> tuple[list[dict], list[dict]]:
    """(trials with a result, best first by mode; every other row in file order): the one ranking the sweep
    table and the sweep page show."""
    done = sorted([r for r in rows if r["best"] is not None and r["status"] in DONE],
                  key=lambda r: r["best"], reverse=mode == "max")
    return done, [r for r in rows if r not in done]


def read_results(sweep_dir: Path) -> dict[str, dict]:
    """The trials results.csv records as finished (or stopped by ASHA) with their metric: kept by --resume."""
    if not (sweep_dir / "results.csv").is_file():
        return {}
    return {r["trial"]: {k: r[k] for k in ("status", "best", "best_epoch", "epochs", "seconds", "error")}
            for r in read_report(sweep_dir)[2] if r["status"] in DONE and r["best"] is not None}


def prepare(sweep_file: Path | None, runs_dir: Path, resume: Path | None, executor: dict | None = None,
            held: contextlib.ExitStack | None = None, sets: list[str] = ()):
    """Load and validate everything before any trial starts; returns (sweep, trials, specs, sweep_dir,
    results of finished trials). With resume, the sweep and base config are the copies in that directory.
    With `held`, the sweep directory's lock is taken into it (before the results are read): one process at a
    time runs a sweep directory."""
    if resume is not None:
        sweep_dir = Path(resume)
        if not (sweep_dir / "sweep.yaml").is_file():
            raise CnnctlError(f"{sweep_dir} is not a sweep directory (no sweep.yaml)",
                              "pass the directory that cnnctl sweep printed")
        sweep, base, base_path = load_sweep(sweep_dir / "sweep.yaml", sweep_dir / "base.yaml")
    else:
        if sweep_file is None:
            raise CnnctlError("give a SWEEP file, or --resume SWEEP_DIR")
        sweep, base, base_path = load_sweep(sweep_file)
    if sets:
        if resume is not None:
            raise CnnctlError("--set applies to a new sweep; a resumed one keeps the values it started with (its "
                              "base.yaml)", "leave --set out with --resume")
        base = apply_overrides(base, list(sets))  # every trial's, before its own overrides; kept in base.yaml
    if executor:
        sweep = sweep.model_copy(update={"executor": SweepSpec.model_validate(
            {**sweep.model_dump(), "executor": executor}).executor})
    trials = draw_trials(sweep)
    specs = {t.id: spec_to_dict(trial_spec(base, t, sweep.name, str(base_path))) for t in trials}
    if resume is not None:
        if held is not None:
            held.enter_context(runs.locked(sweep_dir))
        finished = read_results(sweep_dir)
    else:
        sweep_dir = runs.create_run_dir(runs_dir, sweep.name)
        os.rmdir(sweep_dir / "checkpoints")
        if held is not None:
            held.enter_context(runs.locked(sweep_dir))
        atomic_write_bytes(sweep_dir / "sweep.yaml", Path(sweep_file).read_bytes())
        runs.write_yaml(sweep_dir / "base.yaml", base)
        finished = {}
    return sweep, trials, specs, sweep_dir, finished


# ---------------------------------------------------------------- executors


def trial_result(run_dir: Path, metric: str, mode: str, error: str | None = None) -> dict:
    """A trial's row, read back from its run directory (works whichever executor ran it)."""
    history = runs.read_history(run_dir)
    values = [(r[metric], r["epoch"]) for r in history if r.get(metric) is not None]
    best = (max if mode == "max" else min)(values) if values else (None, None)
    summary = runs.read_json(run_dir / "summary.json") or {}
    if error or summary.get("status") == "failed":
        status = "failed"
    elif summary.get("status") == "finished":
        status = "stopped" if summary.get("stopped_early") else "finished"
    elif history:
        status = "stopped"  # ended by the scheduler between epochs
    else:
        status = "failed"
    error = error or summary.get("error")
    k = len((summary.get("dataset") or {}).get("classes") or []) if isinstance(summary.get("dataset"), dict) else 0
    if status == "finished" and metric.endswith("_acc") and best[0] is not None and k >= 2 and best[0] <= 1.1 / k:
        status = "diverged"  # it ran to the end, and learned nothing
        error = f"best {metric} {100 * best[0]:.2f}% is chance for {k} classes: lower optimizer.lr"
    return {"status": status, "best": best[0], "best_epoch": best[1], "epochs": len(history),
            "seconds": summary.get("wall_seconds"), "error": error}


def _died(exitcode: int | None) -> str:
    """What a trial process's exit code says about how it ended without a result."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.Signals._value2member_map_ else -exitcode
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if exitcode == -signal.SIGKILL else ""
        return f"its process was killed by {name}{hint}"
    return f"its process ended with exit code {exitcode} and no result"


def run_local(sweep: SweepSpec, trials: list[Trial], specs: dict, sweep_dir: Path, results: dict,
              on_update=None) -> None:
    """Trials in processes of their own on this machine, `max_concurrent` at a time, `blas_threads` threads
    each. A trial whose process dies (the out-of-memory killer, a signal) fails alone, named with its cause;
    the others go on. Ctrl-C or SIGTERM to the sweep stops every trial (their last checkpoints stay)."""
    from multiprocessing.connection import wait

    ex = sweep.executor
    mode = resolve_mode(sweep.metric, sweep.mode)
    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager() if sweep.scheduler else None
    record = manager.dict() if manager else None
    lock = manager.Lock() if manager else None
    for t in trials:  # the rungs hold the metrics that finished trials reached there
        if t.id in results and sweep.scheduler:
            _replay_rungs(sweep, specs[t.id], sweep_dir / "trials" / t.id, record)
    saved = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: str(ex.blas_threads) for k in saved})  # for the spawned workers (numpy is loaded here)
    queue = ctx.Queue()
    pending = [t for t in trials if t.id not in results]
    running: dict[str, multiprocessing.process.BaseProcess] = {}
    reported: dict[str, dict] = {}

    def finish(tid: str, error: str | None) -> None:
        results[tid] = trial_result(sweep_dir / "trials" / tid, sweep.metric, mode, error)
        write_results(sweep_dir, trials, results, sweep, specs)
        if on_update:
            on_update(tid, results[tid])

    try:
        for t in pending:
            if on_update:
                on_update(t.id, {"status": "queued"})
        while pending or running:
            while pending and len(running) < ex.max_concurrent:
                t = pending.pop(0)
                asha = (sweep.scheduler, specs[t.id]["train"]["epochs"], mode) if sweep.scheduler else None
                proc = ctx.Process(target=_local_worker, name=f"cnnctl-{t.id}", daemon=True, args=(
                    t.id, specs[t.id], str(sweep_dir / "trials" / t.id), sweep.metric, asha, record, lock,
                    ex.blas_threads, os.getpid(), queue))
                # SIGINT blocked while the worker starts: a Ctrl-C that reaches it before _local_worker ignores it
                # (while Python starts and imports) waits, then is dropped; the sweep gets its own once unblocked
                before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    proc.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, before)
                running[t.id] = proc
            wait([p.sentinel for p in running.values()], timeout=1.0)
            for tid, proc in list(running.items()):
                if proc.is_alive():
                    continue
                proc.join()
                del running[tid]
                while proc.exitcode == 0 and tid not in reported:  # sent before the process ended
                    try:
                        done_id, res = queue.get(timeout=10)
                    except Empty:
                        break
                    reported[done_id] = res
                res = reported.pop(tid, None)
                finish(tid, res.get("error") if res else _died(proc.exitcode))
    finally:  # Ctrl-C, SIGTERM or an error here: no trial outlives the sweep
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if manager:
            manager.shutdown()


def _replay_rungs(sweep, spec_dict, run_dir: Path, record) -> None:
    asha = Asha(sweep.scheduler, spec_dict["train"]["epochs"], resolve_mode(sweep.metric, sweep.mode), {}, None)
    for row in runs.read_history(run_dir):
        if row["epoch"] in asha.rungs and row.get(sweep.metric) is not None:
            record[row["epoch"]] = list(record.get(row["epoch"], [])) + [row[sweep.metric]]


def run_ray(sweep: SweepSpec, trials: list[Trial], specs: dict, sweep_dir: Path, results: dict,
            on_update=None) -> None:
    """Trials as Ray Tune trials (ASHA from Ray when asked), on a cluster or a local Ray instance."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter, which verbose=0 silences
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray = require("ray", "ray", "executor ray needs Ray Tune, which is not installed",
                  instead="or use executor: {type: local}")
    tune = require("ray.tune", "ray", "executor ray needs Ray Tune, which is not installed",
                   instead="or use executor: {type: local}")
    ASHAScheduler = tune.schedulers.ASHAScheduler
    ex = sweep.executor
    mode = resolve_mode(sweep.metric, sweep.mode)
    pending = [t.id for t in trials if t.id not in results]
    if not pending:
        return
    init = {"address": ex.address} if ex.address else {"num_cpus": ex.num_cpus}
    ray.init(**init, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             logging_level="ERROR", runtime_env={"env_vars": {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}})
    metric, trial_dirs = sweep.metric, {tid: str((sweep_dir / "trials" / tid).resolve()) for tid in pending}
    trial_specs = {tid: specs[tid] for tid in pending}

    def trainable(config):
        tid = config["trial"]

        def report(row):
            value = row.get(metric)
            tune.report({"epoch": row["epoch"], metric: math.nan if value is None else value})

        res = run_trial(trial_specs[tid], trial_dirs[tid], metric, None, report)
        if res["status"] == "failed":
            raise RuntimeError(res["error"])

    scheduler = None
    if sweep.scheduler:
        max_t = max(s["train"]["epochs"] for s in trial_specs.values())
        scheduler = ASHAScheduler(time_attr="epoch", grace_period=sweep.scheduler.grace_period,
                                  reduction_factor=sweep.scheduler.reduction_factor, max_t=max_t)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": ex.cpus_per_trial}),
        param_space={"trial": tune.grid_search(pending)},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler),
        run_config=tune.RunConfig(name="tune", storage_path=str((sweep_dir / "ray").resolve()), verbose=0),
    )
    try:
        grid = tuner.fit()
        errors = {r.config["trial"]: str(r.error).splitlines()[-1] if r.error else None for r in grid}
    finally:
        ray.shutdown()
    for tid in pending:
        results[tid] = trial_result(sweep_dir / "trials" / tid, metric, mode, errors.get(tid))
        if on_update:
            on_update(tid, results[tid])
    write_results(sweep_dir, trials, results, sweep, specs)


EXECUTORS = {"local": run_local, "ray": run_ray}
