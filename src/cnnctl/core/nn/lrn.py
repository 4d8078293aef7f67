"""Local response normalisation across channels (Krizhevsky et al. 2012, AlexNet; Caffe's LRN with
norm_region ACROSS_CHANNELS; ONNX's LRN; PyTorch's LocalResponseNorm for odd sizes).

    y[c] = x[c] / (k + alpha / size * sum of x[c']^2 over the window of c) ^ beta

The window of channel c is c - lo .. c + hi, cut at the first and last channel, lo = (size - 1) // 2 and
hi = size - 1 - lo (ONNX's definition; PyTorch puts the extra channel of an even size before c instead). With
d[c] = k + alpha / size * S[c], the backward pass is

    dx[c] = dy[c] d[c]^-beta - 2 alpha beta / size * x[c] * sum over the c whose window holds c' of
            dy[c] x[c] d[c]^(-beta - 1)

the second sum running over the transposed window (c' - hi .. c' + lo). Sums over a window are a loop over its
offsets, each a slice of channels."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from cnnctl.errors import ShapeError
from cnnctl.strict import PosInt

from .base import Layer, LayerSpec, register


class LRNSpec(LayerSpec):
    type: Literal["lrn"]
    size: PosInt = Field(5, description="Channels in each window, centred on the channel (ONNX's: an even size "
                         "reaches one channel further after it).")
    alpha: float = Field(1e-4, gt=0.0, description="Scale of the window's mean square.")
    beta: float = Field(0.75, gt=0.0, description="Exponent of the divisor.")
    k: float = Field(1.0, gt=0.0, description="Added to the divisor before the exponent (ONNX's bias).")

    def build(self, input_shape, scope):
        if len(input_shape) != 3:
            raise ShapeError(f"lrn normalises across the channels of (C, H, W) maps; its input has shape "
                             f"{tuple(input_shape)}", "put lrn between convolutions")
        return LRN(self.size, self.alpha, self.beta, self.k)


def window_sum(a: np.ndarray, before: int, after: int) -> np.ndarray:
    """s[:, c] = a[:, c - before] + ... + a[:, c + after], channels outside 0..C-1 left out."""
    s = a.copy()
    channels = a.shape[1]
    for o in range(-before, after + 1):
        if o == 0 or abs(o) >= channels:
            continue
        if o > 0:
            s[:, :channels - o] += a[:, o:]
        else:
            s[:, -o:] += a[:, :channels + o]
    return s


@register("lrn", LRNSpec)
class LRN(Layer):
    """Local response normalisation across channels (see the module's docstring)."""

    onnx_op = "LRN"

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)
        self.before = (self.size - 1) // 2
        self.after = self.size - 1 - self.before

    def forward(self, x, training=True):
        t = x.dtype.type
        d = window_sum(x * x, self.before, self.after)
        d *= t(self.alpha / self.size)
        d += t(self.k)
        scale = d ** t(-self.beta)
        self._x, self._d, self._scale = x, d, scale  # backward in evaluation too (saliency, Grad-CAM)
        return x * scale

    def backward(self, dy):
        x, d, scale = self._x, self._d, self._scale
        t = x.dtype.type
        inner = dy * x * scale / d  # dy x d^(-beta - 1)
        back = window_sum(inner, self.after, self.before)  # over the windows that hold each channel
        back *= x
        back *= t(2 * self.alpha * self.beta / self.size)
        return dy * scale - back

    def macs(self, input_shape):
        return int(np.prod(input_shape)) * (self.size + 3)

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name, size=self.size, alpha=self.alpha, beta=self.beta, bias=self.k)

    def __repr__(self):
        return f"LRN(size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k})"
