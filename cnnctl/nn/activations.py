"""Element-wise activations and Softmax. Each caches what its derivative needs."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .. import functional as F
from .. import parallel
from .base import Layer, LayerSpec, register


class ReLUSpec(LayerSpec):
    type: Literal["relu"]


class LeakyReLUSpec(LayerSpec):
    type: Literal["leaky_relu"]
    negative_slope: float = 0.01

    def build(self, input_shape, scope):
        return LeakyReLU(self.negative_slope)


class ELUSpec(LayerSpec):
    type: Literal["elu"]
    alpha: float = 1.0

    def build(self, input_shape, scope):
        return ELU(self.alpha)


class SigmoidSpec(LayerSpec):
    type: Literal["sigmoid"]


class TanhSpec(LayerSpec):
    type: Literal["tanh"]


class SoftmaxSpec(LayerSpec):
    type: Literal["softmax"]


class GELUSpec(LayerSpec):
    type: Literal["gelu"]


class CELUSpec(LayerSpec):
    type: Literal["celu"]
    alpha: float = Field(1.0, gt=0.0)

    def build(self, input_shape, scope):
        return CELU(self.alpha)


class LogSoftmaxSpec(LayerSpec):
    type: Literal["log_softmax"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


@register("relu", ReLUSpec, activation=True)
class ReLU(Layer):
    """max(x, 0); the derivative at 0 is taken as 0, like PyTorch."""

    def onnx(self, g, x, input_shape, name):
        return g.node("Relu", [x], name)

    def forward(self, x, training=True):
        self._mask, y = np.empty_like(x, dtype=bool), np.empty_like(x)

        def part(lo, hi):
            xs = parallel.channels(x, lo, hi)
            np.greater(xs, 0, out=parallel.channels(self._mask, lo, hi))
            np.maximum(xs, 0, out=parallel.channels(y, lo, hi))

        parallel.per_channel(x, part)
        return y

    def backward(self, dy):
        dx = np.empty_like(dy)
        parallel.per_channel(dy, lambda lo, hi: np.multiply(parallel.channels(dy, lo, hi), parallel.channels(
            self._mask, lo, hi), out=parallel.channels(dx, lo, hi)))
        return dx


@register("leaky_relu", LeakyReLUSpec, activation=True)
class LeakyReLU(Layer):
    """x if x > 0 else negative_slope * x."""

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def onnx(self, g, x, input_shape, name):
        return g.node("LeakyRelu", [x], name, alpha=self.negative_slope)

    def forward(self, x, training=True):
        self._mask = x > 0
        return np.where(self._mask, x, x * self.negative_slope).astype(x.dtype, copy=False)

    def backward(self, dy):
        return np.where(self._mask, dy, dy * self.negative_slope).astype(dy.dtype, copy=False)

    def __repr__(self):
        return f"LeakyReLU(negative_slope={self.negative_slope})"


@register("elu", ELUSpec, activation=True)
class ELU(Layer):
    """x if x > 0 else alpha * (exp(x) - 1)."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def onnx(self, g, x, input_shape, name):
        return g.node("Elu", [x], name, alpha=self.alpha)

    def forward(self, x, training=True):
        self._mask = x > 0
        self._neg = self.alpha * np.expm1(np.minimum(x, 0))  # alpha*(e^x - 1) where x <= 0
        return np.where(self._mask, x, self._neg).astype(x.dtype, copy=False)

    def backward(self, dy):
        return np.where(self._mask, dy, dy * (self._neg + self.alpha)).astype(dy.dtype, copy=False)

    def __repr__(self):
        return f"ELU(alpha={self.alpha})"


@register("sigmoid", SigmoidSpec, activation=True)
class Sigmoid(Layer):
    """1 / (1 + exp(-x)), computed without overflow."""

    def onnx(self, g, x, input_shape, name):
        return g.node("Sigmoid", [x], name)

    def forward(self, x, training=True):
        self._y = _sigmoid(x)
        return self._y

    def backward(self, dy):
        return dy * self._y * (1 - self._y)


@register("tanh", TanhSpec, activation=True)
class Tanh(Layer):
    def onnx(self, g, x, input_shape, name):
        return g.node("Tanh", [x], name)

    def forward(self, x, training=True):
        self._y = np.tanh(x)
        return self._y

    def backward(self, dy):
        return dy * (1 - self._y * self._y)


@register("softmax", SoftmaxSpec, activation=True)
class Softmax(Layer):
    """Softmax over the feature axis (axis 1). For training, prefer cross_entropy on logits."""

    def onnx(self, g, x, input_shape, name):
        return g.node("Softmax", [x], name, axis=1)

    def forward(self, x, training=True):
        self._y = F.softmax(x, axis=1)
        return self._y

    def backward(self, dy):
        y = self._y
        return y * (dy - (dy * y).sum(axis=1, keepdims=True))


@register("log_softmax", LogSoftmaxSpec, activation=True)
class LogSoftmax(Layer):
    """log(softmax(x)) over the feature axis (axis 1), computed stably: the output the nll loss takes (PyTorch's
    log_softmax + nll_loss, which together are cross_entropy)."""

    def onnx(self, g, x, input_shape, name):
        return g.node("LogSoftmax", [x], name, axis=1)

    def forward(self, x, training=True):
        y = F.log_softmax(x, axis=1)
        self._p = np.exp(y)
        return y

    def backward(self, dy):
        return dy - self._p * dy.sum(axis=1, keepdims=True)


@register("gelu", GELUSpec, activation=True)
class GELU(Layer):
    """x * Phi(x), Phi the standard normal distribution function (Hendrycks and Gimpel 2016): PyTorch's exact
    GELU, not its tanh approximation."""

    def onnx(self, g, x, input_shape, name):  # opset 17 has no Gelu: x * 0.5 * (1 + erf(x / sqrt 2))
        consts = {k: g.const(f"{name}.{k}", np.array(v, np.float32)) for k, v in
                  (("half", 0.5), ("one", 1.0), ("sqrt2", np.sqrt(2.0)))}
        erf = g.node("Erf", [g.node("Div", [x, consts["sqrt2"]], f"{name}.scaled")], f"{name}.erf")
        cdf = g.node("Mul", [g.node("Add", [erf, consts["one"]], f"{name}.shifted"), consts["half"]], f"{name}.cdf")
        return g.node("Mul", [x, cdf], name)

    def forward(self, x, training=True):
        self._x = x
        self._cdf = (0.5 * (1.0 + F.erf(x / np.sqrt(2.0)))).astype(x.dtype)
        return x * self._cdf

    def backward(self, dy):
        x = self._x
        pdf = np.exp(-0.5 * x * x) * x.dtype.type(1 / np.sqrt(2 * np.pi))
        return dy * (self._cdf + x * pdf)


@register("celu", CELUSpec, activation=True)
class CELU(Layer):
    """max(0, x) + min(0, alpha * (exp(x / alpha) - 1)) (Barron 2017; PyTorch's CELU): continuously
    differentiable for every alpha."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def onnx(self, g, x, input_shape, name):
        return g.node("Celu", [x], name, alpha=self.alpha)

    def forward(self, x, training=True):
        self._mask = x > 0
        self._exp = np.exp(np.minimum(x, 0) / x.dtype.type(self.alpha))  # exp(x/alpha) where x <= 0
        return np.where(self._mask, x, x.dtype.type(self.alpha) * (self._exp - 1)).astype(x.dtype, copy=False)

    def backward(self, dy):
        return np.where(self._mask, dy, dy * self._exp).astype(dy.dtype, copy=False)

    def __repr__(self):
        return f"CELU(alpha={self.alpha})"


class ReLU6Spec(LayerSpec):
    type: Literal["relu6"]


class HardSigmoidSpec(LayerSpec):
    type: Literal["hardsigmoid"]


class HardSwishSpec(LayerSpec):
    type: Literal["hardswish"]


class SiLUSpec(LayerSpec):
    type: Literal["silu"]


@register("relu6", ReLU6Spec, activation=True)
class ReLU6(Layer):
    """min(max(x, 0), 6) (MobileNetV2); the derivative is 1 strictly between 0 and 6, else 0, like PyTorch."""

    def onnx(self, g, x, input_shape, name):
        return g.node("Clip", [x, g.const(f"{name}.min", np.array(0.0)), g.const(f"{name}.max", np.array(6.0))], name)

    def forward(self, x, training=True):
        self._inside = (x > 0) & (x < 6)
        return np.clip(x, 0, 6).astype(x.dtype, copy=False)

    def backward(self, dy):
        return dy * self._inside


@register("hardsigmoid", HardSigmoidSpec, activation=True)
class HardSigmoid(Layer):
    """relu6(x + 3) / 6 (MobileNetV3; PyTorch's Hardsigmoid): 0 below -3, 1 above 3, x / 6 + 1/2 between."""

    def onnx(self, g, x, input_shape, name):
        return g.node("HardSigmoid", [x], name, alpha=1 / 6, beta=0.5)

    def forward(self, x, training=True):
        self._inside = (x > -3) & (x < 3)
        return np.clip(x * x.dtype.type(1 / 6) + x.dtype.type(0.5), 0, 1).astype(x.dtype, copy=False)

    def backward(self, dy):
        return dy * (self._inside * dy.dtype.type(1 / 6))


@register("hardswish", HardSwishSpec, activation=True)
class HardSwish(Layer):
    """x * relu6(x + 3) / 6 (Howard et al. 2019, MobileNetV3): 0 below -3, x above 3; its derivative is
    (2x + 3) / 6 on [-3, 3], as PyTorch takes it."""

    def onnx(self, g, x, input_shape, name):
        return g.node("HardSwish", [x], name)

    def forward(self, x, training=True):
        self._x = x
        return (x * np.clip(x + x.dtype.type(3), 0, 6) * x.dtype.type(1 / 6)).astype(x.dtype, copy=False)

    def backward(self, dy):
        x = self._x
        d = np.where(x < -3, 0, np.where(x <= 3, x * x.dtype.type(1 / 3) + x.dtype.type(0.5), 1))
        return (dy * d).astype(dy.dtype, copy=False)


@register("silu", SiLUSpec, activation=True)
class SiLU(Layer):
    """x * sigmoid(x) (Elfwing et al. 2017; swish, EfficientNet's activation); derivative s (1 + x (1 - s))."""

    def onnx(self, g, x, input_shape, name):
        return g.node("Mul", [x, g.node("Sigmoid", [x], f"{name}.sigmoid")], name)

    def forward(self, x, training=True):
        self._x = x
        self._s = _sigmoid(x)
        return x * self._s

    def backward(self, dy):
        s = self._s
        return dy * (s * (1 + self._x * (1 - s)))
