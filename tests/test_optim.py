"""Optimizers apply torch.optim's update rules: 20 steps on the same gradients agree within 1e-6."""

import numpy as np
import pytest

from cnnctl.core import nn
from cnnctl.core.optim import OPTIMIZERS

torch = pytest.importorskip("torch")

SETTINGS = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-3}),
    ("adam", {"lr": 1e-2}),
    ("adam", {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 1e-2, "amsgrad": True}),
    ("adamw", {"lr": 1e-2}),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    ("rmsprop", {"lr": 1e-2}),
    ("rmsprop", {"lr": 1e-2, "alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 1e-2}),
    ("adagrad", {"lr": 1e-1}),
    ("adagrad", {"lr": 1e-1, "lr_decay": 0.05, "weight_decay": 1e-2, "initial_accumulator_value": 0.1, "eps": 1e-8}),
    ("adadelta", {}),
    ("adadelta", {"lr": 0.5, "rho": 0.8, "eps": 1e-5, "weight_decay": 1e-2}),
    ("radam", {"lr": 1e-2}),
    ("radam", {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 1e-2}),
]
TORCH = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "adagrad": "Adagrad",
         "adadelta": "Adadelta", "radam": "RAdam"}


def test_every_optimizer_has_torch_settings():
    assert {tag for tag, _ in SETTINGS} == set(OPTIMIZERS) == set(TORCH)


def small_model(g):
    return nn.Model([nn.Conv2D(1, 2, 3, rng=g), nn.BatchNorm2D(2), nn.Flatten(), nn.Dense(18, 3, rng=g)]).to(
        np.float64
    )


@pytest.mark.parametrize(("tag", "kwargs"), SETTINGS, ids=lambda v: str(v))
def test_optimizer_matches_torch_over_20_steps(tag, kwargs):
    g = np.random.default_rng(0)
    model = small_model(g)
    names = [name for name, _, _ in model.parameters()]
    tparams = [torch.tensor(layer.params[key].copy(), requires_grad=True) for _, layer, key in model.parameters()]
    opt = OPTIMIZERS[tag](model, **kwargs)
    topt = getattr(torch.optim, TORCH[tag])(tparams, **kwargs)
    for _ in range(20):
        for (_, layer, key), tp in zip(model.parameters(), tparams):
            grad = g.standard_normal(layer.params[key].shape)
            layer.grads[key] = grad
            tp.grad = torch.tensor(grad)
        opt.step()
        topt.step()
    for name, (_, layer, key), tp in zip(names, model.parameters(), tparams):
        np.testing.assert_allclose(layer.params[key], tp.detach().numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


def test_no_decay_on_bias_and_norm_when_asked():
    g = np.random.default_rng(1)
    model = small_model(g)
    before = {name: layer.params[key].copy() for name, layer, key in model.parameters()}
    opt = OPTIMIZERS["sgd"](model, lr=0.1, weight_decay=0.5, decay_bias_and_norm=False)
    model.zero_grad()
    opt.step()
    for name, layer, key in model.parameters():
        exempt = key == "bias" or layer.tag == "batchnorm2d"
        assert np.array_equal(layer.params[key], before[name]) == exempt, name


def test_state_dict_round_trip_continues_identically():
    g = np.random.default_rng(2)
    a, b = small_model(g), None
    b = small_model(np.random.default_rng(2))
    b.load_state_dict(a.state_dict())
    oa, ob = OPTIMIZERS["adam"](a, lr=0.01), OPTIMIZERS["adam"](b, lr=0.01)
    grads = [np.random.default_rng(i).standard_normal(layer.params[key].shape)
             for i, (_, layer, key) in enumerate(a.parameters())]
    for model, opt in ((a, oa), (b, ob)):
        for grad, (_, layer, key) in zip(grads, model.parameters()):
            layer.grads[key] = grad
        opt.step()
    ob.load_state_dict({k: v.copy() for k, v in oa.state_dict().items()})
    for model, opt in ((a, oa), (b, ob)):
        for grad, (_, layer, key) in zip(grads, model.parameters()):
            layer.grads[key] = grad
        opt.step()
    for (_, la, ka), (_, lb, kb) in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(la.params[ka], lb.params[kb])


@pytest.mark.parametrize("tag", sorted(OPTIMIZERS))
def test_training_stays_float32(tag):
    """No silent float64 upcasts anywhere in a training step: outputs, gradients, parameters, optimizer state."""
    g = np.random.default_rng(3)
    model = nn.Model([nn.Conv2D(1, 3, 3, padding=1, activation="relu", rng=g), nn.BatchNorm2D(3),
                           nn.MaxPool2D(2), nn.AvgPool2D(2, stride=1), nn.Flatten(), nn.Dropout(0.1, rng=g),
                           nn.Dense(27, 8, activation="tanh", rng=g), nn.Dense(8, 3, rng=g)])
    momentum, amsgrad = {"momentum": 0.9, "weight_decay": 1e-3}, {"weight_decay": 1e-3, "amsgrad": True}
    kwargs = {"sgd": momentum, "rmsprop": momentum, "adam": amsgrad, "adamw": amsgrad}.get(tag, {"weight_decay": 1e-3})
    opt = OPTIMIZERS[tag](model, lr=0.01, **kwargs)
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    x = g.standard_normal((4, 1, 8, 8)).astype(np.float32)
    for _ in range(3):
        out = model.forward(x)
        assert out.dtype == np.float32
        loss.forward(out, np.array([0, 1, 2, 0]))
        model.backward(loss.backward())
        opt.step()
    arrays = [layer.params[k] for _, layer, k in model.parameters()] + \
             [layer.grads[k] for _, layer, k in model.parameters()] + \
             [v for k, v in opt.state_dict().items() if k != "steps"]
    assert all(a.dtype == np.float32 for a in arrays), {a.dtype for a in arrays}
    assert all(v.dtype == np.float32 for layer in model.layers for k, v in layer.buffers.items()
               if k != "num_batches_tracked")


# ---------------------------------------------------------------- parameter groups


def assert_equal_to_torch(model, tparams):
    for p in model.parameters():
        np.testing.assert_allclose(p.value, tparams[p.name].detach().numpy(), rtol=1e-6, atol=1e-6, err_msg=p.name)


def step_both(model, opt, tparams, topt, g):
    """One step of ours and of torch's on the same random gradients."""
    for p in model.parameters():
        grad = g.standard_normal(p.value.shape)
        p.layer.grads[p.key] = grad
        tparams[p.name].grad = torch.tensor(grad)
    opt.step()
    topt.step()


def _grouped_model(g):
    return nn.Model([nn.Conv2D(1, 2, 3, rng=g), nn.BatchNorm2D(2), nn.Flatten(), nn.Dense(18, 3, rng=g)]).to(
        np.float64)


GROUPS = [{"match": {"param": "bias"}, "lr_scale": 4.0, "weight_decay": 0.0},
          {"match": {"layer_type": "batchnorm"}, "weight_decay": 0.0},
          {"match": {"param": "layers.3.*"}, "lr_scale": 0.5}]


@pytest.mark.parametrize("tag", sorted(OPTIMIZERS))
def test_parameter_groups_match_torch_param_groups(tag):
    """The groups above against torch.optim with the same parameter groups, over 20 steps (with a changing lr, as a
    schedule sets it)."""
    from cnnctl.core.optim import OPTIMIZER_SPECS

    g = np.random.default_rng(0)
    model = _grouped_model(g)
    lr = {"sgd": 0.05, "adadelta": 1.0}.get(tag, 0.01)
    extra = {"sgd": {"momentum": 0.9}}.get(tag, {})
    spec = OPTIMIZER_SPECS[tag].model_validate({"type": tag, "lr": lr, "weight_decay": 0.01, **extra,
                                                 "groups": GROUPS})
    opt = spec.build(model)
    index = {id(grp): i for i, grp in enumerate(spec.groups)}
    assert {name: index[id(grp)] for name, grp in opt.groups.items()} == {
        "layers.0.bias": 0, "layers.1.weight": 1, "layers.1.bias": 0, "layers.3.weight": 2, "layers.3.bias": 0}
    names = [p.name for p in model.parameters()]
    tparams = {p.name: torch.tensor(p.value.copy(), requires_grad=True) for p in model.parameters()}
    options = {"lr": lr, "weight_decay": 0.01, **extra}
    torch_groups = [
        {"params": [tparams[n] for n in names if n.endswith("bias")], "lr": lr * 4, "weight_decay": 0.0},
        {"params": [tparams["layers.1.weight"]], "lr": lr, "weight_decay": 0.0},
        {"params": [tparams["layers.3.weight"]], "lr": lr * 0.5},
        {"params": [tparams["layers.0.weight"]]},
    ]
    topt = getattr(torch.optim, TORCH[tag])(torch_groups, **options)
    base = [grp["lr"] if "lr" in grp else lr for grp in topt.param_groups]
    for step in range(20):
        factor = 1.0 / (1 + step)  # a schedule moving the rate: groups keep their ratio
        opt.lr = lr * factor
        for tg, b in zip(topt.param_groups, base):
            tg["lr"] = b * factor
        step_both(model, opt, tparams, topt, g)
    assert_equal_to_torch(model, tparams)


def test_a_group_that_matches_nothing_is_an_error():
    from cnnctl.core.optim import OPTIMIZER_SPECS
    from cnnctl.errors import ConfigError

    model = _grouped_model(np.random.default_rng(0))
    for groups, words in (([{"match": {"layer_type": "dense2d"}}], "matches no parameter"),
                          ([{"match": {"param": "bias"}}, {"match": {"param": "*.bias"}}],
                           "that an earlier group has not taken")):
        spec = OPTIMIZER_SPECS["sgd"].model_validate({"type": "sgd", "groups": groups})
        with pytest.raises(ConfigError, match=words):
            spec.build(model)


def test_groups_from_a_config_resume_exactly_and_sweep(tmp_path):
    """optimizer.groups in a run: a resumed run equals a straight one, --set reaches into the groups, and a sweep
    can search a group's option."""
    import json

    import yaml

    from tests.conftest import TINY
    from tests.helpers import invoke, metric_rows

    spec = yaml.safe_load(TINY)
    spec["optimizer"] = {"type": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3,
                         "groups": [{"match": {"param": "bias"}, "lr_scale": 2.0, "weight_decay": 0.0},
                                    {"match": {"layer_type": "conv2d"}, "lr_scale": 0.5}]}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    invoke("train", cfg, "--runs-dir", tmp_path / "a", "--set", "train.epochs=1")
    run = next((tmp_path / "a").iterdir())
    invoke("train", "--resume", run, "--set", "train.epochs=2")
    invoke("train", cfg, "--runs-dir", tmp_path / "b")
    other = next((tmp_path / "b").iterdir())

    assert metric_rows(run) == metric_rows(other)
    invoke("train", cfg, "--runs-dir", tmp_path / "c", "--set", "optimizer.groups.0.lr_scale=1.0")
    assert metric_rows(next((tmp_path / "c").iterdir())) != metric_rows(other)  # the override changed the run
    report = json.loads(invoke("inspect", cfg, "--json").stdout)["param_groups"]
    assert report[0]["params"] == ["layers.0.bias", "layers.4.bias"] and report[1]["params"] == ["layers.0.weight"]
    sweep = {"name": "g", "base": str(cfg), "metric": "val_acc", "space": {
        "optimizer.groups.0.lr_scale": {"choice": [1.0, 4.0]}, "train.epochs": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    invoke("sweep", tmp_path / "s.yaml", "--runs-dir", tmp_path / "sw", "-q")


@pytest.mark.parametrize("tag", ["sgd", "adam"])
def test_lookahead_matches_lookahead_around_torch_optim(tag):
    """Lookahead (k=3, alpha=0.6) around the optimizer equals the same rule written around torch.optim, with
    parameter groups inside it, over 20 steps."""
    from cnnctl.core.optim import OPTIMIZER_SPECS

    g = np.random.default_rng(1)
    model = _grouped_model(g)
    options = {"sgd": {"lr": 0.05, "momentum": 0.9}, "adam": {"lr": 0.01}}[tag]
    spec = OPTIMIZER_SPECS[tag].model_validate({"type": tag, **options, "lookahead": {"k": 3, "alpha": 0.6},
                                                 "groups": [{"match": {"param": "bias"}, "lr_scale": 2.0}]})
    opt = spec.build(model)
    tparams = {p.name: torch.tensor(p.value.copy(), requires_grad=True) for p in model.parameters()}
    biases = [t for n, t in tparams.items() if n.endswith("bias")]
    others = [t for n, t in tparams.items() if not n.endswith("bias")]
    topt = getattr(torch.optim, TORCH[tag])([{"params": biases, "lr": options["lr"] * 2}, {"params": others}],
                                            **options)
    slow = {n: t.detach().clone() for n, t in tparams.items()}
    for step in range(1, 21):
        step_both(model, opt, tparams, topt, g)
        if step % 3 == 0:
            with torch.no_grad():
                for n, t in tparams.items():
                    slow[n] += 0.6 * (t - slow[n])
                    t.copy_(slow[n])
    assert_equal_to_torch(model, tparams)
    assert "layers.0.weight.lookahead_slow" in opt.state_dict()  # checkpointed: a resume continues exactly


def test_lookahead_from_a_config_resumes_exactly(tmp_path):
    import yaml

    from tests.conftest import TINY
    from tests.test_recipe import resumed, trained

    spec = yaml.safe_load(TINY)
    spec["optimizer"]["lookahead"] = {"k": 4, "alpha": 0.5}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    straight = trained(cfg, tmp_path / "a")
    assert resumed(cfg, tmp_path / "b") == straight
    assert trained(cfg, tmp_path / "c", "optimizer.lookahead=null") != straight
