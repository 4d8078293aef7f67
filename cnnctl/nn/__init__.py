"""cnnctl.nn: the NumPy layers, losses and model container. See docs/backprop.md for the math."""

from .activations import ELU, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .base import REGISTRY, Layer, make_activation, register
from .conv import Conv2D
from .dense import Dense, Flatten
from .init import INITS, initialize
from .losses import LOSSES, CrossEntropyLoss, Loss, MSELoss
from .model import Sequential
from .pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from .regularization import BatchNorm1D, BatchNorm2D, Dropout

__all__ = [
    "REGISTRY", "LOSSES", "INITS", "Layer", "Loss", "Sequential", "register", "make_activation", "initialize",
    "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "Flatten", "Dense",
    "ReLU", "LeakyReLU", "ELU", "Sigmoid", "Tanh", "Softmax", "Dropout", "BatchNorm1D", "BatchNorm2D",
    "CrossEntropyLoss", "MSELoss",
]
