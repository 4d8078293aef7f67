"""The JSON Schema of a config file, for editors (yaml-language-server and friends): derived from the spec's models
and the registries of losses, optimizers, schedules and layer types."""

from __future__ import annotations

from cnnctl.core import nn, optim, schedules

from .reading import SHORTHANDS
from .spec import Spec


def config_schema() -> dict:
    """The JSON Schema of a config file (for editors: yaml-language-server and friends)."""
    schema = Spec.model_json_schema()
    registries = {"loss": nn.LOSSES, "optimizer": optim.OPTIMIZERS, "schedule": schedules.SCHEDULES}
    for key in SHORTHANDS:
        names = sorted(registries[key])  # `loss: mse` means {type: mse}: say so in the schema too
        prop = schema["properties"][key]
        default = prop.pop("default", None)
        schema["properties"][key] = {"anyOf": [{k: v for k, v in prop.items() if k != "description"},
                                               {"type": "string", "enum": names}]}
        if default is not None:
            schema["properties"][key]["default"] = default
    # a block use names a block, never a built-in type (which would make it match two members of the union)
    use = schema["$defs"]["BlockUse"]
    use["properties"]["type"]["not"] = {"enum": sorted(nn.SPECS)}
    use["description"] = "A block defined under model.blocks, used as a layer: {type: NAME, PARAM: VALUE, repeat: N}."
    # a file that `extends:` another holds only what it changes; it is checked once merged (cnnctl inspect)
    full = {k: v for k, v in schema.items() if k not in ("$defs", "title")}
    extends = {"type": "string", "minLength": 1, "description": "A base config (a path relative to this file) "
               "that this file's keys are merged over: mappings key by key, other values replaced whole."}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "cnnctl config",
            "$defs": schema["$defs"], "if": {"type": "object", "required": ["extends"]},
            "then": {"type": "object", "properties": {"extends": extends}}, "else": full}
