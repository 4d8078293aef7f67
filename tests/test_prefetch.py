"""Batches prepared a batch ahead in a thread (data.prefetch): the batches and the numbers of the plain iterator,
errors raised where the batch is taken, the thread stopped when the loop is left, and the augmentation's
generator rewound for a checkpoint."""

import threading

import numpy as np
import pytest

from cnnctl import data
from cnnctl.data.prefetch import Prefetched, prefetched
from cnnctl.data.spec import AugmentSpec
from tests.helpers import invoke, metric_rows, write_tiny


def _dataset():
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 256, (100, 1, 8, 8), dtype=np.uint8), rng.integers(0, 3, 100))
    return data.Dataset("t", ["a", "b", "c"], split, split, split, np.zeros(1, np.float32), np.ones(1, np.float32))


AUG = AugmentSpec.model_validate({"horizontal_flip": True, "random_shift": 0.25, "random_erasing": 0.5})


def test_the_batches_are_those_of_the_plain_iterator():
    ds = _dataset()
    plain = list(data.batches(ds, ds.train, 16, np.arange(100)[::-1], 0, AUG, np.random.default_rng(1)))
    with Prefetched(data.batches(ds, ds.train, 16, np.arange(100)[::-1], 0, AUG, np.random.default_rng(1))) as f:
        ahead = list(f)
    assert len(ahead) == len(plain) == 7
    for (x, y), (xp, yp) in zip(ahead, plain):
        np.testing.assert_array_equal(x, xp) and np.testing.assert_array_equal(y, yp)


def test_rewound_gives_the_generator_as_before_the_first_batch_not_taken():
    ds = _dataset()
    rng = np.random.default_rng(2)
    with Prefetched(data.batches(ds, ds.train, 16, None, 0, AUG, rng), rng) as feed:
        taken = [next(feed) for _ in range(3)]
        with feed.rewound():
            state = rng.bit_generator.state  # what a checkpoint after batch 3 records
        rest = list(feed)
    again = np.random.default_rng(0)
    again.bit_generator.state = state
    resumed = list(data.batches(ds, ds.train, 16, None, 3, AUG, again))
    assert len(taken) + len(rest) == 7
    for (x, _), (xr, _) in zip(rest, resumed):
        np.testing.assert_array_equal(x, xr)


def test_an_error_is_raised_where_the_batch_is_taken_and_leaving_stops_the_thread():
    def failing():
        yield 1
        raise ValueError("shard damaged")

    with Prefetched(failing()) as feed:
        assert next(feed) == 1
        with pytest.raises(ValueError, match="shard damaged"):
            next(feed)
    endless = iter(lambda: 0, None)
    with prefetched(endless) as feed:
        next(iter(feed))
    assert not any(t.name == "cnnctl-prefetch" and t.is_alive() for t in threading.enumerate())


def test_a_run_with_prefetching_equals_one_without(tmp_path):
    def augmented(spec):
        spec["data"]["augment"] = {"horizontal_flip": True, "random_shift": 0.1}
    cfg = write_tiny(tmp_path, augmented, epochs=2)
    invoke("train", cfg, "-q", "--runs-dir", tmp_path / "on")
    invoke("train", cfg, "-q", "--runs-dir", tmp_path / "off", "--set", "data.prefetch=false")
    (on,), (off,) = (tmp_path / "on").iterdir(), (tmp_path / "off").iterdir()
    assert metric_rows(on) == metric_rows(off)
