"""The graph as read (read.py checked the file): constants from the initializers and Constant nodes, every
node whose inputs are all constants folded into one by onnx's own reference evaluator at the file's opset (shape
chains, a flatten's target, torch's chunk bounds; ConstantOfShape and Range here, their size checked before they
are made: the model zoo's weights), and every tensor's shape by onnx's shape inference, run again while folding
fixes more, the batch being a marker value."""

from __future__ import annotations

import numpy as np

from cnnctl.errors import CnnctlError

from .read import ModelError, check_generated, onnx_modules, opset_of

BATCH = 7919  # the batch size the shapes are computed with: a prime no real dimension is likely to equal
FOLDED_OPS = {"Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Concat", "Reshape", "Identity",
              "Mul", "Add", "Sub", "Div", "Slice", "ConstantOfShape", "Range", "ReduceProd", "Equal", "Where", "Not",
              "Less", "Greater", "Max", "Min", "Floor", "Ceil", "Sqrt", "Neg", "Abs"}


class ImportError_(CnnctlError):
    """A graph cnnctl cannot take (its message names the operators, a node of each and how many)."""


def attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def layer_types(layers: list[dict]) -> list[str]:
    return [spec["type"] for spec in layers]


def pair(v) -> int | list[int]:
    v = [int(x) for x in v]
    return v[0] if len(set(v)) == 1 else v


def reshaped(given: list[int], shape_in: tuple) -> tuple | None:
    """The shape ONNX's Reshape makes of shape_in with `given` (0: that dimension copied, -1: what is left)."""
    dims = [shape_in[k] if d == 0 and k < len(shape_in) else d for k, d in enumerate(given)]
    total, known = int(np.prod(shape_in)), int(np.prod([d for d in dims if d != -1]))
    if dims.count(-1) > 1 or known <= 0 or total % known:
        return None
    return tuple(total // known if d == -1 else d for d in dims)


class Graph:
    """The graph as read: its constants (initializers, Constant nodes, and every node that folds into one),
    every tensor's shape with the batch as BATCH, its input and opset."""

    def __init__(self, model, source: str, input_size: tuple[int, int] | None = None):
        self.input_size = input_size  # H, W for a graph whose height and width are dynamic (--input-size)
        self.onnx, self.numpy_helper, self.shape_inference = onnx_modules()
        self.model, self.source = model, source
        self.graph = model.graph
        self.opset = opset_of(model)
        self.const: dict[str, np.ndarray] = {t.name: self._array(t, f"tensor {t.name!r}")
                                             for t in self.graph.initializer}

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
        shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        users = [n for n in self.graph.node if v.name in n.input]
        # tf2onnx's NHWC input: its one user a Transpose into N x C x H x W, which the import absorbs
        self.nhwc = len(dims) == 4 and len(users) == 1 and users[0].op_type == "Transpose" and \
            [list(a.ints) for a in users[0].attribute if a.name == "perm"] == [[0, 3, 1, 2]]
        c_at, hw_at = (3, (1, 2)) if self.nhwc else (1, (2, 3))
        if len(dims) != 4 or not dims[c_at].HasField("dim_value"):
            self.fail(f"input {v.name!r} has shape {shown}; cnnctl imports N x C x H x W images, C fixed",
                      "export the image classifier with its N x C x H x W input")
        fixed = [dims[k].dim_value if dims[k].HasField("dim_value") and dims[k].dim_value > 0 else None
                 for k in hw_at]
        if self.input_size is not None:
            if any(f is not None and f != want for f, want in zip(fixed, self.input_size)):
                self.fail(f"--input-size {self.input_size[0]},{self.input_size[1]}: the graph's input {v.name!r} is "
                          f"fixed at {shown}", "leave out --input-size, or give the size the graph has")
            for k, want in zip(hw_at, self.input_size):  # the graph is then checked at that size (shapes)
                dims[k].Clear()
                dims[k].dim_value = int(want)
        elif None in fixed:
            self.fail(f"input {v.name!r} has shape {shown}: its height and width are not fixed in the graph",
                      "give the image size to import it at: --input-size H,W (e.g. --input-size 224,224)")
        self.batch_one = dims[0].HasField("dim_value") and dims[0].dim_value == 1  # fixed at 1, as zoo files are
        return v.name, tuple(int(dims[k].dim_value) for k in (c_at, *hw_at))

    def batch_free_reshapes(self) -> None:
        """In a graph whose batch is fixed at 1 (the model zoo's, a torch export with a batch-1 dummy input), a
        Reshape to a constant shape that starts with 1 keeps the batch: it is made to start with 0 (ONNX: copy
        that dimension), which is the same at batch 1 and lets the import take any batch."""
        if not self.batch_one:
            return
        known = dict(self.const)  # initializers, and Constant nodes' values (torch writes shapes as those)
        for node in self.graph.node:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if node.op_type == "Constant" and value is not None and node.output:
                known[node.output[0]] = self._array(value, f"the value of node {node.name!r}")
        for node in self.graph.node:
            if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in known:
                continue
            target = np.asarray(known[node.input[1]])
            if target.ndim == 1 and target.size >= 2 and int(target[0]) == 1:
                name = f"{node.input[1]}/batch"
                value = target.astype(np.int64).copy()
                value[0] = 0
                self.const[name] = value
                self.graph.initializer.append(self.numpy_helper.from_array(value, name))
                node.input[1] = name

    def out_shape(self, node) -> tuple | None:
        """The shape of a node's output as shape inference gave it, or for a Reshape whose target folded to a
        constant, as that target makes it of the input's."""
        known = self.shapes.get(node.output[0])
        if known is None and node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in self.const and \
                self.shapes.get(node.input[0]) is not None:
            known = reshaped(np.ravel(self.const[node.input[1]]).astype(np.int64).tolist(), self.shapes[node.input[0]])
        return known

    def _shapes(self, input_name: str, chw: tuple) -> dict[str, tuple]:
        """Every tensor's shape, the batch being BATCH."""
        helper = self.onnx.helper
        # the weights' values are not needed for shapes, only their shapes: a large initializer goes in as an input
        # of its shape (serialising VGG-19's 550 MB for inference took most of its import); small ones (reshape
        # targets, axes) keep their values for the inference's data propagation
        declared = {v.name for v in self.graph.input}
        # what earlier folding made constant (a Slice's bounds from a Shape, say) goes in as a small initializer in
        # place of the nodes that made it, so that inference sees the values
        folded = {o for n in self.graph.node for o in n.output if o in self.const}
        nodes = [n for n in self.graph.node if not (n.output and all(o in folded for o in n.output))]
        made = [self.numpy_helper.from_array(np.asarray(self.const[o]), o) for o in sorted(folded)
                if np.size(self.const[o]) <= 4096 and np.asarray(self.const[o]).dtype.kind in "iufb"]
        nodes = [n for n in nodes if not any(o in {t.name for t in made} for o in n.output)]
        small = [t for t in self.graph.initializer if int(np.prod(t.dims, dtype=object)) <= 4096] + made
        large = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.graph.initializer
                 if int(np.prod(t.dims, dtype=object)) > 4096 and t.name not in declared]
        graph = helper.make_graph(nodes, self.graph.name or "g", [*self.graph.input, *large],
                                  list(self.graph.output), small)
        m = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        m.ir_version = max(self.model.ir_version, 4)  # IR 3 counts only initializers listed as inputs
        for v in m.graph.input:
            if v.name == input_name:
                v.type.tensor_type.shape.dim[0].Clear()
                v.type.tensor_type.shape.dim[0].dim_value = BATCH
        try:
            m = self.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
        except Exception as e:
            self.fail(f"its shapes cannot be inferred ({type(e).__name__}: {e})")
        shapes = {}
        for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
            dims = v.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims) and v.type.tensor_type.HasField("shape"):
                shapes[v.name] = tuple(int(d.dim_value) for d in dims)
        c, h, w = chw
        shapes[input_name] = (BATCH, h, w, c) if self.nhwc else (BATCH, c, h, w)
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
                a = attrs(node)
                s = np.array(shapes[node.input[0]], np.int64)
                self.const[node.output[0]] = s[a.get("start", 0): a.get("end", len(s))]
                continue
            inputs = [i for i in node.input if i]
            if op not in FOLDED_OPS or not inputs or not all(i in self.const for i in inputs) or \
                    node.output[0] in self.const:  # folded in an earlier round
                continue
            try:
                value = self._evaluate(node, [self.const[i] for i in inputs])
            except (CnnctlError, MemoryError):
                raise
            except Exception as e:  # the reference evaluator's own errors for operands that do not fit
                self.fail(f"node {node.name or node.output[0]!r} ({op}) folds constants that do not fit together "
                          f"({type(e).__name__}: {e})", "the file is damaged; export it again")
            if value is not None:
                self.const[node.output[0]] = value

    def _evaluate(self, node, xs: list[np.ndarray]):
        """A node of constants evaluated by onnx's own reference evaluator at the file's opset; ConstantOfShape and
        Range here, since their size (from a few numbers) is checked before anything is allocated."""
        op, a = node.op_type, attrs(node)
        if op not in ("ConstantOfShape", "Range"):
            return self._reference(node, xs)
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
        start, limit, delta = (np.ravel(x)[0] for x in xs)
        if delta == 0:
            self.fail(f"node {node.name!r} (Range): a step of 0", "the file is damaged; export it again")
        self._room(node, max(0, int(np.ceil((float(limit) - float(start)) / float(delta)))) * 8)
        return np.arange(start, limit, delta, dtype=np.result_type(xs[0]))

    def _reference(self, node, xs: list[np.ndarray]) -> np.ndarray:
        from onnx.reference import ReferenceEvaluator

        helper = self.onnx.helper
        try:  # what a broadcast of the operands would make, checked before it is made
            size = int(np.prod(np.broadcast_shapes(*(np.shape(x) for x in xs)), dtype=object))
        except ValueError:
            size = sum(int(np.size(x)) for x in xs)
        self._room(node, size * max(np.asarray(x).itemsize for x in xs))
        names = [i for i in node.input if i]
        inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(x).dtype),
                                                list(np.shape(x))) for n, x in zip(names, xs)]
        graph = helper.make_graph([node], "fold", inputs, [helper.make_tensor_value_info(node.output[0], 0, None)])
        out = ReferenceEvaluator(graph, opsets={"": self.opset}).run(None, dict(zip(names, map(np.asarray, xs))))
        return np.asarray(out[0])

    def _room(self, node, nbytes: int) -> None:
        """A folded tensor's bytes, checked as training's allocations are, before it is made."""
        check_generated(f"{self.source}: folding node {node.name or node.output[0]!r} ({node.op_type})", nbytes)

    # ---------------------------------------------------------------- patterns

