"""A sweep file: its search (grid or random), ASHA and executor settings, and the trials drawn from it, each
checked as a config before the first one runs."""


from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator

from cnnctl.config.build import describe
from cnnctl.config.messages import format_validation_error
from cnnctl.config.reading import apply_overrides, read_config, read_yaml, validate
from cnnctl.config.spec import Monitor, Strict
from cnnctl.errors import CnnctlError, ConfigError
from cnnctl.run.start import check_known_data

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
MAX_TRIALS = 10_000  # every trial's spec is drawn and checked before the first one runs


class RandomSearch(Strict):
    type: Literal["random"]
    samples: int = Field(10, gt=0, le=10_000, description="Number of trials to draw (at most 10,000).")
    seed: int = Field(0, ge=0)


class GridSearch(Strict):
    type: Literal["grid"]


class AshaSpec(Strict):
    type: Literal["asha"]
    grace_period: int = Field(1, gt=0, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: int = Field(3, gt=1, description="Keep the best 1/reduction_factor at each rung.")


class LocalExecutor(Strict):
    type: Literal["local"]
    max_concurrent: int = Field(2, gt=0, description="Trials training at the same time.")
    blas_threads: int = Field(1, gt=0, description="Threads per trial (cnnctl's own, BLAS single-threaded; "
                              "cnnctl sweep --threads N overrides it).")


class RayExecutor(Strict):
    type: Literal["ray"]
    address: str | None = Field(None, description="Ray cluster address ('auto' joins the running one); "
                                "without it a local Ray instance is started.")
    cpus_per_trial: float = Field(1.0, gt=0)
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local Ray instance (default: all).")


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(description="The cnnctl config to vary; a path relative to the sweep file.")
    metric: Monitor = "val_acc"
    mode: Literal["auto", "min", "max"] = "auto"
    space: dict[str, Any] = Field(description="Dotted config keys: a value, or {choice: [...]}, "
                                  "{uniform: [a, b]}, {loguniform: [a, b]}, {randint: [a, b]} (b excluded).")
    search: Annotated[Union[RandomSearch, GridSearch], Field(discriminator="type")] = Field(  # noqa: UP007
        default_factory=lambda: GridSearch(type="grid"))
    scheduler: AshaSpec | None = None
    executor: Annotated[Union[LocalExecutor, RayExecutor], Field(discriminator="type")] = Field(  # noqa: UP007
        default_factory=lambda: LocalExecutor(type="local"))

    @field_validator("space")
    @classmethod
    def _distributions(cls, space):
        for key, value in space.items():
            if isinstance(value, dict):
                if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
                    raise ValueError(f"{key}: give one of {', '.join(DISTRIBUTIONS)} (e.g. {{choice: [1, 2]}}), "
                                     f"got {value}")
                kind, args = next(iter(value.items()))
                if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
                    raise ValueError(f"{key}: {kind} takes a list" + ("" if kind == "choice" else " [low, high]"))
                if kind != "choice":
                    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
                               for a in args):
                        raise ValueError(f"{key}: {kind} bounds must be finite numbers, got {args}")
                    if kind == "randint" and not all(isinstance(a, int) for a in args):
                        raise ValueError(f"{key}: randint bounds must be integers, got {args}")
                    if kind == "randint" and not all(-(2**63) <= a <= 2**63 - 1 for a in args):
                        raise ValueError(f"{key}: randint bounds must lie within +-9.2e18 (64-bit integers), "
                                         f"got {args}")
                    if args[0] >= args[1]:
                        raise ValueError(f"{key}: {kind} needs low < high, got {args}")
                if kind == "loguniform" and min(args) <= 0:
                    raise ValueError(f"{key}: loguniform bounds must be positive")
        return space


DONE = ("finished", "stopped", "diverged")  # trials with a result: ranked, and kept by --resume


def _as_set(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in overrides.items()]


@dataclass
class Trial:
    id: str
    overrides: dict[str, Any]
    varied: tuple[str, ...] = ()  # the keys the search draws (the others are the space's constants)

    def as_set(self) -> list[str]:
        return _as_set(self.overrides)

    def drawn(self) -> list[str]:
        """The overrides that differ between trials, as --set takes them (what the tables show)."""
        return _as_set({k: v for k, v in self.overrides.items() if k in self.varied})


def constants(sweep) -> list[str]:
    """The space's constant keys, as --set takes them: the same for every trial, shown once."""
    return _as_set({k: v for k, v in sweep.space.items() if not isinstance(v, dict)})


def load_sweep(path: str | Path, base_path: Path | None = None) -> tuple[SweepSpec, dict, Path]:
    """The sweep spec, its base config (raw mapping) and the base config's path (default: `base`, relative
    to the sweep file)."""
    path = Path(path)
    raw, root = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a YAML mapping")
    try:
        sweep = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise format_validation_error(e, raw, str(path), root) from None
    base_path = base_path or (path.parent / sweep.base).resolve()
    base, _ = read_config(base_path)
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: the base config must be a YAML mapping")
    return sweep, base, base_path


def draw_trials(sweep: SweepSpec) -> list[Trial]:
    """The trials, in order: the grid's cartesian product, or `samples` draws from the sweep's seed."""
    fixed = {k: v for k, v in sweep.space.items() if not isinstance(v, dict)}
    varied = {k: v for k, v in sweep.space.items() if isinstance(v, dict)}
    combos: list[dict] = []
    if sweep.search.type == "grid":
        for key, dist in varied.items():
            if "choice" not in dist:
                raise ConfigError(f"space.{key}: grid search needs {{choice: [...]}}, got {dist}",
                                  "use search: {type: random, samples: N} for continuous distributions")
        keys = list(varied)
        size = math.prod(len(varied[k]["choice"]) for k in keys)
        if size > MAX_TRIALS:
            raise ConfigError(f"the grid has {size:,} trials (the product of the choices' lengths); at most "
                              f"{MAX_TRIALS:,} are run", "search fewer values, or use search: {type: random, "
                              "samples: N}")
        for values in itertools.product(*(varied[k]["choice"] for k in keys)):
            combos.append(dict(zip(keys, values)))
    else:
        g = np.random.default_rng(sweep.search.seed)
        for _ in range(sweep.search.samples):
            combo = {}
            for key, dist in varied.items():
                kind, args = next(iter(dist.items()))
                if kind == "choice":
                    v = args[int(g.integers(len(args)))]
                elif kind == "uniform":
                    v = float(g.uniform(args[0], args[1]))
                elif kind == "loguniform":
                    v = float(math.exp(g.uniform(math.log(args[0]), math.log(args[1]))))
                else:
                    v = int(g.integers(args[0], args[1]))
                combo[key] = v
            combos.append(combo)
    return [Trial(f"trial-{i:03d}", {**combo, **fixed}, tuple(varied)) for i, combo in enumerate(combos or [{}])]


def trial_spec(base: dict, trial: Trial, sweep_name: str, source: str):
    """The validated spec of one trial, with every shape check that needs no data."""
    raw = apply_overrides(base, trial.as_set())
    raw["name"] = f"{sweep_name}.{trial.id}"
    try:
        spec = validate(raw, f"{source} with {trial.id} {trial.overrides}")
        check_known_data(spec, describe(spec.model))
    except CnnctlError as e:
        raise type(e)(f"{trial.id} ({', '.join(trial.as_set())}) gives an invalid spec: {e.message}", e.hint) \
            from None
    return spec
