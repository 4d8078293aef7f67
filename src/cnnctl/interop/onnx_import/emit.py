"""What an import writes: every layer's weights under its state-dict name, repeated containers as blocks, the
config as a person would write it (commented, strings quoted where YAML would read another type), and the
checkpoint beside it, the two written as a pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnctl.errors import CnnctlError

from .read import read_model
from .walk import import_model


def lay_out(layers: list[dict], weights: dict[str, np.ndarray], prefix: str = "layers") -> dict[str, np.ndarray]:
    """Give every layer's weights their state-dict names (layers.3.body.0.weight), dropping the provisional keys
    from the specs; returns the renamed weights."""
    named = {}
    for i, spec in enumerate(layers):
        named.update(_lay_one(spec, weights, f"{prefix}.{i}"))
    return named


def _lay_one(spec: dict, weights: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    named = {}
    copies = spec.pop("_copies", None)
    if copies is not None:  # a block used with repeat: N is a sequential of the N copies
        for k, copy in enumerate(copies):
            named.update(_lay_one(copy, weights, f"{path}.{k}"))
        return named
    key = spec.pop("_path", None)
    if key is not None:
        for k in [k for k in weights if k.startswith(key + ".")]:
            named[f"{path}.{k[len(key) + 1:]}"] = weights[k]
    if spec["type"] == "residual":
        named.update(lay_out(spec["body"], weights, f"{path}.body"))
        if isinstance(spec["shortcut"], list):
            named.update(lay_out(spec["shortcut"], weights, f"{path}.shortcut"))
    elif spec["type"] == "concat":
        for b, branch in enumerate(spec["branches"]):
            named.update(lay_out(branch, weights, f"{path}.branches.{b}"))
    elif spec["type"] == "gate":
        named.update(lay_out(spec["branch"], weights, f"{path}.branch"))
    return named


def _shape_of(spec):
    """A spec without its provisional weight keys: equal for two layers that differ in weights alone."""
    if isinstance(spec, dict):
        return {k: _shape_of(v) for k, v in spec.items() if k not in ("_path", "_copies")}
    if isinstance(spec, list):
        return [_shape_of(v) for v in spec]
    return spec


def fold_repeats(layers: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """Runs of two or more identical containers (residual units, concatenations, gates that differ in weights
    alone) at the top level become one use of a block with `repeat: N`; returns the layers and the blocks."""
    import json

    blocks: dict[str, dict] = {}
    names: dict[str, str] = {}
    out, i = [], 0
    while i < len(layers):
        spec = layers[i]
        key = json.dumps(_shape_of(spec), sort_keys=True)
        j = i + 1
        while j < len(layers) and json.dumps(_shape_of(layers[j]), sort_keys=True) == key:
            j += 1
        if spec["type"] in ("residual", "concat", "gate") and j - i >= 2:
            if key not in names:
                names[key] = f"{spec['type']}_{sum(1 for n in names.values() if n.startswith(spec['type'])) + 1}"
                blocks[names[key]] = _shape_of(spec)
            out.append({"type": names[key], "repeat": j - i, "_copies": layers[i:j]})
        else:
            out.extend(layers[i:j])
        i = j
    return out, blocks


# ---------------------------------------------------------------- the config and checkpoint written


def _flow(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, default_flow_style=True, width=10**9, sort_keys=False).strip()


def _scalar_text(v) -> str:
    """A value as YAML reads it back unchanged: a string YAML would take for a number, a boolean or null
    (`2024`, `yes`, `null`, `0x1F`, `~`, `1e3`) or that holds YAML syntax is quoted."""
    return _flow([v])[1:-1]


def _layer_lines(layers: list[dict], indent: str) -> list[str]:
    lines = []
    for spec in layers:
        if spec["type"] == "residual":
            lines.append(f"{indent}- type: residual")
            lines.append(f"{indent}  body:")
            lines += _layer_lines(spec["body"], indent + "    ")
            if isinstance(spec["shortcut"], list):
                lines.append(f"{indent}  shortcut:")
                lines += _layer_lines(spec["shortcut"], indent + "    ")
            else:
                lines.append(f"{indent}  shortcut: {spec['shortcut']}")
            if spec.get("activation"):
                lines.append(f"{indent}  activation: {spec['activation']}")
        elif spec["type"] == "gate":
            lines.append(f"{indent}- type: gate   # squeeze-and-excitation: the input's channels scaled by:")
            lines.append(f"{indent}  branch:")
            lines += _layer_lines(spec["branch"], indent + "    ")
        elif spec["type"] == "concat":
            lines.append(f"{indent}- type: concat")
            lines.append(f"{indent}  branches:")
            for branch in spec["branches"]:
                if not branch:
                    lines.append(f"{indent}    - []   # the input itself")
                    continue
                first, *rest = _layer_lines(branch, indent + "      ")
                lines.append(f"{indent}    - {first.strip()}" if first.lstrip().startswith("- {") else
                             f"{indent}    -\n{first}")
                lines += rest
        else:
            lines.append(f"{indent}- {_flow(spec)}")
    return lines


def _block_lines(blocks: dict[str, dict]) -> list[str]:
    if not blocks:
        return []
    lines = ["  blocks:                     # structure that repeats: used below with repeat: N"]
    for name, spec in blocks.items():
        first, *rest = _layer_lines([spec], "      ")
        lines.append(f"    {name}:")
        lines.append("      " + first.strip()[2:])  # the block's own keys, not a list item
        lines += [line[2:] if line.startswith("        ") else line for line in rest]
    return lines


def config_text(spec: dict, source: str) -> str:
    """The config as a person would write it: commented, leaf layers one per line, containers as blocks."""
    data, model = spec["data"], spec["model"]
    lines = [
        f"# Imported by `cnnctl import {source}`: the layers of the ONNX graph, with their weights in",
        "# model.safetensors beside this file. Fill in the data section, then fine-tune:",
        "#   cnnctl train config.yaml --init-from model.safetensors",
        f"name: {_scalar_text(spec['name'])}",
        f"seed: {spec['seed']}",
        "data:",
        "  dataset: folder            # your images: ROOT/train/<class>/*.png (and optionally ROOT/test/<class>/)",
        f"  root: {data['root']}     # fill in",
        f"  batch_size: {data['batch_size']}",
        f"  val_split: {data['val_split']}",
        f"  normalize: {_flow(data['normalize']) if isinstance(data['normalize'], dict) else data['normalize']}"
        "   # what the network was trained with",
        "model:",
        f"  input_shape: {_flow(model['input_shape'])}   # C, H, W of the graph's input",
        *_block_lines(model.get("blocks", {})),
        "  layers:",
        *_layer_lines(model["layers"], "    "),
        f"loss: {spec['loss']}",
        f"optimizer: {_flow(spec['optimizer'])}",
        f"train: {_flow(spec['train'])}",
    ]
    return "\n".join(lines) + "\n"


def build(onnx_path: Path, name: str, mean: list[float] | None, std: list[float] | None,
          classes: list[str] | None, input_size: tuple[int, int] | None = None):
    """Import the graph: (spec dict, Spec, model with the weights loaded, layer rows, normalisation, class names,
    Imported)."""
    from cnnctl.config.build import build_model
    from cnnctl.config.reading import validate
    from cnnctl.core.nn.init import SHAPES_ONLY

    proto = read_model(onnx_path)
    imp = import_model(proto, str(onnx_path), input_size)
    if classes is None:  # cnnctl export writes them into metadata_props
        import json

        meta = {p.key: p.value for p in proto.metadata_props}
        try:
            written = json.loads(meta.get("classes", "null"))
        except ValueError:
            written = None
        if isinstance(written, list) and written and all(isinstance(c, str) for c in written):
            classes = written
    imp.layers, blocks = fold_repeats(imp.layers)
    named = lay_out(imp.layers, imp.weights)
    c = imp.input_shape[0]
    if (mean is None) != (std is None):
        raise CnnctlError("give --mean and --std together", "e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")
    if mean is not None:
        if len(mean) != c or len(std) != c or min(std) <= 0:
            raise CnnctlError(f"--mean and --std need {c} values each (one per input channel), std positive")
        norm = {"mean": list(mean), "std": list(std)}
    elif imp.normalization is not None:  # values per channel or one for all (_per_channel_values)
        found = {"std": [1.0], **imp.normalization}
        norm = {k: (v * c if len(v) == 1 else v) for k, v in found.items()}
    else:
        norm = {"mean": [0.0] * c, "std": [1.0] * c}
    spec_dict = {
        "name": name, "seed": 0,
        "data": {"dataset": "folder", "root": "PATH/TO/IMAGES", "batch_size": 32, "val_split": 0.1,
                 "normalize": norm if norm["std"] != [1.0] * c or any(norm["mean"]) else "none"},
        "model": {"input_shape": list(imp.input_shape), **({"blocks": blocks} if blocks else {}),
                  "layers": imp.layers},
        "loss": "nll" if imp.final == "log_softmax" else "cross_entropy",
        "optimizer": {"type": "sgd", "lr": 0.01, "momentum": 0.9},
        "train": {"epochs": 10},
    }
    spec = validate(spec_dict, f"the config imported from {onnx_path}")
    model, rows = build_model(spec.model, SHAPES_ONLY)  # no first weights: the file's are loaded below
    own = model.state_dict()
    for key in own:  # a counter ONNX does not carry: it starts at 0, as in a fresh PyTorch model
        if key.endswith(".num_batches_tracked") and key not in named:
            named[key] = np.zeros_like(own[key])
    missing, extra = sorted(set(own) - set(named)), sorted(set(named) - set(own))
    wrong = [k for k in own if k in named and own[k].shape != named[k].shape]
    if missing or extra or wrong:  # a mapping this module got wrong: said plainly
        shapes = [(k, own[k].shape, named[k].shape) for k in wrong[:3]]
        raise CnnctlError(f"{onnx_path}: the imported weights do not fit the imported layers (missing "
                          f"{missing[:3]}, extra {extra[:3]}, shapes {shapes})",
                          "report this graph to cnnctl")
    model.load_state_dict(named)
    k = rows[-1].output_shape[0] if len(rows[-1].output_shape) == 1 else None
    if k is None:
        raise CnnctlError(f"{onnx_path}: the network outputs shape {rows[-1].output_shape}, not one score per class",
                          "import an image classifier (its output N x classes)")
    if classes is not None and len(classes) != k and "classes" not in {p.key for p in proto.metadata_props}:
        raise CnnctlError(f"--classes gives {len(classes)} names but the network has {k} outputs",
                          "one class name per line, as many as the network's outputs")
    if classes is not None and len(classes) != k:
        classes = None  # the file's own names do not fit its outputs: numbered instead
    return spec_dict, spec, model, rows, norm, classes or [f"class_{i}" for i in range(k)], imp


IMPORTED = ("config.yaml", "model.safetensors")


def check_out_dir(out_dir: Path, force: bool) -> None:
    """--out may be a new or empty folder, or one that holds only an earlier import (its two files); a folder with
    anything else (a run directory, other files) is refused unless `force`, which replaces the two files only."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or force:
        return
    if not out_dir.is_dir():
        raise CnnctlError(f"--out {out_dir}: it is not a folder", "give a folder for config.yaml and model.safetensors")
    present = sorted(p.name for p in out_dir.iterdir())
    earlier = set(present) <= set(IMPORTED)
    if earlier and "config.yaml" in present:
        from cnnctl.core.fileio import Unreadable, read_regular

        try:
            earlier = read_regular(out_dir / "config.yaml", 1 << 20).startswith(b"# Imported by `cnnctl import")
        except Unreadable:
            earlier = False
    if present and not earlier:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise CnnctlError(f"--out {out_dir} already holds {shown}: not an earlier import's folder (a run, or files of "
                          "your own), which an import would overwrite",
                          "give a new folder, or add --force to replace its config.yaml and model.safetensors")


def write(out_dir: Path, onnx_path: Path, spec_dict: dict, spec, model, norm: dict, classes: list[str]) -> None:
    """DIR/config.yaml (readable, commented) and DIR/model.safetensors (a cnnctl checkpoint of the weights),
    written as a pair: both new or, when a write fails, both as they were."""
    import os

    from cnnctl.config.reading import spec_to_dict
    from cnnctl.core.environment import environment
    from cnnctl.core.fileio import atomic_write_bytes
    from cnnctl.run import checkpoint
    from cnnctl.run.checkpoint import RunState

    out_dir = Path(out_dir)
    final = [out_dir / name for name in IMPORTED]
    new = [out_dir / f".{name}.new" for name in IMPORTED]
    old = [out_dir / f".{name}.old" for name in IMPORTED]
    moved: list[int] = []  # old files set aside
    placed: list[int] = []  # new files in place
    try:
        atomic_write_bytes(new[0], config_text(spec_dict, Path(onnx_path).name).encode(), follow_links=False)
        checkpoint.save(new[1], checkpoint.Checkpoint(
            config=spec_to_dict(spec), model_state=model.state_dict(), normalization=norm,
            run=RunState(classes=classes), environment={**environment(), "imported_from": str(onnx_path)}))
        for k in range(2):  # the old pair aside, then the new pair in: undone below if any step fails
            if final[k].exists() or final[k].is_symlink():
                os.replace(final[k], old[k])
                moved.append(k)
        for k in range(2):
            os.replace(new[k], final[k])
            placed.append(k)
    except BaseException as e:
        for k in range(2):
            if k in placed:
                final[k].unlink(missing_ok=True)
            if k in moved:
                os.replace(old[k], final[k])
            new[k].unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CnnctlError(f"cannot write {out_dir}: {e.strerror or e}",
                              "write to a writable folder with free space") from None
        raise
    for k in moved:
        old[k].unlink(missing_ok=True)

