"""Rewrite passes: each turns one exporter's spelling of some math into the one form the converters take, on the
graph's node list, before the walk (each a small function with its own test)."""

from __future__ import annotations

import collections

import numpy as np

from cnnctl.core.nn import ONNX_OPS as OP

from .graph import reshaped
from .operators import ADD, CHANNEL_SHUFFLE, CHANNEL_SPLIT, CONCAT, LAYERNORM2D, MUL


def fuse_activations(g) -> None:
    """Activations written out in several nodes, one node each: x * (1 + erf(x / sqrt 2)) / 2, as torch (Div,
    Erf, Add, Mul, Mul by 0.5) and cnnctl export (Div, Erf, Add, Mul by 0.5, Mul) write GELU before opset 20's
    Gelu; x * tanh(softplus(x)), as both write Mish before opset 18's Mish."""
    producer, users = _graph_maps(g)

    def only_user(t):
        return users[t][0] if len(users[t]) == 1 else None

    for soft in [n for n in g.nodes if n.op_type == "Softplus"]:  # x * tanh(softplus(x)): opset 18's Mish
        tanh = only_user(soft.output[0])
        mul = tanh and only_user(tanh.output[0])
        if tanh is None or tanh.op_type != OP["tanh"] or mul is None or mul.op_type != MUL or \
                sorted(mul.input) != sorted([soft.input[0], tanh.output[0]]):
            continue
        replace(g, [soft, tanh, mul], OP["mish"], soft.input[0], mul.output[0])
    for erf in [n for n in g.nodes if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        x = None
        if div is not None and div.op_type == "Div" and div.input[1] in g.const:
            x = div.input[0] if abs(float(np.ravel(g.const[div.input[1]])[0]) - 2 ** 0.5) < 1e-4 else None
        elif div is not None and div.op_type == MUL:
            x = _operand(g, div, 2 ** -0.5)
        add = only_user(erf.output[0])
        if x is None or add is None or add.op_type != ADD or _operand(g, add, 1.0) != erf.output[0]:
            continue
        m1 = only_user(add.output[0])
        if m1 is None or m1.op_type != MUL:
            continue
        if _operand(g, m1, 0.5) == add.output[0]:  # (1 + erf) / 2, then x * that
            m2 = only_user(m1.output[0])
            if m2 is None or m2.op_type != MUL or sorted(m2.input) != sorted([x, m1.output[0]]):
                continue
        elif sorted(m1.input) == sorted([x, add.output[0]]):  # x * (1 + erf), then / 2
            m2 = only_user(m1.output[0])
            if m2 is None or m2.op_type != MUL or _operand(g, m2, 0.5) != m1.output[0]:
                continue
        else:
            continue
        replace(g, [div, erf, add, m1, m2], OP["gelu"], x, m2.output[0])

def replace(g, nodes: list, op: str, x: str, out: str, **attrs) -> None:
    """One `op` node from tensor x to `out` in place of `nodes` (an activation written out in several)."""
    replace_nodes(g, nodes, g.onnx.helper.make_node(op, [x], [out], name=nodes[0].name or nodes[-1].name, **attrs))


def sum_to_add(g) -> None:
    """Sum, the n-ary add older exporters (Caffe2's model zoo) write for a residual join: Identity for one input,
    Add for two, a chain of Adds for more."""
    for node in [n for n in g.nodes if n.op_type == "Sum"]:
        ins = [i for i in node.input if i]
        if len(ins) <= 2:
            node.op_type = "Identity" if len(ins) == 1 else ADD
            continue
        chain, last = [], ins[0]
        for k, x in enumerate(ins[1:]):
            out = node.output[0] if k == len(ins) - 2 else f"{node.output[0]}/sum{k}"
            chain.append(g.onnx.helper.make_node(ADD, [last, x], [out], name=f"{node.name}/sum{k}"))
            last = out
        at = next(k for k, n in enumerate(g.nodes) if n is node)
        g.nodes[at:at + 1] = chain


def one_input_concat(g) -> None:
    """A Concat of one tensor (torch's DenseNet concatenates a one-element list first) is that tensor."""
    for node in g.nodes:
        if node.op_type == CONCAT and len([i for i in node.input if i]) == 1:
            node.op_type = "Identity"
            del node.attribute[:]


def _per_channel(value, channels: int) -> np.ndarray | None:
    """A constant as one value per channel of an (N, C, H, W) tensor it broadcasts onto, or None."""
    v = np.asarray(value, np.float64)
    if v.size == 1:
        return np.full(channels, float(v.ravel()[0]))
    while v.ndim > 3 and v.shape[0] == 1:
        v = v[0]
    if v.ndim == 3 and v.shape == (channels, 1, 1):
        return v.ravel()
    return None


def affine_into_layer(g) -> None:
    """A Mul by a per-channel constant, or an Add of one (each through Unsqueeze or broadcast shapes, folded to
    constants before this pass), right after a BatchNormalization (Caffe's Scale layer, as Caffe2's zoo and other
    converters write it: s * (gamma x^ + beta) + t) or a convolution (s * (w * x + b) + t): folded into its scale
    and bias, or its weights and bias. The Mul and the Add become Identity nodes."""
    producer, users = _graph_maps(g)
    for node in [n for n in g.nodes if n.op_type in (MUL, ADD)]:
        data = [i for i in node.input if i not in g.const]
        const = [i for i in node.input if i in g.const]
        if len(data) != 1 or len(const) != 1:
            continue
        source = producer.get(data[0])
        while source is not None and source.op_type == "Identity" and len(users[source.output[0]]) == 1:
            source = producer.get(source.input[0])  # an earlier Mul folded already
        if source is None or len(users[data[0]]) != 1:
            continue
        if source.op_type == OP["batchnorm2d"] and all(i in g.const for i in source.input[1:3]):
            _fold_into(g, node, source, const[0], scale_at=1, bias_at=2)
        elif source.op_type == OP["conv2d"] and source.input[1] in g.const and \
                (len(source.input) < 3 or not source.input[2] or source.input[2] in g.const):
            _fold_into(g, node, source, const[0], scale_at=1, bias_at=2)


def _fold_into(g, node, source, const: str, scale_at: int, bias_at: int) -> None:
    """The per-channel product or sum `node` folded into `source`'s scale (or weights: channels first) and bias."""
    scale = np.asarray(g.const[source.input[scale_at]], np.float64)
    channels = scale.shape[0]
    has_bias = len(source.input) > bias_at and bool(source.input[bias_at])
    bias = np.asarray(g.const[source.input[bias_at]], np.float64) if has_bias else np.zeros(channels)
    v = _per_channel(np.asarray(g.const[const], np.float64), channels)
    if v is None:
        return
    if node.op_type == MUL:
        scale, bias = scale * v.reshape((-1,) + (1,) * (scale.ndim - 1)), bias * v
    else:
        bias = bias + v
    while len(source.input) <= bias_at:
        source.input.append("")
    for k, value in ((scale_at, scale), (bias_at, bias)):
        name = f"{source.name or source.output[0]}/folded{k}"  # a second fold into it replaces the first's
        g.const[name] = value.astype(np.float32)
        source.input[k] = name
    node.op_type = "Identity"
    node.input[:] = [node.input[0] if node.input[0] not in g.const else node.input[1]]
    del node.attribute[:]


def channel_shuffle(g) -> None:
    """Reshape to (N, groups, C / groups, H, W), Transpose (0, 2, 1, 3, 4), Reshape back to (N, C, H, W), as
    ShuffleNet's exporters write the channel shuffle: one `channel_shuffle` node (domain cnnctl)."""
    producer, users = _graph_maps(g)
    for t in [n for n in g.nodes if n.op_type == "Transpose"]:
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        first, after = producer.get(t.input[0]), users.get(t.output[0], [])
        if perm != [0, 2, 1, 3, 4] or first is None or first.op_type != "Reshape" or len(after) != 1 or \
                after[0].op_type != "Reshape" or len(users[first.output[0]]) != 1:
            continue
        last, shape = after[0], g.shapes.get(first.input[0])
        grid = g.out_shape(first)
        if shape is None or len(shape) != 4 or grid is None or len(grid) != 5:
            continue
        back = g.shapes.get(last.output[0])
        if back is None and len(last.input) > 1 and last.input[1] in g.const:  # from the folded target
            back = reshaped(np.ravel(g.const[last.input[1]]).astype(np.int64).tolist(),
                            (grid[0], grid[2], grid[1], *grid[3:]))
        if back is None:
            continue
        n, c, h, w = shape
        if len(grid) != 5 or grid[0] != n or grid[1] * grid[2] != c or tuple(grid[3:]) != (h, w) or \
                tuple(back) != tuple(shape):
            continue
        node = g.onnx.helper.make_node(CHANNEL_SHUFFLE, [first.input[0]], [last.output[0]], domain="cnnctl",
                                       name=t.name or last.name, groups=int(grid[1]))
        replace_nodes(g, [first, t, last], node)


def concat_chains(g) -> None:
    """Concats of every feature so far (torchvision's DenseNet: each layer concatenates the block's input and every
    earlier layer's output): each becomes the Concat of the longest earlier one its inputs begin with, and what
    follows, so that the walk sees each layer as a branch beside the features that are passed on."""
    def axis(n):
        return next((a.i for a in n.attribute if a.name == "axis"), None)

    seen: list[tuple[tuple, str]] = []  # the original inputs of each channel Concat, and its output
    for node in [n for n in g.nodes if n.op_type == CONCAT and axis(n) in (1, -3)]:
        ins = tuple(i for i in node.input if i)
        prefix = max(((p, out) for p, out in seen if 1 < len(p) < len(ins) and ins[:len(p)] == p),
                     key=lambda po: len(po[0]), default=None)
        seen.append((ins, node.output[0]))
        if prefix is not None:
            del node.input[:]
            node.input.extend([prefix[1], *ins[len(prefix[0]):]])


def channel_split(g) -> None:
    """A Split on the channels into equal parts (torch's x.chunk(2, dim=1), ShuffleNetV2's halves): one
    `ChannelSplit` node (domain cnnctl) per part, each taking the whole input, so that the walk sees a fork whose
    branches each take their part."""
    for node in [n for n in g.nodes if n.op_type == "Split"]:
        a = {x.name: g.onnx.helper.get_attribute_value(x) for x in node.attribute}
        rank = len(g.shapes.get(node.input[0]) or ())
        axis = int(a.get("axis", 0))
        if axis != 1 and not (rank and axis == 1 - rank):
            continue
        parts = len(node.output)
        if len(node.input) > 1 and node.input[1]:
            sizes = np.ravel(g.const[node.input[1]]).astype(np.int64).tolist() if node.input[1] in g.const else None
        else:
            sizes = list(a["split"]) if "split" in a else [None] * parts
        if sizes is None or len(sizes) != parts or len(set(sizes)) != 1:
            continue  # unequal parts: not a split layer (the converter check names the Split)
        nodes = [g.onnx.helper.make_node(CHANNEL_SPLIT, [node.input[0]], [out], domain="cnnctl",
                                         name=f"{node.name or out}/{k}", parts=parts, take=k)
                 for k, out in enumerate(node.output)]
        at = next(k for k, n in enumerate(g.nodes) if n is node)
        g.nodes[at:at + 1] = nodes


def replace_nodes(g, nodes: list, node) -> None:
    """`node` in place of `nodes` (at the first one's place)."""
    drop = {id(n) for n in nodes}
    at = min(k for k, n in enumerate(g.nodes) if id(n) in drop)
    g.nodes = [n for n in g.nodes if id(n) not in drop]
    g.nodes.insert(at, node)


# single-input element-wise operators that a channels-last chain may hold as they are
ELEMENTWISE = {"Identity", *(OP[tag] for tag in ("gelu", "relu", "sigmoid", "tanh", "mish", "hardswish", "hardsigmoid",
                                                  "elu", "celu", "leaky_relu"))}


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _vector(g, node, t: str) -> tuple[str, np.ndarray] | None:
    """The constant operand of a binary node whose data input is t, as one value per channel (or one number)."""
    if len(node.input) != 2 or t not in node.input:
        return None
    other = node.input[1] if node.input[0] == t else node.input[0]
    if other not in g.const or other == t:
        return None
    v = np.asarray(g.const[other])
    while v.ndim > 1 and v.shape[0] == 1:
        v = v[0]
    return (other, v) if v.ndim <= 1 else None


def _channels_last_link(g, n, t: str) -> bool:
    """Whether node n, taking t, computes along the last axis of a channels-last tensor alone."""
    if n.op_type == OP["layernorm2d"]:
        axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
        return n.input[0] == t and axis in (-1, 3) and not any(n.output[1:])
    if n.op_type == "MatMul":
        return n.input[0] == t and n.input[1] in g.const and np.ndim(g.const[n.input[1]]) == 2
    if n.op_type in (ADD, MUL):
        return _vector(g, n, t) is not None
    return n.op_type in ELEMENTWISE and n.input[0] == t and all(i in g.const for i in n.input[1:] if i)


def channels_last(g) -> None:
    """Transpose to channels last, then layer norms, linear layers (MatMul and Add), per-channel products and sums
    and element-wise activations over the last axis, then a Transpose back (ConvNeXt's block as torch exports
    it; its LayerNorm2d, a LayerNormalization alone between the Transposes): the same math on NCHW, with no
    Transpose: a `LayerNorm2d` node, 1x1 convolutions (the linear layers' weights transposed, their Add as bias),
    per-channel constants of shape (C, 1, 1)."""
    _, users = _graph_maps(g)
    for first in [n for n in g.nodes if n.op_type == "Transpose" and _perm(n) == [0, 2, 3, 1]]:
        chain, t, last = [], first.output[0], None
        while len(users.get(t, [])) == 1:
            n = users[t][0]
            if n.op_type == "Transpose":
                last = n if _perm(n) == [0, 3, 1, 2] else None
                break
            if not _channels_last_link(g, n, t):
                break
            chain.append(n)
            t = n.output[0]
        if last is None or not chain or len(g.shapes.get(first.input[0]) or ()) != 4:
            continue
        _to_channels_first(g, first, chain, last)
        _, users = _graph_maps(g)


def _to_channels_first(g, first, chain: list, last) -> None:
    helper = g.onnx.helper
    made, t, skip = [], first.input[0], set()
    for k, node in enumerate(chain):
        if id(node) in skip:
            continue
        out = last.output[0] if node is chain[-1] else node.output[0]
        if node.op_type == OP["layernorm2d"]:
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            made.append(helper.make_node(LAYERNORM2D, [t, *node.input[1:3]], [out], domain="cnnctl",
                                         name=node.name, epsilon=eps))
        elif node.op_type == "MatMul":
            w = np.asarray(g.const[node.input[1]])
            name = f"{node.input[1]}/1x1"
            g.const[name] = np.ascontiguousarray(w.T.reshape(w.shape[1], w.shape[0], 1, 1))
            ins = [t, name]
            after = chain[k + 1] if k + 1 < len(chain) else None
            bias = _vector(g, after, node.output[0]) if after is not None and after.op_type == ADD else None
            if bias is not None and bias[1].shape == (w.shape[1],):
                ins.append(bias[0])  # the linear layer's bias
                skip.add(id(after))
                out = last.output[0] if after is chain[-1] else after.output[0]
            made.append(helper.make_node(OP["conv2d"], ins, [out], name=node.name, kernel_shape=[1, 1]))
        elif node.op_type in (ADD, MUL):
            const, v = _vector(g, node, next(i for i in node.input if i not in g.const))
            name = f"{const}/chw"
            g.const[name] = np.ascontiguousarray(v.reshape(-1, 1, 1) if v.ndim else v)
            made.append(helper.make_node(node.op_type, [t, name], [out], name=node.name))
        else:
            made.append(helper.make_node(node.op_type, [t, *node.input[1:]], [out], name=node.name,
                                         domain=node.domain))
            made[-1].attribute.extend(node.attribute)
        t = out
    for node in chain:  # the tensors in between, now NCHW
        if node.output[0] in g.shapes and len(g.shapes[node.output[0]]) == 4:
            b, hh, ww, cc = g.shapes[node.output[0]]
            g.shapes[node.output[0]] = (b, cc, hh, ww)
    replace_nodes(g, [first, *chain, last], made[0])
    at = next(k for k, x in enumerate(g.nodes) if x is made[0])
    g.nodes[at + 1:at + 1] = made[1:]


def _graph_maps(g):
    producer = {o: n for n in g.nodes for o in n.output}
    users = collections.defaultdict(list)
    for n in g.nodes:
        for i in n.input:
            users[i].append(n)
    return producer, users


def _operand(g, node, value: float) -> str | None:
    """The data input of a binary node whose other input is the constant `value` (to 1e-4)."""
    if node is None or len(node.input) != 2:
        return None
    a, b = node.input
    for data_in, c in ((a, b), (b, a)):
        if c in g.const and data_in not in g.const and np.size(g.const[c]) == 1 and \
                abs(float(np.ravel(g.const[c])[0]) - value) < 1e-4:
            return data_in
    return None


def _divided_by_six(g, node) -> str | None:
    """The data input of a Div by 6 or a Mul by 1/6."""
    if node is None:
        return None
    if node.op_type == "Div" and node.input[1] in g.const and np.size(g.const[node.input[1]]) == 1 and \
            abs(float(np.ravel(g.const[node.input[1]])[0]) - 6) < 1e-4:
        return node.input[0]
    return _operand(g, node, 1 / 6) if node.op_type == MUL else None


def _clip_bounds(g, node) -> tuple:
    bounds = {a.name: a.f for a in node.attribute if a.name in ("min", "max")}
    for k, key in ((1, "min"), (2, "max")):
        if len(node.input) > k and node.input[k] in g.const and np.size(g.const[node.input[k]]) == 1:
            bounds[key] = float(np.ravel(g.const[node.input[k]])[0])
    return bounds.get("min"), bounds.get("max")


def hard_activations(g) -> None:
    """Hardsigmoid and hardswish written out, as paddle2onnx writes them: Clip(x + 3, 0, 6) / 6 (or * 1/6) is
    hardsigmoid, x times it (the product taken before or after the division) hardswish; x * HardSigmoid(x)
    (alpha 1/6, beta 1/2) is hardswish too."""
    producer, users = _graph_maps(g)

    def only_user(t):
        return users[t][0] if len(users[t]) == 1 else None

    for clip in [n for n in g.nodes if n.op_type == OP["relu6"]]:
        add = producer.get(clip.input[0])
        x = _operand(g, add, 3.0) if add is not None and add.op_type == ADD else None
        if x is None or _clip_bounds(g, clip) != (0.0, 6.0) or only_user(add.output[0]) is not clip:
            continue
        after = only_user(clip.output[0])
        if _divided_by_six(g, after) == clip.output[0]:  # hardsigmoid, then perhaps x times it
            mul = only_user(after.output[0])
            if mul is not None and mul.op_type == MUL and sorted(mul.input) == sorted([x, after.output[0]]):
                replace(g, [add, clip, after, mul], OP["hardswish"], x, mul.output[0])
            else:
                replace(g, [add, clip, after], OP["hardsigmoid"], x, after.output[0], alpha=1 / 6, beta=0.5)
        elif after is not None and after.op_type == MUL and sorted(after.input) == sorted([x, clip.output[0]]):
            div = only_user(after.output[0])
            if _divided_by_six(g, div) == after.output[0]:
                replace(g, [add, clip, after, div], OP["hardswish"], x, div.output[0])
    producer, users = _graph_maps(g)
    for hs in [n for n in g.nodes if n.op_type == OP["hardsigmoid"]]:
        alpha = next((a.f for a in hs.attribute if a.name == "alpha"), 0.2)
        beta = next((a.f for a in hs.attribute if a.name == "beta"), 0.5)
        mul = users[hs.output[0]][0] if len(users[hs.output[0]]) == 1 else None
        if abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6 and mul is not None and mul.op_type == MUL and \
                sorted(mul.input) == sorted([hs.input[0], hs.output[0]]):
            replace(g, [hs, mul], OP["hardswish"], hs.input[0], mul.output[0])


# in this order, before the walk: the one-node forms first; the activations written out in several nodes
# before a per-channel Mul or Add is folded into the layer before it (hardsigmoid's Add of 3 is no bias)
PASSES = [sum_to_add, one_input_concat, concat_chains, channel_split, channel_shuffle, hard_activations,
          fuse_activations, affine_into_layer, channels_last]
