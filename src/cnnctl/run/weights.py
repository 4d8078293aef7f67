"""Weights from files into models: a checkpoint file or a run directory's, a model's own state restored, and
`model.init_from` (every tensor whose name, after a rename, and shape match)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load as st_load

from cnnctl.config import renames
from cnnctl.errors import CheckpointError, CnnctlError

from . import checkpoint

if TYPE_CHECKING:
    from cnnctl.core.nn import Model


def checkpoint_file(path: Path) -> tuple[Path, str | None]:
    """A checkpoint file as given; for a run directory its best checkpoint (else its last), and for the folder
    `cnnctl import` wrote its model.safetensors; with which of them it is (None for a file)."""
    path = Path(path)
    if not path.is_dir():
        return path, None
    for name in ("best", "last"):
        found = path / "checkpoints" / f"{name}.safetensors"
        if found.is_file():
            return found, name
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors", "imported"
    raise CnnctlError(f"{path} is a folder without checkpoints/best.safetensors, checkpoints/last.safetensors or "
                      "model.safetensors", "pass a run directory that finished an epoch, a folder cnnctl import "
                      "wrote, or a .safetensors file")


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
