"""Pooling: max (deltas routed to the maximum), average (deltas spread over the window), global average."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from cnnctl.core import functional as F
from cnnctl.errors import ShapeError
from cnnctl.strict import NonNegInt, PosPair

from .base import Context, Layer, LayerSpec, register
from .dense import Flatten


class _PoolSpec(LayerSpec):
    kernel_size: PosPair = Field(description="Window size, an int or [height, width].")
    stride: PosPair | None = Field(None, description="Defaults to kernel_size.")
    padding: NonNegInt | tuple[NonNegInt, NonNegInt] = 0
    ceil_mode: bool = Field(False, description="Round the output size up: a last, partial window where one more "
                            "would start inside the input (PyTorch's ceil_mode; SqueezeNet, GoogLeNet).")


class MaxPool2DSpec(_PoolSpec):
    type: Literal["maxpool2d"]

    def build(self, input_shape, scope):
        return MaxPool2D(self.kernel_size, self.stride, self.padding, self.ceil_mode)


class AvgPool2DSpec(_PoolSpec):
    type: Literal["avgpool2d"]
    count_include_pad: bool = Field(True, description="Count the padded zeros in each window's mean (PyTorch's "
                                    "default); false: divide by the input positions the window covers.")

    def build(self, input_shape, scope):
        return AvgPool2D(self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)


class GlobalAvgPool2DSpec(LayerSpec):
    type: Literal["global_avgpool2d"]


class _Pool2D(Layer):
    """Shared window bookkeeping; subclasses reduce the (KH*KW, N, C, OH, OW) stack of windows."""

    pad_value = 0.0

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False):
        super().__init__()
        self.kernel_size = F.pair(kernel_size)
        self.stride = F.pair(stride) if stride is not None else self.kernel_size
        self.padding = F.pair(padding)
        self.ceil_mode = bool(ceil_mode)

    def _sizes(self, h: int, w: int) -> tuple[int, int]:
        """The output height and width: floor, or with ceil_mode rounded up unless the last window would start
        past the input and its leading padding (PyTorch's rule)."""
        out = []
        for size, k, s, p in zip((h, w), self.kernel_size, self.stride, self.padding):
            n = F.out_size(size, k, s, 2 * p)
            if self.ceil_mode and (size + 2 * p - k) % s and (size + 2 * p - k) >= 0:
                n += 1
                if (n - 1) * s >= size + p:
                    n -= 1
            out.append(n)
        return out[0], out[1]

    def output_shape(self, input_shape):
        self._expect_rank(input_shape, 3, f"put {self.tag} before any flatten/dense layer")
        c, h, w = input_shape
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            raise ShapeError(
                f"{self.tag} padding {self.padding} must be at most half the kernel size {self.kernel_size}",
                "reduce padding",
            )
        oh, ow = self._sizes(h, w)
        if oh < 1 or ow < 1:
            raise ShapeError(
                f"{self.tag} kernel {self.kernel_size} is larger than its input {(h, w)} (input shape {input_shape})",
                "use a smaller kernel_size, or remove an earlier pooling layer",
            )
        return (c, oh, ow)

    def receptive_field(self, rf):
        if rf is None:
            return None
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return rf[0] + (kh - 1) * rf[2], rf[1] + (kw - 1) * rf[3], rf[2] * sh, rf[3] * sw

    def onnx(self, g, x, input_shape, name):
        ph, pw = self.padding
        extra = {} if isinstance(self, MaxPool2D) else {"count_include_pad": int(self.count_include_pad)}
        return g.node(self.onnx_op, [x], name,
                      kernel_shape=list(self.kernel_size), strides=list(self.stride), pads=[ph, pw, ph, pw],
                      ceil_mode=int(self.ceil_mode), **extra)

    def _padded(self, x):
        """x padded on every side, and with ceil_mode on the bottom and right as far as the last window reaches."""
        (ph, pw), (h, w) = self.padding, x.shape[2:]
        self._out_hw = oh, ow = self.output_shape(x.shape[1:])[1:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        self._pad4 = (ph, max(ph, (oh - 1) * sh + kh - h - ph), pw, max(pw, (ow - 1) * sw + kw - w - pw))
        return F.pad(x, self._pad4, self.pad_value)

    def _slices(self, xp):
        return F.pool_slices(xp, self.kernel_size, self.stride, self._out_hw)

    def __repr__(self):
        ceil = ", ceil_mode=True" if self.ceil_mode else ""
        if not getattr(self, "count_include_pad", True):
            ceil += ", count_include_pad=False"
        return (f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
                f"{ceil})")


@register("maxpool2d", MaxPool2DSpec)
class MaxPool2D(_Pool2D):
    """Max over each window, a running maximum over the kernel offsets. Forward also records which offset
    won (the first in row-major order on ties, like PyTorch), so backward routes each delta there with one
    comparison per offset instead of re-deriving the winner from the input."""

    onnx_op = "MaxPool"

    capability = "window_max"  # a maximum over windows: pool(f(x)) = f(pool(x)) for a non-decreasing f

    pad_value = -np.inf
    takes_context = True  # its channels' work is cut as the runner says

    def forward(self, x, training=True, context: Context | None = None):
        self._cut = (context or Context()).per_channel
        xp = self._padded(x)
        self._padded_shape = xp.shape
        out = np.copy(next(self._slices(xp)), order="K")  # temporaries below copy out's memory layout ("like")
        count = self.kernel_size[0] * self.kernel_size[1]
        self._winner = winner = np.zeros_like(out, np.uint8 if count < 256 else np.uint16)

        def part(lo, hi):  # a slice of channels
            o, w = out[:, lo:hi], winner[:, lo:hi]
            greater, candidate = np.empty_like(o, bool), np.empty_like(w)
            for k, s in enumerate(self._slices(xp[:, lo:hi])):
                if k == 0:
                    continue  # out starts as the first offset's values
                # offsets come in increasing order, so "k where strictly greater" can only raise the winner
                np.greater(s, o, out=greater)
                np.multiply(greater, w.dtype.type(k), out=candidate)
                np.maximum(w, candidate, out=w)
                np.maximum(o, s, out=o)

        self._cut(out, part)
        return out

    def backward(self, dy):
        winner = self._winner
        dy = F.in_layout_of(dy, winner)
        overlap = any(s < k for s, k in zip(self.stride, self.kernel_size))
        hp, wp = self._padded_shape[2:]
        (oh, ow), (sh, sw) = self._out_hw, self.stride
        covered = not overlap and oh * sh == hp and ow * sw == wp  # every input position is in one window
        dxp = (np.empty_like if covered else np.zeros_like)(winner, dy.dtype, shape=self._padded_shape)

        def part(lo, hi):  # a slice of channels
            w, d = winner[:, lo:hi], dy[:, lo:hi]
            hit = np.empty_like(w, bool)
            for k, window in enumerate(self._slices(dxp[:, lo:hi])):
                np.equal(w, k, out=hit)
                if overlap:
                    window += d * hit
                else:
                    np.multiply(d, hit, out=window)

        self._cut(winner, part)
        return F.unpad(dxp, self._pad4)


@register("avgpool2d", AvgPool2DSpec)
class AvgPool2D(_Pool2D):
    """Mean over each window, padded zeros counted (PyTorch's count_include_pad=True), or over the input
    positions it covers (false). A ceil_mode window's part past the padded input is never counted, as in
    PyTorch."""

    onnx_op = "AveragePool"

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = bool(count_include_pad)

    def _divisor(self, h: int, w: int, dtype):
        """1 / (the positions each window counts), per output position; a number when every window counts k*k."""
        counts = []
        for size, k, s, p, n in zip((h, w), self.kernel_size, self.stride, self.padding, self._out_hw):
            start = np.arange(n) * s - p
            lo, hi = (-p, size + p) if self.count_include_pad else (0, size)
            counts.append(np.minimum(start + k, hi) - np.maximum(start, lo))
        if (counts[0] == self.kernel_size[0]).all() and (counts[1] == self.kernel_size[1]).all():
            return dtype.type(1.0 / (self.kernel_size[0] * self.kernel_size[1]))
        return (1.0 / np.outer(counts[0], counts[1])).astype(dtype)

    def forward(self, x, training=True):
        xp = self._padded(x)
        self._padded_shape = xp.shape
        slices = self._slices(xp)
        out = np.copy(next(slices), order="K")
        for s in slices:
            out += s
        self._scale = self._divisor(*x.shape[2:], x.dtype)
        out *= self._scale
        return out

    def backward(self, dy):
        share = dy * self._scale
        dxp = np.zeros(self._padded_shape, dy.dtype)
        for window in self._slices(dxp):
            window += share
        return F.unpad(dxp, self._pad4)


@register("global_avgpool2d", GlobalAvgPool2DSpec)
class GlobalAvgPool2D(Layer):
    """Mean over all positions of each map: (N, C, H, W) -> (N, C)."""

    onnx_op = "GlobalAveragePool"

    def output_shape(self, input_shape):
        self._expect_rank(input_shape, 3, "global_avgpool2d needs feature maps; put it before flatten/dense")
        return (input_shape[0],)

    def receptive_field(self, rf):
        return None

    def onnx(self, g, x, input_shape, name):
        return g.node(Flatten.onnx_op, [g.node(self.onnx_op, [x], name + ".gap")], name, axis=1)

    def forward(self, x, training=True):
        self._hw = x.shape[2:]
        self._batch_innermost = x.ndim == 4 and x.shape[0] > 1 and x.strides[0] == x.itemsize
        return x.mean(axis=(2, 3))

    def backward(self, dy):
        """dy / (H W) at every position, laid out as the input was: a convolution's output (batch-innermost) gets
        its gradient in its own layout, so no later step or residual fork copies it into another."""
        (h, w), (n, c) = self._hw, dy.shape
        dx = (np.empty((c, h, w, n), dy.dtype).transpose(3, 0, 1, 2) if self._batch_innermost
              else np.empty((n, c, h, w), dy.dtype))
        dx[...] = (dy / (h * w))[:, :, None, None]
        return dx
