"""The execution plan: how a model runs, decided once per input shape; the layers only say what they compute.

A model's layers are pure math (each layer's forward and backward can be read, and run, on its own). The plan
walks the model's tree (sequences, residual units, concatenations, blocks) into a flat list of steps over
numbered values, a tape, and decides for each step how it runs:

  * **fusion**: a convolution's bias and ReLU run on its product while it is in cache; a ReLU that follows a
    convolution moves behind a following max pooling (max and ReLU commute, with the same gradients, and the
    pooled tensor is a quarter of the size); a residual unit's add and its ReLU are one pass;
  * **the convolution algorithm** of every ungrouped convolution (`ALGORITHMS`): the lowering, a 1x1
    convolution as one product, Winograd F(2x2, 3x3) or F(4x4, 3x3). By default a rule on the layer's shape
    (`default_algorithm`), so the same config gives the same plan on every machine; `autotune` times the
    candidates on this machine instead;
  * **memory**: temporary arrays (lowered deltas, partial products) come from one scratch shared by every
    step, the lowered inputs that backward reads are kept per layer, and each step forgets what it saved once
    its backward has run;
  * **threads**: each step's array work is cut into slices by size (cnnctl.parallel), never by thread count.

Forward hooks still see every layer's own output: a layer with a hook is never fused across (the plan is
rebuilt when hooks, frozen layers or the input shape change). `describe()` lists the steps, as `cnnctl
inspect --plan` and `cnnctl bench --plan` print them.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import functional as F
from . import parallel, winograd
from .errors import CnnctlError, CnnctlWarning
from .fileio import Unreadable, atomic_write_bytes, read_regular
from .nn.activations import ReLU
from .nn.base import Layer
from .nn.conv import Conv2D
from .nn.graph import Concat, Residual, join_channels
from .nn.model import Sequential
from .nn.pooling import MaxPool2D

# ------------------------------------------------------------------ convolution algorithms


def _pointwise_applies(conv: Conv2D, pads) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and not any(pads) and conv.groups == 1


ALGORITHMS = {
    "lowering": "column lowering (MEC) and one product per output row; any kernel, stride, padding, dilation",
    "pointwise": "a 1x1 stride-1 unpadded convolution as one product over the batch-innermost input, no copy",
    "winograd2": "Winograd F(2x2, 3x3): 2.25x fewer multiply-adds; 3x3, stride 1, padding <= 2",
    "winograd4": "Winograd F(4x4, 3x3): 4x fewer multiply-adds, a few more bits of float32 rounding; 3x3, "
                 "stride 1, padding <= 2",
}


def candidates(conv: Conv2D, input_shape) -> list[str]:
    """The algorithms that can run this convolution on inputs of this (C, H, W) shape."""
    pads = conv.pads(input_shape[1:])
    out = ["lowering"]
    if _pointwise_applies(conv, pads):
        out.append("pointwise")
    if winograd.applies(conv.kernel_size, conv.stride, conv.dilation, pads, conv.groups):
        out += ["winograd2", "winograd4"]
    return out


def default_algorithm(conv: Conv2D, input_shape) -> str:
    """The rule (docs/performance.md has the measurements behind it): 1x1 stride-1 convolutions as one product;
    everything else by the lowering, which measured faster than both Winograd variants on every 3x3 layer of
    the shipped configs at batch 128 (NumPy's transforms cost more memory passes than the products save)."""
    return "pointwise" if "pointwise" in candidates(conv, input_shape) else "lowering"


# ------------------------------------------------------------------ steps


@dataclass
class Step:
    """One operation of the plan: reads values `inputs`, writes value `output`."""

    kind: str
    name: str
    inputs: list[int]
    output: int
    out_shape: tuple
    layer: Layer | None = None
    algorithm: str = ""
    fused: list[str] = field(default_factory=list)
    forward_only: bool = False  # below the lowest trainable layer: no gradient reaches it, it keeps nothing

    def forward(self, xs: list[np.ndarray], training: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> list[np.ndarray | None]:
        raise NotImplementedError

    def release(self) -> None:
        """Forget what forward saved for backward."""


class LayerStep(Step):
    """A layer run as it is: its own forward and backward (everything the plan does not rewrite)."""

    def forward(self, xs, training):
        return self.layer.forward(xs[0], training)

    def backward(self, dy):
        return [self.layer.backward(dy)]

    def release(self):
        for _, layer in self.layer.named_layers():
            _forget(layer)
            if layer.activation is not None:
                _forget(layer.activation)


def _held(layer: Layer):
    """(attribute, arrays) of what a layer holds from its forward for its backward: by convention its underscore
    attributes holding arrays, alone or in lists and tuples (a batchnorm keeps a list of state tuples)."""
    for key, value in vars(layer).items():
        if key.startswith("_"):
            arrays = [a for v in (value if isinstance(value, (list, tuple)) else (value,))
                      for a in (v if isinstance(v, tuple) else (v,)) if isinstance(a, np.ndarray)]
            if arrays:
                yield key, arrays


def _forget(layer: Layer) -> None:
    """Drop the arrays a layer holds from its forward for its backward."""
    for key, _ in list(_held(layer)):
        setattr(layer, key, None)


class ConvStep(Step):
    """An ungrouped convolution by the plan's algorithm, bias and ReLU fused on its output (the layer's
    other activations run as the activation layer after it)."""

    def __init__(self, *args, keep: dict, scratch: F.Scratch, relu: bool, activation: Layer | None, **kw):
        super().__init__(*args, **kw)
        self.keep, self.scratch, self.relu, self.activation = keep, scratch, relu, activation
        self._saved = None

    def forward(self, xs, training):
        conv, x = self.layer, xs[0]
        self._x_shape, self._pad4 = x.shape, conv.pads(x.shape[2:])
        w, b = conv.params["weight"], conv.params.get("bias")
        if self.algorithm.startswith("winograd"):
            # (C, H, W, N) as a view: the input transform copies it into its padded tiles in any layout
            y, saved = winograd.forward(x.transpose(1, 2, 3, 0), w, b, self._pad4, int(self.algorithm[-1]),
                                        relu=self.relu)
            y = y.transpose(3, 0, 1, 2)
        elif self.algorithm == "pointwise":
            y, saved = pointwise_forward(x, w, b, self.relu)
        else:
            y, saved = F.conv2d_forward(x, w, b, conv.stride, self._pad4, conv.dilation,
                                        self.scratch if self.forward_only else self.keep, relu=self.relu,  # kept
                                        scratch=self.scratch)
        self._saved = saved  # also after an evaluation forward: a backward may follow (gradient checks)
        return y if self.activation is None else self.activation.forward(y, training)

    def backward(self, dy):
        conv = self.layer
        if self.activation is not None:
            dy = self.activation.backward(dy)
        w, need = conv.params["weight"], conv.needs_input_grad
        if self.algorithm.startswith("winograd"):
            m = int(self.algorithm[-1])
            dyc = dy.transpose(1, 2, 3, 0)
            dx, dw, db = winograd.backward(dyc, self._saved, w, tuple(self._x_shape[1:]), self._pad4, m, need)
            dx = None if dx is None else dx.transpose(3, 0, 1, 2)
        elif self.algorithm == "pointwise":
            dx, dw, db = pointwise_backward(dy, self._saved, w, need)
        else:
            dx, dw, db = F.conv2d_backward(dy, self._saved, w, self._x_shape, conv.stride, self._pad4,
                                           conv.dilation, need_dx=need, scratch=self.scratch)
        conv.grads["weight"] = dw
        if "bias" in conv.params:
            conv.grads["bias"] = db
        self._saved = None
        return [dx]

    def release(self):
        self._saved = None
        if self.activation is not None:
            _forget(self.activation)


def _relu_in_place(y: np.ndarray, mask: np.ndarray) -> None:
    """y = max(y, 0) in place, recording where y > 0 in mask (a multiply by the mask: -0.0 below zero)."""
    np.multiply(y, np.greater(y, 0, out=mask), out=y)


def _masked(dy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """dy * mask, laid out as the mask, a slice of channels per thread: a fused ReLU's backward."""
    dyl, out = F.in_layout_of(dy, mask), np.empty_like(mask, dtype=dy.dtype)
    parallel.per_channel(out, lambda lo, hi: np.multiply(parallel.channels(dyl, lo, hi), parallel.channels(
        mask, lo, hi), out=parallel.channels(out, lo, hi)))
    return out


class PoolReluStep(Step):
    """Max pooling followed by the ReLU moved behind it: max(pool(z), 0) = pool(max(z, 0)), and the gradients
    agree (a window whose maximum is not positive passes none either way)."""

    def forward(self, xs, training):
        y = self.layer.forward(xs[0], training)
        self._mask = np.empty_like(y, dtype=bool)
        parallel.per_channel(y, lambda lo, hi: _relu_in_place(parallel.channels(y, lo, hi),
                                                               parallel.channels(self._mask, lo, hi)))
        return y

    def backward(self, dy):
        dy = _masked(dy, self._mask)
        self._mask = None
        return [self.layer.backward(dy)]

    def release(self):
        self._mask = None
        _forget(self.layer)


class AddStep(Step):
    """A residual unit's body(x) + shortcut(x), with its ReLU in the same pass (other activations after).
    `gates[k]`: whether input k gets a gradient (an identity shortcut's only when the unit's input needs one)."""

    def __init__(self, *args, gates: list[bool], relu: bool, activation: Layer | None, **kw):
        super().__init__(*args, **kw)
        self.gates, self.relu, self.activation = gates, relu, activation

    def forward(self, xs, training):
        a, b = xs[0], F.in_layout_of(xs[1], xs[0])
        y = np.empty_like(a)
        mask = np.empty_like(a, dtype=bool) if self.relu else None

        def part(lo, hi):
            ys = np.add(parallel.channels(a, lo, hi), parallel.channels(b, lo, hi), out=parallel.channels(y, lo, hi))
            if mask is not None:
                _relu_in_place(ys, parallel.channels(mask, lo, hi))

        parallel.per_channel(a, part)
        self._mask = mask
        return y if self.activation is None else self.activation.forward(y, training)

    def backward(self, dy):
        if self.activation is not None:
            dy = self.activation.backward(dy)
        if self._mask is not None:
            dy = _masked(dy, self._mask)
        self._mask = None
        return [dy if g else None for g in self.gates]

    def release(self):
        self._mask = None


class ConcatStep(Step):
    """Branch outputs joined on the channel axis; backward hands each branch its channels."""

    def __init__(self, *args, gates: list[bool], **kw):
        super().__init__(*args, **kw)
        self.gates = gates

    def forward(self, xs, training):
        y, self._channels = join_channels(xs)
        return y

    def backward(self, dy):
        return [dy[:, a:b] if g else None for g, a, b in zip(self.gates, self._channels, self._channels[1:])]


# ------------------------------------------------------------------ pointwise convolution


def pointwise_forward(x, weight, bias, relu):
    """A 1x1 stride-1 unpadded convolution: y (O, H*W*N) = W (O, C) @ x (C, H*W*N) on the batch-innermost
    input, bias and ReLU on slices of rows. Saves the input (a view) and the ReLU mask."""
    n, c, h, w = x.shape
    xc = F.batch_innermost(x, None, "").transpose(1, 2, 3, 0).reshape(c, -1)  # keeps a copy alive for backward
    o = weight.shape[0]
    wm = weight.reshape(o, c)
    y = np.empty((o, h * w * n), x.dtype)
    mask = np.empty(y.shape, bool) if relu else None

    def rows(lo, hi):
        part = np.matmul(wm[lo:hi], xc, out=y[lo:hi])
        if bias is not None:
            part += bias[lo:hi, None]
        if relu:
            np.multiply(part, np.greater(part, 0, out=mask[lo:hi]), out=part)

    parallel.split(o, rows, y.size * c // parallel.MAC_PER_NUMBER)
    return y.reshape(o, h, w, n).transpose(3, 0, 1, 2), (xc, mask, (n, c, h, w))


def pointwise_backward(dy, saved, weight, need_dx):
    """Gradients of pointwise_forward: dx (or None), dweight, dbias."""
    xc, mask, (n, c, h, w) = saved
    o = weight.shape[0]
    dyt = dy.transpose(1, 2, 3, 0)  # (O, H, W, N): free when dy is batch-innermost
    dY = (dyt if dyt.flags.c_contiguous else np.ascontiguousarray(dyt)).reshape(o, -1)
    if mask is not None:
        dY = dY * mask
    dbias = dY.sum(axis=1)
    dweight = np.empty((o, c), dy.dtype)
    parallel.split(o, lambda lo, hi: np.matmul(dY[lo:hi], xc.T, out=dweight[lo:hi]), dweight.size * xc.shape[1]
                   // parallel.MAC_PER_NUMBER)
    dx = None
    if need_dx:
        dxc = np.empty((c, h * w * n), dy.dtype)
        parallel.split(c, lambda lo, hi: np.matmul(weight.reshape(o, c)[:, lo:hi].T, dY, out=dxc[lo:hi]),
                       dxc.size * o // parallel.MAC_PER_NUMBER)
        dx = dxc.reshape(c, h, w, n).transpose(3, 0, 1, 2)
    return dx, dweight.reshape(weight.shape), dbias


# ------------------------------------------------------------------ the plan


class Plan:
    """The steps that run a model on inputs of one (C, H, W) shape and dtype; `forward` and `backward` run
    them, `describe` lists them."""

    def __init__(self, model: Sequential, input_shape: tuple, choices: dict[str, str] | None = None,
                 keep: dict | None = None, scratch: F.Scratch | None = None):
        self.input_shape = tuple(input_shape)
        self.choices = dict(choices or {})
        self.keep = keep if keep is not None else {}
        self.scratch = scratch if scratch is not None else F.Scratch()
        self.steps: list[Step] = []
        self.hooks: list[tuple[int, Layer]] = []  # (value, layer): the layers whose output a value is
        self.shapes = [self.input_shape]
        out = self._emit(model, "", 0, self.input_shape, top=True)
        self.output = out
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
        top = getattr(model, "layers", None)
        if top is None or model.needs_input_grad:
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
        if isinstance(layer, Sequential):
            prefix = layer.child_prefix
            for i, child in enumerate(layer.layers):
                child_name = f"{name}.{prefix}{i}" if name else f"{prefix}{i}"
                value = self._emit(child, child_name, value, shape)
                shape = self.shapes[value]
            if not top:
                self.hooks.append((value, layer))
            return value
        if isinstance(layer, Residual):
            b = self._emit(layer.body, f"{name}.body", value, shape)
            s = self._emit(layer.shortcut, f"{name}.shortcut", value, shape) if layer.shortcut is not None else value
            relu = isinstance(layer.activation, ReLU)
            out = self._value(self.shapes[b])
            gates = [True, s != value or layer.needs_input_grad]
            self.steps.append(AddStep("add", name, [b, s], out, self.shapes[b], layer=layer, gates=gates, relu=relu,
                                      activation=None if relu else layer.activation,
                                      fused=["relu"] if relu else []))
            self.hooks.append((out, layer))
            return out
        if isinstance(layer, Concat):
            outs = [self._emit(br, f"{name}.branches.{k}", value, shape) for k, br in enumerate(layer.branches)]
            out_shape = layer.output_shape(shape)
            out = self._value(out_shape)
            gates = [o != value or layer.needs_input_grad for o in outs]
            self.steps.append(ConcatStep("concat", name, outs, out, out_shape, layer=layer, gates=gates))
            self.hooks.append((out, layer))
            return out
        out_shape = layer.output_shape(shape)
        out = self._value(out_shape)
        if isinstance(layer, Conv2D) and layer.groups == 1:
            algorithm = self.choices.get(name) or default_algorithm(layer, shape)
            if algorithm not in candidates(layer, shape):
                algorithm = default_algorithm(layer, shape)
            relu = isinstance(layer.activation, ReLU)
            step = ConvStep("conv", name, [value], out, out_shape, layer=layer, algorithm=algorithm,
                            keep=self.keep.setdefault(name, {}), scratch=self.scratch, relu=relu,
                            activation=None if relu or layer.activation is None else layer.activation,
                            fused=(["bias"] if "bias" in layer.params else []) + (["relu"] if relu else []))
        else:
            step = LayerStep(layer.tag, name, [value], out, out_shape, layer=layer)
        self.steps.append(step)
        self.hooks.append((out, layer))
        return out

    def _fuse(self) -> None:
        """Move a convolution's ReLU behind the max pooling that alone reads its output (neither watched)."""
        readers: dict[int, list[Step]] = {}
        for s in self.steps:
            for v in s.inputs:
                readers.setdefault(v, []).append(s)
        for s in self.steps:
            if not (isinstance(s, ConvStep) and s.relu and not s.layer.forward_hooks):
                continue
            nxt = readers.get(s.output, [])
            if len(nxt) != 1 or not isinstance(nxt[0], LayerStep) or not isinstance(nxt[0].layer, MaxPool2D):
                continue
            if any(v == s.output and layer is not s.layer for v, layer in self.hooks) or s.output == self.output:
                continue  # a container's output: it must be the ReLU's
            pool = nxt[0]
            s.relu, s.fused = False, [f for f in s.fused if f != "relu"]
            fused = PoolReluStep("maxpool2d", pool.name, pool.inputs, pool.output, pool.out_shape, layer=pool.layer,
                                 fused=[f"relu of {s.name}"])
            self.steps[self.steps.index(pool)] = fused

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
        return {s.name: s.algorithm for s in self.steps if isinstance(s, ConvStep)}

    def describe(self, batch: int, itemsize: int = 4) -> list[dict]:
        """One row per step: kind, layer, algorithm, what is fused, output shape and the memory its output takes
        and what it keeps for backward, for a batch of `batch` (the plan's own steps estimated from their
        shapes, a layer run as it is measured from the arrays it holds after its last forward)."""
        rows = []
        for k, s in enumerate(self.steps):
            out = int(np.prod(s.out_shape)) * batch * itemsize
            rows.append({"step": k, "kind": s.kind, "layer": s.name or "(model)", "algorithm": s.algorithm,
                         "fused": ", ".join(s.fused), "output_shape": list(s.out_shape), "output_bytes": out,
                         "saved_bytes": 0 if s.forward_only else _saved_bytes(s, self.shapes, batch, itemsize),
                         "forward_only": s.forward_only})
        return rows


def _saved_bytes(step: Step, shapes, batch: int, itemsize: int) -> int:
    """What a step keeps from forward to backward (see `Plan.describe`)."""
    inp = int(np.prod(shapes[step.inputs[0]])) * batch
    out = int(np.prod(step.out_shape)) * batch
    if isinstance(step, ConvStep):
        c, h, w = shapes[step.inputs[0]]
        pads = step.layer.pads((h, w))
        if step.algorithm.startswith("winograd"):
            m = int(step.algorithm[-1])
            _, _, ty, tx = winograd.tiles(h, w, pads, m)
            kept = (m + 2) ** 2 * c * ty * tx * batch * itemsize
        elif step.algorithm == "pointwise":
            kept = inp * itemsize
        else:
            kw, ow = step.layer.kernel_size[1], step.out_shape[2]
            kept = (h + pads[0] + pads[1]) * c * kw * ow * batch * itemsize
        return kept + (out if step.relu else 0)  # the ReLU mask, a byte per value
    if isinstance(step, PoolReluStep) or (isinstance(step, AddStep) and step.relu):
        return out  # the ReLU mask, a byte per value
    if isinstance(step, AddStep):
        return 0
    return _held_bytes(step.layer) + (_held_bytes(step.layer.activation) if step.layer.activation else 0)


def _held_bytes(layer: Layer) -> int:
    """The arrays a layer holds from its last forward for its backward (measured: 0 before any forward)."""
    return sum(a.nbytes for _, arrays in _held(layer) for a in arrays if a.base is None)


# ------------------------------------------------------------------ autotuning


def cache_path() -> Path:
    """~/.cache/cnnctl/plans/<cpu model>-<blas>.json (XDG_CACHE_HOME respected)."""
    from .environment import blas_info, cpu_model

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnctl" / "plans"
    blas = blas_info()
    machine = f"{cpu_model()}-{blas.get('library', 'blas')}-{blas.get('kernel', '')}"
    return root / (re.sub(r"[^A-Za-z0-9_.-]+", "_", machine).strip("_") + ".json")


def _key(step: ConvStep, in_shape, batch: int, dtype) -> str:
    conv = step.layer
    return (f"{tuple(in_shape)}->{conv.out_channels} k{conv.kernel_size} s{conv.stride} p{conv.pads(in_shape[1:])} "
            f"d{conv.dilation} bias{int('bias' in conv.params)} relu{int(step.relu)} batch{batch} "
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
        options = candidates(step.layer, in_shape)
        known = cache.get(key)
        if not (isinstance(known, str) and known in options):
            x = g.standard_normal((batch, *in_shape)).astype(dtype)
            dy = g.standard_normal((batch, *step.out_shape)).astype(dtype)
            grads = dict(step.layer.grads)
            times = {}
            for algorithm in options:
                probe = ConvStep(step.kind, step.name, step.inputs, step.output, step.out_shape, layer=step.layer,
                                 algorithm=algorithm, keep={}, scratch=F.Scratch(), relu=step.relu,
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
