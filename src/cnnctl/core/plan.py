"""The execution plan: how a model runs, decided once per input shape; the layers only say what they compute.

A model's layers are pure math (each layer's forward and backward can be read, and run, on its own). The plan
walks the model's tree into a flat list of steps over numbered values, a tape, and decides for each step how it
runs, by what each layer declares itself to be (`Layer.planned_as`), never by its class:

  * a **sequence** is its children in order; a **join** (a residual unit's add, a concatenation) is its
    branches as steps of their own, then a step calling the container's own `join` and `join_backward`;
  * a **convolution** runs by one of the registered algorithms (cnnctl.convolution: the lowering, a 1x1
    convolution as one product, Winograd F(2x2, 3x3) or F(4x4, 3x3)), by default a rule on the layer's shape
    (`convolution.default`), so the same config gives the same plan on every machine; `autotune` times the
    candidates on this machine instead;
  * **fusion**: a layer that **folds into a convolution** (a `scale`, a `channel_shuffle`) and alone reads its
    output is folded into the convolution's weight and bias, one product for both, forward and backward; an
    **element-wise** activation (its function and derivative in one call) runs in the epilogue of the pass that
    made its input (cnnctl.epilogue: a convolution's product, a residual add), whether it is the layer's
    `activation:` or the next layer; a non-decreasing one that feeds a **window max** (max pooling) alone moves
    behind it (the pooled tensor is a quarter of the size, the gradients are the same);
  * **memory**: temporary arrays (lowered deltas, partial products) come from one scratch shared by every
    step, the lowered inputs that backward reads are kept per layer, and each step forgets what it saved once
    its backward has run;
  * **threads**: each step's array work is cut into slices by size (cnnctl.parallel), never by thread count;
    element-wise steps are cut by channels here, not inside the layers.

Any other layer, and a layer whose class rewrote the forward or backward its capability came with (a
subclass), runs as a step calling its own forward and backward. Forward hooks still see every layer's own
output: a layer with a hook is never fused across. `Runner` keeps a model's plans (one per input shape, rebuilt
when hooks, frozen layers or the algorithms change) and is what trains, evaluates and times a model; `describe()`
lists the steps, as `cnnctl inspect --plan` and `cnnctl bench --plan` print them.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnctl.core.nn.base import Context
from cnnctl.errors import CnnctlError, CnnctlWarning

from . import convolution, parallel
from . import functional as F
from .epilogue import NONE, Epilogue
from .fileio import Unreadable, atomic_write_bytes, read_regular
from .steps import ConvStep, ElementwiseStep, JoinStep, LayerStep, Step, WindowMaxStep, fusable

if TYPE_CHECKING:
    from cnnctl.core.nn.base import Layer


# ------------------------------------------------------------------ the plan


def threaded() -> Context:
    """The context a plan gives its layers by default: their per-channel passes and products on cnnctl's threads."""
    return Context(per_channel=parallel.per_channel, per_product=parallel.per_product)


class Plan:
    """The steps that run a model on inputs of one (C, H, W) shape and dtype; `forward` and `backward` run
    them, `describe` lists them."""

    def __init__(self, model: Layer, input_shape: tuple, choices: dict[str, str] | None = None,
                 keep: dict | None = None, scratch: F.Scratch | None = None, context: Context | None = None):
        self.input_shape = tuple(input_shape)
        self.choices = dict(choices or {})
        unknown = sorted(set(self.choices.values()) - set(convolution.ALGORITHMS))
        if unknown:
            raise CnnctlError(f"unknown convolution algorithm {unknown[0]!r} in the plan's choices",
                              f"use one of: {', '.join(convolution.ALGORITHMS)}")
        self.keep = keep if keep is not None else {}
        self.scratch = scratch if scratch is not None else F.Scratch()
        self.context = context if context is not None else threaded()
        self.steps: list[Step] = []
        self.hooks: list[tuple[int, Layer]] = []  # (value, layer): the layers whose output a value is
        self.shapes = [self.input_shape]
        self.output = self._emit(model, "", 0, self.input_shape, top=True)
        self._fuse()
        for k in self._forward_only(model):
            self.steps[k].forward_only = True
        self.consumers = [0] * len(self.shapes)
        for s in self.steps:
            for v in s.inputs:
                self.consumers[v] += 1

    # ------------------------------------------------------------ building

    def _forward_only(self, model) -> set[int]:
        """The steps no gradient reaches: those of the top-level layers below the lowest one that trains, when
        the model's input needs no gradient. They run forward only and keep nothing for a backward."""
        top = [layer for _, layer in model.children()] if model.planned_as() == "sequence" else None
        if not top or model.needs_input_grad:
            return set()
        first = next((i for i, layer in enumerate(top) if layer.has_trainable()), len(top))
        prefix = getattr(model, "child_prefix", "")
        out = set()
        for k, step in enumerate(self.steps):
            head = step.name[len(prefix):].split(".", 1)[0] if step.name.startswith(prefix) else ""
            if head.isdigit() and int(head) < first:
                out.add(k)
        return out

    def _value(self, shape) -> int:
        self.shapes.append(tuple(shape))
        return len(self.shapes) - 1

    def _emit(self, layer: Layer, name: str, value: int, shape: tuple, top: bool = False) -> int:
        kind = layer.planned_as()
        if kind == "sequence":
            for child_name, child in layer.children():
                value = self._emit(child, f"{name}.{child_name}" if name else child_name, value, shape)
                shape = self.shapes[value]
            if not top:
                self.hooks.append((value, layer))
            return value
        if kind == "join":
            outs = [value if branch is None else self._emit(branch, f"{name}.{b}", value, shape)
                    for b, branch in layer.join_inputs()]
            out_shape = layer.output_shape(shape)
            out = self._value(out_shape)
            act = layer.activation
            gates = [o != value or layer.needs_input_grad for o in outs]
            self.steps.append(JoinStep("join", name, outs, out, out_shape, layer=layer, gates=gates,
                                       in_shapes=[self.shapes[o] for o in outs],
                                       epilogue=Epilogue(act) if fusable(act) else NONE,
                                       activation=None if fusable(act) else act,
                                       fused=[act.tag] if fusable(act) else []))
            self.hooks.append((out, layer))
            return out
        out_shape = layer.output_shape(shape)
        out = self._value(out_shape)
        algorithm = None
        if kind == "convolution":
            algorithm = self.choices.get(name) or convolution.default(layer, shape)
            if algorithm not in convolution.candidates(layer, shape):
                algorithm = convolution.default(layer, shape)
        if algorithm is not None:
            act = layer.activation
            step = ConvStep("conv", name, [value], out, out_shape, layer=layer, algorithm=algorithm,
                            keep=self.keep.setdefault(name, {}), scratch=self.scratch,
                            epilogue=Epilogue(act) if fusable(act) else NONE,
                            activation=None if fusable(act) else act,
                            fused=(["bias"] if "bias" in layer.params else []) + ([act.tag] if fusable(act) else []))
        else:
            step = (ElementwiseStep if kind == "elementwise" else LayerStep)(layer.tag, name, [value], out, out_shape,
                                                                           layer=layer)
            step.context = self.context
        self.steps.append(step)
        self.hooks.append((out, layer))
        return out

    def _watched(self, value: int, besides: Layer) -> bool:
        """Whether a hook other than `besides`'s sees this value (a container's output, say)."""
        return value == self.output or any(v == value and layer is not besides and layer.forward_hooks
                                           for v, layer in self.hooks)

    def _fuse(self) -> None:
        """Three rules, by capability: layers that fold into a convolution ("convolution_fold": a per-channel
        affine, a channel shuffle), each alone reading the output of a convolution without an activation (or of
        such a fold), become part of its weight and bias (one product); an element-wise layer that alone reads a
        convolution's or a join's output becomes that step's epilogue; a non-decreasing epilogue activation of a
        convolution whose output a max pooling alone reads moves behind the pooling. Never across a hook."""
        readers: dict[int, list[Step]] = {}
        for s in self.steps:
            for v in s.inputs:
                readers.setdefault(v, []).append(s)
        for s in list(self.steps):
            if not isinstance(s, ConvStep) or s.epilogue.activation is not None or s.activation is not None:
                continue
            while not s.layer.forward_hooks and not self._watched(s.output, s.layer):
                nxt = readers.get(s.output, [])
                if len(nxt) != 1 or not isinstance(nxt[0], LayerStep) or \
                        nxt[0].layer.planned_as() != "convolution_fold":
                    break
                if nxt[0].layer.has_trainable() and not s.layer.has_trainable():  # a frozen convolution's step
                    break  # may run forward only; the layer that trains keeps its own backward
                fold = nxt[0]
                s.folds.append(fold.layer)
                s.output, s.fused = fold.output, [*s.fused, f"{fold.layer.tag} {fold.name}"]
                self.steps.remove(fold)  # its readers, listed by the value it wrote, now read the convolution's
        for s in list(self.steps):
            if not isinstance(s, (ConvStep, JoinStep)) or s.epilogue.activation is not None or s.activation \
                    is not None or s.layer.forward_hooks:
                continue
            nxt = readers.get(s.output, [])
            if len(nxt) != 1 or not isinstance(nxt[0], ElementwiseStep) or self._watched(s.output, s.layer):
                continue
            act = nxt[0]
            s.epilogue, s.output, s.fused = Epilogue(act.layer), act.output, [*s.fused, f"{act.layer.tag} {act.name}"]
            self.steps.remove(act)
        for s in list(self.steps):
            act = getattr(s, "epilogue", NONE).activation
            if not isinstance(s, ConvStep) or act is None or not act.commutes_with_max() or s.layer.forward_hooks:
                continue
            nxt = readers.get(s.output, [])
            if len(nxt) != 1 or not isinstance(nxt[0], LayerStep) or nxt[0].layer.planned_as() != "window_max":
                continue
            if self._watched(s.output, s.layer):
                continue
            pool = nxt[0]
            s.epilogue = NONE
            s.fused = [f for f in s.fused if f != act.tag and not f.startswith(f"{act.tag} ")]
            moved = WindowMaxStep(pool.kind, pool.name, pool.inputs, pool.output, pool.out_shape, layer=pool.layer,
                                  activation=act, context=self.context, fused=[f"{act.tag} of {s.name}"])
            self.steps[self.steps.index(pool)] = moved

    # ------------------------------------------------------------ running

    def forward(self, x: np.ndarray, training: bool = True, clock: np.ndarray | None = None) -> np.ndarray:
        """Run the steps in order. `clock` (steps x 2), when given, accumulates each step's forward seconds in
        column 0 (and backward's in column 1, by `backward`)."""
        values: list = [None] * len(self.shapes)
        values[0] = x
        left = list(self.consumers)
        watched = {}
        for v, layer in self.hooks:
            if layer.forward_hooks:
                watched.setdefault(v, []).append(layer)
        for k, step in enumerate(self.steps):
            t0 = time.perf_counter() if clock is not None else 0.0
            y = step.forward([values[v] for v in step.inputs], training)
            if step.forward_only:  # below the lowest trainable layer: nothing is kept for a backward
                step.release()
            if clock is not None:
                clock[k, 0] += time.perf_counter() - t0
            values[step.output] = y
            for layer in watched.get(step.output, ()):
                for hook in layer.forward_hooks:
                    hook(layer, y)
            for v in step.inputs:  # forget a value once its last reader has run
                left[v] -= 1
                if left[v] == 0 and v != self.output:
                    values[v] = None
        return values[self.output]

    def backward(self, dy: np.ndarray, clock: np.ndarray | None = None) -> np.ndarray | None:
        grads: list = [None] * len(self.shapes)
        grads[self.output] = dy
        for k in reversed(range(len(self.steps))):
            step = self.steps[k]
            t0 = time.perf_counter() if clock is not None else 0.0
            g = grads[step.output]
            grads[step.output] = None
            if g is None:  # nothing above needed this step's gradient (below the lowest trainable layer)
                step.release()
                continue
            for v, d in zip(step.inputs, step.backward(g)):
                if d is None:
                    continue
                if grads[v] is None:
                    grads[v] = d
                else:  # a fork: the gradients of every reader add
                    grads[v] = parallel.add(grads[v], F.in_layout_of(d, grads[v]))
            if clock is not None:
                clock[k, 1] += time.perf_counter() - t0
        return grads[0]

    # ------------------------------------------------------------ reading

    def algorithms(self) -> dict[str, str]:
        """The convolution algorithm of every planned convolution, by layer name."""
        return {s.name: s.algorithm for s in self.steps if s.algorithm}

    def describe(self, batch: int, itemsize: int = 4) -> list[dict]:
        """One row per step: kind, layer, algorithm, what is fused, output shape and the memory its output takes
        and what it keeps for backward, for a batch of `batch` (the plan's own steps estimated from their
        shapes, a layer run as it is measured from the arrays it holds after its last forward)."""
        rows = []
        for k, s in enumerate(self.steps):
            out = int(np.prod(s.out_shape)) * batch * itemsize
            rows.append({"step": k, "kind": s.kind, "layer": s.name or "(model)", "algorithm": s.algorithm,
                         "fused": ", ".join(s.fused), "output_shape": list(s.out_shape), "output_bytes": out,
                         "saved_bytes": 0 if s.forward_only else s.saved_bytes(self.shapes, batch, itemsize),
                         "forward_only": s.forward_only})
        return rows


class Runner:
    """Runs a model through its plans, as training, evaluation and benchmarks do: `forward` plans the input's
    shape once (again when the shape, dtype, frozen layers, forward hooks or `algorithms` change) and runs the
    plan; `backward` runs the same plan's backward. `algorithms` overrides the convolution algorithm of named
    layers (autotuning, or the plan a checkpoint recorded); `context` is what the layers that ask are told (the
    threads' cut of per-channel work; under MPI the share of the batch and the sum over the ranks). The numbers
    are the model's own forward and backward's, whatever the thread count."""

    MAX_PLANS = 4  # plans kept (training batch, last short batch, evaluation batch, ...)

    def __init__(self, model: Layer, algorithms: dict[str, str] | None = None, context: Context | None = None):
        self.model = model
        self._algorithms = dict(algorithms or {})
        self.context = context if context is not None else threaded()
        self._plans: dict = {}
        self._plan: Plan | None = None
        self._keep: dict = {}  # per-layer buffers every plan shares (the lowered inputs backward reads)
        self._scratch = F.Scratch()

    @property
    def algorithms(self) -> dict[str, str]:
        return dict(self._algorithms)

    @algorithms.setter
    def algorithms(self, value: dict[str, str]) -> None:
        self._algorithms = dict(value)
        self._plans = {}

    def fix_algorithms(self, input_shape: tuple, batch: int, tune: bool = False,
                       recorded: dict[str, str] | None = None) -> dict[str, str]:
        """Fix the convolution algorithms of the plan for this shape and batch: those a checkpoint recorded, the
        fastest on this machine (tune), or the shape rule; the algorithm each convolution then runs, by name."""
        if recorded is not None:
            self.algorithms = recorded
        elif tune:
            self.algorithms = autotune(self.model, tuple(input_shape), batch)
        return self.plan(tuple(input_shape)).algorithms()

    def plan(self, input_shape: tuple, dtype=np.float32) -> Plan:
        """The plan for inputs of this per-sample shape (built, or the one built before)."""
        state = tuple((id(layer), layer.frozen, layer.needs_input_grad, bool(layer.forward_hooks))
                      for _, layer in self.model.named_layers())
        key = (tuple(input_shape), np.dtype(dtype).str, state)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[key] = Plan(self.model, input_shape, self._algorithms, self._keep, self._scratch,
                                           self.context)
        return plan

    def forward(self, x: np.ndarray, training: bool = True, clock: np.ndarray | None = None) -> np.ndarray:
        """The model's output for x; `clock` as Plan.forward's."""
        self._plan = self.plan(x.shape[1:], x.dtype)
        return self._plan.forward(x, training, clock)

    __call__ = forward

    def backward(self, dy: np.ndarray, clock: np.ndarray | None = None) -> np.ndarray | None:
        if self._plan is None:
            raise RuntimeError("backward before forward")
        return self._plan.backward(dy, clock)


# ------------------------------------------------------------------ autotuning


def cache_path() -> Path:
    """~/.cache/cnnctl/plans/<cpu model>-<blas>.json (XDG_CACHE_HOME respected)."""
    from .environment import blas_info, cpu_model

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnctl" / "plans"
    blas = blas_info()
    machine = f"{cpu_model()}-{blas.get('library', 'blas')}-{blas.get('kernel', '')}"
    return root / (re.sub(r"[^A-Za-z0-9_.-]+", "_", machine).strip("_") + ".json")


def _key(step: ConvStep, in_shape, batch: int, dtype) -> str:
    conv, act = step.layer, step.epilogue.name
    fused = {"": "relu0", "relu": "relu1"}.get(act, f"act-{act}")  # the first two as keys written before
    return (f"{tuple(in_shape)}->{conv.out_channels} k{conv.kernel_size} s{conv.stride} p{conv.pads(in_shape[1:])} "
            f"d{conv.dilation} bias{int('bias' in conv.params)} {fused} batch{batch} "
            f"threads{parallel.threads()} {np.dtype(dtype).name}")


def _time(step: ConvStep, x: np.ndarray, dy: np.ndarray, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first run allocates
        t0 = time.perf_counter()
        step.forward([x], True)
        step.backward(dy)
        best = min(best, time.perf_counter() - t0)
    return best


def autotune(model, input_shape: tuple, batch: int, dtype=np.float32, path: Path | None = None,
             progress=None) -> dict[str, str]:
    """Time every candidate algorithm of every convolution of the model's plan (forward and backward on random
    data of its shape, best of 3) and return the fastest per layer name, like cuDNN's benchmark mode. Timings
    are cached in `path` (default `cache_path()`) by layer shape, batch, threads and dtype, so each shape is
    timed once per machine. The model's weights are not touched."""
    path = path or cache_path()
    cache = _read_cache(path)
    p = Plan(model, input_shape)
    g = np.random.default_rng(0)
    chosen, changed = {}, False
    for step in [s for s in p.steps if isinstance(s, ConvStep)]:
        in_shape = p.shapes[step.inputs[0]]
        key = _key(step, in_shape, batch, dtype)
        options = convolution.candidates(step.layer, in_shape)
        known = cache.get(key)
        if not (isinstance(known, str) and known in options):
            x = g.standard_normal((batch, *in_shape)).astype(dtype)
            dy = g.standard_normal((batch, *step.out_shape)).astype(dtype)
            grads = dict(step.layer.grads)
            times = {}
            for algorithm in options:
                probe = ConvStep(step.kind, step.name, step.inputs, step.output, step.out_shape, layer=step.layer,
                                 algorithm=algorithm, keep={}, scratch=F.Scratch(), epilogue=step.epilogue,
                                 activation=step.activation)
                times[algorithm] = _time(probe, x, dy)
            step.layer.grads = grads
            known = cache[key] = min(times, key=times.get)
            changed = True
            if progress is not None:
                progress(step.name, times)
        chosen[step.name] = known
    if changed:
        try:  # the cache file itself, never where a link in its place points
            atomic_write_bytes(path, json.dumps(cache, indent=1, sort_keys=True).encode(), follow_links=False)
        except CnnctlError as e:  # an unwritable cache costs the timing next time, nothing else
            warnings.warn(CnnctlWarning(f"autotune cache not saved ({e.message}); the timing is repeated next time"),
                          stacklevel=2)
    return chosen


MAX_CACHE_BYTES = 4 << 20  # the autotune cache: a few hundred bytes per convolution shape


def _read_cache(path: Path) -> dict:
    """The autotune cache: a regular file (not a link) of at most MAX_CACHE_BYTES holding a JSON object; anything
    else is one warning and an empty cache (every convolution is timed again)."""
    try:
        cache = json.loads(read_regular(path, MAX_CACHE_BYTES, follow_links=False))
    except Unreadable as e:
        if not e.missing:
            warnings.warn(CnnctlWarning(f"autotune cache {path} not read ({e.reason}); timing every convolution"),
                          stacklevel=3)
        return {}
    except (ValueError, RecursionError) as e:  # RecursionError: deeply nested JSON
        warnings.warn(CnnctlWarning(f"autotune cache {path} not read (not JSON: {type(e).__name__}); timing every "
                                    "convolution"), stacklevel=3)
        return {}
    if not isinstance(cache, dict):
        warnings.warn(CnnctlWarning(f"autotune cache {path} not read (not a JSON object); timing every convolution"),
                      stacklevel=3)
        return {}
    return cache
