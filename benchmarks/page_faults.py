"""Page faults and kernel time of a training step, with glibc's default malloc policy and with the one cnnctl sets
(cnnctl.core.allocator: memory a step frees kept for the next).

    python benchmarks/page_faults.py [--steps 10] [--rounds 3] [--only NAME] [--json]

Each network of benchmarks/vs_torch.py trains in a process of its own, the two policies alternating for --rounds
rounds, cnnctl's threads as the CLI runs them. After three warm-up steps, each step's minor page faults, kernel
(system) CPU time and wall time are read (getrusage, perf_counter); the table gives each policy's medians over
every step of every round, and the spread of the rounds' median step times. Linux with glibc only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from vs_torch import CASES, print_table, spec_for

from cnnctl.config.build import build_loss, build_model
from cnnctl.core import allocator, parallel
from cnnctl.core import plan as plans
from cnnctl.core.environment import blas_info, cpu_model
from cnnctl.run.step import TrainingStep


def child(index: int, policy: str, steps: int) -> dict:
    """Train case `index` for 3 + steps steps under `policy` and return the per-step figures."""
    if policy == "glibc":
        allocator._kept = False  # taken as done: parallel.use leaves malloc as glibc set it
    parallel.use(parallel.resolve(None))
    name, layers, shape, batch, _ = CASES[index]
    spec = spec_for(name, layers, shape, batch)
    g = np.random.default_rng(0)
    model, _ = build_model(spec.model, g)
    step = TrainingStep(plans.Runner(model), build_loss(spec), spec.optimizer.build(model), None, None, None)
    x = g.standard_normal((batch, *shape)).astype(np.float32)
    y = g.integers(0, 10, batch)
    rows = []
    for k in range(3 + steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step(x, y)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        if k >= 3:
            rows.append([r1.ru_minflt - r0.ru_minflt, 1e3 * (r1.ru_stime - r0.ru_stime), 1e3 * (t1 - t0)])
    return {"rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="Run only the cases whose name contains this (e.g. CIFAR).")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--policy", choices=["glibc", "kept"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.policy, args.steps)))
        return
    cases = [i for i, c in enumerate(CASES) if not args.only or args.only.lower() in c[0].lower()]
    found: dict[tuple, list] = {}
    for _ in range(args.rounds):
        for i in cases:
            for policy in ("glibc", "kept"):
                out = subprocess.run([sys.executable, __file__, "--child", str(i), "--policy", policy, "--steps",
                                      str(args.steps)], capture_output=True, text=True, check=True).stdout
                found.setdefault((i, policy), []).append(np.array(json.loads(out)["rows"]))
    results = []
    for i in cases:
        for policy in ("glibc", "kept"):
            runs = found[(i, policy)]
            every = np.concatenate(runs)
            per_round = [float(np.median(r[:, 2])) for r in runs]
            results.append({"network": CASES[i][0], "batch": CASES[i][3], "policy": policy,
                            "faults_per_step": float(np.median(every[:, 0])),
                            "kernel_ms_per_step": float(np.median(every[:, 1])),
                            "step_ms": float(np.median(every[:, 2])), "step_ms_rounds": per_round})
    blas = {k: v for k, v in blas_info().items() if k != "threads"}  # the children run BLAS single-threaded
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": parallel.resolve(None), "numpy": np.__version__,
               "blas": blas, "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
               "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE")}
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return
    print(f"machine: {machine}")
    print_table(["network", "batch", "malloc policy", "page faults a step", "kernel CPU ms a step", "step (ms)",
                 "rounds' step (ms)"],
                [[r["network"], r["batch"], r["policy"], f"{r['faults_per_step']:.0f}",
                  f"{r['kernel_ms_per_step']:.1f}", f"{r['step_ms']:.1f}",
                  f"{min(r['step_ms_rounds']):.1f}-{max(r['step_ms_rounds']):.1f}"] for r in results])


if __name__ == "__main__":
    main()
