"""The Ray executor (the `cnnctl[ray]` extra): trials as Ray tasks, ASHA's rungs replayed from the trials' own
metrics."""


from __future__ import annotations

import math
import os
from pathlib import Path

from cnnctl.core.schedules import resolve_mode
from cnnctl.extras import require

from .results import write_results
from .spec import SweepSpec, Trial
from .trial import run_trial, trial_result


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
