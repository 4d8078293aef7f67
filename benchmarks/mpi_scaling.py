"""Data-parallel training on MPI: what N ranks cost and gain, measured here and modelled for N machines.

    mpiexec -n 2 python benchmarks/mpi_scaling.py CONFIG [--batch-size B] [--latency-us 50] [--bandwidth-gbs 1.1]

Under mpiexec with N ranks it measures, with cnnctl's own bench (the global batch split across the ranks):
images/s, the time per step spent in reductions (gradients, the loss, synchronised batchnorm), and the
Allreduce of a buffer the size of the gradient and of one float alone (the link's bandwidth and latency as
this MPI sees them here). Run it without mpiexec too (one process) for the baseline.

Without mpiexec it also prints a model of N machines like this one (one rank each, the same global batch B):
    step(N) = compute(B) / N + ring_allreduce(gradient bytes, N) + reductions_per_step_small * ceil(log2 N) * latency
    ring_allreduce(S, N) = 2 (N - 1) / N * S / bandwidth + 2 (N - 1) * latency
with compute(B) this machine's measured step time (one process), and the latency and bandwidth given on the
command line (defaults: 10 Gbit/s Ethernet through TCP, about 1.1 GB/s and 50 us). It assumes the per-image
compute stays the same at B / N images per rank, which holds while B / N keeps the products large (a few
dozen images at least).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np

from cnnctl.config.build import build_model
from cnnctl.config.reading import load_config
from cnnctl.core import parallel
from cnnctl.core.environment import blas_info
from cnnctl.core.nn.regularization import _BatchNorm
from cnnctl.run import distributed
from cnnctl.tools.bench import bench


def allreduce_seconds(world: distributed.World, n_floats: int, repeats: int = 20) -> float:
    buf = np.ones(n_floats, np.float32)
    world.sum(buf)  # warm
    times = []
    for _ in range(repeats):
        world.any(False)  # start together
        t0 = time.perf_counter()
        world.sum(buf)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def step_time(compute_s: float, grad_bytes: int, small: float, n: int, latency: float, bandwidth: float) -> float:
    ring = 2 * (n - 1) / n * grad_bytes / bandwidth + 2 * (n - 1) * latency if n > 1 else 0.0
    return compute_s / n + ring + small * math.ceil(math.log2(n)) * latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--latency-us", type=float, default=50.0)
    ap.add_argument("--bandwidth-gbs", type=float, default=1.1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    world = distributed.world()
    parallel.use(parallel.resolve(args.threads))
    spec, _ = load_config(args.config, args.overrides)
    res = bench(spec, args.batch_size, args.steps, 3, world=world)
    grad_floats = res["params"]
    measured = {"grad_allreduce_ms": 1e3 * allreduce_seconds(world, grad_floats),
                "one_float_allreduce_us": 1e6 * allreduce_seconds(world, 1)} if world.size > 1 else {}
    if not world.root:
        return
    report = {"config": spec.name, "ranks": world.size, "threads": res["threads"], "batch_size": res["batch_size"],
              "images_per_second": res["images_per_second"], "ms_per_step": res["ms_per_step"],
              "reduce_ms_per_step": res.get("reduce_ms_per_step", 0.0), "params": grad_floats,
              "gradient_mb": 4 * grad_floats / 1e6, **measured, "cpu": cpu_model(), "blas": blas_info(),
              "openblas_variables_set": any(k.startswith("OPENBLAS_") for k in os.environ)}
    if world.size == 1:  # the model of N machines like this one, from its own step
        model_, _ = build_model(spec.model)
        n_bn = sum(isinstance(layer, _BatchNorm) for _, layer in model_.named_layers())
        small = 1 + (2 * n_bn if spec.train.sync_batchnorm else 0)  # the loss; two per synchronised batchnorm
        latency, bandwidth = args.latency_us * 1e-6, args.bandwidth_gbs * 1e9
        rows = [{"machines": n, "ms_per_step": 1e3 * step_time(res["ms_per_step"] / 1e3, 4 * grad_floats, small, n,
                                                                latency, bandwidth)} for n in (1, 2, 4, 8, 16, 32)]
        for row in rows:
            row["images_per_second"] = res["batch_size"] / (row["ms_per_step"] / 1e3)
            row["efficiency"] = rows[0]["ms_per_step"] / row["ms_per_step"] / row["machines"]
        report["model"] = {"latency_us": args.latency_us, "bandwidth_gbs": args.bandwidth_gbs,
                           "small_reductions_per_step": small, "rows": rows}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{spec.name}: {world.size} rank(s) x {res['threads']} thread(s), batch {res['batch_size']}: "
          f"{res['images_per_second']:,.0f} images/s, {res['ms_per_step']:.1f} ms/step, of which reductions "
          f"{report['reduce_ms_per_step']:.2f} ms")
    if measured:
        print(f"  Allreduce of the gradient ({4 * grad_floats / 1e6:.2f} MB): {measured['grad_allreduce_ms']:.3f} ms; "
              f"of one float: {measured['one_float_allreduce_us']:.1f} us")
    if "model" in report:
        m = report["model"]
        print(f"  model for N machines like this one, one rank each ({args.bandwidth_gbs} GB/s, {args.latency_us} us "
              f"latency; {m['small_reductions_per_step']} small reductions a step):")
        for row in m["rows"]:
            print(f"    N={row['machines']:>2}  {row['ms_per_step']:8.1f} ms/step  {row['images_per_second']:9,.0f} "
                  f"images/s  efficiency {100 * row['efficiency']:.0f}%")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
