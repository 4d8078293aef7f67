"""Memory and speed of training on packed data as the dataset grows: `dataset: packed` against the same images in
memory.

    python benchmarks/packed_memory.py --data ../shared/data/mnist [--growth 1 4 16] [--rounds 3] [--work DIR]
    python benchmarks/packed_memory.py --size 224 --base 3125 [--growth 1 4 16] [--rounds 1] [--work DIR]

Makes packs of MNIST's 60,000 training images (or the first --base of them) repeated 1, 4 and 16 times (each
copy shifted by a different (rows, columns) offset, edges wrapped; 10,000 test images, or --base / 4), written
shard by shard so that this script never holds a grown set either. With --size 224 every image is enlarged to
3 x 224 x 224 (nearest neighbour; the red, green and blue planes shifted apart), 150,528 bytes an image, and the
network is a small strided one for that input (SMALL_224). Then trains one epoch (LeNet-5,
`configs/lenet5-mnist.yaml`, batch 128, no test, at 28 x 28) on each pack, and on the x1 images in memory
(dataset: mnist; at 224, an .npz of them), each run its own process; /proc/PID/status is sampled every 20 ms
for the peak of RssAnon (the process's own memory: arrays, Python; not the page cache of the memory-mapped
shards) and of VmRSS (which counts the shards' pages it touched). Images/s: training images of the epoch over
its `seconds` in metrics.jsonl (training plus validation; with --epochs N, the last epoch's). --rounds N runs
the whole row set N times, one row after another, and gives each row's median with the range.
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


SMALL_224 = """\
name: packed-224
seed: 0
data: {dataset: npz, batch_size: 64, val_split: 0.1, normalize: auto}
model:
  input_shape: [3, 224, 224]
  layers:
    - {type: conv2d, filters: 8, kernel_size: 8, stride: 8, activation: relu}     # -> 8x28x28
    - {type: conv2d, filters: 16, kernel_size: 3, padding: 1, activation: relu}   # -> 16x28x28
    - {type: maxpool2d, kernel_size: 4}                                           # -> 16x7x7
    - {type: flatten}
    - {type: dense, units: 10}
optimizer: {type: sgd, lr: 0.05, momentum: 0.9}
train: {epochs: 1, test_at_end: false}
"""


def source(mnist: Path, size: int, base: int | None):
    """MNIST's training and test images (the first `base` and base / 4), at 1 x 28 x 28 or enlarged to 3 x size x
    size, with their labels."""
    from cnnctl.data.idx import load_split

    (x, y), (xt, yt) = (load_split(mnist, split, "mnist") for split in ("train", "test"))
    if base:
        x, y, xt, yt = x[:base], y[:base], xt[: max(base // 4, 1)], yt[: max(base // 4, 1)]
    if size != 28:
        x, xt = (enlarge(a, size) for a in (x, xt))
    return x, y, xt, yt


def enlarge(x: np.ndarray, size: int) -> np.ndarray:
    """(N, 1, 28, 28) -> (N, 3, size, size): nearest neighbour, the three planes shifted apart."""
    rows = np.arange(size) * 28 // size
    big = x[:, 0][:, rows][:, :, rows]
    return np.stack([np.roll(big, k * size // 32, axis=2) for k in range(3)], axis=1)


def make_pack(data: tuple, growth: int, out: Path) -> None:
    from cnnctl.data import packed

    if (out / packed.MANIFEST).exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    x, y, xt, yt = data
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
                          {"made_by": f"benchmarks/packed_memory.py, MNIST {x.shape[1:]} x{growth}"}, splits)


def train(config: Path, sets: list[str], runs: Path, threads: int | None, epochs: int = 1) -> dict:
    """`epochs` epochs of config with --set overrides `sets`: peak RssAnon and VmRSS (MB), images/s of the last
    epoch (the first touches every page of a pack; later ones find them mapped)."""
    cmd = [sys.executable, "-m", "cnnctl", "train", str(config), "-q",
           "--runs-dir", str(runs), "--set", f"train.epochs={epochs}", "--set", "train.test_at_end=false",
           "--set", "train.validate_every=1"]
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
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    n = json.loads((run / "summary.json").read_text())["dataset"]["train"]
    return {"rss_anon_mb": peak["RssAnon"] / 1024, "vm_rss_mb": peak["VmRSS"] / 1024, "train_images": n,
            "images_per_s": n / row["seconds"], "seconds": row["seconds"]}


def median_row(label: str, results: list[dict]) -> dict:
    """A row's medians over rounds, with the range of images/s."""
    speed = [r["images_per_s"] for r in results]
    return {"data": label, "train_images": results[0]["train_images"], "rounds": len(results),
            "rss_anon_mb": float(np.median([r["rss_anon_mb"] for r in results])),
            "rss_anon_max_mb": max(r["rss_anon_mb"] for r in results),
            "vm_rss_mb": float(np.median([r["vm_rss_mb"] for r in results])),
            "images_per_s": float(np.median(speed)), "images_per_s_range": [min(speed), max(speed)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/mnist")
    p.add_argument("--growth", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--size", type=int, default=28, help="28 (MNIST as it is) or larger (3 x SIZE x SIZE)")
    p.add_argument("--base", type=int, help="training images of the x1 set (default: all 60,000)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1, help="epochs a run; images/s are the last epoch's")
    p.add_argument("--work", type=Path)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="packed-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{a.size}-{a.base or 'all'}"
    data = source(a.data, a.size, a.base)
    if a.size == 28 and not a.base:
        config, in_memory = ROOT / "configs/lenet5-mnist.yaml", [f"data.root={a.data}"]
    else:
        config = work / f"packed-{a.size}.yaml"
        config.write_text(SMALL_224.replace("224", str(a.size)) if a.size != 28 else
                          (ROOT / "configs/lenet5-mnist.yaml").read_text().replace("dataset: mnist", "dataset: npz"))
        npz = work / f"in-memory-{tag}.npz"
        if not npz.exists():
            np.savez(npz, x_train=data[0], y_train=data[1], x_test=data[2], y_test=data[3])
        in_memory = [f"data.root={npz}", f"data.classes={json.dumps([str(i) for i in range(10)])}"]
    for g in a.growth:
        make_pack(data, g, work / f"pack-{tag}-x{g}")
    kinds = [("x1 in memory", in_memory)] + [
        (f"packed, x{g}", ["data.dataset=packed", "data.root=null", f"data.path={work / f'pack-{tag}-x{g}'}"])
        for g in a.growth]
    results = {label: [] for label, _ in kinds}
    for _ in range(a.rounds):  # every row once per round, so that a slow spell of the machine falls on all of them
        for label, sets in kinds:
            results[label].append(train(config, sets, work / "runs", a.threads, a.epochs))
    rows = [median_row(label, results[label]) for label, _ in kinds]
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    shape = "1 x 28 x 28" if a.size == 28 else f"3 x {a.size} x {a.size}"
    print(f"{time.strftime('%Y-%m-%d')}, {shape}, {a.rounds} round(s) of {a.epochs} epoch(s), "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    print("| data | training images | peak RssAnon (MB), median (max) | peak VmRSS (MB) | images/s, median (range) |")
    print("|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["images_per_s_range"]
        print(f"| {r['data']} | {r['train_images']:,} | {r['rss_anon_mb']:.0f} ({r['rss_anon_max_mb']:.0f}) | "
              f"{r['vm_rss_mb']:.0f} | {r['images_per_s']:,.0f} ({lo:,.0f}-{hi:,.0f}) |")


if __name__ == "__main__":
    main()
