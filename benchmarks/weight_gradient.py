"""Which way round should a convolution's weight gradient be multiplied? Both, timed per layer.

    python benchmarks/weight_gradient.py [--rounds 3] [--json]

cnnctl computes a convolution's weight gradient as one product per output row r of the lowered input, on one
thread (cnnctl's threads cut the products, BLAS runs single-threaded): either dY[r] @ window[r].T, (O, K), or
its transpose window[r] @ dY[r].T, (K, O) (K = C*KH*KW, the reduction over OW*N). The two do the same
multiply-adds; OpenBLAS's kernels run them at different speeds. For every convolution of
benchmarks/vs_torch.py's networks this times both on the layer's own shapes, with BLAS on one thread, and
prints the milliseconds of each and (O, K) / (K, O): above 1 the transpose is the faster.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import numpy as np
from ceiling import product_layers
from threadpoolctl import threadpool_limits
from vs_torch import CASES, machine_info, median_seconds, print_table, spec_for

from cnnctl.config.build import build_model
from cnnctl.core.nn.conv import Conv2D
from cnnctl.tools.bench import blas_info


def layers(rng):
    """(network, batch, layer path, O, K, output rows, OW*N) of every ungrouped convolution of the networks."""
    for name, spec_layers, shape, batch, _ in CASES:
        spec = spec_for(name, spec_layers, shape, batch)
        for row, layer in product_layers(*build_model(spec.model, rng)):
            if isinstance(layer, Conv2D):
                kh, kw = layer.kernel_size
                o, oh, ow = row.output_shape
                yield name, batch, row.path, o, row.input_shape[0] * kh * kw, oh, ow * batch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="each product is timed this many times (median)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    blas = blas_info()
    rng = np.random.default_rng(0)
    results = []
    with threadpool_limits(limits=1, user_api="blas"):
        for name, batch, path, o, k, oh, s in layers(rng):
            dy = rng.standard_normal((oh, o, s), dtype=np.float32)
            win = rng.standard_normal((oh, k, s), dtype=np.float32)
            ok, ko = np.empty((oh, o, k), np.float32), np.empty((oh, k, o), np.float32)
            t_ok = median_seconds(partial(np.matmul, dy, win.transpose(0, 2, 1), out=ok), args.rounds)
            t_ko = median_seconds(partial(np.matmul, win, dy.transpose(0, 2, 1), out=ko), args.rounds)
            results.append({"network": name, "batch": batch, "layer": path, "O": o, "K": k, "rows": oh, "ow_n": s,
                            "o_k_ms": t_ok * 1e3, "k_o_ms": t_ko * 1e3, "ratio": t_ok / t_ko})
    if args.json:
        print(json.dumps({"machine": machine_info(blas), "results": results}, indent=2))
        return
    print(f"machine: {machine_info(blas)}")
    print_table(["network", "batch", "layer", "O", "K", "rows x OW*N", "(O, K) ms", "(K, O) ms", "(O, K) / (K, O)"],
                [[r["network"], r["batch"], r["layer"], r["O"], r["K"], f"{r['rows']} x {r['ow_n']}",
                  f"{r['o_k_ms']:.2f}", f"{r['k_o_ms']:.2f}", f"{r['ratio']:.2f}"] for r in results])


if __name__ == "__main__":
    main()
