"""Sequential: a list of layers run in order, with PyTorch-style state-dict names `layers.{i}.{key}`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .base import Layer


class Sequential:
    """Runs layers in order; backward in reverse. The first layer skips its input gradient."""

    def __init__(self, layers: list[Layer], names: list[str] | None = None):
        self.layers = list(layers)
        self.names = names or [f"{type(layer).__name__.lower()}_{i}" for i, layer in enumerate(self.layers)]
        if self.layers and hasattr(self.layers[0], "needs_input_grad"):
            self.layers[0].needs_input_grad = False

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x, training)
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
