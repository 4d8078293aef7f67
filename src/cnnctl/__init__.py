"""cnnctl: declarative, config-driven training of convolutional networks on a pure NumPy core.

The Python API (cnnctl/api.py; docs/library.md): `cnnctl.train(config)` -> Run, `cnnctl.load(path)` -> Predictor,
`cnnctl.evaluate(path)` -> dict. They are imported on first use, so `import cnnctl` stays light.
"""

from .version import __version__

_API = ("train", "load", "evaluate", "Run", "Predictor")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cnnctl' has no attribute {name!r}")
