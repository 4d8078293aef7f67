"""Dropout and batch normalisation: the layers that behave differently when training."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from .base import Layer, register


@register("dropout")
class Dropout(Layer):
    """Inverted dropout: zero each value with probability rate and scale the rest by 1/(1-rate) when
    training; the identity otherwise. The mask is drawn from the Generator passed in."""

    def __init__(self, rate: float = 0.5, rng: np.random.Generator | None = None):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.rng = rng if rng is not None else np.random.default_rng()

    def forward(self, x, training=True):
        if not training or self.rate == 0.0:
            self._scale = None
            return x
        keep = self.rng.random(x.shape, dtype=np.float32) >= self.rate
        self._scale = keep.astype(x.dtype) / x.dtype.type(1.0 - self.rate)
        return x * self._scale

    def backward(self, dy):
        return dy if self._scale is None else dy * self._scale

    def __repr__(self):
        return f"Dropout(rate={self.rate})"


class _BatchNorm(Layer):
    """y = weight * (x - mean) / sqrt(var + eps) + bias per channel, with PyTorch's conventions:
    batch statistics (biased variance) when training, running statistics otherwise; the running
    variance is updated with the unbiased batch variance, running = (1 - momentum) * running + momentum * batch."""

    rank = 0  # per-sample rank of the input

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, dtype=np.float32):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        self.params = {"weight": np.ones(num_features, dtype), "bias": np.zeros(num_features, dtype)}
        self.buffers = {
            "running_mean": np.zeros(num_features, dtype),
            "running_var": np.ones(num_features, dtype),
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

    def _axes_and_shape(self, x):
        axes = (0,) + tuple(range(2, x.ndim))
        return axes, (1, -1) + (1,) * (x.ndim - 2)

    def forward(self, x, training=True):
        axes, bshape = self._axes_and_shape(x)
        if training:
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
            m = x.size // x.shape[1]
            b = self.buffers
            b["running_mean"] = ((1 - self.momentum) * b["running_mean"] + self.momentum * mean).astype(mean.dtype)
            unbiased = var * (m / max(m - 1, 1))
            b["running_var"] = ((1 - self.momentum) * b["running_var"] + self.momentum * unbiased).astype(var.dtype)
            b["num_batches_tracked"] = b["num_batches_tracked"] + 1
        else:
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
        self._training = training
        self._inv_std = (1.0 / np.sqrt(var + self.eps)).astype(x.dtype).reshape(bshape)
        self._xhat = (x - mean.reshape(bshape)) * self._inv_std
        return self._xhat * self.params["weight"].reshape(bshape) + self.params["bias"].reshape(bshape)

    def backward(self, dy):
        axes, bshape = self._axes_and_shape(dy)
        self.grads["weight"] = (dy * self._xhat).sum(axis=axes)
        self.grads["bias"] = dy.sum(axis=axes)
        dxhat = dy * self.params["weight"].reshape(bshape)
        if not self._training:
            return dxhat * self._inv_std
        # the batch mean and variance depend on x too: subtract their share of the gradient
        mean_dxhat = dxhat.mean(axis=axes, keepdims=True)
        mean_dxhat_xhat = (dxhat * self._xhat).mean(axis=axes, keepdims=True)
        return (dxhat - mean_dxhat - self._xhat * mean_dxhat_xhat) * self._inv_std

    def __repr__(self):
        return f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum})"


@register("batchnorm1d")
class BatchNorm1D(_BatchNorm):
    """Batch normalisation of features: (N, F)."""

    rank = 1


@register("batchnorm2d")
class BatchNorm2D(_BatchNorm):
    """Batch normalisation of feature maps: (N, C, H, W), statistics over N, H and W."""

    rank = 3
