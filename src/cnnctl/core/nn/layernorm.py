"""Layer normalisation over the channels at each position (ConvNeXt's LayerNorm, PyTorch's LayerNorm(C) applied to
channels-last maps; ONNX's LayerNormalization between two Transposes).

    x^[:, c] = (x[:, c] - mean) / sqrt(var + eps),  y[:, c] = weight[c] x^[:, c] + bias[c]

mean and var (biased) over the C channels of each image and position (of each image, for flat (C,) features, as
ConvNeXt's classifier head normalises its pooled features). With g = dy * weight, the input gradient is
dx = (g - mean(g) - x^ mean(g x^)) / sqrt(var + eps), the means over the channels again; the weight and bias
gradients are the sums of dy x^ and dy over the batch and the positions."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from cnnctl.errors import ShapeError

from .base import Layer, LayerSpec, register
from .init import constant


class LayerNorm2DSpec(LayerSpec):
    type: Literal["layernorm2d"]
    eps: float = Field(1e-6, gt=0.0, description="Added to the variance (ConvNeXt's 1e-6; PyTorch's default 1e-5).")

    def build(self, input_shape, scope):
        if len(input_shape) not in (1, 3):
            raise ShapeError(f"layernorm2d normalises the channels of (C, H, W) maps or (C,) features; its input has "
                             f"shape {tuple(input_shape)}", "use it between convolutions, or on pooled features")
        return LayerNorm2D(input_shape[0], self.eps, rng=scope.rng)


@register("layernorm2d", LayerNorm2DSpec)
class LayerNorm2D(Layer):
    """Layer normalisation over the channels at each position (see the module's docstring)."""

    onnx_op = "LayerNormalization"

    def __init__(self, channels: int, eps: float = 1e-6, rng=None, dtype=np.float32):
        super().__init__()
        self.channels, self.eps = int(channels), float(eps)
        self.params = {"weight": constant((self.channels,), 1.0, rng, dtype),
                       "bias": constant((self.channels,), 0.0, rng, dtype)}
        self.zero_grad()

    def forward(self, x, training=True):
        t = x.dtype.type
        mean = x.mean(axis=1, keepdims=True)
        centred = x - mean
        rstd = 1 / np.sqrt((centred * centred).mean(axis=1, keepdims=True) + t(self.eps))
        xhat = centred * rstd
        self._xhat, self._rstd = xhat, rstd
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return xhat * self.params["weight"].reshape(shape) + self.params["bias"].reshape(shape)

    def backward(self, dy):
        xhat, rstd = self._xhat, self._rstd
        others = (0, *range(2, dy.ndim))  # the batch and the positions
        self.grads["weight"] = (dy * xhat).sum(axis=others)
        self.grads["bias"] = dy.sum(axis=others)
        if not self.needs_input_grad:
            return None
        g = dy * self.params["weight"].reshape((1, -1) + (1,) * (dy.ndim - 2))
        return (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True)) * rstd

    def macs(self, input_shape):
        return 4 * int(np.prod(input_shape))

    def onnx(self, g, x, input_shape, name):  # channels last, LayerNormalization over the last axis, and back
        if len(input_shape) == 1:  # (N, C): the channels are the last axis already
            return g.node(self.onnx_op, [x, *g.arrays(name, self, ("weight", "bias"))], name, axis=-1,
                          epsilon=self.eps)
        last = g.node("Transpose", [x], f"{name}.to_nhwc", perm=[0, 2, 3, 1])
        norm = g.node(self.onnx_op, [last, *g.arrays(name, self, ("weight", "bias"))], f"{name}.norm",
                      axis=-1, epsilon=self.eps)
        return g.node("Transpose", [norm], name, perm=[0, 3, 1, 2])

    def __repr__(self):
        return f"LayerNorm2D({self.channels}, eps={self.eps})"
