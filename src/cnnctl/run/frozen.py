"""train.cache_frozen: the frozen prefix of a model (the top-level layers below the first that trains) run once over
every split; training and evaluation then run the layers above it on the stored outputs."""

from __future__ import annotations

import math

import numpy as np

from cnnctl import data
from cnnctl.config.spec import Spec
from cnnctl.core import nn, plan
from cnnctl.core.memory import refuse_over
from cnnctl.core.nn import Model
from cnnctl.errors import ConfigError

WHERE = "train.cache_frozen"


class Fed(plan.Runner):
    """Runs the layers above a cached frozen prefix, fed the prefix's stored outputs: each batch is first laid out
    in memory as the prefix gave it (a convolution's outputs are batch-innermost views), so that every product
    runs on the same layout, and rounds the same way, as in the whole model."""

    order: list[int] | None = None

    def forward(self, x: np.ndarray, training: bool = True, clock: np.ndarray | None = None) -> np.ndarray:
        if self.order is not None and memory_order(x) != self.order:
            laid = np.empty([x.shape[i] for i in self.order], x.dtype)
            laid[...] = x.transpose(self.order)
            x = laid.transpose(np.argsort(self.order))
        return super().forward(x, training, clock)


def memory_order(x: np.ndarray) -> list[int]:
    """x's axes from the largest stride to the smallest (a C-order array: 0, 1, ...)."""
    return sorted(range(x.ndim), key=lambda i: (-x.strides[i], i))


def _top_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else None


def _renumbered(name: str, by: int) -> str:
    parts = name.split(".")
    return ".".join([parts[0], str(int(parts[1]) + by), *parts[2:]])


def frozen_prefix(layers: list) -> int:
    """The number of top-level layers below the first that trains, refused when there is none, when nothing would
    train, or when the prefix draws random numbers (dropout): its outputs could not be computed once."""
    first = next((i for i, layer in enumerate(layers) if layer.has_trainable()), len(layers))
    if first == 0:
        raise ConfigError(f"{WHERE}: model.layers[0] trains, so there is no frozen prefix to compute once",
                          "freeze the pretrained layers (trainable: false), or leave cache_frozen out")
    if first == len(layers):
        raise ConfigError(f"{WHERE}: every layer is frozen; nothing would train", "leave the last layers trainable")
    random = [name for name, layer in Model(layers[:first]).named_layers()
              if isinstance(layer, (nn.Dropout, nn.Dropout2D))]
    if random:
        raise ConfigError(f"{WHERE}: model.{random[0]} (dropout) lies in the frozen prefix and draws a new mask "
                          "every step, so its output cannot be computed once", "move the dropout after the "
                          "first trainable layer, or leave cache_frozen out")
    return first


def cache_frozen(spec: Spec, runner: plan.Runner, ds: data.Dataset) -> tuple[Fed, data.Dataset]:
    """The runner of the layers above the frozen prefix and the dataset of the prefix's outputs for every split
    (call it with the evaluated weights in place). Nothing random happens before the first trainable layer (no
    input augmentation, checked with the config; no dropout in the prefix), so the numbers are those of the full
    model, to the rounding of the batches' sums."""
    layers = runner.model.layers
    first = frozen_prefix(layers)
    recorded = runner.algorithms

    def renumbered(shift: int) -> dict[str, str]:
        return {_renumbered(k, -shift): v for k, v in recorded.items()
                if _top_index(k) is not None and (shift == 0) == (_top_index(k) < first)}

    prefix = plan.Runner(Model(layers[:first]), renumbered(0))
    net = Fed(Model(layers[first:]), renumbered(first), context=runner.context)
    shape = prefix.model.output_shape(tuple(spec.model.input_shape))
    n = len(ds.train) + len(ds.val) + len(ds.test)
    refuse_over(f"{WHERE}: the outputs of model.layers[:{first}] for {n:,} images", 4 * n * math.prod(shape), 2,
                ConfigError, "leave cache_frozen out, or cache a deeper prefix (smaller outputs)")
    ebs = spec.data.evaluation_batch

    def outputs(split: data.Split) -> data.Split:
        x = np.empty((len(split), *shape), np.float32)
        for i, (xb, _) in enumerate(data.batches(ds, split, ebs)):
            y = prefix.forward(xb, training=False)
            x[i * ebs : i * ebs + len(xb)] = y
            if net.order is None and len(xb) > 1:  # the layout the layer above saw: products round alike
                net.order = memory_order(y)
        return data.Split(x, split.y)

    splits = [outputs(s) for s in (ds.train, ds.val, ds.test)]
    zero, one = np.zeros(shape[0], np.float32), np.ones(shape[0], np.float32)
    return net, data.Dataset(ds.name, ds.classes, *splits, zero, one)
