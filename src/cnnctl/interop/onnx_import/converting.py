"""What a converter works with: the importer's state (weights under provisional keys, the tensors used, what the
graph ends with, a Pad waiting for the Conv or pooling after it, whether the tensor at hand is flat) and the checked
readers of a node's weights and attributes, which name the node in every message."""

from __future__ import annotations

import numpy as np

from cnnctl.core.nn import ACTIVATIONS, SPECS, Elementwise

from .graph import Graph

# activations cnnctl layers may apply themselves (conv2d, dense, batchnorm, residual: `activation:`): the registry's
# element-wise ones with no parameter of their own (a LeakyRelu's slope needs a layer)
FOLDABLE = {tag for tag, cls in ACTIVATIONS.items()
            if issubclass(cls, Elementwise) and set(SPECS[tag].model_fields) <= {"type", "name", "trainable"}}


class Converting(Graph):
    """The graph with the state converters read and write; `flat`: cnnctl's (N, C) where the graph's is
    (N, C, 1, 1) after a global pooling."""

    def __init__(self, model, source: str, input_size: tuple[int, int] | None = None):
        super().__init__(model, source, input_size)
        self.weights: dict[str, np.ndarray] = {}
        self.used: set[str] = set()
        self.final: str | None = None
        self.normalization: dict | None = None
        self.pending: list[int] | None = None
        self.flat = False
        self.node = None
        self.hwc: tuple | None = None  # (C, H, W) of maps transposed to NHWC before the flatten (tf2onnx)

    def data_inputs(self, node) -> list[str]:
        """The node's inputs that are not constants (its data)."""
        return [i for i in node.input if i and i not in self.const]

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


