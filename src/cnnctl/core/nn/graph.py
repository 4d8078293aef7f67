"""Branching containers: Residual (body(x) + shortcut(x)) and Concat (branches joined on the channel axis).

Where one input feeds several branches, their input gradients add (a fork's backward); a concatenation's
gradient is split by channels, each branch getting its own slice. docs/backprop.md has the math.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from cnnctl.core import functional as F
from cnnctl.errors import ShapeError

from .base import Context, Layer, LayerSpec, make_activation, register
from .model import Sequential

if TYPE_CHECKING:  # the layer union and the activation names, built in nn/__init__ once every layer type is registered
    from . import Activation, AnyLayer


def _max_rf(rfs):
    rfs = list(rfs)
    if any(rf is None for rf in rfs):
        return None
    return tuple(max(rf[k] for rf in rfs) for k in range(4))


class ResidualSpec(LayerSpec):
    type: Literal["residual"]
    body: list[AnyLayer] = Field(min_length=1, description="The residual branch, run on the input.")
    shortcut: Literal["auto", "identity"] | list[AnyLayer] = Field(
        "auto", description="identity; auto (identity when the body keeps the shape, else a 1x1 convolution with "
        "the body's stride and channels plus batchnorm: ResNet's option B); or a list of layers.")
    activation: Activation | None = Field(None, description="Applied to body(x) + shortcut(x).")

    def layer_lists(self):
        lists = {("body",): self.body}
        if isinstance(self.shortcut, list):
            lists[("shortcut",)] = self.shortcut
        return lists

    def with_layer_lists(self, lists):
        update = {"body": lists[("body",)]}
        if ("shortcut",) in lists:
            update["shortcut"] = lists[("shortcut",)]
        return self.model_copy(update=update)

    def build(self, input_shape, scope):
        body = scope.sequence("body", self.body, input_shape)
        shortcut = None
        if isinstance(self.shortcut, list):
            shortcut = scope.sequence("shortcut", self.shortcut, input_shape)
        elif self.shortcut == "auto":
            out = body.output_shape(input_shape)
            if tuple(out) != tuple(input_shape):
                shortcut = scope.sequence("shortcut", projection(input_shape, out), input_shape)
        return Residual(body, shortcut, self.activation)


def projection(input_shape, output_shape) -> list[LayerSpec]:
    """ResNet's option B shortcut from input_shape to output_shape: a 1x1 convolution (no bias) with the
    stride that maps the input's height and width onto the output's, then batchnorm."""
    from .conv import Conv2DSpec
    from .regularization import BatchNormSpec

    if len(input_shape) != 3 or len(output_shape) != 3:
        raise ShapeError(f"residual: the body maps {tuple(input_shape)} to {tuple(output_shape)}; an automatic "
                         "shortcut needs feature maps in and out", "give an explicit shortcut: [layers]")
    strides = []
    for size, out in zip(input_shape[1:], output_shape[1:]):
        s = next((s for s in range(1, size + 1) if (size - 1) // s + 1 == out), None)
        if s is None:
            raise ShapeError(f"residual: no 1x1 convolution stride maps the input {tuple(input_shape)} onto the "
                             f"body's output {tuple(output_shape)}", "give an explicit shortcut: [layers], or pad "
                             "the body's convolutions (padding: same)")
        strides.append(s)
    return [Conv2DSpec(type="conv2d", filters=output_shape[0], kernel_size=1, stride=tuple(strides), bias=False),
            BatchNormSpec(type="batchnorm")]


@register("residual", ResidualSpec)
class Residual(Layer):
    """y = act(body(x) + shortcut(x)); the shortcut is the identity when None. A join: the plan runs the branches
    as its own steps, then `join` (value by value, so on slices of channels) with the activation fused."""

    onnx_op = "Add"

    capability = "join"
    join_by_values = True  # join(xs, out) is element-wise over its inputs: it may run on slices of channels
    takes_context = True  # passed on to its branches and activation (when not run by a plan's steps)

    def __init__(self, body: Sequential, shortcut: Sequential | None = None, activation: str | None = None):
        super().__init__()
        self.body, self.shortcut = body, shortcut
        self.activation = make_activation(activation)

    def children(self):
        return [("body", self.body)] + ([("shortcut", self.shortcut)] if self.shortcut is not None else [])

    def join_inputs(self) -> list[tuple[str, Sequential | None]]:
        """The branches run on the input, by name, whose outputs `join` takes; None: the input itself."""
        return [("body", self.body), ("shortcut", self.shortcut)]

    def join(self, xs: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """body(x) + shortcut(x), laid out as the body's output."""
        return np.add(xs[0], F.in_layout_of(xs[1], xs[0]), out=out)

    def join_backward(self, dy: np.ndarray, shapes: list[tuple], inputs: list[np.ndarray] | None) -> list[np.ndarray]:
        """The gradient of each joined output (shapes: theirs, per sample; inputs: the joined arrays, kept by
        forward when the class says `join_keeps_inputs`): the sum's, to both."""
        return [dy, dy]

    def set_input_grad(self, needed):
        self.needs_input_grad = needed
        for _, child in self.children():
            child.set_input_grad(needed)

    def output_shape(self, input_shape):
        a = tuple(self.body.output_shape(input_shape))
        b = tuple(self.shortcut.output_shape(input_shape)) if self.shortcut is not None else tuple(input_shape)
        if a != b:
            what = "the shortcut" if self.shortcut is not None else "the identity shortcut (the input)"
            raise ShapeError(f"residual: the body outputs {a} but {what} gives {b}; they must be equal to add",
                             "use shortcut: auto (a 1x1 convolution when shapes differ), give a shortcut that "
                             f"outputs {a}, or make the body keep the shape {b}")
        return a

    def macs(self, input_shape):
        sc = self.shortcut.macs(input_shape) if self.shortcut is not None else 0
        return self.body.macs(input_shape) + sc

    def receptive_field(self, rf):
        return _max_rf([self.body.receptive_field(rf),
                        self.shortcut.receptive_field(rf) if self.shortcut is not None else rf])

    def forward(self, x, training=True, context: Context | None = None):
        return self._activate(self.join([x if b is None else b(x, training, context) for _, b in self.join_inputs()]),
                              training, context, in_place=True)

    def backward(self, dy):
        d_body, d_shortcut = self.join_backward(self._deactivate(dy), [], None)
        dx = self.body.backward(d_body)
        ds = self.shortcut.backward(d_shortcut) if self.shortcut is not None else d_shortcut
        if not self.needs_input_grad:
            return None
        return np.add(dx, F.in_layout_of(ds, dx))  # the fork: both branches' input gradients add

    def onnx(self, g, x, input_shape, name):
        a = self.body.onnx(g, x, input_shape, name + ".body")
        b = self.shortcut.onnx(g, x, input_shape, name + ".shortcut") if self.shortcut is not None else x
        return self._onnx_activation(g, g.node(self.onnx_op, [a, b], name + ".add"), name)

    def __repr__(self):
        sc = repr(self.shortcut) if self.shortcut is not None else "identity"
        return f"Residual(body={self.body!r}, shortcut={sc})"


class ConcatSpec(LayerSpec):
    type: Literal["concat"]
    branches: list[list[AnyLayer]] = Field(min_length=2, description="Layer lists run on the same input; outputs "
                                           "are joined on the channel axis; [] is the input itself.")

    def layer_lists(self):
        return {("branches", k): b for k, b in enumerate(self.branches)}

    def with_layer_lists(self, lists):
        return self.model_copy(update={"branches": [lists[("branches", k)] for k in range(len(self.branches))]})

    def build(self, input_shape, scope):
        return Concat([scope.sequence(f"branches.{k}", b, input_shape) for k, b in enumerate(self.branches)])


def channel_bounds(shapes: list[tuple]) -> np.ndarray:
    """Where each of arrays of these per-sample shapes starts on the channel axis once joined: [0, c0, c0 + c1, ...]."""
    return np.cumsum([0] + [s[0] for s in shapes])


def join_channels(outs: list[np.ndarray]) -> np.ndarray:
    """The arrays concatenated on axis 1 (feature maps stored batch-innermost, as convolutions want their
    input)."""
    bounds = channel_bounds([o.shape[1:] for o in outs])
    n, rest = outs[0].shape[0], outs[0].shape[2:]
    if len(rest) == 2:
        y = np.empty((int(bounds[-1]), *rest, n), outs[0].dtype).transpose(3, 0, 1, 2)
    else:
        y = np.empty((n, int(bounds[-1])), outs[0].dtype)
    for o, a, b in zip(outs, bounds, bounds[1:]):
        y[:, a:b] = o
    return y


@register("concat", ConcatSpec)
class Concat(Layer):
    """Branches on the same input, outputs concatenated on axis 1 (channels, or features). A join: the plan runs
    the branches as its own steps, then `join`."""

    onnx_op = "Concat"

    capability = "join"
    join_by_values = False
    takes_context = True  # passed on to its branches (when not run by a plan's steps)

    def __init__(self, branches: list[Sequential]):
        super().__init__()
        self.branches = list(branches)

    def children(self):
        return [(f"branches.{k}", b) for k, b in enumerate(self.branches)]

    def join_inputs(self) -> list[tuple[str, Sequential | None]]:
        return self.children()

    def join(self, xs: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        return join_channels(xs)

    def join_backward(self, dy: np.ndarray, shapes: list[tuple], inputs: list[np.ndarray] | None) -> list[np.ndarray]:
        """Each branch's channels of the gradient (shapes: the branches' outputs', per sample)."""
        bounds = channel_bounds(shapes)
        return [dy[:, a:b] for a, b in zip(bounds, bounds[1:])]

    def set_input_grad(self, needed):
        self.needs_input_grad = needed
        for b in self.branches:
            b.set_input_grad(needed)

    def output_shape(self, input_shape):
        shapes = [tuple(b.output_shape(input_shape)) for b in self.branches]
        if len({len(s) for s in shapes}) > 1 or len({s[1:] for s in shapes}) > 1:
            listed = ", ".join(f"branches[{k}] {s}" for k, s in enumerate(shapes))
            raise ShapeError(f"concat: the branches' outputs differ in more than the channel count ({listed})",
                             "make every branch keep the same height and width (padding: same, equal strides)")
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def macs(self, input_shape):
        return sum(b.macs(input_shape) for b in self.branches)

    def receptive_field(self, rf):
        return _max_rf(b.receptive_field(rf) for b in self.branches)

    def forward(self, x, training=True, context: Context | None = None):
        outs = [b(x, training, context) for b in self.branches]
        self._shapes = [o.shape[1:] for o in outs]
        return self.join(outs)

    def backward(self, dy):
        dx = None
        for branch, d in zip(self.branches, self.join_backward(dy, self._shapes, None)):
            d = branch.backward(d)  # each branch gets its channels' share
            if self.needs_input_grad:
                dx = d.copy() if dx is None else np.add(dx, F.in_layout_of(d, dx), out=dx)
        return dx

    def onnx(self, g, x, input_shape, name):
        outs = [b.onnx(g, x, input_shape, f"{name}.branches.{k}") for k, b in enumerate(self.branches)]
        return g.node(self.onnx_op, outs, name, axis=1)

    def __repr__(self):
        return f"Concat({', '.join(repr(b) for b in self.branches)})"



class GateSpec(LayerSpec):
    type: Literal["gate"]
    branch: list[AnyLayer] = Field(min_length=1, description="Layers run on the input that end in one value per "
                                   "channel (global_avgpool2d, dense layers, a sigmoid or hardsigmoid); the input's "
                                   "channels are scaled by them: squeeze-and-excitation (Hu et al. 2018).")

    def layer_lists(self):
        return {("branch",): self.branch}

    def with_layer_lists(self, lists):
        return self.model_copy(update={"branch": lists[("branch",)]})

    def build(self, input_shape, scope):
        return Gate(scope.sequence("branch", self.branch, input_shape))


@register("gate", GateSpec)
class Gate(Layer):
    """y = x * g(x), g(x) one value per sample and channel broadcast over height and width: squeeze-and-excitation
    gating (MobileNetV3, EfficientNet). Backward: dx = dy * g + g's input gradient of sum_hw(dy * x) (the fork).
    A join of the input itself and the branch's output: the plan runs the branch as its own steps, then `join`."""

    onnx_op = "Mul"

    capability = "join"
    join_by_values = False
    join_keeps_inputs = True  # join_backward reads x and g
    takes_context = True  # passed on to its branch (when not run by a plan's steps)

    def __init__(self, branch: Sequential):
        super().__init__()
        self.branch = branch

    def children(self):
        return [("branch", self.branch)]

    def set_input_grad(self, needed):
        self.needs_input_grad = needed
        self.branch.set_input_grad(needed)

    def output_shape(self, input_shape):
        out = tuple(self.branch.output_shape(input_shape))
        if len(input_shape) != 3 or out != (input_shape[0],):
            raise ShapeError(f"gate: the branch maps {tuple(input_shape)} to {out}; it must give one value per "
                             f"channel of feature maps ({input_shape[0] if input_shape else '?'},)",
                             "end the branch in a dense layer with as many units as the input has channels")
        return tuple(input_shape)

    def macs(self, input_shape):
        return self.branch.macs(input_shape) + math.prod(input_shape)

    def receptive_field(self, rf):
        return self.branch.receptive_field(rf)

    def join_inputs(self) -> list[tuple[str, Sequential | None]]:
        return [("input", None), ("branch", self.branch)]

    def join(self, xs: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """x * g, g's (N, C) broadcast over height and width."""
        x, g = xs
        return np.multiply(x, g[:, :, None, None], out=out)

    def join_backward(self, dy: np.ndarray, shapes: list[tuple], inputs: list[np.ndarray] | None) -> list[np.ndarray]:
        """dy * g to the input; sum over height and width of dy * x to the branch's output."""
        x, g = inputs
        return [dy * g[:, :, None, None], np.einsum("nchw,nchw->nc", dy, x).astype(dy.dtype, copy=False)]

    def forward(self, x, training=True, context: Context | None = None):
        self._joined = [x, self.branch(x, training, context)]
        return self.join(self._joined)

    def backward(self, dy):
        d_input, d_branch = self.join_backward(dy, [], self._joined)
        dx = self.branch.backward(d_branch)
        if not self.needs_input_grad:
            return None
        return np.add(d_input, F.in_layout_of(dx, dy))

    def onnx(self, g, x, input_shape, name):
        gate = self.branch.onnx(g, x, input_shape, name + ".branch")
        shape = g.ints(f"{name}.shape", [0, -1, 1, 1])
        return g.node(self.onnx_op, [x, g.node("Reshape", [gate, shape], name + ".per_channel")], name)

    def __repr__(self):
        return f"Gate({self.branch!r})"
