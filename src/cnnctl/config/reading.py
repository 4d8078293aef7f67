"""A config file into a validated `Spec`: YAML read safely (bounded size and alias expansion, line numbers kept),
the chain of base configs it `extends:`, `--set KEY=VALUE` overrides, data paths made absolute, and validation
whose errors name key paths and YAML lines (ConfigError)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cnnctl.core.fileio import Unreadable, read_regular
from cnnctl.errors import ConfigError

from . import blocks
from .messages import format_validation_error, line_of
from .spec import Spec


def _is_int(text: str) -> bool:
    """Whether a --set path part is a list index as int() reads it: ASCII digits, maybe a leading '-'."""
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit()


SHORTHANDS = ("loss", "optimizer", "schedule")  # sections a name alone may stand for: `loss: mse` is {type: mse}


def _set_path(data: dict, dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        key: Any = int(part) if isinstance(node, list) and _is_int(part) else part
        try:
            if i == 0 and key in SHORTHANDS and isinstance(node.get(key), str):
                node[key] = {"type": node[key]}  # `loss: cross_entropy` is {type: cross_entropy}: set into that
            node = node[key]
        except (KeyError, IndexError, TypeError):
            if isinstance(node, dict):
                node[key] = {}
                node = node[key]
            else:
                raise ConfigError(f"{origin}: cannot set '{dotted}': '{'.'.join(parts[: i + 1])}' does not exist",
                                  "use a dotted path of existing keys, e.g. optimizer.lr=0.01 or "
                                  "model.layers.0.filters=8") from None
    last: Any = parts[-1]
    if isinstance(node, list):
        if not _is_int(last) or not -len(node) <= int(last) < len(node):
            raise ConfigError(f"{origin}: cannot set '{dotted}': no list item {last}")
        last = int(last)
    elif not isinstance(node, dict):
        raise ConfigError(f"{origin}: cannot set '{dotted}': '{'.'.join(parts[:-1])}' is {node!r}, not a mapping",
                          f"set '{'.'.join(parts[:-1])}' whole instead, e.g. {'.'.join(parts[:-1])}={{...}}")
    node[last] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `KEY=VALUE` strings (dotted paths, values parsed as YAML) to a copy of the raw config."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE", "e.g. --set optimizer.lr=0.01")
        if key.strip() == "extends":
            raise ConfigError(f"--set {item!r}: `extends` is read from the config file, before any --set",
                              "write `extends: BASE.yaml` in the config, or run the base config with --set")
        value = load_yaml(raw, f"--set {item!r}")[0] if raw.strip() else None
        _set_path(data, key.strip(), value, "--set")
    return data


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key_node.value}' (first given at line {seen[key_node.value]}; "
                        "YAML would silently keep only the last)", key_node.start_mark)
                seen[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


MAX_YAML_NODES = 200_000  # after expanding aliases; a config has a few hundred, an alias bomb billions


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the document with every alias expanded, computed without expanding (memoised per node)."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), 10 * MAX_YAML_NODES)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml(text: str, source: str, mark_name: str | None = None) -> tuple[Any, yaml.Node | None]:
    """The one YAML reader for configs and what cnnctl wrote from them: safe (no code), keys unique, aliases
    bounded; returns the data and its node tree (for line numbers; `mark_name` names the file in the nodes'
    marks). Errors are ConfigErrors naming source."""
    try:
        loader = _Loader(text)
        if mark_name is not None:
            loader.name = mark_name
        try:
            root = loader.get_single_node()
            if root is not None and _expanded_size(root) > MAX_YAML_NODES:
                raise ConfigError(f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} values through its "
                                  "aliases (&anchor / *alias)", "write the values out, or use model.blocks")
            return (loader.construct_document(root) if root is not None else None), root
        finally:
            loader.dispose()
    except RecursionError:  # the YAML parser recurses once per nesting level
        raise ConfigError(f"{source}: the config nests too deeply to read (more than {MAX_NESTING} levels are "
                          "never needed)", "flatten it: define repeated structure once under model.blocks and "
                          "use repeat: N") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{at}: {getattr(e, 'problem', e)}",
                          "check indentation and that every key is followed by ': ', once") from None


MAX_CONFIG_BYTES = 1 << 20  # a config file; the largest shipped one is a few kB


def read_yaml(path: Path, mark_name: str | None = None, where: str = "") -> tuple[Any, yaml.Node | None]:
    """The parsed YAML file and its node tree (for line numbers). The file must be a regular file of at most
    MAX_CONFIG_BYTES; `where` (the `extends:` that names it) goes before the message of a file that is not."""
    try:
        raw = read_regular(path, MAX_CONFIG_BYTES)
    except Unreadable as e:
        if e.missing:
            raise ConfigError(f"{where}config file not found: {path}", "check the path" + (
                " (relative to the directory of the file that extends it)" if where else "")) from None
        raise ConfigError(f"{where}cannot read config {path}: {e.reason}",
                          f"give a YAML config file (at most {MAX_CONFIG_BYTES // (1 << 20)} MB)") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}cannot read config {path}: not UTF-8 text ({e.reason} at byte {e.start})",
                          "give a YAML config file saved as UTF-8") from None
    return load_yaml(text, str(path), mark_name)


MAX_EXTENDS = 8  # configs in one `extends:` chain; real ones have two or three


def read_config(path: str | Path) -> tuple[Any, yaml.Node | None]:
    """A config file with its `extends:` resolved: the base config it names (a path relative to this file; the
    base may extend another) with this file's keys merged over it, mappings key by key and every other value
    (lists included, as OmegaConf and Hydra merge) replaced whole. Returns the merged data and a node tree of
    the same shape, so errors give the line of whichever file a value came from."""
    return _read_config(Path(path), [])


DATA_PATHS = ("root", "path")  # data keys that name files: relative to the config file that writes them


def absolute_data_paths(data: Any, folder: Path) -> Any:
    """data.root and data.path made absolute against `folder` where they are relative (a config's own values are
    relative to the config's folder, --set values to the working directory), so that a run's config.yaml and its
    checkpoints work from any folder."""
    section = data.get("data") if isinstance(data, dict) else None
    if isinstance(section, dict):
        for key in DATA_PATHS:
            value = section.get(key)
            if isinstance(value, str) and value and "\0" not in value and not Path(value).expanduser().is_absolute():
                section[key] = os.path.normpath(os.path.join(os.path.abspath(folder), value))
    return data


def _read_config(path: Path, chain: list[Path], referrer: str = "") -> tuple[Any, yaml.Node | None]:
    data, root = read_yaml(path, str(path) if chain else None, referrer)  # a base's lines name its file
    data = absolute_data_paths(data, path.parent)
    if not isinstance(data, dict) or "extends" not in data:
        return data, root
    where = f"{path}: extends (line {line_of(root, ('extends',))})"
    target = data["extends"]
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(f"{where}: expected the path of a config file, got {target!r}",
                          "e.g. extends: resnet-fashion.yaml (relative to this file)")
    if "\0" in target:
        raise ConfigError(f"{where}: the path has a NUL character", "give the path of a config file")
    base_path = path.parent / target
    chain = [*chain, Path(os.path.realpath(path))]
    if Path(os.path.realpath(base_path)) in chain:
        loop = " -> ".join(str(p.name) for p in [*chain, Path(os.path.realpath(base_path))])
        raise ConfigError(f"{where}: the configs extend each other in a loop ({loop})",
                          "remove one of the `extends:` keys")
    if len(chain) >= MAX_EXTENDS:
        raise ConfigError(f"{where}: more than {MAX_EXTENDS} configs extend one another",
                          "extend the base config directly")
    base, base_root = _read_config(base_path, chain, f"{where}: ")
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: the config must be a YAML mapping (key: value lines); {path} extends it",
                          "point `extends:` at a cnnctl config")
    own = {k: v for k, v in data.items() if k != "extends"}
    own_root = yaml.MappingNode(root.tag, [(k, v) for k, v in root.value if k.value != "extends"],
                                root.start_mark, root.end_mark)
    return _merged(base, own), _merged_nodes(base_root, own_root)


def _merged(base: Any, over: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merged(base[key], value) if key in base else copy.deepcopy(value)
    return out


def _merged_nodes(base: yaml.Node, over: yaml.Node) -> yaml.Node:
    """The node tree of `_merged(base, over)`: over's nodes where it gives a value, base's elsewhere."""
    if not (isinstance(base, yaml.MappingNode) and isinstance(over, yaml.MappingNode)):
        return over
    own = {k.value: (k, v) for k, v in over.value if isinstance(k, yaml.ScalarNode)}
    pairs = [(own[k.value][0], _merged_nodes(v, own.pop(k.value)[1])) if k.value in own else (k, v)
             for k, v in base.value]
    return yaml.MappingNode(over.tag, pairs + list(own.values()), over.start_mark, over.end_mark)


MAX_NESTING = 64  # mappings and lists inside each other; real configs (ResNets, nested blocks) stay far below


def nesting(data: Any, limit: int = MAX_NESTING) -> int:
    """How deeply mappings and lists nest in data (counting stops past limit), without recursion."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth + 1)
            if deepest > limit:
                break
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def validate(data: Any, source: str = "config", root: yaml.Node | None = None, overrides: list[str] = ()) -> Spec:
    if nesting(data) > MAX_NESTING:
        raise ConfigError(f"{source}: the config nests more than {MAX_NESTING} levels deep",
                          "flatten it: define repeated structure once under model.blocks and use repeat: N")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping (key: value lines), "
                          f"got {type(data).__name__}")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(e, data, source, root, overrides) from None
    blocks.resolve(spec.model, data, root, source, overrides)  # block errors now, with the file's line numbers
    return spec


def load_config(path: str | Path, overrides: list[str] = ()) -> tuple[Spec, dict]:
    """Read, override and validate a YAML config. Returns the spec and the raw (overridden) mapping."""
    path = Path(path)
    data, root = read_config(path)
    if isinstance(data, dict):
        data = absolute_data_paths(apply_overrides(data, list(overrides)), Path.cwd())
    return validate(data, str(path), root, list(overrides)), data


def spec_to_dict(spec: Spec) -> dict:
    """The fully resolved spec (defaults filled in) as plain data for config.yaml and checkpoints."""
    return spec.model_dump(mode="json")
