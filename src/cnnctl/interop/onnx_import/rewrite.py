"""Rewrite passes: each turns one exporter's spelling of some math into the one form the converters take, on the
graph's node list, before the walk (each a small function with its own test)."""

from __future__ import annotations

import collections

import numpy as np


def fuse_activations(g) -> None:
    """Activations written out in several nodes, one node each: x * (1 + erf(x / sqrt 2)) / 2, as torch (Div,
    Erf, Add, Mul, Mul by 0.5) and cnnctl export (Div, Erf, Add, Mul by 0.5, Mul) write GELU before opset 20's
    Gelu; x * tanh(softplus(x)), as both write Mish before opset 18's Mish."""
    producer = {o: n for n in g.nodes for o in n.output}
    users = collections.defaultdict(list)
    for n in g.nodes:
        for i in n.input:
            users[i].append(n)

    def const_of(node, value) -> str | None:
        """The data input of a binary node whose other input is the constant `value`."""
        if node is None or len(node.input) != 2:
            return None
        a, b = node.input
        for data_in, c in ((a, b), (b, a)):
            if c in g.const and data_in not in g.const and np.size(g.const[c]) == 1 and \
                    abs(float(np.ravel(g.const[c])[0]) - value) < 1e-4:
                return data_in
        return None

    def only_user(t):
        return users[t][0] if len(users[t]) == 1 else None

    for soft in [n for n in g.nodes if n.op_type == "Softplus"]:  # x * tanh(softplus(x)): opset 18's Mish
        tanh = only_user(soft.output[0])
        mul = tanh and only_user(tanh.output[0])
        if tanh is None or tanh.op_type != "Tanh" or mul is None or mul.op_type != "Mul" or \
                sorted(mul.input) != sorted([soft.input[0], tanh.output[0]]):
            continue
        replace(g, [soft, tanh, mul], "Mish", soft.input[0], mul.output[0])
    for erf in [n for n in g.nodes if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        x = None
        if div is not None and div.op_type == "Div" and div.input[1] in g.const:
            x = div.input[0] if abs(float(np.ravel(g.const[div.input[1]])[0]) - 2 ** 0.5) < 1e-4 else None
        elif div is not None and div.op_type == "Mul":
            x = const_of(div, 2 ** -0.5)
        add = only_user(erf.output[0])
        if x is None or add is None or add.op_type != "Add" or const_of(add, 1.0) != erf.output[0]:
            continue
        m1 = only_user(add.output[0])
        if m1 is None or m1.op_type != "Mul":
            continue
        if const_of(m1, 0.5) == add.output[0]:  # (1 + erf) / 2, then x * that
            m2 = only_user(m1.output[0])
            if m2 is None or m2.op_type != "Mul" or sorted(m2.input) != sorted([x, m1.output[0]]):
                continue
        elif sorted(m1.input) == sorted([x, add.output[0]]):  # x * (1 + erf), then / 2
            m2 = only_user(m1.output[0])
            if m2 is None or m2.op_type != "Mul" or const_of(m2, 0.5) != m1.output[0]:
                continue
        else:
            continue
        replace(g, [div, erf, add, m1, m2], "Gelu", x, m2.output[0])

def replace(g, nodes: list, op: str, x: str, out: str) -> None:
    """One `op` node from tensor x to `out` in place of `nodes` (an activation written out in several)."""
    one = g.onnx.helper.make_node(op, [x], [out], name=nodes[0].name or nodes[-1].name)
    drop = {id(n) for n in nodes}
    at = min(k for k, n in enumerate(g.nodes) if id(n) in drop)
    g.nodes = [n for n in g.nodes if id(n) not in drop]
    g.nodes.insert(at, one)

# ---------------------------------------------------------------- the walk

