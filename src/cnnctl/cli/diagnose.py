"""Checks before training: gradcheck and lr-find."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from cnnctl.config.reading import load_config
from cnnctl.tools import plots
from cnnctl.tools.gradcheck import gradcheck as gradcheck_lib
from cnnctl.tools.lr_find import MAX_LR, MIN_LR, STEPS, lr_chart_series, verdict
from cnnctl.tools.lr_find import lr_find as lr_find_lib

from .common import (
    JsonOption,
    SetOption,
    TargetArgument,
    ThreadsOption,
    app,
    check_writable,
    err,
    guarded,
    load_target,
    out,
    print_json,
    table,
    use_threads,
)


@app.command()
@guarded
def gradcheck(
    target: TargetArgument,
    set_: SetOption = None,
    layers: Annotated[list[str] | None, typer.Option("--layers", metavar="LAYER",
                                                     help="Layers to check: an index, a state-dict prefix "
                                                     "(layers.6) or a name "
                                                     "(repeatable; default: all).")] = None,
    samples: Annotated[int, typer.Option("--samples", metavar="N", min=1, help="Entries checked per array.")] = 16,
    batch: Annotated[int, typer.Option("--batch", metavar="N", min=1, help="Random inputs in the batch.")] = 2,
    tol: Annotated[float, typer.Option("--tol", metavar="TOL", help="Largest relative error that passes.")] = 1e-6,
    seed: Annotated[int, typer.Option("--seed", metavar="SEED")] = 0,
    as_json: JsonOption = False,
):
    """Compare every layer's backprop gradients with central differences (float64) in the configured net."""
    spec, rows, _ = load_target(target, list(set_ or []))
    with Progress(TextColumn("checking gradients"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("", total=None)
        results = gradcheck_lib(spec, rows, layers, samples, batch, tol, seed,
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
    min_lr: Annotated[float, typer.Option("--min-lr", metavar="LR", help="First rate of the ramp.")] = MIN_LR,
    max_lr: Annotated[float, typer.Option("--max-lr", metavar="LR", help="Last rate of the ramp.")] = MAX_LR,
    steps: Annotated[int, typer.Option("--steps", metavar="N", help="Batches, one rate each.")] = STEPS,
    out_file: Annotated[Path | None, typer.Option("--out", metavar="FILE.png", help="Draw loss against rate "
                                                  "(needs cnnctl[plot]).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {suggested_lr, lrs, losses}.")] = False,
    threads: ThreadsOption = None,
):
    """The learning-rate range test: train with an exponentially growing rate until the loss diverges, and
    suggest a rate (where the smoothed loss is lowest; a tenth of that for Adam and the other adaptive
    optimizers). Leaves no run directory."""
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
    out.print(plots.text_chart(lr_chart_series(res),
                               x_label=f"learning rate {res['lrs'][0]:.2g} .. {res['lrs'][-1]:.2g} (log scale)"))
    out.print(f"{len(res['lrs'])} steps from {res['lrs'][0]:.2g} to {res['lrs'][-1]:.2g}")
    for note in verdict(res, max_lr):
        out.print(note, soft_wrap=True)
    if res["suggested_lr"] is None:
        out.print("no suggestion: the loss did not fall; try a wider range (--min-lr / --max-lr) or more --steps")
    else:
        lr = f"{res['suggested_lr']:.2g}"
        why = ("a tenth of the rate where the smoothed loss is lowest: adaptive optimizers such as "
               f"{spec.optimizer.type} train best about a decade below it") if res["rule"] == "minimum/10" else \
            "where the smoothed loss is lowest"
        out.print(f"suggested learning rate {lr} ({why})")
        out.print(f"  --set optimizer.lr={lr}")
    if out_file is not None:
        out.print(f"wrote {out_file}")
