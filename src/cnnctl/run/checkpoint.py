"""Checkpoints: safetensors files holding every parameter, buffer and optimizer state array (and, when the model's
weights are a moving average, the weights training updates), with the resolved config, epoch, step, metrics and
normalisation as JSON in the header metadata.

Loading parses the safetensors header and raw tensor bytes only; nothing in the file is ever executed.
Writes are atomic: a temporary file in the same folder, fsync, then rename over the real name.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, AllowInfNan, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from cnnctl.core.convolution import ALGORITHMS
from cnnctl.core.fileio import atomic_write_bytes, json_text
from cnnctl.core.memory import refuse_over
from cnnctl.errors import CheckpointError
from cnnctl.strict import NonNegInt, Strict

FORMAT = "cnnctl-checkpoint"
FORMAT_VERSION = 1
OPTIM_PREFIX = "optimizer."
TRAINING_PREFIX = "training."  # the weights the optimizer updates, when model_state is their average (ema_decay)


def model_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's own parameters and buffers among a checkpoint file's tensors (no optimizer state, no weights
    kept beside an average)."""
    return {k: v for k, v in tensors.items() if not k.startswith((OPTIM_PREFIX, TRAINING_PREFIX))}


def _under(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The tensors whose names start with `prefix`, named without it (the inverse of how save names them)."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class Checkpoint:
    config: dict
    model_state: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    metrics: dict = field(default_factory=dict)
    normalization: dict = field(default_factory=dict)  # {"mean": [...], "std": [...]}
    run: RunState | None = None  # where the run stands (None in a file written without it)
    environment: dict = field(default_factory=dict)  # versions, BLAS, threads, platform, command (informative)
    training_state: dict[str, np.ndarray] = field(default_factory=dict)  # with train.ema_decay: the raw weights


def save(path: str | Path, ckpt: Checkpoint) -> None:
    tensors = {k: np.ascontiguousarray(v) for k, v in ckpt.model_state.items()}
    tensors.update({OPTIM_PREFIX + k: np.ascontiguousarray(v) for k, v in ckpt.optimizer_state.items()})
    tensors.update({TRAINING_PREFIX + k: np.ascontiguousarray(v) for k, v in ckpt.training_state.items()})
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json_text(ckpt.config),
        "epoch": str(ckpt.epoch),
        "step": str(ckpt.step),
        "metrics": json_text(ckpt.metrics),
        "normalization": json_text(ckpt.normalization),
        "trainer": ckpt.run.model_dump_json() if ckpt.run is not None else "{}",
        "environment": json_text(ckpt.environment),
    }
    atomic_write_bytes(Path(path), st_save(tensors, metadata=metadata))


def _metadata(raw: bytes, path: Path) -> dict:
    """The header's __metadata__ (parsed by hand so a non-cnnctl safetensors file gets a clear message)."""
    if len(raw) < 8:
        raise CheckpointError(f"{path}: file is empty or truncated ({len(raw)} bytes)", "use another checkpoint")
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or 8 + n > len(raw):
        raise CheckpointError(f"{path}: not a safetensors file, or truncated", "use a file written by cnnctl train")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (bad header)", "use a file written by cnnctl train") \
            from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file, but not a cnnctl checkpoint (no cnnctl metadata)",
                              "pass a checkpoint from a run directory, e.g. runs/NAME/checkpoints/best.safetensors")
    return meta


MAX_HEADER = 100_000_000  # bytes of JSON header: safetensors' own limit


def read(path: str | Path) -> bytes:
    """A checkpoint file's bytes. A missing or unreadable file, one that is not a regular file (a device such as
    /dev/zero, a pipe), one larger than memory allows, or one whose first 8 bytes do not give a safetensors header
    length that fits the file is a CheckpointError, before the body is read."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: opening a named pipe would block
            raise CheckpointError(f"{path}: not a regular file", "give a .safetensors checkpoint file")
        with path.open("rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):  # replaced in between
                raise CheckpointError(f"{path}: not a regular file", "give a .safetensors checkpoint file")
            refuse_over(f"reading checkpoint {path}", info.st_size, 2, CheckpointError,
                        "the file is not a cnnctl checkpoint, or too large for this machine")
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: empty or truncated checkpoint ({len(head)} bytes)",
                                      "use another checkpoint, e.g. checkpoints/last.safetensors")
            n = int.from_bytes(head, "little")
            if not 0 < n <= min(MAX_HEADER, info.st_size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (its first 8 bytes do not give a header "
                                      "length that fits the file)", "give a checkpoint written by cnnctl train")
            return head + f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}", "check the path (runs/NAME/checkpoints/...)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None


def load(path: str | Path) -> Checkpoint:
    return parse(read(path), Path(path))


def parse(raw: bytes, path: Path) -> Checkpoint:
    """The checkpoint in a file's bytes (`path` names it in messages)."""
    meta = _metadata(raw, path)
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('format_version')} is not supported "
                              f"by this cnnctl (version {FORMAT_VERSION})", "use the cnnctl that wrote it")
    try:
        tensors = st_load(raw)
        run = json.loads(meta.get("trainer", "{}"))  # checked below, once the rest of the metadata is sound
        ckpt = Checkpoint(
            config=json.loads(meta["config"]),
            model_state=model_tensors(tensors),
            optimizer_state=_under(tensors, OPTIM_PREFIX),
            training_state=_under(tensors, TRAINING_PREFIX),
            epoch=int(meta["epoch"]),
            step=int(meta["step"]),
            metrics=json.loads(meta["metrics"]),
            normalization=json.loads(meta["normalization"]),
            environment=json.loads(meta.get("environment", "{}")),
        )
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})",
                              "use another checkpoint, e.g. checkpoints/last.safetensors") from None
    _check_metadata(ckpt, path)
    ckpt.run = _run_state(run, ckpt, path)
    return ckpt


def _check_metadata(ckpt: Checkpoint, path: Path) -> None:
    """The metadata has the types cnnctl wrote: anything else is a damaged (or hostile) file, said here once."""
    def bad(what: str):
        raise CheckpointError(f"{path}: damaged checkpoint metadata: {what}", "use a checkpoint written by cnnctl "
                              "train, e.g. checkpoints/best.safetensors")

    for key in ("config", "metrics", "normalization", "environment"):
        if not isinstance(getattr(ckpt, key), dict):
            bad(f"'{key}' is a {type(getattr(ckpt, key)).__name__}, not a mapping")
    if ckpt.epoch < 0 or ckpt.step < 0:
        bad(f"epoch {ckpt.epoch} and step {ckpt.step} must not be negative")
    norm = ckpt.normalization
    if norm:
        mean, std = norm.get("mean"), norm.get("std")
        numbers = (isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) and
                                                      math.isfinite(x) for x in v) for v in (mean, std))
        if not all(numbers) or len(mean) != len(std) or min(std) <= 0:
            bad("normalization needs lists 'mean' and 'std' of finite numbers, equally long, std positive")


def _run_state(raw: Any, ckpt: Checkpoint, path: Path) -> RunState | None:
    """The header's run state, checked (None when the file has none); its counters are the header's."""
    if raw == {}:
        return None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: damaged checkpoint metadata: 'trainer' is not a mapping",
                              "use a checkpoint written by cnnctl train, e.g. checkpoints/best.safetensors")
    try:
        return RunState.model_validate({**raw, "epoch": ckpt.epoch, "step": ckpt.step})
    except ValidationError as e:
        first = e.errors()[0]
        raise CheckpointError(f"{path}: damaged checkpoint metadata: trainer.{'.'.join(map(str, first['loc']))}: "
                              f"{first['msg']}", "use a checkpoint written by cnnctl train, e.g. "
                              "checkpoints/best.safetensors") from None


def _generator_state(state: dict) -> dict:
    """A numpy bit generator's state that numpy accepts (tried on a scratch generator of its kind)."""
    kind = getattr(np.random, str(state.get("bit_generator")), None)
    if not (isinstance(kind, type) and issubclass(kind, np.random.BitGenerator)):
        raise ValueError(f"unknown bit generator {state.get('bit_generator')!r}")
    try:
        kind().state = state
    except (TypeError, KeyError, OverflowError) as e:
        raise ValueError(f"not a valid {kind.__name__} state ({type(e).__name__}: {e})") from None
    return state


Number = Annotated[StrictInt | StrictFloat, AllowInfNan(False)]
GeneratorState = Annotated[dict[str, Any], AfterValidator(_generator_state)]
Metrics = dict[str, Number | None]


def _an_epochs_row(row: dict) -> dict:
    """An epoch's row of the history: its epoch (1, 2, ...) and step counts at least, as integers."""
    for key in ("epoch", "step"):
        value = row.get(key)
        if not isinstance(value, int) or value < (1 if key == "epoch" else 0):
            raise ValueError(f"an epoch's row needs '{key}' as a whole number, got {value!r}")
    return row


EpochRow = Annotated[Metrics, AfterValidator(_an_epochs_row)]


# the run's independent random streams, spawned from its seed in this order: weights (and dropout), data
# (generation and the validation split), shuffling, augmentation (train.Seeds holds them)
STREAMS = ("init", "data", "shuffle", "augment")


class Partial(Strict):
    """Where an interrupted epoch stopped: the next batch, the epoch's shuffle, its running sums."""

    position: NonNegInt
    shuffle_state: GeneratorState
    loss_sum: Number
    correct: NonNegInt
    seen: NonNegInt


class Stopper(Strict):
    """Early stopping's memory: the best monitored value so far and the epochs since it."""

    best: Number | None = None
    bad_epochs: NonNegInt = 0


class RunState(Strict):
    """Where a run stands: the one object the trainer reads and writes (counters, history, best epoch, early
    stopping, the position in an interrupted epoch, the schedule's and the random streams' states, wall time),
    saved in every checkpoint and checked here when read back, so damaged state is refused on load rather than
    failing mid-training. A field an older checkpoint lacks is None: resume refuses it, eval and predict do not
    need it."""

    model_config = ConfigDict(extra="ignore")

    epoch: NonNegInt = 0  # finished epochs
    step: NonNegInt = 0  # optimizer steps taken
    classes: list[StrictStr] | None = None
    history: list[EpochRow] | None = None
    best: EpochRow | None = None  # the row of the best epoch by train.monitor
    stopper: Stopper | None = None
    partial: Partial | None = None
    schedule: dict[str, Number | None] | None = None
    seeds: dict[Literal[STREAMS], GeneratorState] | None = None
    wall_seconds: Annotated[float, Field(ge=0)] | None = None
    algorithms: dict[StrictStr, Literal[tuple(ALGORITHMS)]] | None = None  # the plan's convolution algorithms
