"""The core verbs: train (with its progress display and signal handling), eval, inspect, bench."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.text import Text

from cnnctl import api
from cnnctl.config.build import inspect_report, receptive_field_text, shape_text, training_pflops, walk
from cnnctl.errors import CnnctlError, DataError
from cnnctl.run import distributed
from cnnctl.run.console import PlainProgress, RichProgress, Silent
from cnnctl.run.loading import offline
from cnnctl.run.start import check_known_data, run_data
from cnnctl.run.trainer import Trainer
from cnnctl.tools import plots
from cnnctl.tools.bench import bench as run_bench
from cnnctl.tools.bench import planned

from .common import (
    SetOption,
    TargetArgument,
    ThreadsOption,
    app,
    check_writable,
    checkpoint_of,
    err,
    fmt,
    guarded,
    load_target,
    out,
    print_json,
    table,
    use_threads,
)


@app.command()
@guarded
def train(
    config: Annotated[Path | None, typer.Argument(metavar="[CONFIG]",
                                                  help="YAML config file (not needed with --resume).")] = None,
    set_: SetOption = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", metavar="DIR",
                                           help="Where run directories are created.")] = Path("runs"),
    name: Annotated[str | None, typer.Option("--name", metavar="NAME",
                                             help="Run name (default: the config's name).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", metavar="RUN_DIR",
                                                help="Continue this run directory from its last "
                                                 "checkpoint; --set train.epochs=N extends a finished run.")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a changed config.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Plain lines instead of live progress bars.")] = False,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", metavar="CHECKPOINT", help="Start from these weights: every parameter and buffer whose "
        "name and shape match is copied (model.init_from.checkpoint).")] = None,
    logger: Annotated[list[str] | None, typer.Option(
        "--logger", metavar="NAME", help="Also log to tensorboard or mlflow (train.loggers); repeatable.")] = None,
    autotune: Annotated[bool, typer.Option("--autotune", help="Time each convolution's algorithms once on this "
                                           "machine and use the fastest (train.autotune).")] = False,
    threads: ThreadsOption = None,
):
    """Train a model from a YAML config; writes runs/NAME-YYYYmmdd-HHMMSS/. Under mpiexec -n N (cnnctl[mpi]) the
    N ranks train one model data-parallel; rank 0 writes the run directory."""
    world = distributed.world()
    use_threads(threads)
    overrides = list(set_ or [])
    if logger:
        overrides.append(f"train.loggers={json.dumps(list(dict.fromkeys(logger)))}")
    if init_from is not None:
        overrides.append(f"model.init_from.checkpoint={json.dumps(str(init_from))}")
    if name:
        overrides.append(f"name={json.dumps(name)}")  # a string as it is (--name 007 stays "007")
    if autotune:
        overrides.append("train.autotune=true")
    if (config is None) == (resume is None):
        raise CnnctlError("give a CONFIG to start a run, or --resume RUN_DIR to continue one (not both)",
                          "cnnctl train configs/quickstart.yaml   or   cnnctl train --resume runs/NAME-...")
    if not world.root:  # progress from rank 0 only
        cb = Silent()
    elif out.is_terminal and not quiet:
        cb = RichProgress(out)
    else:
        cb = PlainProgress(out)
    run = api.train(config, overrides, runs_dir, resume=resume, force=force, callback=cb, stop=_stop_on_signals)
    if not world.root:
        return
    summary, run_dir = run.result, run.dir
    best = summary["best"]
    if summary["stopped_early"]:
        out.print(f"early stopping after epoch {summary['final']['epoch']}")
    out.print(f"best {summary['monitor']} {fmt(best[summary['monitor']], 'acc' in summary['monitor'])} at epoch "
              f"{best['epoch']}; wall time {summary['wall_seconds']:.1f}s; training compute "
              f"{summary['training_pflops']:.4g} PFLOPs")
    if "test" in summary:
        out.print(f"test accuracy {fmt(summary['test']['accuracy'], True)} on {summary['test']['n']:,} images")
    if "test_skipped" in summary:
        out.print(f"no test accuracy: {summary['test_skipped']}")
    out.print(f"run directory: {run_dir}")


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer):
    """First SIGINT/SIGTERM: finish the batch, checkpoint, exit 130/143. A second SIGINT stops at once."""

    def handler(signum, frame):
        if trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.request_stop(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@app.command("eval")
@guarded
def eval_(
    checkpoint_path: Annotated[Path, typer.Argument(
        metavar="CHECKPOINT|RUN_DIR", help="A .safetensors checkpoint, or a run directory (its best checkpoint).")],
    data_split: Annotated[str | None, typer.Option(
        "--data-split", metavar="SPLIT", show_default=False,
        help="test, val or train (default: test; val for data without a test split).")] = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot_file: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png",
                                                   help="Also draw the confusion matrix (multi-label: each "
                                                   "label's results) to this PNG (needs cnnctl[plot]).")] = None,
    threads: ThreadsOption = None,
):
    """Evaluate a checkpoint (it carries its own config): loss, accuracy, per-class precision/recall (multi-label:
    per label, with average precision, mAP, micro and macro F1)."""
    use_threads(threads)
    if data_split not in ("test", "val", "train", None):
        raise CnnctlError(f"--data-split must be test, val or train, got {data_split!r}")
    if plot_file is not None:
        check_writable(plot_file, "--plot")
    res = api.evaluate(checkpoint_of(checkpoint_path), data_split, list(set_ or []))
    if data_split is None and res["split"] == "val":
        err.print(f"the {res['dataset']} data has no test split: evaluating the validation split")
    data_split, classes = res["split"], res["classes"]
    multilabel = res["task"] == "multilabel"
    if plot_file is not None and multilabel:
        plots.plot_label_results(res, plot_file, f"{Path(res['checkpoint']).name}: {data_split} split, "
                                 f"mAP {100 * res['map']:.2f}%")
    elif plot_file is not None:
        plots.plot_confusion(np.array(res["confusion_matrix"]), classes, plot_file, f"{Path(res['checkpoint']).name}:"
                             f" {data_split} split, accuracy {100 * res['accuracy']:.2f}%")
    if as_json:  # recorded_in says where the result was recorded
        print_json(res)
        return
    if res["recorded_in"]:
        err.print(f"recorded in {res['recorded_in']}" + (" as the run's test result" if res["recorded_as"] == "test"
                                                           else " under evaluations (the run has its own test result)"))
    out.print(f"{res['checkpoint']} (epoch {res['epoch']}) on the {data_split} split of {res['dataset']} "
              f"({res['n']:,} images)")
    for line in eval_lines(res):
        out.print(line)


def eval_lines(res: dict) -> list:
    """eval's summary line and tables: per class and the confusion matrix, or per label (multi-label)."""
    classes, precision, recall, f1 = res["classes"], res["precision"], res["recall"], res["f1"]
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    if res["task"] == "multilabel":
        columns = ("label", "images with it", "precision", "recall", "F1", "average precision")
        return [f"loss {res['loss']:.4f}  mAP {pct(res['map'])}  micro F1 {pct(res['micro_f1'])}  macro F1 "
                f"{pct(res['macro_f1'])}  every label right {pct(res['accuracy'])} (a label is said present at "
                "probability 0.5 or more)",
                table("per label", columns, right=columns, rows=(
                    (c, f"{res['support'][i]:,}", pct(precision[i]), pct(recall[i]), pct(f1[i]),
                     pct(res["average_precision"][i])) for i, c in enumerate(classes)))]
    cm, columns = res["confusion_matrix"], ("class", "support", "precision", "recall", "F1")
    return [f"loss {res['loss']:.4f}  accuracy {pct(res['accuracy'])}",
            table("per class", columns, right=columns, rows=(
                (c, f"{res['support'][i]:,}", pct(precision[i]), pct(recall[i]), pct(f1[i]))
                for i, c in enumerate(classes))),
            table("confusion matrix (rows: true, columns: predicted)", ["", *classes], right=classes, rows=(
                (c, *(Text(str(v), style="bold") if i == j else str(v) for j, v in enumerate(cm[i])))
                for i, c in enumerate(classes)))]


@app.command()
@guarded
def bench(
    target: TargetArgument,
    set_: SetOption = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", metavar="B", min=1,
                                                   help="Default: data.batch_size.")] = None,
    steps: Annotated[int, typer.Option("--steps", metavar="N", min=1, help="Timed training steps.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", min=0, help="Untimed steps first.")] = 3,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Forward and backward ms per layer.")] = False,
    show_plan: Annotated[bool, typer.Option("--plan", help="The execution plan, step by step: kind, layer, "
                                            "algorithm, fused operations, memory, forward and backward ms.")] = False,
    autotune: Annotated[bool, typer.Option("--autotune", help="Time each convolution's algorithms (cached) and "
                                           "use the fastest, as train --autotune.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    threads: ThreadsOption = None,
):
    """Time full training steps (forward, loss, backward, update) on synthetic data of the input shape."""
    world = distributed.world()
    use_threads(threads)
    spec = load_target(target, list(set_ or [])).spec
    res = run_bench(spec, batch_size, steps, warmup, per_layer or show_plan, world, autotune=autotune)
    if not world.root:
        return
    if as_json:
        print_json(res)
        return
    blas = res["blas"]
    blas_threads = blas.get("threads") or "unknown"
    out.print(f"{spec.name}: batch {res['batch_size']}, {res['steps']} steps after {res['warmup']} warm-up")
    out.print(f"  {res['images_per_second']:,.0f} images/s   {res['ms_per_step']:.2f} ms/step (median; p10 "
              f"{res['ms_p10']:.2f}, p90 {res['ms_p90']:.2f})   {res['gflops']:.1f} GFLOP/s")
    out.print(f"  peak RSS {res['peak_rss_mb']:.0f} MB   threads {res['threads']} (BLAS {blas_threads}"
              + (f": {blas.get('library')} {blas.get('kernel')})" if blas.get("library") else ")"))
    if res["ranks"] > 1:
        bn = "synchronised" if res["sync_batchnorm"] else "per rank"
        out.print(f"  MPI: {res['ranks']} ranks, batch {res['batch_size']} split across them; reductions "
                  f"{res['reduce_ms_per_step']:.2f} ms/step ({res['reductions_per_step']:.0f} Allreduce calls per "
                  f"step, batchnorm {bn})")
    if per_layer:
        out.print(table("per layer (ms per step)", ("#", "name", "output shape", "forward", "backward"),
                        right=("#", "forward", "backward"), rows=(
            (str(r["index"]), r["name"], str(tuple(r["output_shape"])), f"{r['forward_ms']:.3f}",
             f"{r['backward_ms']:.3f}") for r in res["layers"])))
    if show_plan:
        out.print(plan_table(f"execution plan (batch {res['batch_size']}; MB of memory, ms per step)",
                             res["plan_steps"]))
        out.print(f"  outside the planned steps (loss, optimizer update, hand-offs): {res['ms_outside_steps']:.1f} "
                  f"ms/step")


@app.command()
@guarded
def inspect(
    target: TargetArgument,
    set_: SetOption = None,
    depth: Annotated[int | None, typer.Option("--depth", metavar="N", min=0,
                                              help="Show nested layers down to this depth "
                                              "(0: top-level layers only; default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (with the whole tree).")] = False,
    show_plan: Annotated[bool, typer.Option("--plan", help="Also the execution plan of a training step, step by "
                                            "step: kind, layer, algorithm, fused operations, memory (a "
                                            "checkpoint's recorded algorithms; bench --plan adds times).")] = False,
):
    """Validate a config (or a checkpoint's) and show the layer tree: output shapes, parameters, MACs and
    receptive fields."""
    spec, rows, algorithms = load_target(target, list(set_ or []))
    check_known_data(spec, rows)
    report = inspect_report(spec, rows)
    try:  # the data too, when it is at hand (inspect never downloads)
        report["dataset"] = run_data(offline(spec), rows).describe()
        report["training_pflops_per_epoch"] = training_pflops(rows, report["dataset"]["train"])
    except DataError as e:
        report["dataset"] = {"name": spec.data.dataset, "unavailable": e.message}
    if show_plan:
        report["plan"] = planned(spec, algorithms=algorithms)
    if as_json:
        print_json(report)
        return
    out.print(layer_table(spec, rows, depth))
    frozen = f", {report['frozen_params']:,} frozen" if report["frozen_params"] else ""
    out.print(f"total parameters {report['trainable_params']:,} trainable{frozen}, {report['non_trainable_params']:,} "
              f"non-trainable (running statistics)  ({report['param_bytes'] / 1e6:.2f} MB as float32)")
    out.print(f"total MACs per sample {report['total_macs']:,}")
    if report["param_groups"]:
        names = [r["params"] for r in report["param_groups"]]
        out.print(table("optimizer parameter groups (each parameter in the first that matches)",
                        ("#", "match", "lr scale", "weight decay", "parameters (--json lists all)"),
                        right=("#", "lr scale"), rows=(
            (str(g["group"]), ", ".join(f"{k}: {v}" for k, v in g["match"].items()), f"{g['lr_scale']:g}",
             "optimizer's" if g["weight_decay"] is None else f"{g['weight_decay']:g}",
             f"{len(n)} ({n[0]}{', ...' if len(n) > 1 else ''})")
            for g, n in zip(report["param_groups"], names))))
    out.print(f"activation memory per sample {report['activation_bytes_per_sample'] / 1e3:,.1f} kB (float32); "
              f"training at batch size {spec.data.batch_size} needs about {_bytes(report['training_bytes'])}")
    d = report["dataset"]
    if "unavailable" not in d:
        epoch = report["training_pflops_per_epoch"]
        out.print(f"training compute {epoch:.4g} PFLOPs per epoch of {d['train']:,} images, "
                  f"{epoch * spec.train.epochs:.4g} for {spec.train.epochs} epochs (forward MACs x 6)")
    if "unavailable" in d:
        out.print(f"dataset {d['name']}: not loaded ({d['unavailable']})", soft_wrap=True)
    else:
        out.print(f"dataset {d['name']}: train {d['train']:,}  val {d['val']:,}  test {d['test']:,}  image "
                  f"{tuple(d['image_shape'])}  {len(d['classes'])} classes: {', '.join(d['classes'])}",
                  soft_wrap=True)
    if show_plan:
        p = report["plan"]
        source = "the run's recorded algorithms" if p["recorded"] else "algorithms by the default rule"
        out.print(plan_table(f"execution plan (batch {p['batch_size']}, {source}; MB of memory)", p["steps"]))


def layer_table(spec, rows, depth: int | None = None):
    """The layer tree as inspect shows it: output shapes, parameters, MACs, receptive fields."""
    shown = [r for r in walk(rows) if depth is None or r.depth <= depth]
    return table(f"{spec.name}: input {tuple(spec.model.input_shape)}",
                 ("#", "type", "output shape", "params", "MACs", "receptive field"),
                 right=("params", "MACs"), rows=(
        ("  " * r.depth + r.path.split(".", 1)[1], r.type + (f" {r.name!r}" if r.named else ""),
         shape_text(r.output_shape), f"{r.params:,}", f"{r.macs:,}", receptive_field_text(r.receptive_field))
        for r in shown))


def plan_table(title: str, steps: list[dict]):
    """The plan's steps as a table (`bench --plan` and `inspect --plan`); times when the rows have them."""
    timed = "forward_ms" in steps[0]
    columns = ("#", "kind", "layer", "algorithm", "fused", "out MB", "kept MB")
    columns += ("fwd ms", "bwd ms") if timed else ()
    return table(title, columns, right=("#", "out MB", "kept MB", "fwd ms", "bwd ms"), rows=(
        (str(r["step"]), r["kind"], r["layer"], r["algorithm"], r["fused"], f"{r['output_bytes'] / 1e6:.2f}",
         f"{r['saved_bytes'] / 1e6:.2f}", *((f"{r['forward_ms']:.2f}", f"{r['backward_ms']:.2f}") if timed else ()))
        for r in steps))


def _bytes(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


