"""cnnctl: declarative, config-driven training of convolutional networks on a pure NumPy core."""

__version__ = "0.1.0"
