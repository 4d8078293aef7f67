"""ONNX import: an image classifier's graph (torch.onnx.export, tf2onnx, a model zoo) to a cnnctl config and its
weights (the optional `onnx` extra).

The graph is read as data (protobuf; nothing in it runs). Its one input must be N x C x H x W with C, H and W
fixed; every tensor's shape is then known, with the batch as a marker value, so that the Shape / Gather /
Unsqueeze / Concat / Reshape chains torch emits for a flatten fold into constants. The nodes that carry data are
walked from the input: a chain of single-input nodes becomes a list of layers; where a tensor feeds several
branches that meet again, the branches become a container by the node that joins them (Add: `residual`, Concat
on channels: `concat`), recursively. Conv + BatchNormalization + Relu stay three cnnctl layers (conv2d, batchnorm
with its activation), so the weights map one to one and fine-tuning updates the batchnorm statistics as PyTorch
does.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnctl.errors import CnnctlError

from .onnx_read import ModelError, check_generated, onnx_modules, opset_of, read_model

BATCH = 7919  # the batch size the shapes are computed with: a prime no real dimension is likely to equal
MAX_NESTING = 24  # branches inside branches: a config nests at most 64 levels and each join nests its branch two deeper

# the data-carrying operators this importer maps onto cnnctl layers; constant-only ones fold away
LAYER_OPS = {"Sub", "Div", "Conv", "BatchNormalization", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Celu",
             "Clip", "HardSigmoid", "HardSwish", "Mul", "Gelu", "Mish",
             "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Gemm", "MatMul", "Add",
             "Concat", "Dropout", "Identity", "Pad", "Softmax", "LogSoftmax", "Unsqueeze"}
FOLDED_OPS = {"Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Concat", "Reshape", "Identity",
              "Mul", "Add", "Sub", "Div", "Slice", "ConstantOfShape", "Range", "ReduceProd"}
# what a user meets most often among the rest, and what it would take
LATER = {"Erf": "outside GELU's x * (1 + erf(x / sqrt 2)) / 2", "Softplus": "outside Mish's x * tanh(softplus(x))"}
# operators that are one cnnctl activation, whatever their attributes
PLAIN_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hardswish", "Mish": "mish"}
# activations cnnctl layers may apply themselves (conv2d, dense, batchnorm, residual: `activation:`)
FOLDABLE = {"relu", "sigmoid", "tanh", "relu6", "hardsigmoid", "hardswish", "silu", "gelu", "mish"}


class ImportError_(CnnctlError):
    """A graph cnnctl cannot take (its message names the operators, a node of each and how many)."""


_onnx = onnx_modules


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


def import_model(model, source: str = "the graph") -> Imported:
    """Map an ONNX ModelProto onto cnnctl layer specs and weights (see the module's docstring)."""
    return _Importer(model, source).run()


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _types(layers: list[dict]) -> list[str]:
    return [spec["type"] for spec in layers]


def _pair(v) -> int | list[int]:
    v = [int(x) for x in v]
    return v[0] if len(set(v)) == 1 else v


class _Importer:
    def __init__(self, model, source: str):
        self.onnx, self.numpy_helper, self.shape_inference = _onnx()
        self.model, self.source = model, source
        self.graph = model.graph
        self.opset = opset_of(model)
        self.const: dict[str, np.ndarray] = {t.name: self._array(t, f"tensor {t.name!r}")
                                             for t in self.graph.initializer}
        self.weights: dict[str, np.ndarray] = {}
        self.used: set[str] = set()
        self.final: str | None = None
        self.normalization: dict | None = None
        self.visited: set[int] = set()
        self.pending: list[int] | None = None
        self.depth = 0  # branches inside branches at the walk's point

    def _array(self, t, what: str) -> np.ndarray:
        """A tensor checked by onnx_read (type, dimensions, bytes) as a NumPy array."""
        try:
            return self.numpy_helper.to_array(t)
        except Exception as e:  # what the checks before cannot see
            raise ModelError(f"{self.source}: {what} cannot be read ({type(e).__name__}: {e})",
                             "the file is damaged; export it again") from None

    # ---------------------------------------------------------------- checks and shapes

    def fail(self, message: str, hint: str | None = None):
        raise ImportError_(f"{self.source}: {message}", hint)

    def _check_operators(self) -> None:
        """Every node that carries data (after folding) must be one cnnctl maps: all others in one message."""
        unknown = collections.defaultdict(list)
        for node in self.nodes:
            if node.domain not in ("", "ai.onnx") or node.op_type not in LAYER_OPS:
                op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
                unknown[op].append(node.name or node.output[0])
        if unknown:
            listed = "; ".join(f"{op}{f' ({LATER[op]})' if op in LATER else ''} x{len(names)}, e.g. node "
                               f"{names[0]!r}" for op, names in sorted(unknown.items()))
            self.fail(f"operators cnnctl cannot import: {listed}",
                      "export the network without them, or with layers cnnctl has (docs/transfer.md lists them)")

    def _input(self):
        inits = set(self.const)
        inputs = [v for v in self.graph.input if v.name not in inits]
        if len(inputs) != 1:
            self.fail(f"the graph has {len(inputs)} inputs ({', '.join(v.name for v in inputs)}); an image "
                      "classifier has one", "export the network with one image input")
        if len(self.graph.output) != 1:
            names = ", ".join(v.name for v in self.graph.output)
            self.fail(f"the graph has {len(self.graph.output)} outputs ({names}); an image classifier has one",
                      "export the network with its class scores as the only output")
        v = inputs[0]
        dims = v.type.tensor_type.shape.dim
        if len(dims) != 4 or any(not d.HasField("dim_value") for d in dims[1:]):
            shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            self.fail(f"input {v.name!r} has shape {shown}; cnnctl imports N x C x H x W images with C, H and W "
                      "fixed (dynamic spatial sizes cannot be imported)",
                      "export with a fixed image size, e.g. torch.onnx.export(model, torch.zeros(1, 3, 224, 224), "
                      "..., dynamic_axes={'input': {0: 'N'}})")
        return v.name, tuple(int(d.dim_value) for d in dims[1:])

    def _shapes(self, input_name: str, chw: tuple) -> dict[str, tuple]:
        """Every tensor's shape, the batch being BATCH."""
        m = self.onnx.ModelProto()
        m.CopyFrom(self.model)
        for v in m.graph.input:
            if v.name == input_name:
                v.type.tensor_type.shape.dim[0].Clear()
                v.type.tensor_type.shape.dim[0].dim_value = BATCH
        del m.graph.value_info[:]
        try:
            m = self.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
        except Exception as e:
            self.fail(f"its shapes cannot be inferred ({type(e).__name__}: {e})")
        shapes = {}
        for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
            dims = v.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims) and v.type.tensor_type.HasField("shape"):
                shapes[v.name] = tuple(int(d.dim_value) for d in dims)
        shapes[input_name] = (BATCH, *chw)
        return shapes

    # ---------------------------------------------------------------- constant folding

    def _fold(self, shapes: dict) -> None:
        """Evaluate every node whose inputs are all constants (Shape: of a tensor whose shape is known)."""
        for node in self.graph.node:
            op = node.op_type
            if op == "Constant":
                (attr,) = [x for x in node.attribute if x.name.startswith("value")]  # onnx_read: exactly one
                value = self._array(attr.t, f"the value of node {node.name!r}") if attr.name == "value" else \
                    np.asarray(self.onnx.helper.get_attribute_value(attr))
                self.const[node.output[0]] = value
                continue
            if op == "Shape" and node.input[0] in shapes:
                a = _attrs(node)
                s = np.array(shapes[node.input[0]], np.int64)
                self.const[node.output[0]] = s[a.get("start", 0): a.get("end", len(s))]
                continue
            inputs = [i for i in node.input if i]
            if op not in FOLDED_OPS or not inputs or not all(i in self.const for i in inputs):
                continue
            try:
                value = self._evaluate(node, [self.const[i] for i in inputs])
            except CnnctlError:
                raise
            except (ValueError, IndexError, TypeError, KeyError, OverflowError, ZeroDivisionError) as e:
                self.fail(f"node {node.name or node.output[0]!r} ({op}) folds constants that do not fit together "
                          f"({type(e).__name__}: {e})", "the file is damaged; export it again")
            if value is not None:
                self.const[node.output[0]] = value

    def _evaluate(self, node, xs: list[np.ndarray]):
        op, a = node.op_type, _attrs(node)
        if op == "Gather":
            return np.take(xs[0], xs[1], axis=a.get("axis", 0))
        if op in ("Unsqueeze", "Squeeze"):
            axes = a.get("axes", xs[1].tolist() if len(xs) > 1 else None)
            if op == "Squeeze":
                return np.squeeze(xs[0], axis=None if axes is None else tuple(axes))
            out = xs[0]
            for ax in sorted(int(x) % (out.ndim + len(axes)) for x in axes):
                out = np.expand_dims(out, ax)
            return out
        if op == "Concat":
            return np.concatenate([np.atleast_1d(x) for x in xs], axis=a.get("axis", 0))
        if op == "Cast":
            return xs[0].astype(self.onnx.helper.tensor_dtype_to_np_dtype(a["to"]))
        if op == "Identity":
            return xs[0]
        if op == "Reshape":
            return xs[0].reshape([int(d) if d != 0 else xs[0].shape[i] for i, d in enumerate(xs[1])])
        if op in ("Mul", "Add", "Sub", "Div"):
            f = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op]
            out = f(xs[0], xs[1])
            return out // 1 if op == "Div" and xs[0].dtype.kind == "i" else out.astype(xs[0].dtype)
        if op == "Slice" and len(xs) >= 3:
            axes = xs[3].tolist() if len(xs) > 3 else list(range(len(xs[1])))
            steps = xs[4].tolist() if len(xs) > 4 else [1] * len(axes)
            index = [slice(None)] * xs[0].ndim
            for s, e, ax, st in zip(xs[1].tolist(), xs[2].tolist(), axes, steps):
                index[ax] = slice(s, e, st)
            return xs[0][tuple(index)]
        if op == "ConstantOfShape":
            value = a.get("value")
            fill = self._array(value, f"the value of node {node.name!r}") if value is not None else \
                np.zeros(1, np.float32)
            dims = [int(d) for d in np.ravel(xs[0])]
            if any(d < 0 for d in dims) or fill.size != 1:
                self.fail(f"node {node.name!r} (ConstantOfShape): shape {dims} has a negative dimension or its "
                          f"value is not one number", "the file is damaged; export it again")
            self._room(node, int(np.prod(dims, dtype=object)) * fill.itemsize)
            return np.full(dims, fill.ravel()[0], fill.dtype)
        if op == "Range":
            start, limit, delta = (np.ravel(x)[0] for x in xs)
            if delta == 0:
                self.fail(f"node {node.name!r} (Range): a step of 0", "the file is damaged; export it again")
            self._room(node, max(0, int(np.ceil((float(limit) - float(start)) / float(delta)))) * 8)
            return np.arange(start, limit, delta, dtype=np.result_type(xs[0]))
        if op == "ReduceProd":
            return np.prod(xs[0], keepdims=bool(a.get("keepdims", 1)))
        return None

    def _room(self, node, nbytes: int) -> None:
        """A folded tensor's bytes, checked as training's allocations are, before it is made."""
        check_generated(f"{self.source}: folding node {node.name or node.output[0]!r} ({node.op_type})", nbytes)

    # ---------------------------------------------------------------- patterns

    def _fuse_activations(self) -> None:
        """Activations written out in several nodes, one node each: x * (1 + erf(x / sqrt 2)) / 2, as torch (Div,
        Erf, Add, Mul, Mul by 0.5) and cnnctl export (Div, Erf, Add, Mul by 0.5, Mul) write GELU before opset 20's
        Gelu; x * tanh(softplus(x)), as both write Mish before opset 18's Mish."""
        producer = {o: n for n in self.nodes for o in n.output}
        users = collections.defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                users[i].append(n)

        def const_of(node, value) -> str | None:
            """The data input of a binary node whose other input is the constant `value`."""
            if node is None or len(node.input) != 2:
                return None
            a, b = node.input
            for data_in, c in ((a, b), (b, a)):
                if c in self.const and data_in not in self.const and np.size(self.const[c]) == 1 and \
                        abs(float(np.ravel(self.const[c])[0]) - value) < 1e-4:
                    return data_in
            return None

        def only_user(t):
            return users[t][0] if len(users[t]) == 1 else None

        for soft in [n for n in self.nodes if n.op_type == "Softplus"]:  # x * tanh(softplus(x)): opset 18's Mish
            tanh = only_user(soft.output[0])
            mul = tanh and only_user(tanh.output[0])
            if tanh is None or tanh.op_type != "Tanh" or mul is None or mul.op_type != "Mul" or \
                    sorted(mul.input) != sorted([soft.input[0], tanh.output[0]]):
                continue
            self._replace([soft, tanh, mul], "Mish", soft.input[0], mul.output[0])
        for erf in [n for n in self.nodes if n.op_type == "Erf"]:
            div = producer.get(erf.input[0])
            x = None
            if div is not None and div.op_type == "Div" and div.input[1] in self.const:
                x = div.input[0] if abs(float(np.ravel(self.const[div.input[1]])[0]) - 2 ** 0.5) < 1e-4 else None
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
            self._replace([div, erf, add, m1, m2], "Gelu", x, m2.output[0])

    def _replace(self, nodes: list, op: str, x: str, out: str) -> None:
        """One `op` node from tensor x to `out` in place of `nodes` (an activation written out in several)."""
        one = self.onnx.helper.make_node(op, [x], [out], name=nodes[0].name or nodes[-1].name)
        drop = {id(n) for n in nodes}
        at = min(k for k, n in enumerate(self.nodes) if id(n) in drop)
        self.nodes = [n for n in self.nodes if id(n) not in drop]
        self.nodes.insert(at, one)

    # ---------------------------------------------------------------- the walk

    def run(self) -> Imported:
        name, chw = self._input()
        self.input, self.input_chw = name, chw
        self.shapes = self._shapes(name, chw)
        self._fold(self.shapes)
        self.nodes = [n for n in self.graph.node if n.output[0] not in self.const]
        self._fuse_activations()
        self._check_operators()
        self.consumers = collections.defaultdict(list)
        for n in self.nodes:
            for i in self._data_inputs(n):
                self.consumers[i].append(n)
        self.output = self.graph.output[0].name
        self.flat = False  # cnnctl's tensor is (C,) where the graph's is (N, C, 1, 1) after a global pooling
        layers: list[dict] = []
        end = self._walk(name, layers)
        if end != self.output:
            self.fail(f"the walk from the input stopped at tensor {end!r}, not at the output {self.output!r}")
        unused = [n for n in self.nodes if id(n) not in self.visited]
        if unused:
            self.fail(f"{len(unused)} nodes do not lie between the input and the output "
                      f"(e.g. {unused[0].op_type} {unused[0].name!r})")
        return Imported(chw, layers, self.weights, self.final, self.opset, len(self.used), self.normalization)

    def _data_inputs(self, node) -> list[str]:
        return [i for i in node.input if i and i not in self.const]

    def _is_join(self, node) -> bool:
        return len(self._data_inputs(node)) > 1

    def _walk(self, t: str, layers: list[dict]) -> str:
        """Convert from tensor t on, appending to layers, up to a tensor that feeds a join (or the output)."""
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
            t = self._fork(t, cons, layers)

    def _fork(self, t: str, cons: list, layers: list[dict]) -> str:
        if self.depth >= MAX_NESTING:
            self.fail(f"branches nested more than {MAX_NESTING} deep at tensor {t!r} (a join inside a join's "
                      "branch, and so on)", "no published classifier nests so deep; the file is damaged or hostile")
        self.depth += 1
        try:
            return self._fork_at(t, cons, layers)
        finally:
            self.depth -= 1

    def _fork_at(self, t: str, cons: list, layers: list[dict]) -> str:
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
            end = self._walk(c.output[0], own)
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
        inputs = self._data_inputs(join)
        if sorted(ends) != sorted(inputs):
            self.fail(f"node {join.name!r} ({join.op_type}) joins tensors from outside the branches of {t!r}")
        by_input = [branches[ends.index(i)] for i in inputs]
        if join.op_type == "Add" and len(by_input) == 2:
            a, b = by_input
            body, shortcut = (a, b) if len(a) >= len(b) else (b, a)  # the longer branch is the body
            layers.append({"type": "residual", "body": body, "shortcut": shortcut or "identity"})
        elif join.op_type == "Mul" and sorted(map(_types, by_input)) == [[], ["sigmoid"]]:  # x * sigmoid(x)
            self.flat = flat
            self._activation(layers, "silu")
        elif join.op_type == "Mul" and len(by_input) == 2 and [] in by_input and not flat \
                and all(f for f, b in zip(flats, branches) if b):
            layers.append({"type": "gate", "branch": by_input[0] or by_input[1]})  # x * g(x), g per channel
        elif join.op_type == "Concat" and int(_attrs(join).get("axis", 1)) in (1, -3) and not self.flat:
            layers.append({"type": "concat", "branches": by_input})
        else:
            self.fail(f"node {join.name!r} joins {len(inputs)} branches with {join.op_type}, which cnnctl cannot "
                      "import", "cnnctl joins branches by Add (residual), Concat on channels and Mul (x * sigmoid(x), "
                      "or squeeze-and-excitation gating)")
        self.flat = flat  # a join gives what came in: feature maps stay feature maps
        return join.output[0]

    # ---------------------------------------------------------------- single nodes

    def _where(self) -> str:
        return f"node {self.node.name or self.node.output[0]!r} ({self.node.op_type})"

    def _param(self, name: str, role: str = "weight", ndim: int | None = None, shape: tuple | None = None) \
            -> np.ndarray:
        """The constant tensor `name` that the current node takes as its `role`, checked: a constant, of `ndim`
        dimensions or of `shape`, every value finite."""
        if name not in self.const:
            self.fail(f"{self._where()}: its {role} {name!r} is not a constant tensor of the file",
                      "cnnctl imports networks whose weights are stored in the file")
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.asarray(self.const[name], np.float32)
        if ndim is not None and v.ndim != ndim:
            self.fail(f"{self._where()}: its {role} {name!r} has shape {list(v.shape)}; {self.node.op_type} takes a "
                      f"{role} of {ndim} dimensions", "the file is damaged; export it again")
        if shape is not None and v.shape != tuple(shape):
            self.fail(f"{self._where()}: its {role} {name!r} has shape {list(v.shape)}, where {list(shape)} is "
                      "needed", "the file is damaged; export it again")
        if not np.isfinite(v).all():
            self.fail(f"tensor {name!r} (the {role} of {self._where()}) holds NaN or infinite values",
                      "the weights are damaged; export the network again from a trained model")
        self.used.add(name)
        return v

    def _scalar(self, name: str, role: str) -> float:
        """A constant input that must be one number (a Clip bound, a Dropout ratio)."""
        if name not in self.const:
            self.fail(f"{self._where()}: its {role} {name!r} is not a constant", "cnnctl imports constant "
                      f"{role}s")
        v = np.asarray(self.const[name])
        if v.size != 1:
            self.fail(f"{self._where()}: its {role} {name!r} has shape {list(v.shape)}; it must be one number",
                      "the file is damaged; export it again")
        return float(v.ravel()[0])

    def _ints(self, a: dict, key: str, n: int, default) -> list[int]:
        """An attribute of n integers (strides, pads, kernel_shape of a 2-D operator)."""
        v = a.get(key, default)
        if v is None:
            self.fail(f"{self._where()} lacks its attribute {key!r}")
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        if len(v) != n or not all(isinstance(x, (int, np.integer)) for x in v):
            self.fail(f"{self._where()}: attribute {key!r} is {v}; on images it takes {n} values (integers)",
                      "the file is damaged; export it again")
        if key != "pads" and any(int(x) < 1 for x in v) or key == "pads" and any(int(x) < 0 for x in v):
            self.fail(f"{self._where()}: attribute {key!r} is {v}; each value must be "
                      f"{'0 or more' if key == 'pads' else '1 or more'}", "the file is damaged; export it again")
        return [int(x) for x in v]

    def _convert(self, node, layers: list[dict]) -> None:
        op, a = node.op_type, _attrs(node)
        self.node = node
        ins = node.input
        shape_in = self.shapes.get(self._data_inputs(node)[0]) if self._data_inputs(node) else None
        if op in ("Sub", "Div"):
            self._normalization(node, layers)
            return
        if op in ("Softmax", "LogSoftmax") and self._last(node) and int(a.get("axis", -1)) in (1, -1):
            self.final = "softmax" if op == "Softmax" else "log_softmax"
            if op == "LogSoftmax":
                layers.append({"type": "log_softmax"})
            return
        if op in ("Identity", "Dropout"):
            if op == "Dropout" and not self._last(node):
                ratio = a.get("ratio", self._scalar(ins[1], "ratio") if len(ins) > 1 and ins[1] else 0.5)
                if not isinstance(ratio, float) or not 0 <= ratio < 1:
                    self.fail(f"{self._where()}: ratio {ratio}; a dropout rate is one number in [0, 1)")
                layers.append({"type": "dropout", "rate": round(float(ratio), 6)})
            return
        if op == "Conv" and self.flat:  # a 1x1 convolution on 1x1 maps after a global pooling: a dense layer
            w = self._param(ins[1], ndim=4)
            if w.shape[2:] != (1, 1) or int(a.get("group", 1)) != 1 or any(a.get("pads", [])):
                self.fail(f"Conv {node.name!r} after a global pooling: only a 1x1 convolution (a dense layer) is "
                          "imported there")
            self._weighted(layers, {"type": "dense", "units": int(w.shape[0])}, w[:, :, 0, 0], ins)
            return
        if op == "Conv":
            w = self._param(ins[1], ndim=4)
            pads = self._pending_pads(self._ints(a, "pads", 4, [0, 0, 0, 0]))
            kernel = self._ints(a, "kernel_shape", 2, list(w.shape[2:]))
            strides, dilations = self._ints(a, "strides", 2, [1, 1]), self._ints(a, "dilations", 2, [1, 1])
            group = a.get("group", 1)
            if kernel != list(w.shape[2:]):
                self.fail(f"{self._where()}: attribute 'kernel_shape' is {kernel} but the weight's kernel is "
                          f"{list(w.shape[2:])}", "the file is damaged; export it again")
            if not isinstance(group, int) or group < 1 or w.shape[0] % group or (
                    shape_in is not None and w.shape[1] * group != shape_in[1]):
                self.fail(f"{self._where()}: attribute 'group' {group} does not fit its weight {list(w.shape)} on "
                          f"{shape_in[1] if shape_in else '?'} input channels (weight channels x group = input "
                          "channels, filters divisible by group)", "the file is damaged; export it again")
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
                self.fail(f"Conv {node.name!r}: auto_pad {a['auto_pad']!r} is not imported",
                          "export with explicit pads (torch does)")
            spec = {"type": "conv2d", "filters": int(w.shape[0]), "kernel_size": _pair(w.shape[2:])}
            for key, v in (("stride", _pair(strides)), ("dilation", _pair(dilations))):
                if v != 1:
                    spec[key] = v
            if pads[0] != pads[2] or pads[1] != pads[3]:  # ONNX: top, left, bottom, right; cnnctl: t, b, l, r
                spec["padding"] = [pads[0], pads[2], pads[1], pads[3]]
            elif pads[0] or pads[1]:
                spec["padding"] = _pair(pads[:2])
            if int(a.get("group", 1)) != 1:
                spec["groups"] = int(a["group"])
            self._weighted(layers, spec, w, ins)
            return
        if op == "BatchNormalization":
            spec = {"type": "batchnorm"}
            eps = float(a.get("epsilon", 1e-5))
            if abs(eps - 1e-5) > 1e-12:
                spec["eps"] = float(np.float32(eps))
            momentum = 1.0 - float(a.get("momentum", 0.9))
            if abs(momentum - 0.1) > 1e-6:
                spec["momentum"] = round(momentum, 6)
            c = (int(shape_in[1]),) if shape_in is not None and len(shape_in) > 1 else None
            c = c or self._param(ins[1], "scale", ndim=1).shape
            self._add(layers, spec, {k: self._param(ins[i], role, shape=c) for i, k, role in (
                (1, "weight", "scale"), (2, "bias", "bias"), (3, "running_mean", "mean"), (4, "running_var", "var"))})
            if (self.weights[f"{spec['_path']}.running_var"] < 0).any():
                self.fail(f"{self._where()}: its running variance has negative values",
                          "the file is damaged; export it again")
            return
        if op == "Gelu":
            if a.get("approximate", b"none") not in (b"none", "none"):
                self.fail(f"Gelu {node.name!r}: the tanh approximation is not imported (cnnctl's gelu is exact)")
            self._activation(layers, "gelu")
            return
        if op in PLAIN_ACTIVATIONS:
            self._activation(layers, PLAIN_ACTIVATIONS[op])
            return
        if op == "Clip":
            low, high = (a.get(k) for k in ("min", "max"))
            if low is None and len(ins) > 1 and ins[1]:
                low = self._scalar(ins[1], "lower bound")
            if high is None and len(ins) > 2 and ins[2]:
                high = self._scalar(ins[2], "upper bound")
            if low != 0 or high != 6:
                self.fail(f"Clip {node.name!r} to [{low}, {high}]: only Clip to [0, 6] (ReLU6) is imported")
            self._activation(layers, "relu6")
            return
        if op == "HardSigmoid":
            if abs(float(a.get("alpha", 0.2)) - 1 / 6) > 1e-6 or abs(float(a.get("beta", 0.5)) - 0.5) > 1e-6:
                self.fail(f"HardSigmoid {node.name!r} with alpha {a.get('alpha', 0.2)}, beta {a.get('beta', 0.5)}: "
                          "only PyTorch's (alpha 1/6, beta 1/2) is imported")
            self._activation(layers, "hardsigmoid")
            return
        if op == "LeakyRelu":
            layers.append({"type": "leaky_relu", "negative_slope": float(np.float32(a.get("alpha", 0.01)))})
            return
        if op in ("Elu", "Celu"):
            layers.append({"type": op.lower(), "alpha": float(np.float32(a.get("alpha", 1.0)))})
            return
        if op in ("MaxPool", "AveragePool"):
            self._pool(node, a, shape_in, layers)
            return
        if op == "GlobalAveragePool" or (op == "ReduceMean" and self._reduces_hw(node, a)):
            layers.append({"type": "global_avgpool2d"})
            self.flat = True
            return
        if op == "Flatten":
            if int(a.get("axis", 1)) != 1:
                self.fail(f"Flatten {node.name!r} with axis {a.get('axis')}: only axis 1 is an image classifier's")
            if not self.flat:
                layers.append({"type": "flatten"})
                self.flat = True
            return
        if op in ("Reshape", "Unsqueeze") and self.flat and self._per_channel(node):
            return  # (N, C) -> (N, C, 1, 1) before a gate's Mul: cnnctl's gate broadcasts (N, C) itself
        if op == "Reshape":
            target = self.shapes.get(node.output[0])
            if target is None or len(target) != 2 or target[0] != BATCH:
                self.fail(f"Reshape {node.name!r} to {target}: only a flatten to (N, features) is imported "
                          "(a reshape that depends on the batch or keeps feature maps cannot be)")
            if not self.flat:
                layers.append({"type": "flatten"})
                self.flat = True
            return
        if op == "Gemm":
            if float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0 or int(a.get("transA", 0)):
                self.fail(f"Gemm {node.name!r}: alpha, beta other than 1 or transA are not imported")
            w = self._param(ins[1], ndim=2)
            w = w if int(a.get("transB", 0)) else w.T
            if shape_in is not None and len(shape_in) == 2 and w.shape[1] != shape_in[1]:
                self.fail(f"{self._where()}: its weight takes {w.shape[1]} features but {shape_in[1]} arrive",
                          "the file is damaged; export it again")
            self._flat_for_dense(layers)
            self._weighted(layers, {"type": "dense", "units": int(w.shape[0])}, w, ins)
            return
        if op == "MatMul":
            w = self._param(ins[1], ndim=2)
            self._flat_for_dense(layers)
            self._add(layers, {"type": "dense", "units": int(w.shape[1]), "bias": False},
                      {"weight": np.ascontiguousarray(w.T)})
            return
        if op == "Add":  # a constant added: the bias of the MatMul before it
            const = [i for i in ins if i in self.const]
            last = layers[-1] if layers else None
            if last is not None and last["type"] == "dense" and last.get("bias") is False and const:
                b = self._param(const[0]).ravel()
                if b.shape == (last["units"],):
                    del last["bias"]
                    self.weights[last["_path"] + ".bias"] = b
                    return
            self.fail(f"Add {node.name!r}: a constant added anywhere but as a MatMul's bias is not imported")
        if op == "Pad":
            self._pad(node, a)
            return
        if op in ("Softmax", "LogSoftmax"):
            self.fail(f"{op} {node.name!r} inside the network: only a final one is imported")
        what = LATER.get(op)
        self.fail(f"node {node.name!r}: {op}" + (f" ({what})" if what else "") + " is not imported by cnnctl yet",
                  "export the network without it")

    def _per_channel(self, node) -> bool:
        before, after = self.shapes.get(self._data_inputs(node)[0]), self.shapes.get(node.output[0])
        return before is not None and after is not None and len(before) == 2 and after == (*before, 1, 1)

    def _activation(self, layers: list[dict], act: str) -> None:
        """An element-wise activation: the previous layer's `activation:` when it has none, else a layer."""
        last = layers[-1] if layers else None
        if last is not None and act in FOLDABLE and last["type"] in ("conv2d", "dense", "batchnorm", "residual") \
                and last.get("activation") is None:
            last["activation"] = act
        else:
            layers.append({"type": act})

    def _last(self, node) -> bool:
        """Whether nothing but Identity nodes stand between node and the graph's output."""
        t = node.output[0]
        while t != self.output:
            cons = self.consumers.get(t, [])
            if len(cons) != 1 or cons[0].op_type != "Identity":
                return False
            t = cons[0].output[0]
        return True

    def _normalization(self, node, layers) -> None:
        """Sub(input, mean) then Div(., std), first of all (as cnnctl export writes them): the normalisation."""
        const = [i for i in node.input if i in self.const]
        first = self._data_inputs(node) == [self.input] if node.op_type == "Sub" else \
            self.normalization is not None and "std" not in self.normalization and not layers
        if layers or not const or node.input[0] in self.const or not first:
            self.fail(f"{node.op_type} {node.name!r}: only a normalisation at the input (Sub of a mean, then Div "
                      "by a std) is imported")
        value = self._per_channel_values(node, np.asarray(self.const[const[0]], np.float64))
        self.used.add(const[0])
        if node.op_type == "Sub":
            self.normalization = {"mean": value}
        else:
            self.normalization["std"] = value

    def _per_channel_values(self, node, value: np.ndarray) -> list[float]:
        """A normalisation constant as one value per channel (or one for all): a constant broadcast over height
        and width (a per-channel mean written as an image) is reduced to its channels; one that varies across the
        pixels is refused (cnnctl normalises per channel), never dropped."""
        c, h, w = self.input_chw
        if value.size == 1:
            return [float(value.ravel()[0])]
        while value.ndim > 3 and value.shape[0] == 1:
            value = value[0]
        if value.ndim == 1 and value.shape[0] == w and w != c:
            value = value.reshape(1, 1, w)
        if value.ndim > 3 or value.ndim == 0:
            self.fail(f"{self._where()}: its constant has shape {list(value.shape)}; a normalisation is one value "
                      "per channel")
        value = value.reshape((1,) * (3 - value.ndim) + value.shape)
        if value.shape[0] not in (1, c) or value.shape[1] not in (1, h) or value.shape[2] not in (1, w):
            self.fail(f"{self._where()}: its constant of shape {list(value.shape)} does not fit the input "
                      f"{[c, h, w]}")
        if not np.isfinite(value).all() or (node.op_type == "Div" and (value <= 0).any()):
            self.fail(f"{self._where()}: its constant holds values that are not finite"
                      + (" or not positive" if node.op_type == "Div" else ""))
        if (value != value[:, :1, :1]).any():
            self.fail(f"{self._where()}: its constant varies per pixel (shape {list(value.shape)}); cnnctl "
                      "normalises per channel and cannot take a per-pixel mean or std",
                      "give the per-channel values with --mean and --std, or export the network without its "
                      "normalisation")
        return value[:, 0, 0].tolist()

    def _weighted(self, layers: list[dict], spec: dict, weight: np.ndarray, ins) -> None:
        """A layer with a weight and, when the node has a third input, a bias (as long as the outputs: Gemm's C
        may be a broadcast scalar), else `bias: false`."""
        tensors = {"weight": np.ascontiguousarray(weight)}
        if len(ins) > 2 and ins[2]:
            b = self._param(ins[2], "bias").ravel()
            if b.size not in (1, weight.shape[0]):
                self.fail(f"{self._where()}: its bias {ins[2]!r} has {b.size} values, where {weight.shape[0]} (one "
                          "per output) are needed", "the file is damaged; export it again")
            tensors["bias"] = np.broadcast_to(b, (weight.shape[0],)).copy()
        else:
            spec["bias"] = False
        self._add(layers, spec, tensors)

    def _add(self, layers: list[dict], spec: dict, tensors: dict) -> None:
        """A layer with weights: its tensors are kept under a provisional key, renamed to the state-dict path
        once the whole tree is laid out (paths()). """
        key = f"#{len(self.weights)}"
        spec["_path"] = key
        for k, v in tensors.items():
            self.weights[f"{key}.{k}"] = v
        layers.append(spec)

    def _flat_for_dense(self, layers: list[dict]) -> None:
        if not self.flat:
            layers.append({"type": "flatten"})
            self.flat = True

    def _reduces_hw(self, node, a) -> bool:
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in self.const:
            axes = self.const[node.input[1]].tolist()
        if sorted(int(x) % 4 for x in (axes or [])) != [2, 3]:
            self.fail(f"ReduceMean {node.name!r} over axes {axes}: only the mean over height and width is imported")
        return True

    def _pool(self, node, a, shape_in, layers) -> None:
        k = self._ints(a, "kernel_shape", 2, None)
        s = self._ints(a, "strides", 2, [1, 1])
        pads = self._pending_pads(self._ints(a, "pads", 4, [0, 0, 0, 0]))
        if pads[0] != pads[2] or pads[1] != pads[3]:
            self.fail(f"{node.op_type} {node.name!r}: asymmetric padding {pads}", "cnnctl pads each side alike")
        if any(d != 1 for d in self._ints(a, "dilations", 2, [1, 1])):
            self.fail(f"{node.op_type} {node.name!r}: dilated pooling is not imported")
        if any(2 * p > kk for p, kk in zip(pads[:2], k)):
            self.fail(f"{node.op_type} {node.name!r}: padding {pads[:2]} is more than half the kernel {k}")
        spec = {"type": "maxpool2d" if node.op_type == "MaxPool" else "avgpool2d", "kernel_size": _pair(k)}
        if s != k:
            spec["stride"] = _pair(s)
        if pads[0] or pads[1]:
            spec["padding"] = _pair(pads[:2])
        if int(a.get("ceil_mode", 0)) and shape_in is not None and any(
                (size + 2 * p - kk) % ss for size, kk, ss, p in zip(shape_in[2:], k, s, pads[:2])):
            spec["ceil_mode"] = True  # only where it changes the size: the config stays as plain as it can
        if node.op_type == "AveragePool" and any(pads[:2]) and not int(a.get("count_include_pad", 0)):
            spec["count_include_pad"] = False  # ONNX's default, where padding makes it matter
        layers.append(spec)

    def _pad(self, node, a) -> None:
        mode = a.get("mode", b"constant")
        if "pads" not in a and len(node.input) > 1 and node.input[1] in self.const:
            a = {**a, "pads": [int(p) for p in np.ravel(self.const[node.input[1]])]}
        pads = self._ints(a, "pads", 8, None)
        value = self._scalar(node.input[2], "padding value") if len(node.input) > 2 and node.input[2] else 0.0
        if mode not in (b"constant", "constant") or value != 0 or any(pads[:2]) or any(pads[4:6]):
            self.fail(f"Pad {node.name!r}: only zero padding of height and width is imported")
        self.pending = [pads[2], pads[3], pads[6], pads[7]]  # top, left, bottom, right
        consumers = self.consumers.get(node.output[0], [])
        if len(consumers) != 1 or consumers[0].op_type not in ("Conv", "MaxPool", "AveragePool"):
            self.fail(f"Pad {node.name!r}: only a Pad before a Conv or pooling is imported (it becomes its padding)")

    def _pending_pads(self, pads: list[int]) -> list[int]:
        extra, self.pending = self.pending, None
        return [p + e for p, e in zip(pads, extra)] if extra else pads


def lay_out(layers: list[dict], weights: dict[str, np.ndarray], prefix: str = "layers") -> dict[str, np.ndarray]:
    """Give every layer's weights their state-dict names (layers.3.body.0.weight), dropping the provisional keys
    from the specs; returns the renamed weights."""
    named = {}
    for i, spec in enumerate(layers):
        named.update(_lay_one(spec, weights, f"{prefix}.{i}"))
    return named


def _lay_one(spec: dict, weights: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    named = {}
    copies = spec.pop("_copies", None)
    if copies is not None:  # a block used with repeat: N is a sequential of the N copies
        for k, copy in enumerate(copies):
            named.update(_lay_one(copy, weights, f"{path}.{k}"))
        return named
    key = spec.pop("_path", None)
    if key is not None:
        for k in [k for k in weights if k.startswith(key + ".")]:
            named[f"{path}.{k[len(key) + 1:]}"] = weights[k]
    if spec["type"] == "residual":
        named.update(lay_out(spec["body"], weights, f"{path}.body"))
        if isinstance(spec["shortcut"], list):
            named.update(lay_out(spec["shortcut"], weights, f"{path}.shortcut"))
    elif spec["type"] == "concat":
        for b, branch in enumerate(spec["branches"]):
            named.update(lay_out(branch, weights, f"{path}.branches.{b}"))
    elif spec["type"] == "gate":
        named.update(lay_out(spec["branch"], weights, f"{path}.branch"))
    return named


def _shape_of(spec):
    """A spec without its provisional weight keys: equal for two layers that differ in weights alone."""
    if isinstance(spec, dict):
        return {k: _shape_of(v) for k, v in spec.items() if k not in ("_path", "_copies")}
    if isinstance(spec, list):
        return [_shape_of(v) for v in spec]
    return spec


def fold_repeats(layers: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """Runs of two or more identical containers (residual units, concatenations, gates that differ in weights
    alone) at the top level become one use of a block with `repeat: N`; returns the layers and the blocks."""
    import json

    blocks: dict[str, dict] = {}
    names: dict[str, str] = {}
    out, i = [], 0
    while i < len(layers):
        spec = layers[i]
        key = json.dumps(_shape_of(spec), sort_keys=True)
        j = i + 1
        while j < len(layers) and json.dumps(_shape_of(layers[j]), sort_keys=True) == key:
            j += 1
        if spec["type"] in ("residual", "concat", "gate") and j - i >= 2:
            if key not in names:
                names[key] = f"{spec['type']}_{sum(1 for n in names.values() if n.startswith(spec['type'])) + 1}"
                blocks[names[key]] = _shape_of(spec)
            out.append({"type": names[key], "repeat": j - i, "_copies": layers[i:j]})
        else:
            out.extend(layers[i:j])
        i = j
    return out, blocks


# ---------------------------------------------------------------- the config and checkpoint written


def _flow(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, default_flow_style=True, width=10**9, sort_keys=False).strip()


def _scalar_text(v) -> str:
    """A value as YAML reads it back unchanged: a string YAML would take for a number, a boolean or null
    (`2024`, `yes`, `null`, `0x1F`, `~`, `1e3`) or that holds YAML syntax is quoted."""
    return _flow([v])[1:-1]


def _layer_lines(layers: list[dict], indent: str) -> list[str]:
    lines = []
    for spec in layers:
        if spec["type"] == "residual":
            lines.append(f"{indent}- type: residual")
            lines.append(f"{indent}  body:")
            lines += _layer_lines(spec["body"], indent + "    ")
            if isinstance(spec["shortcut"], list):
                lines.append(f"{indent}  shortcut:")
                lines += _layer_lines(spec["shortcut"], indent + "    ")
            else:
                lines.append(f"{indent}  shortcut: {spec['shortcut']}")
            if spec.get("activation"):
                lines.append(f"{indent}  activation: {spec['activation']}")
        elif spec["type"] == "gate":
            lines.append(f"{indent}- type: gate   # squeeze-and-excitation: the input's channels scaled by:")
            lines.append(f"{indent}  branch:")
            lines += _layer_lines(spec["branch"], indent + "    ")
        elif spec["type"] == "concat":
            lines.append(f"{indent}- type: concat")
            lines.append(f"{indent}  branches:")
            for branch in spec["branches"]:
                if not branch:
                    lines.append(f"{indent}    - []   # the input itself")
                    continue
                first, *rest = _layer_lines(branch, indent + "      ")
                lines.append(f"{indent}    - {first.strip()}" if first.lstrip().startswith("- {") else
                             f"{indent}    -\n{first}")
                lines += rest
        else:
            lines.append(f"{indent}- {_flow(spec)}")
    return lines


def _block_lines(blocks: dict[str, dict]) -> list[str]:
    if not blocks:
        return []
    lines = ["  blocks:                     # structure that repeats: used below with repeat: N"]
    for name, spec in blocks.items():
        first, *rest = _layer_lines([spec], "      ")
        lines.append(f"    {name}:")
        lines.append("      " + first.strip()[2:])  # the block's own keys, not a list item
        lines += [line[2:] if line.startswith("        ") else line for line in rest]
    return lines


def config_text(spec: dict, source: str) -> str:
    """The config as a person would write it: commented, leaf layers one per line, containers as blocks."""
    data, model = spec["data"], spec["model"]
    lines = [
        f"# Imported by `cnnctl import {source}`: the layers of the ONNX graph, with their weights in",
        "# model.safetensors beside this file. Fill in the data section, then fine-tune:",
        "#   cnnctl train config.yaml --init-from model.safetensors",
        f"name: {_scalar_text(spec['name'])}",
        f"seed: {spec['seed']}",
        "data:",
        "  dataset: folder            # your images: ROOT/train/<class>/*.png (and optionally ROOT/test/<class>/)",
        f"  root: {data['root']}     # fill in",
        f"  batch_size: {data['batch_size']}",
        f"  val_split: {data['val_split']}",
        f"  normalize: {_flow(data['normalize']) if isinstance(data['normalize'], dict) else data['normalize']}"
        "   # what the network was trained with",
        "model:",
        f"  input_shape: {_flow(model['input_shape'])}   # C, H, W of the graph's input",
        *_block_lines(model.get("blocks", {})),
        "  layers:",
        *_layer_lines(model["layers"], "    "),
        f"loss: {spec['loss']}",
        f"optimizer: {_flow(spec['optimizer'])}",
        f"train: {_flow(spec['train'])}",
    ]
    return "\n".join(lines) + "\n"


def build(onnx_path: Path, name: str, mean: list[float] | None, std: list[float] | None,
          classes: list[str] | None):
    """Import the graph: (spec dict, Spec, model with the weights loaded, layer rows, normalisation, class names,
    Imported)."""
    from cnnctl.config.build import build_model
    from cnnctl.config.spec import validate

    proto = read_model(onnx_path)
    imp = import_model(proto, str(onnx_path))
    if classes is None:  # cnnctl export writes them into metadata_props
        import json

        meta = {p.key: p.value for p in proto.metadata_props}
        try:
            written = json.loads(meta.get("classes", "null"))
        except ValueError:
            written = None
        if isinstance(written, list) and written and all(isinstance(c, str) for c in written):
            classes = written
    imp.layers, blocks = fold_repeats(imp.layers)
    named = lay_out(imp.layers, imp.weights)
    c = imp.input_shape[0]
    if (mean is None) != (std is None):
        raise CnnctlError("give --mean and --std together", "e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")
    if mean is not None:
        if len(mean) != c or len(std) != c or min(std) <= 0:
            raise CnnctlError(f"--mean and --std need {c} values each (one per input channel), std positive")
        norm = {"mean": list(mean), "std": list(std)}
    elif imp.normalization is not None:  # values per channel or one for all (_per_channel_values)
        found = {"std": [1.0], **imp.normalization}
        norm = {k: (v * c if len(v) == 1 else v) for k, v in found.items()}
    else:
        norm = {"mean": [0.0] * c, "std": [1.0] * c}
    spec_dict = {
        "name": name, "seed": 0,
        "data": {"dataset": "folder", "root": "PATH/TO/IMAGES", "batch_size": 32, "val_split": 0.1,
                 "normalize": norm if norm["std"] != [1.0] * c or any(norm["mean"]) else "none"},
        "model": {"input_shape": list(imp.input_shape), **({"blocks": blocks} if blocks else {}),
                  "layers": imp.layers},
        "loss": "nll" if imp.final == "log_softmax" else "cross_entropy",
        "optimizer": {"type": "sgd", "lr": 0.01, "momentum": 0.9},
        "train": {"epochs": 10},
    }
    spec = validate(spec_dict, f"the config imported from {onnx_path}")
    model, rows = build_model(spec.model)
    own = model.state_dict()
    for key in own:  # a counter ONNX does not carry: it starts at 0, as in a fresh PyTorch model
        if key.endswith(".num_batches_tracked") and key not in named:
            named[key] = np.zeros_like(own[key])
    missing, extra = sorted(set(own) - set(named)), sorted(set(named) - set(own))
    wrong = [k for k in own if k in named and own[k].shape != named[k].shape]
    if missing or extra or wrong:  # a mapping this module got wrong: said plainly
        shapes = [(k, own[k].shape, named[k].shape) for k in wrong[:3]]
        raise CnnctlError(f"{onnx_path}: the imported weights do not fit the imported layers (missing "
                          f"{missing[:3]}, extra {extra[:3]}, shapes {shapes})",
                          "report this graph to cnnctl")
    model.load_state_dict(named)
    k = rows[-1].output_shape[0] if len(rows[-1].output_shape) == 1 else None
    if k is None:
        raise CnnctlError(f"{onnx_path}: the network outputs shape {rows[-1].output_shape}, not one score per class",
                          "import an image classifier (its output N x classes)")
    if classes is not None and len(classes) != k and "classes" not in {p.key for p in proto.metadata_props}:
        raise CnnctlError(f"--classes gives {len(classes)} names but the network has {k} outputs",
                          "one class name per line, as many as the network's outputs")
    if classes is not None and len(classes) != k:
        classes = None  # the file's own names do not fit its outputs: numbered instead
    return spec_dict, spec, model, rows, norm, classes or [f"class_{i}" for i in range(k)], imp


IMPORTED = ("config.yaml", "model.safetensors")


def check_out_dir(out_dir: Path, force: bool) -> None:
    """--out may be a new or empty folder, or one that holds only an earlier import (its two files); a folder with
    anything else (a run directory, other files) is refused unless `force`, which replaces the two files only."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or force:
        return
    if not out_dir.is_dir():
        raise CnnctlError(f"--out {out_dir}: it is not a folder", "give a folder for config.yaml and model.safetensors")
    present = sorted(p.name for p in out_dir.iterdir())
    earlier = set(present) <= set(IMPORTED)
    if earlier and "config.yaml" in present:
        from cnnctl.core.fileio import Unreadable, read_regular

        try:
            earlier = read_regular(out_dir / "config.yaml", 1 << 20).startswith(b"# Imported by `cnnctl import")
        except Unreadable:
            earlier = False
    if present and not earlier:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise CnnctlError(f"--out {out_dir} already holds {shown}: not an earlier import's folder (a run, or files of "
                          "your own), which an import would overwrite",
                          "give a new folder, or add --force to replace its config.yaml and model.safetensors")


def write(out_dir: Path, onnx_path: Path, spec_dict: dict, spec, model, norm: dict, classes: list[str]) -> None:
    """DIR/config.yaml (readable, commented) and DIR/model.safetensors (a cnnctl checkpoint of the weights),
    written as a pair: both new or, when a write fails, both as they were."""
    import os

    from cnnctl.config.spec import spec_to_dict
    from cnnctl.core.environment import environment
    from cnnctl.core.fileio import atomic_write_bytes
    from cnnctl.run import checkpoint
    from cnnctl.run.checkpoint import RunState

    out_dir = Path(out_dir)
    final = [out_dir / name for name in IMPORTED]
    new = [out_dir / f".{name}.new" for name in IMPORTED]
    old = [out_dir / f".{name}.old" for name in IMPORTED]
    moved: list[int] = []  # old files set aside
    placed: list[int] = []  # new files in place
    try:
        atomic_write_bytes(new[0], config_text(spec_dict, Path(onnx_path).name).encode(), follow_links=False)
        checkpoint.save(new[1], checkpoint.Checkpoint(
            config=spec_to_dict(spec), model_state=model.state_dict(), normalization=norm,
            run=RunState(classes=classes), environment={**environment(), "imported_from": str(onnx_path)}))
        for k in range(2):  # the old pair aside, then the new pair in: undone below if any step fails
            if final[k].exists() or final[k].is_symlink():
                os.replace(final[k], old[k])
                moved.append(k)
        for k in range(2):
            os.replace(new[k], final[k])
            placed.append(k)
    except BaseException as e:
        for k in range(2):
            if k in placed:
                final[k].unlink(missing_ok=True)
            if k in moved:
                os.replace(old[k], final[k])
            new[k].unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CnnctlError(f"cannot write {out_dir}: {e.strerror or e}",
                              "write to a writable folder with free space") from None
        raise
    for k in moved:
        old[k].unlink(missing_ok=True)
