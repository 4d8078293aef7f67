"""Sweeps: a search over config overrides, run as ordinary cnnctl runs, locally or on a Ray cluster.

The trials are drawn up front from the sweep's seed (so both executors run the same trials), and every trial's
spec is validated and shape-checked before anything starts (`spec`). Each trial trains in
SWEEP_DIR/trials/trial-NNN/ with the usual run layout, through the same session as `cnnctl train` (`trial`).
ASHA (asynchronous successive halving) stops poor trials at rungs of grace_period * reduction_factor^k epochs: a
trial continues past a rung only if its metric is in the best 1/reduction_factor of the trials that reached that
rung before it. `results` keeps the sweep directory; `local` and `ray` are the executors.
"""

from .local import run_local
from .ray import run_ray
from .results import prepare, ranked, read_report, read_results, write_results
from .spec import AshaSpec, GridSearch, RandomSearch, SweepSpec, Trial, constants, draw_trials, load_sweep
from .trial import Asha, run_trial, trial_result

EXECUTORS = {"local": run_local, "ray": run_ray}  # executor.type -> the function that runs the trials

__all__ = ["EXECUTORS", "Asha", "AshaSpec", "GridSearch", "RandomSearch", "SweepSpec", "Trial", "constants",
           "draw_trials", "load_sweep", "prepare", "ranked", "read_report", "read_results", "run_local", "run_ray",
           "run_trial", "trial_result", "write_results"]
