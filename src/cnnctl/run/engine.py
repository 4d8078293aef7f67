"""The training engine: spec in, run directory out. Reports progress through a callback; draws nothing.

A run can stop at any batch boundary and continue bit for bit: checkpoints carry the weights, buffers,
optimizer and schedule state, the epoch and step, every random generator's state, the position in the
current epoch's shuffle order and the partial sums of its metrics, and the metrics history itself.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import difflib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from cnnctl import data
from cnnctl.config.build import training_pflops
from cnnctl.config.spec import Spec, TestTimeAugmentSpec, load_config, spec_to_dict, validate
from cnnctl.core import nn, parallel, plan
from cnnctl.core.environment import environment
from cnnctl.core.memory import refuse_over
from cnnctl.core.nn import Loss, Model
from cnnctl.core.schedules import resolve_mode
from cnnctl.errors import CheckpointError, CnnctlError, ConfigError, Interrupted, TrainingError

from . import checkpoint, distributed, runs
from .callbacks import Callback, Callbacks
from .checkpoint import Partial, RunState, Stopper
from .start import dataset as run_dataset
from .start import start as start_run
from .step import TrainingStep
from .weights import restore_weights


@dataclass
class Seeds:
    """Independent streams from one seed: weights and dropout, data generation and splits, shuffling,
    augmentation. (Spawned children do not depend on how many are spawned, so streams can be added.)"""

    init: np.random.Generator
    data: np.random.Generator
    shuffle: np.random.Generator
    augment: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int) -> Seeds:
        return cls(*np.random.default_rng(seed).spawn(len(checkpoint.STREAMS)))

    def state(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k).bit_generator.state)
                for k in checkpoint.STREAMS}

    def restore(self, state: dict) -> None:
        for k, v in state.items():
            getattr(self, k).bit_generator.state = v  # in place: layers holding the generator see it too


def infer(net: plan.Runner, x: np.ndarray, tta: TestTimeAugmentSpec | None = None) -> np.ndarray:
    """The outputs of the model a runner runs for a batch (inference mode); with test-time augmentation the mean
    of the outputs for the views of each image it asks for (mirror, shifted copies)."""
    if tta is None or tta.views == 1:
        return net.forward(x, training=False)
    views = data.augment.test_time_views(x, tta)
    out = np.array(net.forward(next(views), training=False), copy=True)  # the next forward may reuse its buffer
    for view in views:
        out += net.forward(view, training=False)
    out *= out.dtype.type(1 / tta.views)
    return out


def evaluate(net: plan.Runner, loss_fn: Loss, ds: data.Dataset, split: data.Split, batch_size: int,
             num_classes: int, tta: TestTimeAugmentSpec | None = None,
             world: distributed.World | None = None) -> dict:
    """Mean loss, accuracy and the confusion matrix (rows: true class, columns: predicted) of one split.
    With several ranks each evaluates its share of every batch and the sums are reduced."""
    world = world or distributed.World()
    total_loss, confusion = 0.0, np.zeros((num_classes, num_classes), np.int64)
    for x, y in data.batches(ds, split, batch_size):
        if world.size > 1:
            lo, hi = world.shard(len(y))
            x, y = x[lo:hi], y[lo:hi]
            if not len(y):
                continue
        out = infer(net, x, tta)
        total_loss += loss_fn.forward(out, y) * len(y)
        np.add.at(confusion, (y, out.argmax(axis=1)), 1)
    if world.size > 1:
        sums = world.sum(np.concatenate([[total_loss], confusion.ravel()]).astype(np.float64))
        total_loss, confusion = float(sums[0]), np.rint(sums[1:]).astype(np.int64).reshape(confusion.shape)
    n = len(split)
    return {"loss": total_loss / max(n, 1), "accuracy": float(np.trace(confusion) / max(n, 1)), "n": n,
            "confusion_matrix": confusion, **per_class(confusion)}


def per_class(confusion: np.ndarray) -> dict:
    """Support, precision and recall of each class from a confusion matrix (rows: true class); 0 where a class
    was never predicted or never present."""
    hits = np.diag(confusion).astype(np.float64)
    predicted, present = confusion.sum(axis=0), confusion.sum(axis=1)
    return {"support": present, "precision": np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0),
            "recall": np.divide(hits, present, out=np.zeros_like(hits), where=present > 0)}


def load_data(spec: Spec, rows: list, seeds: Seeds, normalization: dict | None = None,
              progress=None) -> data.Dataset:
    """The dataset with the run's own validation split (the data stream depends on the seed alone); the
    model (its layer rows) must end in one output per class."""
    return run_dataset(spec, rows, seeds.data, normalization, progress)


class _Fed(plan.Runner):
    """Runs the layers above a cached frozen prefix, fed the prefix's stored outputs: each batch is first laid out
    in memory as the prefix gave it (a convolution's outputs are batch-innermost views), so that every product
    runs on the same layout, and rounds the same way, as in the whole model."""

    order: list[int] | None = None

    def forward(self, x: np.ndarray, training: bool = True, clock: np.ndarray | None = None) -> np.ndarray:
        if self.order is not None and _memory_order(x) != self.order:
            laid = np.empty([x.shape[i] for i in self.order], x.dtype)
            laid[...] = x.transpose(self.order)
            x = laid.transpose(np.argsort(self.order))
        return super().forward(x, training, clock)


def _memory_order(x: np.ndarray) -> list[int]:
    """x's axes from the largest stride to the smallest (a C-order array: 0, 1, ...)."""
    return sorted(range(x.ndim), key=lambda i: (-x.strides[i], i))


def _top_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else None


def _renumbered(name: str, by: int) -> str:
    parts = name.split(".")
    return ".".join([parts[0], str(int(parts[1]) + by), *parts[2:]])


class NumericWarnings:
    """numpy's floating-point RuntimeWarnings (overflow, invalid value, division by zero) while a run trains, from
    every thread: counted, never printed raw. A run that then diverges names them in its error, as the first
    sign of where the numbers left float32's range."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> NumericWarnings:
        self._saved = warnings.catch_warnings()
        self._saved.__enter__()
        warnings.simplefilter("always", RuntimeWarning)
        shown = warnings.showwarning

        def count(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, RuntimeWarning):
                self.counts[f"{message} ({Path(filename).name}:{lineno})"] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = count
        return self

    def __exit__(self, *exc) -> None:
        self._saved.__exit__(*exc)

    def explain(self, error: CnnctlError) -> None:
        """Add what numpy warned of to a divergence's message."""
        if self.counts:
            seen = "; ".join(f"{what} x{n}" for what, n in self.counts.most_common(3))
            error.message = f"{error.message}; before it numpy warned of: {seen}"
            error.args = (error.message,)


def check_finite(what: str, value: float, when: str, lr: float) -> None:
    """A metric that is NaN or infinite ends the run with a TrainingError before anything records it."""
    if not math.isfinite(value):
        raise TrainingError(f"the {what} became {value} {when}; training stopped, the checkpoints already written "
                            "are untouched",
                            f"lower optimizer.lr (now {lr:g}), or look for extreme values in the data "
                            "(cnnctl data CONFIG shows each split)")


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

    def _cache_frozen(self) -> None:
        """train.cache_frozen: run the frozen prefix (the top-level layers below the first that trains) once over
        every split, and from here on train and evaluate the rest on those outputs. Nothing random may happen
        before the first trainable layer (no input augmentation, checked with the config; no dropout in the
        prefix), so the numbers are those of the full model, to the rounding of the batches' sums."""
        layers, where = self.model.layers, "train.cache_frozen"
        first = next((i for i, layer in enumerate(layers) if layer.has_trainable()), len(layers))
        if first == 0:
            raise ConfigError(f"{where}: model.layers[0] trains, so there is no frozen prefix to compute once",
                              "freeze the pretrained layers (trainable: false), or leave cache_frozen out")
        if first == len(layers):
            raise ConfigError(f"{where}: every layer is frozen; nothing would train",
                              "leave the last layers trainable")
        random = [name for name, layer in Model(layers[:first]).named_layers()
                  if isinstance(layer, (nn.Dropout, nn.Dropout2D))]
        if random:
            raise ConfigError(f"{where}: model.{random[0]} (dropout) lies in the frozen prefix and draws a new mask "
                              "every step, so its output cannot be computed once", "move the dropout after the "
                              "first trainable layer, or leave cache_frozen out")
        recorded = self.runner.algorithms

        def renumbered(shift: int) -> dict[str, str]:
            return {_renumbered(k, -shift): v for k, v in recorded.items()
                    if _top_index(k) is not None and (shift == 0) == (_top_index(k) < first)}

        prefix = plan.Runner(Model(layers[:first]), renumbered(0))
        self.net = _Fed(Model(layers[first:]), renumbered(first), context=self.runner.context)
        shape = prefix.model.output_shape(tuple(self.spec.model.input_shape))
        n = len(self.ds.train) + len(self.ds.val) + len(self.ds.test)
        refuse_over(f"{where}: the outputs of model.layers[:{first}] for {n:,} images", 4 * n * math.prod(shape), 2,
                    ConfigError, "leave cache_frozen out, or cache a deeper prefix (smaller outputs)")
        ebs = self.spec.data.evaluation_batch

        def outputs(split: data.Split) -> data.Split:
            x = np.empty((len(split), *shape), np.float32)
            for i, (xb, _) in enumerate(data.batches(self.ds, split, ebs)):
                y = prefix.forward(xb, training=False)
                x[i * ebs : i * ebs + len(xb)] = y
                if self.net.order is None and len(xb) > 1:  # the layout the layer above saw: products round alike
                    self.net.order = _memory_order(y)
            return data.Split(x, split.y)

        with self.evaluated():
            splits = [outputs(s) for s in (self.ds.train, self.ds.val, self.ds.test)]
        zero, one = np.zeros(shape[0], np.float32), np.ones(shape[0], np.float32)
        self.feed = data.Dataset(self.ds.name, self.ds.classes, *splits, zero, one)

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

    def _save(self, name: str) -> None:
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

    def restore(self, ckpt: checkpoint.Checkpoint, path) -> None:
        """Continue from a checkpoint: weights (and their average), optimizer, schedule, counters, generators,
        position."""
        restore_weights(self.model, ckpt.model_state, path)  # the weights, or their average with train.ema_decay
        if self.average:  # the average goes on from model_state (from the weights, if the run had none)
            self.average.reset()
        if ckpt.training_state:  # model_state was an average: training goes on from the weights beside it
            restore_weights(self.model, ckpt.training_state, path)
        t = ckpt.run
        if t is None:
            raise CheckpointError(f"{path}: holds no training state (written by an older cnnctl)")
        try:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
            # the checkpoint's own step count says whether there must be state (its `steps` entry may be gone too)
            missing = self.optimizer.missing_state() if ckpt.step > 0 else []
            if missing:
                raise CheckpointError(f"{path}: the optimizer state of {len(missing)} parameter(s) is missing "
                                      f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); resuming "
                                      "would silently restart their moments, so the run would not be exact",
                                      "resume from an intact checkpoint, or start the run again")
            for key in ("classes", "history", "stopper", "schedule", "seeds", "wall_seconds"):
                if getattr(t, key) is None:  # the types were checked on load; these cannot be absent
                    raise KeyError(key)
            if t.best is not None and not isinstance(t.best.get(self.monitor), (int, float)):
                raise ValueError(f"the best epoch's row has no '{self.monitor}' (the monitored metric)")
            if t.partial is not None and not 0 <= t.partial.position <= self.steps_per_epoch:
                raise ValueError(f"partial.position {t.partial.position} is outside the epoch's "
                                 f"{self.steps_per_epoch} batches")
            self.schedule.load_state_dict(t.schedule)
            self.seeds.restore(t.seeds)
            shape, batch = self.spec.model.input_shape, self.spec.data.batch_size // self.world.size
            algorithms = self.runner.fix_algorithms(shape, batch, recorded=t.algorithms or {})  # older: shape rule
            self.state = t.model_copy(update={"classes": self.ds.classes, "algorithms": algorithms})
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{path}: damaged training state ({type(e).__name__}: {e})",
                                  "resume from another checkpoint, or start the run again") from None

    # ------------------------------------------------------------ loop

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

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        bs, every = self.spec.data.batch_size, self.spec.train.checkpoint_every_steps
        if self.state.partial:  # continue an interrupted epoch where it stopped
            p = self.state.partial
            self.seeds.shuffle.bit_generator.state = copy.deepcopy(p.shuffle_state)
            start, total_loss, correct, seen = p.position, p.loss_sum, p.correct, p.seen
        else:
            start, total_loss, correct, seen = 0, 0.0, 0, 0
        shuffle_state = copy.deepcopy(self.seeds.shuffle.bit_generator.state)
        order = data.epoch_order(self.feed.train, self.spec.data.sampler, self.seeds.shuffle)
        self.cb.on_epoch_start(epoch, self.spec.train.epochs, self.steps_per_epoch, start)
        aug = self.spec.data.augment if self.spec.data.augment.active else None
        flips = data.augment.alternating_flips(len(self.ds.train), self.spec.seed, epoch) \
            if aug is not None and aug.horizontal_flip == "alternating" else None
        batches = data.batches(self.feed, self.feed.train, bs, order, start, aug, self.seeds.augment, flips)
        counted = {}  # the step's correct answers and whether any rank was asked to stop (one reduction)

        def reduce(loss, out, y):
            correct_now = int((out.argmax(axis=1) == y).sum())
            share, stop = 1.0, self.stop_signal is not None
            if self.world.size > 1:  # the global batch's loss and accuracy, and whether any rank was signalled
                loss, share, correct_now, stop = self._reduce_step(loss, correct_now)
            counted.update(correct=correct_now, stop=stop)
            return loss, share

        step = TrainingStep(self.net, self.loss_fn, self.optimizer, self.world, self.spec.train.grad_clip_norm,
                            self.average, reduce)
        for b, (x, y) in enumerate(batches, start=start):
            t0 = time.perf_counter()
            self.optimizer.lr = self.schedule.lr(epoch - 1, self.state.step)
            n = len(y)
            if self.world.size > 1:  # this rank's share of the global batch
                x, y = distributed.take_share(self.world, x, y, self.runner.context)

            def diverged(loss, b=b):
                raise TrainingError(
                    f"the loss became {loss} at epoch {epoch}, step {self.state.step + 1} (batch {b + 1}/"
                    f"{self.steps_per_epoch}); training stopped, the checkpoints already written are untouched",
                    f"lower optimizer.lr (now {self.optimizer.lr:g}), add schedule.warmup_epochs or "
                    f"train.grad_clip_norm, keep data.normalize: auto, or add batchnorm layers",
                )

            loss, _ = step(x, y, on_nonfinite=diverged, step_number=self.state.step + 1)
            correct_now, stop = counted["correct"], counted["stop"]
            if self.world.size == 1:  # a signal during this step stops after it
                stop = self.stop_signal is not None
            self.state.step += 1
            self.cb.on_step(self.state.step, self.optimizer.lr, loss)
            total_loss += loss * n
            correct += correct_now
            seen += n
            self.cb.on_batch_end(b + 1, total_loss / seen, correct / seen, n / (time.perf_counter() - t0))
            if stop or (every and self.state.step % every == 0):
                self.state.partial = Partial(position=b + 1, shuffle_state=shuffle_state, loss_sum=total_loss,
                                             correct=correct, seen=seen)
                self._save("last")
                if stop:
                    raise Interrupted(self.stop_signal or signal.SIGINT, self.run_dir, epoch, self.state.step)
        self.state.partial = None
        return total_loss / seen, correct / seen

    def _reduce_step(self, loss: float, correct: int) -> tuple[float, float, int, bool]:
        """One small reduction per step over the ranks: the global batch's loss, this share's part of its
        normaliser (the factor for this share's loss gradient), the correct count, and whether any rank was
        asked to stop (so that all stop after the same step)."""
        loss, share, (correct, interrupts, terms) = distributed.reduce_loss(
            self.world, loss, self.loss_fn.normalizer, correct, self.stop_signal == signal.SIGINT,
            self.stop_signal == signal.SIGTERM)
        if self.stop_signal is None and (interrupts or terms):
            self.stop_signal = signal.SIGTERM if terms else signal.SIGINT
        return loss, share, int(correct), bool(interrupts or terms)

    def _synchronise(self) -> None:
        """After an epoch, every rank takes rank 0's weights, buffers and optimizer state (one broadcast): they
        are equal already when the reductions give every rank the same sums; with train.sync_batchnorm false
        this makes the running statistics rank 0's on every rank."""
        if self.world.size == 1:
            return
        state = {name: np.array(value) for name, value in self.model.state_dict().items()}
        # by name, never by the order a dict was filled in (a checkpoint's tensors come back in another order on
        # each rank): the broadcast copies arrays by position
        optim = self.optimizer.state
        arrays = [*state.values(), *(optim[name][k] for name in sorted(optim) for k in sorted(optim[name]))]
        if self.average:
            arrays += [self.average.average[name] for name in sorted(self.average.average)]
        distributed.broadcast_state(self.world, arrays)
        self.model.load_state_dict(state)

    def _end_of_epoch(self, row: dict) -> bool:
        """Checkpoints, schedule and early stopping after an epoch; True when training should stop."""
        t = self.spec.train
        value = row[self.monitor]  # None after an epoch without validation (train.validate_every)
        best = self.state.best
        if value is not None and (best is None or improved(value, best[self.monitor], self.monitor_mode)):
            self.state.best = dict(row)
            self._save("best")
        if t.checkpoint_every and self.state.epoch % t.checkpoint_every == 0:
            self._save(f"epoch-{self.state.epoch:04d}")
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
        self._save("last")
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
            self._cache_frozen()
        self.fitting = True  # from here a failure leaves the run directory and its records in place
        self.environment = environment()
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
        train_loss, train_acc = self._train_epoch(epoch)
        self._synchronise()
        row = {"epoch": epoch, "step": self.state.step, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": None, "val_acc": None, "lr": self.optimizer.lr}
        if len(self.ds.val) and (epoch % spec.train.validate_every == 0 or epoch == spec.train.epochs):
            val = self._evaluate(self.feed.val)
            row.update(val_loss=val["loss"], val_acc=val["accuracy"])
        row["seconds"] = round(time.perf_counter() - t0, 3)
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
                            self.num_classes, self.spec.data.test_time_augment, self.world)

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


def _make_trainer(world: distributed.World, make) -> Trainer:
    """Rank 0 builds its trainer first (downloading the data if the config asks for it), then the other ranks; all
    are built (every check passed on every rank) before rank 0 makes the run directory."""
    trainer = make() if world.root else None
    world.any(False)  # every rank waits here for rank 0
    trainer = trainer or make()
    world.any(False)
    return trainer


@contextlib.contextmanager
def session(config: Path | Spec | None, overrides: list[str], runs_dir: Path, resume: Path | None, force: bool,
            callback: Callback, world: distributed.World):
    """Everything before fit, as a context yielding (trainer, run_dir): rank 0 reads the config (or the run to
    resume, which it locks) and sends the others the spec (and checkpoint); every rank builds its trainer, so every
    check runs on every rank before rank 0 makes the run directory. A new run that fails before its first
    checkpoint leaves no directory behind."""
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
                trainer = _make_trainer(world, lambda: Trainer(spec, callback, normalization=ckpt.normalization,
                                                               resuming=True, world=world))
                trainer.restore(ckpt, last)
                run_dir = resume
            else:  # a config file, or a Spec already made (cnnctl.train with a dict or a Spec)
                spec = (config if isinstance(config, Spec) else load_config(config, overrides)[0]) if world.root \
                    else None
                spec = _shared_spec(world, spec)
                trainer = _make_trainer(world, lambda: Trainer(spec, callback, world=world))  # every check first
                if world.root:
                    run_dir = runs.create_run_dir(runs_dir, spec.name)
                    held.enter_context(runs.locked(run_dir))
                run_dir = Path(world.broadcast_bytes(str(run_dir).encode() if world.root else None).decode())
            yield trainer, run_dir
    except BaseException:  # a new run that never began training leaves nothing behind; one that did keeps its records
        if (world.root and resume is None and run_dir is not None and not trainer.fitting
                and not (run_dir / "checkpoints" / "last.safetensors").exists()):
            runs.remove_run(run_dir)
        raise
