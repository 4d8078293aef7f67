"""Sequential (layers run in order) and Model (the root of every network: state-dict names `layers.{i}...`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from ..functional import Scratch
from .base import Layer, LayerSpec, register

if TYPE_CHECKING:  # the layer union, built in nn/__init__ once every layer type is registered
    from . import AnyLayer


class SequentialSpec(LayerSpec):
    type: Literal["sequential"]
    layers: list[AnyLayer] = Field(min_length=1, description="Layers in order (a block's body, or `repeat` copies).")

    def layer_lists(self):
        return {("layers",): self.layers}

    def with_layer_lists(self, lists):
        return self.model_copy(update={"layers": lists[("layers",)]})

    def build(self, input_shape, scope):
        return scope.sequence(None, self.layers, input_shape)


@register("sequential", SequentialSpec)
class Sequential(Layer):
    """Runs layers in order; backward in reverse, stopping where no earlier layer needs gradients.

    A convolution with a ReLU activation followed by max pooling has its ReLU applied after the pooling:
    max(pool(z), 0) = pool(max(z, 0)), and the gradients agree too (a window whose maximum is not positive
    passes no gradient either way), but the ReLU and its mask then touch a quarter of the numbers (2x2
    pooling). That is valid here because the convolution's output has one consumer, the pooling. Each layer
    called on its own still applies its own activation. Children are named 0, 1, ... like torch's.
    """

    child_prefix = ""

    def __init__(self, layers: list[Layer] | tuple = (), names: list[str] | None = None):
        super().__init__()
        self.layers = list(layers)
        self.names = names or [f"{type(layer).__name__.lower()}_{i}" for i, layer in enumerate(self.layers)]
        self._relu_after_pool = {  # indices of layers whose ReLU the next (max pooling) layer applies
            i for i, (a, b) in enumerate(zip(self.layers, self.layers[1:])) if a.relu_deferrable and b.takes_relu
        }

    def children(self):
        return [(f"{self.child_prefix}{i}", layer) for i, layer in enumerate(self.layers)]

    def set_input_grad(self, needed: bool) -> None:
        """A layer needs its input gradient when the sequence's input does or a layer before it trains."""
        self.needs_input_grad = needed
        for layer in self.layers:
            layer.set_input_grad(needed)
            needed = needed or layer.has_trainable()

    def forward_options(self, i: int) -> dict:
        """Keyword arguments this model passes to layer i's forward (the ReLU moved behind max pooling, unless
        a forward hook watches the layer whose ReLU it is)."""
        if i in self._relu_after_pool and not self.layers[i].forward_hooks:
            return {"relu": False}
        return {"relu": True} if i - 1 in self._relu_after_pool else {}

    def forward_layer(self, i: int, x: np.ndarray, training: bool = True) -> np.ndarray:
        """Layer i's output within this sequence (with the deferred ReLU where it applies)."""
        return self.layers[i](x, training, **self.forward_options(i))

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        for i in range(len(self.layers)):
            x = self.forward_layer(i, x, training)
        return x


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

    def output_shape(self, input_shape):
        return self.output_shapes(input_shape)[-1] if self.layers else tuple(input_shape)

    def macs(self, input_shape):
        shapes = [tuple(input_shape), *self.output_shapes(input_shape)]
        return sum(layer.macs(s) for layer, s in zip(self.layers, shapes))

    def receptive_field(self, rf):
        for layer in self.layers:
            rf = layer.receptive_field(rf)
        return rf

    def onnx(self, g, x, input_shape, name):
        shape = tuple(input_shape)
        for (child, layer) in self.children():
            x = layer.onnx(g, x, shape, f"{name}.{child}" if name else child)
            shape = layer.output_shape(shape)
        return x

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    def __repr__(self) -> str:
        body = "\n".join(f"  ({i}) {name}: {layer!r}".replace("\n", "\n  ")
                         for i, (name, layer) in enumerate(zip(self.names, self.layers)))
        return f"{type(self).__name__}(\n{body}\n)"


class Model(Sequential):
    """The root of a network: a Sequential whose layers are named `layers.{i}` (a PyTorch module holding an
    nn.Sequential as `layers`). The first layer skips its input gradient: nothing below it needs one (nor do
    the layers above frozen ones, up to the first that trains)."""

    child_prefix = "layers."

    def __init__(self, layers: list[Layer], names: list[str] | None = None):
        super().__init__(layers, names)
        self.set_input_grad(False)
        self.scratch = Scratch()
        for _, layer in self.named_layers():
            layer.scratch = self.scratch

    def freeze(self, frozen: bool = True) -> None:
        super().freeze(frozen)
        self.set_input_grad(False)

