"""Experiment loggers, built on the training engine's callbacks: metrics.csv / metrics.jsonl stay the
always-on record; these copy the same numbers where other tools look for them.

tensorboard (the optional extra `cnnctl[tensorboard]`): event files in RUN/tensorboard/ with every epoch
metric, the learning rate and loss per optimizer step, and at the end the resolved config as hyperparameters
with the final metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CnnctlError
from .train import Callback


class Callbacks(Callback):
    """Several callbacks as one: every hook goes to each, in order; training stops if any asks."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def _each(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_train_start(self, info):
        self._each("on_train_start", info)

    def on_epoch_start(self, epoch, epochs, n_batches, start):
        self._each("on_epoch_start", epoch, epochs, n_batches, start)

    def on_batch_end(self, batch, loss, acc, images_per_second):
        self._each("on_batch_end", batch, loss, acc, images_per_second)

    def on_step(self, step, lr, loss):
        self._each("on_step", step, lr, loss)

    def on_epoch_end(self, row):
        self._each("on_epoch_end", row)

    def on_download(self, name, done, total):
        self._each("on_download", name, done, total)

    def on_train_end(self, summary):
        self._each("on_train_end", summary)

    def should_stop(self, row: dict) -> bool:
        return any(cb.should_stop(row) for cb in self.callbacks)


def flatten(config: dict, prefix: str = "") -> dict:
    """{"optimizer.lr": 0.01, "model.layers": "[...]", ...}: numbers, strings and booleans as they are, the
    rest as JSON text (what hyperparameter tables take)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class TensorBoardLogger(Callback):
    def __init__(self, run_dir: Path, config: dict):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise CnnctlError("train.loggers: tensorboard needs the tensorboard extra, which is not installed",
                              "pip install 'cnnctl[tensorboard]'") from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.config = config

    def on_step(self, step: int, lr: float, loss: float) -> None:
        self.writer.add_scalar("lr", lr, step)
        self.writer.add_scalar("train_loss_step", loss, step)

    def on_epoch_end(self, row: dict) -> None:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            if row.get(key) is not None:
                self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.flush()

    def on_train_end(self, summary: dict) -> None:
        final = {f"final/{k}": v for k, v in (summary.get("final") or {}).items()
                 if isinstance(v, (int, float)) and k not in ("epoch", "step", "seconds")}
        if summary.get("test"):
            final["final/test_acc"] = summary["test"]["accuracy"]
        self.writer.add_hparams(flatten(self.config), final, name="hparams")
        self.writer.close()


LOGGERS = {"tensorboard": TensorBoardLogger}


def make_loggers(names: list[str], run_dir: Path, config: dict) -> list[Callback]:
    return [LOGGERS[name](run_dir, config) for name in dict.fromkeys(names)]
