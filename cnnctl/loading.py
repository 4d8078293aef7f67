"""From files to models: a checkpoint (or a run directory's) to its spec and the built model with its weights,
a config or a checkpoint to its spec and layer rows, and starting weights copied from a file.

Below the training engine: train, eval, predict, export, viz, bench, inspect and gradcheck load through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.numpy import load as st_load

from . import checkpoint, renames
from .builder import build_model, describe
from .config import Spec, apply_overrides, load_config, validate
from .errors import CheckpointError, CnnctlError
from .nn import Model


def checkpoint_file(path: Path) -> tuple[Path, str | None]:
    """A checkpoint file as given, or for a run directory its best checkpoint (else its last), with which of
    the two it is (None for a file)."""
    path = Path(path)
    if not path.is_dir():
        return path, None
    for name in ("best", "last"):
        found = path / "checkpoints" / f"{name}.safetensors"
        if found.is_file():
            return found, name
    raise CnnctlError(f"{path} is a folder without checkpoints/best.safetensors or checkpoints/last.safetensors",
                      "pass a run directory that finished an epoch, or a .safetensors file")


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
    model, rows = build_model(spec.model)
    restore_weights(model, ckpt.model_state, path)
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


def init_from(model: Model, path: str, strict: bool, rename=None) -> dict:
    """Copy into the model every tensor of a safetensors file (or a run directory's best checkpoint) whose name,
    after `rename` (a shipped map's name or [[regex, replacement], ...]), and shape match one of its parameters
    or buffers (optimizer tensors of a cnnctl checkpoint are ignored); the rest keep their fresh values. Returns
    what was copied, what starts fresh (and why) and what of the file was not used (by the file's names)."""
    if Path(path).is_dir():
        path = str(checkpoint_file(Path(path))[0])
    try:
        raw = checkpoint.read(path)  # the same checks as any checkpoint before its body is read
    except CheckpointError as e:
        raise CheckpointError(f"model.init_from: {e.message}", e.hint) from None
    try:
        tensors = st_load(raw)
    except Exception as e:  # safetensors' own errors for files that are not safetensors
        raise CheckpointError(f"model.init_from: {path} is not a readable safetensors file ({e})",
                              "give a .safetensors file (a cnnctl checkpoint, or a state_dict saved with "
                              "safetensors)") from None
    tensors, names = _renamed(checkpoint.model_tensors(tensors), rename, path)
    own = model.state_dict()
    copied, fresh = {}, []
    for name, value in own.items():
        if name not in tensors:
            fresh.append({"name": name, "reason": "not in the file"})
        elif np.shape(tensors[name]) != value.shape and not (value.shape == () and np.size(tensors[name]) == 1):
            fresh.append({"name": name, "reason": f"shape {tuple(np.shape(tensors[name]))} in the file, "
                                                  f"{value.shape} here"})
        else:
            copied[name] = tensors[name]
    unused = sorted(names[k] for k in set(tensors) - set(own))
    if strict and (fresh or unused):
        listed = [f"{f['name']} ({f['reason']})" for f in fresh] + [f"{u} (not in the model)" for u in unused]
        raise CheckpointError(f"model.init_from (strict): {path} does not fit the model: {', '.join(listed[:5])}"
                              f"{', ...' if len(listed) > 5 else ''}",
                              "set model.init_from.strict: false to copy what matches and start the rest fresh")
    try:
        model.load_state_dict({**own, **copied})
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"model.init_from: {path}: {e}", "use a checkpoint written by cnnctl train") from None
    return {"checkpoint": str(path), "copied": sorted(copied), "fresh": fresh, "unused": unused,
            "renamed": sum(1 for k, v in names.items() if k != v)}


def _renamed(tensors: dict, rename, path) -> tuple[dict, dict]:
    """The file's tensors under the model's names, and for each new name the file's own."""
    if rename is None:
        return tensors, {k: k for k in tensors}
    rules = renames.compile_rules(renames.RENAMES[rename] if isinstance(rename, str) else [list(r) for r in rename])
    out, names = {}, {}
    for name, value in tensors.items():
        new = renames.renamed(name, rules)
        if new in out:
            raise CheckpointError(f"model.init_from.rename: {names[new]} and {name} of {path} both become {new}",
                                  "make the rules map each tensor of the file to a name of its own")
        out[new], names[new] = value, name
    return out, names


def restore_weights(model: Model, state: dict[str, np.ndarray], path) -> None:
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit the architecture in its config: {e}",
                              "the file was edited or belongs to another model") from None
