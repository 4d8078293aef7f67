"""Flatten and the fully connected layer."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from cnnctl.errors import ShapeError
from cnnctl.strict import PosInt

from .base import Layer, LayerSpec, make_activation, register
from .init import SHAPES_ONLY, Init, constant, dirac, initialize

if TYPE_CHECKING:  # derived from the activation registry in nn/__init__ once every layer type is registered
    from . import Activation


class FlattenSpec(LayerSpec):
    type: Literal["flatten"]


class DenseSpec(LayerSpec):
    type: Literal["dense"]
    units: PosInt = Field(description="Number of output features.")
    bias: bool = True
    activation: Activation | None = None
    init: Init = "he_normal"

    def build(self, input_shape, scope):
        return Dense(input_shape[0], self.units, self.bias, self.activation, self.init, scope.rng)


@register("flatten", FlattenSpec)
class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), in C, H, W order like PyTorch's."""

    onnx_op = "Flatten"

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def receptive_field(self, rf):
        return None

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name, axis=1)

    def forward(self, x, training=True):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self._shape)


@register("dense", DenseSpec)
class Dense(Layer):
    """y = act(x @ weight.T + bias); (N, in) -> (N, out); weight (out, in), bias (out,)."""

    onnx_op = "Gemm"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | None = None,
        init: str = "he_normal",
        rng: np.random.Generator | None = None,
        dtype=np.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        rng = rng if rng is not None else np.random.default_rng()
        self.params["weight"] = initialize((self.out_features, self.in_features), init, rng, dtype)
        if init == "dirac" and rng is not SHAPES_ONLY:
            dirac(self.params["weight"])
        if bias:
            self.params["bias"] = constant((self.out_features,), 0.0, rng, dtype)
        self.activation = make_activation(activation)
        self.zero_grad()

    def output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ShapeError(
                f"dense expects a flat input (features,), got shape {tuple(input_shape)}",
                "add {type: flatten} (or global_avgpool2d) before this dense layer",
            )
        if input_shape[0] != self.in_features:
            raise ShapeError(f"dense expects {self.in_features} input features, got {input_shape[0]}")
        return (self.out_features,)

    def macs(self, input_shape):
        return self.in_features * self.out_features

    def receptive_field(self, rf):
        return None

    def onnx(self, g, x, input_shape, name):
        inputs = [x, *g.arrays(name, self, ("weight", "bias"))]
        return self._onnx_activation(g, g.node(self.onnx_op, inputs, name, transB=1), name)

    def forward(self, x, training=True):
        self._x = x
        y = x @ self.params["weight"].T
        if "bias" in self.params:
            y += self.params["bias"]
        return self._activate(y, training, in_place=True)

    def backward(self, dy):
        dy = self._deactivate(dy)
        self.grads["weight"] = dy.T @ self._x
        if "bias" in self.params:
            self.grads["bias"] = dy.sum(axis=0)
        return dy @ self.params["weight"] if self.needs_input_grad else None

    def __repr__(self):
        return f"Dense({self.in_features}, {self.out_features}, bias={'bias' in self.params})"
