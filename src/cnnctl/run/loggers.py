"""Experiment loggers, built on the training engine's callbacks: metrics.csv / metrics.jsonl stay the
always-on record; these copy the same numbers where other tools look for them.

tensorboard (the optional extra `cnnctl[tensorboard]`): event files in RUN/tensorboard/ with every epoch
metric, the learning rate and loss per optimizer step, and at the end the resolved config as hyperparameters
with the final metrics.

mlflow (the optional extra `cnnctl[mlflow]`): see MLflowLogger.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cnnctl.errors import CnnctlError
from cnnctl.extras import require

from .callbacks import Callback


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


def final_metrics(summary: dict) -> dict:
    """The last epoch's numeric metrics (train_loss, val_acc, lr, ...) and, after a test, test_acc."""
    final = {k: v for k, v in (summary.get("final") or {}).items()
             if isinstance(v, (int, float)) and k not in ("epoch", "step", "seconds")}
    if summary.get("test"):
        final["test_acc"] = summary["test"]["accuracy"]
    return final


class TensorBoardLogger(Callback):
    def __init__(self, run_dir: Path, config: dict):
        SummaryWriter = require("tensorboardX", "tensorboard", "train.loggers: tensorboard needs the tensorboard "
                                "extra, which is not installed").SummaryWriter
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
        final = {f"final/{k}": v for k, v in final_metrics(summary).items()}
        self.writer.add_hparams(flatten(self.config), final, name="hparams")
        self.writer.close()


class MLflowLogger(Callback):
    """One MLflow run per cnnctl run (experiment: the config's name, run name: the run directory's): the
    flattened config as params, every epoch metric, and at the end the final metrics with the best checkpoint
    and summary.json as artifacts. MLFLOW_TRACKING_URI is honoured; without it, a SQLite store beside the
    run directories (RUNS_DIR/mlflow.db)."""

    MAX_PARAM = 500  # characters of a param value (MLflow refuses longer ones)

    def __init__(self, run_dir: Path, config: dict):
        mlflow = require("mlflow", "mlflow", "train.loggers: mlflow needs the mlflow extra, which is not installed")
        self.mlflow, self.run_dir = mlflow, Path(run_dir)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines would interleave with progress
        try:
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri(f"sqlite:///{(self.run_dir.parent / 'mlflow.db').resolve()}")
            mlflow.set_experiment(str(config.get("name", "cnnctl")))
            self.run = mlflow.start_run(run_name=self.run_dir.name)
            params = {k: str(v)[: self.MAX_PARAM] for k, v in flatten(config).items()}
            mlflow.log_params(params)
        except Exception as e:  # MLflow's own errors: an unreachable server, a bad URI
            raise CnnctlError(f"train.loggers: mlflow could not start a run ({type(e).__name__}: {e})",
                              "check MLFLOW_TRACKING_URI, or leave mlflow out of train.loggers") from None

    def on_epoch_end(self, row: dict) -> None:
        metrics = {k: v for k, v in row.items() if k not in ("epoch", "step") and isinstance(v, (int, float))}
        self.mlflow.log_metrics(metrics, step=row["epoch"])

    def on_train_end(self, summary: dict) -> None:
        final = {k if k == "test_acc" else f"final_{k}": v for k, v in final_metrics(summary).items()}
        self.mlflow.log_metrics(final)
        for path in (self.run_dir / "checkpoints" / "best.safetensors", self.run_dir / "summary.json"):
            if path.is_file():
                self.mlflow.log_artifact(str(path))
        self.mlflow.end_run()


LOGGERS = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}


def make_loggers(names: list[str], run_dir: Path, config: dict) -> list[Callback]:
    return [LOGGERS[name](run_dir, config) for name in dict.fromkeys(names)]
