"""Sequential (layers run in order) and Model (the root of every network: state-dict names `layers.{i}...`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from .base import Context, Layer, LayerSpec, register

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
    Children are named 0, 1, ... like torch's."""

    capability = "sequence"
    takes_context = True  # passed on to its layers
    child_prefix = ""

    def __init__(self, layers: list[Layer] | tuple = (), names: list[str] | None = None):
        super().__init__()
        self.layers = list(layers)
        self.names = names or [f"{type(layer).__name__.lower()}_{i}" for i, layer in enumerate(self.layers)]

    def children(self):
        return [(f"{self.child_prefix}{i}", layer) for i, layer in enumerate(self.layers)]

    def set_input_grad(self, needed: bool) -> None:
        """A layer needs its input gradient when the sequence's input does or a layer before it trains."""
        self.needs_input_grad = needed
        for layer in self.layers:
            layer.set_input_grad(needed)
            needed = needed or layer.has_trainable()

    def forward(self, x: np.ndarray, training: bool = True, context: Context | None = None) -> np.ndarray:
        for layer in self.layers:
            x = layer(x, training, context)
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
    the layers above frozen ones, up to the first that trains).

    `forward` and `backward` run the layers one by one, as they are written; what trains, evaluates and times a
    model runs it through an execution plan instead (cnnctl.plan.Runner), which computes the same numbers faster."""

    child_prefix = "layers."

    def __init__(self, layers: list[Layer], names: list[str] | None = None):
        super().__init__(layers, names)
        self.set_input_grad(False)

    def freeze(self, frozen: bool = True) -> None:
        super().freeze(frozen)
        self.set_input_grad(False)
