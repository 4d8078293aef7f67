"""cnnctl's own threads: the same numbers bit for bit whatever the thread count, slices that add up to the
unsliced result, and --threads / CNNCTL_THREADS reported where the issue asks."""

import json

import numpy as np
import pytest

from cnnctl.cli import app
from cnnctl.core import convolution, nn, parallel
from cnnctl.core.plan import Runner
from tests.cases import all_cases, basic_block, randomize_params
from tests.conftest import ROOT
from tests.helpers import runner

CASES = [pytest.param(factory, shape, id=f"{tag}-{case_id}") for tag, case_id, factory, shape in all_cases()]


def step(factory, shape, algorithm=None):
    """Output, input gradient and parameter gradients of one training-mode pass (float32, seeded) of the layer as
    a model run through its execution plan (every convolution by `algorithm` where it applies)."""
    g = np.random.default_rng(4)
    layer = factory(g)
    randomize_params(layer, g)
    model = nn.Model([layer])
    model.set_input_grad(True)
    run = Runner(model)
    x = g.standard_normal(shape).astype(np.float32)
    if algorithm:
        run.algorithms = {s.name: algorithm for s in run.plan(x.shape[1:]).steps if s.algorithm}
    y = run.forward(x, training=True)
    dy = g.standard_normal(y.shape).astype(np.float32)
    dx = run.backward(dy)
    return [np.array(y), np.array(dx)] + [np.array(p.layer.grads[p.key]) for p in layer.parameters()]


# how far an algorithm's transforms multiply a float32 rounding (the largest row sum of |B^T| times that of |A^T|,
# the input and output transforms): 1 where the product is taken on the data itself
GROWTH = {"lowering": 1, "pointwise": 1, "winograd2": 4, "winograd4": 16}


def rounding_bound(shape, algorithm=None) -> float:
    """The largest difference two summation orders may give, as a fraction of an array's largest magnitude: float32's
    epsilon times the longest sum in a pass over this input (over the batch and the positions, as batchnorm and the
    weight gradients sum, or over one item's features, as a dense layer does) times the algorithm's growth. A slice
    missing or counted twice changes elements by their own size, a thousand times more (tested below)."""
    n = max(int(np.prod(shape)) // shape[1], int(np.prod(shape[1:])))
    return float(np.finfo(np.float32).eps) * n * GROWTH.get(algorithm, 1)


def assert_same_to_rounding(sliced, whole, bound: float) -> None:
    for i, (a, b) in enumerate(zip(sliced, whole)):
        scale = float(np.abs(b).max()) or 1.0
        err = float(np.abs(a.astype(np.float64) - b).max())
        assert err <= bound * scale, f"array {i}: sliced and unsliced differ by {err:.3g}, over {bound * scale:.3g}"


def _same_bits_on_1_2_3_threads(threads, make, bound):
    """Cut into many slices (grain 8), one, two and three threads give identical arrays; and the slices add up
    to what the unsliced call gives, to the rounding of a float32 sum in another order (`rounding_bound`: the
    BLAS kernel decides that order, Haswell's and SkylakeX's differ; the gradient checks run on the unsliced path)."""
    threads(1)
    whole = make()
    threads(1, grain=8)
    one = make()
    for n in (2, 3):
        threads(n, grain=8)
        for a, b in zip(one, make()):
            assert a.tobytes() == b.tobytes()
    assert_same_to_rounding(one, whole, bound)


@pytest.mark.parametrize("factory,shape", CASES)
def test_every_layer_gives_the_same_bits_on_any_thread_count(threads, factory, shape):
    """Every registered layer case, through the plan (where the slicing is decided)."""
    _same_bits_on_1_2_3_threads(threads, lambda: step(factory, shape), rounding_bound(shape))


@pytest.mark.parametrize("algorithm", list(convolution.ALGORITHMS))
def test_a_residual_network_gives_the_same_bits_on_any_thread_count(threads, algorithm):
    """The joins (a residual add with its fused ReLU, a concatenation), max pooling with a moved ReLU, batchnorm
    and every convolution algorithm, through the plan at 1, 2 and 3 threads."""
    def network(g):
        return nn.Sequential([nn.Conv2D(3, 8, 3, padding=1, activation="relu", rng=g), basic_block(g, 8, 8, 1),
                              nn.Conv2D(8, 8, 1, activation="gelu", rng=g), nn.Conv2D(8, 8, 3, padding=1,
                              activation="silu", rng=g), nn.Concat([nn.Sequential([]), nn.Sequential([nn.Conv2D(
                                  8, 4, 1, rng=g), nn.ReLU()])]), nn.Conv2D(12, 8, 3, padding=1, activation="tanh",
                                                                            rng=g),
                              nn.MaxPool2D(2), basic_block(g, 8, 16, 2), nn.GlobalAvgPool2D(), nn.Dense(16, 5, rng=g)])

    _same_bits_on_1_2_3_threads(threads, lambda: step(network, (4, 3, 12, 10), algorithm),
                                rounding_bound((4, 3, 12, 10), algorithm))


def residual_network(g):
    return nn.Sequential([nn.Conv2D(3, 8, 3, padding=1, activation="relu", rng=g), basic_block(g, 8, 8, 1),
                          nn.MaxPool2D(2), basic_block(g, 8, 16, 2), nn.GlobalAvgPool2D(), nn.Dense(16, 5, rng=g)])


@pytest.mark.parametrize("algorithm", list(convolution.ALGORITHMS))
def test_the_rounding_bound_catches_a_lost_slice(threads, monkeypatch, algorithm):
    """The tolerance above is not so loose that a wrong slice passes: with one slice of every cut operation left
    undone (its output as np.empty left it: NaN here, so that no stale buffer can hold the right numbers by
    chance), the comparison fails."""
    shape = (4, 3, 12, 10)
    threads(1)
    whole = step(residual_network, shape, algorithm)
    drain, empty, empty_like = parallel._drain, np.empty, np.empty_like
    lost = []

    def faulty(bounds, work):  # every cut operation's slices (split's and split_products' pieces) go through here
        gone = (bounds[1], bounds[2]) if len(bounds) > 2 else None  # an operation in one slice is left whole
        if gone:
            lost.append(gone)
        drain(bounds, lambda lo, hi: None if (lo, hi) == gone else work(lo, hi))

    monkeypatch.setattr(np, "empty", lambda *a, **k: np.full(a[0], np.nan, *a[1:], **k))
    monkeypatch.setattr(np, "empty_like", lambda x, *a, **k: np.full_like(x, np.nan, *a, **k))
    monkeypatch.setattr(parallel, "_drain", faulty)
    threads(1, grain=8)
    sliced = step(residual_network, shape, algorithm)
    monkeypatch.setattr(parallel, "_drain", drain)
    monkeypatch.setattr(np, "empty", empty)
    monkeypatch.setattr(np, "empty_like", empty_like)
    assert lost
    with pytest.raises(AssertionError, match="differ"):
        assert_same_to_rounding(sliced, whole, rounding_bound(shape, algorithm))


def test_an_operation_cut_in_several_slices_has_an_even_number_of_them(threads):
    """Two threads (two cores, the usual machine) share an even number of slices evenly: 3 kept one idle a third
    of the time. The count still follows from the size alone."""
    threads(1)
    grain = parallel.GRAIN
    assert len(parallel.slices(128, 3 * grain)) - 1 == 4 and len(parallel.slices(128, 5 * grain)) - 1 == 6
    assert len(parallel.slices(128, grain)) - 1 == 1 and len(parallel.slices(3, 3 * grain)) - 1 == 3  # no more than n
    assert len(parallel.slices(128, 100 * grain)) - 1 == parallel.MAX_SLICES


def test_split_covers_every_item_once_and_passes_errors_on(threads):
    threads(3, grain=1)
    seen = np.zeros(1000, int)

    def work(lo, hi):
        seen[lo:hi] += 1

    parallel.split(1000, work, 10**6)
    assert (seen == 1).all()
    # where an operation is cut depends on its size only: the same bounds for one thread as for three
    cut_three = parallel.slices(1000, 10**6)
    threads(1, grain=1)
    assert parallel.slices(1000, 10**6) == cut_three == [1000 * i // 16 for i in range(17)]  # MAX_SLICES pieces
    assert parallel.slices(1000, 10) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]  # size // GRAIN
    threads(3, grain=1)

    def fail(lo, hi):
        raise ValueError(f"slice {lo}")

    with pytest.raises(ValueError, match="slice"):
        parallel.split(100, fail, 10**6)


def test_products_of_a_small_map_are_cut_in_column_pieces_the_same_on_any_thread_count(threads):
    """A 7x7 map's 7 row products would leave one of 2 threads idle for a seventh of the time: with fewer products
    than slices each is cut into column pieces (a piece per slice at least), the pieces fixed by the shapes."""
    threads(1)
    size = 128 * 7 * 7 * 256 * 1152 // parallel.MAC_PER_NUMBER  # resnet-fashion's 7x7 stage, its first convolution
    assert parallel.column_parts(7, size, 7 * 128) == 4 and parallel.column_parts(28, size, 28 * 128) == 1
    assert parallel.column_parts(3, size, 3 * 128) == 6  # 18 pieces: an even number, as slices are cut
    assert parallel.column_parts(3, 10, 384) == 1  # too small to cut at all
    g = np.random.default_rng(0)
    a, b = g.standard_normal((64, 96), dtype=np.float32), g.standard_normal((3, 96, 4096), dtype=np.float32)
    results = []

    def covered() -> np.ndarray:
        seen = np.zeros((3, 4096), int)

        def mark(r, c):
            seen[r, c] += 1

        parallel.split_products(3, 4096, 10**9, mark)
        return seen

    for n in (1, 2, 3):
        threads(n)
        assert (covered() == 1).all()  # every column of every product once
        results.append(parallel.matmul(a, b, np.empty((3, 64, 4096), np.float32)).tobytes())
    assert results[0] == results[1] == results[2]
    assert np.allclose(np.frombuffer(results[0], np.float32).reshape(3, 64, 4096), a @ b, rtol=1e-4, atol=1e-4)


def test_where_work_is_cut_small_steps_run_whole_and_large_passes_are_cut(threads, monkeypatch):
    """The default thread count must never be the slower: a training step of LeNet-5 at batch 32 cuts nothing
    (cut in two, its largest product ran slower on 2 threads than on 1), while a batchnorm, pooling or add over a
    ResNet stage's 128x128x7x7 numbers is cut (run whole, the ResNets lost 3-5% of a step)."""
    from cnnctl.config.reading import load_config
    from cnnctl.tools.bench import bench

    cuts = []
    slices = parallel.slices
    monkeypatch.setattr(parallel, "slices", lambda n, size: cuts.append(len(slices(n, size)) - 1) or slices(n, size))
    threads(2)
    bench(load_config(ROOT / "configs/lenet5-mnist.yaml")[0], batch_size=32, steps=1, warmup=0)
    assert cuts and max(cuts) == 1
    assert len(slices(128, 128 * 128 * 7 * 7)) - 1 >= 2


def test_training_is_identical_with_one_and_two_threads(tmp_path, tiny_config, threads):
    threads(1, grain=64)  # the tiny net's operations are cut into slices too
    finals = []
    for n in (1, 2):
        res = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path / f"t{n}"), "-q",
                                  "--threads", str(n)])
        assert res.exit_code == 0, res.output
        (run,) = (tmp_path / f"t{n}").iterdir()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["threads"] == n
        finals.append([{k: v for k, v in json.loads(line).items() if k != "seconds"}
                       for line in (run / "metrics.jsonl").read_text().splitlines()])
    assert finals[0] == finals[1]


def test_threads_option_and_variable(tiny_config, threads, monkeypatch):
    res = runner.invoke(app, ["bench", str(tiny_config), "--steps", "2", "--warmup", "0", "--json", "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["threads"] == 2
    monkeypatch.setenv("CNNCTL_THREADS", "3")
    res = runner.invoke(app, ["bench", str(tiny_config), "--steps", "2", "--warmup", "0", "--json"])
    assert json.loads(res.output)["threads"] == 3
    for bad in ("many", "²"):  # '²' passes str.isdigit, which int() refuses
        monkeypatch.setenv("CNNCTL_THREADS", bad)
        res = runner.invoke(app, ["bench", str(tiny_config), "--steps", "2"])
        assert res.exit_code == 2 and "CNNCTL_THREADS" in res.output and "Traceback" not in res.output
    monkeypatch.delenv("CNNCTL_THREADS")
    res = runner.invoke(app, ["bench", str(tiny_config), "--steps", "2", "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output
    assert parallel.resolve(None) == parallel.available_cores()


def test_both_runs_two_small_pieces_of_work_side_by_side_with_the_bits_of_one_after_the_other(threads, monkeypatch):
    """A convolution's weight and input gradients at a small batch, neither large enough to cut, run one on each
    thread (`parallel.both`): the same bits as on one thread, each piece on a thread of its own, slices asked for
    inside a piece run there whole (no piece waits on a pool its partner holds), errors come back from either."""
    import threading

    from cnnctl.core import functional as F

    g = np.random.default_rng(0)
    x = g.standard_normal((8, 6, 14, 14), dtype=np.float32)
    w = g.standard_normal((16, 6, 5, 5), dtype=np.float32)

    def gradients():
        y, saved = F.conv2d_forward(x, w, None, (1, 1), (0, 0, 0, 0), (1, 1), cache={}, scratch=F.Scratch())
        dy = np.ascontiguousarray(np.moveaxis(g2.standard_normal(y.shape, dtype=np.float32), 0, -1))
        return F.conv2d_backward(np.moveaxis(dy, -1, 0), saved, w, x.shape, (1, 1), (0, 0, 0, 0), (1, 1),
                                 scratch=F.Scratch())

    ran = []
    both = parallel.both
    monkeypatch.setattr(parallel, "both", lambda a, b: ran.append(parallel.threads()) or both(a, b))
    results = []
    for n in (1, 2):
        threads(n)
        g2 = np.random.default_rng(1)
        results.append(gradients())
    assert ran == [1, 2]  # the small batch takes the side-by-side path on any thread count
    big = g.standard_normal((256, 2, 5, 5), dtype=np.float32)  # a small scatter beside a weight gradient to cut
    x2 = g.standard_normal((8, 2, 30, 30), dtype=np.float32)
    y2, saved2 = F.conv2d_forward(x2, big, None, (1, 1), (0, 0, 0, 0), (1, 1))
    F.conv2d_backward(np.ones_like(y2), saved2, big, x2.shape, (1, 1), (0, 0, 0, 0), (1, 1))
    assert ran == [1, 2]  # not side by side
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()

    threads(2, grain=1)  # every split asks for slices; inside a piece they run on its own thread, all of them
    seen = np.zeros((2, 1000), int)
    idents = []

    def piece(row):
        def work():
            idents.append(threading.get_ident())
            parallel.split(1000, lambda lo, hi: seen[row, lo:hi].__iadd__(1), 10**6)
            return row
        return work

    assert parallel.both(piece(0), piece(1)) == (0, 1)
    assert (seen == 1).all() and len(set(idents)) == 2

    def fail():
        raise ValueError("weight gradient")

    with pytest.raises(ValueError, match="weight gradient"):
        parallel.both(fail, lambda: None)
    with pytest.raises(ValueError, match="weight gradient"):
        parallel.both(lambda: None, fail)
    assert parallel.both(lambda: 1, lambda: 2) == (1, 2)  # the pool still serves after an error
