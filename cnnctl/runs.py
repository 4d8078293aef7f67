"""Run directories: where a training run writes its config, metrics, checkpoints and summary."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import yaml

from .checkpoint import atomic_write_bytes

METRIC_FIELDS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def create_run_dir(runs_dir: str | Path, name: str) -> Path:
    """runs_dir/NAME-YYYYmmdd-HHMMSS, with -2, -3, ... appended if that exists already."""
    base = Path(runs_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            (path / "checkpoints").mkdir()
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def write_yaml(path: Path, data: dict) -> None:
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _append_line(path: Path, line: str) -> None:
    """Append one whole line with a single write, then fsync, so a crash never leaves a torn line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _csv_line(row: dict, header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
    return buf.getvalue()


def _json_line(row: dict) -> str:
    return json.dumps({k: row.get(k) for k in METRIC_FIELDS}) + "\n"


def rewrite_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Replace metrics.csv and metrics.jsonl with exactly these rows (atomically); no rows, no files."""
    for name in ("metrics.csv", "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    if rows:
        csv_text = "".join(_csv_line(r, i == 0) for i, r in enumerate(rows))
        atomic_write_bytes(run_dir / "metrics.csv", csv_text.encode())
        atomic_write_bytes(run_dir / "metrics.jsonl", "".join(_json_line(r) for r in rows).encode())


def append_metrics(run_dir: Path, row: dict) -> None:
    """One epoch's row to metrics.csv (header first) and metrics.jsonl."""
    csv_path = run_dir / "metrics.csv"
    _append_line(csv_path, _csv_line(row, header=not csv_path.exists()))
    _append_line(run_dir / "metrics.jsonl", _json_line(row))
