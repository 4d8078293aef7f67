"""The learning-rate finder's suggestion rules against a small sweep of trained learning rates.

    python benchmarks/lr_find_study.py [--only quickstart|lenet5-mnist|resnet-fashion] [--data ../shared/data]
                                       [--out benchmarks/results/lr_find_study.json]
    python benchmarks/lr_find_study.py --table benchmarks/results/lr_find_study.json

For each network: the range test (`cnnctl lr-find`'s curve, from the config's seed), then the same config
trained at each rate of a grid a half-decade apart (the rest of its config as it is: optimizer, schedule,
warm-up), each trial's best validation accuracy kept. Every rule of cnnctl.tools.lr_find.RULES is applied
to the curve and its suggestion compared with the grid's best rate (the ratio of the larger to the smaller).
Results are merged into --out network by network, so networks can be run one at a time; --table prints the
markdown table of a results file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (config, overrides that shorten it, the grid of peak rates); the range test runs with the verb's defaults
NETWORKS = {
    "quickstart": ("configs/quickstart.yaml", [], [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
    "lenet5-mnist": ("configs/lenet5-mnist.yaml", ["train.epochs=3", "train.test_at_end=false", "data.root={mnist}"],
                     [3e-3, 1e-2, 3e-2, 1e-1, 3e-1]),
    # held out (the rule was chosen on the three above): the quick start with momentum SGD instead of Adam
    "quickstart-sgd": ("configs/quickstart.yaml", ["optimizer={{type: sgd, lr: 0.01, momentum: 0.9}}"],
                       [3e-3, 1e-2, 3e-2, 1e-1, 3e-1]),
    "resnet-fashion": ("configs/resnet-fashion-fast.yaml",
                       ["train.epochs=2", "data.augment.random_crop=0", "data.augment.horizontal_flip=false",
                        "data.test_time_augment.horizontal_flip=false", "data.test_time_augment.shifts=[]",
                        "train.validate_every=2", "data.root={fashion}"],
                       [1e-2, 3e-2, 1e-1, 3e-1, 1.0]),
}


def study(name: str, data: Path, trials: list[dict] | None = None) -> dict:
    """The range test's curve and the grid's trials (the recorded `trials` when given: the curve alone again)."""
    import cnnctl
    from cnnctl.config.reading import load_config
    from cnnctl.tools.lr_find import MAX_LR, MIN_LR, RULES, STEPS, lr_find

    config, shorten, grid = NETWORKS[name]
    overrides = [o.format(mnist=data / "mnist", fashion=data / "fashion-mnist") for o in shorten]
    spec, _ = load_config(ROOT / config, overrides)
    t = time.perf_counter()
    curve = lr_find(spec, MIN_LR, MAX_LR, STEPS)
    curve_seconds = time.perf_counter() - t
    if trials is not None:
        grid = []
    trials = trials or []
    with tempfile.TemporaryDirectory() as runs:
        for lr in grid:
            t = time.perf_counter()
            run = cnnctl.train(ROOT / config, overrides=[*overrides, f"optimizer.lr={lr}"], runs_dir=runs)
            best = max((r["val_acc"] for r in run.history if r.get("val_acc") is not None), default=None)
            trials.append({"lr": lr, "best_val_acc": best, "seconds": round(time.perf_counter() - t, 1)})
            print(f"{name}: lr {lr:g} -> best val_acc {best}", flush=True)
    best_lr = max(trials, key=lambda r: r["best_val_acc"])["lr"]
    suggestions = {rule: fn(curve["lrs"], curve["losses"]) for rule, fn in RULES.items()}
    return {"config": config, "overrides": shorten, "range": [MIN_LR, MAX_LR], "steps": STEPS,
            "optimizer": spec.optimizer.type, "rule": curve["rule"], "suggested": curve["suggested_lr"],
            "curve": {"lrs": curve["lrs"], "losses": curve["losses"], "raw": curve["raw_losses"],
                      "seconds": round(curve_seconds, 1)},
            "trials": trials, "best_lr": best_lr, "suggestions": suggestions,
            "ratio": {rule: None if lr is None else max(lr, best_lr) / min(lr, best_lr)
                      for rule, lr in suggestions.items()}}


def machine() -> dict:
    """The CPU model, BLAS kernel and whether the OpenBLAS variables were set, as every figure names them."""
    import os

    from threadpoolctl import threadpool_info

    from cnnctl.core.environment import cpu_model

    blas = next((p for p in threadpool_info() if p.get("user_api") == "blas"), {})
    return {"cpu": cpu_model(), "blas": f"{blas.get('internal_api')} {blas.get('version')} {blas.get('architecture')}",
            "openblas_variables": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}}


def table(results: dict) -> str:
    """The comparison as a markdown table: the grid's best rate, each rule's suggestion and its ratio."""
    from cnnctl.tools.lr_find import RULES

    rules = list(RULES)
    head = ["network (optimizer)", "grid (best val acc)", "best rate", "cnnctl's suggestion (ratio)",
            *(f"{r} (ratio)" for r in rules)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["networks"].items():
        grid = ", ".join(f"{t['lr']:g} ({100 * t['best_val_acc']:.2f}%)" for t in r["trials"])
        ours = r["suggestions"][r["rule"]]
        cells = [f"{name} ({r['optimizer']})", grid, f"{r['best_lr']:g}",
                 f"**{ours:.2g} ({max(ours, r['best_lr']) / min(ours, r['best_lr']):.1f}x)**, {r['rule']}"]
        for rule in rules:
            lr = r["suggestions"].get(rule)
            cells.append("none" if lr is None else f"{lr:.2g} ({r['ratio'][rule]:.1f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(NETWORKS), action="append")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lr_find_study.json")
    ap.add_argument("--table", type=Path, help="print the table of a results file and exit")
    ap.add_argument("--curve-only", action="store_true", help="run the range test again, keep the recorded trials")
    args = ap.parse_args()
    if args.table:
        results = json.loads(args.table.read_text())
        # the rules are applied anew to the recorded curves, so a changed rule is compared without training again
        from cnnctl.tools.lr_find import RULES

        for r in results["networks"].values():
            r["suggestions"] = {rule: fn(r["curve"]["lrs"], r["curve"]["losses"]) for rule, fn in RULES.items()}
            r["ratio"] = {rule: None if v is None else max(v, r["best_lr"]) / min(v, r["best_lr"])
                          for rule, v in r["suggestions"].items()}
        print(table(results))
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"networks": {}}
    for name in args.only or list(NETWORKS):
        recorded = results["networks"].get(name, {}).get("trials") if args.curve_only else None
        results["networks"][name] = study(name, args.data.resolve(), recorded)
        results["networks"][name]["date"] = time.strftime("%Y-%m-%d")
        results["networks"][name]["machine"] = machine()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, allow_nan=False))
    print(table(results))


if __name__ == "__main__":
    main()
