"""How little can a NumPy LeNet-5 training step spend outside its matrix products? A hand-written step, against
the products alone and cnnctl's step.

    python benchmarks/lenet_floor.py [--batch 32] [--rounds 5] [--json]

The network is benchmarks/vs_torch.py's LeNet-5 (conv 6@5x5 pad 2, ReLU, max pool 2, conv 16@5x5, ReLU, max
pool 2, dense 120 ReLU, 84 ReLU, 10; cross-entropy; SGD with momentum 0.9), written out as one routine with no
layers and no plan: every buffer allocated once, every NumPy call writing into it (`out=`), the activations
(channels, rows, columns, batch) so that the lowering copies and the poolings move whole batches at a time and the
second pooling writes the dense layers' (features, batch) input, each ReLU folded into its max pooling, the
convolution's input gradient scattered in ten adds (five shifts along a row, then five down the rows), the
parameters and their gradients in one flat buffer each so the momentum update is four calls. It runs the
matrix products benchmarks/ceiling.py times alone for this network, in the same shapes.

Each round times, alternated: the products alone (ceiling.py's `products`, BLAS on every core, and again with
BLAS on one thread), this step, its work outside the products (the step with every product skipped; the smaller
of BLAS on every core and on one thread, NumPy's own passes running on one thread either way) and cnnctl's own
step (`cnnctl bench`'s, as ceiling.py runs it). The table gives each round's figures and their medians. The
hand-written step's gradients and loss are checked against torch's autograd first (torch is a benchmark-only
dependency).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from ceiling import product_layers, products
from numpy.lib.stride_tricks import as_strided
from threadpoolctl import threadpool_limits
from vs_torch import LENET, machine_info, print_table, spec_for

from cnnctl.config.build import build_model
from cnnctl.core import parallel
from cnnctl.tools.bench import bench, blas_info

SHAPES = {"w1": (6, 25), "b1": (6,), "w2": (16, 150), "b2": (16,), "w3": (120, 400), "b3": (120,),
          "w4": (84, 120), "b4": (84,), "w5": (10, 84), "b5": (10,)}


def _skipped(a, b, out):
    return out


class LeNetStep:
    """One LeNet-5 training step on a batch of n images (n, 1, 28, 28), every buffer allocated here. Activations
    are (channels, rows, columns, batch): each lowered matrix and each window of a pooling then has runs of whole
    batches contiguous, and the second pooling's output is the first dense layer's (features, batch) input."""

    def __init__(self, n: int, rng: np.random.Generator, lr: float = 0.01, momentum: float = 0.9):
        f32 = np.float32
        sizes = [int(np.prod(s)) for s in SHAPES.values()]
        offsets = np.cumsum([0, *sizes])
        self.flat = np.empty(offsets[-1], f32)
        self.grad = np.zeros_like(self.flat)
        self.velocity = np.zeros_like(self.flat)
        self.scaled = np.empty_like(self.flat)
        self.p, self.g = {}, {}
        for (name, shape), a, b in zip(SHAPES.items(), offsets[:-1], offsets[1:]):
            self.p[name] = self.flat[a:b].reshape(shape)
            self.g[name] = self.grad[a:b].reshape(shape)
            fan_in = shape[1] if len(shape) == 2 else 1
            self.p[name][...] = rng.standard_normal(shape) * (np.sqrt(2.0 / fan_in) if len(shape) == 2 else 0.1)
        self.lr, self.momentum, self.n = f32(lr), f32(momentum), n
        self.xp = np.zeros((32, 32, n), f32)                     # padded input
        self.cols1 = np.empty((25, 784 * n), f32)
        self.z1 = np.empty((6, 784 * n), f32)
        self.half1 = np.empty((6, 14, 2, 14, n), f32)            # max over column pairs
        self.p1 = np.empty((6, 14, 14, n), f32)                  # relu(maxpool(z1))
        self.cols2 = np.empty((150, 100 * n), f32)
        self.z2 = np.empty((16, 100 * n), f32)
        self.half2 = np.empty((16, 5, 2, 5, n), f32)
        self.x3 = np.empty((400, n), f32)                        # relu(maxpool(z2)): (16, 5, 5, n) = (400, n)
        self.a3, self.a4, self.a5 = (np.empty((k, n), f32) for k in (120, 84, 10))
        self.ar = np.arange(n)
        self.mx, self.s = np.empty(n, f32), np.empty(n, f32)
        self.d4, self.d3, self.dx3 = np.empty((84, n), f32), np.empty((120, n), f32), np.empty((400, n), f32)
        self.mask = {k: np.empty((k, n), bool) for k in (84, 120, 400)}
        self.eq2 = np.empty((16, 5, 2, 5, 2, n), bool)
        self.dz2 = np.empty((16, 100 * n), f32)
        self.dcols2 = np.empty((150, 100 * n), f32)
        self.rowsum = np.empty((6, 5, 10, 14, n), f32)           # the scatter's five shifts along a row
        self.dp1 = np.empty((6, 14, 14, n), f32)
        self.mask1 = np.empty((6, 14, 14, n), bool)
        self.eq1 = np.empty((6, 14, 2, 14, 2, n), bool)
        self.dz1 = np.empty((6, 784 * n), f32)
        self.dw1t, self.dw2t = np.empty((25, 6), f32), np.empty((150, 16), f32)
        s = self.xp.strides
        self.win1 = as_strided(self.xp, (5, 5, 28, 28, n), (s[0], s[1], s[0], s[1], s[2]))
        s = self.p1.strides
        self.win2 = as_strided(self.p1, (6, 5, 5, 10, 10, n), (s[0], s[1], s[2], s[1], s[2], s[3]))

    def __call__(self, x: np.ndarray, y: np.ndarray, products: bool = True) -> float:
        """One step; with products=False every matrix product is skipped (its output keeps its last values):
        what the step does outside its products, in the step's own order and cache state."""
        p, g, n = self.p, self.g, self.n
        matmul = np.matmul if products else _skipped
        # forward: conv 1 (lowered), bias, max pool (column pairs, then row pairs) with its ReLU
        np.copyto(self.xp[2:30, 2:30], x[:, 0].transpose(1, 2, 0))
        np.copyto(self.cols1.reshape(5, 5, 28, 28, n), self.win1)
        z1 = matmul(p["w1"], self.cols1, out=self.z1)
        np.add(z1, p["b1"][:, None], out=z1)
        z1v = z1.reshape(6, 14, 2, 14, 2, n)
        h = np.maximum(z1v[:, :, :, :, 0], z1v[:, :, :, :, 1], out=self.half1)
        p1 = np.maximum(h[:, :, 0], h[:, :, 1], out=self.p1)
        np.maximum(p1, 0, out=p1)
        # conv 2, bias, max pool with its ReLU: (16, 5, 5, n) is the dense layers' (400, n) input
        np.copyto(self.cols2.reshape(6, 5, 5, 10, 10, n), self.win2)
        z2 = matmul(p["w2"], self.cols2, out=self.z2)
        np.add(z2, p["b2"][:, None], out=z2)
        z2v = z2.reshape(16, 5, 2, 5, 2, n)
        h = np.maximum(z2v[:, :, :, :, 0], z2v[:, :, :, :, 1], out=self.half2)
        x3v = self.x3.reshape(16, 5, 5, n)
        np.maximum(h[:, :, 0], h[:, :, 1], out=x3v)
        np.maximum(self.x3, 0, out=self.x3)
        # dense layers
        a3 = matmul(p["w3"], self.x3, out=self.a3)
        np.add(a3, p["b3"][:, None], out=a3)
        np.maximum(a3, 0, out=a3)
        a4 = matmul(p["w4"], a3, out=self.a4)
        np.add(a4, p["b4"][:, None], out=a4)
        np.maximum(a4, 0, out=a4)
        a5 = matmul(p["w5"], a4, out=self.a5)
        np.add(a5, p["b5"][:, None], out=a5)
        # softmax cross-entropy, its gradient left in a5
        mx = np.max(a5, axis=0, out=self.mx)
        picked = a5[y, self.ar]
        np.subtract(a5, mx, out=a5)
        np.exp(a5, out=a5)
        s = np.sum(a5, axis=0, out=self.s)
        loss = float(np.mean(np.log(s) + mx - picked))
        np.multiply(a5, (1.0 / s) / n, out=a5)
        a5[y, self.ar] -= np.float32(1.0 / n)
        d5 = a5
        # backward: dense layers
        matmul(d5, a4.T, out=g["w5"])
        np.sum(d5, axis=1, out=g["b5"])
        d4 = matmul(p["w5"].T, d5, out=self.d4)
        np.multiply(d4, np.greater(a4, 0, out=self.mask[84]), out=d4)
        matmul(d4, a3.T, out=g["w4"])
        np.sum(d4, axis=1, out=g["b4"])
        d3 = matmul(p["w4"].T, d4, out=self.d3)
        np.multiply(d3, np.greater(a3, 0, out=self.mask[120]), out=d3)
        matmul(d3, self.x3.T, out=g["w3"])
        np.sum(d3, axis=1, out=g["b3"])
        dx3 = matmul(p["w3"].T, d3, out=self.dx3)
        np.multiply(dx3, np.greater(self.x3, 0, out=self.mask[400]), out=dx3)
        # max pool 2 routes to its maxima; conv 2's gradients; its input gradient scattered (ten adds)
        eq2 = np.equal(z2v, x3v[:, :, None, :, None], out=self.eq2)
        np.multiply(eq2, dx3.reshape(16, 5, 1, 5, 1, n), out=self.dz2.reshape(16, 5, 2, 5, 2, n))
        np.copyto(g["w2"], matmul(self.cols2, self.dz2.T, out=self.dw2t).T)  # (K, O): BLAS's faster way round
        np.sum(self.dz2, axis=1, out=g["b2"])
        dcols = matmul(p["w2"].T, self.dz2, out=self.dcols2).reshape(6, 5, 5, 10, 10, n)
        rows = self.rowsum
        rows.fill(0)
        for j in range(5):
            np.add(rows[:, :, :, j:j + 10], dcols[:, :, j], out=rows[:, :, :, j:j + 10])
        dp1 = self.dp1
        dp1.fill(0)
        for i in range(5):
            np.add(dp1[:, i:i + 10], rows[:, i], out=dp1[:, i:i + 10])
        np.multiply(dp1, np.greater(p1, 0, out=self.mask1), out=dp1)
        eq1 = np.equal(z1v, p1[:, :, None, :, None], out=self.eq1)
        np.multiply(eq1, dp1[:, :, None, :, None], out=self.dz1.reshape(6, 14, 2, 14, 2, n))
        np.copyto(g["w1"], matmul(self.cols1, self.dz1.T, out=self.dw1t).T)
        np.sum(self.dz1, axis=1, out=g["b1"])
        # SGD with momentum (torch's form): v = mu v + g; w -= lr v
        np.multiply(self.velocity, self.momentum, out=self.velocity)
        np.add(self.velocity, self.grad, out=self.velocity)
        np.multiply(self.velocity, self.lr, out=self.scaled)
        np.subtract(self.flat, self.scaled, out=self.flat)
        return loss


def check_against_torch(n: int = 8) -> float:
    """Largest relative difference of the step's gradients and loss from torch's autograd (same weights)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    step = LeNetStep(n, rng)
    x = rng.standard_normal((n, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n)
    t = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in step.p.items()}
    h = F.max_pool2d(F.relu(F.conv2d(torch.tensor(x), t["w1"].reshape(6, 1, 5, 5), t["b1"], padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, t["w2"].reshape(16, 6, 5, 5), t["b2"])), 2).flatten(1)
    h = F.relu(F.linear(F.relu(F.linear(h, t["w3"], t["b3"])), t["w4"], t["b4"]))
    ref = F.cross_entropy(F.linear(h, t["w5"], t["b5"]), torch.tensor(y))
    ref.backward()
    loss = step(x, y)
    worst = abs(loss - ref.item()) / abs(ref.item())
    for k, v in t.items():
        worst = max(worst, float(np.abs(step.g[k] - v.grad.numpy()).max() / np.abs(v.grad.numpy()).max()))
    return worst


def products_ms(batch: int, rng) -> float:
    """benchmarks/ceiling.py's products alone for this network (BLAS on every core)."""
    spec = spec_for("LeNet-5", LENET, (1, 28, 28), batch)
    total = 0.0
    for row, layer in product_layers(*build_model(spec.model, rng)):
        total += sum(s for _, s, _ in products(layer, row.input_shape, row.output_shape, batch,
                                               row.path == "layers.0", rng))
    return total * 1e3


def step_ms(step: LeNetStep, x, y, steps: int = 20, warmup: int = 3, products: bool = True) -> float:
    for _ in range(warmup):
        step(x, y, products)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x, y, products)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    blas = blas_info()
    worst = check_against_torch()
    if worst > 1e-4:
        raise SystemExit(f"the hand-written step differs from torch's autograd by {worst:.2e} (relative)")
    rng = np.random.default_rng(0)
    step = LeNetStep(args.batch, rng)
    x = rng.standard_normal((args.batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    spec = spec_for("LeNet-5", LENET, (1, 28, 28), args.batch)
    rounds = []
    for _ in range(args.rounds):
        prod = products_ms(args.batch, rng)
        with threadpool_limits(limits=1, user_api="blas"):
            prod1 = products_ms(args.batch, rng)
        hand = step_ms(step, x, y)
        outside = step_ms(step, x, y, products=False)
        with threadpool_limits(limits=1, user_api="blas"):
            at1 = step_ms(step, x, y, products=False)  # BLAS off: only NumPy's own single-threaded passes
        with threadpool_limits(limits=1, user_api="blas"):  # cnnctl's own step, as the CLI runs it
            parallel.use(parallel.resolve(None))
            ours = bench(spec, args.batch, 10, 3)["ms_per_step"]
        rounds.append({"products_ms": prod, "products_one_thread_ms": prod1, "hand_step_ms": hand,
                       "hand_outside_ms": min(outside, at1),
                       "cnnctl_step_ms": ours, "hand_ratio": hand / prod, "cnnctl_ratio": ours / prod,
                       "hand_outside_share": min(outside, at1) / prod})
    med = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
    if args.json:
        print(json.dumps({"machine": machine_info(blas), "batch": args.batch, "torch_check": worst,
                          "rounds": rounds, "median": med}, indent=2))
        return
    print(f"machine: {machine_info(blas)}")
    print(f"hand-written step against torch's autograd: largest relative difference {worst:.1e}")
    print_table(["round", "products alone (ms)", "on one thread (ms)", "hand-written step (ms)", "step / products",
                 "its work outside the products (ms, share of the products)", "cnnctl step (ms)",
                 "cnnctl step / products"],
                [[str(i + 1) if i < len(rounds) else "median", f"{r['products_ms']:.2f}",
                  f"{r['products_one_thread_ms']:.2f}", f"{r['hand_step_ms']:.2f}",
                  f"{r['hand_ratio']:.2f}", f"{r['hand_outside_ms']:.2f} ({100 * r['hand_outside_share']:.0f}%)",
                  f"{r['cnnctl_step_ms']:.2f}", f"{r['cnnctl_ratio']:.2f}"]
                 for i, r in enumerate([*rounds, med])])


if __name__ == "__main__":
    main()
