"""cnnctl sweep: search over config overrides, with a live table of trials."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cnnctl.core.schedules import resolve_mode
from cnnctl.errors import CnnctlError
from cnnctl.tools import sweep as sweep_lib
from cnnctl.tools.sweep import trial_result

from .common import SetOption, ThreadsOption, app, err, fmt, guarded, out, table, use_threads


@app.command("sweep")
@guarded
def sweep_(
    sweep_file: Annotated[Path | None, typer.Argument(metavar="SWEEP.yaml", help="The sweep file.")] = None,
    executor: Annotated[str | None, typer.Option("--executor", metavar="NAME",
                                                 help="local or ray (overrides the file).")] = None,
    address: Annotated[str | None, typer.Option("--address", metavar="ADDRESS",
                                                help="Ray cluster address, e.g. auto or "
                                                "ray://host:10001 (implies --executor ray).")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", metavar="DIR",
                                           help="Where the sweep directory is created.")] = Path("runs"),
    resume: Annotated[Path | None, typer.Option("--resume", metavar="SWEEP_DIR",
                                                help="Continue a sweep directory: finished trials "
                                                "are kept, the others rerun (from their last checkpoint).")] = None,
    report: Annotated[Path | None, typer.Option("--report", metavar="SWEEP_DIR",
                                                help="Only print the ranked trials of a sweep "
                                                "directory.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live table.")] = False,
    set_: SetOption = None,
    threads: ThreadsOption = None,
):
    """Search over config overrides: every trial is an ordinary run under SWEEP_DIR/trials/."""
    use_threads(threads if threads is not None else 1)  # this process only reports; the trials do the work
    if report is not None:
        return sweep_report(report)
    ex = None
    if executor is not None or address is not None:
        kind = "ray" if address is not None else executor
        if kind not in ("local", "ray"):
            raise CnnctlError(f"--executor must be local or ray, got {executor!r}")
        ex = {"type": kind, **({"address": address} if address else {})}
    with contextlib.ExitStack() as held:
        sweep, trials, specs, sweep_dir, results = sweep_lib.prepare(sweep_file, runs_dir, resume, ex, held,
                                                                     list(set_ or []))
        _run(sweep, trials, specs, sweep_dir, results, threads, quiet, list(set_ or []))


def _metric(metric: str, value) -> str:
    """A metric as every verb shows it: accuracies in percent, losses to 4 decimals."""
    return fmt(value, metric.endswith("_acc"))


def _run(sweep, trials, specs, sweep_dir: Path, results: dict, threads: int | None, quiet: bool,
         sets: list[str] = ()) -> None:
    if threads is not None and sweep.executor.type == "local":  # threads per trial
        sweep.executor.blas_threads = threads
    out.print(f"sweep {sweep.name}: {len(trials)} trials ({len(results)} finished before), executor "
              f"{sweep.executor.type}, metric {sweep.metric}; directory {sweep_dir}", soft_wrap=True)
    same = [*sweep_lib.constants(sweep), *sets]
    if same:  # the same for every trial: said once, not on every row
        out.print(f"every trial: {' '.join(same)}", soft_wrap=True)
    run = sweep_lib.EXECUTORS[sweep.executor.type]
    view = _SweepView(sweep, trials, sweep_dir, results)
    stopped_by = []

    def on_signal(signum, frame):  # SIGTERM (timeout, Slurm, docker stop) stops the trials like Ctrl-C
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        if out.is_terminal and not quiet:
            with Live(view, console=out, refresh_per_second=2, transient=True):  # the final table follows once
                run(sweep, trials, specs, sweep_dir, results)
        else:
            run(sweep, trials, specs, sweep_dir, results,
                lambda tid, r: out.print(f"{tid}: {r['status']}" + (f", best {sweep.metric} "
                                         f"{_metric(sweep.metric, r['best'])}" if r.get("best") is not None else "")
                                         + (f" ({r['error']})" if r.get("error") else ""), soft_wrap=True))
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal while the trials are stopped
        sweep_lib.write_results(sweep_dir, trials, results, sweep, specs)
        err.print(Text.assemble(("interrupted: ", "bold yellow"), f"{len(results)} of {len(trials)} trials done; "
                                "the running trials were stopped"))
        err.print(f"  resume with: cnnctl sweep --resume {sweep_dir}")
        raise typer.Exit(128 + stopped_by[0] if stopped_by else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    best = sweep_lib.write_results(sweep_dir, trials, results, sweep, specs)
    out.print(view.table())
    failed = [tid for tid, r in results.items() if r["status"] == "failed"]
    if best is None:
        out.print("no trial produced the metric")
        raise typer.Exit(1)
    best_ckpt = sweep_dir / "trials" / best["trial"] / "checkpoints" / "best.safetensors"
    drawn = " ".join(next(t for t in trials if t.id == best["trial"]).drawn()) or "the base config"
    out.print(f"best: {best['trial']} {sweep.metric} {_metric(sweep.metric, best['best'])} (epoch "
              f"{best['best_epoch']}) with {drawn}; checkpoint {best_ckpt}", soft_wrap=True)
    out.print(f"results: {sweep_dir / 'results.csv'}   best spec: {sweep_dir / 'best.yaml'}")
    if failed:  # the best is of the trials that completed; the sweep is not
        err.print(Text.assemble((f"{len(failed)} of {len(trials)} trials failed: ", "bold red"), ", ".join(failed)))
        err.print(f"  see their errors above (or cnnctl runs {sweep_dir}); rerun them with: cnnctl sweep --resume "
                  f"{sweep_dir}")
        raise typer.Exit(1)


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
            t.add_row(trial.id, " ".join(trial.drawn()), r["status"], str(r.get("epochs") or 0),
                      _metric(self.sweep.metric, best))
        return t

    def __rich__(self):
        return self.table()


def sweep_report(sweep_dir: Path) -> None:
    metric, mode, rows = sweep_lib.read_report(sweep_dir)
    ranked, others = sweep_lib.ranked(rows, mode)
    out.print(table(f"{sweep_dir.name}: trials ranked by {metric} ({mode})",
                    ("rank", "trial", metric, "epochs", "status", "overrides"), rows=(
        (str(i) if i <= len(ranked) else "-", r["trial"], _metric(metric, r["best"]),
         str(r["epochs"] or "-"), r["status"] + (f": {r['error']}" if r["error"] else ""), r["drawn"])
        for i, r in enumerate(ranked + others, start=1))))

