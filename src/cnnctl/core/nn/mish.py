"""Mish (Misra 2019; YOLOv4's activation): x * tanh(softplus(x)), an element-wise activation the plan fuses."""

from __future__ import annotations

from typing import Literal

import numpy as np

from cnnctl.core import functional as F

from .activations import Elementwise
from .base import LayerSpec, register


class MishSpec(LayerSpec):
    type: Literal["mish"]


@register("mish", MishSpec, activation=True)
class Mish(Elementwise):
    """x * tanh(softplus(x)), softplus(x) = log(1 + e^x) computed without overflow; the derivative
    tanh(sp) + x * sigmoid(x) * (1 - tanh(sp)^2) (PyTorch's Mish)."""

    onnx_op = "Mish"

    def onnx(self, g, x, input_shape, name):  # opset 17 has no Mish: x * tanh(softplus(x))
        soft = g.node("Softplus", [x], f"{name}.softplus")
        return g.node("Mul", [x, g.node("Tanh", [soft], f"{name}.tanh")], name)

    def elementwise(self, x, y, d):
        t = np.tanh(F.softplus(x))
        s = np.tanh(x * x.dtype.type(0.5))  # sigmoid(x) = (1 + tanh(x / 2)) / 2
        s += 1
        s *= x.dtype.type(0.5)
        np.multiply(x * s, 1 - t * t, out=d)
        d += t
        np.multiply(x, t, out=y)
