"""The learning-rate range test (Smith 2015; fastai's lr_find): train from the config's initial weights while
the rate grows exponentially from min_lr to max_lr, one batch per rate, and watch the loss.

The curve is each step's loss averaged with its neighbours (a centred window over a fifth of the steps: no lag,
unlike the running average that decides when to stop). The suggested rate is where that curve is lowest for
SGD, and a tenth of it for an adaptive optimizer (Adam and its kin train best about a decade lower): measured
against sweeps of trained rates on four networks, within 2x of the best rate on each, where fastai's valley and
steepest-descent rules missed by up to 45x on some (docs/lr-find.md). Nothing is written: the weights are
thrown away.
"""

from __future__ import annotations

import math

import numpy as np

from cnnctl.config.spec import Spec
from cnnctl.errors import CnnctlError
from cnnctl.run.start import Seeds
from cnnctl.run.step import TrainingStep
from cnnctl.run.trainer import Trainer

SMOOTHING = 0.98  # the stop rule's running average of the loss, bias-corrected (as fastai)
DIVERGED = 4.0  # stop once that average exceeds this multiple of its minimum
WINDOW = 0.2  # the curve: each step's loss averaged over a centred window of this share of the steps
MIN_LR, MAX_LR, STEPS = 1e-7, 10.0, 100  # the verb's defaults (fastai's range)


def lr_find(spec: Spec, min_lr: float = MIN_LR, max_lr: float = MAX_LR, steps: int = STEPS) -> dict:
    """{"suggested_lr", "rule", "lrs", "losses" (the centred average), "raw_losses", "stopped_early", ...} of the
    range test on spec's training data."""
    if not 0 < min_lr < max_lr or not math.isfinite(max_lr):
        raise CnnctlError(f"--min-lr {min_lr:g} and --max-lr {max_lr:g}: need 0 < min-lr < max-lr",
                          "e.g. --min-lr 1e-7 --max-lr 1")
    if steps < 5:
        raise CnnctlError(f"--steps {steps}: the test needs at least 5 steps", "e.g. --steps 100")
    trainer = Trainer(spec)  # the model, data, loss and optimizer a run would start with; nothing is written
    step = TrainingStep(trainer.runner, trainer.loss_fn, trainer.optimizer, grad_clip_norm=spec.train.grad_clip_norm)
    lrs, raw, avg, best = [], [], 0.0, math.inf
    batches = _endless(trainer.ds, spec, trainer.seeds)
    for i in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (i / (steps - 1))
        x, y = next(batches)
        trainer.optimizer.lr = lr
        with np.errstate(over="ignore", invalid="ignore"):
            loss = step(x, y).loss
        if not math.isfinite(loss):
            break
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        smoothed = avg / (1 - SMOOTHING ** (i + 1))
        lrs.append(lr)
        raw.append(loss)
        best = min(best, smoothed)
        if smoothed > DIVERGED * best and i > 0:
            break
    k = len(trainer.ds.classes)
    chance = math.log(k) if spec.loss.type in ("cross_entropy", "nll") and k > 1 else None
    losses, adaptive = centred(raw), type(trainer.optimizer).adaptive
    return {"suggested_lr": suggest(lrs, losses, adaptive), "rule": rule_of(adaptive), "lrs": lrs, "losses": losses,
            "raw_losses": raw, "stopped_early": len(lrs) < steps, "classes": k, "chance_loss": chance}


def centred(raw: list[float], fraction: float = WINDOW) -> list[float]:
    """Each value averaged with its neighbours over a centred window of `fraction` of the values (odd, at least
    3), the ends padded with their own value."""
    width = max(3, int(len(raw) * fraction) | 1)
    if len(raw) < width:
        return list(raw)
    padded = np.pad(np.asarray(raw, np.float64), width // 2, mode="edge")
    return np.convolve(padded, np.ones(width) / width, mode="valid").tolist()


def verdict(res: dict, max_lr: float) -> list[str]:
    """What the test showed, in words that hold for this curve: whether the loss ever fell below a uniform
    guess's (ln K for K classes: below it, the network has learned something), and whether it was still falling,
    rising or diverging at the end of the range."""
    losses, lrs = res["losses"], res["lrs"]
    if not losses:
        return ["the loss was not finite from the first step: lower --min-lr"]
    low = min(losses)
    at = lrs[losses.index(low)]
    notes = []
    chance = res.get("chance_loss")
    if chance is not None and low > chance:
        notes.append(f"the smoothed loss went from {losses[0]:.3g} down to {low:.3g} but stayed above {chance:.3g} "
                     f"(ln {res['classes']}: a uniform guess over {res['classes']} classes): the test ended before "
                     f"the network learned anything, so the suggestion is a rough guess; try more --steps (e.g. "
                     f"{2 * len(lrs)}) or --max-lr {10 * max_lr:g}")
    if res["stopped_early"]:
        notes.append(f"stopped at {lrs[-1]:.2g}: the loss diverged (past {DIVERGED:g}x its minimum, reached at "
                     f"{at:.2g})")
    elif losses[-1] <= 1.1 * low:
        notes.append(f"the loss was still at its lowest at {lrs[-1]:.2g}, the end of the range: higher rates may "
                     f"help too (try --max-lr {10 * max_lr:g})")
    else:
        notes.append(f"the loss rose from its minimum {low:.3g} at {at:.2g} to {losses[-1]:.3g} at {lrs[-1]:.2g} "
                     f"without diverging: rates past about {at:.2g} do not help")
    return notes


def steepest(lrs: list[float], losses: list[float]) -> float | None:
    """The rate of steepest descent of the loss against log(lr), between the first tenth of the steps (where
    the average still settles) and the loss's minimum; None when the loss never falls there."""
    start = max(3, len(losses) // 10)
    end = int(np.argmin(losses)) + 1 if losses else 0
    if end - start < 3:
        return None
    slope = np.gradient(np.asarray(losses[start:end]), np.log(np.asarray(lrs[start:end])))
    i = int(np.argmin(slope))
    return float(lrs[start + i]) if slope[i] < 0 else None


def valley(lrs: list[float], losses: list[float]) -> float | None:
    """fastai's valley rule: the longest run of steps over which the loss keeps falling (the longest strictly
    decreasing subsequence of the curve, ending at step e with length n), and the rate about halfway into it
    (step e - n + int(n / 3) + int(n / 6), fastai's index); None when the loss never falls."""
    y = np.asarray(losses, dtype=np.float64)
    if len(y) < 3:
        return None
    run = np.ones(len(y), dtype=np.int64)  # run[i]: the longest decreasing subsequence ending at step i
    for i in range(1, len(y)):
        higher = run[:i][y[:i] > y[i]]
        if higher.size:
            run[i] = higher.max() + 1
    end = int(np.argmax(run))
    if run[end] < 3:
        return None
    third = (run[end]) / 3
    return float(lrs[end - run[end] + int(third) + int(third / 2)])


def minimum(lrs: list[float], losses: list[float]) -> float | None:
    """The rate where the smoothed loss is lowest (Smith's largest rate that still trains); None when it is lowest
    at the first step (the loss never fell)."""
    i = int(np.argmin(losses)) if losses else 0
    return float(lrs[i]) if i > 0 else None


def minimum_tenth(lrs: list[float], losses: list[float]) -> float | None:
    """A tenth of the rate where the smoothed loss is lowest (fastai's `minimum`)."""
    lr = minimum(lrs, losses)
    return None if lr is None else lr / 10


RULES = {"minimum": minimum, "minimum/10": minimum_tenth, "valley": valley, "steepest": steepest}


def rule_of(adaptive: bool) -> str:
    """The rule of RULES that suggest() follows for an optimizer: measured against sweeps (docs/lr-find.md)."""
    return "minimum/10" if adaptive else "minimum"


def suggest(lrs: list[float], losses: list[float], adaptive: bool = False) -> float | None:
    """The suggested rate of a range test's (centred) curve: where the loss is lowest for SGD, a tenth of that
    for an adaptive optimizer (`Optimizer.adaptive`: Adam, AdamW, RAdam, RMSprop, Adagrad, Adadelta)."""
    return RULES[rule_of(adaptive)](lrs, losses)


def lr_chart_series(res: dict) -> dict[str, list[float | None]]:
    """The terminal chart's series: the smoothed loss, and the suggested rate's point on it."""
    lrs, lr = res["lrs"], res["suggested_lr"]
    point: list[float | None] = [None] * len(lrs)
    if lr is not None and lrs:
        i = int(np.argmin(np.abs(np.log(np.asarray(lrs)) - np.log(lr))))
        point[i] = res["losses"][i]
    return {"loss (smoothed)": res["losses"], f"suggested {lr:.2g}" if lr is not None else "no suggestion": point}


def _endless(ds, spec: Spec, seeds: Seeds):
    """Shuffled, augmented training batches, epoch after epoch, as training draws them."""
    from cnnctl import data

    aug = spec.data.augment if spec.data.augment.active else None
    while True:
        order = data.epoch_order(ds.train, spec.data.sampler, seeds.shuffle)
        yield from data.batches(ds, ds.train, spec.data.batch_size, order, 0, aug, seeds.augment)
