"""Timing full training steps (forward, loss, backward, optimizer update) on synthetic data.

No typer or rich here: `cnnctl bench` and benchmarks/vs_torch.py print what this returns.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

from cnnctl.config.build import build_loss, build_model, check_training_memory, describe
from cnnctl.config.spec import Spec
from cnnctl.core import parallel
from cnnctl.core import plan as plans
from cnnctl.core.averaging import WeightAverage
from cnnctl.core.environment import blas_info
from cnnctl.run import distributed
from cnnctl.run.step import TrainingStep


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024


def _built(spec: Spec, batch_size: int, g: np.random.Generator, averaged: bool):
    """The model a training step of this batch runs (and its layer rows), once its memory is known to fit."""
    check_training_memory(spec.name, describe(spec.model), batch_size, averaged=averaged)
    return build_model(spec.model, g)


def bench(spec: Spec, batch_size: int | None = None, steps: int = 20, warmup: int = 3,
          per_layer: bool = False, world: distributed.World | None = None, autotune: bool = False) -> dict:
    """Median and spread of the time per training step, images/s, GFLOP/s and peak memory. With several MPI
    ranks each steps on its share of the (global) batch as training does, images/s counts the global batch and
    the time spent in reductions is reported."""
    bs = batch_size or spec.data.batch_size
    world = world or distributed.World()
    if world.size > 1:
        distributed.check_batches(bs, bs, world.size)
    g = np.random.default_rng(spec.seed)
    model, rows = _built(spec, bs, g, averaged=spec.train.ema_decay is not None)
    optimizer = spec.optimizer.build(model, rows)
    average = WeightAverage(model, spec.train.ema_decay) if spec.train.ema_decay else None  # part of a step
    n_out = rows[-1].output_shape[0]
    x = g.standard_normal((bs, *spec.model.input_shape)).astype(np.float32)
    y = g.integers(0, n_out, bs)
    runner = plans.Runner(model, context=distributed.context_of(world, spec.train.sync_batchnorm))
    if world.size > 1:
        x, y = distributed.take_share(world, x, y, runner.context)
    runner.fix_algorithms(tuple(x.shape[1:]), x.shape[0], autotune or spec.train.autotune)
    plan = runner.plan(tuple(x.shape[1:]), x.dtype)  # the plan every step of this batch runs
    step_times = np.zeros((len(plan.steps), 2))
    train_step = TrainingStep(runner, build_loss(spec), optimizer, world, spec.train.grad_clip_norm, average)

    def step(timed: bool) -> None:
        train_step(x, y, clock=step_times if timed else None)

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
    out["plan"] = plan.describe(bs)
    if per_layer:
        for _ in range(steps):
            step(True)
        # each top-level layer's steps (a block's all), fused passes counted where the plan runs them
        layer_times = np.zeros((len(model.layers), 2))
        for s, t in zip(plan.steps, step_times):
            layer_times[int(s.name.split(".")[1])] += t
        out["layers"] = [{"index": r.index, "name": r.name, "type": r.type, "output_shape": list(r.output_shape),
                          "forward_ms": 1e3 * layer_times[r.index, 0] / steps,
                          "backward_ms": 1e3 * layer_times[r.index, 1] / steps} for r in rows]
        out["ms_outside_steps"] = max(0.0, float(np.median(ms)) - 1e3 * step_times.sum() / steps)
        out["plan_steps"] = [{**row, "forward_ms": float(1e3 * t[0] / steps), "backward_ms": float(1e3 * t[1] / steps)}
                             for row, t in zip(out["plan"], step_times)]
    out["algorithms"] = plan.algorithms()
    return out


def planned(spec: Spec, batch_size: int | None = None, algorithms: dict[str, str] | None = None) -> dict:
    """The execution plan a training step of this batch runs, without timing it: the plan's steps as
    `Plan.describe` gives them, after one training forward on a batch of zeros (a layer the plan runs as a
    layer reports the arrays it then holds). `algorithms` are a run's recorded convolution algorithms; without
    them the default rule on the layers' shapes decides, as `cnnctl train` without `--autotune` does."""
    bs = batch_size or spec.data.batch_size
    model, _ = _built(spec, bs, np.random.default_rng(spec.seed), averaged=False)
    runner = plans.Runner(model, algorithms or {})
    x = np.zeros((bs, *spec.model.input_shape), np.float32)
    runner.forward(x, training=True)
    plan = runner.plan(tuple(x.shape[1:]), x.dtype)
    return {"batch_size": bs, "recorded": bool(algorithms), "steps": plan.describe(bs),
            "algorithms": plan.algorithms()}
