"""Dropout and batch normalisation: the layers that behave differently when training."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import Field
from pydantic import Strict as NoCoercion

from cnnctl.core import functional as F
from cnnctl.core.epilogue import NONE, Epilogue, chain
from cnnctl.errors import ShapeError
from cnnctl.strict import INT_MAX

from .base import Context, Layer, LayerSpec, channels, make_activation, register, register_spec
from .init import constant

if TYPE_CHECKING:  # derived from the activation registry in nn/__init__ once every layer type is registered
    from . import Activation


class DropoutSpec(LayerSpec):
    type: Literal["dropout"]
    rate: float = Field(0.5, ge=0.0, lt=1.0, description="Probability of zeroing each value while training.")

    def build(self, input_shape, scope):
        return Dropout(self.rate, scope.rng)


class Dropout2DSpec(LayerSpec):
    type: Literal["dropout2d"]
    rate: float = Field(0.5, ge=0.0, lt=1.0, description="Probability of zeroing each whole channel while training.")

    def build(self, input_shape, scope):
        if len(input_shape) != 3:
            raise ShapeError(f"dropout2d drops channels of (C, H, W) maps; its input has shape {tuple(input_shape)}",
                             "put dropout2d between convolutions, or use dropout after flatten")
        return Dropout2D(self.rate, scope.rng)


class _BatchNormSpec(LayerSpec):
    momentum: float = Field(0.1, gt=0.0, le=1.0)
    eps: float = Field(1e-5, gt=0.0)
    activation: Activation | None = Field(None, description="Applied after normalising (conv-bn-relu).")
    weight_init: float = Field(1.0, description="Initial scale (weight, gamma). 0 in the last batchnorm of a "
                               "residual body starts the block as its shortcut (zero-init residual, Goyal et al. "
                               "2017; torchvision's zero_init_residual).")
    ghost_batch: Annotated[int, NoCoercion(), Field(ge=2, le=INT_MAX)] | None = Field(
        None, description="Ghost batchnorm (Hoffer et al. 2017): while training, statistics over virtual batches of "
        "this many samples (at least 2: the statistics of one sample are its own values; the batch cut in order, "
        "the last part may be smaller), as if the layer ran on each in turn.")

    def build(self, input_shape, scope):
        cls = {"batchnorm1d": BatchNorm1D, "batchnorm2d": BatchNorm2D}.get(self.type)  # type: ignore
        if cls is None:  # plain `batchnorm`: 1-D or 2-D from the incoming shape
            cls = BatchNorm1D if len(input_shape) == 1 else BatchNorm2D
        return cls(input_shape[0], self.eps, self.momentum, activation=self.activation, weight_init=self.weight_init,
                   rng=scope.rng, ghost_batch=self.ghost_batch)


@register_spec
class BatchNormSpec(_BatchNormSpec):
    type: Literal["batchnorm"]


class BatchNorm1DSpec(_BatchNormSpec):
    type: Literal["batchnorm1d"]


class BatchNorm2DSpec(_BatchNormSpec):
    type: Literal["batchnorm2d"]


@register("dropout", DropoutSpec)
class Dropout(Layer):
    """Inverted dropout: zero each value with probability rate and scale the rest by 1/(1-rate) when
    training; the identity otherwise. The mask is drawn from the Generator passed in.

    When the one running the model says (`context=Context(part=(lo, hi, n))`) that the input is rows lo:hi of a batch
    of n whose other rows other processes hold (data-parallel training, cnnctl.distributed), the mask is drawn for
    the whole batch and rows lo:hi of it are used, so every process draws the same numbers as one process
    training the whole batch."""

    onnx_op = "Dropout"

    takes_context = True

    def __init__(self, rate: float = 0.5, rng: np.random.Generator | None = None):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.rng = rng if rng is not None else np.random.default_rng()

    def forward(self, x, training=True, context: Context | None = None):
        if not training or self.rate == 0.0:
            self._scale = None
            return x
        part = None if context is None else context.part
        if part is None:
            keep = self.rng.random(self.mask_shape(x.shape), dtype=np.float32) >= self.rate
        else:
            lo, hi, n = part
            if hi - lo != x.shape[0]:
                raise ValueError(f"dropout: batch part {part} does not match an input of {x.shape[0]} rows")
            keep = self.rng.random(self.mask_shape((n, *x.shape[1:])), dtype=np.float32)[lo:hi] >= self.rate
        self._scale = keep.astype(x.dtype) / x.dtype.type(1.0 - self.rate)
        if self._scale.shape == x.shape:  # drawn in C order; laid out as x, so that out and the gradient are too
            self._scale = F.in_layout_of(self._scale, x)
        return x * self._scale

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """One random draw per value."""
        return shape

    def backward(self, dy):
        return dy if self._scale is None else dy * self._scale

    def onnx(self, g, x, input_shape, name):
        return g.node(self.onnx_op, [x], name)

    def __repr__(self):
        return f"Dropout(rate={self.rate})"


@register("dropout2d", Dropout2DSpec)
class Dropout2D(Dropout):
    """Spatial dropout (Tompson et al. 2015; PyTorch's Dropout2d): zero each whole channel of an (N, C, H, W)
    input with probability rate and scale the kept ones by 1/(1-rate) while training; the identity otherwise.
    Neighbouring pixels of a map are strongly correlated, so dropping single values regularises convolutions
    little."""

    def mask_shape(self, shape):
        return (*shape[:2], *(1,) * (len(shape) - 2))

    def __repr__(self):
        return f"Dropout2D(rate={self.rate})"


class _BatchNorm(Layer):
    """y = weight * (x - mean) / sqrt(var + eps) + bias per channel, with PyTorch's conventions:
    batch statistics (biased variance) when training, running statistics otherwise; the running
    variance is updated with the unbiased batch variance, running = (1 - momentum) * running + momentum * batch."""

    onnx_op = "BatchNormalization"

    rank = 0  # per-sample rank of the input
    is_norm = True
    # `context=Context(sum=...)` from the one running the model (data-parallel training, cnnctl.distributed): the
    # function sums per-channel float64 arrays, in place, over the processes that hold the other parts of the
    # batch, so that the statistics and their gradients are the whole batch's (SyncBatchNorm); each process keeps
    # the weight and bias gradients of its own part, which the trainer sums with the other parameters'. Ghost
    # batchnorm keeps its virtual batches' statistics local.
    takes_context = True
    batch_sum: Callable[[np.ndarray], object] | None = None  # the last training forward's

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, dtype=np.float32,
                 activation: str | None = None, weight_init: float = 1.0, rng=None, ghost_batch: int | None = None):
        super().__init__()
        self.ghost_batch = ghost_batch
        self.activation = make_activation(activation)
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        n = (self.num_features,)  # rng is only asked whether this is a shapes-only build (SHAPES_ONLY)
        self.params = {"weight": constant(n, weight_init, rng, dtype), "bias": constant(n, 0.0, rng, dtype)}
        self.buffers = {
            "running_mean": constant(n, 0.0, rng, dtype),
            "running_var": constant(n, 1.0, rng, dtype),
            "num_batches_tracked": np.zeros((), np.int64),
        }
        self.zero_grad()

    def output_shape(self, input_shape):
        self._expect_rank(input_shape, self.rank, "use batchnorm (it picks 1-D or 2-D from its input)")
        if input_shape[0] != self.num_features:
            raise ShapeError(f"{self.tag} expects {self.num_features} channels, got input {tuple(input_shape)}")
        return tuple(input_shape)

    def macs(self, input_shape):
        return 2 * int(np.prod(input_shape))

    def _shapes(self, x):
        """The einsum spec that sums over every axis but the channels, and the per-channel broadcast shape."""
        letters = "nchw"[: x.ndim] if x.ndim <= 4 else None
        return f"{letters}->c", f"{letters},{letters}->c", (1, -1) + (1,) * (x.ndim - 2)

    def forward(self, x, training=True, context: Context | None = None):
        training = training and not self.frozen  # a frozen batchnorm normalises with its running statistics
        g = self.ghost_batch
        context = context or Context()
        self.batch_sum = None if g else context.sum
        self._cut = context.per_channel  # how the channels' work is cut (the runner's threads), backward too
        self._d = None  # the fused activation's derivative (below), when there is one
        if training and g and x.shape[0] > g:  # ghost batchnorm: each virtual batch in turn, its own statistics
            parts = [self._normalise(x[lo : lo + g], True) for lo in range(0, x.shape[0], g)]
            self._saved = [state for _, state in parts]
            return self._activate(np.concatenate([y for y, _ in parts]), training, context, in_place=True)
        act = self.activation
        epilogue = Epilogue(act) if act is not None and act.planned_as() == "elementwise" else NONE
        self._d = epilogue.derivative(x)
        y, state = self._normalise(x, training, epilogue, self._d)
        self._saved = [state]
        return y if self._d is not None else self._activate(y, training, context, in_place=True)

    def _normalise(self, x, training, epilogue=NONE, d=None):
        """(x - mean) / std * weight + bias with this batch's statistics (training: updating the running ones) or
        the running ones, and what backward needs. The bias is added by `epilogue`, whose element-wise activation
        (if any) runs on each slice of channels while it is in cache, its derivative into d."""
        total, dot, bshape = self._shapes(x)
        m, c = x.size // x.shape[1], x.shape[1]
        centred, y = np.empty_like(x), np.empty_like(x)  # laid out as x
        mean, var, inv_std = (np.empty(c, x.dtype) for _ in range(3))
        weight, bias, eps, cut = self.params["weight"], self.params["bias"], self.eps, channels
        local = training  # statistics of this batch, computed in the pass below
        if not training:
            mean[:], var[:] = self.buffers["running_mean"], self.buffers["running_var"]
        elif self.batch_sum is not None:  # of the whole batch, parts of which other processes hold
            m = self._summed_statistics(x, centred, mean, var)
            local = False

        def part(lo, hi):  # a slice of channels: statistics, then y = (x - mean) * (weight * inv_std) + bias
            xs, xc = cut(x, lo, hi), cut(centred, lo, hi)
            if local:  # two passes for the statistics (mean, then the centred squares: no cancellation)
                mean[lo:hi] = np.einsum(total, xs) / x.dtype.type(m)
            np.subtract(xs, mean[lo:hi].reshape(bshape), out=xc)
            if local:
                var[lo:hi] = np.einsum(dot, xc, xc) / x.dtype.type(m)
            inv_std[lo:hi] = 1.0 / np.sqrt(var[lo:hi] + eps)
            ys = np.multiply(xc, (weight[lo:hi] * inv_std[lo:hi]).reshape(bshape), out=cut(y, lo, hi))
            epilogue(ys, bias[lo:hi].reshape(bshape), None if d is None else cut(d, lo, hi))

        self._cut(x, part)
        if training:
            b, mo = self.buffers, self.momentum
            b["running_mean"] = ((1 - mo) * b["running_mean"] + mo * mean).astype(b["running_mean"].dtype)
            unbiased = var * (m / max(m - 1, 1))
            b["running_var"] = ((1 - mo) * b["running_var"] + mo * unbiased).astype(b["running_var"].dtype)
            b["num_batches_tracked"] = b["num_batches_tracked"] + 1
        return y, (training, m, inv_std, centred)

    def _summed_statistics(self, x, centred, mean, var) -> int:
        """Mean and (biased) variance over the whole batch into mean and var; returns its size. One reduction
        of per-channel sums and sums of squares (float64, each part's from its own centred values, so no
        cancellation in float32)."""
        total, dot, bshape = self._shapes(x)
        c, n, cut = x.shape[1], x.size // x.shape[1], channels
        sums = np.zeros(2 * c + 1, np.float64)  # sum, sum of squares per channel; the count

        def part(lo, hi):
            xs, xc = cut(x, lo, hi), cut(centred, lo, hi)
            mu = np.einsum(total, xs) / x.dtype.type(max(n, 1))
            np.subtract(xs, mu.reshape(bshape), out=xc)
            mu64 = mu.astype(np.float64)
            sums[lo:hi] = mu64 * n
            sums[c + lo : c + hi] = np.einsum(dot, xc, xc).astype(np.float64) + n * mu64 * mu64

        self._cut(x, part)
        sums[-1] = n
        self.batch_sum(sums)
        m = int(sums[-1])
        mean64 = sums[:c] / m
        mean[:] = mean64
        var[:] = np.maximum(sums[c : 2 * c] / m - mean64 * mean64, 0.0)
        return m

    def backward(self, dy):
        if self._d is not None:  # the activation ran in the normalisation's pass: its derivative too, below
            dx, gw, gb = self._backprop(dy, self._saved[0], self._d)
        elif len(self._saved) == 1:
            dx, gw, gb = self._backprop(self._deactivate(dy), self._saved[0])
        else:  # ghost batchnorm: each virtual batch's part; the parameters' gradients add up
            g, dy = self.ghost_batch, self._deactivate(dy)
            done = [self._backprop(dy[i * g : (i + 1) * g], state) for i, state in enumerate(self._saved)]
            dx = np.concatenate([d for d, _, _ in done])
            gw, gb = sum(w for _, w, _ in done), sum(b for _, _, b in done)
        self.grads["weight"], self.grads["bias"] = gw, gb
        return dx

    def _backprop(self, dy, state, d=None):
        """(input gradient, weight gradient, bias gradient) of one normalisation, given its saved state. With `d`
        (the derivative of the activation run in its pass), dy is the activation's output gradient: dy * d goes
        into the input gradient's own memory, slice by slice, and is read from there."""
        training, m, inv_std_all, centred = state
        if d is not None:
            dy = F.in_layout_of(dy, d)  # laid out as the activation's derivative (and the input), as dy * d was
        total, dot, bshape = self._shapes(dy)
        c, cut = dy.shape[1], channels
        gw, gb, dx = np.empty(c, dy.dtype), np.empty(c, dy.dtype), np.empty_like(dy)
        weight = self.params["weight"]
        summed = training and self.batch_sum is not None
        sum_b, sum_w = (gb, gw) if not summed else (np.empty(c, dy.dtype), np.empty(c, dy.dtype))

        def deltas(lo, hi):  # this slice's output gradient before the activation (in dx's memory when there is one)
            if d is None:
                return cut(dy, lo, hi)
            return chain(cut(dy, lo, hi), cut(d, lo, hi), out=cut(dx, lo, hi))

        def sums(lo, hi):
            ds, xc = deltas(lo, hi), cut(centred, lo, hi)
            gb[lo:hi] = np.einsum(total, ds)
            gw[lo:hi] = np.einsum(dot, ds, xc) * inv_std_all[lo:hi]  # sum(dy * xhat)

        def part(lo, hi):  # xhat = centred * inv_std, never formed: inv_std goes into per-channel factors
            xc, dxs = cut(centred, lo, hi), cut(dx, lo, hi)
            inv_std = inv_std_all[lo:hi]
            if not summed:
                sums(lo, hi)
            ds = cut(dy, lo, hi) if d is None else dxs  # the sums above left dy * d in dxs
            k = weight[lo:hi] * inv_std  # d(out)/d(x) per channel with the statistics held fixed
            if training:
                # the batch mean and variance depend on x too: dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)),
                # in four passes over dx (with an activation, over a slice-sized temporary: dx holds dy * d)
                t = np.multiply(xc, (-inv_std * sum_w[lo:hi] / m).reshape(bshape), out=None if d is not None
                                else dxs)
                t += ds
                t -= (sum_b[lo:hi] / m).reshape(bshape)
                np.multiply(t, k.reshape(bshape), out=dxs)
            else:
                np.multiply(ds, k.reshape(bshape), out=dxs)

        if summed:  # the two sums over the whole batch, in one reduction; this part's own are the parameters'
            self._cut(dy, sums)
            both = np.concatenate([gb, gw]).astype(np.float64)
            self.batch_sum(both)
            sum_b[:], sum_w[:] = both[:c], both[c:]
        self._cut(dy, part)
        return dx, gw, gb

    def onnx(self, g, x, input_shape, name):
        inputs = [x, *g.arrays(name, self, ("weight", "bias", "running_mean", "running_var"))]
        out = g.node(self.onnx_op, inputs, name, epsilon=self.eps, momentum=1 - self.momentum)
        return self._onnx_activation(g, out, name)

    def __repr__(self):
        return f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum})"


@register("batchnorm1d", BatchNorm1DSpec)
class BatchNorm1D(_BatchNorm):
    """Batch normalisation of features: (N, F)."""

    rank = 1


@register("batchnorm2d", BatchNorm2DSpec)
class BatchNorm2D(_BatchNorm):
    """Batch normalisation of feature maps: (N, C, H, W), statistics over N, H and W."""

    rank = 3
