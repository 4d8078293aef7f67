"""The trainer: a spec's model, data and optimizer built (every check first), then `fit(run_dir)` trains, validates,
checkpoints and tests, reporting progress through a callback; it draws nothing.

A run can stop at any batch boundary and continue bit for bit: checkpoints carry the weights, buffers,
optimizer and schedule state, the epoch and step, every random generator's state, the position in the
current epoch's shuffle order and the partial sums of its metrics, and the metrics history itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

from cnnctl import data
from cnnctl.config.build import training_pflops
from cnnctl.config.reading import spec_to_dict
from cnnctl.config.spec import Spec
from cnnctl.core import parallel
from cnnctl.core.environment import environment
from cnnctl.core.schedules import resolve_mode
from cnnctl.errors import CnnctlError, Interrupted, TrainingError

from . import checkpoint, distributed, runs
from .callbacks import Callback, Callbacks
from .checkpoint import RunState, Stopper
from .evaluation import evaluate
from .frozen import cache_frozen
from .loop import train_epoch
from .numerics import NumericWarnings, batchnorm_hint, check_finite
from .start import Seeds
from .start import start as start_run


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class Trainer:
    """Builds everything a spec needs (all shape and data checks happen here), then `fit(run_dir)` trains."""

    def __init__(self, spec: Spec, callback: Callback | None = None, normalization: dict | None = None,
                 resuming: bool = False, world: distributed.World | None = None):
        self.spec, self.cb = spec, callback or Callback()
        self.world = world or distributed.World()  # several MPI ranks: each trains on its share of every batch
        self.seeds = Seeds.from_seed(spec.seed)
        s = start_run(spec, self.seeds.init, self.seeds.data, normalization, resuming, self.cb.on_download,
                          self.world)
        self.model, self.rows, self.init_report, self.ds, self.whitening = s.model, s.rows, s.init_report, s.ds, \
            s.whitening
        # runs the model through its execution plan; batchnorm and dropout learn from it the share of the batch
        self.runner = s.runner
        self.num_classes = len(self.ds.classes)
        self.hinted = False  # batchnorm_hint said its line
        parts = s.parts
        self.loss_fn, self.optimizer, self.schedule = parts.loss_fn, parts.optimizer, parts.schedule
        self.average, self.steps_per_epoch = parts.average, parts.steps_per_epoch  # the average: evaluated and saved
        self.monitor, self.monitor_mode = spec.train.monitor, resolve_mode(spec.train.monitor, "auto")
        # where the run stands: read and written here, saved in every checkpoint (checkpoint.RunState)
        # (the plan's convolution algorithms: a new run's from run.start, a resumed run's its own, see restore)
        self.state = RunState(classes=self.ds.classes, history=[], stopper=Stopper(), wall_seconds=0.0,
                              algorithms=s.algorithms)
        # what the training step runs and is fed: the model on the images, or with train.cache_frozen the layers
        # above the frozen prefix on the prefix's outputs, computed once (fit: after a resume's weights are in)
        self.net, self.feed = self.runner, self.ds
        self.stop_signal: int | None = None  # set by a signal handler on this rank
        self.ranks: list[dict] = []  # each rank's host and pid: fit asks (a collective call under MPI)
        self.fitting = False

    # ------------------------------------------------------------ state

    def request_stop(self, signum: int) -> None:
        """Ask training to stop at the next batch boundary (from a signal handler)."""
        self.stop_signal = signum

    def _run_state(self) -> RunState:
        """The run state with the schedule's and the random streams' states and the wall time as of now."""
        return self.state.model_copy(update={"schedule": self.schedule.state_dict(), "seeds": self.seeds.state(),
                                             "wall_seconds": self._elapsed()})

    def _elapsed(self) -> float:
        """Wall time of the run so far, across resumes."""
        return self.state.wall_seconds + (time.time() - self._started)

    def evaluated(self):
        """A context in which the model holds the weights that are evaluated and saved: with train.ema_decay
        their moving average, else the weights themselves."""
        return self.average.applied() if self.average else contextlib.nullcontext()

    def save(self, name: str) -> None:
        if not self.world.root:  # rank 0 alone writes the run directory
            return
        model_state, training_state = self.model.state_dict(), {}
        if self.average:
            model_state, training_state = self.average.average, model_state
        checkpoint.save(self.run_dir / "checkpoints" / f"{name}.safetensors", checkpoint.Checkpoint(
            config=spec_to_dict(self.spec), model_state=model_state, training_state=training_state,
            optimizer_state=self.optimizer.state_dict(), epoch=self.state.epoch, step=self.state.step,
            metrics=self.state.history[-1] if self.state.history else {},
            normalization={"mean": self.ds.mean.tolist(), "std": self.ds.std.tolist()},
            run=self._run_state(), environment=self.environment,
        ))

    def _write_summary(self, status: str, **extra) -> None:
        """summary.json as of the last epoch whose records (checkpoint and metrics rows) were all written: after a
        failed write it never claims more than the run directory holds."""
        if not self.world.root:
            return
        rows = [r for r in self.state.history if r["epoch"] <= self.recorded]
        runs.write_json(self.run_dir / "summary.json", {
            "name": self.spec.name, "status": status, "started": self.started, "pid": os.getpid(),
            "epochs": self.spec.train.epochs, "epochs_done": self.recorded,
            "steps": rows[-1]["step"] if rows else 0, "params": self.model.num_params(), "threads": parallel.threads(),
            "wall_seconds": round(self._elapsed(), 3),
            "monitor": self.monitor, "final": rows[-1] if rows else None,
            "best": self.state.best,
            "dataset": self.ds.describe(),
            "environment": self.environment,
            "command": self.command,
            "plan": self.state.algorithms,
            "training_pflops": training_pflops(self.rows, self._images_trained(rows[-1]["step"] if rows else 0)),
            **({"init_from": self.init_report} if self.init_report else {}),
            **({"patch_whitening": self.whitening} if self.whitening else {}),
            **({"world": {"size": self.world.size, "ranks": self.ranks}} if self.world.size > 1 else {}),
            **extra,
        })

    def _images_trained(self, steps: int) -> int:
        """Training images the first `steps` steps saw (every epoch's last batch may be short)."""
        n, bs = len(self.ds.train), self.spec.data.batch_size
        epochs, rest = divmod(steps, self.steps_per_epoch)
        return epochs * n + min(rest * bs, n)

    def _end_of_epoch(self, row: dict) -> bool:
        """Checkpoints, schedule and early stopping after an epoch; True when training should stop."""
        t = self.spec.train
        value = row[self.monitor]  # None after an epoch without validation (train.validate_every)
        best = self.state.best
        if value is not None and (best is None or improved(value, best[self.monitor], self.monitor_mode)):
            self.state.best = dict(row)
            self.save("best")
        if t.checkpoint_every and self.state.epoch % t.checkpoint_every == 0:
            self.save(f"epoch-{self.state.epoch:04d}")
            if t.keep_last and self.world.root:
                kept = runs.epoch_checkpoints(self.run_dir)
                for old in kept[: -t.keep_last]:
                    old.unlink()
        self.schedule.observe(row)
        stop = False
        if t.early_stopping and row[t.early_stopping.monitor] is not None:
            es = t.early_stopping
            mode = resolve_mode(es.monitor, es.mode)
            stopper = self.state.stopper
            if improved(row[es.monitor], stopper.best, mode, es.min_delta):
                self.state.stopper = Stopper(best=row[es.monitor], bad_epochs=0)
            else:
                stopper.bad_epochs += 1
                stop = stopper.bad_epochs >= es.patience
        self.save("last")
        return stop

    def fit(self, run_dir: Path, resumed: bool = False) -> dict:
        """Train to train.epochs (from where a resumed run stands), validate, checkpoint, test; returns the summary.
        numpy's floating-point warnings are counted meanwhile, never printed (see NumericWarnings)."""
        with NumericWarnings() as self.numerics:
            return self._fit(run_dir, resumed)

    def _fit(self, run_dir: Path, resumed: bool) -> dict:
        self._begin(Path(run_dir), resumed)
        try:
            stopped_early = self._epochs()
        except Interrupted:
            self._record_end("interrupted")
            raise
        except CnnctlError as e:  # a diverging loss, a full disk, ...: the summary says so if it still can
            if isinstance(e, TrainingError):
                self.numerics.explain(e)
            self._record_end("failed", error=e.message)
            raise
        except Exception as e:  # a failure in cnnctl itself: recorded too, then shown with its traceback
            self._record_end("failed", error=f"{type(e).__name__}: {e}")
            raise
        extra = {"stopped_early": stopped_early, **self._test()}
        self._write_summary("finished", **extra)
        self.cb.on_train_end({"final": self.state.history[-1], "best": self.state.best, **extra})
        return {**extra, "best": self.state.best, "monitor": self.monitor, "final": self.state.history[-1],
                "wall_seconds": round(self._elapsed(), 3),
                "plan": self.state.algorithms,
                "training_pflops": training_pflops(self.rows, self._images_trained(self.state.step))}

    def _begin(self, run_dir: Path, resumed: bool) -> None:
        """Before the first epoch: the frozen prefix's cache, the run directory's config, metrics and summary,
        the loggers, and the start line."""
        spec = self.spec
        self.run_dir, self._started = run_dir, time.time()
        if spec.train.cache_frozen and self.net is self.runner:  # in the wall time: the cache costs one pass
            with self.evaluated():
                self.net, self.feed = cache_frozen(spec, self.runner, self.ds)
        self.fitting = True  # from here a failure leaves the run directory and its records in place
        self.environment = environment()
        self.command = runs.command_line()  # what started this session of the run (train, or train --resume)
        self.recorded = self.state.epoch  # epochs with checkpoint and metrics rows written (resume: the checkpoint's)
        previous = runs.run_info(self.run_dir) if resumed else None
        self.started = (previous or {}).get("started") or time.strftime("%Y-%m-%dT%H:%M:%S")
        self.ranks = self.world.ranks()
        if self.world.root:
            runs.write_yaml(self.run_dir / "config.yaml", spec_to_dict(spec))
            runs.rewrite_metrics(self.run_dir, self.state.history)  # on resume: exactly the rows the checkpoint knows
        self._write_summary("running")
        if spec.train.loggers and self.world.root:
            from .loggers import make_loggers

            self.cb = Callbacks([self.cb, *make_loggers(spec.train.loggers, self.run_dir, spec_to_dict(spec))])
        self.cb.on_train_start({"run_dir": str(self.run_dir), "params": self.model.num_params(),
                                "train": len(self.ds.train), "val": len(self.ds.val), "test": len(self.ds.test),
                                "image_shape": self.ds.image_shape, "classes": self.ds.classes,
                                "resumed_at": (self.state.epoch, self.state.step) if resumed else None,
                                "init_from": self.init_report,
                                "ranks": self.ranks if self.world.size > 1 else None})

    def _epochs(self) -> bool:
        """Train, validate and record epochs up to train.epochs; True when early stopping (or a callback) ended
        them first."""
        stopped_early = False
        while self.state.epoch < self.spec.train.epochs and not stopped_early:
            stopped_early = self._epoch(self.state.epoch + 1)
        return stopped_early

    def _epoch(self, epoch: int) -> bool:
        """One epoch: train, synchronise the ranks, validate, record; True when training should stop after it."""
        spec = self.spec
        if spec.train.unfreeze_at_epoch and epoch >= spec.train.unfreeze_at_epoch:
            self.model.freeze(False)  # from here on everything trains (a no-op once done)
        t0 = time.perf_counter()
        train_loss, train_acc = train_epoch(self, epoch)
        distributed.synchronise(self.world, self.model, self.optimizer, self.average)
        row = {"epoch": epoch, "step": self.state.step, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": None, "val_acc": None, "lr": self.optimizer.lr}
        if len(self.ds.val) and (epoch % spec.train.validate_every == 0 or epoch == spec.train.epochs):
            val = self._evaluate(self.feed.val)
            row.update(val_loss=val["loss"], val_acc=val["accuracy"])
        row["seconds"] = round(time.perf_counter() - t0, 3)
        if self.world.root and row["val_acc"] is not None and not self.hinted:
            self.hinted = batchnorm_hint(self.model, row, None if spec.task == "multilabel" else self.num_classes)
        if row["val_loss"] is not None and not math.isfinite(row["val_loss"]):
            if self.world.root:  # the epoch was trained: its row is kept (the loss as null), then it stops
                runs.append_metrics(self.run_dir, row)
            check_finite("validation loss", row["val_loss"], f"after epoch {epoch}", self.optimizer.lr)
        self.state.epoch = epoch
        self.state.history.append(row)
        stop = self._end_of_epoch(row)
        if self.world.root:
            runs.append_metrics(self.run_dir, row)
        self.recorded = epoch
        if epoch < spec.train.epochs:  # progress on disk: `runs` and a crash see the epochs done
            self._write_summary("running")
        self.cb.on_epoch_end(row)
        stop = self.world.any(stop or self.cb.should_stop(row))  # rank 0's callbacks
        if self.world.any(self.stop_signal is not None):  # every rank stops here if any was signalled
            raise Interrupted(self.stop_signal or signal.SIGINT, self.run_dir, epoch, self.state.step)
        return stop

    def _evaluate(self, split: data.Split) -> dict:
        """The evaluated weights (their average with train.ema_decay) on a split of what the network is fed."""
        with self.evaluated():
            return evaluate(self.net, self.loss_fn, self.feed, split, self.spec.data.evaluation_batch,
                            self.num_classes, self.spec.data.test_time_augment, self.world, self.spec.data.prefetch)

    def _test(self) -> dict:
        """The test split's loss and accuracy at the end (train.test_at_end), as summary entries."""
        if not self.spec.train.test_at_end:
            return {}
        if not len(self.ds.test):
            return {"test_skipped": f"the {self.spec.data.dataset} data has no test split; the run is measured on "
                                    "its validation split"}
        self._write_summary("testing")  # killed now, the run resumes to its test evaluation
        try:
            test = self._evaluate(self.feed.test)
            check_finite("test loss", test["loss"], "at the end", self.optimizer.lr)
        except CnnctlError as e:
            self._record_end("failed", error=e.message)
            raise
        return {"test": {"loss": test["loss"], "accuracy": test["accuracy"], "n": test["n"]}}

    def _record_end(self, status: str, **extra) -> None:
        """The summary's last word on a run that did not finish, if the disk still takes it."""
        with contextlib.suppress(CnnctlError):
            self._write_summary(status, **extra)


