"""Optimizers with torch.optim's update rules, applied in place to a model's parameters (through any nesting).

Each optimizer keeps per-parameter state arrays (named like `layers.0.weight`) and a step count; both go into
checkpoints through state_dict()/load_state_dict(). `lr` is a plain attribute that schedules set.
"""

from __future__ import annotations

import inspect
import math
import typing
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, create_model, model_validator

from cnnctl.core.flat import Flat
from cnnctl.core.nn.base import Layer, Param
from cnnctl.core.param_groups import LookaheadSpec, ParamGroupSpec, assign_groups
from cnnctl.registry import registrar
from cnnctl.strict import Strict

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
        self._flats: dict[tuple, Flat] = {}  # the groups of parameters updated together, as the last step had them
        self._temps: dict[tuple, np.ndarray] = {}

    def _decay(self, p: Param) -> float:
        group = self.groups.get(p.name)
        if group is not None and group.weight_decay is not None:
            return group.weight_decay
        return 0.0 if not self.decay_bias_and_norm and p.is_bias_or_norm else self.weight_decay

    def step(self) -> None:
        """One update of every trainable parameter. Parameters with the same rate, weight decay, dtype and kind of
        state are updated together, laid end to end (cnnctl.core.flat): one NumPy call per operation of the rule
        for the whole group, the same bits as parameter by parameter."""
        self.steps += 1
        la = self.lookahead
        params = list(self.model.trainable_parameters())
        if la is not None:  # the slow weights start as the weights
            for p in params:
                st = self.state.setdefault(p.name, {})
                if "lookahead_slow" not in st:
                    st["lookahead_slow"] = p.value.copy()
        together: dict[tuple, list[Param]] = {}
        for p in params:
            group = self.groups.get(p.name)
            key = (1.0 if group is None else group.lr_scale, self._decay(p), p.value.dtype.str,
                   tuple(sorted(self.state.get(p.name, ()))))
            together.setdefault(key, []).append(p)
        flats = {}
        for key, members in together.items():
            flat = self._flats.get(key)
            if flat is None or not flat.current(members, self.state):
                flat = Flat(members, self.state, members[0].value.dtype)
            flats[key] = flat
            (scale, wd), (value, grad) = key[:2], flat.gather(members)
            lr = self.lr * scale
            if wd and self.decoupled:
                value *= 1 - lr * wd
            elif wd:
                grad += np.multiply(value, wd, out=self.temp(value))
            st = dict(flat.state)
            new = self.update(value, grad, st, lr)
            flat.adopt(st, self.state)
            flat.put(new)
        if flats.keys() != self._flats.keys() or any(f is not self._flats[k] for k, f in flats.items()):
            sizes = {f.value.size for f in flats.values()}  # a group laid out anew: its old size's temporaries go
            self._temps = {k: t for k, t in self._temps.items() if k[0] in sizes}
        self._flats = flats
        if la is not None and self.steps % la.k == 0:  # lookahead: the slow weights step, the fast restart there
            for p in params:
                slow = self.state[p.name]["lookahead_slow"]
                slow += p.value.dtype.type(la.alpha) * (p.value - slow)
                p.value[...] = slow

    def update(self, p: np.ndarray, g: np.ndarray, st: dict, lr: float) -> np.ndarray:
        """The new values of parameters p (a group's, end to end: the model's own values, to update in place and
        return, or to return anew) from their gradients g (weight decay already applied; a copy, free to
        overwrite), their state st (a dict of arrays like p: change them in place, or put new ones in st) and
        their learning rate."""
        raise NotImplementedError

    def temp(self, like: np.ndarray, i: int = 0) -> np.ndarray:
        """The i-th temporary array like `like` (kept between steps: an update allocates nothing)."""
        key = (like.size, like.dtype.str, i)
        if key not in self._temps:
            self._temps[key] = np.empty_like(like)
        return self._temps[key]

    @staticmethod
    def slot(st: dict, key: str, like: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """State `key`, made filled with `fill` at the first step."""
        if key not in st:
            st[key] = np.full_like(like, fill)
        return st[key]

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
        self._flats = {}


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
                b = st["momentum_buffer"] = g.copy()
            else:
                b = st["momentum_buffer"]
                b *= self.momentum
                b += np.multiply(g, 1 - self.dampening, out=self.temp(p)) if self.dampening else g  # 1*g is g
            if self.nesterov:
                g += np.multiply(b, self.momentum, out=self.temp(p))
            else:
                g = b
        p -= np.multiply(g, lr, out=self.temp(p))
        return p


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
        m, v = moments(self, p, g, st, b1, b2)
        if self.amsgrad:
            v = np.maximum(self.slot(st, "max_exp_avg_sq", p), v, out=st["max_exp_avg_sq"])
        t = self.steps
        denom = np.sqrt(v, out=self.temp(p))
        denom /= math.sqrt(1 - b2**t)
        denom += self.eps
        step = np.multiply(m, lr / (1 - b1**t), out=g)
        step /= denom
        p -= step
        return p


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
        a, t = self.alpha, self.temp(p)
        v = square_average(self.slot(st, "square_avg", p), g, a, t)
        if self.centered:
            ga = self.slot(st, "grad_avg", p)
            ga *= a
            ga += np.multiply(g, 1 - a, out=t)
            avg = np.subtract(v, np.multiply(ga, ga, out=t), out=t)
            np.sqrt(avg, out=avg)
        else:
            avg = np.sqrt(v, out=t)
        avg += self.eps
        if self.momentum:
            buf = self.slot(st, "momentum_buffer", p)
            buf *= self.momentum
            buf += np.divide(g, avg, out=avg)
            p -= np.multiply(buf, lr, out=g)
            return p
        step = np.multiply(g, lr, out=g)
        step /= avg
        p -= step
        return p


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
        s, t = self.slot(st, "sum", p, self.initial), self.temp(p)
        s += np.multiply(g, g, out=t)
        clr = lr / (1 + (self.steps - 1) * self.lr_decay)
        denom = np.sqrt(s, out=t)
        denom += self.eps
        step = np.multiply(g, clr, out=g)
        step /= denom
        p -= step
        return p


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
        r, t, u = self.rho, self.temp(p), self.temp(p, 1)
        v = square_average(self.slot(st, "square_avg", p), g, r, t)
        acc = self.slot(st, "acc_delta", p)
        d = np.sqrt(np.add(acc, self.eps, out=t), out=t)
        d /= np.sqrt(np.add(v, self.eps, out=u), out=u)
        d *= g
        acc *= r
        acc += np.multiply(np.multiply(d, 1 - r, out=u), d, out=u)
        p -= np.multiply(d, lr, out=d)
        return p


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
        m, v = moments(self, p, g, st, b1, b2)
        t = self.steps
        step = np.divide(m, 1 - b1**t, out=self.temp(p))  # the bias-corrected first moment
        step *= lr
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho > 5:
            rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            adaptive = np.sqrt(v, out=g)
            adaptive += self.eps
            step *= np.divide(math.sqrt(1 - b2**t), adaptive, out=adaptive)
            step *= rect
        p -= step
        return p


def moments(opt: Optimizer, p, g, st, b1: float, b2: float) -> tuple[np.ndarray, np.ndarray]:
    """Adam's moments in place: m = b1*m + (1-b1)*g, v = b2*v + (1-b2)*g*g (Adam's and RAdam's)."""
    t = opt.temp(p)
    m = opt.slot(st, "exp_avg", p)
    m *= b1
    m += np.multiply(g, 1 - b1, out=t)
    return m, square_average(opt.slot(st, "exp_avg_sq", p), g, b2, t)


def square_average(v: np.ndarray, g: np.ndarray, beta: float, t: np.ndarray) -> np.ndarray:
    """v = beta*v + (1-beta)*g*g in place (t: a temporary like v)."""
    v *= beta
    v += np.multiply(np.multiply(g, 1 - beta, out=t), g, out=t)
    return v
