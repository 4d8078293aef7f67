"""Optimizers update each group of parameters laid end to end (cnnctl.core.flat), in place: the same bits as the
per-parameter rules written out below (torch.optim's formulas as cnnctl computed them before), and a step that
allocates nothing the size of a parameter."""

import math
import tracemalloc

import numpy as np
import pytest

from cnnctl.core import nn
from cnnctl.core.optim import OPTIMIZERS
from cnnctl.core.param_groups import GroupMatch, ParamGroupSpec
from tests.test_optim import SETTINGS


def per_parameter(tag: str, kw: dict, steps: int, p, g, st, lr):
    """The new value of one parameter by the rule written plainly, one expression per line (st updated)."""
    b1, b2 = kw.get("betas", (0.9, 0.999 if tag != "radam" else 0.999))
    zeros = np.zeros_like(p)
    if tag == "sgd":
        mom, damp = kw.get("momentum", 0.0), kw.get("dampening", 0.0)
        if mom:
            st["b"] = g.copy() if "b" not in st else mom * st["b"] + (1 - damp) * g
            g = g + mom * st["b"] if kw.get("nesterov") else st["b"]
        return p - lr * g
    if tag in ("adam", "adamw"):
        eps = kw.get("eps", 1e-8)
        m = st["m"] = b1 * st.get("m", zeros) + (1 - b1) * g
        v = st["v"] = b2 * st.get("v", zeros) + (1 - b2) * g * g
        if kw.get("amsgrad"):
            v = st["vmax"] = np.maximum(st.get("vmax", zeros), v)
        denom = np.sqrt(v) / math.sqrt(1 - b2**steps) + eps
        return p - (lr / (1 - b1**steps)) * m / denom
    if tag == "rmsprop":
        a, eps, mom = kw.get("alpha", 0.99), kw.get("eps", 1e-8), kw.get("momentum", 0.0)
        v = st["v"] = a * st.get("v", zeros) + (1 - a) * g * g
        if kw.get("centered"):
            ga = st["ga"] = a * st.get("ga", zeros) + (1 - a) * g
            avg = np.sqrt(v - ga * ga) + eps
        else:
            avg = np.sqrt(v) + eps
        if mom:
            buf = st["buf"] = mom * st.get("buf", zeros) + g / avg
            return p - lr * buf
        return p - lr * g / avg
    if tag == "adagrad":
        s = st["s"] = st.get("s", np.full_like(p, kw.get("initial_accumulator_value", 0.0))) + g * g
        clr = lr / (1 + (steps - 1) * kw.get("lr_decay", 0.0))
        return p - clr * g / (np.sqrt(s) + kw.get("eps", 1e-10))
    if tag == "adadelta":
        r, eps = kw.get("rho", 0.9), kw.get("eps", 1e-6)
        v = st["v"] = r * st.get("v", zeros) + (1 - r) * g * g
        d = np.sqrt(st.get("u", zeros) + eps) / np.sqrt(v + eps) * g
        st["u"] = r * st.get("u", zeros) + (1 - r) * d * d
        return p - lr * d
    assert tag == "radam"
    eps = kw.get("eps", 1e-8)
    m = st["m"] = b1 * st.get("m", zeros) + (1 - b1) * g
    v = st["v"] = b2 * st.get("v", zeros) + (1 - b2) * g * g
    corrected = m / (1 - b1**steps)
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * steps * b2**steps / (1 - b2**steps)
    if rho <= 5:
        return p - lr * corrected
    rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return p - corrected * lr * (math.sqrt(1 - b2**steps) / (np.sqrt(v) + eps)) * rect


def model(rng):
    return nn.Model([nn.Conv2D(2, 4, 3, rng=rng), nn.BatchNorm2D(4), nn.Flatten(), nn.Dense(64, 5, rng=rng)])


@pytest.mark.parametrize(("tag", "kwargs"), SETTINGS, ids=lambda v: str(v))
def test_the_group_update_gives_the_bits_of_the_per_parameter_rule(tag, kwargs):
    """float32 parameters in two groups (a rate scale, a weight decay of their own) and the rest, 12 steps."""
    rng = np.random.default_rng(3)
    net = model(rng)
    opt = OPTIMIZERS[tag](net, **kwargs)
    opt.groups = {"layers.0.bias": ParamGroupSpec(match=GroupMatch(param="bias"), lr_scale=0.5, weight_decay=0.1),
                  "layers.1.weight": ParamGroupSpec(match=GroupMatch(param="weight"), lr_scale=2.0)}
    mine = {name: layer.params[key].copy() for name, layer, key in net.parameters()}
    states: dict = {name: {} for name in mine}
    decoupled = tag == "adamw"
    for step in range(1, 13):
        grads = {name: rng.standard_normal(mine[name].shape).astype(np.float32) for name in mine}
        for name, layer, key in net.parameters():
            layer.grads[key] = grads[name].copy()
        opt.step()
        for name in mine:
            group = opt.groups.get(name)
            lr = kwargs.get("lr", OPTIMIZERS[tag].__init__.__defaults__[0]) * (group.lr_scale if group else 1.0)
            wd = group.weight_decay if group and group.weight_decay is not None else kwargs.get(
                "weight_decay", 0.01 if decoupled else 0.0)
            p, g = mine[name], grads[name]
            if wd and decoupled:
                p = p * (1 - lr * wd)
            elif wd:
                g = g + wd * p
            mine[name] = per_parameter(tag, kwargs, step, p, g, states[name], lr).astype(np.float32)
        for name, layer, key in net.parameters():
            assert layer.params[key].dtype == np.float32
            np.testing.assert_array_equal(layer.params[key], mine[name], err_msg=f"{name}, step {step}")


@pytest.mark.parametrize(("tag", "kwargs"), SETTINGS, ids=lambda v: str(v))
def test_a_step_allocates_nothing_the_size_of_a_parameter(tag, kwargs):
    """After the first steps (state and temporaries made), an update of a 1 MB weight allocates under 64 kB."""
    rng = np.random.default_rng(4)
    net = nn.Model([nn.Dense(512, 512, rng=rng)])
    opt = OPTIMIZERS[tag](net, **kwargs)
    for _, layer, key in net.parameters():
        layer.grads[key] = rng.standard_normal(layer.params[key].shape).astype(np.float32)
    for _ in range(3):
        opt.step()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        opt.step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - before < 64 * 1024, f"{tag}: {(peak - before) / 1e6:.2f} MB allocated in one step"


def test_state_put_back_from_a_checkpoint_is_what_the_group_updates():
    """load_state_dict replaces the state arrays: the next step lays out the loaded ones (not the old group's)."""
    rng = np.random.default_rng(5)
    a, b = model(rng), model(np.random.default_rng(5))
    oa, ob = OPTIMIZERS["adam"](a, lr=0.01), OPTIMIZERS["adam"](b, lr=0.01)
    for step in range(4):
        for net in (a, b):
            for _, layer, key in net.parameters():
                layer.grads[key] = np.full(layer.params[key].shape, step + 1.0, np.float32)
        oa.step()
        if step == 1:
            ob.load_state_dict({k: v.copy() for k, v in oa.state_dict().items()})
            b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
        else:
            ob.step()
    for (name, la, key), (_, lb, _) in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(la.params[key], lb.params[key], err_msg=name)
        np.testing.assert_array_equal(oa.state[name]["exp_avg"], ob.state[name]["exp_avg"], err_msg=name)


def test_a_layer_unfrozen_midway_and_arrays_given_anew_join_the_update_with_the_same_bits():
    """The groups follow the model: a layer unfrozen after three steps starts its state then (its own group
    first, the others' after), and weights loaded as new arrays are laid out again; every step equals the
    per-parameter rule."""
    rng = np.random.default_rng(6)
    net = model(rng)
    kwargs = {"lr": 0.05, "momentum": 0.9}
    opt = OPTIMIZERS["sgd"](net, **kwargs)
    net.layers[0].freeze()
    mine = {name: layer.params[key].copy() for name, layer, key in net.parameters()}
    states: dict = {name: {} for name in mine}
    for step in range(1, 9):
        if step == 4:
            net.layers[0].freeze(False)
        if step == 6:  # a checkpoint's weights: new arrays of the same values
            net.load_state_dict({k: v.copy() for k, v in net.state_dict().items()})
        trainable = {p.name for p in net.trainable_parameters()}
        for name, layer, key in net.parameters():
            layer.grads[key] = rng.standard_normal(layer.params[key].shape).astype(np.float32)
            if name in trainable:
                mine[name] = per_parameter("sgd", kwargs, step, mine[name], layer.grads[key].copy(), states[name],
                                           kwargs["lr"]).astype(np.float32)
        opt.step()
        for name, layer, key in net.parameters():
            np.testing.assert_array_equal(layer.params[key], mine[name], err_msg=f"{name}, step {step}")


def test_the_kept_temporaries_are_those_of_the_groups_laid_out_now():
    """A layer unfrozen midway makes its group larger: the temporaries kept for the smaller group's size go (no
    array of a size no group has stays allocated), and each current group's are kept from step to step."""
    rng = np.random.default_rng(7)
    net = model(rng)
    opt = OPTIMIZERS["adam"](net, lr=0.01, weight_decay=0.01)  # adam with L2 decay keeps temporaries
    net.layers[0].freeze()
    for step in range(1, 6):
        if step == 3:
            net.layers[0].freeze(False)
        for _, layer, key in net.parameters():
            layer.grads[key] = rng.standard_normal(layer.params[key].shape).astype(np.float32)
        opt.step()
        sizes = {f.value.size for f in opt._flats.values()}
        assert opt._temps and {k[0] for k in opt._temps} <= sizes, (step, sorted(opt._temps), sorted(sizes))
        if step == 4:
            kept = {k: id(t) for k, t in opt._temps.items()}
    assert {k: id(t) for k, t in opt._temps.items()} == kept
