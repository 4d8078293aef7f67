"""The walk: from the input, a chain of single-input nodes becomes a list of layers, each node by its converter
(convert.py); where a tensor feeds several branches that meet again, the branches become a container by the node
that joins them (Add: `residual`, Concat on channels: `concat`, Mul: `gate` or SiLU), nested at most MAX_NESTING
deep."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from .convert import CONVERTERS, JOINS, LATER
from .graph import Graph, attrs, layer_types
from .rewrite import PASSES

MAX_NESTING = 24  # branches inside branches: a config nests at most 64 levels and each join nests its branch two deeper
# activations cnnctl layers may apply themselves (conv2d, dense, batchnorm, residual: `activation:`)
FOLDABLE = {"relu", "sigmoid", "tanh", "relu6", "hardsigmoid", "hardswish", "silu", "gelu", "mish"}


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


class _Importer(Graph):
    """The walk's state: the layers' weights under provisional keys, the tensors used, what the graph ends with,
    the nodes visited, a Pad waiting for the Conv or pooling after it, the nesting depth, whether the tensor at
    hand is flat (cnnctl's (N, C) where the graph's is (N, C, 1, 1) after a global pooling)."""

    def __init__(self, model, source: str, input_size: tuple[int, int] | None = None):
        super().__init__(model, source, input_size)
        self.weights: dict[str, np.ndarray] = {}
        self.used: set[str] = set()
        self.final: str | None = None
        self.normalization: dict | None = None
        self.visited: set[int] = set()
        self.pending: list[int] | None = None
        self.depth = 0
        self.flat = False
        self.node = None
        self.hwc: tuple | None = None  # (C, H, W) of maps transposed to NHWC before the flatten (tf2onnx)

    def _check_operators(self) -> None:
        """Every node that carries data (after folding) must be one cnnctl maps: all others in one message."""
        unknown = collections.defaultdict(list)
        for node in self.nodes:
            if node.domain not in ("", "ai.onnx", "cnnctl") or node.op_type not in CONVERTERS and \
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

    def data_inputs(self, node) -> list[str]:
        return [i for i in node.input if i and i not in self.const]

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
        if join.op_type == "Add" and len(by_input) == 2:
            a, b = by_input
            body, shortcut = (a, b) if len(a) >= len(b) else (b, a)  # the longer branch is the body
            layers.append({"type": "residual", "body": body, "shortcut": shortcut or "identity"})
        elif join.op_type == "Mul" and sorted(map(layer_types, by_input)) == [[], ["sigmoid"]]:  # x * sigmoid(x)
            self.flat = flat
            self.activation(layers, "silu")
        elif join.op_type == "Mul" and len(by_input) == 2 and [] in by_input and not flat \
                and all(f for f, b in zip(flats, branches) if b):
            layers.append({"type": "gate", "branch": by_input[0] or by_input[1]})  # x * g(x), g per channel
        elif join.op_type == "Concat" and int(attrs(join).get("axis", 1)) in (1, -3) and not self.flat:
            layers.append({"type": "concat", "branches": by_input})
        else:
            self.fail(f"node {join.name!r} joins {len(inputs)} branches with {join.op_type}, which cnnctl cannot "
                      "import", "cnnctl joins branches by Add (residual), Concat on channels and Mul (x * sigmoid(x), "
                      "or squeeze-and-excitation gating)")
        self.flat = flat  # a join gives what came in: feature maps stay feature maps
        return join.output[0]

    # ---------------------------------------------------------------- single nodes

    def shape_in(self, node) -> tuple | None:
        """The shape of the node's (first) data input, the batch as BATCH; None where it is not known."""
        data = self.data_inputs(node)
        return self.shapes.get(data[0]) if data else None

    def where(self) -> str:
        return f"node {self.node.name or self.node.output[0]!r} ({self.node.op_type})"

    def param(self, name: str, role: str = "weight", ndim: int | None = None, shape: tuple | None = None) \
            -> np.ndarray:
        """The constant tensor `name` that the current node takes as its `role`, checked: a constant, of `ndim`
        dimensions or of `shape`, every value finite."""
        if name not in self.const:
            self.fail(f"{self.where()}: its {role} {name!r} is not a constant tensor of the file",
                      "cnnctl imports networks whose weights are stored in the file")
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.asarray(self.const[name], np.float32)
        if ndim is not None and v.ndim != ndim:
            self.fail(f"{self.where()}: its {role} {name!r} has shape {list(v.shape)}; {self.node.op_type} takes a "
                      f"{role} of {ndim} dimensions", "the file is damaged; export it again")
        if shape is not None and v.shape != tuple(shape):
            self.fail(f"{self.where()}: its {role} {name!r} has shape {list(v.shape)}, where {list(shape)} is "
                      "needed", "the file is damaged; export it again")
        if not np.isfinite(v).all():
            self.fail(f"tensor {name!r} (the {role} of {self.where()}) holds NaN or infinite values",
                      "the weights are damaged; export the network again from a trained model")
        self.used.add(name)
        return v

    def scalar(self, name: str, role: str) -> float:
        """A constant input that must be one number (a Clip bound, a Dropout ratio)."""
        if name not in self.const:
            self.fail(f"{self.where()}: its {role} {name!r} is not a constant", "cnnctl imports constant "
                      f"{role}s")
        v = np.asarray(self.const[name])
        if v.size != 1:
            self.fail(f"{self.where()}: its {role} {name!r} has shape {list(v.shape)}; it must be one number",
                      "the file is damaged; export it again")
        return float(v.ravel()[0])

    def ints(self, a: dict, key: str, n: int, default) -> list[int]:
        """An attribute of n integers (strides, pads, kernel_shape of a 2-D operator)."""
        v = a.get(key, default)
        if v is None:
            self.fail(f"{self.where()} lacks its attribute {key!r}")
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        if len(v) != n or not all(isinstance(x, (int, np.integer)) for x in v):
            self.fail(f"{self.where()}: attribute {key!r} is {v}; on images it takes {n} values (integers)",
                      "the file is damaged; export it again")
        if key != "pads" and any(int(x) < 1 for x in v) or key == "pads" and any(int(x) < 0 for x in v):
            self.fail(f"{self.where()}: attribute {key!r} is {v}; each value must be "
                      f"{'0 or more' if key == 'pads' else '1 or more'}", "the file is damaged; export it again")
        return [int(x) for x in v]

    def _convert(self, node, layers: list[dict]) -> None:
        """One node by its operator's converter (convert.CONVERTERS)."""
        self.node = node
        converter = CONVERTERS.get(node.op_type)
        if converter is None:
            what = LATER.get(node.op_type)
            self.fail(f"node {node.name!r}: {node.op_type}" + (f" ({what})" if what else "") +
                      " is not imported by cnnctl yet", "export the network without it")
        converter(self, node, attrs(node), layers)

    def per_channel(self, node) -> bool:
        before, after = self.shapes.get(self.data_inputs(node)[0]), self.shapes.get(node.output[0])
        return before is not None and after is not None and len(before) == 2 and after == (*before, 1, 1)

    def activation(self, layers: list[dict], act: str) -> None:
        """An element-wise activation: the previous layer's `activation:` when it has none, else a layer."""
        last = layers[-1] if layers else None
        if last is not None and act in FOLDABLE and last["type"] in ("conv2d", "dense", "batchnorm", "residual") \
                and last.get("activation") is None:
            last["activation"] = act
        else:
            layers.append({"type": act})

    def last(self, node) -> bool:
        """Whether nothing but Identity nodes stand between node and the graph's output."""
        t = node.output[0]
        while t != self.output:
            cons = self.consumers.get(t, [])
            if len(cons) != 1 or cons[0].op_type != "Identity":
                return False
            t = cons[0].output[0]
        return True

    def weighted(self, layers: list[dict], spec: dict, weight: np.ndarray, ins) -> None:
        """A layer with a weight and, when the node has a third input, a bias (as long as the outputs: Gemm's C
        may be a broadcast scalar), else `bias: false`."""
        tensors = {"weight": np.ascontiguousarray(weight)}
        if len(ins) > 2 and ins[2]:
            b = self.param(ins[2], "bias").ravel()
            if b.size not in (1, weight.shape[0]):
                self.fail(f"{self.where()}: its bias {ins[2]!r} has {b.size} values, where {weight.shape[0]} (one "
                          "per output) are needed", "the file is damaged; export it again")
            tensors["bias"] = np.broadcast_to(b, (weight.shape[0],)).copy()
        else:
            spec["bias"] = False
        self.add_layer(layers, spec, tensors)

    def add_layer(self, layers: list[dict], spec: dict, tensors: dict) -> None:
        """A layer with weights: its tensors are kept under a provisional key, renamed to the state-dict path
        once the whole tree is laid out (emit.lay_out)."""
        key = f"#{len(self.weights)}"
        spec["_path"] = key
        for k, v in tensors.items():
            self.weights[f"{key}.{k}"] = v
        layers.append(spec)

    def flat_for_dense(self, layers: list[dict]) -> None:
        if not self.flat:
            layers.append({"type": "flatten"})
            self.flat = True

    def pending_pads(self, pads: list[int]) -> list[int]:
        extra, self.pending = self.pending, None
        return [p + e for p, e in zip(pads, extra)] if extra else pads


