"""Learning-rate schedules with torch.optim.lr_scheduler's values, plus linear warm-up stepped per batch.

Epoch-based schedules (step, multistep, exponential, cosine, reduce_on_plateau) change the rate between
epochs, as torch's do when `scheduler.step()` is called once per epoch; onecycle changes it every batch.
`Schedule.lr(epoch, step)` is a pure function of the number of finished epochs and optimizer steps (plus,
for reduce_on_plateau, the state that `observe` updates and `state_dict` saves).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from cnnctl.registry import registrar
from cnnctl.strict import Mode, Monitor, NonNegInt, PosInt, Strict

SCHEDULES: dict[str, type[Schedule]] = {}
SCHEDULE_SPECS: dict[str, type[Strict]] = {}  # what `schedule:` in a config may be, by its `type`
register_schedule = registrar(SCHEDULES, SCHEDULE_SPECS)


# ---------------------------------------------------------------- specs (the YAML)


class _ScheduleSpec(Strict):
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up length in epochs (fractions allowed), "
                                 "stepped per batch.")

    def build(self, base_lr: float, steps_per_epoch: int, epochs: int):
        params = self.model_dump(exclude={"type", "warmup_epochs"})
        warmup = round(self.warmup_epochs * steps_per_epoch)
        return SCHEDULES[self.type](base_lr, steps_per_epoch, epochs, warmup, **params)


class ConstantScheduleSpec(_ScheduleSpec):
    type: Literal["constant"]


class StepScheduleSpec(_ScheduleSpec):
    type: Literal["step"]
    step_size: PosInt = Field(10, description="Epochs between reductions.")
    gamma: float = Field(0.1, gt=0.0)


class MultiStepScheduleSpec(_ScheduleSpec):
    type: Literal["multistep"]
    milestones: list[PosInt] = Field(description="Epochs after which the rate is multiplied by gamma.")
    gamma: float = Field(0.1, gt=0.0)


class ExponentialScheduleSpec(_ScheduleSpec):
    type: Literal["exponential"]
    gamma: float = Field(0.95, gt=0.0)


class CosineScheduleSpec(_ScheduleSpec):
    type: Literal["cosine"]
    t_max: PosInt | None = Field(None, description="Epochs of the half cosine (default: train.epochs).")
    eta_min: float = Field(0.0, ge=0.0)


class OneCycleScheduleSpec(_ScheduleSpec):
    type: Literal["onecycle"]
    pct_start: float = Field(0.3, gt=0.0, lt=1.0)
    div_factor: float = Field(25.0, gt=0.0)
    final_div_factor: float = Field(1e4, gt=0.0)


class PlateauScheduleSpec(_ScheduleSpec):
    type: Literal["reduce_on_plateau"]
    monitor: Monitor = "val_loss"
    mode: Mode = "auto"
    factor: float = Field(0.1, gt=0.0, lt=1.0)
    patience: NonNegInt = 10
    threshold: float = Field(1e-4, ge=0.0)
    cooldown: NonNegInt = 0
    min_lr: float = Field(0.0, ge=0.0)


# ---------------------------------------------------------------- the schedules


class Schedule:
    """Constant rate; the base for the others. `warmup_steps` scales the rate linearly up to the schedule's
    value over the first optimizer steps: the k-th step (1-based) uses k / warmup_steps of it."""

    tag = "constant"

    def __init__(self, base_lr: float, steps_per_epoch: int, epochs: int, warmup_steps: int = 0):
        self.base_lr, self.steps_per_epoch, self.epochs = base_lr, steps_per_epoch, epochs
        self.warmup_steps = warmup_steps

    def scheduled(self, epoch: int, step: int) -> float:
        return self.base_lr

    def lr(self, epoch: int, step: int) -> float:
        """The rate for the optimizer step after `step` steps, in the epoch after `epoch` finished epochs."""
        value = self.scheduled(epoch, step)
        if step < self.warmup_steps:
            value *= (step + 1) / self.warmup_steps
        return value

    def observe(self, metrics: dict) -> None:
        """Called after each epoch's validation with that epoch's metrics row."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


register_schedule("constant", ConstantScheduleSpec)(Schedule)


@register_schedule("step", StepScheduleSpec)
class StepLR(Schedule):
    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_steps=0, step_size=10, gamma=0.1):
        super().__init__(base_lr, steps_per_epoch, epochs, warmup_steps)
        self.step_size, self.gamma = step_size, gamma

    def scheduled(self, epoch, step):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


@register_schedule("multistep", MultiStepScheduleSpec)
class MultiStepLR(Schedule):
    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_steps=0, milestones=(), gamma=0.1):
        super().__init__(base_lr, steps_per_epoch, epochs, warmup_steps)
        self.milestones, self.gamma = sorted(milestones), gamma

    def scheduled(self, epoch, step):
        return self.base_lr * self.gamma ** sum(m <= epoch for m in self.milestones)


@register_schedule("exponential", ExponentialScheduleSpec)
class ExponentialLR(Schedule):
    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_steps=0, gamma=0.95):
        super().__init__(base_lr, steps_per_epoch, epochs, warmup_steps)
        self.gamma = gamma

    def scheduled(self, epoch, step):
        return self.base_lr * self.gamma**epoch


@register_schedule("cosine", CosineScheduleSpec)
class CosineLR(Schedule):
    """eta_min + (base - eta_min) * (1 + cos(pi * epoch / t_max)) / 2; t_max defaults to the run's epochs."""

    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_steps=0, t_max=None, eta_min=0.0):
        super().__init__(base_lr, steps_per_epoch, epochs, warmup_steps)
        self.t_max, self.eta_min = t_max or epochs, eta_min

    def scheduled(self, epoch, step):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.t_max)) / 2


@register_schedule("onecycle", OneCycleScheduleSpec)
class OneCycleLR(Schedule):
    """torch's OneCycleLR (cosine annealing, two phases), stepped per batch; `lr` is the peak (max_lr).
    Starts at max_lr / div_factor, peaks after pct_start of the steps, ends at start / final_div_factor."""

    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_steps=0, pct_start=0.3, div_factor=25.0,
                 final_div_factor=1e4):
        super().__init__(base_lr, steps_per_epoch, epochs, warmup_steps)
        self.total = steps_per_epoch * epochs
        self.initial = base_lr / div_factor
        self.final = self.initial / final_div_factor
        self.peak_step = float(pct_start * self.total) - 1

    @staticmethod
    def _cos(start, end, pct):
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def scheduled(self, epoch, step):
        step = min(step, self.total - 1)
        if step <= self.peak_step:
            return self._cos(self.initial, self.base_lr, step / self.peak_step)
        return self._cos(self.base_lr, self.final, (step - self.peak_step) / (self.total - 1 - self.peak_step))


@register_schedule("reduce_on_plateau", PlateauScheduleSpec)
class ReduceOnPlateau(Schedule):
    """Multiply the rate by factor when the monitored metric has not improved (relative threshold) for more
    than `patience` epochs, never below min_lr; torch's ReduceLROnPlateau with threshold_mode='rel'."""

    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_steps=0, monitor="val_loss", mode="auto",
                 factor=0.1, patience=10, threshold=1e-4, cooldown=0, min_lr=0.0):
        super().__init__(base_lr, steps_per_epoch, epochs, warmup_steps)
        self.monitor, self.mode = monitor, resolve_mode(monitor, mode)
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.cooldown, self.min_lr = cooldown, min_lr
        self.current = base_lr
        self.best = math.inf if self.mode == "min" else -math.inf
        self.bad_epochs = self.cooldown_left = 0

    def scheduled(self, epoch, step):
        return self.current

    def observe(self, metrics):
        value = metrics.get(self.monitor)
        if value is None:
            return
        better = value < self.best * (1 - self.threshold) if self.mode == "min" else \
            value > self.best * (1 + self.threshold)
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            new = max(self.current * self.factor, self.min_lr)
            if self.current - new > 1e-8:
                self.current = new
            self.cooldown_left, self.bad_epochs = self.cooldown, 0

    def state_dict(self):
        return {"current": self.current, "best": self.best, "bad_epochs": self.bad_epochs,
                "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state):
        self.current, self.best = state["current"], state["best"]
        self.bad_epochs, self.cooldown_left = state["bad_epochs"], state["cooldown_left"]


def resolve_mode(monitor: str, mode: str) -> str:
    """'auto' means max for accuracies, min for everything else (losses)."""
    if mode != "auto":
        return mode
    return "max" if monitor.endswith("acc") else "min"
