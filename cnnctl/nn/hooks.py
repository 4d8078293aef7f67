"""Recording layer outputs during a forward pass (for feature-map views), without the layers knowing."""

from __future__ import annotations

from contextlib import contextmanager

from .base import Layer


@contextmanager
def recording(layers: dict[str, Layer]):
    """Within the block, each of these layers' forward outputs is kept under its name (the last call wins).
    A recorded layer applies its whole activation itself (no ReLU deferred to a following max pooling,
    which then applies an idempotent ReLU once more), so what is recorded is the layer's own output."""
    outputs: dict = {}
    for name, layer in layers.items():
        def forward(x, training=True, _forward=layer.forward, _name=name, **_options):
            outputs[_name] = y = _forward(x, training)
            return y

        layer.forward = forward  # an instance attribute, shadowing the class's method
    try:
        yield outputs
    finally:
        for layer in layers.values():
            del layer.forward
