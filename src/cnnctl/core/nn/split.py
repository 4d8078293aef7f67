"""The channel split (ShuffleNetV2's halves, Ma et al. 2018): the channels cut into `parts` equal parts, of which
the layer passes on part `take`. Inside a `concat` whose branches each take a part, the branches see disjoint
channels; the backward pass puts the deltas back at their channels, zero elsewhere (the container sums the
branches' input gradients)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from cnnctl.errors import ShapeError
from cnnctl.strict import NonNegInt, PosInt

from .base import Layer, LayerSpec, register


class SplitSpec(LayerSpec):
    type: Literal["split"]
    parts: PosInt = Field(2, description="The equal parts the channels are cut into (ShuffleNetV2: 2).")
    take: NonNegInt = Field(description="Which part the layer passes on: 0 for the first channels, parts - 1 for "
                            "the last.")

    def build(self, input_shape, scope):
        if self.take >= self.parts:
            raise ShapeError(f"split: take {self.take} of {self.parts} parts; parts are numbered 0..{self.parts - 1}",
                             f"set take to 0..{self.parts - 1}")
        if len(input_shape) < 1 or input_shape[0] % self.parts:
            raise ShapeError(f"split into {self.parts} parts takes channels that divide by {self.parts}; its input "
                             f"has shape {tuple(input_shape)}", "make the channels before it a multiple of parts")
        return Split(self.parts, self.take)


@register("split", SplitSpec)
class Split(Layer):
    """Part `take` of the channels cut into `parts` equal parts (see the module's docstring)."""

    onnx_op = "Slice"

    def __init__(self, parts: int, take: int):
        super().__init__()
        self.splits, self.take = int(parts), int(take)  # (a layer holds no attribute named like process shares)

    def _channels(self, c: int) -> slice:
        width = c // self.splits
        return slice(self.take * width, (self.take + 1) * width)

    def output_shape(self, input_shape):
        return (input_shape[0] // self.splits, *input_shape[1:])

    def forward(self, x, training=True):
        self._x_shape = x.shape
        return np.ascontiguousarray(x[:, self._channels(x.shape[1])])  # a copy: what follows may work in place

    def backward(self, dy):
        dx = np.zeros(self._x_shape, dy.dtype)
        dx[:, self._channels(self._x_shape[1])] = dy
        return dx

    def onnx(self, g, x, input_shape, name):
        part = self._channels(input_shape[0])
        return g.node(self.onnx_op, [x, g.ints(f"{name}.starts", [part.start]), g.ints(f"{name}.ends", [part.stop]),
                                g.ints(f"{name}.axes", [1])], name)

    def __repr__(self):
        return f"Split(parts={self.splits}, take={self.take})"
