"""One converter per ONNX operator, registered with `@converts("Op")` (operators.py): each appends the node's cnnctl
layer (or folds it into the previous layer's `activation:`), checking its weights and attributes through the
importer (param, scalar, ints name the node in every message). Pooling and padding are pooling.py's."""

from __future__ import annotations

import numpy as np

from cnnctl.core.nn import ONNX_OPS as OP
from cnnctl.interop.export import NORMALIZATION_OPS

from .graph import BATCH, pair, reshaped
from .operators import ADD, CHANNEL_SHUFFLE, CHANNEL_SPLIT, LAYERNORM2D, MUL, converts

# operators that are one cnnctl activation, whatever their attributes
PLAIN_ACTIVATIONS = {OP[tag]: tag for tag in ("relu", "sigmoid", "tanh", "hardswish", "mish")}


@converts(*NORMALIZATION_OPS)
def normalization(imp, node, a, layers) -> None:
    """Sub of a mean, then Div by a std, first of all (as cnnctl export writes them): the data's normalisation."""
    _normalization(imp, node, layers)


@converts(OP["softmax"], OP["log_softmax"])
def final_softmax(imp, node, a, layers) -> None:
    """A final Softmax is left to the loss (cross_entropy); a final LogSoftmax stays, for nll."""
    if not imp.last(node) or int(a.get("axis", -1)) not in (1, -1):
        imp.fail(f"{node.op_type} {node.name!r} inside the network: only a final one is imported")
    imp.final = "softmax" if node.op_type == OP["softmax"] else "log_softmax"
    if node.op_type == OP["log_softmax"]:
        layers.append({"type": "log_softmax"})


@converts("Identity")
def identity(imp, node, a, layers) -> None:
    """Nothing to compute."""


@converts(OP["dropout"], until=11)
def dropout_attribute(imp, node, a, layers) -> None:
    """Dropout with its ratio as an attribute (opset 1-11)."""
    _dropout(imp, node, a.get("ratio", 0.5), layers)


@converts(OP["dropout"], since=12)
def dropout(imp, node, a, layers) -> None:
    """Dropout with its ratio as an input (opset 12 on)."""
    ins = node.input
    _dropout(imp, node, imp.scalar(ins[1], "ratio") if len(ins) > 1 and ins[1] else 0.5, layers)


def _dropout(imp, node, ratio, layers) -> None:
    """A dropout layer where training could use one (the last node's dropout is dropped)."""
    if imp.last(node):
        return
    if not isinstance(ratio, float) or not 0 <= ratio < 1:
        imp.fail(f"{imp.where()}: ratio {ratio}; a dropout rate is one number in [0, 1)")
    layers.append({"type": "dropout", "rate": round(float(ratio), 6)})


@converts(OP["conv2d"])
def conv(imp, node, a, layers) -> None:
    ins, shape_in = node.input, imp.shape_in(node)
    w = imp.param(ins[1], ndim=4)
    if imp.flat:  # a 1x1 convolution on 1x1 maps after a global pooling: a dense layer
        if w.shape[2:] != (1, 1) or int(a.get("group", 1)) != 1 or any(a.get("pads", [])):
            imp.fail(f"Conv {node.name!r} after a global pooling: only a 1x1 convolution (a dense layer) is "
                     "imported there")
        imp.weighted(layers, {"type": "dense", "units": int(w.shape[0])}, w[:, :, 0, 0], ins)
        return
    pads = imp.pending_pads(imp.ints(a, "pads", 4, [0, 0, 0, 0]))
    kernel = imp.ints(a, "kernel_shape", 2, list(w.shape[2:]))
    strides, dilations = imp.ints(a, "strides", 2, [1, 1]), imp.ints(a, "dilations", 2, [1, 1])
    group = a.get("group", 1)
    if kernel != list(w.shape[2:]):
        imp.fail(f"{imp.where()}: attribute 'kernel_shape' is {kernel} but the weight's kernel is "
                 f"{list(w.shape[2:])}", "the file is damaged; export it again")
    if not isinstance(group, int) or group < 1 or w.shape[0] % group or (
            shape_in is not None and w.shape[1] * group != shape_in[1]):
        imp.fail(f"{imp.where()}: attribute 'group' {group} does not fit its weight {list(w.shape)} on "
                 f"{shape_in[1] if shape_in else '?'} input channels (weight channels x group = input "
                 "channels, filters divisible by group)", "the file is damaged; export it again")
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        imp.fail(f"Conv {node.name!r}: auto_pad {a['auto_pad']!r} is not imported",
                 "export with explicit pads (torch does)")
    spec = {"type": "conv2d", "filters": int(w.shape[0]), "kernel_size": pair(w.shape[2:])}
    for key, v in (("stride", pair(strides)), ("dilation", pair(dilations))):
        if v != 1:
            spec[key] = v
    if pads[0] != pads[2] or pads[1] != pads[3]:  # ONNX: top, left, bottom, right; cnnctl: t, b, l, r
        spec["padding"] = [pads[0], pads[2], pads[1], pads[3]]
    elif pads[0] or pads[1]:
        spec["padding"] = pair(pads[:2])
    if group != 1:
        spec["groups"] = group
    imp.weighted(layers, spec, w, ins)


@converts(OP["batchnorm2d"])
def batchnorm(imp, node, a, layers) -> None:
    """The inference form (opset 7-9's `spatial` and `is_test` are that form too)."""
    ins, shape_in = node.input, imp.shape_in(node)
    spec = {"type": "batchnorm"}
    eps = float(a.get("epsilon", 1e-5))
    if abs(eps - 1e-5) > 1e-12:
        spec["eps"] = float(np.float32(eps))
    momentum = 1.0 - float(a.get("momentum", 0.9))
    if abs(momentum - 0.1) > 1e-6:
        spec["momentum"] = round(momentum, 6)
    c = (int(shape_in[1]),) if shape_in is not None and len(shape_in) > 1 else None
    c = c or imp.param(ins[1], "scale", ndim=1).shape
    imp.add_layer(layers, spec, {k: imp.param(ins[i], role, shape=c) for i, k, role in (
        (1, "weight", "scale"), (2, "bias", "bias"), (3, "running_mean", "mean"), (4, "running_var", "var"))})
    if (imp.weights[f"{spec['_path']}.running_var"] < 0).any():
        imp.fail(f"{imp.where()}: its running variance has negative values", "the file is damaged; export it again")


@converts(OP["gelu"])
def gelu(imp, node, a, layers) -> None:
    if a.get("approximate", b"none") not in (b"none", "none"):
        imp.fail(f"Gelu {node.name!r}: the tanh approximation is not imported (cnnctl's gelu is exact)")
    imp.activation(layers, "gelu")


@converts(*PLAIN_ACTIVATIONS)
def plain_activation(imp, node, a, layers) -> None:
    imp.activation(layers, PLAIN_ACTIVATIONS[node.op_type])


@converts(OP["relu6"], until=10)
def clip_attributes(imp, node, a, layers) -> None:
    """Clip with its bounds as attributes (opset 1-10)."""
    _relu6(imp, node, a.get("min"), a.get("max"), layers)


@converts(OP["relu6"], since=11)
def clip(imp, node, a, layers) -> None:
    """Clip with its bounds as inputs (opset 11 on)."""
    ins = node.input
    low = imp.scalar(ins[1], "lower bound") if len(ins) > 1 and ins[1] else None
    high = imp.scalar(ins[2], "upper bound") if len(ins) > 2 and ins[2] else None
    _relu6(imp, node, low, high, layers)


def _relu6(imp, node, low, high, layers) -> None:
    if low != 0 or high != 6:
        imp.fail(f"Clip {node.name!r} to [{low}, {high}]: only Clip to [0, 6] (ReLU6) is imported")
    imp.activation(layers, "relu6")


@converts(OP["hardsigmoid"])
def hardsigmoid(imp, node, a, layers) -> None:
    if abs(float(a.get("alpha", 0.2)) - 1 / 6) > 1e-6 or abs(float(a.get("beta", 0.5)) - 0.5) > 1e-6:
        imp.fail(f"HardSigmoid {node.name!r} with alpha {a.get('alpha', 0.2)}, beta {a.get('beta', 0.5)}: "
                 "only PyTorch's (alpha 1/6, beta 1/2) is imported")
    imp.activation(layers, "hardsigmoid")


@converts(OP["leaky_relu"])
def leaky_relu(imp, node, a, layers) -> None:
    layers.append({"type": "leaky_relu", "negative_slope": float(np.float32(a.get("alpha", 0.01)))})


@converts(OP["elu"], OP["celu"])
def elu(imp, node, a, layers) -> None:
    layers.append({"type": node.op_type.lower(), "alpha": float(np.float32(a.get("alpha", 1.0)))})


@converts(CHANNEL_SHUFFLE)
def channel_shuffle(imp, node, a, layers) -> None:
    """ShuffleNet's Reshape, Transpose, Reshape (rewrite.channel_shuffle makes them this one node)."""
    if node.domain != "cnnctl":
        imp.fail(f"node {node.name!r}: ChannelShuffle is not an ONNX operator", "export the network with ONNX's")
    layers.append({"type": "channel_shuffle", "groups": int(a["groups"])})


@converts(CHANNEL_SPLIT)
def channel_split(imp, node, a, layers) -> None:
    """A part of the channels (rewrite.channel_split: ShuffleNetV2's halves)."""
    layers.append({"type": "split", "parts": int(a["parts"]), "take": int(a["take"])})


@converts(OP["split"], until=9)
def channel_slice_attributes(imp, node, a, layers) -> None:
    """A Slice of the channels, its bounds as attributes (opset 1-9)."""
    starts, ends = (int(v[0]) if len(v) == 1 else None for v in (a.get("starts", []), a.get("ends", [])))
    _channel_slice(imp, starts, ends, list(a.get("axes", [0])), 1, layers)


@converts(OP["split"], since=10)
def channel_slice(imp, node, a, layers) -> None:
    """A Slice of the channels, its bounds as inputs (opset 10 on): one of equal parts of them, as cnnctl export
    writes `split`."""
    ins = node.input
    starts, ends = (int(imp.scalar(ins[k], role)) for k, role in ((1, "starts"), (2, "ends")))
    axes = [int(imp.scalar(ins[3], "axes"))] if len(ins) > 3 and ins[3] else [0]
    steps = int(imp.scalar(ins[4], "steps")) if len(ins) > 4 and ins[4] else 1
    _channel_slice(imp, starts, ends, axes, steps, layers)


def _channel_slice(imp, starts, ends, axes: list, steps: int, layers) -> None:
    shape_in = imp.shape_in(imp.node)
    c = shape_in[1] if shape_in is not None and len(shape_in) > 1 else None
    if starts is None or ends is None or c is None or steps != 1 or axes not in ([1], [1 - len(shape_in)]):
        imp.fail(f"{imp.where()}: only a Slice of the channels (axis 1, step 1) is imported, as a split")
    lo, hi = min(max(starts + c if starts < 0 else starts, 0), c), min(max(ends + c if ends < 0 else ends, 0), c)
    width = hi - lo
    if width <= 0 or c % width or lo % width:
        imp.fail(f"{imp.where()}: channels {lo}..{hi - 1} of {c} are not one of equal parts of them",
                 "cnnctl's split takes one of equal parts of the channels")
    layers.append({"type": "split", "parts": c // width, "take": lo // width})


@converts("Transpose")
def transpose(imp, node, a, layers) -> None:
    """The Transposes tf2onnx writes around a Keras network: NHWC into NCHW at the input (absorbed: the imported
    network takes N x C x H x W images, as every cnnctl network does), and NCHW back into NHWC before the flatten
    of the classifier (the dense layer's weight columns are reordered from H, W, C to C, H, W)."""
    perm = list(a.get("perm", []))
    if node.input[0] == imp.input and perm == [0, 3, 1, 2] and not layers:
        return
    shape_in = imp.shape_in(node)
    if perm == [0, 2, 3, 1] and shape_in is not None and len(shape_in) == 4:
        if imp.flat or shape_in[2:] == (1, 1):
            return  # one value per channel: the order is the same
        imp.hwc = tuple(shape_in[1:])  # C, H, W, for the dense layer after the flatten
        return
    imp.fail(f"{imp.where()}: a Transpose with perm {perm} is not imported (only tf2onnx's NHWC to NCHW at the "
             "input and NCHW to NHWC before the classifier's flatten, and ShuffleNet's channel shuffle)",
             "export the network without it")


def _columns_from_hwc(imp, w: np.ndarray) -> np.ndarray:
    """A dense weight (units, features) whose features come in H, W, C order, reordered to cnnctl's C, H, W."""
    c, h, wd = imp.hwc
    imp.hwc = None
    if w.shape[1] != c * h * wd:
        imp.fail(f"{imp.where()}: its weight takes {w.shape[1]} features after a transpose of {c}x{h}x{wd} maps")
    return np.ascontiguousarray(w.reshape(w.shape[0], h, wd, c).transpose(0, 3, 1, 2).reshape(w.shape))


@converts(LAYERNORM2D)
def layernorm2d(imp, node, a, layers) -> None:
    """ConvNeXt's LayerNorm over the channels (rewrite.channels_last makes the Transposes and the
    LayerNormalization between them this one node)."""
    if node.domain != "cnnctl":
        imp.fail(f"node {node.name!r}: LayerNorm2d is not an ONNX operator", "export the network with ONNX's")
    shape_in = imp.shape_in(node)
    c = (shape_in[1],) if shape_in is not None and len(shape_in) in (2, 4) else None
    weight = imp.param(node.input[1], "scale", shape=c)
    bias = imp.param(node.input[2], "bias", shape=weight.shape) if len(node.input) > 2 and node.input[2] else \
        np.zeros_like(weight)
    eps = float(str(np.float32(a.get("epsilon", 1e-5))))
    imp.add_layer(layers, {"type": "layernorm2d", "eps": eps}, {"weight": weight, "bias": bias})


@converts(OP["lrn"])
def lrn(imp, node, a, layers) -> None:
    """Local response normalisation across channels (AlexNet, GoogLeNet): ONNX's window, size channels."""
    size = a["size"]  # a required attribute (read.py)
    values = {"alpha": a.get("alpha", 1e-4), "beta": a.get("beta", 0.75), "k": a.get("bias", 1.0)}
    if size < 1 or any(not np.isfinite(v) or v <= 0 for v in values.values()):
        imp.fail(f"{imp.where()}: size {size}, alpha, beta and bias {list(values.values())}: each must be positive",
                 "the file is damaged; export it again")
    # attributes are float32: each as the shortest decimal that is that float32 (0.7, not 0.699999988)
    layers.append({"type": "lrn", "size": int(size), **{k: float(str(np.float32(v))) for k, v in values.items()}})


@converts(OP["flatten"])
def flatten(imp, node, a, layers) -> None:
    if int(a.get("axis", 1)) != 1:
        imp.fail(f"Flatten {node.name!r} with axis {a.get('axis')}: only axis 1 is an image classifier's")
    imp.flat_for_dense(layers)


@converts("Unsqueeze")
def unsqueeze(imp, node, a, layers) -> None:
    if not (imp.flat and imp.per_channel(node)):
        imp.fail(f"node {node.name!r}: Unsqueeze of feature maps is not imported by cnnctl yet",
                 "export the network without it")
    # (N, C) -> (N, C, 1, 1) before a gate's Mul: cnnctl's gate broadcasts (N, C) itself


@converts("Reshape")
def reshape(imp, node, a, layers) -> None:
    if imp.flat and imp.per_channel(node):
        return  # (N, C) -> (N, C, 1, 1) before a gate's Mul: cnnctl's gate broadcasts (N, C) itself
    target = imp.shapes.get(node.output[0])
    shape_in, given = imp.shape_in(node), imp.const.get(node.input[1]) if len(node.input) > 1 else None
    if imp.batch_one and shape_in is not None and given is not None and np.size(given) == 2 and \
            int(np.ravel(given)[0]) == 1 and int(np.ravel(given)[1]) in (-1, int(np.prod(shape_in[1:]))):
        target = (BATCH, int(np.prod(shape_in[1:])))  # (1, features) in a graph whose batch is fixed at 1: a flatten
    if target is None and given is not None and shape_in is not None:  # shape inference left it: from the constant
        target = reshaped(np.ravel(given).astype(np.int64).tolist(), shape_in)
    if target is None or len(target) != 2 or target[0] != BATCH:
        imp.fail(f"Reshape {node.name!r} to {target}: only a flatten to (N, features) is imported "
                 "(a reshape that depends on the batch or keeps feature maps cannot be)")
    imp.flat_for_dense(layers)


@converts(OP["dense"])
def gemm(imp, node, a, layers) -> None:
    ins, shape_in = node.input, imp.shape_in(node)
    if float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0 or int(a.get("transA", 0)):
        imp.fail(f"Gemm {node.name!r}: alpha, beta other than 1 or transA are not imported")
    w = imp.param(ins[1], ndim=2)
    w = w if int(a.get("transB", 0)) else w.T
    if shape_in is not None and len(shape_in) == 2 and w.shape[1] != shape_in[1]:
        imp.fail(f"{imp.where()}: its weight takes {w.shape[1]} features but {shape_in[1]} arrive",
                 "the file is damaged; export it again")
    imp.flat_for_dense(layers)
    if imp.hwc is not None:
        w = _columns_from_hwc(imp, w)
    imp.weighted(layers, {"type": "dense", "units": int(w.shape[0])}, w, ins)


@converts("MatMul")
def matmul(imp, node, a, layers) -> None:
    w = np.ascontiguousarray(imp.param(node.input[1], ndim=2).T)
    imp.flat_for_dense(layers)
    if imp.hwc is not None:
        w = _columns_from_hwc(imp, w)
    imp.add_layer(layers, {"type": "dense", "units": int(w.shape[0]), "bias": False}, {"weight": w})


def _channel_values(imp, name: str, role: str) -> np.ndarray:
    """A constant operand as one value per channel of the node's data input (N, C, ...): of shape (C, 1, 1),
    (1, C, 1, 1), (C,) on (N, C), or one number for every channel."""
    shape_in = imp.shape_in(imp.node)
    value = imp.param(name, role)
    c = shape_in[1] if shape_in is not None and len(shape_in) >= 2 else None
    v = value
    while v.ndim > (len(shape_in) - 1 if shape_in else 1) and v.shape[0] == 1:
        v = v[0]
    if c is not None and v.size == 1:
        return np.full(c, float(v.ravel()[0]), np.float32)
    if c is not None and v.shape[:1] == (c,) and all(d == 1 for d in v.shape[1:]):
        return np.ascontiguousarray(v.reshape(c))
    imp.fail(f"{imp.where()}: its constant {name!r} of shape {list(value.shape)} is not one value per channel of "
             f"its input {list(shape_in) if shape_in else '?'}", "cnnctl imports per-channel products and sums")


@converts(MUL)
def constant_mul(imp, node, a, layers) -> None:
    """A product with a per-channel constant (one data input: products of branches are the walk's joins):
    a `scale` layer, whose bias an Add right after it gives (a batchnorm before it takes both, rewrite.py)."""
    const = [i for i in node.input if i in imp.const]
    weight = _channel_values(imp, const[0], "factor")
    imp.add_layer(layers, {"type": "scale", "bias": False}, {"weight": weight})


def constant_add(imp, node, a, layers) -> None:
    """A constant added (one data input: joins of branches are the walk's): the bias of the MatMul or the scale
    before it, else a `scale` layer with factors of 1."""
    const = [i for i in node.input if i in imp.const]
    last = layers[-1] if layers else None
    if last is not None and last["type"] == "dense" and last.get("bias") is False and const:
        b = imp.param(const[0], "bias").ravel()
        if b.shape == (last["units"],):
            del last["bias"]
            imp.weights[last["_path"] + ".bias"] = b
            return
    bias = _channel_values(imp, const[0], "bias")
    if last is not None and last["type"] == "scale" and last.get("bias") is False:
        del last["bias"]
        imp.weights[last["_path"] + ".bias"] = bias
        return
    imp.add_layer(layers, {"type": "scale"}, {"weight": np.ones_like(bias), "bias": bias})


converts(ADD)(constant_add)  # Add also joins branches: JOINS


# ---------------------------------------------------------------- the converters' helpers


def _normalization(imp, node, layers) -> None:
    """Sub(input, mean) then Div(., std), first of all (as cnnctl export writes them): the normalisation."""
    const = [i for i in node.input if i in imp.const]
    first = imp.data_inputs(node) == [imp.input] if node.op_type == NORMALIZATION_OPS[0] else \
        imp.normalization is not None and "std" not in imp.normalization and not layers
    if layers or not const or node.input[0] in imp.const or not first:
        imp.fail(f"{node.op_type} {node.name!r}: only a normalisation at the input (Sub of a mean, then Div "
                  "by a std) is imported")
    value = _per_channel_values(imp, node, np.asarray(imp.const[const[0]], np.float64))
    imp.used.add(const[0])
    if node.op_type == NORMALIZATION_OPS[0]:
        imp.normalization = {"mean": value}
    else:
        imp.normalization["std"] = value

def _per_channel_values(imp, node, value: np.ndarray) -> list[float]:
    """A normalisation constant as one value per channel (or one for all): a constant broadcast over height
    and width (a per-channel mean written as an image) is reduced to its channels; one that varies across the
    pixels is refused (cnnctl normalises per channel), never dropped."""
    c, h, w = imp.input_chw
    if value.size == 1:
        return [float(value.ravel()[0])]
    while value.ndim > 3 and value.shape[0] == 1:
        value = value[0]
    if value.ndim == 1 and value.shape[0] == w and w != c:
        value = value.reshape(1, 1, w)
    if value.ndim > 3 or value.ndim == 0:
        imp.fail(f"{imp.where()}: its constant has shape {list(value.shape)}; a normalisation is one value "
                  "per channel")
    value = value.reshape((1,) * (3 - value.ndim) + value.shape)
    if value.shape[0] not in (1, c) or value.shape[1] not in (1, h) or value.shape[2] not in (1, w):
        imp.fail(f"{imp.where()}: its constant of shape {list(value.shape)} does not fit the input "
                  f"{[c, h, w]}")
    if not np.isfinite(value).all() or (node.op_type == NORMALIZATION_OPS[1] and (value <= 0).any()):
        imp.fail(f"{imp.where()}: its constant holds values that are not finite"
                  + (" or not positive" if node.op_type == NORMALIZATION_OPS[1] else ""))
    if (value != value[:, :1, :1]).any():
        imp.fail(f"{imp.where()}: its constant varies per pixel (shape {list(value.shape)}); cnnctl "
                  "normalises per channel and cannot take a per-pixel mean or std",
                  "give the per-channel values with --mean and --std, or export the network without its "
                  "normalisation")
    return value[:, 0, 0].tolist()
