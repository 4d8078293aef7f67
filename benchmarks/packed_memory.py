"""Memory and speed of training on packed data as the dataset grows: `dataset: packed` against the same images in
memory.

    python benchmarks/packed_memory.py --data ../shared/data/mnist [--growth 1 4 16] [--work DIR] [--json]

Makes packs of MNIST's 60,000 training images repeated 1, 4 and 16 times (each copy shifted by a different
(rows, columns) offset, edges wrapped; 10,000 test images), written shard by shard so that this script never
holds a grown set either. Then trains LeNet-5 (`configs/lenet5-mnist.yaml`, batch 128, one epoch, no test) on
each pack, and on MNIST in memory (dataset: mnist), as its own process; /proc/PID/status is sampled every 20 ms
for the peak of RssAnon (the process's own memory: arrays, Python; not the page cache of the memory-mapped
shards) and of VmRSS (which counts the shards' pages it touched). Images/s: training images of the epoch over
its `seconds` in metrics.jsonl (training plus validation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHIFTS = [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1), (2, 0), (0, 2), (-2, 0),
          (0, -2), (2, 2), (-2, -2), (2, -2)]


def make_pack(mnist: Path, growth: int, out: Path) -> None:
    from cnnctl.data import packed
    from cnnctl.data.idx import load_split

    if (out / packed.MANIFEST).exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    x, y = load_split(mnist, "train", "mnist")
    xt, yt = load_split(mnist, "test", "mnist")
    per = packed.SHARD_BYTES // x[0].size
    n = len(x) * growth
    shards, lo, k = [], 0, 0
    while lo < n:
        hi = min(lo + per, n)
        rows = np.arange(lo, hi)
        part = np.empty((hi - lo, *x.shape[1:]), np.uint8)
        for copy in np.unique(rows // len(x)):  # each copy of the set shifted by its own offset
            mine = rows // len(x) == copy
            part[mine] = np.roll(x[rows[mine] % len(x)], SHIFTS[copy], axis=(2, 3))
        shards.append({"file": f"train-{k:05d}.npy", "rows": [lo, hi],
                       "sha256": packed.write_array(out / f"train-{k:05d}.npy", part)})
        lo, k = hi, k + 1
    splits = {"train": {"count": n, "shards": shards, "labels": {
        "file": "train-labels.npy", "sha256": packed.write_array(out / "train-labels.npy", np.tile(y, growth))}},
              "test": {"count": len(xt), "shards": [{"file": "test-00000.npy", "rows": [0, len(xt)],
                                                     "sha256": packed.write_array(out / "test-00000.npy", xt)}],
                       "labels": {"file": "test-labels.npy",
                                  "sha256": packed.write_array(out / "test-labels.npy", yt)}}}
    packed.write_manifest(out, [str(i) for i in range(10)], x.shape[1:],
                          {"made_by": f"benchmarks/packed_memory.py, MNIST x{growth}"}, splits)


def train(sets: list[str], runs: Path, threads: int | None) -> dict:
    """One LeNet-5 epoch with --set overrides `sets`: peak RssAnon and VmRSS (MB), images/s."""
    cmd = [sys.executable, "-m", "cnnctl", "train", str(ROOT / "configs/lenet5-mnist.yaml"), "-q",
           "--runs-dir", str(runs), "--set", "train.epochs=1", "--set", "train.test_at_end=false"]
    cmd += [a for s in sets for a in ("--set", s)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "VmRSS": 0}

    def sample():
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.02)
    watcher = threading.Thread(target=sample)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"cnnctl train failed: {err}")
    run = max(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    n = json.loads((run / "summary.json").read_text())["dataset"]["train"]
    return {"rss_anon_mb": peak["RssAnon"] / 1024, "vm_rss_mb": peak["VmRSS"] / 1024, "train_images": n,
            "images_per_s": n / row["seconds"], "seconds": row["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/mnist")
    p.add_argument("--growth", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--work", type=Path)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="packed-memory-"))
    rows = [{"data": "mnist in memory", **train([f"data.root={a.data}"], work / "runs", a.threads)}]
    for g in a.growth:
        make_pack(a.data, g, work / f"pack-x{g}")
        rows.append({"data": f"packed, MNIST x{g}", **train(
            ["data.dataset=packed", "data.root=null", f"data.path={work / f'pack-x{g}'}"], work / "runs",
            a.threads)})
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{time.strftime('%Y-%m-%d')}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    print("| data | training images | peak RssAnon (MB) | peak VmRSS (MB) | images/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['train_images']:,} | {r['rss_anon_mb']:.0f} | {r['vm_rss_mb']:.0f} | "
              f"{r['images_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
