"""cnnctl.nn: the NumPy layers, losses and model containers. See docs/backprop.md for the math.

Importing a layer module registers its layer types with their specs. Every module of this package is imported
here by one loop (a new layer type is one new module); then the config's types are derived from the registries:
`AnyLayer`, the layer union, and `Activation`, the names the `activation:` key takes.
"""

import importlib
import pkgutil
from typing import Literal

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .activations import (  # noqa: E402  (registered above)
    CELU,
    ELU,
    GELU,
    HardSigmoid,
    HardSwish,
    LeakyReLU,
    LogSoftmax,
    ReLU,
    ReLU6,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
)
from .base import (  # noqa: E402
    ACTIVATIONS,
    REGISTRY,
    SPECS,
    BlockUse,
    Layer,
    LayerSpec,
    Param,
    layer_union,
    make_activation,
    register,
)
from .conv import Conv2D  # noqa: E402
from .dense import Dense, Flatten  # noqa: E402
from .graph import Concat, ConcatSpec, Gate, GateSpec, Residual, ResidualSpec  # noqa: E402
from .hooks import recording  # noqa: E402
from .init import INITS, Init, initialize  # noqa: E402
from .losses import LOSSES, CrossEntropyLoss, Loss, MSELoss, NLLLoss  # noqa: E402
from .model import Model, Sequential, SequentialSpec  # noqa: E402
from .pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D  # noqa: E402
from .regularization import BatchNorm1D, BatchNorm2D, Dropout, Dropout2D  # noqa: E402

Activation = Literal[(*ACTIVATIONS, "linear")]  # "linear": none
AnyLayer = layer_union(BlockUse)
for _spec in SPECS.values():  # specs name these two before they exist: resolve them now
    _spec.model_rebuild(_types_namespace={"AnyLayer": AnyLayer, "Activation": Activation})

__all__ = [
    "REGISTRY", "SPECS", "ACTIVATIONS", "LOSSES", "INITS", "Activation", "Init", "AnyLayer", "BlockUse", "Layer",
    "LayerSpec", "Param", "Loss", "Sequential", "Model", "Residual", "Concat", "register", "make_activation",
    "initialize", "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "Flatten", "Dense",
    "ReLU", "LeakyReLU", "ELU", "CELU", "GELU", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Dropout", "Dropout2D",
    "BatchNorm1D", "BatchNorm2D",
    "CrossEntropyLoss", "MSELoss", "NLLLoss", "SequentialSpec", "ResidualSpec", "ConcatSpec", "recording",
    "ReLU6", "HardSigmoid", "HardSwish", "SiLU", "Gate", "GateSpec",
]
