"""The training engine: spec in, run directory out. Reports progress through a callback; draws nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint, data, runs
from .builder import build_loss, build_model, check_outputs
from .config import Spec, spec_to_dict, validate
from .errors import CheckpointError, TrainingError
from .nn import Loss, Sequential


class Callback:
    """Progress hooks; the CLI subclasses this to draw bars. Every hook is optional."""

    def on_train_start(self, info: dict) -> None: ...

    def on_epoch_start(self, epoch: int, epochs: int, n_batches: int) -> None: ...

    def on_batch_end(self, batch: int, loss: float, acc: float, images_per_second: float) -> None: ...

    def on_epoch_end(self, row: dict) -> None: ...


@dataclass
class Seeds:
    """Independent streams from one seed: weights (and dropout), data generation/splits, shuffling."""

    init: np.random.Generator
    data: np.random.Generator
    shuffle: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int) -> Seeds:
        return cls(*np.random.default_rng(seed).spawn(3))


def evaluate(model: Sequential, loss_fn: Loss, ds: data.Dataset, split: data.Split, batch_size: int,
             num_classes: int) -> dict:
    """Mean loss, accuracy and the confusion matrix (rows: true class, columns: predicted) of one split."""
    total_loss, confusion = 0.0, np.zeros((num_classes, num_classes), np.int64)
    for x, y in data.batches(ds, split, batch_size):
        out = model.forward(x, training=False)
        total_loss += loss_fn.forward(out, y) * len(y)
        np.add.at(confusion, (y, out.argmax(axis=1)), 1)
    n = len(split)
    return {"loss": total_loss / max(n, 1), "accuracy": float(np.trace(confusion) / max(n, 1)), "n": n,
            "confusion_matrix": confusion}


def load_data(spec: Spec, seeds: Seeds, normalization: dict | None = None) -> data.Dataset:
    """The dataset with the run's own validation split (the data stream depends on the seed alone)."""
    norm = (normalization["mean"], normalization["std"]) if normalization else None
    return data.load_dataset(spec.data, spec.model.input_shape, seeds.data, norm)


def load_model(ckpt: checkpoint.Checkpoint, path) -> tuple[Spec, Sequential, list]:
    """Rebuild the model a checkpoint describes and load its weights; refuse another architecture."""
    spec = validate(ckpt.config, f"{path} (embedded config)")
    model, rows = build_model(spec.model)
    try:
        model.load_state_dict(ckpt.model_state)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit the architecture in its config: {e}",
                              "the file was edited or belongs to another model") from None
    return spec, model, rows


class Trainer:
    """Builds everything a spec needs (all shape and data checks happen here), then `fit(run_dir)` trains."""

    def __init__(self, spec: Spec, callback: Callback | None = None):
        self.spec, self.cb = spec, callback or Callback()
        self.seeds = Seeds.from_seed(spec.seed)
        self.model, self.rows = build_model(spec.model, self.seeds.init)
        check_outputs(spec, self.rows, len(data.dataset_info(spec.data)[0]))
        self.loss_fn = build_loss(spec)
        self.ds = load_data(spec, self.seeds)
        self.optimizer = spec.optimizer.build(self.model)
        self.num_classes = len(self.ds.classes)
        self.step = 0
        self.history: list[dict] = []
        self.best: dict | None = None

    @property
    def monitor(self) -> str:
        return "val_acc" if len(self.ds.val) else "train_acc"

    def _checkpoint(self, name: str, epoch: int, metrics: dict) -> None:
        checkpoint.save(self.run_dir / "checkpoints" / f"{name}.safetensors", checkpoint.Checkpoint(
            config=spec_to_dict(self.spec), model_state=self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(), epoch=epoch, step=self.step, metrics=metrics,
            normalization={"mean": self.ds.mean.tolist(), "std": self.ds.std.tolist()},
        ))

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        bs = self.spec.data.batch_size
        order = self.seeds.shuffle.permutation(len(self.ds.train))
        n_batches = -(-len(order) // bs)
        self.cb.on_epoch_start(epoch, self.spec.train.epochs, n_batches)
        total_loss, correct, seen = 0.0, 0, 0
        for b, (x, y) in enumerate(data.batches(self.ds, self.ds.train, bs, order)):
            t0 = time.perf_counter()
            out = self.model.forward(x, training=True)
            loss = self.loss_fn.forward(out, y)
            if not np.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss} at epoch {epoch}, step {self.step + 1} (batch {b + 1}/{n_batches}); "
                    f"training stopped, checkpoints from earlier epochs are untouched",
                    f"lower optimizer.lr (now {self.optimizer.lr:g}), keep data.normalize: auto, or add batchnorm",
                )
            self.model.backward(self.loss_fn.backward())
            self.optimizer.step()
            self.step += 1
            total_loss += loss * len(y)
            correct += int((out.argmax(axis=1) == y).sum())
            seen += len(y)
            self.cb.on_batch_end(b + 1, total_loss / seen, correct / seen, len(y) / (time.perf_counter() - t0))
        return total_loss / seen, correct / seen

    def fit(self, run_dir: Path) -> dict:
        spec, bs = self.spec, self.spec.data.batch_size
        self.run_dir = Path(run_dir)
        runs.write_yaml(self.run_dir / "config.yaml", spec_to_dict(spec))
        self.cb.on_train_start({"run_dir": str(self.run_dir), "params": self.model.num_params(),
                                "train": len(self.ds.train), "val": len(self.ds.val), "test": len(self.ds.test),
                                "image_shape": self.ds.image_shape, "classes": self.ds.classes})
        started = time.time()
        for epoch in range(1, spec.train.epochs + 1):
            t0 = time.perf_counter()
            train_loss, train_acc = self._train_epoch(epoch)
            row = {"epoch": epoch, "step": self.step, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": None, "val_acc": None, "lr": self.optimizer.lr}
            if len(self.ds.val):
                val = evaluate(self.model, self.loss_fn, self.ds, self.ds.val, bs, self.num_classes)
                row.update(val_loss=val["loss"], val_acc=val["accuracy"])
            row["seconds"] = round(time.perf_counter() - t0, 3)
            runs.append_metrics(self.run_dir, row)
            self.history.append(row)
            if self.best is None or row[self.monitor] > self.best[self.monitor]:
                self.best = dict(row)
                self._checkpoint("best", epoch, row)
            self._checkpoint("last", epoch, row)
            self.cb.on_epoch_end(row)
        summary = {
            "name": spec.name, "status": "finished", "epochs": spec.train.epochs, "steps": self.step,
            "params": self.model.num_params(), "wall_seconds": round(time.time() - started, 3),
            "monitor": self.monitor, "final": self.history[-1], "best": self.best,
            "dataset": {"name": self.ds.name, "train": len(self.ds.train), "val": len(self.ds.val),
                        "test": len(self.ds.test), "classes": self.ds.classes},
        }
        if spec.train.test_at_end:
            test = evaluate(self.model, self.loss_fn, self.ds, self.ds.test, bs, self.num_classes)
            summary["test"] = {"loss": test["loss"], "accuracy": test["accuracy"], "n": test["n"]}
        runs.write_json(self.run_dir / "summary.json", summary)
        return summary
