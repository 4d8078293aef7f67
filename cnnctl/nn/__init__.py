"""cnnctl.nn: the NumPy layers, losses and model containers. See docs/backprop.md for the math.

Importing a layer module registers its layer types with their specs. Every module of this package is
imported here (a new layer type is one new module), then `AnyLayer`, the config's layer union, is derived
from the registry.
"""

import importlib
import pkgutil

from .activations import ELU, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .base import REGISTRY, SPECS, BlockUse, Layer, LayerSpec, Param, layer_union, make_activation, register
from .conv import Conv2D
from .dense import Dense, Flatten
from .graph import Concat, ConcatSpec, Residual, ResidualSpec
from .hooks import recording
from .init import INITS, initialize
from .losses import LOSSES, CrossEntropyLoss, Loss, MSELoss
from .model import Model, Sequential, SequentialSpec
from .pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from .regularization import BatchNorm1D, BatchNorm2D, Dropout

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

AnyLayer = layer_union(BlockUse)
for _spec in SPECS.values():  # containers hold lists of AnyLayer: resolve that name now that it exists
    _spec.model_rebuild(_types_namespace={"AnyLayer": AnyLayer})

__all__ = [
    "REGISTRY", "SPECS", "LOSSES", "INITS", "AnyLayer", "BlockUse", "Layer", "LayerSpec", "Param", "Loss",
    "Sequential", "Model", "Residual", "Concat", "register", "make_activation", "initialize",
    "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "Flatten", "Dense",
    "ReLU", "LeakyReLU", "ELU", "Sigmoid", "Tanh", "Softmax", "Dropout", "BatchNorm1D", "BatchNorm2D",
    "CrossEntropyLoss", "MSELoss", "SequentialSpec", "ResidualSpec", "ConcatSpec", "recording",
]
