"""The sweep directory: results.csv and best.yaml written, read back and ranked, and `prepare`, which loads and
checks everything (or a sweep to resume) before any trial starts."""


from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from pathlib import Path

from cnnctl.config.reading import apply_overrides, spec_to_dict
from cnnctl.core.fileio import atomic_write_bytes
from cnnctl.core.schedules import resolve_mode
from cnnctl.errors import CnnctlError
from cnnctl.run import runs

from .spec import DONE, SweepSpec, Trial, draw_trials, load_sweep, trial_spec

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
