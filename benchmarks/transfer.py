"""Transfer learning measured: a network trained on MNIST, exported to ONNX, imported with `cnnctl import`, then
fine-tuned on a few hundred Fashion-MNIST images, against the same network trained from scratch on those images.

    python benchmarks/transfer.py [--mnist ../shared/data/mnist] [--fashion ../shared/data/fashion-mnist]
                                  [--images 500] [--seeds 0 1] [--epochs 30] [--out runs/transfer] [--table]

Every step is a plain cnnctl command, printed as it runs: `train` configs/lenet5-mnist.yaml on MNIST, `export` it,
`import` the ONNX file, then for each seed `train` the imported config on the small set twice, with
`--init-from` the imported weights and without. The small set is `--images` training images drawn at random
(seed 0, every class equally often) from Fashion-MNIST's training split, saved as an .npz with the full 10,000
test images; both runs of a seed use the same images, the same validation split (a tenth) and the same
normalisation (MNIST's, which the imported network was trained with). Finished runs are not trained again;
`--table` only reads them. Prints a Markdown table of test accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnctl.data import idx  # noqa: E402


def cnnctl(*args) -> None:
    cmd = [sys.executable, "-m", "cnnctl", *map(str, args)]
    print("$ cnnctl " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def finished(runs: Path) -> Path | None:
    for run in sorted(runs.glob("*")) if runs.is_dir() else []:
        summary = run / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "finished":
            return run
    return None


def small_set(fashion: Path, images: int, out: Path) -> Path:
    if out.is_file():
        return out
    x, y = idx.load_split(fashion, "train", "fashion_mnist")
    x_test, y_test = idx.load_split(fashion, "test", "fashion_mnist")
    g = np.random.default_rng(0)
    per_class = images // 10
    pick = np.sort(np.concatenate([g.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)]))
    np.savez(out, x_train=x[pick], y_train=y[pick], x_test=x_test, y_test=y_test)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    ap.add_argument("--fashion", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-mnist")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "transfer")
    ap.add_argument("--table", action="store_true", help="Only read the finished runs.")
    a = ap.parse_args()
    out = a.out
    if not a.table:
        out.mkdir(parents=True, exist_ok=True)
        if finished(out / "pretrain") is None:
            cnnctl("train", ROOT / "configs" / "lenet5-mnist.yaml", "--set", f"data.root={a.mnist}", "-q",
                   "--runs-dir", out / "pretrain")
        onnx_file = out / "lenet5-mnist.onnx"
        if not onnx_file.is_file():
            cnnctl("export", finished(out / "pretrain"), "--out", onnx_file)
        if not (out / "imported" / "model.safetensors").is_file():
            cnnctl("import", onnx_file, "--out", out / "imported", "--classes", _classes(out))
        data = small_set(a.fashion, a.images, out / f"fashion-{a.images}.npz")
        config = yaml.safe_load((out / "imported" / "config.yaml").read_text())
        config["name"] = "transfer"
        config["data"].update(dataset="npz", root=str(data), batch_size=32, val_split=0.1)
        config.update(optimizer={"type": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005},
                      schedule={"type": "cosine"}, train={"epochs": a.epochs, "test_at_end": True})
        (out / "transfer.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        for seed in a.seeds:
            for kind, extra in (("fine-tuned", ["--init-from", out / "imported" / "model.safetensors"]),
                                ("scratch", [])):
                runs = out / f"{kind}-s{seed}"
                if finished(runs) is None:
                    cnnctl("train", out / "transfer.yaml", "--set", f"seed={seed}", *extra, "-q", "--runs-dir", runs)
    print(f"| start | {' | '.join(f'seed {s}' for s in a.seeds)} | mean |")
    print(f"| --- | {' | '.join('---' for _ in a.seeds)} | --- |")
    for kind in ("fine-tuned", "scratch"):
        accs = []
        for seed in a.seeds:
            run = finished(out / f"{kind}-s{seed}")
            accs.append(json.loads((run / "summary.json").read_text())["test"]["accuracy"] if run else None)
        cells = [f"{100 * v:.2f}%" if v is not None else "-" for v in accs]
        done = [v for v in accs if v is not None]
        mean = f"{100 * sum(done) / len(done):.2f}%" if done else "-"
        print(f"| {kind} | {' | '.join(cells)} | {mean} |")


def _classes(out: Path) -> Path:
    path = out / "fashion-classes.txt"
    path.write_text("\n".join(["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                               "bag", "ankle boot"]) + "\n")
    return path


if __name__ == "__main__":
    main()
