"""The layer contract, the tree every model is, and the registry of layer types.

Every layer:
  * says its output shape for an input shape without any data (`output_shape`, per sample, no batch axis),
    raising ShapeError when it cannot take that input, so a whole net is checked before training;
  * `forward(x, training=True)` caches exactly what backward needs, overwriting it on every call;
  * `backward(dy)` fills `grads` (same keys as `params`) and returns the gradient for the input (None when
    `set_input_grad(False)` said nobody needs it);
  * keeps non-trainable state in `buffers`, and never owns an optimizer.
A container (Sequential, Residual, Concat) is a layer whose `children()` are layers; parameters, buffers,
state-dict names (PyTorch's: `layers.3.body.0.weight`), dtype casts and gradient resets walk the tree.
Layout is NCHW; parameter names and layouts are PyTorch's.

A layer type is registered once, with the pydantic spec users write in YAML (`@register("conv2d", spec)`):
the config's layer union and its `type` tags are derived from this registry.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, NamedTuple, Union

import numpy as np
from pydantic import ConfigDict, Discriminator, Field, PrivateAttr, Tag

from cnnctl.errors import ShapeError
from cnnctl.registry import registrar
from cnnctl.strict import PosInt, Strict

from .init import is_placeholder

REGISTRY: dict[str, type[Layer]] = {}  # layer classes by tag
SPECS: dict[str, type[LayerSpec]] = {}  # spec classes by the `type` users write (a superset of REGISTRY's tags)
ACTIVATIONS: dict[str, type[Layer]] = {}  # the element-wise layers a conv, dense or batchnorm may apply itself
_register_class = registrar(REGISTRY)


def register(tag: str, spec: type[LayerSpec] | None = None, activation: bool = False):
    """Class decorator: make a layer type known under `tag`, with the spec that builds it (if users can
    write it in a config). `activation=True`: its name is also a value of the `activation:` key of conv2d,
    dense, batchnorm and residual (the layer must build with no arguments)."""

    def deco(cls):
        if spec is not None:
            register_spec(spec)
        if activation:
            ACTIVATIONS[tag] = cls
        return _register_class(tag)(cls)

    return deco


def register_spec(spec: type[LayerSpec]) -> type[LayerSpec]:
    """Make a spec known by its `type` tag (for tags that are not a layer class of their own, like batchnorm)."""
    SPECS[spec.model_fields["type"].annotation.__args__[0]] = spec
    return spec


class Param(NamedTuple):
    """One trainable array of a model: its state-dict name and where it lives. `value` is the array itself
    (optimizers update it in place), `grad` the gradient the last backward left."""

    name: str
    layer: Layer
    key: str

    @property
    def value(self) -> np.ndarray:
        return self.layer.params[self.key]

    @property
    def grad(self) -> np.ndarray:
        return self.layer.grads[self.key]

    @property
    def is_bias_or_norm(self) -> bool:
        return self.key == "bias" or self.layer.is_norm


class Layer:
    """Base class of every layer: no parameters, the output shape of its input; a subclass gives forward and
    backward (the base ones raise) and overrides what else it changes."""

    tag: ClassVar[str] = "layer"
    is_norm: ClassVar[bool] = False  # normalisation parameters (exempt from weight decay on request)
    capability: ClassVar[str | None] = None  # what the layer is to the execution plan (see `planned_as`)
    join_keeps_inputs: ClassVar[bool] = False  # a join whose join_backward reads the joined arrays
    takes_context: ClassVar[bool] = False  # its forward takes `context=` (a Context from the one running it)
    # the ONNX operator the layer is: export writes it (an operator of a newer opset than the export's, GELU's and
    # Mish's, written out in older ones) and import converts it back (nn.ONNX_OPS: the one place its name stands)
    onnx_op: ClassVar[str | None] = None
    needs_input_grad: bool = True
    frozen: bool = False  # trainable: false: its parameters are not updated (a frozen batchnorm uses its running stats)
    activation: Layer | None = None

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------ running it

    def planned_as(self) -> str | None:
        """What this layer declares itself to the execution plan, or None (run it as it is, by its own forward and
        backward). The capabilities: "elementwise" (activations.Elementwise: one function with its derivative),
        "convolution" (the convolution algorithms may run it), "sequence" (children in order), "join" (branches
        on one input, then `join`), "window_max" (max over windows: an increasing function commutes with it),
        "convolution_fold" (after a convolution it can be folded into the convolution's weight and bias: its
        `fold(w, b)` gives them, its `unfold(dw, db, w, b)` maps their gradients back).
        A capability holds only while forward and backward are those of the class that declared it: a subclass
        that rewrites either runs as itself."""
        owner = next(c for c in type(self).__mro__ if "capability" in vars(c))
        cls = type(self)
        if cls.forward is not owner.forward or cls.backward is not owner.backward:
            return None
        return self.capability

    forward_hooks: tuple = ()  # called as hook(layer, output) after each forward through __call__

    def __call__(self, x: np.ndarray, training: bool = True, context: Context | None = None) -> np.ndarray:
        """forward (told `context` where it asks), then the forward hooks: how containers run their children (a
        Model runs through its plan, which calls the hooks too)."""
        y = forward_with(self, x, training, context)
        for hook in self.forward_hooks:
            hook(self, y)
        return y

    def add_forward_hook(self, hook) -> Callable[[], None]:
        """Call hook(layer, output) after every forward of this layer run by its container (torch's
        register_forward_hook); returns the function that removes it. A model's plan fuses nothing across a layer
        with a hook, so the hook sees the layer's own output."""
        self.forward_hooks = (*self.forward_hooks, hook)

        def remove() -> None:
            self.forward_hooks = tuple(h for h in self.forward_hooks if h is not hook)

        return remove

    # ------------------------------------------------------------ the contract

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape)

    def macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates per sample in the forward pass (children included)."""
        return 0

    def receptive_field(self, rf: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        """(height, width, row stride, column stride) in input pixels of what one output position sees, given
        that of this layer's input; None once every output sees the whole input."""
        return rf

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    def onnx(self, g, x: str, input_shape: tuple[int, ...], name: str) -> str:
        """Add this layer's ONNX nodes to g (export.OnnxGraph) reading value x; return the output's name."""
        raise NotImplementedError(f"{self.tag} has no ONNX mapping")

    # ------------------------------------------------------------ the tree

    def children(self) -> list[tuple[str, Layer]]:
        """Named sub-layers (state-dict name parts); none for a plain layer."""
        return []

    def named_layers(self, prefix: str = "") -> Iterator[tuple[str, Layer]]:
        """Every layer below this one, depth first, with its dotted name (this one first, as `prefix`)."""
        yield prefix, self
        for name, child in self.children():
            yield from child.named_layers(f"{prefix}.{name}" if prefix else name)

    def parameters(self) -> Iterator[Param]:
        """Every trainable array of the tree, in state-dict order."""
        for prefix, layer in self.named_layers():
            for key in layer.params:
                yield Param(f"{prefix}.{key}" if prefix else key, layer, key)

    def trainable_parameters(self) -> Iterator[Param]:
        """The parameters of the layers that are not frozen: what optimizers update."""
        return (p for p in self.parameters() if not p.layer.frozen)

    def freeze(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) this layer and every layer below it."""
        for _, layer in self.named_layers():
            layer.frozen = frozen

    def has_trainable(self) -> bool:
        return any(True for _ in self.trainable_parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every parameter and buffer of the tree under its PyTorch-style name."""
        out = {}
        for prefix, layer in self.named_layers():
            for key, value in {**layer.params, **layer.buffers}.items():
                out[f"{prefix}.{key}" if prefix else key] = value
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy arrays in; raises KeyError/ValueError naming the first missing, extra or misshapen entry."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise KeyError(f"missing {missing[:5]}, unexpected {extra[:5]}")
        for name in own:
            value = state[name]
            if own[name].shape != np.shape(value) and not (own[name].shape == () and np.size(value) == 1):
                raise ValueError(f"{name} has shape {np.shape(value)}, the model expects {own[name].shape}")
            value = np.asarray(value)
            if own[name].dtype.kind == "f" and value.dtype.kind != "f":
                raise ValueError(f"{name} is stored as {value.dtype}; the model expects floating-point values")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"{name} holds NaN or infinite values")
        for prefix, layer in self.named_layers():
            for store in (layer.params, layer.buffers):
                for key in store:  # safetensors returns 0-d arrays as shape (1,)
                    value = state[f"{prefix}.{key}" if prefix else key]
                    store[key] = np.array(value, dtype=store[key].dtype).reshape(store[key].shape)
        self.zero_grad()

    def zero_grad(self) -> None:
        for _, layer in self.named_layers():
            layer.grads = {k: v if is_placeholder(v) else np.zeros_like(v) for k, v in layer.params.items()}

    def to(self, dtype) -> Layer:
        """Cast floating parameters and buffers to dtype (float32 by default; float64 for gradient checks)."""
        for _, layer in self.named_layers():
            layer.params = {k: v.astype(dtype) for k, v in layer.params.items()}
            layer.buffers = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in layer.buffers.items()}
        self.zero_grad()
        return self

    def num_params(self) -> int:
        return int(sum(p.value.size for p in self.parameters()))

    def num_frozen_params(self) -> int:
        return int(sum(p.value.size for p in self.parameters() if p.layer.frozen))

    def num_buffer_values(self) -> int:
        """Values of the non-trainable state (BatchNorm's running statistics and batch count)."""
        return int(sum(b.size for _, layer in self.named_layers() for b in layer.buffers.values()))

    def set_input_grad(self, needed: bool) -> None:
        """Whether backward must return the input gradient (the first layer of a model skips it)."""
        self.needs_input_grad = needed

    # ------------------------------------------------------------ helpers for subclasses

    def _activate(self, y: np.ndarray, training: bool, context: Context | None = None,
                  in_place: bool = False) -> np.ndarray:
        """The layer's own activation on its output; `context` (the layer's runner's) passed on where it asks.
        `in_place`: y is the layer's own new array, which its backward does not read: an element-wise activation
        writes its output there (one array less to allocate and fill)."""
        act = self.activation
        if act is None:
            return y
        kw = {"context": context} if context is not None and _takes_context(type(act)) else {}
        if in_place and act.planned_as() == "elementwise":
            kw["out"] = y
        return act.forward(y, training, **kw)

    def _deactivate(self, dy: np.ndarray) -> np.ndarray:
        return dy if self.activation is None else self.activation.backward(dy)

    def _onnx_activation(self, g, x: str, name: str) -> str:
        return x if self.activation is None else self.activation.onnx(g, x, (), name + ".act")

    def _expect_rank(self, input_shape: tuple[int, ...], rank: int, fix: str) -> None:
        if len(input_shape) != rank:
            kind = {1: "(features,)", 3: "(channels, height, width)"}[rank]
            raise ShapeError(
                f"{self.tag} expects a {rank}-D input per sample {kind}, got shape {tuple(input_shape)}", fix
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def channels(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Channels lo:hi of an (N, C, ...) array (features lo:hi of an (N, F) one)."""
    return a[:, lo:hi] if a.ndim > 1 else a[lo:hi]


def whole(like: np.ndarray, work: Callable[[int, int], object]) -> None:
    """work(0, C): all the channels of arrays shaped like `like` at once."""
    work(0, like.shape[1] if like.ndim > 1 else like.shape[0])


def whole_product(rows: int, work: Callable[[int, int], object], macs: int) -> None:
    """work(0, rows): a matrix product's rows all at once."""
    work(0, rows)


@dataclass
class Context:
    """What the one running a model tells the layers that ask (`takes_context`), through forward's `context=`:
    `per_channel(like, work)` runs work(lo, hi) over slices of the channels of arrays shaped like `like`, as the
    runner cuts them (cnnctl.parallel's threads; by default all channels at once); `part` = (lo, hi, n) when the
    input is rows lo:hi of a batch of n whose other rows other processes hold (dropout draws the whole batch's
    mask and keeps these rows); `sum` a function summing per-channel float64 arrays in place over those processes
    (batchnorm's statistics of the whole batch); `per_product(rows, work, macs)` runs work(lo, hi) over slices of
    the rows of a matrix product of `macs` multiply-adds (a dense layer's). The default: one process, the whole
    batch, no threads."""

    part: tuple[int, int, int] | None = None
    sum: Callable[[np.ndarray], object] | None = None
    per_channel: Callable[[np.ndarray, Callable[[int, int], object]], None] = whole
    per_product: Callable[[int, Callable[[int, int], object], int], None] = whole_product


@functools.cache
def _takes_context(cls: type) -> bool:
    """Whether a layer class's forward takes `context=` (it says so, and a subclass's forward may not)."""
    return cls.takes_context and "context" in inspect.signature(cls.forward).parameters


def forward_with(layer: Layer, x: np.ndarray, training: bool, context: Context | None) -> np.ndarray:
    """layer.forward, with `context=` where the layer takes one."""
    if context is not None and _takes_context(type(layer)):
        return layer.forward(x, training, context=context)
    return layer.forward(x, training)


def make_activation(name: str | None) -> Layer | None:
    """An activation layer from its tag ("relu", "tanh", ...), or None for None / "linear"."""
    if name is None or name == "linear":
        return None
    return ACTIVATIONS[name]()


# ---------------------------------------------------------------- specs


class LayerSpec(Strict):
    """Base of every layer spec: a `type` tag (declared by each subclass) and an optional name."""

    name: str | None = Field(None, description="Optional display name for inspect and error messages.")
    trainable: bool = Field(True, description="false freezes the layer (or block): its parameters are not updated "
                            "or decayed, a frozen batchnorm normalises with its running statistics, and backward "
                            "stops below the lowest trainable layer. train.unfreeze_at_epoch unfreezes everything.")
    _block: str | None = PrivateAttr(None)  # the block this layer was made from, for display

    @property
    def display_type(self) -> str:
        return self._block or self.type  # type: ignore[attr-defined]

    def layer_lists(self) -> dict[str, list[LayerSpec]]:
        """The layer lists this spec holds (containers), by the name used in error paths."""
        return {}

    def with_layer_lists(self, lists: dict[str, list[LayerSpec]]) -> LayerSpec:
        """A copy with its layer lists replaced (after blocks are expanded)."""
        return self

    def build(self, input_shape: tuple[int, ...], scope) -> Layer:
        """The layer for the shape that reaches it. `scope` (builder.Scope) gives `rng` and builds children."""
        return REGISTRY[self.type]()  # type: ignore[attr-defined]


def _layer_tag(v: Any) -> str | None:
    t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    if not isinstance(t, str):
        return None
    return t if t in SPECS else "block"


def layer_union(block_use: type[LayerSpec]):
    """The annotated union of every registered spec, discriminated on `type`; any other `type` is a use of a
    block defined under model.blocks (resolved, or refused with the known types, by cnnctl.blocks)."""
    members = tuple(Annotated[spec, Tag(tag)] for tag, spec in SPECS.items()) + (Annotated[block_use, Tag("block")],)
    return Annotated[Union[members], Discriminator(_layer_tag, custom_error_type="missing_type",  # noqa: UP007
                                                         custom_error_message="missing 'type'")]


class BlockUse(LayerSpec):
    """A use of a block defined under model.blocks: `type` is the block's name, the other keys its parameters."""

    model_config = ConfigDict(extra="allow")
    type: str
    repeat: Annotated[PosInt, Field(le=1000)] = Field(1, description="Stack this many copies of the block, each "
                                                      "with its own weights (at most 1000).")
