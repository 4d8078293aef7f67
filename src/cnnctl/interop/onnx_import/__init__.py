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

In stages, a module each: read.py reads and checks the file; graph.py folds constants and infers shapes;
rewrite.py turns every exporter's spelling into one form; walk.py walks the graph, converting each node by its
operator's converter (convert.py: one registered function per ONNX operator); emit.py writes the config and the
checkpoint.
"""

from .emit import build, check_out_dir, write
from .walk import Imported, import_model

__all__ = ["Imported", "build", "check_out_dir", "import_model", "write"]
