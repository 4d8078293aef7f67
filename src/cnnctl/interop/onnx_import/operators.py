"""The registry of ONNX operators the importer takes: `@converts("Op")` registers a converter (importer, node,
attributes, layers) that appends the node's cnnctl layer (or folds it into the previous layer's `activation:`).
The operators taken are exactly CONVERTERS' (at the file's opset) and JOINS (Add, Concat, Mul and Sum join
branches: the walk's containers). The converters live in convert.py and pooling.py, which register on import."""

from __future__ import annotations

import math
from collections.abc import Callable

from cnnctl.core.nn import ONNX_OPS

CONVERTERS: dict[str, list[tuple[int, int | None, Callable]]] = {}  # op -> (since, until, converter)
ADD, CONCAT, MUL = ONNX_OPS["residual"], ONNX_OPS["concat"], ONNX_OPS["gate"]  # the containers' joins
# nodes that may join branches (walk.py); a constant operand is a converter's
JOINS = {ADD, CONCAT, MUL, "Sum"}
# operators of cnnctl's own domain that rewrite passes make from several nodes, for a converter each
LAYERNORM2D, CHANNEL_SHUFFLE, CHANNEL_SPLIT = "LayerNorm2d", "ChannelShuffle", "ChannelSplit"
# what a user meets most often among the rest, and what it would take
LATER = {"Erf": "outside GELU's x * (1 + erf(x / sqrt 2)) / 2", "Softplus": "outside Mish's x * tanh(softplus(x))"}


def converts(*ops: str, since: int = 1, until: int | None = None):
    """Register a converter for the ONNX operators `ops` at the opsets since..until (inclusive; until None: every
    later one), as onnx2torch's @add_converter(operation_type=..., version=...): where an operator's meaning or
    form changed with an opset (Slice's bounds and Pad's pads became inputs, Clip's bounds too), each form has a
    converter of its own."""
    def register(fn: Callable) -> Callable:
        last = math.inf if until is None else until
        for op in ops:
            ranges = CONVERTERS.setdefault(op, [])
            if any(since <= (math.inf if u is None else u) and s <= last for s, u, _ in ranges):
                raise ValueError(f"ONNX operator {op} has two converters at one opset")
            ranges.append((since, until, fn))
        return fn
    return register


def converter_for(op: str, opset: int) -> Callable | None:
    """The converter of `op` at `opset` (None: cnnctl does not import it)."""
    return next((fn for s, u, fn in CONVERTERS.get(op, []) if s <= opset and (u is None or opset <= u)), None)
