"""Wall time to 90%, 92% and 94% test accuracy on Fashion-MNIST: cnnctl and PyTorch, same network and recipe.

    python benchmarks/time_to_accuracy.py [--config configs/resnet-fashion.yaml] [--data ../shared/data/fashion-mnist]
                                          [--threads N] [--only cnnctl|torch] [--json]

cnnctl trains the config as `cnnctl train` does (its Trainer, --threads threads). PyTorch trains the same
network (converted by tests/torch_models.py, starting from the same initial weights) with the same recipe:
SGD with Nesterov momentum and weight decay, the one-cycle schedule stepped per batch (momentum not cycled,
as cnnctl's), cross-entropy with the config's label smoothing, the same batch size and epochs, and the very
same batches (cnnctl's data pipeline: shuffling, augmentation, normalisation). After every epoch both evaluate
the test split (with the config's test-time augmentation); that evaluation is not counted in the times. The
goal: cnnctl within 1.1x of PyTorch's time to each accuracy. torch is a benchmark-only dependency
(pip install torch==2.13.0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.torch_models

from cnnctl import data  # noqa: E402
from cnnctl.config.build import build_model  # noqa: E402
from cnnctl.config.reading import load_config  # noqa: E402
from cnnctl.core import parallel  # noqa: E402
from cnnctl.run.callbacks import Callback  # noqa: E402
from cnnctl.run.evaluation import evaluate  # noqa: E402
from cnnctl.run.start import Seeds, dataset  # noqa: E402
from cnnctl.run.trainer import Trainer  # noqa: E402

GOALS = (0.90, 0.92, 0.94)


def run_cnnctl(spec, tmp: Path) -> list[dict]:
    """Per epoch: cumulative training seconds (train + validation, as metrics.jsonl counts them), test accuracy."""
    rows: list[dict] = []

    class TestEachEpoch(Callback):
        def on_epoch_end(self, row):
            with trainer.evaluated():  # the weights' moving average with train.ema_decay
                test = evaluate(trainer.model, trainer.loss_fn, trainer.ds, trainer.ds.test, spec.data.batch_size,
                                trainer.num_classes, spec.data.test_time_augment)
            total = (rows[-1]["seconds"] if rows else 0.0) + row["seconds"]
            rows.append({"epoch": row["epoch"], "seconds": total, "test_acc": test["accuracy"]})
            print(f"cnnctl epoch {row['epoch']}: {total:.0f} s, test {100 * test['accuracy']:.2f}%", flush=True)

    trainer = Trainer(spec, TestEachEpoch())
    trainer.fit(tmp / "cnnctl-run")
    return rows


def run_torch(spec, threads: int) -> list[dict]:
    import torch

    from tests.torch_models import loaded

    torch.set_num_threads(threads)
    seeds = Seeds.from_seed(spec.seed)
    model, rows_ = build_model(spec.model, seeds.init)
    ds = dataset(spec, rows_, seeds.data)
    net = loaded(model).train()
    o, s = spec.optimizer, spec.schedule
    decay = [p for n, p in net.named_parameters() if p.ndim > 1 or o.decay_bias_and_norm]
    rest = [p for n, p in net.named_parameters() if not (p.ndim > 1 or o.decay_bias_and_norm)]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0}],
                          lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    steps = -(-len(ds.train) // spec.data.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, epochs=spec.train.epochs, steps_per_epoch=steps,
                                                pct_start=s.pct_start, cycle_momentum=False)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=spec.loss.label_smoothing)
    aug = spec.data.augment

    def infer(x):  # the test-time augmentation the config asks for, as cnnctl's evaluation applies it
        x = torch.from_numpy(x)
        if not spec.data.test_time_augment.horizontal_flip:
            return net(x)
        return (net(x) + net(torch.flip(x, dims=[3]))) / 2

    out, total = [], 0.0
    for epoch in range(1, spec.train.epochs + 1):
        net.train()
        t0 = time.perf_counter()
        order = seeds.shuffle.permutation(len(ds.train))
        for x, y in data.batches(ds, ds.train, spec.data.batch_size, order, 0, aug, seeds.augment):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():  # the validation pass cnnctl's epoch time includes
            for x, _ in data.batches(ds, ds.val, 512):
                infer(x)
        total += time.perf_counter() - t0
        with torch.no_grad():
            correct = sum(int((infer(x).argmax(1).numpy() == y).sum())
                          for x, y in data.batches(ds, ds.test, 512))
        out.append({"epoch": epoch, "seconds": total, "test_acc": correct / len(ds.test)})
        print(f"torch epoch {epoch}: {total:.0f} s, test {100 * out[-1]['test_acc']:.2f}%", flush=True)
    return out


def time_to(rows: list[dict], goal: float) -> float | None:
    return next((r["seconds"] for r in rows if r["test_acc"] >= goal), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs/resnet-fashion.yaml")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/fashion-mnist")
    ap.add_argument("--threads", type=int, default=parallel.available_cores())
    ap.add_argument("--only", choices=("cnnctl", "torch"))
    ap.add_argument("--set", action="append", default=[], help="A config override, as cnnctl train --set.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    parallel.use(args.threads)
    spec, _ = load_config(args.config, [f"data.root={args.data.resolve()}", *args.set])
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "cnnctl"):
            results["cnnctl"] = run_cnnctl(spec, Path(tmp))
        if args.only in (None, "torch"):
            results["torch"] = run_torch(spec, args.threads)
    if args.json:
        print(json.dumps(results))
        return
    print(f"\n{spec.name}: {spec.train.epochs} epochs, batch {spec.data.batch_size}, {args.threads} threads\n")
    print("| test accuracy | " + " | ".join(f"{k} time" for k in results) + " | cnnctl / torch |")
    print("| --- | " + " | ".join("---" for _ in results) + " | --- |")
    for goal in GOALS:
        t = {k: time_to(v, goal) for k, v in results.items()}
        cells = [f"{v:.0f} s" if v is not None else "not reached" for v in t.values()]
        ratio = (f"{t['cnnctl'] / t['torch']:.2f}" if len(t) == 2 and None not in t.values() else "-")
        print(f"| {100 * goal:.0f}% | " + " | ".join(cells) + f" | {ratio} |")
    for k, v in results.items():
        print(f"{k}: final test {100 * v[-1]['test_acc']:.2f}% after {v[-1]['seconds']:.0f} s")


if __name__ == "__main__":
    main()
