"""train.cache_frozen measured: a linear probe on a frozen ResNet (configs/resnet-fashion-fast.yaml with every layer
but the last frozen, no augmentation, learning rate 0.01), trained with and without the cache, one run after the
other.

    python benchmarks/cache_frozen.py [--fashion ../shared/data/fashion-mnist] [--images 6000] [--epochs 4]
                                      [--out runs/cache-frozen]

The training images are the first `--images` of Fashion-MNIST's training split, the test images the first
1,000 of its test split (an .npz written once). Prints the wall time of each run (from summary.json: the cache's
one pass included), their ratio, and the test accuracies, which must agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnctl.data import idx  # noqa: E402

FROZEN = [f"model.layers.{i}.trainable=false" for i in range(5)]  # stem, batchnorm, three stages; dense trains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fashion", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-mnist")
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "cache-frozen")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    npz = a.out / f"fashion-{a.images}.npz"
    if not npz.is_file():
        x, y = idx.load_split(a.fashion, "train", "fashion_mnist")
        xt, yt = idx.load_split(a.fashion, "test", "fashion_mnist")
        np.savez(npz, x_train=x[: a.images], y_train=y[: a.images], x_test=xt[:1000], y_test=yt[:1000])
    results = {}
    for cached in (False, True):
        runs = a.out / ("cached" if cached else "plain")
        sets = [*FROZEN, "optimizer.lr=0.01", "data.dataset=npz", f"data.root={npz}", "data.augment={}",
                "data.test_time_augment={}",
                f"train.epochs={a.epochs}", f"train.validate_every={a.epochs}", "train.test_at_end=true",
                f"train.cache_frozen={str(cached).lower()}"]
        cmd = [sys.executable, "-m", "cnnctl", "train", str(ROOT / "configs" / "resnet-fashion-fast.yaml"), "-q",
               "--runs-dir", str(runs), *[arg for s in sets for arg in ("--set", s)]]
        print("$ " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
        run = max(runs.iterdir(), key=lambda p: p.stat().st_mtime)
        results[cached] = json.loads((run / "summary.json").read_text())
    plain, cached = results[False], results[True]
    print("| train.cache_frozen | wall time | test accuracy |")
    print("| --- | --- | --- |")
    for name, s in (("false", plain), ("true", cached)):
        print(f"| {name} | {s['wall_seconds']:.1f} s | {100 * s['test']['accuracy']:.2f}% |")
    print(f"speedup {plain['wall_seconds'] / cached['wall_seconds']:.2f}x over {a.epochs} epochs")


if __name__ == "__main__":
    main()
