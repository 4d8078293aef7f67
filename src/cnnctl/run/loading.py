"""From files to models: a checkpoint (or a run directory's) to its spec and the built model with its weights,
a config or a checkpoint to its spec and layer rows, and starting weights copied from a file.

Below the training engine: train, eval, predict, export, viz, bench, inspect and gradcheck load through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from cnnctl.config.build import build_model, describe
from cnnctl.config.reading import apply_overrides, load_config, validate
from cnnctl.config.spec import Spec
from cnnctl.core.nn import Model

from . import checkpoint


def offline(spec: Spec) -> Spec:
    """The spec with data.download off: for checkpoints' configs and for verbs that never download."""
    return spec.model_copy(update={"data": spec.data.model_copy(update={"download": False})})


def with_overrides(ckpt: checkpoint.Checkpoint, overrides: list[str]) -> checkpoint.Checkpoint:
    """The checkpoint with --set overrides applied to its embedded config (eval, inspect, bench of a checkpoint)."""
    if overrides:
        ckpt.config = apply_overrides(ckpt.config, list(overrides))
    return ckpt


def load_model(ckpt: checkpoint.Checkpoint, path) -> tuple[Spec, Model, list]:
    """Rebuild the model a checkpoint describes and load its weights; refuse another architecture."""
    spec = validate(ckpt.config, f"{path} (embedded config)")
    spec = offline(spec)  # a checkpoint is data: its embedded config never makes cnnctl download anything
    model, rows = build_model(spec.model, weights=ckpt.model_state, source=path)
    return spec, model, rows


class Target(NamedTuple):
    """What `load_target` read: the spec, its layer rows, and the convolution algorithms a checkpoint recorded
    (None for a config, or for a checkpoint written before runs recorded them)."""

    spec: Spec
    rows: list
    algorithms: dict[str, str] | None


def load_target(target: Path, overrides: list[str]) -> Target:
    """The spec and layer rows of a config file, or of a checkpoint (a .safetensors file; its weights are
    checked against its config, and the file is read once), with --set overrides applied."""
    target = Path(target)
    if target.suffix == ".safetensors":
        ckpt = with_overrides(checkpoint.load(target), overrides)
        spec, _, rows = load_model(ckpt, target)
        return Target(spec, rows, ckpt.run.algorithms if ckpt.run else None)
    spec, _ = load_config(target, overrides)
    return Target(spec, describe(spec.model), None)


