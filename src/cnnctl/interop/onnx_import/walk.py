"""The walk: from the input, a chain of single-input nodes becomes a list of layers, each node by its converter
(convert.py); where a tensor feeds several branches that meet again, the branches become a container by the node
that joins them (Add: `residual`, Concat on channels: `concat`, Mul: `gate` or SiLU), nested at most MAX_NESTING
deep."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from . import convert, pooling  # noqa: F401  the converters register themselves
from .converting import Converting
from .graph import attrs, layer_types
from .operators import ADD, CONCAT, JOINS, LATER, MUL, converter_for
from .rewrite import PASSES

MAX_FOLD_ROUNDS = 64  # shape inference again with what folded: torch's x.chunk needs a round for each unit
MAX_NESTING = 24  # branches inside branches: a config nests at most 64 levels and each join nests its branch two deeper


@dataclass
class Imported:
    """The result: the model's layer specs, its input shape, the weights by state-dict name, what the graph
    ended with, and what was mapped."""

    input_shape: tuple[int, int, int]
    layers: list[dict]
    weights: dict[str, np.ndarray]
    final: str | None  # "softmax" or "log_softmax" when the graph ended in one
    opset: int
    tensors_mapped: int = 0
    normalization: dict | None = None  # a leading Sub and Div (cnnctl export writes them): mean and std


def import_model(model, source: str = "the graph", input_size: tuple[int, int] | None = None) -> Imported:
    """Map an ONNX ModelProto onto cnnctl layer specs and weights (see the package's docstring); `input_size`
    (H, W) pins a graph's dynamic height and width."""
    return _Importer(model, source, input_size).run()


class _Importer(Converting):
    """The walk's state (the nodes visited, the nesting depth) over what converters use (Converting)."""

    def __init__(self, model, source: str, input_size: tuple[int, int] | None = None):
        super().__init__(model, source, input_size)
        self.visited: set[int] = set()
        self.depth = 0

    def _check_operators(self) -> None:
        """Every node that carries data (after folding) must be one cnnctl maps: all others in one message."""
        unknown = collections.defaultdict(list)
        for node in self.nodes:
            if node.domain not in ("", "ai.onnx", "cnnctl") or converter_for(node.op_type, self.opset) is None and \
                    node.op_type not in JOINS:
                op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
                unknown[op].append(node.name or node.output[0])
        if unknown:
            listed = "; ".join(f"{op}{f' ({LATER[op]})' if op in LATER else ''} x{len(names)}, e.g. node "
                               f"{names[0]!r}" for op, names in sorted(unknown.items()))
            self.fail(f"operators cnnctl cannot import: {listed}",
                      "export the network without them, or with layers cnnctl has (docs/transfer.md lists them)")

    def run(self) -> Imported:
        name, chw = self._input()
        self.input, self.input_chw = name, chw
        self.batch_free_reshapes()
        self.shapes = self._shapes(name, chw)
        self._fold(self.shapes)
        for _ in range(MAX_FOLD_ROUNDS):  # a folded bound can fix a shape that lets more fold (torch's x.chunk)
            if not any(n.output and n.output[0] not in self.shapes and n.output[0] not in self.const and
                       any(i in self.const for i in n.input[1:]) for n in self.graph.node):
                break  # no node of unknown shape takes a folded operand: inference would learn nothing new
            shapes = self._shapes(name, chw)
            if shapes == self.shapes:
                break
            self.shapes = shapes
            self._fold(shapes)
        self.nodes = [n for n in self.graph.node if n.output[0] not in self.const]
        for rewrite in PASSES:
            rewrite(self)
        self._check_operators()
        self.consumers = collections.defaultdict(list)
        for n in self.nodes:
            for i in self.data_inputs(n):
                self.consumers[i].append(n)
        self.output = self.graph.output[0].name
        self.flat = False  # cnnctl's tensor is (C,) where the graph's is (N, C, 1, 1) after a global pooling
        layers: list[dict] = []
        end = self._drive(self._walk(name, layers))
        if end != self.output:
            self.fail(f"the walk from the input stopped at tensor {end!r}, not at the output {self.output!r}")
        unused = [n for n in self.nodes if id(n) not in self.visited]
        if unused:
            self.fail(f"{len(unused)} nodes do not lie between the input and the output "
                      f"(e.g. {unused[0].op_type} {unused[0].name!r})")
        return Imported(chw, layers, self.weights, self.final, self.opset, len(self.used), self.normalization)

    def _is_join(self, node) -> bool:
        return len(self.data_inputs(node)) > 1

    @staticmethod
    def _drive(walk):
        """Run the walk without recursion: _walk, _fork and _fork_at are generators that hand a call they need
        (a branch's walk, a fork in it) up as (function, arguments) and are sent its result; the calls wait on an
        explicit stack, so a graph of any depth costs no Python stack (nesting is bounded by MAX_NESTING, the
        depth a config may have, and said so)."""
        stack, value = [walk], None
        try:
            while stack:
                try:
                    call = stack[-1].send(value)
                except StopIteration as done:
                    stack.pop()
                    value = done.value
                    continue
                function, args = call
                stack.append(function(*args))
                value = None
        finally:
            for pending in reversed(stack):  # an error: the waiting calls closed (their finally blocks run)
                pending.close()
        return value

    def _walk(self, t: str, layers: list[dict]):
        """Convert from tensor t on, appending to layers, up to a tensor that feeds a join (or the output); a
        generator run by _drive, its value the tensor where it stopped."""
        while True:
            cons = self.consumers.get(t, [])
            if t == self.output and not cons:
                return t
            if not cons:
                self.fail(f"tensor {t!r} is used by nothing and is not the output")
            if len(cons) == 1 and self._is_join(cons[0]):
                return t
            if len(cons) == 1:
                node = cons[0]
                self.visited.add(id(node))
                self._convert(node, layers)
                t = node.output[0]
                continue
            t = yield self._fork, (t, cons, layers)

    def _fork(self, t: str, cons: list, layers: list[dict]):
        if self.depth >= MAX_NESTING:
            self.fail(f"branches nested more than {MAX_NESTING} deep at tensor {t!r} (a join inside a join's "
                      "branch, and so on)", "no published classifier nests so deep; the file is damaged or hostile")
        self.depth += 1
        try:
            return (yield self._fork_at, (t, cons, layers))
        finally:
            self.depth -= 1

    def _fork_at(self, t: str, cons: list, layers: list[dict]):
        branches, ends, joins, flat, flats = [], [], {}, self.flat, []
        for c in cons:
            self.flat = flat  # every branch starts from the fork's tensor
            if self._is_join(c):  # the input itself joins
                branches.append([])
                ends.append(t)
                flats.append(flat)
                joins[id(c)] = c
                continue
            own: list[dict] = []
            self.visited.add(id(c))
            self._convert(c, own)
            end = yield self._walk, (c.output[0], own)
            ends.append(end)
            branches.append(own)
            flats.append(self.flat)  # whether the branch ended in one value per channel
            for j in self.consumers.get(end, [None])[:1]:
                joins[id(j)] = j
        if len(joins) != 1 or None in joins.values():
            self.fail(f"tensor {t!r} feeds {len(cons)} branches that do not meet in one Add or Concat node",
                      "cnnctl imports branches that rejoin (residual units, concatenations)")
        (join,) = joins.values()
        self.visited.add(id(join))
        inputs = self.data_inputs(join)
        if sorted(ends) != sorted(inputs):
            self.fail(f"node {join.name!r} ({join.op_type}) joins tensors from outside the branches of {t!r}")
        by_input = [branches[ends.index(i)] for i in inputs]
        if join.op_type == ADD and len(by_input) == 2:
            a, b = by_input
            body, shortcut = (a, b) if len(a) >= len(b) else (b, a)  # the longer branch is the body
            layers.append({"type": "residual", "body": body, "shortcut": shortcut or "identity"})
        elif join.op_type == MUL and sorted(map(layer_types, by_input)) == [[], ["sigmoid"]]:  # x * sigmoid(x)
            self.flat = flat
            self.activation(layers, "silu")
        elif join.op_type == MUL and len(by_input) == 2 and [] in by_input and not flat \
                and all(f for f, b in zip(flats, branches) if b):
            layers.append({"type": "gate", "branch": by_input[0] or by_input[1]})  # x * g(x), g per channel
        elif join.op_type == CONCAT and int(attrs(join).get("axis", 1)) in (1, -3) and not self.flat:
            layers.append({"type": "concat", "branches": by_input})
        else:
            self.fail(f"node {join.name!r} joins {len(inputs)} branches with {join.op_type}, which cnnctl cannot "
                      "import", "cnnctl joins branches by Add (residual), Concat on channels and Mul (x * sigmoid(x), "
                      "or squeeze-and-excitation gating)")
        self.flat = flat  # a join gives what came in: feature maps stay feature maps
        return join.output[0]

    # ---------------------------------------------------------------- single nodes

    def _convert(self, node, layers: list[dict]) -> None:
        """One node by its operator's converter (operators.CONVERTERS)."""
        self.node = node
        converter = converter_for(node.op_type, self.opset)
        if converter is None:
            what = LATER.get(node.op_type)
            self.fail(f"node {node.name!r}: {node.op_type}" + (f" ({what})" if what else "") +
                      " is not imported by cnnctl yet", "export the network without it")
        converter(self, node, attrs(node), layers)
