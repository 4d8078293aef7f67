"""Learning-rate schedules give torch.optim.lr_scheduler's values for the same settings."""

import math

import pytest

from cnnctl.core.schedules import SCHEDULES

torch = pytest.importorskip("torch")

BASE, SPE, EPOCHS = 0.1, 7, 30

EPOCH_CASES = [
    ("constant", {}, lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0, total_iters=0)),
    ("step", {"step_size": 4, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, 4, 0.5)),
    ("multistep", {"milestones": [3, 10, 11], "gamma": 0.3},
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [3, 10, 11], 0.3)),
    ("exponential", {"gamma": 0.9}, lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)),
    ("cosine", {"t_max": 12, "eta_min": 0.001}, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 12, 0.001)),
    ("cosine", {"t_max": 30}, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 30)),
]


def torch_optimizer():
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)


@pytest.mark.parametrize(("tag", "kwargs", "make"), EPOCH_CASES, ids=lambda v: str(v))
def test_epoch_schedules_match_torch(tag, kwargs, make):
    ours = SCHEDULES[tag](BASE, SPE, EPOCHS, 0, **kwargs)
    opt = torch_optimizer()
    sched = make(opt)
    for epoch in range(EPOCHS):
        for step in range(epoch * SPE, (epoch + 1) * SPE):
            assert ours.lr(epoch, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), epoch
        opt.step()
        sched.step()


@pytest.mark.parametrize("kwargs", [{}, {"pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0}])
def test_onecycle_matches_torch_per_batch(kwargs):
    ours = SCHEDULES["onecycle"](BASE, SPE, EPOCHS, 0, **kwargs)
    opt = torch_optimizer()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=BASE, total_steps=SPE * EPOCHS, cycle_momentum=False,
                                                **kwargs)
    for step in range(SPE * EPOCHS):
        assert ours.lr(step // SPE, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), step
        opt.step()
        sched.step()


@pytest.mark.parametrize("mode,monitor", [("min", "val_loss"), ("max", "val_acc")])
def test_reduce_on_plateau_matches_torch(mode, monitor):
    values = [1.0, 0.9, 0.95, 0.95, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.79999, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    if mode == "max":
        values = [-v for v in values]
    ours = SCHEDULES["reduce_on_plateau"](BASE, SPE, EPOCHS, 0, monitor=monitor, factor=0.5, patience=2,
                                          cooldown=1, min_lr=0.02)
    opt = torch_optimizer()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=2, cooldown=1,
                                                       min_lr=0.02)
    for epoch, v in enumerate(values):
        assert ours.lr(epoch, epoch * SPE) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), epoch
        ours.observe({monitor: v})
        sched.step(v)
    assert 0.02 <= ours.lr(len(values), 0) < BASE  # reduced, never below min_lr


def test_plateau_state_round_trip():
    a = SCHEDULES["reduce_on_plateau"](BASE, SPE, EPOCHS, 0, patience=0)
    for v in (1.0, 2.0, 3.0):
        a.observe({"val_loss": v})
    b = SCHEDULES["reduce_on_plateau"](BASE, SPE, EPOCHS, 0, patience=0)
    b.load_state_dict(a.state_dict())
    assert b.lr(3, 0) == a.lr(3, 0) < BASE


def test_linear_warmup_is_stepped_per_batch():
    s = SCHEDULES["cosine"](BASE, SPE, EPOCHS, 10)
    assert [s.lr(0, k) for k in range(3)] == pytest.approx([BASE * 0.1, BASE * 0.2, BASE * 0.3])
    assert s.lr(1, 9) == pytest.approx(s.scheduled(1, 9))  # the 10th step has the full scheduled rate
    assert s.lr(1, 12) == pytest.approx(0.1 * (1 + math.cos(math.pi / 30)) / 2)
