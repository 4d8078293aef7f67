"""Spec -> layers: propagate input_shape through the layer specs, building each layer for the shape it gets.

Shape problems surface here, before any data is touched, naming the layer, its input shape and a fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import data
from .config import ModelSpec, Spec
from .errors import DataError, ShapeError
from .nn import LOSSES, Loss, Sequential


@dataclass
class LayerRow:
    index: int
    name: str
    type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    macs: int


def layer_label(i: int, spec) -> str:
    return f"model.layers[{i}] ({spec.type}{' ' + repr(spec.name) if spec.name else ''})"


def build_model(spec: ModelSpec, rng: np.random.Generator | None = None) -> tuple[Sequential, list[LayerRow]]:
    """The Sequential for a model spec, and one row per layer with shapes, parameters and MACs."""
    rng = rng if rng is not None else np.random.default_rng(0)
    shape: tuple[int, ...] = tuple(spec.input_shape)
    layers, names, rows = [], [], []
    for i, ls in enumerate(spec.layers):
        try:
            ls_layer = ls.build(shape, rng)
            out = ls_layer.output_shape(shape)
            macs = ls_layer.macs(shape)
        except ShapeError as e:
            raise ShapeError(f"{layer_label(i, ls)}: input shape {shape}: {e.message}", e.hint) from None
        name = ls.name or f"{ls.type}_{i}"
        layers.append(ls_layer)
        names.append(name)
        rows.append(LayerRow(i, name, ls.type, shape, tuple(out), ls_layer.num_params(), int(macs)))
        shape = tuple(out)
    return Sequential(layers, names), rows


def check_outputs(spec: Spec, rows: list[LayerRow], num_classes: int) -> None:
    """The last layer must emit one value per class."""
    last = rows[-1]
    if last.output_shape != (num_classes,):
        raise ShapeError(
            f"{layer_label(last.index, spec.model.layers[-1])} outputs shape {last.output_shape}, but the dataset "
            f"'{spec.data.dataset}' has {num_classes} classes",
            f"end the model with {{type: dense, units: {num_classes}}}",
        )


def check_known_data(spec: Spec, rows: list[LayerRow]) -> None:
    """What can be checked against the dataset without reading it: its class count and image shape."""
    classes, image_shape = data.dataset_info(spec.data)
    if classes is not None:
        check_outputs(spec, rows, len(classes))
    if image_shape is not None and tuple(image_shape) != tuple(spec.model.input_shape):
        raise DataError(f"dataset '{spec.data.dataset}' has images of shape {tuple(image_shape)} but "
                        f"model.input_shape is {list(spec.model.input_shape)}",
                        f"set model.input_shape: {list(image_shape)}")


def build_loss(spec: Spec) -> Loss:
    if spec.loss.type == "cross_entropy":
        return LOSSES["cross_entropy"](label_smoothing=spec.loss.label_smoothing)
    return LOSSES[spec.loss.type]()
