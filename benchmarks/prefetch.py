"""Training speed with and without prefetching (data.prefetch): one epoch of a config each way, alternating.

    python benchmarks/prefetch.py CONFIG [--set K=V ...] [--rounds 2] [--threads N]

Prints the median epoch seconds (training plus validation, metrics.jsonl) with `data.prefetch=false` and `true`
and their ratio; the two runs' metrics are checked equal, as they must be.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def epoch(config: Path, sets: list[str], prefetch: bool, runs: Path, threads: int | None) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "cnnctl", "train", str(config), "-q", "--runs-dir", str(runs),
           "--set", "train.epochs=1", "--set", "train.test_at_end=false",
           "--set", f"data.prefetch={str(prefetch).lower()}"]
    cmd += [a for s in sets for a in ("--set", s)] + (["--threads", str(threads)] if threads else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    run = max(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return row.pop("seconds"), row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int)
    a = p.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="prefetch-"))
    times, rows = {False: [], True: []}, {}
    for _ in range(a.rounds):
        for on in (False, True):
            seconds, rows[on] = epoch(a.config, a.sets, on, runs, a.threads)
            times[on].append(seconds)
    if rows[False] != rows[True]:
        raise SystemExit(f"the metrics differ: {rows[False]} vs {rows[True]}")
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"{time.strftime('%Y-%m-%d')}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, "
          f"{a.config} {' '.join(a.sets)}")
    print(f"epoch seconds: prefetch off {off:.2f}, on {on:.2f}; speedup {off / on:.2f}x (medians of {a.rounds})")


if __name__ == "__main__":
    main()
