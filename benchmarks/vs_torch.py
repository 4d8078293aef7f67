"""cnnctl against PyTorch (CPU) on the same networks, batch sizes and thread count, in one process.

    python benchmarks/vs_torch.py [--steps 30] [--warmup 10] [--rounds 3] [--threads N] [--only NAME] [--json]

Prints a markdown table of images/s for both and the ratio cnnctl / torch (targets: >= 1.0 for LeNet-5 at
batch 32 and 128, >= 0.8 for the CIFAR-size net, ResNet-20 and the resnet-fashion model; the CIFAR-size net
with GELU and with SiLU has no target), plus the machine it ran on. cnnctl runs as the CLI does (its own
--threads threads, BLAS single-threaded); torch gets the same
thread count; the ResNets are built from their configs and converted with tests/torch_models.py. torch is a
benchmark-only dependency (pip install torch==2.13.0). Each measurement times full training steps: forward,
cross-entropy loss, backward and an SGD-with-momentum update, on synthetic data, after warm-up. The two
frameworks alternate for --rounds rounds; each round gives a ratio (torch's median step time / cnnctl's, of
that round), and the table gives the median of those ratios, each framework's median images/s, and its spread
over the rounds (lowest-highest images/s): a noisy moment on the machine moves one round, not the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.torch_models

from cnnctl.config.build import build_model  # noqa: E402
from cnnctl.config.reading import read_config  # noqa: E402
from cnnctl.config.spec import Spec  # noqa: E402
from cnnctl.core import parallel  # noqa: E402
from cnnctl.tools.bench import bench, blas_info  # noqa: E402

LENET = [
    {"type": "conv2d", "filters": 6, "kernel_size": 5, "padding": 2, "activation": "relu"},
    {"type": "maxpool2d", "kernel_size": 2},
    {"type": "conv2d", "filters": 16, "kernel_size": 5, "activation": "relu"},
    {"type": "maxpool2d", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "dense", "units": 120, "activation": "relu"},
    {"type": "dense", "units": 84, "activation": "relu"},
    {"type": "dense", "units": 10},
]
CIFAR = [
    {"type": "conv2d", "filters": 32, "kernel_size": 3, "padding": 1, "activation": "relu"},
    {"type": "conv2d", "filters": 32, "kernel_size": 3, "padding": 1, "activation": "relu"},
    {"type": "maxpool2d", "kernel_size": 2},
    {"type": "conv2d", "filters": 64, "kernel_size": 3, "padding": 1, "activation": "relu"},
    {"type": "conv2d", "filters": 64, "kernel_size": 3, "padding": 1, "activation": "relu"},
    {"type": "maxpool2d", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "dense", "units": 256, "activation": "relu"},
    {"type": "dense", "units": 10},
]
def _with(layers: list[dict], activation: str) -> list[dict]:
    """The layers with every ReLU replaced by another activation."""
    return [{**layer, "activation": activation} if layer.get("activation") == "relu" else layer for layer in layers]


CASES = [("LeNet-5", LENET, (1, 28, 28), 32, 1.0), ("LeNet-5", LENET, (1, 28, 28), 128, 1.0),
         ("CIFAR-size net", CIFAR, (3, 32, 32), 128, 0.8),
         ("CIFAR-size net GELU", _with(CIFAR, "gelu"), (3, 32, 32), 128, None),
         ("CIFAR-size net SiLU", _with(CIFAR, "silu"), (3, 32, 32), 128, None),
         ("ResNet-20", ROOT / "configs/resnet20-cifar10.yaml", (3, 32, 32), 128, 0.8),
         ("resnet-fashion", ROOT / "configs/resnet-fashion.yaml", (1, 28, 28), 128, 0.8)]


def spec_for(name, layers, shape, batch) -> Spec:
    """A spec for the case: its layers, or a config file's model; SGD with momentum 0.9 either way."""
    model = ({"input_shape": list(shape), "layers": layers} if isinstance(layers, list)
             else read_config(layers)[0]["model"])
    return Spec.model_validate({
        "name": name.replace(" ", "-"), "data": {"dataset": "shapes", "batch_size": batch},
        "model": model, "optimizer": {"type": "sgd", "lr": 0.01, "momentum": 0.9},
    })


def torch_module(spec: Spec):
    """The same network in torch (tests/torch_models.py: the converter the reference tests use)."""
    from tests.torch_models import to_torch

    return to_torch(build_model(spec.model, np.random.default_rng(0))[0])


def bench_torch(spec: Spec, batch, steps, warmup):
    """Full training steps in torch: forward, cross-entropy, backward, SGD with momentum 0.9 (as ours)."""
    import torch

    model = torch_module(spec).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, *spec.model.input_shape)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    ms = median_seconds(step, steps, warmup) * 1e3
    return {"ms_per_step": ms, "images_per_second": batch / (ms / 1e3)}


def median_seconds(fn, reps: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `reps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def machine_info(blas: dict) -> dict:
    """What a benchmark result depends on: CPU, cores, library versions, BLAS and its two variables."""
    import torch

    from cnnctl.core.environment import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "numpy": np.__version__, "torch": torch.__version__,
            "blas": blas, "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE")}


def print_table(header: list[str], rows: list[list]) -> None:
    """A markdown table, as the README shows it."""
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=parallel.available_cores(),
                    help="Threads for both (default: the cores this process may use).")
    ap.add_argument("--only", help="Run only the cases whose name contains this (e.g. ResNet).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    threads = parallel.use(args.threads)  # cnnctl's own threads, BLAS single-threaded, as the CLI does
    torch.set_num_threads(threads)
    blas = blas_info()
    rows = []
    for name, layers, shape, batch, target in CASES:
        if args.only and args.only.lower() not in name.lower():
            continue
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(bench(spec_for(name, layers, shape, batch), batch, args.steps, args.warmup))
            theirs.append(bench_torch(spec_for(name, layers, shape, batch), batch, args.steps, args.warmup))
        ours_ms = [r["ms_per_step"] for r in ours]
        theirs_ms = [r["ms_per_step"] for r in theirs]
        rows.append({"network": name, "input": "x".join(map(str, shape)), "batch": batch,
                     "cnnctl_images_per_second": batch / float(np.median(ours_ms)) * 1e3,
                     "cnnctl_spread": [batch / max(ours_ms) * 1e3, batch / min(ours_ms) * 1e3],
                     "torch_images_per_second": batch / float(np.median(theirs_ms)) * 1e3,
                     "torch_spread": [batch / max(theirs_ms) * 1e3, batch / min(theirs_ms) * 1e3],
                     "round_ratios": [t / o for t, o in zip(theirs_ms, ours_ms)],
                     "ratio": float(np.median([t / o for t, o in zip(theirs_ms, ours_ms)])), "target": target,
                     "cnnctl_peak_rss_mb": ours[-1]["peak_rss_mb"]})
    if args.json:
        print(json.dumps({"machine": machine_info(blas), "results": rows}, indent=2))
        return
    print(f"machine: {machine_info(blas)}")
    def spread(lo_hi):
        return f"{lo_hi[0]:,.0f}-{lo_hi[1]:,.0f}"

    print_table(["network", "input", "batch", "cnnctl img/s (spread)", "torch img/s (spread)",
                 "median ratio (rounds)", "target"],
                [[r["network"], r["input"], r["batch"],
                  f"{r['cnnctl_images_per_second']:,.0f} ({spread(r['cnnctl_spread'])})",
                  f"{r['torch_images_per_second']:,.0f} ({spread(r['torch_spread'])})",
                  f"**{r['ratio']:.2f}** ({', '.join(f'{v:.2f}' for v in r['round_ratios'])})",
                  f">= {r['target']:.1f}" if r["target"] else "-"]
                 for r in rows])
    print(f"peak RSS of this process: {rows[-1]['cnnctl_peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
