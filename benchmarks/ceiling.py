"""How fast can a NumPy core be on this machine? The matrix products a training step cannot avoid, against
PyTorch's whole step.

    python benchmarks/ceiling.py [--rounds 3] [--json]

For each network of benchmarks/vs_torch.py, times each matrix product a cnnctl training step runs, alone,
warm and on whole matrices (a lower bound on what it costs inside a step): per conv layer the forward
product W (O, C*KH*KW) @ columns, the weight gradient dY @ columns.T (or its transpose columns @ dY.T, whichever
BLAS runs faster; cnnctl computes the transpose) and, except for the first layer, the
cheaper of the two input-gradient forms (W.T @ dY scattered, or the stride-1 full correlation); per dense
layer its three products. Everything else a step does (im2col, padding, activations, pooling, the loss,
the update) is counted as free. The sum is compared with torch's measured step: `ceiling` is the ratio
cnnctl / torch that a core spending nothing outside NumPy's BLAS would reach. When it is below a target,
no work outside the products reaches that target; only faster products (a faster BLAS, fewer FLOPs) can.
Also times cnnctl's own step (its threads, BLAS single-threaded) and prints the time outside the products:
the step less the products alone, in ms and as a share of the step (lowering copies, normalisation,
activations, adds, layout changes, the loss and the update). Also prints each conv layer's products in
GFLOP/s next to torch's own fwd+bwd convolution of that layer.

With --floors, two costs outside the products that no fusing or layout removes are timed, as shares of the
products alone: every element-wise activation's own evaluation (value and derivative, `elementwise` at the batch
and the shape where the execution plan runs it: as a pass of its own on cnnctl's threads, and in cache, one tile
timed warm and scaled to the values and threads, a lower bound wherever the plan runs it), and a whole
training step at batch 1 (what a step costs whatever its batch: its Python and NumPy calls and the optimizer's
passes over the parameters, with the products at batch 1). An in-cache or batch-1 share above the target
(step / products <= 1.10 leaves 10% for everything outside) says the target is out of reach by work outside the
products alone.

With --per-step, each step of the execution plan (`cnnctl bench --per-layer`'s timing of one training step,
forward and backward) is split into its layer's products alone and the rest, and the steps are listed by the time
they spend outside the products, with the totals per kind of step and the time outside every step (the loss, the
gradient clipping and the optimizer's update): where the step's time outside NumPy's products goes. A product is
timed alone on whole matrices, so the split is an estimate: what a product costs more inside its step (sliced
across threads, cold caches) counts as outside.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial

import numpy as np
from threadpoolctl import threadpool_limits
from vs_torch import CASES, bench_torch, machine_info, median_seconds, print_table, spec_for

from cnnctl.config.build import build_model, walk
from cnnctl.core import parallel
from cnnctl.core.epilogue import TILE
from cnnctl.core.nn.activations import Elementwise
from cnnctl.core.nn.conv import Conv2D
from cnnctl.core.nn.dense import Dense
from cnnctl.core.plan import Runner, threaded
from cnnctl.core.steps import ElementwiseStep, WindowMaxStep
from cnnctl.tools.bench import bench, blas_info


def product_layers(model, rows):
    """(row, layer) of every convolution (ungrouped) and dense layer of a built model, nested ones too (the
    convolutions inside residual blocks), in order: the layers whose products a step runs."""
    by_path = dict(model.named_layers())
    for row in walk(rows):
        layer = by_path[row.path]
        if isinstance(layer, (Conv2D, Dense)) and getattr(layer, "groups", 1) == 1:
            yield row, layer


def products(layer, in_shape, out_shape, batch, first: bool, rng) -> list[tuple[str, float, float]]:
    """(name, seconds, flops) of each matrix product `layer` runs in one training step."""
    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def mm(a, b):
        out = np.empty((a.shape[0], b.shape[1]), np.float32)
        return median_seconds(lambda: np.matmul(a, b, out=out), 7), 2.0 * a.shape[0] * a.shape[1] * b.shape[1]

    if isinstance(layer, Dense):
        x, w, dy = r(batch, in_shape[0]), r(*layer.params["weight"].shape), r(batch, out_shape[0])
        rows = [("forward", *mm(x, w.T)), ("weight grad", *mm(dy.T, x))]
        return rows if first else rows + [("input grad", *mm(dy, w))]
    c, h, w = in_shape
    o, oh, ow = out_shape
    kh, kw = layer.kernel_size
    k, p = c * kh * kw, batch * oh * ow
    weight, cols, dy = r(o, k), r(k, p), r(o, p)
    rows = [("forward", *mm(weight, cols)), ("weight grad", *min(mm(dy, cols.T), mm(cols, dy.T)))]  # either way round
    if not first:
        scatter = mm(weight.T, dy)
        if layer.stride == (1, 1):
            full = mm(r(c, o * kh * kw), r(o * kh * kw, batch * h * w))
            scatter = min(scatter, full)
        rows.append(("input grad", *scatter))
    return rows


def conv_torch(layer, in_shape, batch) -> float:
    """Seconds for torch's forward + backward of this one convolution (input gradient included)."""
    import torch

    conv = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                           padding=layer.pads(in_shape[1:])[0])
    x = torch.randn(batch, *in_shape, requires_grad=True)
    g = torch.randn_like(conv(x))
    return median_seconds(lambda: conv(x).backward(g), 7)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="torch steps are timed this many times (median)")
    ap.add_argument("--only", help="Run only the cases whose name contains this (e.g. ResNet).")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--per-step", action="store_true", help="split each plan step into products and the rest")
    ap.add_argument("--floors", action="store_true",
                    help="time the activations (alone and in cache) and a step at batch 1, as shares of the products")
    args = ap.parse_args()
    import torch

    blas = blas_info()
    torch.set_num_threads(blas.get("threads") or os.cpu_count())
    rng = np.random.default_rng(0)
    results = []
    for name, layers, shape, batch, target in CASES:
        if args.only and args.only.lower() not in name.lower():
            continue
        spec = spec_for(name, layers, shape, batch)
        model, rows = build_model(spec.model, rng)
        per_layer, total = [], 0.0
        for row, layer in product_layers(model, rows):
            first = row.path == "layers.0"
            prods = products(layer, row.input_shape, row.output_shape, batch, first, rng)
            secs, flops = sum(s for _, s, _ in prods), sum(f for _, _, f in prods)
            total += secs
            entry = {"layer": row.path, "products_ms": secs * 1e3, "products_gflops": flops / secs / 1e9}
            if isinstance(layer, Conv2D) and not first:
                t = conv_torch(layer, row.input_shape, batch)
                entry.update(torch_conv_ms=t * 1e3, torch_conv_gflops=flops / t / 1e9)
            per_layer.append(entry)
        torch_ms = float(np.median([bench_torch(spec, batch, 20, 5)["ms_per_step"]
                                    for _ in range(args.rounds)]))
        with threadpool_limits(limits=1, user_api="blas"):  # cnnctl's own step, as the CLI runs it
            parallel.use(parallel.resolve(None))
            ours = float(np.median([bench(spec, batch, 10, 3)["ms_per_step"] for _ in range(args.rounds)]))
            steps = per_step(spec, batch, per_layer) if args.per_step else None
            floor = floors(spec, model, batch, rng) if args.floors else None
        outside = max(0.0, ours - total * 1e3)
        results.append({"network": name, "batch": batch, "target": target, "products_ms": total * 1e3,
                        "torch_step_ms": torch_ms, "ceiling": torch_ms / (total * 1e3), "cnnctl_step_ms": ours,
                        "outside_products_ms": outside, "outside_share": outside / ours, "layers": per_layer,
                        **({"steps": steps} if steps else {}), **({"floors": floor} if floor else {})})
    if args.json:
        print(json.dumps({"machine": machine_info(blas), "results": results}, indent=2))
        return
    print(f"machine: {machine_info(blas)}")
    print_table(["network", "batch", "products alone (ms)", "torch step (ms)", "ceiling", "target",
                 "cnnctl step (ms)", "outside the products (ms, share of the step)"],
                [[r["network"], r["batch"], f"{r['products_ms']:.1f}", f"{r['torch_step_ms']:.1f}",
                  f"{r['ceiling']:.2f}", f">= {r['target']:.1f}" if r["target"] else "-",
                  f"{r['cnnctl_step_ms']:.1f}",
                  f"{r['outside_products_ms']:.1f} ({100 * r['outside_share']:.0f}%)"] for r in results])
    print("\nper layer: NumPy products (ms, GFLOP/s) | torch's fwd+bwd convolution (ms, GFLOP/s)")
    for r in results:
        for e in r["layers"]:
            tail = (f" | {e['torch_conv_ms']:7.2f} ms {e['torch_conv_gflops']:5.0f} GFLOP/s"
                    if "torch_conv_ms" in e else "")
            print(f"  {r['network']} b{r['batch']} {e['layer']:<22} {e['products_ms']:7.2f} ms "
                  f"{e['products_gflops']:5.0f} GFLOP/s{tail}")
    for r in results:
        if "steps" in r:
            print_steps(r)
    if any("floors" in r for r in results):
        print("\nfloors outside the products (ms, share of the products alone)")
        print_table(["network", "batch", "products alone (ms)", "activations alone", "activations in cache",
                     "step at batch 1"],
                    [[r["network"], r["batch"], f"{r['products_ms']:.1f}",
                      *(f"{r['floors'][k]:.2f} ({100 * r['floors'][k] / r['products_ms']:.0f}%)"
                        for k in ("activations_ms", "activations_in_cache_ms", "batch1_step_ms"))]
                     for r in results if "floors" in r])


def floors(spec, model, batch: int, rng) -> dict:
    """Milliseconds of every element-wise activation of the execution plan at `batch` (value and derivative, at the
    shape where the plan runs it: a ReLU moved behind its max pooling at the pooling's output): evaluated alone
    as a pass of its own (its layer's forward on cnnctl's threads, batch-innermost, the arrays in memory), and in
    cache (one tile timed warm, times the tiles, over the threads as if they shared it perfectly: what the
    function costs wherever it runs, a convolution's epilogue included); and a whole training step at batch 1."""
    plan = Runner(model).plan(tuple(spec.model.input_shape), np.dtype(np.float32))
    alone = cached = 0.0
    for s in plan.steps:
        f = (s.activation if isinstance(s, WindowMaxStep) else s.layer if isinstance(s, ElementwiseStep)
             else getattr(getattr(s, "epilogue", None), "activation", None) or getattr(s.layer, "activation", None))
        if isinstance(f, Elementwise):
            x = np.moveaxis(rng.standard_normal((*s.out_shape, batch), dtype=np.float32), -1, 0)
            alone += median_seconds(partial(f.forward, x, context=threaded(), out=np.empty_like(x)), 9)
            tile = rng.standard_normal(min(x.size, TILE), dtype=np.float32)
            hot = median_seconds(partial(f.elementwise, tile, np.empty_like(tile), f.derivative_like(tile)), 51)
            cached += hot * x.size / tile.size / parallel.threads()
    return {"activations_ms": alone * 1e3, "activations_in_cache_ms": cached * 1e3,
            "batch1_step_ms": bench(spec, 1, 20, 3)["ms_per_step"]}


def per_step(spec, batch: int, per_layer: list[dict]) -> dict:
    """Each plan step's time in one training step (medians over bench's timed steps), split into its layer's
    products alone and the rest; and the time outside every step (loss, clipping, update)."""
    products_ms = {e["layer"]: e["products_ms"] for e in per_layer}
    res = bench(spec, batch, 10, 3, per_layer=True)
    rows = []
    for s in res["plan_steps"]:
        ms = s["forward_ms"] + s["backward_ms"]
        prod = products_ms.get(s["layer"], 0.0)
        rows.append({"step": s["step"], "kind": s["kind"], "layer": s["layer"], "fused": s["fused"],
                     "algorithm": s["algorithm"], "ms": ms, "products_ms": prod, "outside_ms": ms - prod})
    return {"step_ms": res["ms_per_step"], "rows": rows, "outside_steps_ms": res["ms_outside_steps"]}


def print_steps(r: dict) -> None:
    steps = r["steps"]
    rows, total = steps["rows"], steps["step_ms"]
    outside = sum(max(0.0, e["outside_ms"]) for e in rows) + steps["outside_steps_ms"]
    print(f"\n{r['network']} b{r['batch']}: step {total:.1f} ms; outside the products {outside:.1f} ms "
          f"({100 * outside / total:.0f}%), of which outside the plan's steps (loss, clipping, update) "
          f"{steps['outside_steps_ms']:.1f} ms")
    kinds: dict[str, float] = {}
    for e in rows:
        key = e["kind"] + (f" + {e['fused']}" if e["fused"] else "")
        kinds[key] = kinds.get(key, 0.0) + max(0.0, e["outside_ms"])
    print("  outside the products, by kind of step: " + ", ".join(
        f"{k} {v:.1f} ms" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v >= 0.05))
    print_table(["step", "kind", "layer", "fused", "algorithm", "step (ms)", "products (ms)", "outside (ms)"],
                [[e["step"], e["kind"], e["layer"], e["fused"] or "-", e["algorithm"] or "-", f"{e['ms']:.2f}",
                  f"{e['products_ms']:.2f}", f"{e['outside_ms']:.2f}"]
                 for e in sorted(rows, key=lambda e: -e["outside_ms"])[:10]])


if __name__ == "__main__":
    main()
