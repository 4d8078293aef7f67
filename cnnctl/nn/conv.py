"""Conv2D: y[n,o] = act(sum_c xcorr(x[n,c], weight[o,c]) + bias[o]). Math in docs/backprop.md."""

from __future__ import annotations

import numpy as np

from .. import functional as F
from ..errors import ShapeError
from .activations import ReLU
from .base import Layer, make_activation, register
from .init import initialize


@register("conv2d")
class Conv2D(Layer):
    """2-D cross-correlation, (N, C, H, W) -> (N, O, OH, OW); weight (O, C, KH, KW), bias (O,)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        activation: str | None = None,
        init: str = "he_normal",
        rng: np.random.Generator | None = None,
        dtype=np.float32,
    ):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.dilation = F.pair(kernel_size), F.pair(stride), F.pair(dilation)
        if padding not in ("same", "valid"):
            padding = F.pair(padding)
        self.padding = padding
        rng = rng if rng is not None else np.random.default_rng()
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        self.params["weight"] = initialize(shape, init, rng, dtype)
        if bias:
            self.params["bias"] = np.zeros(self.out_channels, dtype=dtype)
        self.activation = make_activation(activation)
        self._fused_relu = isinstance(self.activation, ReLU)  # applied inside the convolution (one pass less)
        self.needs_input_grad = True
        self._buffers: dict = {}  # scratch arrays reused between steps (padded input, columns)
        self.zero_grad()

    def _pads(self, hw) -> F.Padding4:
        return F.resolve_padding(self.padding, hw, self.kernel_size, self.stride, self.dilation)

    def output_shape(self, input_shape):
        self._expect_rank(input_shape, 3, "put conv2d before any flatten/dense layer")
        c, h, w = input_shape
        if c != self.in_channels:
            raise ShapeError(f"conv2d expects {self.in_channels} input channels, got {c} (input {input_shape})")
        p = self._pads((h, w))
        oh = F.out_size(h, self.kernel_size[0], self.stride[0], p[0] + p[1], self.dilation[0])
        ow = F.out_size(w, self.kernel_size[1], self.stride[1], p[2] + p[3], self.dilation[1])
        if oh < 1 or ow < 1:
            span = tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))
            raise ShapeError(
                f"conv2d kernel {self.kernel_size} (span {span} with dilation {self.dilation}) is larger than its "
                f"padded input {(h + p[0] + p[1], w + p[2] + p[3])} (input shape {tuple(input_shape)})",
                "use a smaller kernel_size, add padding (e.g. padding: same), or remove a pooling layer before it",
            )
        return (self.out_channels, oh, ow)

    def macs(self, input_shape):
        o, oh, ow = self.output_shape(input_shape)
        return o * oh * ow * self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def forward(self, x, training=True, relu: bool | None = None):
        """`relu=False` leaves a ReLU activation out of this call: Sequential applies it after a following max
        pooling instead (max pooling and ReLU commute), where there are fewer numbers to mask."""
        self._x_shape = x.shape
        self._pad4 = self._pads(x.shape[2:])
        fused = self._fused_relu if relu is None else self._fused_relu and relu
        y, self._saved = F.conv2d_forward(
            x, self.params["weight"], self.params.get("bias"), self.stride, self._pad4, self.dilation, self._buffers,
            relu=fused,
        )
        return y if self._fused_relu else self._activate(y, training)

    def backward(self, dy):
        if not self._fused_relu:
            dy = self._deactivate(dy)
        dx, dw, db = F.conv2d_backward(
            dy, self._saved, self.params["weight"], self._x_shape, self.stride, self._pad4, self.dilation,
            need_dx=self.needs_input_grad, cache=self._buffers,
        )
        self.grads["weight"] = dw
        if "bias" in self.params:
            self.grads["bias"] = db
        return dx

    def __repr__(self):
        return (
            f"Conv2D({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={'bias' in self.params})"
        )
