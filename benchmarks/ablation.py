"""An airbench-style ablation: a base config, then one change added at a time, each row trained with several
seeds at a fixed epoch budget; a Markdown table of test accuracy (per seed and mean) and training compute.
Rows whose runs have not finished are left out.

    python benchmarks/ablation.py benchmarks/ablation-fashion.yaml [--data ../shared/data/fashion-mnist]
                                  [--config CONFIG] [--runs-dir runs/ablation] [--jobs 2] [--threads 1]
                                  [--rows N ...] [--table]

The spec file names the base config, the overrides every run gets (`set`), the seeds and the rows; each row
adds its own `--set` overrides to those of the rows above it (`cumulative: true`, the default) or to the base
alone; `--config` runs the same rows on another base config (give it its own `--runs-dir`). Every run is a
plain `cnnctl train CONFIG --set ...` (the command is printed and recorded under the run's directory), named
`<row>-s<seed>`; a run whose directory already holds a finished summary is not trained again, so an
interrupted ablation continues where it stopped, and `--table` only reads the runs. `--jobs` runs that many
trainings side by side, each with `--threads` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_spec(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    for key in ("config", "rows"):
        if key not in spec:
            sys.exit(f"{path}: no `{key}`: give the base config and the rows (see this script's docstring)")
    spec.setdefault("set", [])
    spec.setdefault("seeds", [0, 1])
    spec.setdefault("cumulative", True)
    return spec


def runs(spec: dict) -> list[dict]:
    """Every (row, seed) run with its full list of overrides."""
    out, above = [], []
    for k, row in enumerate(spec["rows"]):
        own = list(row.get("set", []))
        overrides = [*spec["set"], *(above if spec["cumulative"] else []), *own]
        above += own
        for seed in spec["seeds"]:
            out.append({"row": k, "run": f"{k:02d}-{slug(row['name'])}-s{seed}",
                        "overrides": [*overrides, f"seed={seed}"]})
    return out


def finished(runs_dir: Path, name: str) -> dict | None:
    """The summary of this run's newest directory that finished with a test accuracy."""
    for d in sorted(runs_dir.glob(f"{name}-*"), reverse=True):
        try:
            summary = json.loads((d / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        if summary.get("status") == "finished" and "test" in summary:
            return summary
    return None


def command(spec: dict, r: dict, data: str | None, runs_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "cnnctl", "train", str(ROOT / spec["config"]), "-q", "--runs-dir", str(runs_dir),
           "--name", r["run"]]
    for o in ([f"data.root={data}"] if data else []) + r["overrides"]:
        cmd += ["--set", o]
    return cmd


def train_all(spec: dict, todo: list[dict], data: str | None, runs_dir: Path, jobs: int, threads: int) -> None:
    env = {**os.environ, "CNNCTL_THREADS": str(threads)}
    waiting, running = list(todo), []
    while waiting or running:
        while waiting and len(running) < jobs:
            r = waiting.pop(0)
            cmd = command(spec, r, data, runs_dir)
            print("$ " + " ".join(cmd[1:]), flush=True)
            log = open(runs_dir / f"{r['run']}.log", "w")
            running.append((r, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(5)
        for item in list(running):
            r, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"{r['run']}: exit {proc.returncode}", flush=True)


def table(spec: dict, all_runs: list[dict], runs_dir: Path) -> str:
    """One row per ablation row: test accuracy per seed, their mean (over the seeds finished, counted when not
    all are), the change against the row above (cumulative) or the base (not), the largest training compute."""
    against = "vs above" if spec["cumulative"] else "vs base"
    lines = ["| row | change | " + " | ".join(f"seed {s}" for s in spec["seeds"]) + f" | mean | {against} | PFLOPs |",
             "| --- | --- | " + " | ".join("---" for _ in spec["seeds"]) + " | --- | --- | --- |"]
    reference = None
    for k, row in enumerate(spec["rows"]):
        accs, pflops = [], []
        for r in (r for r in all_runs if r["row"] == k):
            summary = finished(runs_dir, r["run"])
            if summary is None:
                accs.append(None)
                continue
            accs.append(100 * summary["test"]["accuracy"])
            pflops.append(summary["training_pflops"])
        done = [a for a in accs if a is not None]
        if not done:
            continue
        mean = sum(done) / len(done)
        shown = f"{mean:.2f}" + ("" if len(done) == len(accs) else f" ({len(done)} of {len(accs)})")
        delta = f"{mean - reference:+.2f}" if reference is not None else ""
        change = "; ".join(f"`{o}`" for o in row.get("set", [])) or "(base)"
        lines.append(f"| {row['name']} | {change} | " + " | ".join("" if a is None else f"{a:.2f}" for a in accs)
                     + f" | {shown} | {delta} | {max(pflops):.3f} |")
        if spec["cumulative"] or reference is None:
            reference = mean
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--data", help="data.root for every run (e.g. ../shared/data/fashion-mnist)")
    ap.add_argument("--config", help="base config instead of the spec's (the rows' keys must exist in it)")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--jobs", type=int, default=1, help="trainings side by side")
    ap.add_argument("--threads", type=int, default=2, help="threads of each training")
    ap.add_argument("--rows", type=int, nargs="*", help="only these rows (0 is the base)")
    ap.add_argument("--table", action="store_true", help="only print the table of the runs already finished")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    if args.config:
        spec["config"] = str(Path(args.config).resolve())
    all_runs = runs(spec)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    if not args.table:
        todo = [r for r in all_runs if (args.rows is None or r["row"] in args.rows)
                and finished(args.runs_dir, r["run"]) is None]
        train_all(spec, todo, args.data, args.runs_dir, args.jobs, args.threads)
    print(table(spec, all_runs, args.runs_dir))


if __name__ == "__main__":
    main()
