"""A trained model at work: viz (filters, feature maps), explain and predict."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from cnnctl import api
from cnnctl.core import nn
from cnnctl.core.fileio import atomic_write_bytes
from cnnctl.core.plan import Runner
from cnnctl.errors import CnnctlError
from cnnctl.run.loading import load_model
from cnnctl.tools import plots
from cnnctl.tools import predict as predict_lib

from .common import (
    CheckpointArgument,
    JsonOption,
    ThreadsOption,
    app,
    check_writable,
    checkpoint_of,
    err,
    guarded,
    load_checkpoint,
    out,
    print_json,
    table,
    use_threads,
)


@app.command()
@guarded
def viz(
    checkpoint_path: CheckpointArgument,
    out_file: Annotated[Path, typer.Option("--out", metavar="FILE", help="PNG file to write.")],
    image: Annotated[Path | None, typer.Option("--image", metavar="FILE",
                                               help="Also show each conv layer's feature maps for "
                                               "this image (a picture file or an .npz).")] = None,
):
    """The first conv layer's filters as a grid; with --image, every conv layer's feature maps."""
    check_writable(out_file, "--out")
    checkpoint_path, ckpt = load_checkpoint(checkpoint_path)
    spec, model, rows = load_model(ckpt, checkpoint_path)
    convs = {name: layer for name, layer in model.named_layers() if isinstance(layer, nn.Conv2D)}
    if not convs:
        raise CnnctlError(f"{checkpoint_path}: the model has no conv2d layer to show")
    if image is None:
        name, first = next(iter(convs.items()))
        plots.plot_filters(first.params["weight"], out_file, f"{name} filters {tuple(first.params['weight'].shape)}")
    else:
        names, x01 = predict_lib.load_inputs([image], spec.model.input_shape, spec.data.resize)
        with nn.recording(convs) as outputs:  # every convolution's output, nested ones included
            Runner(model).forward(predict_lib.normalize(x01[:1], ckpt.normalization), training=False)
        maps = [(name, np.asarray(outputs[name][0])) for name in convs]
        plots.plot_feature_maps(maps, x01[0, 0] if x01.shape[1] == 1 else x01[0].transpose(1, 2, 0), out_file)
    out.print(f"wrote {out_file}")


@app.command("explain")
@guarded
def explain_(
    checkpoint_path: CheckpointArgument,
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUTS...", help="Image files or .npz files.")],
    methods: Annotated[list[str] | None, typer.Option(
        "--method", metavar="METHOD", help="saliency (default), gradcam or occlusion; repeatable.")] = None,
    layer: Annotated[str | None, typer.Option("--layer", metavar="NAME", help="Grad-CAM's layer, a top-level "
                                              "state-dict prefix such as layers.3 (default: the last spatial one)."
                                              )] = None,
    klass: Annotated[int | None, typer.Option("--class", metavar="K", help="The class to explain (default: the "
                                              "predicted one).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where the pictures go.")] = Path("explain"),
    npy: Annotated[bool, typer.Option("--npy", help="Also each map as a .npy of the input's height x width.")] = False,
    patch: Annotated[int, typer.Option("--patch", metavar="P", min=1, help="Occlusion's square.")] = 8,
    stride: Annotated[int, typer.Option("--stride", metavar="S", min=1, help="Occlusion's step.")] = 4,
    as_json: JsonOption = False,
    threads: ThreadsOption = None,
):
    """What a prediction looked at: saliency, Grad-CAM or occlusion maps of each input, as pictures laid over it
    (and with --npy as arrays), with the top classes."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from cnnctl.tools import explain as explain_lib

    use_threads(threads)
    methods = list(dict.fromkeys(methods or ["saliency"]))
    for m in methods:
        explain_lib.check_method(m)
    predictor = api.load(checkpoint_of(checkpoint_path))
    spec = predictor.spec
    names, x01 = predict_lib.load_inputs(inputs, spec.model.input_shape, spec.data.resize)
    probs = predictor.predict(x01)
    x = predict_lib.normalize(x01, predictor.normalization)
    results = predict_lib.top_classes(names, probs, predictor.classes, 3)
    stems = explain_lib.picture_stems([str(res["input"]) for res in results])
    for m in methods:
        columns = (TextColumn(f"{m}: squares"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True, disable=m != "occlusion" or not err.is_terminal) as bar:
            task = bar.add_task(m, total=None)
            maps, ks, used = explain_lib.explain(
                predictor.model, x, m, layer, klass, patch, stride, nn.LOSSES[spec.loss.type].takes,
                spec.data.evaluation_batch, lambda done, total, bar=bar, task=task: bar.update(task, completed=done,
                                                                                        total=total))
        for i, (res, heat) in enumerate(zip(results, maps)):
            stem = stems[i]
            picture = out_dir / f"{stem}.{m}.png"
            what = f"{m}{f' of {used}' if used else ''} for class {predictor.classes[ks[i]]}"
            plots.plot_explanation(x01[i], heat, picture, f"{res['input']}: {what}")
            files = {"png": str(picture)}
            if npy:
                buf = io.BytesIO()
                np.save(buf, heat, allow_pickle=False)
                atomic_write_bytes(out_dir / f"{stem}.{m}.npy", buf.getvalue())
                files["npy"] = str(out_dir / f"{stem}.{m}.npy")
            res.setdefault("explained", []).append({"method": m, "class": predictor.classes[ks[i]],
                                                    "layer": used, **files})
    if as_json:
        print_json(results)
        return
    k = len(results[0]["top"]) if results else 0
    out.print(table(f"explanations ({', '.join(methods)}) in {out_dir}", ["input", *(f"#{r + 1}" for r in range(k)),
                                                                         "pictures"], rows=(
        (res["input"], *(f"{t['class']} {100 * t['probability']:.1f}%" for t in res["top"]),
         ", ".join(Path(e["png"]).name for e in res["explained"])) for res in results)))


@app.command("predict")
@guarded
def predict_(
    checkpoint_path: CheckpointArgument,
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUTS...", help="Picture files, folders of pictures "
                                                 "(recursively; class subfolders give the true class), CSVs with a "
                                                 "path column (and label), or .npz files.")],
    top_k: Annotated[int, typer.Option("--top-k", metavar="K", min=1, help="Classes to show per input.")] = 3,
    out_file: Annotated[Path | None, typer.Option("--out", metavar="FILE.csv|FILE.jsonl", help="Write one row per "
                                                  "input there instead of printing them.")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", metavar="P", show_default=False,
        help="Multi-label models: every label of probability P or more (default 0.5).")] = None,
    as_json: JsonOption = False,
):
    """Class probabilities for images (Pillow; resized as in training: stretched to the input size, or with
    data.resize its shorter side scaled and the centre cut) or an .npz, normalised as in training; folders and
    CSVs of pictures are read in batches, with their true classes when they give them."""
    if out_file is not None:
        if out_file.suffix.lower() not in (".csv", ".jsonl"):
            raise CnnctlError(f"--out {out_file}: give a .csv or .jsonl file", "e.g. --out predictions.csv")
        check_writable(out_file, "--out")
    predictor = api.load(checkpoint_of(checkpoint_path))
    checkpoint_path = predictor.checkpoint_path
    multilabel = predictor.spec.task == "multilabel"
    if threshold is not None and not multilabel:
        raise CnnctlError(f"--threshold applies to multi-label models (task: multilabel); {checkpoint_path} gives "
                          "one class per image", "leave out --threshold (--top-k says how many classes to show)")
    if threshold is not None and not 0 <= threshold <= 1:
        raise CnnctlError(f"--threshold {threshold:g}: a probability, from 0 to 1", "e.g. --threshold 0.5")
    threshold = (0.5 if threshold is None else threshold) if multilabel else None
    entries = predict_lib.expand(inputs)
    results = _predicted(predictor, entries, top_k, {str(p) for p in inputs}, threshold)
    if out_file is not None:
        atomic_write_bytes(out_file, predict_lib.table_bytes(results, out_file.suffix.lower()))
        judged = [r for r in results if "correct" in r]
        right = f"; {sum(r['correct'] for r in judged) / len(judged):.2%} right of {len(judged):,} with a true " \
            "class" if judged else ""
        out.print(f"wrote {out_file}: {len(results):,} predictions{right}")
        return
    k = len(results[0]["top"]) if results else 0
    if as_json:
        print_json(results)
        return
    said = [f"labels (p >= {threshold:g})"] if multilabel else []
    out.print(table(f"predictions of {checkpoint_path}", ["input", *said, *(f"#{r + 1}" for r in range(k))], rows=(
        (res["input"], *([", ".join(res["labels"]) or "(none)"] if multilabel else []),
         *(f"{t['class']} {100 * t['probability']:.1f}%" for t in res["top"])) for res in results)))


CHUNK = 512  # pictures decoded and predicted at a time: memory stays that of one chunk


def _predicted(predictor, entries, top_k: int, given: set[str], threshold: float | None = None) -> list[dict]:
    """The top-k results of every entry, a chunk of files at a time, with a progress bar on a terminal; an entry
    not among the paths `given` (found in a folder or CSV) is named by its path."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    spec = predictor.spec
    results = []
    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=len(entries) <= CHUNK or not err.is_terminal) as bar:
        task = bar.add_task("predict", total=len(entries))
        for lo in range(0, len(entries), CHUNK):
            chunk = entries[lo:lo + CHUNK]
            names, x01 = predict_lib.load_inputs([p for p, _ in chunk], spec.model.input_shape, spec.data.resize)
            found = predict_lib.top_classes(names, predictor.predict(x01), predictor.classes, top_k, threshold)
            if len(found) == len(chunk):  # one result per file (an .npz gives one per array row)
                for res, (path, _) in zip(found, chunk):
                    if str(path) not in given:  # found in a folder or a CSV: named by its whole path
                        res["input"] = str(path)
                predict_lib.with_labels(found, [label for _, label in chunk], predictor.classes)
            results += found
            bar.update(task, completed=lo + len(chunk))
    return results
