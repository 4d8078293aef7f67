"""The registry of ONNX operators the importer takes: `@converts("Op")` registers a converter (importer, node,
attributes, layers) that appends the node's cnnctl layer (or folds it into the previous layer's `activation:`).
The operators taken are exactly CONVERTERS' keys and JOINS (Add, Concat, Mul and Sum join branches: the walk's
containers). The converters live in convert.py and pooling.py, which register on import."""

from __future__ import annotations

from collections.abc import Callable

from cnnctl.core.nn import ONNX_OPS

CONVERTERS: dict[str, Callable] = {}
ADD, CONCAT, MUL = ONNX_OPS["residual"], ONNX_OPS["concat"], ONNX_OPS["gate"]  # the containers' joins
# nodes that may join branches (walk.py); a constant operand is a converter's
JOINS = {ADD, CONCAT, MUL, "Sum"}
# operators of cnnctl's own domain that rewrite passes make from several nodes, for a converter each
LAYERNORM2D, CHANNEL_SHUFFLE, CHANNEL_SPLIT = "LayerNorm2d", "ChannelShuffle", "ChannelSplit"
# what a user meets most often among the rest, and what it would take
LATER = {"Erf": "outside GELU's x * (1 + erf(x / sqrt 2)) / 2", "Softplus": "outside Mish's x * tanh(softplus(x))"}


def converts(*ops: str):
    """Register a converter for the ONNX operators `ops` (its meaning at every opset this importer reads)."""
    def register(fn: Callable) -> Callable:
        for op in ops:
            if op in CONVERTERS:
                raise ValueError(f"ONNX operator {op} has two converters")
            CONVERTERS[op] = fn
        return fn
    return register
