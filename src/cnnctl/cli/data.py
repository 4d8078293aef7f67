"""The data a config reads (data), and the config file's JSON Schema (schema)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from cnnctl import data as data_lib
from cnnctl.config.schema import config_schema
from cnnctl.core.fileio import atomic_write_bytes
from cnnctl.errors import CnnctlError
from cnnctl.run.loading import load_model, offline
from cnnctl.run.start import run_data
from cnnctl.tools import plots

from .common import (
    SetOption,
    TargetArgument,
    app,
    check_writable,
    checkpoint_of,
    guarded,
    load_checkpoint,
    load_target,
    out,
    print_json,
    stdout,
    table,
)


@app.command("data")
@guarded
def data_(
    target: TargetArgument,
    set_: SetOption = None,
    split: Annotated[str, typer.Option("--split", metavar="SPLIT", help="train, val or test: the split "
                                       "--out draws from.")] = "train",
    augmented: Annotated[bool, typer.Option("--augmented", help="Draw the images as training sees them "
                                            "(data.augment applied; train split only).")] = False,
    out_file: Annotated[Path | None, typer.Option("--out", metavar="FILE.png", help="Draw a grid of sample "
                                                  "images with their classes (needs cnnctl[plot]).")] = None,
    count: Annotated[int, typer.Option("--count", metavar="N", min=1, max=256, help="Images in the grid.")] = 32,
    seed: Annotated[int, typer.Option("--seed", metavar="SEED", help="Which images the grid shows.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as one JSON object.")] = False,
):
    """The dataset as the run sees it: images per class in the train, validation and test splits (the
    validation split carved from the seed as in training), and with --out a grid of labelled samples."""
    if split not in ("train", "val", "test"):
        raise CnnctlError(f"--split must be train, val or test, got {split!r}")
    if augmented and split != "train":
        raise CnnctlError(f"--augmented applies to the train split (augmentation is for training), not {split}",
                          "leave out --augmented, or use --split train")
    if out_file is not None:
        check_writable(out_file, "--out")
    found = checkpoint_of(target)
    if found.suffix == ".safetensors":  # a run's data: its normalisation, never a download
        _, ckpt = load_checkpoint(found, list(set_ or []))
        spec, _, rows = load_model(ckpt, found)
        spec, normalization = offline(spec), ckpt.normalization or None
    else:
        spec, rows, _ = load_target(found, list(set_ or []))
        normalization = None
    ds = run_data(spec, rows, normalization)
    counts = data_lib.class_counts(ds)
    if out_file is not None:
        chosen = ds.split(split)
        if not len(chosen):
            raise CnnctlError(f"the {split} split of {spec.data.dataset} holds no images", "use another --split")
        x, y = data_lib.samples(ds, chosen, count, np.random.default_rng(seed),
                                spec.data.augment if augmented else None)
        plots.plot_samples(x, [ds.classes[i] for i in y], out_file,
                           f"{spec.name}: {spec.data.dataset} {split}" + (" (augmented)" if augmented else ""))
    if as_json:
        print_json({"dataset": spec.data.dataset, "image_shape": list(ds.image_shape),
                          "dtype": str(ds.train.x.dtype), "classes": ds.classes,
                          "mean": ds.mean.tolist(), "std": ds.std.tolist(), "splits": counts,
                          **({"out": str(out_file)} if out_file is not None else {})})
        return
    names = ("train", "val", "test")
    out.print(table(f"{spec.name}: {spec.data.dataset}, images {tuple(ds.image_shape)} {ds.train.x.dtype}",
                    ("class", *names), right=names, rows=[
        *((c, *(f"{counts[s]['per_class'][i]:,}" for s in names)) for i, c in enumerate(ds.classes)),
        ("total", *(f"{counts[s]['total']:,}" for s in names))]))
    scale = "pixels / 255" if ds.train.x.dtype == np.uint8 else "values"
    out.print(f"normalisation ({scale}): mean {_floats(ds.mean)}  std {_floats(ds.std)}")
    if out_file is not None:
        out.print(f"wrote {out_file}")


def _floats(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


@app.command()
@guarded
def schema(
    out_file: Annotated[Path | None, typer.Option("--out", metavar="FILE",
                                                  help="Write to a file instead of stdout.")] = None,
):
    """The JSON Schema of the config file, for editor completion and checking."""
    text = json.dumps(config_schema(), indent=2) + "\n"
    if out_file is not None:
        check_writable(out_file, "--out")
    if out_file is None:
        stdout.write(text)
    else:
        atomic_write_bytes(out_file, text.encode())
        out.print(f"wrote {out_file}")


@app.command("pack")
@guarded
def pack_(
    config: Annotated[Path, typer.Argument(metavar="CONFIG")],
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="The folder to write (new or empty, or a "
                                          "pack of the same data to continue).")],
    set_: SetOption = None,
    workers: Annotated[int | None, typer.Option("--workers", metavar="N", min=1, show_default=False,
                                                help="Processes decoding picture files (default: the usable "
                                                "cores).")] = None,
):
    """Decode a config's dataset once into memory-mapped shards (uint8 .npy files and a manifest) that
    `dataset: packed` with `data.path: DIR` reads without loading them: the same numbers as the data it was
    packed from, memory that does not grow with the dataset. A killed pack continues where it stopped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from cnnctl.config.reading import load_config
    from cnnctl.data.packed import pack
    from cnnctl.run.start import Seeds

    spec, _ = load_config(config, set_ or [])
    if spec.task == "multilabel":
        raise CnnctlError(f"{config}: a pack holds one class per image, and the config is multi-label (task: "
                          "multilabel)", "train on the CSV or folder itself (dataset: csv or folder)")
    columns = (TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=out, transient=True, disable=not out.is_terminal) as bar:
        task = bar.add_task("pack", total=None)
        manifest = pack(spec.data, spec.model.input_shape, Seeds.from_seed(spec.seed).data, out_dir, workers,
                        lambda done, total: bar.update(task, completed=done, total=total))
    counts = ", ".join(f"{name} {split['count']:,}" for name, split in manifest["splits"].items())
    shards = sum(len(split["shards"]) for split in manifest["splits"].values())
    out.print(f"packed {counts} images of shape {tuple(manifest['image_shape'])} into {shards} shards in {out_dir}; "
              f"train on it with data: {{dataset: packed, path: {out_dir}}}")
