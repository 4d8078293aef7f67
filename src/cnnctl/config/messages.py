"""Validation errors as readable lines: each with its key path (model.layers[2].filters), YAML line and message."""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from pydantic import ValidationError

from cnnctl.errors import ConfigError


def mark_of(node: yaml.Node | None, loc: tuple) -> yaml.Mark | None:
    """Where the deepest YAML node on the path loc starts (its key's mark for a mapping value); union tags in
    loc are skipped."""
    mark = None if node is None else node.start_mark
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    node, mark = v, k.start_mark
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
    return mark


def line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the deepest YAML node on the path loc."""
    mark = mark_of(node, loc)
    return None if mark is None else mark.line + 1


def _is_member(part, node) -> bool:
    """Whether a loc part names a member of a plain union (`literal['auto','none']`, `constrained-int`,
    `tuple[...]`, `int`) rather than a key of the data."""
    return isinstance(part, str) and not (isinstance(node, dict) and part in node) and (
        "[" in part or "-" in part or part in ("int", "float", "str", "bool", "none"))


def _union_point(loc: tuple, data: Any) -> tuple[tuple, str] | None:
    """(the path to the first plain union on loc, the member the error came from), or None."""
    node = data
    for i, part in enumerate(loc):
        if _is_member(part, node):
            return tuple(loc[:i]), part
        node = node[part] if isinstance(node, dict) and part in node or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)) else None
    return None


def _mismatch(err: dict) -> bool:
    """The input is not of this union member's kind at all (the other members' errors say more)."""
    return err["type"].endswith("_type") or err["type"] in ("literal_error", "is_instance_of", "model_type")


def relevant_errors(errors: list[dict], data: Any) -> list[dict]:
    """A plain union reports every member's error; keep those of the members the input is of the kind of
    (`normalize: {std: [.inf]}`: the mapping member's 'finite number', not the literal's 'auto or none')."""
    fitting: dict[tuple, set] = {}
    for err in errors:
        point = _union_point(tuple(err["loc"]), data)
        if point and not _mismatch(err):
            fitting.setdefault(point[0], set()).add(point[1])
    kept = []
    for err in errors:
        point = _union_point(tuple(err["loc"]), data)
        if point is None or point[0] not in fitting or point[1] in fitting[point[0]]:
            kept.append(err)
    return kept


def format_path(loc: tuple, data: Any) -> str:
    """('model', 'layers', 2, 'conv2d', 'filters') -> 'model.layers[2].filters' (skipping union tags)."""
    out, node = "", data
    for i, part in enumerate(loc):
        if _is_member(part, node):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
        elif isinstance(node, dict) and part in node:
            out += f".{part}" if out else part
            node = node[part]
        elif isinstance(node, dict) and (node.get("type") == part or part == "block"
                                         or (i + 1 < len(loc) and loc[i + 1] in node)):
            continue  # a discriminated-union tag (the `type`, or the default one of a mapping without it), not a key
        else:
            out += f".{part}" if out else str(part)
            node = None
    return out or "(top level)"



def is_within(path: str, dotted: str) -> bool:
    """Whether an error at `path` (model.layers[1].units) and an override key (model.layers.1) overlap."""
    as_path = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", dotted)
    def under(a, b):
        return a == b or a.startswith(b + ".") or a.startswith(b + "[")

    return under(path, as_path) or under(as_path, path)


def error_message(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag"))
        tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        close = difflib.get_close_matches(tag, tags, n=1)
        guess = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown type '{tag}'; {guess}known types: {', '.join(tags)}"
    if kind == "union_tag_not_found":
        return "missing 'type'"
    if kind == "missing":
        return "required key is missing"
    msg = err["msg"]
    if kind not in ("unknown_key",) and "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


def error_loc(err: dict) -> tuple:
    """A pydantic error's location, down to the offending key for an unknown key."""
    loc = tuple(err["loc"])
    return (*loc, err["ctx"]["key"]) if err["type"] == "unknown_key" else loc


def at_line(root: yaml.Node | None, loc: tuple) -> str:
    """' (line N)' for the YAML node at loc (' (line N of FILE)' when it came from a base config), or '' when
    there is no node tree."""
    mark = mark_of(root, loc)
    if mark is None:
        return ""
    # a value inherited through `extends:` names the file it came from (the config's own lines carry no name)
    inherited = "" if mark.name.startswith("<") else f" of {mark.name}"
    return f" (line {mark.line + 1}{inherited})"


def origin(root: yaml.Node | None, loc: tuple, data: Any, overrides: list[str] = ()) -> str:
    """Where the value at loc came from: ' (from --set)' when an override set it (or a key around it), else the
    config file's ' (line N)'."""
    path = format_path(loc, data)
    if any(is_within(path, o.partition("=")[0].strip()) for o in overrides):
        return " (from --set)"
    return at_line(root, loc)


def format_validation_error(e: ValidationError, data: Any, source: str, root: yaml.Node | None,
                            overrides: list[str] = ()) -> ConfigError:
    lines = []
    for err in relevant_errors(e.errors(), data):
        loc = error_loc(err)
        lines.append(f"  {format_path(loc, data)}{origin(root, loc, data, overrides)}: {error_message(err)}")
    n = len(lines)
    return ConfigError(f"{source}: invalid config ({n} problem{'s' if n > 1 else ''})\n" + "\n".join(lines),
                       "correct the keys above; `cnnctl inspect CONFIG` checks a config without training")
