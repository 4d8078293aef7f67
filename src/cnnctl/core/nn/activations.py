"""Activations: the element-wise ones (each one function giving f and its derivative, which the execution plan
fuses), Softmax and LogSoftmax."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from cnnctl.core import functional as F
from cnnctl.core.epilogue import in_tiles

from .base import Context, Layer, LayerSpec, channels, register


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


class Elementwise(Layer):
    """An element-wise activation y = f(x), declared to the execution plan by one function, `elementwise(x, y, d)`:
    f(x) into y and its derivative f'(x) into d, value by value. Backward is dy * d. The plan runs that function
    on slices of channels across threads, or fuses it into the pass that made x (a convolution's product, a
    residual add) while x is in cache; a layer's own forward and backward call it whole.

    `elementwise` may be called with y the same array as x (in place): it reads x before writing y. `d` has the
    dtype `derivative_dtype` (None: the input's; bool for a 0/1 derivative: a byte a value). `monotone` (f never
    decreases) lets the plan move f behind a max pooling that follows it: pool(f(z)) = f(pool(z))."""

    capability = "elementwise"
    takes_context = True  # run by a layer that applies it (batchnorm's activation), cut as that layer's runner says
    derivative_dtype: ClassVar[type | None] = None
    monotone: ClassVar[bool] = False

    def elementwise(self, x: np.ndarray, y: np.ndarray, d: np.ndarray) -> None:
        raise NotImplementedError

    def derivative_like(self, x: np.ndarray) -> np.ndarray:
        """An uninitialised derivative array for inputs like x, laid out as x."""
        return np.empty_like(x, dtype=self.derivative_dtype or x.dtype)

    def commutes_with_max(self) -> bool:
        """Whether f is non-decreasing, as declared by the class that defines this f (a subclass that redefines
        `elementwise` says so again, or is not moved behind a pooling)."""
        owner = next(c for c in type(self).__mro__ if "elementwise" in vars(c))
        return "monotone" in vars(owner) and bool(self.monotone)

    def forward(self, x, training=True, context: Context | None = None, out: np.ndarray | None = None):
        """f(x) into a new array, or into `out` (which may be x itself)."""
        y, d = np.empty_like(x) if out is None else out, self.derivative_like(x)
        self._cut = (context or Context()).per_channel
        self._cut(x, lambda lo, hi: in_tiles(self.elementwise, channels(x, lo, hi), channels(y, lo, hi),
                                             channels(d, lo, hi)))
        self._d = d
        return y

    def backward(self, dy):
        return F.chained(dy, self._d, self._cut)


@register("relu", ReLUSpec, activation=True)
class ReLU(Elementwise):
    """max(x, 0); the derivative at 0 is taken as 0, like PyTorch."""

    onnx_op = "Relu"

    derivative_dtype = np.bool_
    monotone = True

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name)

    def elementwise(self, x, y, d):
        np.greater(x, 0, out=d)
        F.maximum_zero(x, y)


@register("leaky_relu", LeakyReLUSpec, activation=True)
class LeakyReLU(Elementwise):
    """x if x > 0 else negative_slope * x."""

    onnx_op = "LeakyRelu"

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    @property
    def monotone(self) -> bool:
        return self.negative_slope >= 0

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name, alpha=self.negative_slope)

    def elementwise(self, x, y, d):
        if 0 <= self.negative_slope <= 1:  # max((x > 0), slope) is 1 or slope: np.where's values, 5x faster
            np.greater(x, 0, out=d)
            F.against_constant(np.maximum, d, self.negative_slope, d)
        else:
            d[...] = np.where(x > 0, x.dtype.type(1), x.dtype.type(self.negative_slope))
        np.multiply(x, d, out=y)

    def __repr__(self):
        return f"LeakyReLU(negative_slope={self.negative_slope})"


@register("elu", ELUSpec, activation=True)
class ELU(Elementwise):
    """x if x > 0 else alpha * (exp(x) - 1)."""

    onnx_op = "Elu"

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    @property
    def monotone(self) -> bool:
        return self.alpha >= 0

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name, alpha=self.alpha)

    def elementwise(self, x, y, d):
        neg = self.alpha * np.expm1(F.against_constant(np.minimum, x, 0.0, np.empty_like(x)))  # where x <= 0
        if 0 <= self.alpha <= 1:  # np.where's values by maxima (5x faster): neg >= x where x <= 0, neg = 0 above
            np.greater(x, 0, out=d)  # 1 where x > 0, then neg + alpha (in [0, 1]) elsewhere
            np.maximum(d, neg + self.alpha, out=d)
            np.maximum(x, neg, out=y)
        else:
            mask = x > 0
            d[...] = np.where(mask, 1, neg + self.alpha)
            y[...] = np.where(mask, x, neg)

    def __repr__(self):
        return f"ELU(alpha={self.alpha})"


@register("sigmoid", SigmoidSpec, activation=True)
class Sigmoid(Elementwise):
    """1 / (1 + exp(-x)), computed without overflow."""

    onnx_op = "Sigmoid"

    monotone = True

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name)

    def elementwise(self, x, y, d):
        s = F.sigmoid(x)
        np.multiply(s, 1 - s, out=d)
        y[...] = s


@register("tanh", TanhSpec, activation=True)
class Tanh(Elementwise):

    onnx_op = "Tanh"
    monotone = True

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name)

    def elementwise(self, x, y, d):
        t = np.tanh(x)
        np.subtract(1, t * t, out=d)
        y[...] = t


@register("softmax", SoftmaxSpec, activation=True)
class Softmax(Layer):
    """Softmax over the feature axis (axis 1). For training, prefer cross_entropy on logits."""

    onnx_op = "Softmax"

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name, axis=1)

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

    onnx_op = "LogSoftmax"

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name, axis=1)

    def forward(self, x, training=True):
        y = F.log_softmax(x, axis=1)
        self._p = np.exp(y)
        return y

    def backward(self, dy):
        return dy - self._p * dy.sum(axis=1, keepdims=True)


@register("gelu", GELUSpec, activation=True)
class GELU(Elementwise):
    """x * Phi(x), Phi the standard normal distribution function (Hendrycks and Gimpel 2016): PyTorch's exact
    GELU, not its tanh approximation."""

    onnx_op = "Gelu"

    def onnx(self, g, x, input_shape, name):  # opset 17 has no Gelu: x * 0.5 * (1 + erf(x / sqrt 2))
        consts = {k: g.const(f"{name}.{k}", np.array(v, np.float32)) for k, v in
                  (("half", 0.5), ("one", 1.0), ("sqrt2", np.sqrt(2.0)))}
        erf = g.node("Erf", [g.node("Div", [x, consts["sqrt2"]], f"{name}.scaled")], f"{name}.erf")
        cdf = g.node("Mul", [g.node("Add", [erf, consts["one"]], f"{name}.shifted"), consts["half"]], f"{name}.cdf")
        return g.node("Mul", [x, cdf], name)

    def elementwise(self, x, y, d):  # d = Phi(x) + x phi(x)
        cdf, pdf = F.normal_cdf_and_density(x)
        pdf *= x
        np.add(cdf, pdf, out=d)
        np.multiply(x, cdf, out=y)


@register("celu", CELUSpec, activation=True)
class CELU(Elementwise):
    """max(0, x) + min(0, alpha * (exp(x / alpha) - 1)) (Barron 2017; PyTorch's CELU): continuously
    differentiable for every alpha."""

    onnx_op = "Celu"

    monotone = True

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name, alpha=self.alpha)

    def elementwise(self, x, y, d):
        mask = x > 0
        e = np.exp(np.minimum(x, 0) / x.dtype.type(self.alpha))  # exp(x/alpha) where x <= 0
        d[...] = np.where(mask, 1, e)
        y[...] = np.where(mask, x, x.dtype.type(self.alpha) * (e - 1))

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
class ReLU6(Elementwise):
    """min(max(x, 0), 6) (MobileNetV2); the derivative is 1 strictly between 0 and 6, else 0, like PyTorch."""

    onnx_op = "Clip"

    derivative_dtype = np.bool_
    monotone = True

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x, g.const(f"{name}.min", np.array(0.0)), g.const(f"{name}.max", np.array(6.0))],
                      name)

    def elementwise(self, x, y, d):
        np.logical_and(x > 0, x < 6, out=d)
        np.clip(x, 0, 6, out=y)


@register("hardsigmoid", HardSigmoidSpec, activation=True)
class HardSigmoid(Elementwise):
    """relu6(x + 3) / 6 (MobileNetV3; PyTorch's Hardsigmoid): 0 below -3, 1 above 3, x / 6 + 1/2 between."""

    onnx_op = "HardSigmoid"

    monotone = True

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name, alpha=1 / 6, beta=0.5)

    def elementwise(self, x, y, d):
        np.multiply((x > -3) & (x < 3), x.dtype.type(1 / 6), out=d)
        np.clip(x * x.dtype.type(1 / 6) + x.dtype.type(0.5), 0, 1, out=y)


@register("hardswish", HardSwishSpec, activation=True)
class HardSwish(Elementwise):
    """x * relu6(x + 3) / 6 (Howard et al. 2019, MobileNetV3): 0 below -3, x above 3; its derivative is
    (2x + 3) / 6 on [-3, 3], as PyTorch takes it."""

    onnx_op = "HardSwish"

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name)

    def elementwise(self, x, y, d):
        d[...] = np.where(x < -3, 0, np.where(x <= 3, x * x.dtype.type(1 / 3) + x.dtype.type(0.5), 1))
        y[...] = x * np.clip(x + x.dtype.type(3), 0, 6) * x.dtype.type(1 / 6)


@register("silu", SiLUSpec, activation=True)
class SiLU(Elementwise):
    """x * sigmoid(x) (Elfwing et al. 2017; swish, EfficientNet's activation); derivative s (1 + x (1 - s))."""

    def onnx(self, g, x, input_shape, name):
        return g.node("Mul", [x, g.node(Sigmoid.onnx_op, [x], f"{name}.sigmoid")], name)

    def elementwise(self, x, y, d):
        s = F.sigmoid(x)
        t = np.subtract(1, s)  # 1 + x (1 - s), with one temporary
        t *= x
        t += 1
        np.multiply(s, t, out=d)
        np.multiply(x, s, out=y)
