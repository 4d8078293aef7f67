"""Around training: runs, runs diff, plot, viz, data, schema, export, import, report, explain, predict, gradcheck and
lr-find."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cnnctl import api
from cnnctl import data as data_lib
from cnnctl.config.build import activation_values, build_model
from cnnctl.config.reading import load_config
from cnnctl.config.schema import config_schema
from cnnctl.core import nn
from cnnctl.core.fileio import atomic_write_bytes, output_target
from cnnctl.core.memory import refuse_over
from cnnctl.core.plan import Runner
from cnnctl.errors import CnnctlError
from cnnctl.interop.export import export_onnx, verify
from cnnctl.run import runs as runs_lib
from cnnctl.run.loading import load_model, offline
from cnnctl.run.start import run_data
from cnnctl.tools import plots
from cnnctl.tools import predict as predict_lib
from cnnctl.tools import sweep as sweep_lib
from cnnctl.tools.gradcheck import check_network
from cnnctl.tools.lr_find import lr_find as lr_find_lib
from cnnctl.tools.lr_find import verdict

from .common import (
    SetOption,
    ThreadsOption,
    app,
    check_writable,
    checkpoint_of,
    err,
    fmt,
    guarded,
    load_checkpoint,
    load_target,
    out,
    print_json,
    stdout,
    table,
    use_threads,
)
from .sweep import sweep_report


@app.command("runs")
@guarded
def runs_(
    args: Annotated[list[str] | None, typer.Argument(metavar="[RUNS_DIR] | diff RUN_A RUN_B",
                                                     help="A runs folder (default: runs), or diff A B")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """A table of runs (status, epochs, best validation and test accuracy), or the difference of two runs."""
    args = list(args or [])
    if args and args[0] == "diff":
        if len(args) != 3:
            raise CnnctlError("usage: cnnctl runs diff RUN_A RUN_B")
        return _runs_diff(Path(args[1]), Path(args[2]), as_json)
    if len(args) > 1:
        raise CnnctlError("give one runs folder, or: cnnctl runs diff RUN_A RUN_B")
    folder = Path(args[0]) if args else Path("runs")
    if (folder / "sweep.yaml").is_file() and not as_json:
        return sweep_report(folder)
    if not folder.is_dir():
        raise CnnctlError(f"runs folder not found: {folder}", "pass the folder given to --runs-dir (default: runs)")
    rows = runs_lib.list_runs(folder)
    if as_json:
        print_json(rows)
        return
    listing = Table(title=f"runs in {folder}")
    run_width = max([len(r["run"]) for r in rows] + [3])
    for col in ("run", "started", "status", "epochs", "best val", "test", "params", "wall"):
        listing.add_column(col, justify="left" if col in ("run", "started", "status") else "right",
                           no_wrap=col != "run", min_width=run_width if col == "run" else None)
    colors = {"finished": "green", "interrupted": "yellow", "failed": "red", "running": "cyan"}
    for r in rows:
        listing.add_row(r["run"], r["started"][5:16].replace("T", " ") if r["started"] else "-",
                        Text(str(r["status"]), style=colors.get(r["status"], "white")),
                        f"{r['epochs_done'] or 0}/{r['epochs'] or '?'}", fmt(r["best_val_acc"], True),
                        fmt(r["test_acc"], True), f"{r['params']:,}" if r["params"] else "-",
                        f"{r['wall_seconds']:.0f}s" if r["wall_seconds"] is not None else "-")
    out.print(listing)
    if not rows:
        out.print(f"no runs in {folder}")


def _runs_diff(a: Path, b: Path, as_json: bool) -> None:
    diffs, final = runs_lib.compare_runs(a, b)
    if as_json:
        print_json({"a": str(a), "b": str(b), "config": [{"key": k, "a": va, "b": vb} for k, va, vb in diffs],
                          "metrics": {k: {"a": va, "b": vb} for k, (va, vb) in final.items()}})
        return
    out.print(table("config keys that differ", ("key", a.name, b.name),
                    rows=((k, repr(va), repr(vb)) for k, va, vb in diffs))
              if diffs else "the configs are identical")
    out.print(table("final metrics", ("metric", a.name, b.name), right=(a.name, b.name), rows=(
        (k, fmt(va, k.endswith("acc")), fmt(vb, k.endswith("acc"))) for k, (va, vb) in final.items())))


@app.command()
@guarded
def plot(
    run: Annotated[Path, typer.Argument(metavar="RUN_DIR")],
    out_file: Annotated[Path | None, typer.Option("--out", metavar="FILE", help="Write a PNG (needs cnnctl[plot]); "
                                                  "without it, charts are drawn in the terminal.")] = None,
):
    """Loss and accuracy curves (train and validation) and the learning rate of a run; for a sweep
    directory, the metric against each searched key."""
    if out_file is not None:
        check_writable(out_file, "--out")
    if (run / "results.csv").is_file() and (run / "sweep.yaml").is_file():
        metric, _, rows = sweep_lib.read_report(run)
        if out_file is None:
            out.print(plots.sweep_text(rows, metric), markup=False, highlight=False)
            return
        plots.plot_sweep(rows, metric, out_file, run.name)
        out.print(f"wrote {out_file}")
        return
    history = runs_lib.history_of(run)
    if out_file is not None:
        plots.plot_curves(history, out_file, title=run.name)
        out.print(f"wrote {out_file}")
        return
    for title, keys in (("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc")),
                        ("learning rate", ("lr",))):
        out.print(Text(title, style="bold"))
        out.print(plots.text_chart({k: [r.get(k) for r in history] for k in keys}), markup=False, highlight=False)


@app.command()
@guarded
def viz(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT|RUN_DIR")],
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


@app.command("data")
@guarded
def data_(
    target: Annotated[Path, typer.Argument(metavar="CONFIG|CHECKPOINT|RUN_DIR")],
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


@app.command()
@guarded
def export(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT|RUN_DIR")],
    out_file: Annotated[Path, typer.Option("--out", metavar="FILE", help="File to write, e.g. model.onnx.")],
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="Only onnx for now.")] = "onnx",
    softmax: Annotated[bool, typer.Option("--softmax", help="End the graph with Softmax (probabilities).")] = False,
):
    """Export a checkpoint as an ONNX graph (input: pixels on the 0..1 scale; normalisation baked in)."""
    if fmt != "onnx":
        raise CnnctlError(f"unknown --format {fmt!r}", "use --format onnx")
    check_writable(out_file, "--out")
    predictor = api.load(checkpoint_of(checkpoint_path))
    spec, model, norm = predictor.spec, predictor.model, predictor.normalization
    takes = nn.LOSSES[spec.loss.type].takes
    export_onnx(model, spec.model.input_shape, norm, spec.name, out_file, softmax, takes, predictor.classes)
    out.print(f"wrote {out_file} (input 'input': N x {' x '.join(map(str, spec.model.input_shape))} pixels "
              f"in 0..1; output 'output': {'probabilities' if softmax else 'logits'}; class names in its "
              "metadata_props)")
    if output_target(out_file)[1]:
        return  # written to a device or a FIFO: nothing to read back
    checked = verify(out_file, model, spec.model.input_shape, norm, softmax, takes)
    if checked is None:
        out.print("not checked against onnxruntime: it is not installed (pip install onnxruntime)")
    else:
        out.print(f"checked against onnxruntime {checked[0]}: its outputs equal cnnctl's to {checked[1]:.1e} of the "
                  "largest")


def _numbers(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise CnnctlError(f"{option} {text!r}: give numbers separated by commas", f"e.g. {option} 0.5,0.5,0.5") \
            from None


@app.command("import")
@guarded
def import_(
    model_file: Annotated[Path, typer.Argument(metavar="MODEL.onnx", help="An image classifier's ONNX graph.")],
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for config.yaml and "
                                          "model.safetensors.")],
    name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="The config's name (default: the "
                                             "file's).")] = None,
    mean: Annotated[str | None, typer.Option("--mean", metavar="M,...", help="Per-channel mean the network was "
                                             "trained with, on the 0..1 pixel scale (default: none).")] = None,
    std: Annotated[str | None, typer.Option("--std", metavar="S,...", help="Per-channel std, with --mean.")] = None,
    classes_file: Annotated[Path | None, typer.Option("--classes", metavar="FILE", help="Class names, one per "
                                                      "line (default: class_0, class_1, ...).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace config.yaml and model.safetensors in an --out "
                                        "folder that holds other files (a run).")] = False,
    input_size: Annotated[str | None, typer.Option("--input-size", metavar="H,W", help="The image size to import "
                                                   "a graph with a dynamic height and width at.")] = None,
):
    """Import an ONNX image classifier: a cnnctl config and a checkpoint of its weights, exact to onnxruntime."""
    from cnnctl.core.fileio import Unreadable, read_regular
    from cnnctl.interop import onnx_import

    from .train import layer_table

    classes = None
    if classes_file is not None:
        try:
            text = read_regular(classes_file, 1 << 20).decode("utf-8")
        except (Unreadable, UnicodeDecodeError) as e:
            raise CnnctlError(f"--classes {classes_file}: cannot read it ({getattr(e, 'reason', e)})",
                              "give a UTF-8 text file with one class name per line") from None
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    for path in (out_dir / "config.yaml", out_dir / "model.safetensors"):
        check_writable(path, "--out")
    onnx_import.check_out_dir(out_dir, force)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", model_file.stem) or "imported"  # a file name as a config name
    size = None
    if input_size is not None:
        size = _numbers(input_size, "--input-size")
        if len(size) != 2 or any(not 1 <= v <= 1 << 16 or v != int(v) for v in size):  # NaN fails the first
            raise CnnctlError(f"--input-size {input_size}: give the height and width, two whole numbers",
                              "e.g. --input-size 224,224")
        size = (int(size[0]), int(size[1]))
    spec_dict, spec, model, rows, norm, classes, imp = onnx_import.build(
        model_file, name, _numbers(mean, "--mean"), _numbers(std, "--std"), classes, size)
    onnx_import.write(out_dir, model_file, spec_dict, spec, model, norm, classes)
    out.print(layer_table(spec, rows))
    n_weights = len(model.state_dict())
    out.print(f"mapped {imp.tensors_mapped} tensors of the graph onto {n_weights} parameters and buffers "
              f"({sum(v.size for v in model.state_dict().values()):,} values); opset {imp.opset}"
              + (f"; the final {imp.final} left to the loss" if imp.final else ""))
    out.print(f"wrote {out_dir / 'config.yaml'} and {out_dir / 'model.safetensors'}")
    out.print(f"  fine-tune: fill in data.root, then cnnctl train {out_dir / 'config.yaml'} --init-from "
              f"{out_dir / 'model.safetensors'}")


@app.command()
@guarded
def report(
    target: Annotated[Path, typer.Argument(metavar="RUN_DIR|SWEEP_DIR")],
    out_file: Annotated[Path | None, typer.Option("--out", metavar="FILE.html", help="Where the page goes "
                                                  "(default: RUN_DIR/report.html).")] = None,
    threads: ThreadsOption = None,
):
    """One self-contained HTML page about a run or a sweep: status, config, model, curves, evaluation, the most
    confidently wrong images with their saliency and Grad-CAM, calibration, filters, plan."""
    from cnnctl.tools import report as report_lib

    use_threads(threads)
    if not Path(target).is_dir():
        raise CnnctlError(f"{target} is not a folder", "pass a run directory or a sweep directory")
    out_file = out_file or Path(target) / "report.html"
    check_writable(out_file, "--out")
    text = report_lib.page(Path(target))
    atomic_write_bytes(out_file, text.encode("utf-8"))
    out.print(f"wrote {out_file} ({len(text) / 1e6:.2f} MB, self-contained: open it in any browser)")


@app.command("explain")
@guarded
def explain_(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT|RUN_DIR")],
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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    threads: ThreadsOption = None,
):
    """What a prediction looked at: saliency, Grad-CAM or occlusion maps of each input, as pictures laid over it
    (and with --npy as arrays), with the top classes."""
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
        maps, ks, used = explain_lib.explain(predictor.model, x, m, layer, klass, patch, stride,
                                             nn.LOSSES[spec.loss.type].takes, spec.data.evaluation_batch)
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
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT|RUN_DIR")],
    inputs: Annotated[list[Path], typer.Argument(metavar="FILES...", help="Image files or .npz files.")],
    top_k: Annotated[int, typer.Option("--top-k", metavar="K", min=1, help="Classes to show per input.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Class probabilities for images (Pillow; resized as in training: stretched to the input size, or with
    data.resize its shorter side scaled and the centre cut) or an .npz, normalised as in training."""
    predictor = api.load(checkpoint_of(checkpoint_path))
    checkpoint_path = predictor.checkpoint_path
    names, x01 = predict_lib.load_inputs(inputs, predictor.spec.model.input_shape, predictor.spec.data.resize)
    results = predict_lib.top_classes(names, predictor.predict(x01), predictor.classes, top_k)
    k = len(results[0]["top"]) if results else 0
    if as_json:
        print_json(results)
        return
    out.print(table(f"predictions of {checkpoint_path}", ["input", *(f"#{r + 1}" for r in range(k))], rows=(
        (res["input"], *(f"{t['class']} {100 * t['probability']:.1f}%" for t in res["top"]))
        for res in results)))


@app.command()
@guarded
def gradcheck(
    target: Annotated[Path, typer.Argument(metavar="CONFIG|CHECKPOINT|RUN_DIR")],
    set_: SetOption = None,
    layers: Annotated[list[str] | None, typer.Option("--layers", metavar="LAYER",
                                                     help="Layers to check: an index, a state-dict prefix "
                                                     "(layers.6) or a name "
                                                     "(repeatable; default: all).")] = None,
    samples: Annotated[int, typer.Option("--samples", metavar="N", min=1, help="Entries checked per array.")] = 16,
    batch: Annotated[int, typer.Option("--batch", metavar="N", min=1, help="Random inputs in the batch.")] = 2,
    tol: Annotated[float, typer.Option("--tol", metavar="TOL", help="Largest relative error that passes.")] = 1e-6,
    seed: Annotated[int, typer.Option("--seed", metavar="SEED")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Compare every layer's backprop gradients with central differences (float64) in the configured net."""
    spec, rows, _ = load_target(target, list(set_ or []))
    # float64 activations, their gradients and what backward keeps, for every input of the batch
    refuse_over(f"gradcheck of {spec.name} at --batch {batch}", 8 * 4 * batch * activation_values(rows), 2,
                CnnctlError, "use a smaller --batch (the default 2 is enough to check the backprop)")
    model, rows = build_model(spec.model, np.random.default_rng(seed))
    only = None
    if layers:
        by_name = {**{r.path: r.index for r in rows}, **{r.name: r.index for r in rows}}  # layers.6, or dense_6
        only = set()
        for item in layers:
            if item.isascii() and item.isdigit() and int(item) < len(rows):
                only.add(int(item))
            elif item in by_name:
                only.add(by_name[item])
            else:
                raise CnnctlError(f"--layers {item!r}: no such layer", f"use an index 0..{len(rows) - 1} or one "
                                  f"of: {', '.join(by_name)}")
    if not tol > 0:  # NaN or <= 0 would make every row fail, or none
        raise CnnctlError(f"--tol {tol}: give a positive number", "e.g. --tol 1e-6")
    with Progress(TextColumn("checking gradients"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("", total=None)
        results = check_network(model, spec.model.input_shape, batch, samples, seed, only, tol,
                                lambda done, total: bar.update(task, completed=done, total=total))
    worst = max(r["error"] for r in results)
    kinks = sum(r["kinks"] for r in results)
    if as_json:
        print_json({"tolerance": tol, "passed": worst < tol, "kinks_skipped": kinks, "results": results})
    else:
        out.print(table(f"{spec.name}: analytic vs numerical gradients (float64, central differences)",
                        ("#", "layer", "param", "shape", "checked", "kinks", "rel. error", ""),
                        right=("#", "checked", "kinks", "rel. error"), rows=(
            ("-" if r["index"] is None else str(r["index"]), r["layer"], r["param"], str(tuple(r["shape"])),
             str(r["checked"]), str(r["kinks"]) if r["kinks"] else "", f"{r['error']:.2e}",
             Text("ok", style="green") if r["error"] < tol else Text("FAIL", style="red"))
            for r in results)))
        out.print(f"largest relative error {worst:.2e} (tolerance {tol:g})"
                  + (f"; {kinks} entries skipped as kinks (the perturbation crossed a ReLU or max-pooling "
                     "switch, where the central difference is not the derivative)" if kinks else ""))
    if worst >= tol:
        raise typer.Exit(1)


@app.command("lr-find")
@guarded
def lr_find_(
    config: Annotated[Path, typer.Argument(metavar="CONFIG")],
    set_: SetOption = None,
    min_lr: Annotated[float, typer.Option("--min-lr", metavar="LR", help="First rate of the ramp.")] = 1e-7,
    max_lr: Annotated[float, typer.Option("--max-lr", metavar="LR", help="Last rate of the ramp.")] = 1.0,
    steps: Annotated[int, typer.Option("--steps", metavar="N", help="Batches, one rate each.")] = 100,
    out_file: Annotated[Path | None, typer.Option("--out", metavar="FILE.png", help="Draw loss against rate "
                                                  "(needs cnnctl[plot]).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {suggested_lr, lrs, losses}.")] = False,
    threads: ThreadsOption = None,
):
    """The learning-rate range test: train with an exponentially growing rate until the loss diverges, and
    suggest the rate where it falls fastest. Leaves no run directory."""
    use_threads(threads)
    if out_file is not None:
        check_writable(out_file, "--out")
    spec, _ = load_config(config, list(set_ or []))
    res = lr_find_lib(spec, min_lr, max_lr, steps)
    if out_file is not None:
        plots.plot_lr_find(res["lrs"], res["losses"], res["suggested_lr"], out_file, f"{spec.name}: lr range test")
    if as_json:
        print_json({"suggested_lr": res["suggested_lr"], "lrs": res["lrs"], "losses": res["losses"]})
        return
    out.print(plots.text_chart({"loss (smoothed)": res["losses"]},
                               x_label=f"learning rate {res['lrs'][0]:.2g} .. {res['lrs'][-1]:.2g} (log scale)"))
    out.print(f"{len(res['lrs'])} steps from {res['lrs'][0]:.2g} to {res['lrs'][-1]:.2g}")
    for note in verdict(res, max_lr):
        out.print(note, soft_wrap=True)
    if res["suggested_lr"] is None:
        out.print("no suggestion: the loss did not fall; try a wider range (--min-lr / --max-lr) or more --steps")
    else:
        lr = f"{res['suggested_lr']:.2g}"
        out.print(f"suggested learning rate {lr} (steepest descent of the smoothed loss)")
        out.print(f"  --set optimizer.lr={lr}")
    if out_file is not None:
        out.print(f"wrote {out_file}")
