"""Conv2D: y[n,o] = act(sum_c xcorr(x[n,c], weight[o,c]) + bias[o]), optionally grouped. Math in docs/backprop.md."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from cnnctl.core import functional as F
from cnnctl.core import grouped
from cnnctl.errors import ShapeError
from cnnctl.strict import NonNegInt, PosInt, PosPair

from .base import Context, Layer, LayerSpec, make_activation, register
from .init import SHAPES_ONLY, Init, constant, dirac, initialize

if TYPE_CHECKING:  # derived from the activation registry in nn/__init__ once every layer type is registered
    from . import Activation


class Conv2DSpec(LayerSpec):
    type: Literal["conv2d"]
    filters: PosInt | None = Field(None, description="Number of output channels (default with groups: depthwise: "
                                   "the input channels).")
    kernel_size: PosPair = Field(description="Kernel size, an int or [height, width].")
    stride: PosPair = 1
    padding: NonNegInt | tuple[NonNegInt, NonNegInt] | tuple[NonNegInt, NonNegInt, NonNegInt, NonNegInt] | Literal[
        "same", "valid"] = Field(0, description="Zeros around the input: one number, [rows, columns], [top, bottom, "
                                 "left, right], same (the output keeps ceil(size / stride)) or valid (none).")
    dilation: PosPair = 1
    groups: PosInt | Literal["depthwise"] = Field(1, description="Channel groups: each output channel sees the "
                                                  "input channels of its group; `depthwise` = one group per input "
                                                  "channel. Input channels and filters must both divide by it.")
    bias: bool = True
    activation: Activation | None = None
    init: Init = "he_normal"

    def build(self, input_shape, scope):
        c = input_shape[0] if input_shape else 0
        groups = c if self.groups == "depthwise" else self.groups
        filters = self.filters if self.filters is not None else (c if self.groups == "depthwise" else None)
        if filters is None:
            raise ShapeError("conv2d needs 'filters' (the number of output channels)", "add filters: N")
        if len(input_shape) == 3 and (c % groups or filters % groups):
            raise ShapeError(f"conv2d groups: {groups} must divide both the input channels ({c}) and filters "
                             f"({filters})", f"use groups that divide both, e.g. groups: {np.gcd(c, filters)}")
        if self.init == "patch_whitening" and (scope.path != "layers.0" or groups != 1 or self.dilation != 1):
            raise ShapeError("init: patch_whitening is for the model's first layer (it sees the images), ungrouped "
                             "and undilated", "use it on model.layers[0] only, with groups: 1 and dilation: 1")
        return Conv2D(c, filters, self.kernel_size, self.stride, self.padding, self.dilation, self.bias,
                      self.activation, self.init, scope.rng, groups=groups)


@register("conv2d", Conv2DSpec)
class Conv2D(Layer):
    """2-D cross-correlation, (N, C, H, W) -> (N, O, OH, OW); weight (O, C/groups, KH, KW), bias (O,). The
    execution plan runs an ungrouped one by one of the registered convolution algorithms (cnnctl.convolution),
    its bias and element-wise activation fused on the output."""

    onnx_op = "Conv"

    capability = "convolution"
    takes_context = True  # for its activation, when the plan runs it as it is (a grouped convolution)

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
        groups: int = 1,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.dilation = F.pair(kernel_size), F.pair(stride), F.pair(dilation)
        if padding not in ("same", "valid") and not (isinstance(padding, (tuple, list)) and len(padding) == 4):
            padding = F.pair(padding)
        elif isinstance(padding, list):
            padding = tuple(padding)
        self.padding = padding
        rng = rng if rng is not None else np.random.default_rng()
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self.params["weight"] = initialize(shape, init, rng, dtype)
        self.init = init  # patch_whitening is completed by the trainer, from the data
        if init == "dirac" and rng is not SHAPES_ONLY:
            dirac(self.params["weight"], self.groups)
        if bias:
            self.params["bias"] = constant((self.out_channels,), 0.0, rng, dtype)
        self.activation = make_activation(activation)
        self.zero_grad()

    def pads(self, hw) -> F.Padding4:
        """(top, bottom, left, right) padding for an input of this height and width."""
        return F.resolve_padding(self.padding, hw, self.kernel_size, self.stride, self.dilation)

    def output_shape(self, input_shape):
        self._expect_rank(input_shape, 3, "put conv2d before any flatten/dense layer")
        c, h, w = input_shape
        if c != self.in_channels:
            raise ShapeError(f"conv2d expects {self.in_channels} input channels, got {c} (input {input_shape})")
        p = self.pads((h, w))
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
        return o * oh * ow * (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]

    def receptive_field(self, rf):
        if rf is None:
            return None
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return rf[0] + dh * (kh - 1) * rf[2], rf[1] + dw * (kw - 1) * rf[3], rf[2] * sh, rf[3] * sw

    def forward(self, x, training=True, context: Context | None = None):
        self._x_shape = x.shape
        self._pad4 = self.pads(x.shape[2:])
        w, b = self.params["weight"], self.params.get("bias")
        if self.groups > 1:
            y, self._saved = grouped.grouped_conv2d_forward(x, w, b, self.stride, self._pad4, self.dilation,
                                                            self.groups)
            return self._activate(y, training, context, in_place=True)
        y, self._saved = F.conv2d_forward(x, w, b, self.stride, self._pad4, self.dilation)
        return self._activate(y, training, context, in_place=True)

    def backward(self, dy):
        dy = self._deactivate(dy)
        args = (self.params["weight"], self._x_shape, self.stride, self._pad4, self.dilation)
        if self.groups > 1:
            dx, dw, db = grouped.grouped_conv2d_backward(dy, self._saved, *args, self.groups, self.needs_input_grad)
        else:
            dx, dw, db = F.conv2d_backward(dy, self._saved, *args, need_dx=self.needs_input_grad)
        self.grads["weight"] = dw
        if "bias" in self.params:
            self.grads["bias"] = db
        return dx

    def onnx(self, g, x, input_shape, name):
        t, b, l, r = self.pads(input_shape[1:])
        inputs = [x, *g.arrays(name, self, ("weight", "bias"))]
        out = g.node(self.onnx_op, inputs, name, kernel_shape=list(self.kernel_size), strides=list(self.stride),
                     dilations=list(self.dilation), pads=[t, l, b, r], group=self.groups)
        return self._onnx_activation(g, out, name)

    def __repr__(self):
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return (
            f"Conv2D({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}{groups}, bias={'bias' in self.params})"
        )
