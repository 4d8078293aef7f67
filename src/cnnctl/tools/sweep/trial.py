"""One trial: ASHA's rule at each rung, a trial trained through the same session as `cnnctl train` (resumed
when it has a checkpoint), and its result row read back from its run directory."""


from __future__ import annotations

import os
import time
from pathlib import Path

from cnnctl.core.schedules import resolve_mode
from cnnctl.errors import CnnctlError
from cnnctl.run import runs

from .spec import AshaSpec


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


def replay_rungs(sweep, spec_dict, run_dir: Path, record) -> None:
    """A resumed trial's metrics at the rungs it passed, put back into the shared record (ASHA's memory)."""
    asha = Asha(sweep.scheduler, spec_dict["train"]["epochs"], resolve_mode(sweep.metric, sweep.mode), {}, None)
    for row in runs.read_history(run_dir):
        if row["epoch"] in asha.rungs and row.get(sweep.metric) is not None:
            record[row["epoch"]] = list(record.get(row["epoch"], [])) + [row[sweep.metric]]


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
