"""Training speed on a busy machine: cnnctl and PyTorch beside a competing training job, and two cnnctl runs at once.

    python benchmarks/under_load.py [--data ../shared/data/mnist] [--threads N] [--rounds 2] [--json]

Measures one LeNet-5 epoch on MNIST (`configs/lenet5-mnist.yaml`, batch 128; the epoch's `seconds` in
metrics.jsonl: training plus validation) and the same network trained by PyTorch for one epoch on the same
54,000 images (same batch, SGD with momentum, torch threads = --threads):

  * quiet, then beside a competing job that this script starts and stops itself (PyTorch training a
    CIFAR-size net on random data with 2 threads, as another user's training would); the target is that
    cnnctl's slowdown is at most 1.5 times PyTorch's own slowdown beside the same job;
  * two `cnnctl train` runs started together; the target is that each takes at most 2.2 times a solo run.

Everything runs twice: with the OpenBLAS variables as this machine sets them, and with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset (as on users' machines). Conditions alternate for --rounds rounds; medians are reported.
torch is a benchmark-only dependency (pip install torch==2.13.0).
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

ROOT = Path(__file__).resolve().parent.parent
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def cnnctl_epoch(data: Path, threads: int, env: dict, runs: Path) -> subprocess.Popen:
    """Start `cnnctl train` for one LeNet-5 epoch; the caller waits and reads the epoch time."""
    cmd = [sys.executable, "-m", "cnnctl", "train", str(ROOT / "configs/lenet5-mnist.yaml"), "-q",
           "--set", f"data.root={data}", "--set", "train.epochs=1", "--set", "train.test_at_end=false",
           "--threads", str(threads), "--runs-dir", str(runs)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def epoch_seconds(proc: subprocess.Popen, runs: Path) -> float:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"cnnctl train failed: {err}")
    newest = max(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    return float(json.loads((newest / "metrics.jsonl").read_text().splitlines()[0])["seconds"])


def torch_epoch(data: str, threads: int) -> float:
    """One PyTorch epoch of LeNet-5 on the 54,000 training images cnnctl trains on (run in a child process)."""
    import numpy as np
    import torch

    from cnnctl.data.idx import load_split

    torch.set_num_threads(threads)
    x, y = load_split(Path(data), "train", "mnist")
    x = torch.from_numpy((x[:54000].astype(np.float32) / 255 - 0.1307) / 0.3081)  # (N, 1, 28, 28)
    y = torch.from_numpy(y[:54000].astype(np.int64))
    tnn = torch.nn
    model = tnn.Sequential(tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(6, 16, 5),
                           tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(400, 120), tnn.ReLU(),
                           tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = tnn.CrossEntropyLoss()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for i in range(0, len(y), 128):
        idx = order[i : i + 128]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    return time.perf_counter() - t0


def compete() -> None:
    """The competing job: PyTorch with 2 threads training a CIFAR-size net on random data until killed."""
    import torch

    torch.set_num_threads(2)
    tnn = torch.nn
    model = tnn.Sequential(tnn.Conv2d(3, 32, 3, padding=1), tnn.ReLU(), tnn.Conv2d(32, 32, 3, padding=1), tnn.ReLU(),
                           tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(32 * 16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    while True:
        opt.zero_grad()
        tnn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def child(args: list[str], env: dict) -> float:
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(data: Path, threads: int, rounds: int, env: dict) -> dict:
    times: dict[str, list[float]] = {k: [] for k in ("cnnctl quiet", "torch quiet", "cnnctl loaded", "torch loaded",
                                                     "cnnctl two runs")}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        for _ in range(rounds):
            times["cnnctl quiet"].append(epoch_seconds(cnnctl_epoch(data, threads, env, runs / "q"), runs / "q"))
            times["torch quiet"].append(child(["--torch-epoch", str(data), str(threads)], env))
            job = subprocess.Popen([sys.executable, __file__, "--compete"], env=env, stdout=subprocess.DEVNULL)
            try:
                time.sleep(3)  # the job is training by now
                times["cnnctl loaded"].append(epoch_seconds(cnnctl_epoch(data, threads, env, runs / "l"), runs / "l"))
                times["torch loaded"].append(child(["--torch-epoch", str(data), str(threads)], env))
            finally:
                job.kill()
                job.wait()
            pair = [cnnctl_epoch(data, threads, env, runs / f"p{i}") for i in range(2)]
            times["cnnctl two runs"] += [epoch_seconds(p, runs / f"p{i}") for i, p in enumerate(pair)]
    med = {k: statistics.median(v) for k, v in times.items()}
    cn, to = med["cnnctl loaded"] / med["cnnctl quiet"], med["torch loaded"] / med["torch quiet"]
    return {"seconds": times, "median": med, "cnnctl_slowdown": cn, "torch_slowdown": to,
            "slowdown_ratio": cn / to, "slowdown_ratio_target": 1.5,
            "two_runs_ratio": max(times["cnnctl two runs"]) / med["cnnctl quiet"], "two_runs_target": 2.2}


def main():
    if sys.argv[1:2] == ["--compete"]:
        return compete()
    if sys.argv[1:2] == ["--torch-epoch"]:
        return print(torch_epoch(sys.argv[2], int(sys.argv[3])))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/mnist")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = {}
    for label, drop in (("OpenBLAS variables as set", ()), ("OpenBLAS variables unset", OPENBLAS_VARS)):
        env = {k: v for k, v in os.environ.items() if k not in drop}
        results[label] = measure(args.data.resolve(), args.threads, args.rounds, env)
        results[label]["env"] = {k: env.get(k) for k in OPENBLAS_VARS}
    if args.json:
        print(json.dumps(results))
        return
    print(f"LeNet-5, one MNIST epoch, batch 128, {args.threads} threads, {args.rounds} rounds (medians)\n")
    print("| OpenBLAS | cnnctl quiet | cnnctl loaded | slowdown | torch quiet | torch loaded | slowdown | "
          "ratio (target <= 1.5) | two runs, slower / solo (target <= 2.2) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        m = r["median"]
        print(f"| {label} | {m['cnnctl quiet']:.2f} s | {m['cnnctl loaded']:.2f} s | {r['cnnctl_slowdown']:.2f}x | "
              f"{m['torch quiet']:.2f} s | {m['torch loaded']:.2f} s | {r['torch_slowdown']:.2f}x | "
              f"{r['slowdown_ratio']:.2f} | {r['two_runs_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
