"""Blocks: layer types users define once under model.blocks and use with arguments and `repeat`.

    blocks:
      basic:
        params: {filters: 16, stride: 1}       # defaults; a null default must be given at every use
        type: residual
        body: [{type: conv2d, filters: $filters, kernel_size: 3, stride: $stride, padding: 1}, ...]
    layers:
      - {type: basic, filters: 32, stride: 2, repeat: 2}

A use expands into the block's layer with every `$name` value replaced by the argument (or default), then
validated like any layer; `repeat: N` makes a sequential of N copies (each with its own weights). Errors
name the use, the block, the key and their lines.
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from cnnctl.core import nn
from cnnctl.errors import ConfigError

from .messages import error_loc, error_message, format_path, origin

_ADAPTER = TypeAdapter(nn.AnyLayer)
MAX_BLOCK_DEPTH = 32
MAX_LAYERS = 100_000  # layers a model may expand to (ResNet-1001 has about 3,000): repeats multiply


def size(spec: nn.LayerSpec) -> int:
    """Layers in a resolved spec, its nested lists included."""
    return 1 + sum(size(child) for layers in spec.layer_lists().values() for child in layers)


def resolve(model, data: Any = None, root: yaml.Node | None = None, source: str = "config",
            overrides: list[str] = ()) -> list[nn.LayerSpec]:
    """model.layers with every block use expanded (recursively) into concrete layer specs."""
    return _Resolver(model.blocks, data, root, source, overrides).list(model.layers, ("model", "layers"), ())


def params_of(block: dict) -> dict[str, Any]:
    """A block's parameters and defaults (a list of names means all are required)."""
    params = block.get("params") or {}
    return {p: None for p in params} if isinstance(params, list) else dict(params)


class _Resolver:
    def __init__(self, blocks: dict, data: Any, root: yaml.Node | None, source: str, overrides: list[str]):
        self.blocks, self.data, self.root, self.source, self.overrides = blocks, data, root, source, overrides
        self.made = 0  # layers made by block uses so far (nested uses counted again in their copies: a bound)

    def where(self, loc: tuple) -> str:
        return format_path(loc, self.data) + origin(self.root, loc, self.data, self.overrides)

    def fail(self, loc: tuple, message: str, hint: str | None = None):
        raise ConfigError(f"{self.source}: {self.where(loc)}: {message}", hint or "correct the block or its use; "
                          "`cnnctl inspect CONFIG` checks a config without training")

    def list(self, specs: list, loc: tuple, stack: tuple) -> list[nn.LayerSpec]:
        return [self.one(spec, (*loc, i), stack) for i, spec in enumerate(specs)]

    def one(self, spec: nn.LayerSpec, loc: tuple, stack: tuple) -> nn.LayerSpec:
        if isinstance(spec, nn.BlockUse):
            return self.use(spec, loc, stack)
        lists = spec.layer_lists()
        if not lists:
            return spec
        return spec.with_layer_lists({key: self.list(layers, (*loc, *key), stack) for key, layers in lists.items()})

    def use(self, use: nn.BlockUse, loc: tuple, stack: tuple) -> nn.LayerSpec:
        name = use.type
        if name not in self.blocks:
            known = sorted(nn.SPECS) + sorted(self.blocks)
            close = difflib.get_close_matches(name, known, n=1)
            guess = f"did you mean '{close[0]}'? " if close else ""
            defined = f"; blocks: {', '.join(sorted(self.blocks))}" if self.blocks else ""
            self.fail((*loc, "type"), f"unknown type '{name}'; {guess}known types: {', '.join(sorted(nn.SPECS))}"
                      f"{defined}", "use a known layer type, or define the block under model.blocks")
        if len(stack) >= MAX_BLOCK_DEPTH:
            self.fail(loc, f"blocks use blocks more than {MAX_BLOCK_DEPTH} deep ({' > '.join((*stack, name))})",
                      "flatten the chain of blocks")
        if name in stack:
            self.fail(loc, f"block '{name}' uses itself ({' > '.join((*stack, name))})", "a block cannot contain "
                      "itself; use repeat: N to stack copies")
        block = self.blocks[name]
        params = params_of(block)
        args = dict(use.model_extra or {})
        for key in args:
            if key not in params:
                close = difflib.get_close_matches(key, list(params), n=1)
                guess = f"did you mean '{close[0]}'? " if close else ""
                self.fail((*loc, key), f"block '{name}' has no parameter '{key}'; {guess}its parameters: "
                          f"{', '.join(params) or '(none)'}, plus name, repeat and trainable",
                          f"remove '{key}' or declare it under model.blocks.{name}.params")
        missing = [p for p, default in params.items() if default is None and p not in args]
        if missing:
            self.fail(loc, f"block '{name}' needs parameter{'s' if len(missing) > 1 else ''} "
                      f"{', '.join(missing)} (no default)", f"add {missing[0]}: VALUE to this layer")
        values = {**params, **args}
        home = ("model", "blocks", name)
        raw = self.substitute({k: v for k, v in block.items() if k != "params"}, values, home, name)
        try:
            layer = _ADAPTER.validate_python(raw)
        except ValidationError as e:
            problems, at = [], loc
            for err in e.errors():
                inner = error_loc(err)
                src = _value_at(block, inner)
                via = ""
                if _is_ref(src, values):
                    via = f" (from {src} = {values[src[1:]]!r})"
                    if src[1:] in args:  # point at the argument that does not fit
                        at = (*loc, src[1:])
                problems.append(f"block '{name}' {format_path(inner, raw)}"
                                f"{origin(self.root, (*home, *inner), self.data, self.overrides)}: "
                                f"{error_message(err)}{via}")
            self.fail(at, "; ".join(problems))
        layer = self.one(layer, home, (*stack, name))
        layer._block = name
        self.made += size(layer) * use.repeat  # before any copy is made
        if self.made > MAX_LAYERS:
            self.fail((*loc, "repeat") if use.repeat > 1 else loc,
                      f"the block uses expand to more than {MAX_LAYERS:,} layers (block '{name}' has {size(layer):,}"
                      f" layers, used {use.repeat:,} times here)", "lower repeat; nested repeats multiply")
        if use.repeat > 1:
            copies = [layer.model_copy(deep=True) for _ in range(use.repeat)]
            for c in copies:
                c._block = name
            layer = nn.SequentialSpec(type="sequential", layers=copies)
            layer._block = f"{name} x{use.repeat}"
        if use.name:
            layer = layer.model_copy(update={"name": use.name})
        if not use.trainable:
            layer = layer.model_copy(update={"trainable": False})
        return layer

    def substitute(self, value: Any, values: dict, loc: tuple, block: str) -> Any:
        """value with every "$param" string replaced by the parameter's value."""
        if isinstance(value, dict):
            return {k: self.substitute(v, values, (*loc, k), block) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, values, (*loc, i), block) for i, v in enumerate(value)]
        if isinstance(value, str) and value.startswith("$"):
            if value[1:] not in values:
                self.fail(loc, f"block '{block}' uses {value} but declares no parameter '{value[1:]}' (its "
                          f"parameters: {', '.join(values) or 'none'})", f"add {value[1:]} to model.blocks.{block}"
                          ".params, or fix the spelling")
            return values[value[1:]]
        return value


def _value_at(block: dict, loc: tuple) -> Any:
    """The value in a block's definition at a validation error's location (union tags skipped)."""
    node: Any = block
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and (part == node.get("type") or part in nn.SPECS or part == "block"):
            continue
        else:
            return None
    return node


def _is_ref(value: Any, values: dict) -> bool:
    return isinstance(value, str) and value.startswith("$") and value[1:] in values
