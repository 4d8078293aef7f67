"""Run directories: where a training run writes its config, metrics, checkpoints and summary."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import shlex
import stat
import sys
import time
from pathlib import Path

import yaml

from cnnctl.core.fileio import Unreadable, atomic_write_bytes, json_text, read_regular
from cnnctl.errors import CnnctlError

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
        except OSError as e:  # runs_dir is a file, read-only, too long a name, ...
            raise CnnctlError(f"cannot create the run directory {path}: {e.strerror or e}",
                              "pass --runs-dir a writable folder (and a shorter --name)") from None


def own_dir(path: Path) -> Path:
    """A given run directory (a sweep's trial) made with its checkpoints folder, if it is not there yet."""
    try:
        (Path(path) / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnctlError(f"cannot create the run directory {path}: {e.strerror or e}",
                          "give the sweep a writable folder") from None
    return Path(path)


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold an exclusive lock on a run directory while training writes to it; a second process is refused with
    the holder's pid. The lock is the kernel's (flock), so it ends with its process however that ends: a lock
    file left by a killed run is never stale. The lock file is opened without following links and must be a
    regular file of its own (a run directory from elsewhere may hold a `.lock` that links to another file);
    nothing is written to it before the lock is held. Temporary files found once the lock is held were left
    by a killed writer, and are removed."""
    path = Path(run_dir) / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise CnnctlError(f"cannot lock the run directory {run_dir}: {path.name}: {why}",
                          f"remove {path} if it is not a plain file cnnctl made, and check that {run_dir} is "
                          "writable") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            what = "not a regular file" if not stat.S_ISREG(info.st_mode) else "a hard link to another file"
            raise CnnctlError(f"cannot lock the run directory {run_dir}: {path} is {what}",
                              f"remove {path}; cnnctl makes a new one")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise CnnctlError(f"{run_dir} is being trained by another process (pid {holder})",
                              "wait for it to finish, or stop it first") from None
        try:  # the holder's pid, for the message above; only ever written under the lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            raise CnnctlError(f"cannot write {path}: {e.strerror or e}",
                              "free disk space, or make the run directory writable") from None
        for stale in [*Path(run_dir).glob(".*.tmp"), *Path(run_dir).glob("checkpoints/.*.tmp")]:
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_yaml(path: Path, data: dict) -> None:
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json_text(data, indent=2) + "\n").encode())


def _append_line(path: Path, line: str) -> None:
    """Append one whole line with a single write, then fsync, so a crash never leaves a torn line; a write the
    OS refuses or cuts short (a full disk) is undone and becomes a CnnctlError naming the file."""
    data = line.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "the write was cut short (is the disk full?)")
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)
    except OSError as e:
        raise CnnctlError(f"cannot append to {path}: {e.strerror or e}",
                          "free space on that disk (or pass --runs-dir a folder on another), then continue the run "
                          "with cnnctl train --resume RUN_DIR") from None


def _csv_line(row: dict, header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
    return buf.getvalue()


def _json_line(row: dict) -> str:
    return json_text({k: row.get(k) for k in METRIC_FIELDS}) + "\n"


def rewrite_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Replace metrics.csv and metrics.jsonl with exactly these rows, each file atomically (a failed write
    leaves the old file whole); no rows, no files."""
    if not rows:
        for name in ("metrics.csv", "metrics.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
        return
    csv_text = "".join(_csv_line(r, i == 0) for i, r in enumerate(rows))
    atomic_write_bytes(run_dir / "metrics.csv", csv_text.encode())
    atomic_write_bytes(run_dir / "metrics.jsonl", "".join(_json_line(r) for r in rows).encode())


def append_metrics(run_dir: Path, row: dict) -> None:
    """One epoch's row to metrics.csv (header first) and metrics.jsonl."""
    csv_path = run_dir / "metrics.csv"
    _append_line(csv_path, _csv_line(row, header=not csv_path.exists()))
    _append_line(run_dir / "metrics.jsonl", _json_line(row))


MAX_RUN_FILE = 64 << 20  # summary.json, metrics.jsonl: far more than a run of any length writes


def read_run_file(path: Path) -> str | None:
    """The text of a file a run wrote, by the bounded regular-file reader: None when it is missing, is not a
    regular file (a FIFO is never waited on, a device never read), is larger than MAX_RUN_FILE or unreadable."""
    try:
        return read_regular(Path(path), MAX_RUN_FILE).decode("utf-8", errors="replace")
    except Unreadable:
        return None


def read_json(path: Path) -> dict | None:
    """A JSON object from path, or None when it is missing, unreadable, malformed or not an object."""
    text = read_run_file(path)
    try:
        data = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


# the numbers an epoch row holds; anything else in their place (a string, null, NaN, a missing key) reads as None
NUMERIC_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def clean_row(row: dict, position: int) -> dict:
    """An epoch row whose fields have their types: `epoch` a positive whole number (the row's position when it is
    missing or damaged), each numeric field that is there a finite float or None."""
    out = dict(row)
    epoch = row.get("epoch")
    out["epoch"] = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > 0 else position
    for k in NUMERIC_KEYS:
        if k in row:
            out[k] = _of("number", row[k])
    return out


def read_history(run_dir: Path) -> list[dict]:
    """The epoch rows of metrics.jsonl (empty before the first epoch ends), each through clean_row."""
    text = read_run_file(Path(run_dir) / "metrics.jsonl")
    rows = []
    for line in (text or "").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line torn by a crash mid-write (or edited by hand): the others still count
        if isinstance(row, dict):
            rows.append(clean_row(row, len(rows) + 1))
    return rows


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _of(kind: str, v):
    """v when it is of the kind a summary field holds ("text", "count", "number"), else None: a damaged or
    hand-edited summary.json shows n/a in that field, never an error."""
    if kind == "text":
        return v if isinstance(v, str) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    if kind == "count":
        return v if isinstance(v, int) and v >= 0 else None
    return float(v)


def run_info(run_dir: Path) -> dict | None:
    """One row of `cnnctl runs`, or None when run_dir is not a run directory. Every field has its type or is
    None, whatever summary.json holds."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return None
    summary = read_json(run_dir / "summary.json") or {}
    status = _of("text", summary.get("status")) or "unknown"
    if status in ("running", "testing") and not _pid_alive(summary.get("pid")):
        status = "interrupted"  # killed without a chance to say so
    best, test = (v if isinstance(v, dict) else {} for v in (summary.get("best"), summary.get("test")))
    return {
        "run": run_dir.name, "path": str(run_dir), "name": _of("text", summary.get("name")),
        "started": _of("text", summary.get("started")), "status": status,
        "epochs_done": _of("count", summary.get("epochs_done")), "epochs": _of("count", summary.get("epochs")),
        "best_val_acc": _of("number", best.get("val_acc")), "test_acc": _of("number", test.get("accuracy")),
        "params": _of("count", summary.get("params")), "wall_seconds": _of("number", summary.get("wall_seconds")),
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command this process was started with, as a user would type it again: `cnnctl train ...`,
    `python -m cnnctl train ...` or `python script.py ...` (a script calling cnnctl.train)."""
    argv = list(sys.argv if argv is None else argv) or ["python"]
    first = Path(argv[0])
    if first.name == "__main__.py":
        head = ["python", "-m", first.parent.name]
    elif first.suffix == ".py":
        head = ["python", argv[0]]
    else:
        head = [first.name]
    return shlex.join(head + argv[1:])


def record_test(checkpoint: Path, result: dict) -> tuple[Path, bool] | None:
    """A test-split evaluation of a run's own checkpoint (cnnctl eval, cnnctl.evaluate) kept in the run's
    summary.json: under `evaluations` by checkpoint file, and as the run's `test` (what `cnnctl runs` and the
    report show) when the run has no test of its own (train.test_at_end off, or stopped before it), preferring
    best.safetensors. Returns the run directory and whether the result became the run's `test`, or None when
    nothing was written: a checkpoint outside a run directory, or a run being trained now (its lock is held), or
    one that cannot be written."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints" or not (run_dir / "summary.json").is_file():
        return None
    entry = {"loss": result["loss"], "accuracy": result["accuracy"], "n": result["n"], "epoch": result["epoch"],
             "checkpoint": checkpoint.name, "by": "cnnctl eval", "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        with locked(run_dir):
            summary = read_json(run_dir / "summary.json") or {}
            evaluations = summary.get("evaluations") if isinstance(summary.get("evaluations"), dict) else {}
            summary["evaluations"] = {**evaluations, checkpoint.name: entry}
            test = summary.get("test") if isinstance(summary.get("test"), dict) else None
            as_test = test is None or (test.get("by") == "cnnctl eval" and (
                checkpoint.name == "best.safetensors" or test.get("checkpoint") == checkpoint.name))
            if as_test:
                summary["test"] = entry
            write_json(run_dir / "summary.json", summary)
    except (CnnctlError, OSError):
        return None
    return run_dir, as_test


def list_runs(runs_dir: Path) -> list[dict]:
    """Every run directory under runs_dir (also one level down, for sweeps), oldest first."""
    runs_dir = Path(runs_dir)
    candidates = [p for p in runs_dir.iterdir() if p.is_dir()] if runs_dir.is_dir() else []
    candidates += [p for p in runs_dir.glob("*/trials/*") if p.is_dir()]
    rows = []
    for p in candidates:
        r = run_info(p)
        if r is not None:
            if p.parent.name == "trials" and (p.parent.parent / "sweep.yaml").is_file():
                r["run"] = f"{p.parent.parent.name}/{p.name}"  # a sweep's trial: named with its sweep
            rows.append(r)
    return sorted(rows, key=lambda r: (r["started"] or "", r["run"]))


def flatten(data, prefix: str = "") -> dict:
    """{'a': {'b': 1}, 'l': [x]} -> {'a.b': 1, 'l.0': x}: the dotted keys --set understands."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, (dict, list)) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}


def diff_configs(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(dotted key, value in a, value in b) for every key whose values differ (missing: None)."""
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def remove_run(run_dir: Path) -> None:
    """A run that failed before its first epoch leaves no directory behind."""
    for p in sorted(run_dir.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    run_dir.rmdir()


def config_of(run_dir: Path) -> dict:
    """A run directory's resolved config (config.yaml)."""
    from cnnctl.config.reading import read_yaml

    if run_info(run_dir) is None:
        raise CnnctlError(f"{run_dir} is not a run directory (no config.yaml)")
    return read_yaml(run_dir / "config.yaml")[0]


def history_of(run_dir: Path) -> list[dict]:
    """A run's epoch rows (metrics.jsonl); a run without any is an error."""
    history = read_history(run_dir)
    if not history:
        raise CnnctlError(f"{run_dir} has no metrics.jsonl yet", "plot a run that finished at least one epoch")
    return history


def compare_runs(a: Path, b: Path) -> tuple[list[tuple[str, object, object]], dict[str, tuple]]:
    """The config keys two runs differ in (as --set paths) and their final metrics side by side."""
    diffs = diff_configs(config_of(a), config_of(b))
    sa, sb = (read_json(p / "summary.json") or {} for p in (a, b))
    final = {k: ((sa.get("final") or {}).get(k), (sb.get("final") or {}).get(k))
             for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
    final["best_val_acc"] = ((sa.get("best") or {}).get("val_acc"), (sb.get("best") or {}).get("val_acc"))
    final["test_acc"] = ((sa.get("test") or {}).get("accuracy"), (sb.get("test") or {}).get("accuracy"))
    return diffs, final


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoints/epoch-N.safetensors, oldest epoch first: by the number, so epoch-10000 comes after epoch-9999
    (the names are zero-padded to 4 digits only)."""
    def epoch(path: Path) -> int:
        number = path.stem.partition("-")[2]
        return int(number) if number.isascii() and number.isdigit() else -1

    return sorted((Path(run_dir) / "checkpoints").glob("epoch-*.safetensors"), key=epoch)
