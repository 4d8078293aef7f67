"""cnnctl pack and dataset: packed: the numbers of the data it was packed from, to the last digit (train, resume,
eval, `cnnctl data`), picture folders decoded in worker processes, memory-mapped rows, and what goes wrong with a
pack: a damaged shard, a truncated manifest, a pack killed and resumed, a folder holding other data."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnctl.config.reading import load_config
from cnnctl.data import load_dataset, packed
from cnnctl.errors import DataError
from cnnctl.run.start import Seeds
from tests.helpers import invoke, metric_rows


def _configs(tmp_path, **data):
    """(a config reading an .npz, the same config reading its pack at tmp_path/pack)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (600, 1, 12, 12), dtype=np.uint8),
             y_train=rng.integers(0, 3, 600), x_test=rng.integers(0, 256, (100, 1, 12, 12), dtype=np.uint8),
             y_test=rng.integers(0, 3, 100))
    cfg = {"name": "n", "seed": 1, "data": {"dataset": "npz", "root": str(tmp_path / "d.npz"), "batch_size": 32,
                                            "val_split": 0.2, "augment": {"horizontal_flip": True,
                                                                          "random_shift": 0.1}, **data},
           "model": {"input_shape": [1, 12, 12], "layers": [
               {"type": "conv2d", "filters": 4, "kernel_size": 3, "activation": "relu"},
               {"type": "batchnorm"}, {"type": "flatten"}, {"type": "dense", "units": 3}]},
           "optimizer": {"type": "adam", "lr": 0.01}, "train": {"epochs": 2, "test_at_end": True}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    cfg["data"] = {**{k: v for k, v in cfg["data"].items() if k != "root"}, "dataset": "packed",
                   "path": str(tmp_path / "pack")}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "a.yaml", tmp_path / "b.yaml"


def _run(runs: Path) -> Path:
    (run,) = runs.iterdir()
    return run


@pytest.mark.parametrize("data", [{}, {"stratify": True, "sampler": "balanced"}], ids=["shuffle", "balanced"])
def test_a_packed_dataset_trains_to_the_numbers_of_its_source(tmp_path, data):
    a, b = _configs(tmp_path, **data)
    invoke("pack", a, "--out", tmp_path / "pack")
    invoke("train", a, "-q", "--runs-dir", tmp_path / "ra")
    invoke("train", b, "-q", "--runs-dir", tmp_path / "rb")
    ra, rb = _run(tmp_path / "ra"), _run(tmp_path / "rb")
    assert metric_rows(ra) == metric_rows(rb)
    test_a = json.loads((ra / "summary.json").read_text())["test"]
    assert test_a == json.loads((rb / "summary.json").read_text())["test"]
    ev_a, ev_b = (json.loads(invoke("eval", r, "--json").stdout) for r in (ra, rb))
    where = ("checkpoint", "dataset", "recorded_in")  # the files and the format's name differ, nothing else
    assert {k: v for k, v in ev_a.items() if k not in where} == {k: v for k, v in ev_b.items() if k not in where}
    da = json.loads(invoke("data", a, "--json").stdout)
    db = json.loads(invoke("data", b, "--json").stdout)
    assert {k: v for k, v in da.items() if k != "dataset"} == {k: v for k, v in db.items() if k != "dataset"}


def test_resuming_a_run_on_packed_data_is_bit_exact(tmp_path):
    a, b = _configs(tmp_path)
    invoke("pack", a, "--out", tmp_path / "pack")
    invoke("train", b, "-q", "--runs-dir", tmp_path / "whole")
    invoke("train", b, "-q", "--runs-dir", tmp_path / "halves", "--set", "train.epochs=1")
    run = _run(tmp_path / "halves")
    invoke("train", "--resume", run, "-q", "--set", "train.epochs=2")
    assert metric_rows(run) == metric_rows(_run(tmp_path / "whole"))


def test_the_splits_are_memory_mapped_rows_and_batches_read_only_theirs(tmp_path):
    a, b = _configs(tmp_path)
    invoke("pack", a, "--out", tmp_path / "pack")
    spec, _ = load_config(b)
    ds = load_dataset(spec.data, spec.model.input_shape, Seeds.from_seed(spec.seed).data)
    assert isinstance(ds.train.x, packed.Rows) and isinstance(ds.val.x, packed.Rows)
    assert all(isinstance(p, np.memmap) for p in ds.train.x.parts)
    source, _ = load_config(a)
    ref = load_dataset(source.data, source.model.input_shape, Seeds.from_seed(source.seed).data)
    idx = np.array([5, 0, 470, 3, 3])
    np.testing.assert_array_equal(ds.train.x[idx], ref.train.x[idx])
    np.testing.assert_array_equal(ds.val.x[2:9, 0], ref.val.x[2:9, 0])
    np.testing.assert_array_equal(ds.train.x[7], ref.train.x[7])
    np.testing.assert_allclose(ds.mean, ref.mean, rtol=0) and np.testing.assert_allclose(ds.std, ref.std, rtol=0)


def test_a_folder_is_decoded_by_worker_processes_a_shard_at_a_time_as_a_run_decodes_it(tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(3)
    for split, n in (("train", 14), ("test", 5)):
        for k in ("cat", "dog"):
            (tmp_path / "f" / split / k).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (9 + i % 3, 11, 3), dtype=np.uint8)).save(
                    tmp_path / "f" / split / k / f"{i}.png")
    cfg = {"name": "f", "data": {"dataset": "folder", "root": str(tmp_path / "f"), "resize": 8},
           "model": {"input_shape": [3, 6, 6], "layers": [{"type": "flatten"}, {"type": "dense", "units": 2}]}}
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(packed, "SHARD_BYTES", 3 * 6 * 6 * 5)  # 5 pictures a shard
    spec, _ = load_config(tmp_path / "f.yaml")
    manifest = packed.pack(spec.data, (3, 6, 6), None, tmp_path / "pack", workers=2)
    assert [len(s["shards"]) for s in manifest["splits"].values()] == [6, 2]
    _, splits = packed.open_pack(tmp_path / "pack")
    from cnnctl.data.folder import load_folder

    classes, (x, y), (xt, yt) = load_folder(tmp_path / "f", (3, 6, 6), 8)
    assert manifest["classes"] == classes
    np.testing.assert_array_equal(splits["train"][0][:], x) and np.testing.assert_array_equal(splits["train"][1], y)
    np.testing.assert_array_equal(splits["test"][0][:], xt)


def _packed(tmp_path):
    a, b = _configs(tmp_path)
    invoke("pack", a, "--out", tmp_path / "pack")
    return a, b


def test_a_damaged_shard_is_one_error_naming_the_file(tmp_path):
    _, b = _packed(tmp_path)
    shard = tmp_path / "pack" / "train-00000.npy"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # one pixel: the header still says the right shape
    shard.write_bytes(bytes(raw))
    res = invoke("train", b, "-q", "--runs-dir", tmp_path / "r", code=2)
    assert "train-00000.npy: its sha256 differs from the manifest's" in res.output and "cnnctl pack" in res.output
    with pytest.warns(UserWarning, match="data.verify is false"):  # the hashing skipped, and said
        spec, _ = load_config(b, ["data.verify=false"])
        load_dataset(spec.data, spec.model.input_shape, Seeds.from_seed(1).data)
    shard.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated: found without hashing
    res = invoke("train", b, "-q", "--runs-dir", tmp_path / "r", "--set", "data.verify=false", code=2)
    assert "train-00000.npy: cannot be read as the shard the manifest lists" in res.output


@pytest.mark.parametrize("damage,words", [
    (lambda m: m.write_text(m.read_text()[: len(m.read_text()) // 2]), "not a complete JSON manifest"),
    (lambda m: m.unlink(), "manifest.json: no such file (a pack not finished, or not a pack)"),
    (lambda m: m.write_text(json.dumps({"kind": "cnnctl pack 1", "classes": [], "splits": {"train": {"count": 3}}})),
     "an entry is missing or malformed"),
])
def test_a_truncated_or_missing_manifest_is_one_error(tmp_path, damage, words):
    _, b = _packed(tmp_path)
    damage(tmp_path / "pack" / "manifest.json")
    res = invoke("train", b, "-q", "--runs-dir", tmp_path / "r", code=2)
    assert words in res.output and "Traceback" not in res.output


def test_a_killed_pack_continues_with_the_shards_it_has(tmp_path, monkeypatch):
    a, _ = _configs(tmp_path)
    spec, _ = load_config(a)
    monkeypatch.setattr(packed, "SHARD_BYTES", 144 * 100)  # 100 images a shard
    whole = packed.pack(spec.data, (1, 12, 12), None, tmp_path / "whole")

    def killed(done, total):
        if done >= 300:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        packed.pack(spec.data, (1, 12, 12), None, tmp_path / "pack", progress=killed)
    assert not (tmp_path / "pack" / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pack").glob("train-0*.npy")}
    assert len(kept) == 3
    seen = []
    resumed = packed.pack(spec.data, (1, 12, 12), None, tmp_path / "pack", progress=lambda d, t: seen.append(d))
    assert seen[:4] == [100, 200, 300, 400]  # the three shards it had counted as done, then the rest
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pack").glob("train-0*.npy")
            if p.name in kept} == kept
    assert resumed["splits"] == whole["splits"] and not (tmp_path / "pack" / packed.PLAN).exists()


def test_a_pack_refuses_a_folder_of_other_data(tmp_path):
    a, _ = _packed(tmp_path)
    invoke("pack", a, "--out", tmp_path / "pack")  # the same data again: nothing to do
    res = invoke("pack", a, "--out", tmp_path / "pack", "--set", "model.input_shape=[1,10,10]", code=2)
    assert "holds a pack of other data" in res.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    res = invoke("pack", a, "--out", tmp_path / "other", code=2)
    assert "is not empty and holds no pack" in res.output
    with pytest.raises(DataError, match="packed already"):
        spec, _ = load_config(tmp_path / "b.yaml")
        packed.pack(spec.data, (1, 12, 12), None, tmp_path / "again")


def test_two_mpi_ranks_on_a_packed_dataset_train_the_model_one_process_trains(tmp_path):
    from tests import test_mpi

    if test_mpi.MPIEXEC is None or not test_mpi._have_mpi4py():
        pytest.skip("mpiexec / mpi4py not installed (pip install 'cnnctl[mpi]')")
    a, b = _packed(tmp_path)
    one = test_mpi._one("train", b, "-q", "--runs-dir", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = test_mpi._mpi(2, "train", b, "-q", "--runs-dir", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    test_mpi._assert_same_model(test_mpi._weights(_run(tmp_path / "one")), test_mpi._weights(_run(tmp_path / "two")))


@pytest.mark.parametrize("damaged", [0, 1], ids=["rank 0's shard", "rank 1's shard"])
def test_under_two_ranks_each_verifies_its_shards_and_a_damaged_one_is_named(tmp_path, monkeypatch, damaged):
    """Each rank hashes every other shard (the pack is read once between them): a damaged shard is found by the
    rank that hashes it, one error naming the file, every rank ends (exit 2)."""
    from tests import test_mpi

    if test_mpi.MPIEXEC is None or not test_mpi._have_mpi4py():
        pytest.skip("mpiexec / mpi4py not installed (pip install 'cnnctl[mpi]')")
    monkeypatch.setattr(packed, "SHARD_BYTES", 144 * 200)  # 200 images a shard: 3 training shards
    _, b = _packed(tmp_path)
    shard = tmp_path / "pack" / f"train-{damaged:05d}.npy"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    res = test_mpi._mpi(2, "train", b, "-q", "--runs-dir", tmp_path / "runs", cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"error (rank {damaged} of 2" in res.stderr and str(shard) in res.stderr and "sha256" in res.stderr
    assert "Traceback" not in res.stderr


def test_the_ranks_of_each_host_share_the_verification_of_its_copy():
    """Which part of a pack's shards a rank hashes: its place among its host's ranks, so that a copy on each host
    (or one pack every host mounts) is checked whole on every host."""
    from cnnctl.run.start import host_part

    hosts = ["a", "b", "a", "a", "b"]
    assert [host_part(hosts, r) for r in range(5)] == [(0, 3), (0, 2), (1, 3), (2, 3), (1, 2)]
    assert host_part(["a"], 0) == (0, 1)


def test_channel_statistics_are_exact_so_parts_add_up_to_the_whole():
    """normalize: auto's statistics of uint8 pictures from integer sums: any cut into parts (chunks, MPI ranks)
    gives the same float64 numbers, equal to numpy's float64 mean and std to rounding."""
    from cnnctl.data import channel_statistics, channel_sums, statistics_of

    x = np.random.default_rng(0).integers(0, 256, (997, 3, 7, 5), dtype=np.uint8)
    x[:3] = 255  # the largest squares
    mean, std = channel_statistics(x)
    for cuts in ([0, 997], [0, 1, 500, 997], [0, 333, 334, 996, 997]):
        sums = sum(channel_sums(x, slice(lo, hi), chunk_values=50) for lo, hi in zip(cuts, cuts[1:]))
        parted = statistics_of(sums, 997 * 7 * 5)
        assert np.array_equal(parted[0], mean) and np.array_equal(parted[1], std)
    wide = x.astype(np.float64)
    np.testing.assert_allclose(mean, wide.mean(axis=(0, 2, 3)), rtol=1e-14)
    np.testing.assert_allclose(std, wide.std(axis=(0, 2, 3)), rtol=1e-13)


AUGMENTS = [{"horizontal_flip": True, "random_shift": 0.2}, {"random_crop": 2, "random_erasing": 0.5},
            {"random_resized_crop": {"scale": [0.3, 1.0]}, "horizontal_flip": True}]


@pytest.mark.parametrize("augment", AUGMENTS, ids=["flip-shift", "crop-erase", "resized-crop"])
def test_a_ranks_share_of_a_batch_reads_only_its_rows_augmented_as_in_the_whole_batch(tmp_path, augment,
                                                                                      monkeypatch):
    """What an MPI rank gets from `batches(..., share=...)`: exactly its rows of every global batch as one process
    makes the batch (same augmentation draws), read from the pack row by row (no rank gathers a whole batch)."""
    from cnnctl import data
    from cnnctl.data.spec import AugmentSpec

    a, b = _packed(tmp_path)
    spec, _ = load_config(b)
    ds = load_dataset(spec.data, spec.model.input_shape, Seeds.from_seed(spec.seed).data)
    aug = AugmentSpec.model_validate(augment)
    order = np.random.default_rng(4).permutation(len(ds.train))
    whole = list(data.batches(ds, ds.train, 64, order, 0, aug, np.random.default_rng(5)))
    read = []
    gather = packed.Rows.__getitem__
    monkeypatch.setattr(packed.Rows, "__getitem__", lambda self, key: read.append(len(self.index[key if not
                                                     isinstance(key, tuple) else key[0]])) or gather(self, key))
    for rank in range(3):
        def share(n, rank=rank):
            return n * rank // 3, n * (rank + 1) // 3
        read.clear()
        mine = list(data.batches(ds, ds.train, 64, order, 0, aug, np.random.default_rng(5), share=share))
        for (x, y), (xw, yw) in zip(mine, whole):
            lo, hi = share(len(yw))
            np.testing.assert_array_equal(x, xw[lo:hi]) and np.testing.assert_array_equal(y, yw[lo:hi])
        assert read == [share(len(yw))[1] - share(len(yw))[0] for _, yw in whole]


def test_report_and_sweep_read_a_packed_dataset(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = _packed(tmp_path)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "s", "base": str(b), "metric": "val_acc", "space": {"optimizer.lr": {"choice": [0.01, 0.003]},
                                                                  "train.epochs": 1},
        "search": {"type": "grid"}, "executor": {"type": "local", "max_concurrent": 1}}))
    invoke("sweep", tmp_path / "sweep.yaml", "--runs-dir", tmp_path / "sweeps", "-q")
    (sweep,) = (tmp_path / "sweeps").iterdir()
    trials = [json.loads(p.read_text()) for p in sweep.rglob("summary.json")]
    assert len(trials) == 2 and all(t["status"] == "finished" and t["dataset"]["train"] == 480 for t in trials)
    run = next(p.parent for p in sweep.rglob("summary.json"))
    invoke("report", run, "--out", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "packed" in page and "Confusion" in page
