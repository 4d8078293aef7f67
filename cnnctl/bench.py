"""Timing full training steps (forward, loss, backward, optimizer update) on synthetic data.

No typer or rich here: `cnnctl bench` and benchmarks/vs_torch.py print what this returns.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

from . import distributed, parallel
from .averaging import WeightAverage
from .builder import build_loss, build_model, check_training_memory, describe
from .config import Spec
from .environment import blas_info


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024


def bench(spec: Spec, batch_size: int | None = None, steps: int = 20, warmup: int = 3,
          per_layer: bool = False, world: distributed.World | None = None) -> dict:
    """Median and spread of the time per training step, images/s, GFLOP/s and peak memory. With several MPI
    ranks each steps on its share of the (global) batch as training does, images/s counts the global batch and
    the time spent in reductions is reported."""
    bs = batch_size or spec.data.batch_size
    world = world or distributed.World()
    if world.size > 1:
        distributed.check_batches(bs, bs, world.size)
    g = np.random.default_rng(spec.seed)
    check_training_memory(spec.name, describe(spec.model), bs, averaged=spec.train.ema_decay is not None)
    model, rows = build_model(spec.model, g)
    loss_fn = build_loss(spec)
    optimizer = spec.optimizer.build(model, rows)
    average = WeightAverage(model, spec.train.ema_decay) if spec.train.ema_decay else None  # part of a step
    n_out = rows[-1].output_shape[0]
    x = g.standard_normal((bs, *spec.model.input_shape)).astype(np.float32)
    y = g.integers(0, n_out, bs)
    dropouts = distributed.attach(model, world, spec.train.sync_batchnorm)
    if world.size > 1:
        x, y = distributed.take_share(world, x, y, dropouts)
    reduce_gradients = distributed.GradientReducer(world)

    def loss_gradient(out) -> np.ndarray:
        loss = loss_fn.forward(out, y)
        grad = loss_fn.backward()
        if world.size > 1:  # as training: this share's gradient scaled to the global batch's
            grad *= grad.dtype.type(distributed.reduce_loss(world, loss, loss_fn.normalizer)[1])
        return grad
    layer_times = np.zeros((len(model.layers), 2))

    def step(timed_layers: bool) -> None:
        if not timed_layers:
            model.backward(loss_gradient(model.forward(x, training=True)))
        else:
            h = x
            for i in range(len(model.layers)):  # top-level layers; a block is timed as a whole
                t0 = time.perf_counter()
                h = model.forward_layer(i, h, True)
                layer_times[i, 0] += time.perf_counter() - t0
            d = loss_gradient(h)
            for i in reversed(range(len(model.layers))):
                t0 = time.perf_counter()
                d = model.layers[i].backward(d)
                layer_times[i, 1] += time.perf_counter() - t0
                if d is None:
                    break
        if world.size > 1:
            reduce_gradients(model.trainable_parameters())
        optimizer.step()
        if average:
            average.update(optimizer.steps)

    for _ in range(warmup):
        step(False)
    times = []
    world.reduce_seconds, world.reductions = 0.0, 0
    for _ in range(steps):
        t0 = time.perf_counter()
        step(False)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    macs = sum(r.macs for r in rows)
    flops = 6 * macs * bs  # forward 2*MACs, backward about twice that (weight and input gradients)
    out = {
        "name": spec.name, "batch_size": bs, "steps": steps, "warmup": warmup,
        "ms_per_step": float(np.median(ms)), "ms_p10": float(np.percentile(ms, 10)),
        "ms_p90": float(np.percentile(ms, 90)), "images_per_second": bs / (np.median(ms) / 1e3),
        "gflops": flops / (np.median(ms) / 1e3) / 1e9, "flops_per_step": flops,
        "peak_rss_mb": peak_rss_mb(), "threads": parallel.threads(), "blas": blas_info(), "params": model.num_params(),
        "ranks": world.size,
    }
    if world.size > 1:  # rank 0's figures (the reductions keep the ranks in step)
        out["reduce_ms_per_step"] = 1e3 * world.reduce_seconds / steps
        out["reductions_per_step"] = world.reductions / steps
        out["sync_batchnorm"] = spec.train.sync_batchnorm
    if per_layer:
        for _ in range(steps):
            step(True)
        out["layers"] = [{"index": r.index, "name": r.name, "type": r.type, "output_shape": list(r.output_shape),
                          "forward_ms": 1e3 * layer_times[r.index, 0] / steps,
                          "backward_ms": 1e3 * layer_times[r.index, 1] / steps} for r in rows]
    return out
