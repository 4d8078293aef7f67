"""Everything before `fit`: the config read (or the run to resume, checked against its last checkpoint and locked),
the spec and checkpoint shared with every MPI rank, the trainer built on every rank, the run directory made, and a
resumed trainer's state restored."""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
from pathlib import Path

import yaml

from cnnctl import data
from cnnctl.config.build import load_weights
from cnnctl.config.reading import load_config, spec_to_dict, validate
from cnnctl.config.spec import Spec
from cnnctl.errors import CheckpointError, CnnctlError, ConfigError

from . import checkpoint, distributed, runs
from .callbacks import Callback
from .start import check_without_data
from .trainer import Trainer


def restore(trainer, ckpt: checkpoint.Checkpoint, path) -> None:
    """A trainer continued from a checkpoint: weights (and their average), optimizer, schedule, counters, generators,
    position."""
    load_weights(trainer.model, ckpt.model_state, path)  # the weights, or their average with train.ema_decay
    if trainer.average:  # the average goes on from model_state (from the weights, if the run had none)
        trainer.average.reset()
    if ckpt.training_state:  # model_state was an average: training goes on from the weights beside it
        load_weights(trainer.model, ckpt.training_state, path)
    t = ckpt.run
    if t is None:
        raise CheckpointError(f"{path}: holds no training state (written by an older cnnctl)")
    try:
        trainer.optimizer.load_state_dict(ckpt.optimizer_state)
        # the checkpoint's own step count says whether there must be state (its `steps` entry may be gone too)
        missing = trainer.optimizer.missing_state() if ckpt.step > 0 else []
        if missing:
            raise CheckpointError(f"{path}: the optimizer state of {len(missing)} parameter(s) is missing "
                                  f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); resuming "
                                  "would silently restart their moments, so the run would not be exact",
                                  "resume from an intact checkpoint, or start the run again")
        for key in ("classes", "history", "stopper", "schedule", "seeds", "wall_seconds"):
            if getattr(t, key) is None:  # the types were checked on load; these cannot be absent
                raise KeyError(key)
        if t.best is not None and not isinstance(t.best.get(trainer.monitor), (int, float)):
            raise ValueError(f"the best epoch's row has no '{trainer.monitor}' (the monitored metric)")
        if t.partial is not None and not 0 <= t.partial.position <= trainer.steps_per_epoch:
            raise ValueError(f"partial.position {t.partial.position} is outside the epoch's "
                             f"{trainer.steps_per_epoch} batches")
        trainer.schedule.load_state_dict(t.schedule)
        trainer.seeds.restore(t.seeds)
        shape, batch = trainer.spec.model.input_shape, trainer.spec.data.batch_size // trainer.world.size
        algorithms = trainer.runner.fix_algorithms(shape, batch, recorded=t.algorithms or {})  # older: shape rule
        trainer.state = t.model_copy(update={"classes": trainer.ds.classes, "algorithms": algorithms})
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged training state ({type(e).__name__}: {e})",
                              "resume from another checkpoint, or start the run again") from None


def resume_spec(run_dir: Path, overrides: list[str], force: bool) -> tuple[Spec, checkpoint.Checkpoint]:
    """The spec to continue a run with: its config.yaml plus overrides, checked against its last checkpoint.

    Changing anything but train.epochs (the way to extend a finished run) is refused unless force, with the
    difference shown, since the continued run would no longer be the run that was started.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CnnctlError(f"{run_dir} is not a run directory (no config.yaml)",
                          "pass the directory that cnnctl train printed, e.g. runs/NAME-YYYYmmdd-HHMMSS")
    last = run_dir / "checkpoints" / "last.safetensors"
    if not last.is_file():
        raise CnnctlError(f"{run_dir} has no {last.relative_to(run_dir)}: the run stopped before its first checkpoint "
                          "was written, so there is nothing to continue", f"start it again: cnnctl train "
                          f"{run_dir / 'config.yaml'}")
    summary = runs.read_json(run_dir / "summary.json") or {}
    if summary.get("status") == "finished" and summary.get("stopped_early") and not force:
        raise CnnctlError(f"{run_dir} finished: early stopping ended it after epoch {summary.get('epochs_done')}",
                          "to train on anyway pass --force (early stopping may end it again; raise "
                          "train.early_stopping.patience with --set)")
    ckpt = checkpoint.load(last)
    spec, _ = load_config(run_dir / "config.yaml", overrides)
    try:  # the checkpoint's config with the defaults of keys added since it was written
        old = spec_to_dict(validate(ckpt.config, f"{last} (embedded config)"))
    except ConfigError:
        old = copy.deepcopy(ckpt.config)
    new = spec_to_dict(spec)
    if isinstance(old.get("train"), dict):
        old["train"]["epochs"] = new["train"]["epochs"]
    if old != new and not force:
        diff = "".join(difflib.unified_diff(
            yaml.safe_dump(old, sort_keys=False).splitlines(True),
            yaml.safe_dump(spec_to_dict(spec), sort_keys=False).splitlines(True),
            "checkpoint config", "config.yaml + --set", n=1))
        raise ConfigError(f"the config of {run_dir} differs from the one its checkpoint was trained with:\n{diff}",
                          "undo the change, or pass --force to continue with the new config")
    unfinished = summary.get("status") not in ("finished", None)  # killed during its test evaluation, say
    if ckpt.epoch > spec.train.epochs or (ckpt.epoch == spec.train.epochs and not (ckpt.run and ckpt.run.partial)
                                          and not unfinished):
        raise CnnctlError(f"{run_dir} has finished {ckpt.epoch} of {spec.train.epochs} epochs; nothing to resume",
                          f"extend it with --set train.epochs={ckpt.epoch + 5} (for example)")
    return spec, ckpt


def _shared_spec(world: distributed.World, spec: Spec | None) -> Spec:
    """Rank 0's spec on every rank (only rank 0 reads the config file)."""
    if world.size == 1:
        return spec
    data = world.broadcast_bytes(json.dumps(spec_to_dict(spec)).encode() if world.root else None)
    return spec if world.root else validate(json.loads(data), "the config rank 0 sent")


def _shared_resume(world: distributed.World, spec: Spec | None, ckpt: checkpoint.Checkpoint | None, last: Path):
    """Rank 0's spec and last checkpoint on every rank (the run directory need only be on rank 0's host): every
    rank, rank 0 too, parses the same bytes with the same function."""
    if world.size == 1:
        return spec, ckpt
    spec = _shared_spec(world, spec)
    raw = world.broadcast_bytes(checkpoint.read(last) if world.root else None)
    return spec, checkpoint.parse(raw, last)


def _make_trainer(world: distributed.World, spec: Spec, callback: Callback, make) -> Trainer:
    """Rank 0 first runs the checks that read no data (a config error is said once, by it) and fetches the data
    when the config downloads it; then every rank builds its trainer at the same time, since they share the
    reading a run does before its first batch (a pack's verification, normalize: auto's sums: MPI reductions).
    All are built (every check passed on every rank) before rank 0 makes the run directory."""
    if world.size == 1:
        return make()
    if world.root:
        check_without_data(spec, world)
        data.fetch(spec.data, callback.on_download)
    world.any(False)  # every rank waits here for rank 0's checks and download
    trainer = make()
    world.any(False)
    return trainer


@contextlib.contextmanager
def session(config: Path | Spec | None, overrides: list[str], runs_dir: Path, resume: Path | None, force: bool,
            callback: Callback, world: distributed.World, *, into: Path | None = None):
    """Everything before fit, as a context yielding (trainer, run_dir): rank 0 reads the config (or the run to
    resume, which it locks) and sends the others the spec (and checkpoint); every rank builds its trainer, so every
    check runs on every rank before rank 0 makes the run directory (a new one under runs_dir, or `into`: a sweep's
    trial folder, which its sweep owns). A new run that fails before its first checkpoint leaves no directory
    behind."""
    run_dir = None
    try:
        with contextlib.ExitStack() as held:
            if resume is not None:
                last = resume / "checkpoints" / "last.safetensors"
                spec = ckpt = None
                if world.root:  # rank 0 reads the run directory and sends the others what they need
                    if (resume / "config.yaml").is_file():
                        held.enter_context(runs.locked(resume))  # one process at a time trains a run directory
                    spec, ckpt = resume_spec(resume, overrides, force)
                spec, ckpt = _shared_resume(world, spec, ckpt, last)
                trainer = _make_trainer(world, spec, callback, lambda: Trainer(
                    spec, callback, normalization=ckpt.normalization, resuming=True, world=world))
                restore(trainer, ckpt, last)
                run_dir = resume
            else:  # a config file, or a Spec already made (cnnctl.train with a dict or a Spec)
                spec = (config if isinstance(config, Spec) else load_config(config, overrides)[0]) if world.root \
                    else None
                spec = _shared_spec(world, spec)
                trainer = _make_trainer(world, spec, callback, lambda: Trainer(spec, callback, world=world))
                if world.root:
                    run_dir = runs.create_run_dir(runs_dir, spec.name) if into is None else runs.own_dir(into)
                    held.enter_context(runs.locked(run_dir))
                run_dir = Path(world.broadcast_bytes(str(run_dir).encode() if world.root else None).decode())
            yield trainer, run_dir
    except BaseException:  # a new run that never began training leaves nothing behind; one that did keeps its records
        if (world.root and resume is None and into is None and run_dir is not None and not trainer.fitting
                and not (run_dir / "checkpoints" / "last.safetensors").exists()):
            runs.remove_run(run_dir)
        raise
