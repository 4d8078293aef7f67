"""The typer CLI: parse, call the library, print. Errors from the library are formatted here, once."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
import yaml
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__, checkpoint, nn, plots
from . import functional as F
from . import predict as predict_lib
from . import runs as runs_lib
from . import sweep as sweep_lib
from .bench import bench as run_bench
from .builder import LayerRow, build_loss, build_model, check_outputs
from .config import apply_overrides, config_schema, load_config
from .data import dataset_info
from .errors import CnnctlError, DataError
from .export import export_onnx
from .gradcheck import check_network
from .runs import create_run_dir
from .schedules import resolve_mode
from .sweep import trial_result
from .train import Callback, Interrupted, Seeds, Trainer, evaluate, load_data, load_model, resume_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train convolutional networks from one YAML file on a pure NumPy core.")
out = Console(highlight=False, soft_wrap=True)  # paths and messages never break mid-line
err = Console(stderr=True, highlight=False, soft_wrap=True)

SetOption = Annotated[list[str], typer.Option("--set", help="Override a config key: --set optimizer.lr=0.01 "
                                              "(dotted path, value parsed as YAML); repeatable.")]


def guarded(fn):
    """Turn CnnctlError into one readable message and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            err.print(f"[bold yellow]interrupted:[/] {escape(e.message)}")
            err.print(f"  {escape(e.hint)}")
            raise typer.Exit(e.exit_code) from None
        except CnnctlError as e:
            err.print(f"[bold red]error:[/] {escape(e.message)}")
            if e.hint:
                err.print(f"  [bold]fix:[/] {escape(e.hint)}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool):
    if value:
        out.print(f"cnnctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False):
    """cnnctl: declarative CNN training on NumPy."""


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


class RichProgress(Callback):
    """An epoch bar and a batch bar with running loss, accuracy, images/s and ETA."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self.epoch_task = self.batch_task = None
        self.downloads: dict[str, int] = {}

    def on_download(self, name, done, total):
        if name not in self.downloads:
            self.progress.start()
            self.downloads[name] = self.progress.add_task(f"download {name}", total=total, stats="")
        self.progress.update(self.downloads[name], completed=done, stats=f"{done / 1e6:.1f} MB")

    def on_train_start(self, info):
        for task in self.downloads.values():
            self.progress.remove_task(task)
        self.progress.stop()
        _print_start(self.console, info)
        self.progress.start()

    def on_epoch_start(self, epoch, epochs, n_batches, start):
        if self.epoch_task is None:
            self.epoch_task = self.progress.add_task("epochs", total=epochs, completed=epoch - 1, stats="")
        if self.batch_task is not None:
            self.progress.remove_task(self.batch_task)
        self.batch_task = self.progress.add_task(f"epoch {epoch}", total=n_batches, completed=start, stats="")

    def on_batch_end(self, batch, loss, acc, ips):
        self.progress.update(self.batch_task, completed=batch,
                             stats=f"loss {loss:.4f} acc {100 * acc:.2f}% {ips:,.0f} img/s")

    def on_epoch_end(self, row):
        self.progress.advance(self.epoch_task)
        self.progress.console.print(_epoch_line(row), soft_wrap=True)

    def close(self):
        self.progress.stop()


class PlainProgress(Callback):
    """One line per epoch, for logs and pipes."""

    def __init__(self, console: Console):
        self.console = console

    def on_download(self, name, done, total):
        if total is not None and done == total:
            self.console.print(f"downloaded {name} ({total / 1e6:.1f} MB)")

    def on_train_start(self, info):
        _print_start(self.console, info)

    def on_epoch_end(self, row):
        self.console.print(_epoch_line(row), soft_wrap=True)

    def close(self):
        pass


def _print_start(console, info):
    console.print(f"data: train {info['train']:,}  val {info['val']:,}  test {info['test']:,}  "
                  f"image {tuple(info['image_shape'])}  {len(info['classes'])} classes: "
                  f"{', '.join(info['classes'])}", soft_wrap=True)
    console.print(f"model: {info['params']:,} parameters")
    console.print(f"run: {info['run_dir']}")
    if info.get("resumed_at"):
        console.print(f"resumed after epoch {info['resumed_at'][0]}, step {info['resumed_at'][1]}")


def _epoch_line(row):
    return (f"epoch {row['epoch']:>3}  train loss {_fmt(row['train_loss'])} acc {_fmt(row['train_acc'], True)}  "
            f"val loss {_fmt(row['val_loss'])} acc {_fmt(row['val_acc'], True)}  lr {row['lr']:.4g}  "
            f"{row['seconds']:.1f}s")


@app.command()
@guarded
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config file (not needed with --resume).")] = None,
    set_: SetOption = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where run directories are created.")] = Path("runs"),
    name: Annotated[str | None, typer.Option("--name", help="Run name (default: the config's name).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run directory from its last "
                                                 "checkpoint; --set train.epochs=N extends a finished run.")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a changed config.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Plain lines instead of live progress bars.")] = False,
):
    """Train a model from a YAML config; writes runs/NAME-YYYYmmdd-HHMMSS/."""
    overrides = list(set_ or [])
    if name:
        overrides.append(f"name={name}")
    if (config is None) == (resume is None):
        raise CnnctlError("give a CONFIG to start a run, or --resume RUN_DIR to continue one (not both)",
                          "cnnctl train configs/quickstart.yaml   or   cnnctl train --resume runs/NAME-...")
    cb = RichProgress(out) if out.is_terminal and not quiet else PlainProgress(out)
    run_dir = None
    try:
        if resume is not None:
            spec, ckpt = resume_spec(resume, overrides, force)
            trainer = Trainer(spec, cb, normalization=ckpt.normalization)
            trainer.restore(ckpt, resume)
            run_dir = resume
        else:
            spec, _ = load_config(config, overrides)
            trainer = Trainer(spec, cb)  # every check runs before the run directory exists
            run_dir = create_run_dir(runs_dir, spec.name)
        with _stop_on_signals(trainer):
            summary = trainer.fit(run_dir, resumed=resume is not None)
    except BaseException:
        if resume is None and run_dir is not None and not (run_dir / "checkpoints" / "last.safetensors").exists():
            _remove_empty_run(run_dir)
        raise
    finally:
        cb.close()
    best = summary["best"]
    if summary["stopped_early"]:
        out.print(f"early stopping after epoch {summary['final']['epoch']}")
    out.print(f"best {summary['monitor']} {_fmt(best[summary['monitor']], 'acc' in summary['monitor'])} at epoch "
              f"{best['epoch']}; wall time {summary['wall_seconds']:.1f}s")
    if "test" in summary:
        out.print(f"test accuracy {_fmt(summary['test']['accuracy'], True)} on {summary['test']['n']:,} images")
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


def _remove_empty_run(run_dir: Path) -> None:
    """A run that failed before its first epoch leaves no directory behind."""
    for p in sorted(run_dir.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    run_dir.rmdir()


@app.command("eval")
@guarded
def eval_(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A .safetensors checkpoint.")],
    data_split: Annotated[str, typer.Option("--data-split", help="test, val or train.")] = "test",
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot_file: Annotated[Path | None, typer.Option("--plot", help="Also draw the confusion matrix to this PNG "
                                                   "(needs cnnctl[plot]).")] = None,
):
    """Evaluate a checkpoint (it carries its own config): loss, accuracy, per-class precision/recall."""
    if data_split not in ("test", "val", "train"):
        raise CnnctlError(f"--data-split must be test, val or train, got {data_split!r}")
    ckpt = checkpoint.load(checkpoint_path)
    if set_:
        ckpt.config = apply_overrides(ckpt.config, list(set_))
    spec, model, rows = load_model(ckpt, checkpoint_path)
    ds = load_data(spec, rows, Seeds.from_seed(spec.seed), ckpt.normalization or None)
    loss_fn = build_loss(spec)
    res = evaluate(model, loss_fn, ds, ds.split(data_split), spec.data.batch_size, len(ds.classes))
    cm = res["confusion_matrix"]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(np.diag(cm) / cm.sum(axis=0))
        recall = np.nan_to_num(np.diag(cm) / cm.sum(axis=1))
    if plot_file is not None:
        plots.plot_confusion(cm, ds.classes, plot_file, f"{spec.name}: {data_split} split, accuracy "
                             f"{100 * res['accuracy']:.2f}%")
    if as_json:
        print(json.dumps({
            "checkpoint": str(checkpoint_path), "split": data_split, "loss": res["loss"], "accuracy": res["accuracy"],
            "n": res["n"], "classes": ds.classes, "precision": precision.tolist(), "recall": recall.tolist(),
            "confusion_matrix": cm.tolist(), "epoch": ckpt.epoch,
        }))
        return
    out.print(f"{checkpoint_path} (epoch {ckpt.epoch}) on the {data_split} split of {spec.data.dataset} "
              f"({res['n']:,} images)")
    out.print(f"loss {res['loss']:.4f}  accuracy {100 * res['accuracy']:.2f}%")
    per_class = Table(title="per class")
    for col in ("class", "support", "precision", "recall"):
        per_class.add_column(col, justify="right")
    for i, c in enumerate(ds.classes):
        per_class.add_row(escape(c), f"{int(cm[i].sum()):,}", f"{100 * precision[i]:.2f}%", f"{100 * recall[i]:.2f}%")
    out.print(per_class)
    conf = Table(title="confusion matrix (rows: true, columns: predicted)")
    conf.add_column("")
    for c in ds.classes:
        conf.add_column(c, justify="right")
    for i, c in enumerate(ds.classes):
        conf.add_row(escape(c), *(f"[bold]{v}[/]" if i == j else str(v) for j, v in enumerate(cm[i])))
    out.print(conf)


@app.command()
@guarded
def bench(
    target: Annotated[Path, typer.Argument(metavar="CONFIG_OR_CHECKPOINT")],
    set_: SetOption = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Default: data.batch_size.")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed training steps.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first.")] = 3,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Forward and backward ms per layer.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Time full training steps (forward, loss, backward, update) on synthetic data of the input shape."""
    spec, _ = _spec_for_inspect(target, list(set_ or []))
    res = run_bench(spec, batch_size, steps, warmup, per_layer)
    if as_json:
        print(json.dumps(res))
        return
    blas = res["blas"]
    threads = blas.get("threads") or "unknown"
    out.print(f"{spec.name}: batch {res['batch_size']}, {res['steps']} steps after {res['warmup']} warm-up")
    out.print(f"  {res['images_per_second']:,.0f} images/s   {res['ms_per_step']:.2f} ms/step (median; p10 "
              f"{res['ms_p10']:.2f}, p90 {res['ms_p90']:.2f})   {res['gflops']:.1f} GFLOP/s")
    out.print(f"  peak RSS {res['peak_rss_mb']:.0f} MB   BLAS threads {threads}"
              + (f" ({blas.get('library')} {blas.get('kernel')})" if blas.get("library") else "")
              + (f"   {escape(blas['note'])}" if blas.get("note") else ""))
    if per_layer:
        table = Table(title="per layer (ms per step)")
        for col in ("#", "name", "output shape", "forward", "backward"):
            table.add_column(col, justify="left" if col in ("name", "output shape") else "right")
        for r in res["layers"]:
            table.add_row(str(r["index"]), escape(r["name"]), str(tuple(r["output_shape"])), f"{r['forward_ms']:.3f}",
                          f"{r['backward_ms']:.3f}")
        out.print(table)


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
        return _sweep_report(folder)
    if not folder.is_dir():
        raise CnnctlError(f"runs folder not found: {folder}", "pass the folder given to --runs-dir (default: runs)")
    rows = runs_lib.list_runs(folder)
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=f"runs in {escape(str(folder))}")
    run_width = max([len(r["run"]) for r in rows] + [3])
    for col in ("run", "started", "status", "epochs", "best val", "test", "params", "wall"):
        table.add_column(col, justify="left" if col in ("run", "started", "status") else "right",
                         no_wrap=col != "run", min_width=run_width if col == "run" else None)
    colors = {"finished": "green", "interrupted": "yellow", "failed": "red", "running": "cyan"}
    for r in rows:
        table.add_row(escape(r["run"]), r["started"][5:16].replace("T", " ") if r["started"] else "-",
                      f"[{colors.get(r['status'], 'white')}]{r['status']}[/]",
                      f"{r['epochs_done'] or 0}/{r['epochs'] or '?'}", _fmt(r["best_val_acc"], True),
                      _fmt(r["test_acc"], True), f"{r['params']:,}" if r["params"] else "-",
                      f"{r['wall_seconds']:.0f}s" if r["wall_seconds"] is not None else "-")
    out.print(table)
    if not rows:
        out.print(f"no runs in {folder}")


def _run_dir_config(run_dir: Path) -> dict:
    info = runs_lib.run_info(run_dir)
    if info is None:
        raise CnnctlError(f"{run_dir} is not a run directory (no config.yaml)")
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def _runs_diff(a: Path, b: Path, as_json: bool) -> None:
    ca, cb = _run_dir_config(a), _run_dir_config(b)
    diffs = runs_lib.diff_configs(ca, cb)
    sa, sb = (runs_lib.read_json(p / "summary.json") or {} for p in (a, b))
    metrics = ["train_loss", "train_acc", "val_loss", "val_acc"]
    final = {k: ((sa.get("final") or {}).get(k), (sb.get("final") or {}).get(k)) for k in metrics}
    final["best_val_acc"] = ((sa.get("best") or {}).get("val_acc"), (sb.get("best") or {}).get("val_acc"))
    final["test_acc"] = ((sa.get("test") or {}).get("accuracy"), (sb.get("test") or {}).get("accuracy"))
    if as_json:
        print(json.dumps({"a": str(a), "b": str(b), "config": [{"key": k, "a": va, "b": vb} for k, va, vb in diffs],
                          "metrics": {k: {"a": va, "b": vb} for k, (va, vb) in final.items()}}))
        return
    table = Table(title="config keys that differ")
    for col in ("key", a.name, b.name):
        table.add_column(col)
    for k, va, vb in diffs:
        table.add_row(escape(k), escape(repr(va)), escape(repr(vb)))
    out.print(table if diffs else "the configs are identical")
    mt = Table(title="final metrics")
    for col in ("metric", a.name, b.name):
        mt.add_column(col, justify="left" if col == "metric" else "right")
    for k, (va, vb) in final.items():
        pct = k.endswith("acc")
        mt.add_row(k, _fmt(va, pct), _fmt(vb, pct))
    out.print(mt)


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CnnctlError(f"{run_dir} has no metrics.jsonl yet", "plot a run that finished at least one epoch")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@app.command()
@guarded
def plot(
    run: Annotated[Path, typer.Argument(metavar="RUN_DIR")],
    out_file: Annotated[Path | None, typer.Option("--out", help="Write a PNG (needs cnnctl[plot]); "
                                                  "without it, charts are drawn in the terminal.")] = None,
):
    """Loss and accuracy curves (train and validation) and the learning rate of a run; for a sweep
    directory, the metric against each searched key."""
    if (run / "results.csv").is_file() and (run / "sweep.yaml").is_file():
        if out_file is None:
            raise CnnctlError("plotting a sweep needs --out FILE.png", "or use cnnctl runs SWEEP_DIR for a table")
        spec = yaml.safe_load((run / "sweep.yaml").read_text())
        rows = list(csv.DictReader((run / "results.csv").open()))
        plots.plot_sweep(rows, spec.get("metric", "val_acc"), out_file, run.name)
        out.print(f"wrote {out_file}")
        return
    history = _history(run)
    if out_file is not None:
        plots.plot_curves(history, out_file, title=run.name)
        out.print(f"wrote {out_file}")
        return
    for title, keys in (("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc")),
                        ("learning rate", ("lr",))):
        out.print(f"[bold]{title}[/]")
        out.print(plots.text_chart({k: [r.get(k) for r in history] for k in keys}), markup=False, highlight=False)


@app.command()
@guarded
def viz(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT")],
    out_file: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    image: Annotated[Path | None, typer.Option("--image", help="Also show each conv layer's feature maps for "
                                               "this image (a picture file or an .npz).")] = None,
):
    """The first conv layer's filters as a grid; with --image, every conv layer's feature maps."""
    ckpt = checkpoint.load(checkpoint_path)
    spec, model, rows = load_model(ckpt, checkpoint_path)
    convs = [i for i, layer in enumerate(model.layers) if isinstance(layer, nn.Conv2D)]
    if not convs:
        raise CnnctlError(f"{checkpoint_path}: the model has no conv2d layer to show")
    if image is None:
        first = model.layers[convs[0]]
        plots.plot_filters(first.params["weight"], out_file, f"{model.names[convs[0]]} filters "
                           f"{tuple(first.params['weight'].shape)}")
    else:
        names, x01 = predict_lib.load_inputs([image], spec.model.input_shape)
        h = predict_lib.normalize(x01[:1], ckpt.normalization)
        maps = []
        for i, layer in enumerate(model.layers):
            h = layer.forward(h, training=False)
            if i in convs:
                maps.append((model.names[i], np.asarray(h[0])))
        plots.plot_feature_maps(maps, x01[0, 0] if x01.shape[1] == 1 else x01[0].transpose(1, 2, 0), out_file)
    out.print(f"wrote {out_file}")


@app.command()
@guarded
def schema(
    out_file: Annotated[Path | None, typer.Option("--out", help="Write to a file instead of stdout.")] = None,
):
    """The JSON Schema of the config file, for editor completion and checking."""
    text = json.dumps(config_schema(), indent=2) + "\n"
    if out_file is None:
        print(text, end="")
    else:
        checkpoint.atomic_write_bytes(out_file, text.encode())
        out.print(f"wrote {out_file}")


@app.command()
@guarded
def export(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT")],
    out_file: Annotated[Path, typer.Option("--out", help="File to write, e.g. model.onnx.")],
    fmt: Annotated[str, typer.Option("--format", help="Only onnx for now.")] = "onnx",
    softmax: Annotated[bool, typer.Option("--softmax", help="End the graph with Softmax (probabilities).")] = False,
):
    """Export a checkpoint as an ONNX graph (input: pixels on the 0..1 scale; normalisation baked in)."""
    if fmt != "onnx":
        raise CnnctlError(f"unknown --format {fmt!r}", "use --format onnx")
    ckpt = checkpoint.load(checkpoint_path)
    spec, model, _ = load_model(ckpt, checkpoint_path)
    export_onnx(model, spec.model.input_shape, ckpt.normalization, spec.name, out_file, softmax)
    out.print(f"wrote {out_file} (input 'input': N x {' x '.join(map(str, spec.model.input_shape))} pixels "
              f"in 0..1; output 'output': {'probabilities' if softmax else 'logits'})")


@app.command("predict")
@guarded
def predict_(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT")],
    inputs: Annotated[list[Path], typer.Argument(metavar="FILES...", help="Image files or .npz files.")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes to show per input.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Class probabilities for images (Pillow) or an .npz, normalised as in training."""
    ckpt = checkpoint.load(checkpoint_path)
    spec, model, _ = load_model(ckpt, checkpoint_path)
    names, x01 = predict_lib.load_inputs(inputs, spec.model.input_shape)
    logits = model.forward(predict_lib.normalize(x01, ckpt.normalization), training=False)
    probs = F.softmax(logits, axis=1) if spec.loss.type == "cross_entropy" else logits
    classes = _class_names(spec, logits.shape[1], ckpt)
    k = min(top_k, len(classes))
    results = []
    for name, p in zip(names, probs):
        order = np.argsort(-p, kind="stable")[:k]
        results.append({"input": name, "prediction": classes[order[0]],
                        "top": [{"class": classes[j], "probability": float(p[j])} for j in order]})
    if as_json:
        print(json.dumps(results))
        return
    table = Table(title=f"predictions of {checkpoint_path}")
    table.add_column("input")
    for r in range(k):
        table.add_column(f"#{r + 1}")
    for res in results:
        cells = (f"{escape(t['class'])} {100 * t['probability']:.1f}%" for t in res["top"])
        table.add_row(escape(res["input"]), *cells)
    out.print(table)


def _class_names(spec, n: int, ckpt) -> list[str]:
    names = (ckpt.trainer.get("classes") if ckpt.trainer else None) or dataset_info(spec.data)[0]
    return list(names) if names and len(names) == n else [str(i) for i in range(n)]


@app.command()
@guarded
def gradcheck(
    target: Annotated[Path, typer.Argument(metavar="CONFIG_OR_CHECKPOINT")],
    set_: SetOption = None,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Layer indices or names to check "
                                                     "(repeatable; default: all).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Entries checked per array.")] = 16,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Random inputs in the batch.")] = 2,
    tol: Annotated[float, typer.Option("--tol", help="Largest relative error that passes.")] = 1e-6,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Compare every layer's backprop gradients with central differences (float64) in the configured net."""
    spec, _ = _spec_for_inspect(target, list(set_ or []))
    model, rows = build_model(spec.model, np.random.default_rng(seed))
    only = None
    if layers:
        by_name = {r.name: r.index for r in rows}
        only = set()
        for item in layers:
            if item.isdigit() and int(item) < len(rows):
                only.add(int(item))
            elif item in by_name:
                only.add(by_name[item])
            else:
                raise CnnctlError(f"--layers {item!r}: no such layer", f"use an index 0..{len(rows) - 1} or one "
                                  f"of: {', '.join(by_name)}")
    results = check_network(model, spec.model.input_shape, batch, samples, seed, only)
    worst = max(r["error"] for r in results)
    if as_json:
        print(json.dumps({"tolerance": tol, "passed": worst < tol, "results": results}))
    else:
        table = Table(title=f"{spec.name}: analytic vs numerical gradients (float64, central differences)")
        for col in ("#", "layer", "param", "shape", "checked", "rel. error", ""):
            table.add_column(col, justify="right" if col in ("#", "checked", "rel. error") else "left")
        for r in results:
            ok = r["error"] < tol
            table.add_row("-" if r["index"] is None else str(r["index"]), escape(r["layer"]), r["param"],
                          str(tuple(r["shape"])), str(r["checked"]), f"{r['error']:.2e}",
                          "[green]ok[/]" if ok else "[red]FAIL[/]")
        out.print(table)
        out.print(f"largest relative error {worst:.2e} (tolerance {tol:g})")
    if worst >= tol:
        raise typer.Exit(1)


@app.command("sweep")
@guarded
def sweep_(
    sweep_file: Annotated[Path | None, typer.Argument(metavar="SWEEP.yaml", help="The sweep file.")] = None,
    executor: Annotated[str | None, typer.Option("--executor", help="local or ray (overrides the file).")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster address, e.g. auto or "
                                                "ray://host:10001 (implies --executor ray).")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where the sweep directory is created.")] = Path("runs"),
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue a sweep directory: finished trials "
                                                "are kept, the others rerun (from their last checkpoint).")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Only print the ranked trials of a sweep "
                                                "directory.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live table.")] = False,
):
    """Search over config overrides: every trial is an ordinary run under SWEEP_DIR/trials/."""
    if report is not None:
        return _sweep_report(report)
    ex = None
    if executor is not None or address is not None:
        kind = "ray" if address is not None else executor
        if kind not in ("local", "ray"):
            raise CnnctlError(f"--executor must be local or ray, got {executor!r}")
        ex = {"type": kind, **({"address": address} if address else {})}
    sweep, trials, specs, sweep_dir, results = sweep_lib.prepare(sweep_file, runs_dir, resume, ex)
    out.print(f"sweep {sweep.name}: {len(trials)} trials ({len(results)} finished before), executor "
              f"{sweep.executor.type}, metric {sweep.metric}; directory {sweep_dir}", soft_wrap=True)
    run = sweep_lib.EXECUTORS[sweep.executor.type]
    view = _SweepView(sweep, trials, sweep_dir, results)
    try:
        if out.is_terminal and not quiet:
            with Live(view, console=out, refresh_per_second=2):
                run(sweep, trials, specs, sweep_dir, results)
        else:
            run(sweep, trials, specs, sweep_dir, results,
                lambda tid, r: out.print(f"{tid}: {r['status']}" + (f", best {sweep.metric} {r['best']:.4f}"
                                         if r.get("best") is not None else "")
                                         + (f" ({r['error']})" if r.get("error") else ""), soft_wrap=True))
    except KeyboardInterrupt:
        sweep_lib.write_results(sweep_dir, trials, results, sweep, specs)
        err.print(f"[bold yellow]interrupted:[/] {len(results)} of {len(trials)} trials done", soft_wrap=True)
        err.print(f"  resume with: cnnctl sweep --resume {escape(str(sweep_dir))}")
        raise typer.Exit(130) from None
    best = sweep_lib.write_results(sweep_dir, trials, results, sweep, specs)
    out.print(view.table())
    if best is None:
        out.print("no trial produced the metric")
        raise typer.Exit(1)
    best_ckpt = sweep_dir / "trials" / best["trial"] / "checkpoints" / "best.safetensors"
    out.print(f"best: {best['trial']} {sweep.metric} {best['best']:.4f} (epoch {best['best_epoch']}) with "
              f"{best['overrides']}; checkpoint {best_ckpt}", soft_wrap=True)
    out.print(f"results: {sweep_dir / 'results.csv'}   best spec: {sweep_dir / 'best.yaml'}")


class _SweepView:
    """The live table of trials, read from the trial directories on every refresh."""

    def __init__(self, sweep, trials, sweep_dir: Path, results: dict):
        self.sweep, self.trials, self.sweep_dir, self.results = sweep, trials, sweep_dir, results

    def table(self) -> Table:
        mode = resolve_mode(self.sweep.metric, self.sweep.mode)
        t = Table(title=f"sweep {self.sweep.name}: {self.sweep.metric} ({mode})")
        for col in ("trial", "overrides", "status", "epochs", f"best {self.sweep.metric}"):
            t.add_column(col, justify="right" if col in ("epochs",) or col.startswith("best") else "left")
        for trial in self.trials:
            r = self.results.get(trial.id)
            run_dir = self.sweep_dir / "trials" / trial.id
            if r is None:
                r = trial_result(run_dir, self.sweep.metric, mode) if run_dir.is_dir() else {"status": "queued"}
                if run_dir.is_dir() and r["status"] != "failed":
                    r = {**r, "status": "running"}
                elif run_dir.is_dir():
                    r = {**r, "status": "starting"}
            best = r.get("best")
            t.add_row(trial.id, escape(" ".join(trial.as_set())), r["status"], str(r.get("epochs") or 0),
                      "-" if best is None else f"{best:.4f}")
        return t

    def __rich__(self):
        return self.table()


def _sweep_report(sweep_dir: Path) -> None:
    path = sweep_dir / "results.csv"
    if not path.is_file():
        raise CnnctlError(f"{sweep_dir} has no results.csv", "pass a directory that cnnctl sweep wrote")
    rows = list(csv.DictReader(path.open()))
    sweep_spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    metric, mode = sweep_spec.get("metric", "val_acc"), sweep_spec.get("mode", "auto")
    mode = resolve_mode(metric, mode)
    scored = sorted([r for r in rows if r["best"]], key=lambda r: float(r["best"]), reverse=mode == "max")
    table = Table(title=f"{sweep_dir.name}: trials ranked by {metric} ({mode})")
    for col in ("rank", "trial", metric, "epochs", "status", "overrides"):
        table.add_column(col)
    for i, r in enumerate(scored + [r for r in rows if not r["best"]], start=1):
        table.add_row(str(i) if r["best"] else "-", r["trial"], f"{float(r['best']):.4f}" if r["best"] else "-",
                      r["epochs"] or "-", escape(r["status"] + (f": {r['error']}" if r.get("error") else "")),
                      escape(r["overrides"]))
    out.print(table)


def _spec_for_inspect(target: Path, overrides: list[str]):
    if target.suffix == ".safetensors":
        ckpt = checkpoint.load(target)
        if overrides:
            ckpt.config = apply_overrides(ckpt.config, overrides)
        spec, _, rows = load_model(ckpt, target)
        return spec, rows
    spec, _ = load_config(target, overrides)
    _, rows = build_model(spec.model)
    return spec, rows


@app.command()
@guarded
def inspect(
    target: Annotated[Path, typer.Argument(metavar="CONFIG_OR_CHECKPOINT")],
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Validate a config (or a checkpoint's) and show each layer's output shape, parameters and MACs."""
    spec, rows = _spec_for_inspect(target, list(set_ or []))
    classes, image_shape = dataset_info(spec.data)
    if classes is not None:
        check_outputs(spec, rows, len(classes))
    if image_shape is not None and tuple(image_shape) != tuple(spec.model.input_shape):
        raise CnnctlError(f"dataset '{spec.data.dataset}' has images of shape {image_shape} but model.input_shape "
                          f"is {list(spec.model.input_shape)}", f"set model.input_shape: {list(image_shape)}")
    report = _report(spec, rows)
    try:  # the data too, when it is at hand (inspect never downloads)
        spec_local = spec.model_copy(update={"data": spec.data.model_copy(update={"download": False})})
        report["dataset"] = load_data(spec_local, rows, Seeds.from_seed(spec.seed)).describe()
    except DataError as e:
        report["dataset"] = {"name": spec.data.dataset, "unavailable": e.message}
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"{spec.name}: input {tuple(spec.model.input_shape)}")
    for col, just in [("#", "right"), ("name", "left"), ("type", "left"), ("output shape", "left"),
                      ("params", "right"), ("MACs", "right")]:
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(str(r.index), escape(r.name), r.type, str(_shape(r.output_shape)), f"{r.params:,}", f"{r.macs:,}")
    out.print(table)
    out.print(f"total parameters {report['total_params']:,}  ({report['param_bytes'] / 1e6:.2f} MB as float32)")
    out.print(f"total MACs per sample {report['total_macs']:,}")
    out.print(f"activation memory per sample {report['activation_bytes_per_sample'] / 1e3:,.1f} kB (float32)")
    d = report["dataset"]
    if "unavailable" in d:
        out.print(f"dataset {d['name']}: not loaded ({d['unavailable']})", soft_wrap=True)
    else:
        out.print(f"dataset {d['name']}: train {d['train']:,}  val {d['val']:,}  test {d['test']:,}  image "
                  f"{tuple(d['image_shape'])}  {len(d['classes'])} classes: {', '.join(d['classes'])}", soft_wrap=True)


def _shape(s):
    return s[0] if len(s) == 1 else s


def _report(spec, rows: list[LayerRow]) -> dict:
    total_params = sum(r.params for r in rows)
    act = sum(int(np.prod(r.output_shape)) for r in rows) * 4
    return {
        "name": spec.name, "input_shape": list(spec.model.input_shape),
        "layers": [{"index": r.index, "name": r.name, "type": r.type, "output_shape": list(r.output_shape),
                    "params": r.params, "macs": r.macs} for r in rows],
        "total_params": total_params, "param_bytes": total_params * 4, "total_macs": sum(r.macs for r in rows),
        "activation_bytes_per_sample": act,
    }


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
