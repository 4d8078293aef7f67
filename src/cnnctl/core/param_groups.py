"""Which parameters take which options: an optimizer's parameter groups (Caffe's lr_mult and decay_mult,
torch.optim's parameter groups), matched by name, layer type or block, and lookahead's settings."""

from __future__ import annotations

import fnmatch

from pydantic import Field, model_validator

from cnnctl.core.nn.base import Layer, Param
from cnnctl.errors import ConfigError
from cnnctl.strict import PosInt, Strict


class GroupMatch(Strict):
    """Which parameters a group takes; every key given must match (at least one must be given)."""

    param: str | None = Field(None, description="A pattern (* and ? wildcards) on the parameter's name, e.g. "
                              "'*.bias' or 'layers.0.*'; a pattern without a dot matches the last part (bias, "
                              "weight).")
    layer_type: str | None = Field(None, description="The type of the parameter's layer: conv2d, dense, "
                                   "batchnorm (either kind), ...")
    block: str | None = Field(None, description="A block name under model.blocks: the parameters inside any use "
                              "of it.")

    @model_validator(mode="after")
    def _something(self):
        if self.param is None and self.layer_type is None and self.block is None:
            raise ValueError("give at least one of param, layer_type, block")
        return self

    def matches(self, p: Param, blocks: set[str]) -> bool:
        name = p.name if "." in (self.param or ".") else p.key
        tag = p.layer.tag
        return ((self.param is None or fnmatch.fnmatchcase(name, self.param))
                and (self.layer_type is None or tag == self.layer_type or tag.startswith(self.layer_type)
                     and tag[len(self.layer_type):] in ("1d", "2d"))
                and (self.block is None or self.block in blocks))


class ParamGroupSpec(Strict):
    """Options for some of the parameters (Caffe's lr_mult and decay_mult, torch.optim's parameter groups): each
    parameter takes the first group that matches it, the others the optimizer's own options."""

    match: GroupMatch
    lr_scale: float = Field(1.0, ge=0.0, description="The group's learning rate is the optimizer's (as scheduled) "
                            "times this.")
    weight_decay: float | None = Field(None, ge=0.0, description="The group's weight decay (default: the "
                                       "optimizer's).")


class LookaheadSpec(Strict):
    """Lookahead (Zhang et al. 2019) around any optimizer: slow weights follow the optimizer's (fast) weights
    every k steps, slow += alpha * (fast - slow), and the fast weights restart from them."""

    k: PosInt = Field(5, description="Optimizer steps between synchronisations.")
    alpha: float = Field(0.5, gt=0.0, le=1.0, description="How far the slow weights move towards the fast ones.")


def assign_groups(groups: list[ParamGroupSpec], model: Layer, rows: list) -> dict[str, ParamGroupSpec]:
    """Each parameter's group: the first that matches it. A group that matches no parameter is an error (a typo
    would otherwise silently change nothing)."""
    def blocks_of(name: str) -> set[str]:
        found = set()
        for r in rows:
            for row in r.walk():
                if name.startswith(row.path + "."):
                    found.add(row.type.split(" x")[0])
        return found

    assigned, used = {}, [0] * len(groups)
    for p in model.parameters():
        blocks = blocks_of(p.name) if any(g.match.block for g in groups) else set()
        for i, g in enumerate(groups):
            if g.match.matches(p, blocks):
                assigned[p.name] = g
                used[i] += 1
                break
    for i, n in enumerate(used):
        if not n:
            m = groups[i].match.model_dump(exclude_none=True)
            raise ConfigError(f"optimizer.groups[{i}] (match {m}) matches no parameter"
                              + (" that an earlier group has not taken" if any(
                                  groups[i].match.matches(p, blocks_of(p.name)) for p in model.parameters()) else ""),
                              "check the pattern against the names `cnnctl inspect --json` lists (layers.0.weight, "
                              "...), the layer type, or the block name")
    return assigned
