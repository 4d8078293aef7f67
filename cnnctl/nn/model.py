"""Sequential: a list of layers run in order, with PyTorch-style state-dict names `layers.{i}.{key}`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .base import Layer
from .conv import Conv2D
from .pooling import MaxPool2D


class Sequential:
    """Runs layers in order; backward in reverse. The first layer skips its input gradient.

    A convolution with a ReLU activation followed by max pooling has its ReLU applied after the pooling:
    max(pool(z), 0) = pool(max(z, 0)), and the gradients agree too (a window whose maximum is not positive
    passes no gradient either way), but the ReLU and its mask then touch a quarter of the numbers (2x2
    pooling). Each layer called on its own still applies its own activation.
    """

    def __init__(self, layers: list[Layer], names: list[str] | None = None):
        self.layers = list(layers)
        self.names = names or [f"{type(layer).__name__.lower()}_{i}" for i, layer in enumerate(self.layers)]
        if self.layers and hasattr(self.layers[0], "needs_input_grad"):
            self.layers[0].needs_input_grad = False
        self._relu_after_pool = {  # indices of conv layers whose ReLU the next (max pooling) layer applies
            i for i, (a, b) in enumerate(zip(self.layers, self.layers[1:]))
            if isinstance(a, Conv2D) and a._fused_relu and isinstance(b, MaxPool2D)
        }

    def forward_options(self, i: int) -> dict:
        """Keyword arguments this model passes to layer i's forward (the ReLU moved behind max pooling)."""
        if i in self._relu_after_pool:
            return {"relu": False}
        return {"relu": True} if i - 1 in self._relu_after_pool else {}

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        for i, layer in enumerate(self.layers):
            x = layer.forward(x, training, **self.forward_options(i))
        return x

    __call__ = forward

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
            if dy is None:
                break
        return dy

    def output_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        shapes, shape = [], tuple(input_shape)
        for layer in self.layers:
            shape = layer.output_shape(shape)
            shapes.append(shape)
        return shapes

    def parameters(self) -> Iterator[tuple[str, Layer, str]]:
        """(state-dict name, layer, key) for every trainable parameter."""
        for i, layer in enumerate(self.layers):
            for key in layer.params:
                yield f"layers.{i}.{key}", layer, key

    def num_params(self) -> int:
        return sum(layer.num_params() for layer in self.layers)

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.zero_grad()

    def to(self, dtype) -> Sequential:
        for layer in self.layers:
            layer.to(dtype)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every parameter and buffer under `layers.{i}.{key}`, like a PyTorch nn.Sequential stored as `layers`."""
        out = {}
        for i, layer in enumerate(self.layers):
            for key, value in {**layer.params, **layer.buffers}.items():
                out[f"layers.{i}.{key}"] = value
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy arrays in; raises KeyError/ValueError naming the first missing, extra or misshapen entry."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise KeyError(f"missing {missing[:5]}, unexpected {extra[:5]}")
        for name in own:
            value = state[name]
            if own[name].shape != np.shape(value) and not (own[name].shape == () and np.size(value) == 1):
                raise ValueError(f"{name} has shape {np.shape(value)}, the model expects {own[name].shape}")
        for i, layer in enumerate(self.layers):
            for store in (layer.params, layer.buffers):
                for key in store:
                    value = state[f"layers.{i}.{key}"]  # safetensors returns 0-d arrays as shape (1,)
                    store[key] = np.array(value, dtype=store[key].dtype).reshape(store[key].shape)
        self.zero_grad()

    def __repr__(self) -> str:
        body = "\n".join(f"  ({i}) {name}: {layer!r}" for i, (name, layer) in enumerate(zip(self.names, self.layers)))
        return f"Sequential(\n{body}\n)"
