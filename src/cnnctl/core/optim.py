"""Optimizers with torch.optim's update rules, applied in place to a model's parameters (through any nesting).

Each optimizer keeps per-parameter state arrays (named like `layers.0.weight`) and a step count; both go into
checkpoints through state_dict()/load_state_dict(). `lr` is a plain attribute that schedules set.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import typing
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, create_model, model_validator

from cnnctl.core.nn.base import Layer, Param
from cnnctl.errors import ConfigError
from cnnctl.registry import registrar
from cnnctl.strict import PosInt, Strict

OPTIMIZERS: dict[str, type[Optimizer]] = {}
OPTIMIZER_SPECS: dict[str, type[Strict]] = {}  # what `optimizer:` in a config may be, by its `type`
_register = registrar(OPTIMIZERS, OPTIMIZER_SPECS)

# the constraints of the constructors' arguments, which the specs users write are made from
Rate = Annotated[float, Field(gt=0.0)]
Decay = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]


def register_optimizer(tag: str):
    """Class decorator: make an optimizer known as `optimizer.type: tag`. Its spec (what a config may say) is made
    from its constructor: every argument after the model is a key, with the constructor's default and the
    constraints its annotation carries (Rate, Decay, ... above), so a new optimizer is its class alone."""

    def deco(cls):
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
        fields = {name: (hints[name], p.default) for name, p in inspect.signature(cls.__init__).parameters.items()
                  if name not in ("self", "model")}
        spec = create_model(f"{cls.__name__}Spec", __base__=_OptimizerSpec, __module__=__name__,
                            type=(Literal[tag], ...), **fields, **COMMON)
        spec.__doc__ = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None
        return _register(tag, spec)(cls)

    return deco


# ---------------------------------------------------------------- specs (the YAML)


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


# the keys every optimizer spec has after its constructor's
COMMON = {
    "groups": (list[ParamGroupSpec], Field(default=[], description="Parameter groups, matched in order: [{match: "
                                           "{param: bias}, lr_scale: 2, weight_decay: 0}, ...].")),
    "lookahead": (LookaheadSpec | None, Field(None, description="Wrap the optimizer in lookahead: {k: 5, alpha: "
                                              "0.5}.")),
}


class _OptimizerSpec(Strict):
    """What every optimizer spec does; the keys are made by register_optimizer."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """`key: null` means the key's default (runs written before the specs were made from the constructors say
        `weight_decay: null` for adam's and adamw's)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def options(self) -> dict:
        """The optimizer's keyword arguments."""
        return self.model_dump(exclude={"type", "groups", "lookahead"})

    def build(self, model, rows=None):
        """The optimizer for model, with each parameter's group resolved (rows, the builder's layer rows, give
        the blocks each parameter sits in)."""
        opt = OPTIMIZERS[self.type](model, **self.options())
        opt.groups = assign_groups(self.groups, model, rows or [])
        opt.lookahead = self.lookahead
        return opt


# ---------------------------------------------------------------- the update rules


class Optimizer:
    """The update loop shared by every optimizer: per-parameter state, groups (lr scale, weight decay), weight
    decay applied here once (added to the gradient, or with `decoupled` shrinking the weights first, AdamW), and
    lookahead; a subclass writes only its `update(p, g, state, lr)`."""

    tag = "optimizer"
    decoupled = False  # weight decay as p *= 1 - lr*wd before the update (AdamW), else g += wd*p (L2)
    # steps scaled per parameter by its gradients' history (Adam, RMSprop, ...): such an optimizer trains best
    # about ten times below the rate where a range test's loss is lowest (cnnctl lr-find; docs/lr-find.md)
    adaptive = False

    def __init__(self, model: Layer, lr: float, weight_decay: float = 0.0, decay_bias_and_norm: bool = True):
        self.model, self.lr, self.weight_decay = model, float(lr), float(weight_decay)
        self.decay_bias_and_norm = decay_bias_and_norm
        self.steps = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}
        self.groups: dict[str, ParamGroupSpec] = {}  # parameter name -> its group (the others have none)
        self.lookahead: LookaheadSpec | None = None

    def _decay(self, p: Param) -> float:
        group = self.groups.get(p.name)
        if group is not None and group.weight_decay is not None:
            return group.weight_decay
        return 0.0 if not self.decay_bias_and_norm and p.is_bias_or_norm else self.weight_decay

    def step(self) -> None:
        self.steps += 1
        la = self.lookahead
        for p in self.model.trainable_parameters():
            st = self.state.setdefault(p.name, {})
            if la is not None and "lookahead_slow" not in st:  # the slow weights start as the weights
                st["lookahead_slow"] = p.value.copy()
            group = self.groups.get(p.name)
            lr = self.lr * group.lr_scale if group is not None else self.lr
            value, grad, wd = p.value, p.grad, self._decay(p)
            if wd and self.decoupled:
                value = value * (1 - lr * wd)
            elif wd:
                grad = grad + wd * value
            p.value[...] = self.update(value, grad, st, lr)  # in place: the model's own array
        if la is not None and self.steps % la.k == 0:  # lookahead: the slow weights step, the fast restart there
            for p in self.model.trainable_parameters():
                slow = self.state[p.name]["lookahead_slow"]
                slow += p.value.dtype.type(la.alpha) * (p.value - slow)
                p.value[...] = slow

    def update(self, p: np.ndarray, g: np.ndarray, st: dict, lr: float) -> np.ndarray:
        """The new value of a parameter p from its gradient g (weight decay already applied), its state st (updated
        in place) and its learning rate."""
        raise NotImplementedError

    @property
    def keeps_state(self) -> bool:
        """Whether every step leaves per-parameter state (moments, momentum) that a resumed run needs."""
        return True

    def missing_state(self) -> list[str]:
        """Parameters without the per-parameter state this kind of optimizer holds once it has stepped."""
        if not self.keeps_state:
            return []
        return [p.name for p in self.model.trainable_parameters() if not self.state.get(p.name)]

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {f"{name}.{k}": v for name, st in self.state.items() for k, v in st.items()}
        out["steps"] = np.array(self.steps, np.int64)
        return out

    def load_state_dict(self, flat: dict[str, np.ndarray]) -> None:
        """State keyed by parameter name, in one order whatever the order of `flat` (a safetensors file's tensors
        come back in an order that differs between processes): the model's parameters in order, each one's
        entries by name; entries of names the model lacks last, by name."""
        self.steps = int(np.ravel(flat.get("steps", 0))[0])
        found: dict[str, dict[str, np.ndarray]] = {}
        for full, value in flat.items():
            if full != "steps":
                name, k = full.rsplit(".", 1)
                found.setdefault(name, {})[k] = np.array(value)
        order = [p.name for p in self.model.trainable_parameters() if p.name in found]
        order += sorted(found.keys() - set(order))
        self.state = {name: dict(sorted(found[name].items())) for name in order}


@register_optimizer("sgd")
class SGD(Optimizer):
    """p -= lr * (nesterov ? g + momentum*b : b), b = momentum*b + (1-dampening)*g, g = grad + wd*p."""

    def __init__(self, model, lr: Rate = 0.01, momentum: Fraction = 0.0, dampening: Unit = 0.0, nesterov: bool = False,
                 weight_decay: Decay = 0.0, decay_bias_and_norm: bool = True):
        super().__init__(model, lr, weight_decay, decay_bias_and_norm)
        self.momentum, self.dampening, self.nesterov = float(momentum), float(dampening), bool(nesterov)

    @property
    def keeps_state(self) -> bool:
        return self.momentum != 0

    def update(self, p, g, st, lr):
        if self.momentum:
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = g.copy()
            else:
                st["momentum_buffer"] = self.momentum * st["momentum_buffer"] + (1 - self.dampening) * g
            b = st["momentum_buffer"]
            g = g + self.momentum * b if self.nesterov else b
        return p - lr * g


@register_optimizer("adam")
class Adam(Optimizer):
    """Adam (L2 weight decay added to the gradient); AdamW decouples it. Bias-corrected moments, optional AMSGrad."""

    adaptive = True

    decoupled = False

    def __init__(self, model, lr: Rate = 1e-3, betas: tuple[Fraction, Fraction] = (0.9, 0.999), eps: Positive = 1e-8,
                 weight_decay: Decay = 0.0, amsgrad: bool = False, decay_bias_and_norm: bool = True):
        super().__init__(model, lr, weight_decay, decay_bias_and_norm)
        self.betas, self.eps, self.amsgrad = (float(betas[0]), float(betas[1])), float(eps), bool(amsgrad)

    def update(self, p, g, st, lr):
        b1, b2 = self.betas
        m = st["exp_avg"] = b1 * st.get("exp_avg", np.zeros_like(p)) + (1 - b1) * g
        v = st["exp_avg_sq"] = b2 * st.get("exp_avg_sq", np.zeros_like(p)) + (1 - b2) * g * g
        if self.amsgrad:
            v = st["max_exp_avg_sq"] = np.maximum(st.get("max_exp_avg_sq", np.zeros_like(p)), v)
        t = self.steps
        denom = np.sqrt(v) / math.sqrt(1 - b2**t) + self.eps
        return p - (lr / (1 - b1**t)) * m / denom


@register_optimizer("adamw")
class AdamW(Adam):
    """Adam with decoupled weight decay: p *= 1 - lr*wd before the Adam step (default wd 0.01, like torch)."""

    decoupled = True

    def __init__(self, model, lr: Rate = 1e-3, betas: tuple[Fraction, Fraction] = (0.9, 0.999), eps: Positive = 1e-8,
                 weight_decay: Decay = 0.01, amsgrad: bool = False, decay_bias_and_norm: bool = True):
        super().__init__(model, lr, betas, eps, weight_decay, amsgrad, decay_bias_and_norm)


@register_optimizer("rmsprop")
class RMSprop(Optimizer):
    """v = alpha*v + (1-alpha)*g^2; p -= lr * g / (sqrt(v - centered mean^2) + eps), with optional momentum."""

    adaptive = True

    def __init__(self, model, lr: Rate = 0.01, alpha: Fraction = 0.99, eps: Positive = 1e-8, weight_decay: Decay = 0.0,
                 momentum: Fraction = 0.0, centered: bool = False, decay_bias_and_norm: bool = True):
        super().__init__(model, lr, weight_decay, decay_bias_and_norm)
        self.alpha, self.eps, self.momentum, self.centered = float(alpha), float(eps), float(momentum), centered

    def update(self, p, g, st, lr):
        a = self.alpha
        v = st["square_avg"] = a * st.get("square_avg", np.zeros_like(p)) + (1 - a) * g * g
        if self.centered:
            ga = st["grad_avg"] = a * st.get("grad_avg", np.zeros_like(p)) + (1 - a) * g
            avg = np.sqrt(v - ga * ga) + self.eps
        else:
            avg = np.sqrt(v) + self.eps
        if self.momentum:
            buf = st["momentum_buffer"] = self.momentum * st.get("momentum_buffer", np.zeros_like(p)) + g / avg
            return p - lr * buf
        return p - lr * g / avg


@register_optimizer("adagrad")
class Adagrad(Optimizer):
    """s += g^2; p -= lr / (1 + (t-1)*lr_decay) * g / (sqrt(s) + eps) (Duchi et al. 2011; torch.optim.Adagrad)."""

    adaptive = True

    def __init__(self, model, lr: Rate = 0.01,
                 lr_decay: Annotated[float, Field(ge=0.0, description="The rate at step t is lr / (1 + (t - 1) * "
                                                  "lr_decay).")] = 0.0,
                 weight_decay: Decay = 0.0, initial_accumulator_value: Decay = 0.0, eps: Positive = 1e-10,
                 decay_bias_and_norm: bool = True):
        super().__init__(model, lr, weight_decay, decay_bias_and_norm)
        self.lr_decay, self.initial, self.eps = float(lr_decay), float(initial_accumulator_value), float(eps)

    def update(self, p, g, st, lr):
        if "sum" not in st:
            st["sum"] = np.full_like(p, self.initial)
        s = st["sum"] = st["sum"] + g * g
        clr = lr / (1 + (self.steps - 1) * self.lr_decay)
        return p - clr * g / (np.sqrt(s) + self.eps)


@register_optimizer("adadelta")
class Adadelta(Optimizer):
    """v = rho*v + (1-rho)*g^2; d = sqrt(u + eps) / sqrt(v + eps) * g; u = rho*u + (1-rho)*d^2; p -= lr*d
    (Zeiler 2012; torch.optim.Adadelta)."""

    adaptive = True

    def __init__(self, model, lr: Annotated[float, Field(gt=0.0, description="Scales the step (1.0: Zeiler's "
                                                         "Adadelta, which needs no rate).")] = 1.0,
                 rho: Unit = 0.9, eps: Positive = 1e-6, weight_decay: Decay = 0.0, decay_bias_and_norm: bool = True):
        super().__init__(model, lr, weight_decay, decay_bias_and_norm)
        self.rho, self.eps = float(rho), float(eps)

    def update(self, p, g, st, lr):
        r = self.rho
        v = st["square_avg"] = r * st.get("square_avg", np.zeros_like(p)) + (1 - r) * g * g
        d = np.sqrt(st.get("acc_delta", np.zeros_like(p)) + self.eps) / np.sqrt(v + self.eps) * g
        st["acc_delta"] = r * st.get("acc_delta", np.zeros_like(p)) + (1 - r) * d * d
        return p - lr * d


@register_optimizer("radam")
class RAdam(Optimizer):
    """Rectified Adam (Liu et al. 2020; torch.optim.RAdam): Adam's step scaled by the rectification r_t once the
    variance of the adaptive rate is tractable (rho_t > 5), plain momentum SGD on the bias-corrected first moment
    before that: no warm-up needed. L2 weight decay added to the gradient."""

    adaptive = True

    def __init__(self, model, lr: Rate = 1e-3, betas: tuple[Fraction, Fraction] = (0.9, 0.999), eps: Positive = 1e-8,
                 weight_decay: Decay = 0.0, decay_bias_and_norm: bool = True):
        super().__init__(model, lr, weight_decay, decay_bias_and_norm)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)

    def update(self, p, g, st, lr):
        b1, b2 = self.betas
        m = st["exp_avg"] = b1 * st.get("exp_avg", np.zeros_like(p)) + (1 - b1) * g
        v = st["exp_avg_sq"] = b2 * st.get("exp_avg_sq", np.zeros_like(p)) + (1 - b2) * g * g
        t = self.steps
        corrected = m / (1 - b1**t)
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho <= 5:
            return p - lr * corrected
        rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        return p - corrected * lr * (math.sqrt(1 - b2**t) / (np.sqrt(v) + self.eps)) * rect


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
