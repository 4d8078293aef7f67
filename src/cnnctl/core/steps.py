"""The steps of an execution plan (cnnctl.core.plan): a layer's own forward and backward, an element-wise step cut by
channels, a convolution by its algorithm with its fused epilogue, a container's join, and a window max with the
activation moved behind it. Each step reads and writes numbered values of the plan's tape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cnnctl.core.nn.base import Context, forward_with

from . import convolution, parallel
from . import functional as F
from .epilogue import Epilogue

if TYPE_CHECKING:
    from cnnctl.core.nn.base import Layer


def fusable(layer) -> bool:
    """Whether an activation can run as an epilogue: element-wise, with its own function as its math."""
    return layer is not None and layer.planned_as() == "elementwise"


def _in_channels(work, *arrays: np.ndarray) -> None:
    """work(*slices) over slices of channels of arrays laid out alike, across cnnctl's threads (cut by size: one
    slice where the array is too small for more to pay)."""
    parallel.per_channel(arrays[0], lambda lo, hi: work(*(parallel.channels(a, lo, hi) for a in arrays)))


def _in_place(epilogue: Epilogue, y: np.ndarray) -> np.ndarray | None:
    """The epilogue's function on y in place, a slice of channels per thread; its derivative (None without one)."""
    d = epilogue.derivative(y)
    if d is not None:
        _in_channels(lambda y_, d_: epilogue(y_, None, d_), y, d)
    return d


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

    def saved_bytes(self, shapes: list[tuple], batch: int, itemsize: int) -> int:
        """What forward keeps for backward, for a batch of `batch` (estimated from the shapes)."""
        return 0

    def _derivative_bytes(self, epilogue: Epilogue, batch: int, itemsize: int) -> int:
        if epilogue.activation is None:
            return 0
        size = np.dtype(epilogue.activation.derivative_dtype or np.dtype(f"f{itemsize}")).itemsize
        return int(np.prod(self.out_shape)) * batch * size


class LayerStep(Step):
    """A layer run as it is: its own forward and backward (everything the plan does not rewrite). A layer that
    asks (`takes_context`) is told the runner's Context: the share of the batch, the sum over processes, and how
    its per-channel work is cut across threads."""

    context: Context | None = None

    def forward(self, xs, training):
        return forward_with(self.layer, xs[0], training, self.context)

    def backward(self, dy):
        return [self.layer.backward(dy)]

    def release(self):
        for _, layer in self.layer.named_layers():
            _forget(layer)
            if layer.activation is not None:
                _forget(layer.activation)

    def saved_bytes(self, shapes, batch, itemsize):  # measured from the arrays it holds after its last forward
        act = self.layer.activation
        return _held_bytes(self.layer) + (_held_bytes(act) if act is not None else 0)


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


def _held_bytes(layer: Layer) -> int:
    """The arrays a layer holds from its last forward for its backward (measured: 0 before any forward)."""
    return sum(a.nbytes for _, arrays in _held(layer) for a in arrays if a.base is None)


class ElementwiseStep(LayerStep):
    """An element-wise activation standing alone: its own forward and backward, cut across threads by the runner's
    context; a step of its own kind so that `_fuse` can absorb it into the epilogue of the pass before it."""

    def saved_bytes(self, shapes, batch, itemsize):  # its derivative, estimated before any forward
        return self._derivative_bytes(Epilogue(self.layer), batch, itemsize)


class _Folded:
    """A convolution followed by layers that fold into it ("convolution_fold": a per-channel affine, a channel
    shuffle) as one convolution: each layer's `fold(w, b)` gives the weight and bias of the convolution with it
    after, and `unfold(dw, db, w, b)` maps the folded product's gradients back (setting the layer's own). The
    algorithms see this in place of the layer: its geometry is the layer's, its parameters the folded ones."""

    def __init__(self, conv: Layer, folds: list[Layer]):
        self._conv, self._folds = conv, folds
        self._chain = [(conv.params["weight"], conv.params.get("bias"))]  # the weight and bias before each fold
        for layer in folds:
            self._chain.append(layer.fold(*self._chain[-1]))
        w, b = self._chain[-1]
        self.params = {"weight": w, **({"bias": b} if b is not None else {})}

    def __getattr__(self, name):  # stride, pads, dilation, kernel_size, groups, needs_input_grad: the layer's
        return getattr(self._conv, name)

    def gradients(self, dw: np.ndarray, db: np.ndarray) -> None:
        for layer, (w, b) in zip(reversed(self._folds), reversed(self._chain[:-1])):
            dw, db = layer.unfold(dw, db, w, b)
        self._conv.grads["weight"] = dw
        if "bias" in self._conv.params:
            self._conv.grads["bias"] = db


class ConvStep(Step):
    """A convolution by a registered algorithm, its bias and element-wise activation as the epilogue on its
    output (an activation that is not element-wise runs after it, as its own layer). `folds`: the layers after
    it folded into its product (`_Folded`)."""

    def __init__(self, *args, keep: dict, scratch: F.Scratch, epilogue: Epilogue, activation: Layer | None, **kw):
        super().__init__(*args, **kw)
        self.keep, self.scratch, self.epilogue, self.activation = keep, scratch, epilogue, activation
        self.folds: list[Layer] = []
        self.method = convolution.get(self.algorithm)
        self._saved = None

    def forward(self, xs, training):
        x = xs[0]
        self._x_shape = x.shape
        keep = self.scratch if self.forward_only else self.keep  # nothing to keep below the trainable layers
        self._conv = _Folded(self.layer, self.folds) if self.folds else self.layer
        y, self._saved = self.method.forward(self._conv, x, self.epilogue, keep, self.scratch)
        # saved also after an evaluation forward: a backward may follow (gradient checks)
        return y if self.activation is None else self.activation.forward(y, training)

    def backward(self, dy):
        conv = self.layer
        if self.activation is not None:
            dy = self.activation.backward(dy)
        dx, dw, db = self.method.backward(self._conv, dy, self._saved, self._x_shape, self.scratch)
        if self.folds:
            self._conv.gradients(dw, db)
        else:
            conv.grads["weight"] = dw
            if "bias" in conv.params:
                conv.grads["bias"] = db
        self._saved = self._conv = None
        return [dx]

    def release(self):
        self._saved = None
        if self.activation is not None:
            _forget(self.activation)

    def saved_bytes(self, shapes, batch, itemsize):
        kept = self.method.saved_bytes(self.layer, shapes[self.inputs[0]], self.out_shape, batch, itemsize)
        return kept + self._derivative_bytes(self.epilogue, batch, itemsize)


class JoinStep(Step):
    """A container's join of its branches' outputs (the container's own `join`), its element-wise activation
    fused in the same pass (other activations after it). `gates[k]`: whether input k gets a gradient (an
    identity branch's only when the container's input needs one)."""

    def __init__(self, *args, gates: list[bool], in_shapes: list[tuple], epilogue: Epilogue,
                 activation: Layer | None, **kw):
        super().__init__(*args, **kw)
        self.gates, self.in_shapes, self.epilogue, self.activation = gates, in_shapes, epilogue, activation
        self._d = None
        self._inputs: list[np.ndarray] | None = None  # the joined arrays, for a join whose backward reads them

    def forward(self, xs, training):
        join, ep = self.layer.join, self.epilogue
        if self.layer.join_by_values:  # value by value: join and epilogue on each slice of channels in one pass
            a = xs[0]
            rest = [F.in_layout_of(x, a) for x in xs[1:]]
            y = np.empty_like(a)
            d = ep.derivative(y)

            def part(y_, d_, *x_):
                ep(join(list(x_), out=y_), None, d_)

            if d is None:
                _in_channels(lambda y_, *x_: join(list(x_), out=y_), y, a, *rest)
            else:
                _in_channels(part, y, d, a, *rest)
        else:
            y = join(xs)
            d = _in_place(ep, y)
        self._d = d
        self._inputs = list(xs) if self.layer.join_keeps_inputs else None
        return y if self.activation is None else self.activation.forward(y, training)

    def backward(self, dy):
        if self.activation is not None:
            dy = self.activation.backward(dy)
        if self._d is not None:
            dy = F.chained(dy, self._d)
        inputs, self._d, self._inputs = self._inputs, None, None
        grads = self.layer.join_backward(dy, self.in_shapes, inputs)
        return [g if gate else None for g, gate in zip(grads, self.gates)]

    def release(self):
        self._d = self._inputs = None
        if self.activation is not None:
            _forget(self.activation)

    def saved_bytes(self, shapes, batch, itemsize):
        kept = sum(int(np.prod(s)) for s in self.in_shapes) * batch * itemsize if self.layer.join_keeps_inputs else 0
        return kept + self._derivative_bytes(self.epilogue, batch, itemsize)


class WindowMaxStep(Step):
    """A max pooling with the non-decreasing activation of the step before it moved behind it:
    f(pool(z)) = pool(f(z)), and the gradients agree (the maximum of a window is where it was before)."""

    def __init__(self, *args, activation: Layer, context: Context | None = None, **kw):
        super().__init__(*args, **kw)
        self.activation, self.context = activation, context
        self._d = None

    def forward(self, xs, training):
        y = forward_with(self.layer, xs[0], training, self.context)
        self._d = _in_place(Epilogue(self.activation), y)
        return y

    def backward(self, dy):
        dy = F.chained(dy, self._d)
        self._d = None
        return [self.layer.backward(dy)]

    def release(self):
        self._d = None
        _forget(self.layer)

    def saved_bytes(self, shapes, batch, itemsize):
        return _held_bytes(self.layer) + self._derivative_bytes(Epilogue(self.activation), batch, itemsize)
