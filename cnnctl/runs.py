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


def append_metrics(run_dir: Path, row: dict) -> None:
    """One epoch's row to metrics.csv (header first) and metrics.jsonl."""
    csv_path = run_dir / "metrics.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    if not csv_path.exists():
        writer.writeheader()
    writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
    _append_line(csv_path, buf.getvalue())
    _append_line(run_dir / "metrics.jsonl", json.dumps({k: row.get(k) for k in METRIC_FIELDS}) + "\n")
