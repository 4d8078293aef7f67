"""The layer contract and the registry of layer types.

Every layer:
  * says its output shape for an input shape without any data (`output_shape`, per sample, no batch axis),
    raising ShapeError when it cannot take that input, so a whole net is checked before training;
  * `forward(x, training=True)` caches exactly what backward needs, overwriting it on every call;
  * `backward(dy)` fills `grads` (same keys as `params`) and returns the gradient for the input;
  * keeps non-trainable state in `buffers`, and never owns an optimizer.
Layout is NCHW; parameter names and layouts are PyTorch's.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import ShapeError
from ..registry import registrar

REGISTRY: dict[str, type[Layer]] = {}
register = registrar(REGISTRY)  # @register("conv2d"): make a layer type known under its spec tag


class Layer:
    """Base class: an identity with no parameters. Subclasses override what they change."""

    tag: ClassVar[str] = "layer"
    activation: Layer | None = None

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape)

    def macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates per sample in the forward pass."""
        return 0

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def zero_grad(self) -> None:
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}

    def to(self, dtype) -> Layer:
        """Cast floating parameters and buffers to dtype (float32 by default; float64 for gradient checks)."""
        self.params = {k: v.astype(dtype) for k, v in self.params.items()}
        self.buffers = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in self.buffers.items()}
        self.zero_grad()
        return self

    def num_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def _activate(self, y: np.ndarray, training: bool) -> np.ndarray:
        return y if self.activation is None else self.activation.forward(y, training)

    def _deactivate(self, dy: np.ndarray) -> np.ndarray:
        return dy if self.activation is None else self.activation.backward(dy)

    def _expect_rank(self, input_shape: tuple[int, ...], rank: int, fix: str) -> None:
        if len(input_shape) != rank:
            kind = {1: "(features,)", 3: "(channels, height, width)"}[rank]
            raise ShapeError(
                f"{self.tag} expects a {rank}-D input per sample {kind}, got shape {tuple(input_shape)}", fix
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def make_activation(name: str | None) -> Layer | None:
    """An activation layer from its tag ("relu", "tanh", ...), or None for None / "linear"."""
    if name is None or name == "linear":
        return None
    return REGISTRY[name]()
