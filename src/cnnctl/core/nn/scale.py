"""A trainable per-channel multiply and add (Caffe's Scale layer with bias_term; the affine part of a batchnorm
without its statistics; ConvNeXt's layer scale, without the add).

    y[:, c] = weight[c] * x[:, c] + bias[c]
    dx = dy * weight,  d weight[c] = sum of dy[:, c] * x[:, c],  d bias[c] = sum of dy[:, c]

the sums over the batch and every position. It is what an imported graph's Mul and Add of per-channel
constants become where they do not follow a batchnorm (which takes them into its own scale and bias). After an
ungrouped convolution the execution plan runs both as one product (`fold`, `unfold`; cnnctl.core.steps.ConvStep)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .base import Layer, LayerSpec, register
from .init import constant


class ScaleSpec(LayerSpec):
    type: Literal["scale"]
    bias: bool = Field(True, description="Add a per-channel bias after the multiply.")
    weight_init: float = Field(1.0, description="Initial value of every channel's factor.")

    def build(self, input_shape, scope):
        return Scale(input_shape[0], bias=self.bias, weight_init=self.weight_init, rng=scope.rng)


@register("scale", ScaleSpec)
class Scale(Layer):
    """Per-channel weight * x + bias over (C, ...) inputs (see the module's docstring)."""

    capability = "convolution_fold"  # after a convolution the plan folds it into the convolution's weight and bias

    def __init__(self, channels: int, bias: bool = True, weight_init: float = 1.0, rng=None, dtype=np.float32):
        super().__init__()
        self.channels = int(channels)
        self.params["weight"] = constant((self.channels,), weight_init, rng, dtype)
        if bias:
            self.params["bias"] = constant((self.channels,), 0.0, rng, dtype)
        self.zero_grad()

    def _per_channel(self, v: np.ndarray, ndim: int) -> np.ndarray:
        return v.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, x, training=True):
        self._x = x
        y = x * self._per_channel(self.params["weight"], x.ndim)
        if "bias" in self.params:
            y += self._per_channel(self.params["bias"], x.ndim)
        return y

    def backward(self, dy):
        axes = (0, *range(2, dy.ndim))
        self.grads["weight"] = (dy * self._x).sum(axis=axes)
        if "bias" in self.params:
            self.grads["bias"] = dy.sum(axis=axes)
        return dy * self._per_channel(self.params["weight"], dy.ndim) if self.needs_input_grad else None

    def fold(self, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The weight and bias of a convolution (w, b) followed by this layer: s w and s b + bias."""
        s, own = self.params["weight"], self.params.get("bias")
        folded = None if b is None else b * s
        if own is not None:
            folded = own.copy() if folded is None else folded + own
        return w * s.reshape(-1, *(w.ndim - 1) * [1]), folded

    def unfold(self, dw, db, w, b) -> tuple[np.ndarray, np.ndarray | None]:
        """From the folded convolution's gradients (dw, db) to this layer's (set) and the convolution's
        (returned): ds = sum(w * dw) + b db (as z = w x + b, sum(dy z) = w . dw + b db), dbias = db, and s dw,
        s db for (w, b)."""
        s = self.params["weight"]
        ds = (w * dw).reshape(len(s), -1).sum(axis=1)
        if b is not None:
            ds += b * db
        self.grads["weight"] = ds.astype(s.dtype, copy=False)
        if "bias" in self.params:
            self.grads["bias"] = db
        return dw * s.reshape(-1, *(w.ndim - 1) * [1]), None if b is None else db * s

    def macs(self, input_shape):
        return int(np.prod(input_shape))

    def onnx(self, g, x, input_shape, name):
        shape = (len(input_shape) - 1) * [1]
        weight = g.const(f"{name}.weight", self.params["weight"].reshape(-1, *shape))
        y = g.node("Mul", [x, weight], f"{name}.mul" if "bias" in self.params else name)
        if "bias" in self.params:
            y = g.node("Add", [y, g.const(f"{name}.bias", self.params["bias"].reshape(-1, *shape))], name)
        return y

    def __repr__(self):
        return f"Scale({self.channels}, bias={'bias' in self.params})"
