"""Recording layer outputs during a forward pass (for feature-map views), through the layers' forward hooks."""

from __future__ import annotations

from contextlib import contextmanager

from .base import Layer


@contextmanager
def recording(layers: dict[str, Layer]):
    """Within the block, each of these layers' forward outputs is kept under its name (the last call wins).
    A watched layer applies its whole activation itself (no ReLU deferred to a following max pooling), so what
    is recorded is the layer's own output."""
    outputs: dict = {}
    removers = [layer.add_forward_hook(lambda _layer, y, _name=name: outputs.__setitem__(_name, y))
                for name, layer in layers.items()]
    try:
        yield outputs
    finally:
        for remove in removers:
            remove()
