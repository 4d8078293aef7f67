"""Converters of pooling and padding: MaxPool, AveragePool (asymmetric padding read as ceil mode where it is one),
GlobalAveragePool and a ReduceMean over H and W, and a Pad folded into the next layer's padding."""

from __future__ import annotations

import numpy as np

from cnnctl.core.nn import ONNX_OPS as OP

from .graph import pair
from .operators import converts


@converts(OP["maxpool2d"], OP["avgpool2d"])
def pool(imp, node, a, layers) -> None:
    _pool(imp, node, a, layers)


@converts(OP["global_avgpool2d"], "ReduceMean")
def global_pool(imp, node, a, layers) -> None:
    if node.op_type == "ReduceMean":
        _reduces_hw(imp, node, a)
    layers.append({"type": "global_avgpool2d"})
    imp.flat = True


@converts("Pad", until=10)
def pad_attributes(imp, node, a, layers) -> None:
    """Pad with its pads and value as attributes (opset 2-10; opset 1's `paddings` too)."""
    pads = a.get("pads", a.get("paddings"))
    _pad(imp, node, a.get("mode", b"constant"), None if pads is None else list(pads), float(a.get("value", 0.0)))


@converts("Pad", since=11)
def pad(imp, node, a, layers) -> None:
    """Pad with its pads and value as inputs (opset 11 on)."""
    ins = node.input
    pads = [int(p) for p in np.ravel(imp.const[ins[1]])] if len(ins) > 1 and ins[1] in imp.const else None
    value = imp.scalar(ins[2], "padding value") if len(ins) > 2 and ins[2] else 0.0
    _pad(imp, node, a.get("mode", b"constant"), pads, value)


def _reduces_hw(imp, node, a) -> bool:
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1] in imp.const:
        axes = imp.const[node.input[1]].tolist()
    if sorted(int(x) % 4 for x in (axes or [])) != [2, 3]:
        imp.fail(f"ReduceMean {node.name!r} over axes {axes}: only the mean over height and width is imported")
    return True

def _pool(imp, node, a, layers) -> None:
    shape_in = imp.shape_in(node)
    k = imp.ints(a, "kernel_shape", 2, None)
    s = imp.ints(a, "strides", 2, [1, 1])
    pads = imp.pending_pads(imp.ints(a, "pads", 4, [0, 0, 0, 0]))
    if node.op_type == OP["avgpool2d"] and not int(a.get("count_include_pad", 0)) and shape_in is not None and all(
            kk - lo >= size and (size + lo + hi - kk) // ss + 1 == 1
            for size, kk, ss, lo, hi in zip(shape_in[2:], k, s, pads[:2], pads[2:])):
        # one window over all of a smaller input, its padding left out of the mean (GoogLeNet's last pooling, as
        # Caffe2 wrote it): the mean of every position
        layers.append({"type": "global_avgpool2d"})
        imp.flat = True
        return
    emulated = False
    if pads[0] != pads[2] or pads[1] != pads[3]:
        if not _ceil_by_padding(node, a, shape_in, k, s, pads):
            imp.fail(f"{node.op_type} {node.name!r}: asymmetric padding {pads}", "cnnctl pads each side alike")
        pads, emulated = [pads[0], pads[1], pads[0], pads[1]], True  # Caffe's ceil mode, as Caffe2 writes it
    if any(d != 1 for d in imp.ints(a, "dilations", 2, [1, 1])):
        imp.fail(f"{node.op_type} {node.name!r}: dilated pooling is not imported")
    if any(2 * p > kk for p, kk in zip(pads[:2], k)):
        imp.fail(f"{node.op_type} {node.name!r}: padding {pads[:2]} is more than half the kernel {k}")
    spec = {"type": "maxpool2d" if node.op_type == OP["maxpool2d"] else "avgpool2d", "kernel_size": pair(k)}
    if s != k:
        spec["stride"] = pair(s)
    if pads[0] or pads[1]:
        spec["padding"] = pair(pads[:2])
    if (emulated or int(a.get("ceil_mode", 0))) and shape_in is not None and any(
            (size + 2 * p - kk) % ss for size, kk, ss, p in zip(shape_in[2:], k, s, pads[:2])):
        spec["ceil_mode"] = True  # only where it changes the size: the config stays as plain as it can
    if node.op_type == OP["avgpool2d"] and any(pads[:2]) and not int(a.get("count_include_pad", 0)):
        spec["count_include_pad"] = False  # ONNX's default, where padding makes it matter
    layers.append(spec)

def _ceil_by_padding(node, a, shape_in, k, s, pads) -> bool:
    """Whether pooling padded more at the bottom and right (less than a stride more) gives what the same pooling,
    padded alike on each side, gives in ceil mode: Caffe's pooling rounds up, and converters from Caffe write that
    as extra padding. For averages only where padding is left out of the mean (ONNX's default), as ceil mode's
    windows past the edge are."""
    if shape_in is None or int(a.get("ceil_mode", 0)) or (node.op_type == OP["avgpool2d"] and
                                                          int(a.get("count_include_pad", 0))):
        return False
    for size, kk, ss, lo, hi in zip(shape_in[2:], k, s, pads[:2], pads[2:]):
        if not 0 <= hi - lo < ss:
            return False
        given = (size + lo + hi - kk) // ss + 1
        ceil = -(-(size + 2 * lo - kk) // ss) + 1
        if (ceil - 1) * ss >= size + lo:  # the last window would start in the padding: ceil mode drops it
            ceil -= 1
        if given != ceil:
            return False
    return True


def _pad(imp, node, mode, pads, value: float) -> None:
    """Zero padding of height and width before a Conv or pooling: its padding (pending until it comes)."""
    pads = imp.ints({"pads": pads}, "pads", 8, None)
    if mode not in (b"constant", "constant") or value != 0 or any(pads[:2]) or any(pads[4:6]):
        imp.fail(f"Pad {node.name!r}: only zero padding of height and width is imported")
    imp.pending = [pads[2], pads[3], pads[6], pads[7]]  # top, left, bottom, right
    consumers = imp.consumers.get(node.output[0], [])
    if len(consumers) != 1 or consumers[0].op_type not in (OP["conv2d"], OP["maxpool2d"], OP["avgpool2d"]):
        imp.fail(f"Pad {node.name!r}: only a Pad before a Conv or pooling is imported (it becomes its padding)")
