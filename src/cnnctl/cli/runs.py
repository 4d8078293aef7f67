"""Run directories: runs (list, compare), plot and report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from cnnctl.core.fileio import atomic_write_bytes
from cnnctl.errors import CnnctlError
from cnnctl.run import runs as runs_lib
from cnnctl.tools import plots
from cnnctl.tools import sweep as sweep_lib

from .common import (
    JsonOption,
    ThreadsOption,
    app,
    check_writable,
    err,
    fmt,
    guarded,
    out,
    print_json,
    table,
    use_threads,
)
from .sweep import sweep_report


@app.command("runs")
@guarded
def runs_(
    args: Annotated[list[str] | None, typer.Argument(metavar="[RUNS_DIR] | diff RUN_A RUN_B",
                                                     help="A runs folder (default: runs), or diff A B")] = None,
    as_json: JsonOption = False,
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
        out.print(plots.text_chart({k: [r.get(k) for r in history] for k in keys}, width=min(out.width, 160)),
                  markup=False, highlight=False, soft_wrap=True)


@app.command()
@guarded
def report(
    target: Annotated[Path, typer.Argument(metavar="RUN_DIR|SWEEP_DIR")],
    out_file: Annotated[Path | None, typer.Option("--out", metavar="FILE.html", help="Where the page goes "
                                                  "(default: RUN_DIR/report.html).")] = None,
    threads: ThreadsOption = None,
):
    """One self-contained HTML page about a run or a sweep: status, config, model, curves, evaluation, the most
    confidently wrong images with their saliency and Grad-CAM, calibration, filters, plan. For a sweep, each
    trial's page is written beside it (trials/ID/report.html) and the sweep's page links them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cnnctl.tools import plots, sweep_page
    from cnnctl.tools import report as report_lib

    use_threads(threads)
    target = Path(target)
    if not target.is_dir():
        raise CnnctlError(f"{target} is not a folder", "pass a run directory or a sweep directory")
    out_file = out_file or target / "report.html"
    check_writable(out_file, "--out")
    plots.pyplot()  # its pictures need matplotlib: without it, the install line before any work
    if (target / "sweep.yaml").is_file():
        with Progress(TextColumn("trial pages"), BarColumn(), MofNCompleteColumn(), console=err, transient=True,
                      disable=not err.is_terminal) as bar:
            task = bar.add_task("pages", total=None)
            pages = sweep_page.trial_pages(target, lambda done, total: bar.update(task, completed=done,
                                                                                  total=total))
        text = sweep_page.sweep_page(target, pages, out_file.parent)
    else:
        text = report_lib.run_page(target)
    atomic_write_bytes(out_file, text.encode("utf-8"))
    out.print(f"wrote {out_file} ({len(text) / 1e6:.2f} MB, self-contained: open it in any browser)")
