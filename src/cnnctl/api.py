"""The Python API, for scripts and notebooks: `train` a config, `load` a trained model to predict, `evaluate` it.
The CLI's train, predict and eval verbs call these same functions and only format what they return.

    import cnnctl
    run = cnnctl.train("configs/quickstart.yaml", overrides=["train.epochs=3"])
    model = cnnctl.load(run.dir)
    probabilities = model.predict(images)            # (N, C, H, W) floats in [0, 1], or picture files
    report = cnnctl.evaluate(run.dir, split="test")
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from cnnctl.run.weights import checkpoint_file

from .errors import CnnctlError, DataError
from .run import checkpoint, distributed, loading, runs
from .tools import predict as predict_lib


class Run:
    """A run directory: what `train` returns (and what any finished run directory can be read as)."""

    def __init__(self, run_dir: str | Path, result: dict | None = None):
        self.dir = Path(run_dir)
        self.result = result  # what training returned: best epoch, monitor, wall time, PFLOPs, test (if any)

    @property
    def summary(self) -> dict:
        """summary.json: status, epochs, best and final epochs, test accuracy, plan, init_from, ..."""
        return runs.read_json(self.dir / "summary.json") or {}

    @property
    def history(self) -> list[dict]:
        """One row per epoch (metrics.jsonl): epoch, step, train/val loss and accuracy, learning rate, seconds."""
        return runs.read_history(self.dir)

    @property
    def best_checkpoint(self) -> Path:
        """checkpoints/best.safetensors (else last.safetensors)."""
        return checkpoint_file(self.dir)[0]

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, status={self.summary.get('status')!r})"


def _path(value, what: str) -> Path:
    """A path argument: a str or os.PathLike, else a CnnctlError naming the argument."""
    import os

    if isinstance(value, (str, os.PathLike)) and str(value):
        return Path(value)
    raise CnnctlError(f"{what} must be a path (a str or pathlib.Path), got {type(value).__name__} {value!r:.60}",
                      f"pass {what} as a file or folder name")


def _overrides(overrides) -> list[str]:
    """--set style overrides: a list of "KEY=VALUE" strings, one such string, or a dict {"train.epochs": 2}."""
    import json

    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, dict):  # values as YAML reads them back: JSON is YAML
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(overrides, (list, tuple)) and all(isinstance(o, str) for o in overrides):
        return list(overrides)
    raise CnnctlError(f"overrides must be a list of \"KEY=VALUE\" strings or a dict, got {type(overrides).__name__}",
                      'e.g. overrides=["train.epochs=2"] or overrides={"train.epochs": 2}')


def _spec(config, overrides: list[str]):
    """A Spec from a config file's path, a dict (the YAML as Python) or a Spec, with --set style overrides."""
    from cnnctl.config.reading import absolute_data_paths, apply_overrides, load_config, spec_to_dict, validate
    from cnnctl.config.spec import Spec

    if isinstance(config, Spec):
        return validate(apply_overrides(spec_to_dict(config), overrides), "the Spec given", overrides=overrides)
    if isinstance(config, dict):  # relative data paths are the working directory's
        return validate(absolute_data_paths(apply_overrides(config, overrides), Path.cwd()), "the config dict",
                        overrides=overrides)
    if isinstance(config, (str, Path)):
        return load_config(Path(config), overrides)[0]
    raise CnnctlError(f"config must be a path, a dict or a Spec, got {type(config).__name__}")


def _live():
    """Progress bars in a terminal or a Jupyter notebook, plain lines elsewhere."""
    from cnnctl.run.console import live

    return live()


def train(config: Any = None, overrides: list[str] | None = None, runs_dir: str | Path = "runs", quiet: bool = True,
          resume: str | Path | None = None, *, force: bool = False, callback=None, stop=None) -> Run:
    """Train a config (a path, a dict or a Spec; `overrides` as --set takes them, "optimizer.lr=0.01") into a new
    run directory under `runs_dir`, or continue the run directory `resume`. Progress is shown unless `quiet`;
    `callback` (a cnnctl.train.Callback) replaces it. Under mpiexec every rank calls this; rank 0 writes the run.
    Errors are CnnctlError with a message and a fix."""
    from cnnctl.run.callbacks import Callback
    from cnnctl.run.session import session

    if (config is None) == (resume is None):
        raise CnnctlError("give a config to start a run, or resume=RUN_DIR to continue one (not both)")
    world = distributed.world()
    overrides = _overrides(overrides)
    if config is not None and world.root:
        config = _spec(config, overrides)  # every form of config becomes a Spec here (rank 0 reads files)
        overrides = []
    cb = callback if callback is not None else Callback() if quiet or not world.root else _live()
    try:
        with session(config, overrides, Path(runs_dir), None if resume is None else Path(resume), force, cb,
                     world) as (trainer, run_dir):
            with stop(trainer) if stop is not None else contextlib.nullcontext():
                result = trainer.fit(run_dir, resumed=resume is not None)
    finally:
        if hasattr(cb, "close"):
            cb.close()
    return Run(run_dir, result)


class Predictor:
    """A trained model ready to predict: `load(CHECKPOINT or RUN_DIR)`."""

    def __init__(self, path: str | Path):
        self.checkpoint_path = checkpoint_file(_path(path, "path"))[0]
        ckpt = checkpoint.load(self.checkpoint_path)
        self.spec, self.model, rows = loading.load_model(ckpt, self.checkpoint_path)
        self.normalization = ckpt.normalization
        outputs = rows[-1].output_shape
        self.classes: list[str] = predict_lib.class_names(self.spec, outputs[0] if len(outputs) == 1 else 0, ckpt)
        self._rows = rows

    def predict(self, images) -> np.ndarray:
        """Class probabilities (N, classes) for an (N, C, H, W) array of pixels in [0, 1] (uint8 0..255 taken as
        pixels too), or for a list of picture files (decoded and resized as the folder dataset does)."""
        import os

        from cnnctl.config.build import check_evaluation_memory

        shape = tuple(self.spec.model.input_shape)
        fix = "give an (N, C, H, W) array of pixels in [0, 1], or a list of picture files"
        if isinstance(images, (str, os.PathLike)):
            images = [images]  # one picture file
        if isinstance(images, np.ndarray):
            if images.dtype.kind not in "fiub":
                raise DataError(f"images of dtype {images.dtype}: pixels are numbers", fix)
            if images.ndim != 4 or images.shape[1:] != shape:
                raise DataError(f"images of shape {images.shape}: the model takes (N, {', '.join(map(str, shape))})",
                                fix)
            if not len(images):
                raise DataError("no images given (an array of 0 images)", fix)
            x01 = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
            if not np.isfinite(x01).all():
                raise DataError("images hold NaN or infinite values", fix)
        elif isinstance(images, (list, tuple)):
            if not images:
                raise DataError("no images given (an empty list)", fix)
            _, x01 = predict_lib.load_inputs([_path(p, "each picture") for p in images], shape,
                                             self.spec.data.resize)
        else:
            raise DataError(f"images must be an array or a list of picture files, got {type(images).__name__}", fix)
        check_evaluation_memory(self.spec.name, self._rows, min(self.spec.data.evaluation_batch, max(len(x01), 1)))
        logits = predict_lib.outputs(self.model, x01, self.normalization, self.spec.data.test_time_augment,
                                     self.spec.data.evaluation_batch)
        return predict_lib.probabilities(self.spec, logits)

    def __repr__(self) -> str:
        return f"Predictor({str(self.checkpoint_path)!r}, classes={self.classes})"


def load(path: str | Path) -> Predictor:
    """A checkpoint or a run directory (its best checkpoint) as a Predictor."""
    return Predictor(path)


def evaluate(path: str | Path, split: str | None = "test", overrides: list[str] | None = None) -> dict:
    """Loss, accuracy, per-class precision, recall, F1 and support, and the confusion matrix (rows: true class)
    of a checkpoint or run directory on a split of its data: test, val or train (None: test, or val for data
    without a test split). `overrides` apply to the checkpoint's config (--set). A run's own checkpoint
    evaluated on the test split as trained (no overrides) is recorded in its summary.json (`recorded_in`; with
    `recorded_as` "test" when it became the run's test result, "evaluations" when the run has its own)."""
    from cnnctl.run.evaluation import evaluate_checkpoint

    path, overrides = _path(path, "path"), _overrides(overrides)
    res = evaluate_checkpoint(path, split, overrides)
    recorded = runs.record_test(Path(res["checkpoint"]), res) if res["split"] == "test" and not overrides else None
    return {**res, "recorded_in": None if recorded is None else str(recorded[0] / "summary.json"),
            "recorded_as": None if recorded is None else "test" if recorded[1] else "evaluations"}
