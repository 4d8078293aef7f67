"""ONNX out and in: export and import."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from cnnctl import api
from cnnctl.core import nn
from cnnctl.core.fileio import output_target
from cnnctl.errors import CnnctlError
from cnnctl.interop.export import export_onnx, verify

from .common import (
    CheckpointArgument,
    app,
    check_writable,
    checkpoint_of,
    guarded,
    out,
)


@app.command()
@guarded
def export(
    checkpoint_path: CheckpointArgument,
    out_file: Annotated[Path, typer.Option("--out", metavar="FILE", help="File to write, e.g. model.onnx.")],
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="Only onnx for now.")] = "onnx",
    softmax: Annotated[bool, typer.Option("--softmax", help="End the graph with Softmax (probabilities; "
                                                  "a multi-label model: Sigmoid).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write an int8 model (OUT-int8.onnx), quantized by "
                                       "onnxruntime and kept only if its accuracy passes --max-drop.")] = False,
    calibrate: Annotated[int, typer.Option("--calibrate", metavar="N", help="--int8: training images the "
                                           "activations' ranges are calibrated on.")] = 256,
    max_drop: Annotated[float, typer.Option("--max-drop", metavar="POINTS", help="--int8: the most accuracy "
                                            "(percentage points, on the test split) the int8 model may lose.")] = 1.0,
):
    """Export a checkpoint as an ONNX graph (input: pixels on the 0..1 scale; normalisation baked in)."""
    if fmt != "onnx":
        raise CnnctlError(f"unknown --format {fmt!r}", "use --format onnx")
    check_writable(out_file, "--out")
    if int8:
        from cnnctl.interop.quantize import check_options, int8_path

        check_options(calibrate, max_drop)
        check_writable(int8_path(out_file), "--out (its -int8 file)")
    predictor = api.load(checkpoint_of(checkpoint_path))
    spec, model, norm = predictor.spec, predictor.model, predictor.normalization
    if int8 and spec.task == "multilabel":
        raise CnnctlError("--int8 keeps an int8 model by its accuracy over one class per image; this model is "
                          "multi-label (task: multilabel)", "export without --int8")
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
    if int8:
        from cnnctl.interop.quantize import quantize_run

        target = int8_path(out_file)
        before, after, split, n, used = quantize_run(spec, predictor._rows, norm, out_file, target, calibrate,
                                                     max_drop)
        out.print(f"wrote {target}: int8, calibrated on {used:,} training images; "
                  f"on the {split} split ({n:,} images, onnxruntime): accuracy {100 * before.accuracy:.2f}% float, "
                  f"{100 * after.accuracy:.2f}% int8; {before.images_per_second:,.0f} and "
                  f"{after.images_per_second:,.0f} images/s")


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
