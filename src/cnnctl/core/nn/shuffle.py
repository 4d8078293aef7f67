"""The channel shuffle (ShuffleNet, Zhang et al. 2017): the channels, seen as a groups x (C / groups) grid, read
column by column, so that each group of a following grouped convolution sees channels of every group before it.
It moves numbers and computes nothing: the backward pass moves the deltas back by the inverse permutation. After
an ungrouped convolution the execution plan reorders the convolution's filters instead (`fold`, `unfold`)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from cnnctl.errors import ShapeError
from cnnctl.strict import PosInt

from .base import Layer, LayerSpec, register


class ChannelShuffleSpec(LayerSpec):
    type: Literal["channel_shuffle"]
    groups: PosInt = Field(description="The groups of the convolution before it; the channels must divide by it.")

    def build(self, input_shape, scope):
        if len(input_shape) != 3 or input_shape[0] % self.groups:
            raise ShapeError(f"channel_shuffle with groups {self.groups} takes (C, H, W) maps whose C divides by "
                             f"{self.groups}; its input has shape {tuple(input_shape)}",
                             "set groups to the grouped convolution's groups")
        return ChannelShuffle(self.groups)


def shuffle(x, groups: int):
    """(N, C, ...) with channel g * (C / groups) + i moved to i * groups + g."""
    n, c, *rest = x.shape
    return x.reshape(n, groups, c // groups, *rest).swapaxes(1, 2).reshape(x.shape)


@register("channel_shuffle", ChannelShuffleSpec)
class ChannelShuffle(Layer):
    """The channel shuffle (see the module's docstring); PyTorch's nn.ChannelShuffle."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = int(groups)

    def forward(self, x, training=True):
        return shuffle(x, self.groups)

    def backward(self, dy):
        return shuffle(dy, dy.shape[1] // self.groups)  # the inverse: the grid read the other way

    capability = "convolution_fold"  # after a convolution: its filters, reordered

    def _order(self, c: int) -> np.ndarray:
        """Output channel j of the shuffle is input channel order[j]."""
        return shuffle(np.arange(c)[None], self.groups)[0]

    def fold(self, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """A convolution (w, b) followed by the shuffle: the same convolution with its filters shuffled."""
        order = self._order(len(w))
        return w[order], None if b is None else b[order]

    def unfold(self, dw, db, w, b) -> tuple[np.ndarray, np.ndarray | None]:
        back = np.argsort(self._order(len(w)))
        return dw[back], None if b is None else db[back]

    def onnx(self, g, x, input_shape, name):
        c, *rest = input_shape
        grid = g.node("Reshape", [x, g.ints(f"{name}.grid", [0, self.groups, c // self.groups, *rest])],
                      f"{name}.grid")
        swapped = g.node("Transpose", [grid], f"{name}.swap", perm=[0, 2, 1, *range(3, 3 + len(rest))])
        return g.node("Reshape", [swapped, g.ints(f"{name}.shape", [0, c, *rest])], name)

    def __repr__(self):
        return f"ChannelShuffle(groups={self.groups})"
