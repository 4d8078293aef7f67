"""cnnctl.nn: the NumPy layers, losses and model containers. See docs/backprop.md for the math.

Importing a layer module registers its layer types with their specs. Every module of this package is imported
here by one loop (a new layer type is one new module); then the config's types are derived from the registries:
`AnyLayer`, the layer union, and `Activation`, the names the `activation:` key takes; and every layer class is
exported by its class name.
"""

import importlib
import pkgutil
from typing import Literal

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .activations import Elementwise  # noqa: E402  (registered above)
from .base import (  # noqa: E402
    ACTIVATIONS,
    REGISTRY,
    SPECS,
    BlockUse,
    Context,
    Layer,
    LayerSpec,
    Param,
    layer_union,
    make_activation,
    register,
)
from .graph import ConcatSpec, GateSpec, ResidualSpec  # noqa: E402
from .hooks import recording  # noqa: E402
from .init import INITS, Init, initialize  # noqa: E402
from .losses import LOSSES, BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss, NLLLoss  # noqa: E402
from .model import Model, SequentialSpec  # noqa: E402

# every registered layer type by its class name (nn.Conv2D, nn.ReLU, nn.Residual, ...): a new layer module adds
# itself, with no line here
LAYER_CLASSES = {cls.__name__: cls for cls in REGISTRY.values()}
globals().update(LAYER_CLASSES)

# the ONNX operator of each layer type that is one (its class's onnx_op): export and import read this one table
ONNX_OPS = {tag: cls.onnx_op for tag, cls in REGISTRY.items() if cls.onnx_op}

Activation = Literal[(*ACTIVATIONS, "linear")]  # "linear": none
AnyLayer = layer_union(BlockUse)
for _spec in SPECS.values():  # specs name these two before they exist: resolve them now
    _spec.model_rebuild(_types_namespace={"AnyLayer": AnyLayer, "Activation": Activation})

__all__ = [
    "REGISTRY", "SPECS", "ONNX_OPS", "ACTIVATIONS", "LOSSES", "INITS", "Activation", "Init", "AnyLayer", "BlockUse",
    "Context",
    "Layer", "LayerSpec", "Param", "Loss", "Model", "Elementwise", "register", "make_activation", "initialize",
    "BCEWithLogitsLoss", "CrossEntropyLoss", "MSELoss", "NLLLoss", "SequentialSpec", "ResidualSpec", "ConcatSpec",
    "GateSpec", "recording", *LAYER_CLASSES,
]
