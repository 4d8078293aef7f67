"""The optimizer's update alone: `Optimizer.step()` on the parameters of vs_torch.py's networks, by optimizer.

    python benchmarks/optimizer_step.py [--optimizers sgd,adam] [--calls 20] [--rounds 7] [--json]

Each network is built as vs_torch.py builds it, its gradients set to fixed random numbers, and after five warm-up
steps `step()` is timed `--calls` times a round; the table gives the median of the rounds' mean times (ms) and
the number of parameter arrays and values. The update runs in the calling thread (no cnnctl threads), as in
training. The script uses only the library's public pieces, so the same command times an older checkout.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from vs_torch import CASES, machine_info, print_table, spec_for

from cnnctl.config.build import build_model
from cnnctl.core.optim import OPTIMIZER_SPECS
from cnnctl.tools.bench import blas_info

DEFAULTS = {"sgd": {"lr": 0.01, "momentum": 0.9}, "adam": {"lr": 1e-3}}


def time_step(name, layers, shape, tag: str, calls: int, rounds: int) -> dict:
    spec = spec_for(name, layers, shape, 1)
    rng = np.random.default_rng(0)
    model, rows = build_model(spec.model, rng)
    opt = OPTIMIZER_SPECS[tag].model_validate({"type": tag, **DEFAULTS.get(tag, {})}).build(model, rows)
    for _, layer, key in model.parameters():
        layer.grads[key] = (rng.standard_normal(layer.params[key].shape) * 1e-3).astype(layer.params[key].dtype)
    for _ in range(5):
        opt.step()
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            opt.step()
        means.append((time.perf_counter() - t0) / calls)
    params = list(model.trainable_parameters())
    return {"network": name, "optimizer": tag, "arrays": len(params), "values": sum(p.value.size for p in params),
            "ms": float(np.median(means)) * 1e3, "spread_ms": [min(means) * 1e3, max(means) * 1e3]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default="sgd,adam", help="Comma-separated optimizer types.")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    seen, results = set(), []
    for name, layers, shape, _, _ in CASES:
        # another batch size or activation has the same parameters: each set of them is timed once
        kinds = str([{k: v for k, v in layer.items() if k != "activation"} for layer in layers]) \
            if isinstance(layers, list) else layers
        if kinds in seen:
            continue
        seen.add(kinds)
        for tag in args.optimizers.split(","):
            results.append(time_step(name, layers, shape, tag, args.calls, args.rounds))
    if args.json:
        print(json.dumps({"machine": machine_info(blas_info()), "results": results}, indent=2))
        return
    print(f"machine: {machine_info(blas_info())}")
    print_table(["network", "optimizer", "parameter arrays", "values", "step() (ms)", "spread (ms)"],
                [[r["network"], r["optimizer"], r["arrays"], f"{r['values']:,}", f"{r['ms']:.3f}",
                  f"{r['spread_ms'][0]:.3f}-{r['spread_ms'][1]:.3f}"] for r in results])


if __name__ == "__main__":
    main()
