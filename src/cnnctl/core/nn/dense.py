"""Flatten and the fully connected layer."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from cnnctl.errors import ShapeError
from cnnctl.strict import PosInt

from .base import Context, Layer, LayerSpec, make_activation, register
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
    takes_context = True  # its products are cut over their rows as the runner says (cnnctl's threads)

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

    def forward(self, x, training=True, context: Context | None = None):
        """y = x W^T + b, computed as its transpose W x^T + b (out, batch) and returned as a view of it: a
        flattened batch-innermost input (a convolution's or pooling's) is then read as stored, and the input
        gradient comes back in that layout too. The products are cut over their rows as `context` says."""
        self._x, w, bias = x, self.params["weight"], self.params.get("bias")
        self._per_product = (context or Context()).per_product
        xt, yt = x.T, np.empty((w.shape[0], x.shape[0]), np.result_type(x, w))

        def rows(lo, hi):
            np.matmul(w[lo:hi], xt, out=yt[lo:hi])
            if bias is not None:
                yt[lo:hi] += bias[lo:hi, None]

        self._per_product(w.shape[0], rows, yt.size * w.shape[1])
        return self._activate(yt.T, training, in_place=True)

    def backward(self, dy):
        dy = self._deactivate(dy)
        w, x = self.params["weight"], self._x
        dyt, dw = dy.T, np.empty_like(w)  # dw cut by its columns: each slice's product keeps all the output rows
        self._per_product(w.shape[1], lambda lo, hi: np.matmul(dyt, x[:, lo:hi], out=dw[:, lo:hi]), w.size * x.shape[0])
        self.grads["weight"] = dw
        if "bias" in self.params:
            self.grads["bias"] = dyt.sum(axis=1)
        if not self.needs_input_grad:
            return None
        dxt = np.empty((w.shape[1], dy.shape[0]), dw.dtype)  # (in, batch): dx is its transpose
        self._per_product(w.shape[1], lambda lo, hi: np.matmul(w[:, lo:hi].T, dyt, out=dxt[lo:hi]),
                          dxt.size * w.shape[0])
        return dxt.T

    def __repr__(self):
        return f"Dense({self.in_features}, {self.out_features}, bias={'bias' in self.params})"
