"""The page of a sweep (cnnctl report SWEEP_DIR): its trials ranked with their test accuracy, wall time and a
link to each trial's own page (cnnctl report's run page, written beside the trial), each trial's curve, and
the metric against each searched key."""

from __future__ import annotations

import os
from pathlib import Path

from cnnctl.core.fileio import atomic_write_bytes
from cnnctl.errors import CnnctlError
from cnnctl.run import runs

from . import plots
from . import sweep as sweep_lib
from .markup import Html, document, escape, figure, num, pct, table
from .report import run_page


def trial_pages(sweep_dir: Path, progress=None) -> dict[str, Path]:
    """Each trial's own page, written beside its run (trials/ID/report.html): {trial id: page}. `progress(done,
    total)` after each."""
    folders = sorted(p for p in (Path(sweep_dir) / "trials").glob("*") if runs.run_info(p) is not None)
    pages = {}
    for i, folder in enumerate(folders, start=1):
        page = folder / "report.html"
        if not _up_to_date(page, folder):
            atomic_write_bytes(page, run_page(folder).encode("utf-8"))
        pages[folder.name] = page
        if progress is not None:
            progress(i, len(folders))
    return pages


def _up_to_date(page: Path, run_dir: Path) -> bool:
    """A trial's page written after everything it shows last changed (summary, metrics, config, checkpoints)."""
    shown = [run_dir / "summary.json", run_dir / "metrics.jsonl", run_dir / "config.yaml",
             *(run_dir / "checkpoints").glob("*.safetensors")]
    try:
        written = page.stat().st_mtime
        return all(f.stat().st_mtime < written for f in shown if f.exists())
    except OSError:
        return False


def sweep_page(sweep_dir: Path, pages: dict[str, Path] | None = None, here: Path | None = None) -> str:
    """The page of a sweep: its trials ranked (values, metric, test accuracy, epochs, wall time, status and a link
    to each trial's page in `pages`, relative to the folder `here` the page goes in), each trial's metric per
    epoch, and the metric against each searched key."""
    sweep_dir = Path(sweep_dir)
    metric, mode, rows = sweep_lib.read_report(sweep_dir)
    ranked, others = sweep_lib.ranked(rows, mode)
    shown = (lambda v: pct(v)) if metric.endswith("_acc") else (lambda v: num(v))
    info = {r["trial"]: runs.run_info(sweep_dir / "trials" / r["trial"]) or {} for r in rows}
    pages, here = pages or {}, Path(here or sweep_dir)

    def link(trial):
        page = pages.get(trial)
        return Html(f'<a href="{escape(Path(os.path.relpath(page, here)).as_posix())}">page</a>') if page else "-"

    ranking = table(f"Trials ranked by {metric} ({mode})",
                   ["rank", "trial", "values", metric, "test accuracy", "epochs", "wall time", "status", "report"],
                   [[str(i) if i <= len(ranked) else "-", r["trial"], r["drawn"], shown(r["best"]),
                     pct(info[r["trial"]].get("test_acc")), r["epochs"] or "-",
                     f"{r['seconds']:.1f} s" if r["seconds"] is not None else "-",
                     r["status"] + (f": {r['error']}" if r["error"] else ""), link(r["trial"])]
                    for i, r in enumerate(ranked + others, start=1)], left=3)
    histories = {r["trial"]: runs.read_history(sweep_dir / "trials" / r["trial"]) for r in ranked + others
                 if (sweep_dir / "trials" / r["trial"]).is_dir()}
    curves = plots.plot_trial_curves(histories, metric, None, f"{metric} of each trial per epoch") \
        if any(histories.values()) else None
    try:
        png = plots.plot_sweep(rows, metric, None, f"{sweep_dir.name}: {metric} against each searched key")
    except CnnctlError:
        png = None
    sections = [f"<header><h1>Sweep {escape(sweep_dir.name)}</h1><p>{len(rows)} trials, {len(ranked)} with a "
                f"result; metric {escape(metric)} ({escape(mode)}).</p></header>",
                f"<section><h2>Trials</h2>{ranking}</section>",
                "<section><h2>Each trial's curve</h2>" +
                (figure(curves, f"{metric} per epoch, one line per trial", "One line per trial.") if curves
                 else '<p class="note">No trial has finished an epoch yet.</p>') + "</section>",
                "<section><h2>The metric against each searched key</h2>" +
                (figure(png, f"{metric} of each trial against the value of each searched key",
                         "Each point is a trial.") if png else '<p class="note">No trial has a result yet.</p>') +
                "</section>"]
    return document(f"cnnctl sweep {sweep_dir.name}", sections)
