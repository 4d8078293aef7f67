"""Decoding a folder of JPEG pictures once (`cnnctl pack`) against decoding it in every run.

    python benchmarks/pack_time.py [--images 10000] [--size 224] [--input 64] [--work DIR]

Writes `--images` JPEG pictures of `--size` x `--size` pixels (Fashion-MNIST test images, scaled up and coloured,
from ../shared/data/fashion-mnist; random pictures without it) as a `dataset: folder` tree of 10 classes, then
times `cnnctl data CONFIG --json` (which decodes and resizes every picture to the 3 x INPUT x INPUT input, as
every train, eval and sweep trial does) and `cnnctl pack CONFIG --out DIR` (all usable cores), and `cnnctl data`
on the pack (which opens it, hashing every shard). Each is its own process; seconds per 10,000 pictures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent


def pictures(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    if (folder / "train").is_dir():
        return
    try:
        from cnnctl.data.idx import load_split

        x, y = load_split(ROOT.parent / "shared/data/fashion-mnist", "test", "fashion_mnist")
    except Exception:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)
    tint = np.random.default_rng(1).uniform(0.5, 1.0, (10, 3))
    for i in range(n):
        img = Image.fromarray(x[i % len(x), 0]).resize((size, size), Image.BILINEAR)
        rgb = (np.asarray(img)[:, :, None] * tint[y[i % len(y)]]).astype(np.uint8)
        d = folder / "train" / str(y[i % len(y)])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(d / f"{i:06d}.jpg", quality=90)


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnnctl", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--input", type=int, default=64)
    p.add_argument("--work", type=Path)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="pack-time-"))
    pictures(work / "folder", a.images, a.size)
    cfg = {"name": "jpeg", "data": {"dataset": "folder", "root": str(work / "folder")},
           "model": {"input_shape": [3, a.input, a.input], "layers": [{"type": "flatten"}, {"type": "dense",
                                                                                        "units": 10}]}}
    (work / "folder.yaml").write_text(yaml.safe_dump(cfg))
    cfg["data"] = {"dataset": "packed", "path": str(work / "pack")}
    (work / "packed.yaml").write_text(yaml.safe_dump(cfg))
    per = 10000 / a.images
    decode = timed(["data", str(work / "folder.yaml"), "--json"])
    pack = timed(["pack", str(work / "folder.yaml"), "--out", str(work / "pack")])
    opened = timed(["data", str(work / "packed.yaml"), "--json"])
    print(f"{time.strftime('%Y-%m-%d')}, {len(os.sched_getaffinity(0))} cores, {a.images:,} JPEGs of {a.size} x "
          f"{a.size}, input 3 x {a.input} x {a.input}")
    print(f"seconds per 10,000 pictures: decoded by a run {decode * per:.1f}; cnnctl pack {pack * per:.1f} (once); "
          f"a run opening the pack {opened * per:.1f}")


if __name__ == "__main__":
    main()
