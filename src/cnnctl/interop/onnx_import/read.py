"""Reading an ONNX file for import, and checking it before anything in it is used.

A file from elsewhere is data an attacker may have written. Before the importer looks at a node:
- the file is a regular file of bounded size, parsed as protobuf (no code runs);
- every tensor (initializers and Constant nodes) has a numeric data type, non-negative dimensions, as many bytes
  as its dimensions declare, and a size the machine can spare (the memory check training uses), all checked
  before the tensor is made into an array; external data is read only from regular files inside the model's
  folder, never from the working directory, by the bounded reader;
- every node of the default domain has the inputs and attributes its operator's schema requires, each attribute
  of the type the schema gives, and at least one output;
- the nodes can be ordered (no cycle: checked iteratively, whatever the graph's depth) and no tensor is written by
  two nodes.
Each problem is one CnnctlError that names the file, the tensor, node or attribute and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cnnctl.core.fileio import Unreadable, read_regular
from cnnctl.core.memory import refuse_over
from cnnctl.errors import CnnctlError
from cnnctl.extras import require

MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit for one message
MAX_EXTERNAL_BYTES = 16 << 30  # one external data file
# one tensor made from a few numbers in the file (ConstantOfShape, Range): the model zoo's files ship their weights
# that way (VGG-19's largest, 25088 x 4096 floats, is 411 MB); a tiny file must not make a larger one
MAX_GENERATED_BYTES = 1 << 30


class ModelError(CnnctlError):
    """A file that is not a well-formed ONNX image classifier: the message names what is wrong and where."""


def onnx_modules():
    onnx = require("onnx", "onnx", "cnnctl import needs the onnx package, which is not installed")
    from onnx import numpy_helper, shape_inference
    return onnx, numpy_helper, shape_inference


def read_model(path: Path):
    """The ONNX model in a file, checked (see the module's docstring), external data read in."""
    onnx, _, _ = onnx_modules()
    path = Path(path)
    try:
        raw = read_regular(path, MAX_ONNX_BYTES)
    except Unreadable as e:
        if e.missing:
            raise CnnctlError(f"ONNX file not found: {path}", "check the path") from None
        raise CnnctlError(f"cannot read {path}: {e.reason}", "give an .onnx file") from None
    refuse_over(f"reading {path}", 3 * len(raw), 2, CnnctlError, "the model is too large for this machine")
    try:
        model = onnx.load_model_from_string(raw)
    except Exception as e:  # protobuf's DecodeError and friends
        raise CnnctlError(f"{path}: not an ONNX model ({type(e).__name__}: {e})",
                          "give a file written by torch.onnx.export, tf2onnx or cnnctl export") from None
    check(model, path)
    return model


def opset_of(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check(model, path: Path) -> None:
    """Raise ModelError for the first problem of the kinds in the module's docstring."""
    where = str(path)
    graph = model.graph
    budget = _Budget(where)
    for t in graph.initializer:
        check_tensor(t, f"tensor {t.name!r}", Path(path).parent, budget, where)
    opset = opset_of(model)
    for node in graph.node:
        _check_node(node, opset, Path(path).parent, budget, where)
    _check_order(graph, where)
    _check_generated_sizes(graph, where)


# ---------------------------------------------------------------- tensors


class _Budget:
    """The bytes the file's tensors declare, added up and held against what the machine can spare."""

    def __init__(self, where: str):
        self.where, self.total = where, 0

    def take(self, nbytes: int, what: str) -> None:
        self.total += nbytes
        refuse_over(f"{self.where}: {what} ({self.total:,} bytes of tensors so far)", self.total, 2, ModelError,
                    "the file declares more data than this machine can hold: it is damaged or not meant for it")


def _numeric_types():
    from onnx import TensorProto as T

    return {T.FLOAT: 4, T.DOUBLE: 8, T.FLOAT16: 2, T.BFLOAT16: 2, T.INT8: 1, T.UINT8: 1, T.INT16: 2, T.UINT16: 2,
            T.INT32: 4, T.UINT32: 4, T.INT64: 8, T.UINT64: 8, T.BOOL: 1}


def _type_name(code: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(code)
    except ValueError:
        return f"type code {code}"


def check_tensor(t, what: str, folder: Path, budget: _Budget, where: str) -> None:
    """Data type, dimensions, declared against present bytes, external data read in (in place: t.raw_data)."""
    from onnx import TensorProto

    sizes = _numeric_types()
    if t.data_type not in sizes:
        raise ModelError(f"{where}: {what} has data type {_type_name(t.data_type)}, not a numeric one",
                         "a weight or constant is a float or integer tensor; the file is damaged")
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise ModelError(f"{where}: {what} has a negative dimension {dims}", "the file is damaged")
    count = int(np.prod(dims, dtype=object)) if dims else 1
    nbytes = count * sizes[t.data_type]
    budget.take(nbytes, f"{what} of shape {dims}")
    if t.data_location == TensorProto.EXTERNAL:
        t.raw_data = _external_bytes(t, what, folder, nbytes, where)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
    if t.HasField("raw_data"):
        present, unit = len(t.raw_data), "bytes"
        expected = nbytes
    else:
        field = {TensorProto.FLOAT: "float_data", TensorProto.DOUBLE: "double_data", TensorProto.INT64: "int64_data",
                 TensorProto.UINT32: "uint64_data", TensorProto.UINT64: "uint64_data"}.get(t.data_type, "int32_data")
        present, unit, expected = len(getattr(t, field)), "values", count
    if present != expected:
        raise ModelError(f"{where}: {what} declares shape {dims} ({expected:,} {unit}) but holds {present:,} {unit}",
                         "the file is damaged or truncated; export it again")


def _external_bytes(t, what: str, folder: Path, nbytes: int, where: str) -> bytes:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    try:
        offset, length = int(info.get("offset", 0) or 0), int(info.get("length", nbytes) or nbytes)
    except ValueError:
        raise ModelError(f"{where}: {what}'s external data has offset {info.get('offset')!r} and length "
                         f"{info.get('length')!r}, not whole numbers", "the file is damaged") from None
    fix = "keep the model's data files in the model's own folder, named relative to it (as onnx.save writes them)"
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts or "\0" in location:
        raise ModelError(f"{where}: {what}'s external data {location!r} is not a file inside the model's folder",
                         fix)
    target = folder / rel
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([real_folder, os.path.realpath(target)]) != real_folder:
        raise ModelError(f"{where}: {what}'s external data {location!r} leads outside the model's folder "
                         "(a link); it must be inside the model's folder", fix)
    if offset < 0 or length != nbytes:
        raise ModelError(f"{where}: {what}'s external data is {length:,} bytes at offset {offset:,}; its shape "
                         f"needs {nbytes:,}", "the file is damaged; export it again")
    try:
        data = read_regular(target, offset + length)
    except Unreadable as e:
        if e.missing:
            raise ModelError(f"{where}: {what}'s external data file {location!r} was not found beside the model "
                             f"({target})", fix) from None
        if "more than" in e.reason:  # a larger file: read only the part the tensor names
            data = _read_part(target, offset, length, what, where)
            return data
        raise ModelError(f"{where}: {what}'s external data {target}: {e.reason}", fix) from None
    if len(data) < offset + length:
        raise ModelError(f"{where}: {what}'s external data {target} has {len(data):,} bytes; the tensor needs "
                         f"{length:,} at offset {offset:,}", "the data file is truncated; copy it again")
    return data[offset:offset + length]


def _read_part(target: Path, offset: int, length: int, what: str, where: str) -> bytes:
    """length bytes at offset of a regular file larger than them (the shared data file of many tensors)."""
    import stat

    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ModelError(f"{where}: {what}'s external data {target}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < offset + length or length > MAX_EXTERNAL_BYTES:
            raise ModelError(f"{where}: {what}'s external data {target} does not hold {length:,} bytes at offset "
                             f"{offset:,}", "the data file is damaged or truncated")
        f.seek(offset)
        return f.read(length)


# ---------------------------------------------------------------- nodes


def _attribute_type_name(code: int) -> str:
    from onnx import AttributeProto

    return AttributeProto.AttributeType.Name(code)


_PLAIN = {"INT": "an integer", "INTS": "integers", "FLOAT": "a number", "FLOATS": "numbers", "STRING": "a string",
          "STRINGS": "strings", "TENSOR": "a tensor", "GRAPH": "a graph"}


def _check_node(node, opset: int, folder: Path, budget: _Budget, where: str) -> None:
    from onnx import defs

    label = f"node {node.name or (node.output[0] if node.output else '?')!r} ({node.op_type})"
    if not node.output or not any(node.output):
        raise ModelError(f"{where}: {label} has no output", "the file is damaged")
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        values = [a for a in node.attribute if a.name.startswith("value")]
        if len(values) != 1:
            raise ModelError(f"{where}: {label} has {len(values)} value attributes; a Constant has exactly one",
                             "the file is damaged")
        if values[0].HasField("t"):
            check_tensor(values[0].t, f"the value of {label}", folder, budget, where)
    if node.domain not in ("", "ai.onnx"):
        return  # named with the other operators cnnctl does not take, after folding
    try:
        schema = defs.get_schema(node.op_type, max(opset, 1), "")
    except Exception:  # not an ONNX operator at this opset: named later with the operators cnnctl does not take
        return
    for i, formal in enumerate(schema.inputs):
        if formal.option == defs.OpSchema.FormalParameterOption.Single and (i >= len(node.input) or
                                                                             not node.input[i]):
            raise ModelError(f"{where}: {label} lacks its input {i + 1} ({formal.name}), which {node.op_type} "
                             f"requires ({len(node.input)} given)", "the file is damaged; export it again")
    expected = schema.attributes
    for a in node.attribute:
        if a.name not in expected:
            continue
        want = expected[a.name].type
        if a.type != want:
            want_name = _attribute_type_name(want)
            raise ModelError(f"{where}: attribute {a.name!r} of {label} is {_attribute_type_name(a.type)}, where "
                             f"{node.op_type} takes {want_name} ({_PLAIN.get(want_name, want_name)})",
                             "the file is damaged; export it again")
    given = {a.name for a in node.attribute}
    for name, formal in expected.items():
        if formal.required and name not in given:
            raise ModelError(f"{where}: {label} lacks its attribute {name!r}, which {node.op_type} requires",
                             "the file is damaged; export it again")


def _check_generated_sizes(graph, where: str) -> None:
    """Range and ConstantOfShape nodes make tensors whose size the file gives as numbers, not as bytes: where those
    numbers are constants, the size is checked before anything (shape inference included) makes the tensor."""
    from onnx import numpy_helper

    known = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and node.output:
                known[node.output[0]] = value
    for node in graph.node:
        if node.op_type not in ("Range", "ConstantOfShape") or not all(i in known for i in node.input if i):
            continue
        try:
            xs = [numpy_helper.to_array(known[i]).ravel() for i in node.input if i]
            if node.op_type == "Range":
                start, limit, delta = (float(x[0]) for x in xs[:3])
                count = 0 if delta == 0 else max(0, int(np.ceil((limit - start) / delta)))
            else:
                count = int(np.prod([max(int(d), 0) for d in xs[0]], dtype=object))
        except (ValueError, IndexError, OverflowError, TypeError):
            continue  # named with the fold that cannot be made
        check_generated(f"{where}: node {node.name or node.output[0]!r} ({node.op_type}) makes {count:,} values, "
                        "which", count * 8)


def check_generated(what: str, nbytes: int) -> None:
    """A tensor the file makes from a few numbers: at most MAX_GENERATED_BYTES, and what the machine can spare."""
    fix = "the file asks for a constant larger than any classifier's weight: it is damaged or hostile"
    if nbytes > MAX_GENERATED_BYTES:
        raise ModelError(f"{what} would take {nbytes / 1e9:,.1f} GB, more than the {MAX_GENERATED_BYTES / 1e9:.1f} GB "
                         "a generated constant may take", fix)
    refuse_over(what, nbytes, 4, ModelError, fix)


def _check_order(graph, where: str) -> None:
    """No tensor written twice, and no cycle: Kahn's ordering, iteratively."""
    producer: dict[str, int] = {}
    for k, node in enumerate(graph.node):
        for o in node.output:
            if not o:
                continue
            if o in producer:
                raise ModelError(f"{where}: tensor {o!r} is written by two nodes ({graph.node[producer[o]].name!r} "
                                 f"and {node.name!r})", "the file is damaged")
            producer[o] = k
    waiting = [0] * len(graph.node)
    users: dict[int, list[int]] = {}
    for k, node in enumerate(graph.node):
        for i in set(node.input):
            if i in producer:
                waiting[k] += 1
                users.setdefault(producer[i], []).append(k)
    ready = [k for k, n in enumerate(waiting) if n == 0]
    done = 0
    while ready:
        k = ready.pop()
        done += 1
        for u in users.get(k, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if done < len(graph.node):
        k = next(k for k, n in enumerate(waiting) if n > 0)
        seen = set()
        while k not in seen:  # back along unfinished inputs until a node comes round again: it lies on the cycle
            seen.add(k)
            k = next(producer[i] for i in graph.node[k].input if i in producer and waiting[producer[i]] > 0)
        stuck = graph.node[k]
        raise ModelError(f"{where}: the graph has a cycle: node {stuck.name or stuck.output[0]!r} ({stuck.op_type}) "
                         "depends on its own output", "an ONNX graph is acyclic; the file is damaged")
