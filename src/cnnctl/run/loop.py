"""One epoch of training: the batches of the epoch's order (from where an interrupted epoch stopped), this rank's
share of each, the training step, the running loss and accuracy, and a checkpoint at train.checkpoint_every_steps
or when a stop was asked for (then Interrupted)."""

from __future__ import annotations

import copy
import math
import signal
import time

from cnnctl import data
from cnnctl.errors import Interrupted, TrainingError

from . import distributed
from .checkpoint import Partial
from .step import TrainingStep


def diverged(loss: float, epoch: int, step: int, batch: int, batches: int, lr: float) -> TrainingError:
    """The error of a training loss that is NaN or infinite."""
    return TrainingError(
        f"the loss became {loss} at epoch {epoch}, step {step} (batch {batch}/{batches}); training stopped, the "
        "checkpoints already written are untouched",
        f"lower optimizer.lr (now {lr:g}), add schedule.warmup_epochs or train.grad_clip_norm, keep "
        "data.normalize: auto, or add batchnorm layers")


def train_epoch(trainer, epoch: int) -> tuple[float, float]:
    """Train one epoch of a Trainer; the mean training loss and accuracy of its batches."""
    t, spec, state = trainer, trainer.spec, trainer.state
    bs, every = spec.data.batch_size, spec.train.checkpoint_every_steps
    if state.partial:  # continue an interrupted epoch where it stopped
        p = state.partial
        t.seeds.shuffle.bit_generator.state = copy.deepcopy(p.shuffle_state)
        start, total_loss, correct, seen = p.position, p.loss_sum, p.correct, p.seen
    else:
        start, total_loss, correct, seen = 0, 0.0, 0, 0
    shuffle_state = copy.deepcopy(t.seeds.shuffle.bit_generator.state)
    order = data.epoch_order(t.feed.train, spec.data.sampler, t.seeds.shuffle)
    t.cb.on_epoch_start(epoch, spec.train.epochs, t.steps_per_epoch, start)
    aug = spec.data.augment if spec.data.augment.active else None
    flips = data.augment.alternating_flips(len(t.ds.train), spec.seed, epoch) \
        if aug is not None and aug.horizontal_flip == "alternating" else None
    share = t.world.shard if t.world.size > 1 else None  # each rank reads and augments only its rows
    batches = data.batches(t.feed, t.feed.train, bs, order, start, aug, t.seeds.augment, flips, share)
    step = TrainingStep(t.net, t.loss_fn, t.optimizer, t.world, spec.train.grad_clip_norm, t.average,
                        lambda: t.stop_signal)
    with data.prefetch.prefetched(batches, t.seeds.augment, spec.data.prefetch) as feed:
        for b, (x, y) in enumerate(feed, start=start):
            t0 = time.perf_counter()
            t.optimizer.lr = t.schedule.lr(epoch - 1, state.step)
            n = min(bs, len(order) - b * bs)  # the global batch
            if share is not None:
                distributed.mark_share(t.world, n, t.runner.context)
            result = step(x, y, step_number=state.step + 1)
            if not math.isfinite(result.loss):
                raise diverged(result.loss, epoch, state.step + 1, b + 1, t.steps_per_epoch, t.optimizer.lr)
            if result.stop is not None and t.stop_signal is None:  # another rank was asked to stop
                t.stop_signal = result.stop
            state.step += 1
            t.cb.on_step(state.step, t.optimizer.lr, result.loss)
            total_loss += result.loss * n
            correct += result.correct
            seen += n
            t.cb.on_batch_end(b + 1, total_loss / seen, correct / seen, n / (time.perf_counter() - t0))
            # one process: a signal during this step stops after it; several: all stop after the step whose
            # reduction carried a request, so that every rank stops at the same batch
            stop = t.stop_signal is not None if t.world.size == 1 else result.stop is not None
            if stop or (every and state.step % every == 0):
                state.partial = Partial(position=b + 1, shuffle_state=shuffle_state, loss_sum=total_loss,
                                        correct=correct, seen=seen)
                with feed.rewound():  # the augmentation's generator as it was before batch b + 1
                    t.save("last")
                if stop:
                    raise Interrupted(t.stop_signal or signal.SIGINT, t.run_dir, epoch, state.step)
    state.partial = None
    return total_loss / seen, correct / seen
