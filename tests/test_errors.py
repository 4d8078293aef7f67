"""Every user error: exit code 2, no traceback, a message naming the key, file or layer."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnctl.cli import app
from cnnctl.run import checkpoint
from tests.conftest import TINY
from tests.helpers import runner


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def edit(change):
    data = yaml.safe_load(TINY)
    change(data)
    return yaml.safe_dump(data, sort_keys=False)


def expect_error(args, *words, code=2):
    res = runner.invoke(app, [str(a) for a in args])
    text = res.output
    assert res.exit_code == code, text
    assert "Traceback" not in text, text
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    for w in words:
        assert w in text, (w, text)
    return text


CONFIG_ERRORS = {
    "a union member's error only": (lambda d: d["data"].update(normalize={"mean": [0.5], "std": [float("inf")]}),
                                    ["data.normalize.std[0]", "finite number", "1 problem"]),
    "unknown key with suggestion": (lambda d: d["data"].update(batchsize=3), ["data.batchsize",
                                                                           "did you mean 'batch_size'"]),
    "unknown layer key": (lambda d: d["model"]["layers"][0].update(filter=3), ["model.layers[0].filter",
                                                                              "did you mean 'filters'"]),
    "unknown layer type": (lambda d: d["model"]["layers"][0].update(type="conv"), ["unknown type 'conv'",
                                                                                  "did you mean 'conv2d'"]),
    "missing type": (lambda d: d["model"]["layers"][0].pop("type"), ["model.layers[0]", "missing 'type'"]),
    "zero filters": (lambda d: d["model"]["layers"][0].update(filters=0), ["model.layers[0].filters",
                                                                          "greater than 0"]),
    "negative rate": (lambda d: d["model"]["layers"][3].update(rate=-0.1), ["model.layers[3].rate"]),
    "dropout rate 1": (lambda d: d["model"]["layers"][3].update(rate=1.0), ["model.layers[3].rate", "less than 1"]),
    "wrong type": (lambda d: d["train"].update(epochs="many"), ["train.epochs", "valid integer"]),
    "negative lr": (lambda d: d["optimizer"].update(lr=-1), ["optimizer.lr", "greater than 0"]),
    "missing data": (lambda d: d.pop("data"), ["data", "required"]),
    "bad input shape": (lambda d: d["model"].update(input_shape=[1, 16]), ["model.input_shape"]),
    "unknown dataset": (lambda d: d["data"].update(dataset="imagenet"), ["data.dataset", "shapes"]),
    "bad name": (lambda d: d.update(name="my run"), ["name"]),
    "kernel larger than input": (lambda d: d["model"]["layers"][0].update(kernel_size=17, padding=0),
                                 ["model.layers[0] (conv2d)", "larger than", "(1, 16, 16)", "fix"]),
    "dense without flatten": (lambda d: d["model"]["layers"].pop(2),
                              ["model.layers[3] (dense)", "flatten", "(4, 8, 8)"]),
    "wrong number of outputs": (lambda d: d["model"]["layers"][-1].update(units=7),
                                ["model.layers[4] (dense)", "(7,)", "4 classes", "units: 4"]),
    "pool padding too large": (lambda d: d["model"]["layers"][1].update(padding=2), ["maxpool2d", "padding"]),
}


@pytest.mark.parametrize("verb", ["train", "inspect"])
@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors(tmp_path, case, verb):
    change, words = CONFIG_ERRORS[case]
    path = write(tmp_path, edit(change))
    expect_error([verb, path, "--runs-dir", tmp_path / "runs"] if verb == "train" else [verb, path], *words)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_error_names_the_yaml_line(tmp_path):
    path = write(tmp_path, TINY.replace("filters: 4", "filters: 0"))
    line = next(i for i, text in enumerate(TINY.splitlines(), 1) if "filters: 4" in text)
    expect_error(["inspect", path], f"line {line}")


@pytest.mark.parametrize("override,words", [
    ("optimizer.lr=abc", ["optimizer.lr (from --set)", "valid number"]),
    ("model.layers.9.units=3", ["model.layers.9", "does not exist"]),
    ("nokey", ["expected KEY=VALUE"]),
    ("data.batch_size=[1", ["not valid YAML"]),
    ("train.epochz=3", ["train.epochz (from --set)", "did you mean 'epochs'"]),
])
def test_bad_overrides(tiny_config, override, words):
    expect_error(["train", tiny_config, "--set", override], *words)


def test_missing_and_malformed_files(tmp_path):
    expect_error(["train", tmp_path / "nope.yaml"], "not found", "nope.yaml")
    expect_error(["inspect", write(tmp_path, "name: x\n  bad: [\n")], "not valid YAML", "line 2")
    expect_error(["inspect", write(tmp_path, "- 1\n- 2\n")], "must be a YAML mapping")
    expect_error(["eval", tmp_path / "nope.safetensors"], "checkpoint not found")


def test_missing_dataset_files_name_the_folder(tmp_path):
    cfg = write(tmp_path, TINY.replace("dataset: shapes", f"dataset: mnist\n  root: {tmp_path / 'empty'}")
                .replace("[1, 16, 16]", "[1, 28, 28]").replace("units: 4", "units: 10"))
    expect_error(["train", cfg], "empty", "data.root")
    (tmp_path / "empty").mkdir()
    expect_error(["train", cfg], "train-images-idx3-ubyte", str(tmp_path / "empty"))


def test_input_shape_must_fit_the_data(tmp_path, mnist_root):
    cfg = write(tmp_path, TINY.replace("dataset: shapes", f"dataset: mnist\n  root: {mnist_root}")
                .replace("units: 4", "units: 10"))
    expect_error(["inspect", cfg], "(1, 28, 28)", "input_shape")


@pytest.fixture
def trained(tiny_config, tmp_path):
    res = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir / "checkpoints" / "best.safetensors"


def test_corrupt_and_foreign_checkpoints(trained, tmp_path):
    raw = trained.read_bytes()
    for name, data, words in [
        ("empty.safetensors", b"", ["empty or truncated"]),
        ("trunc.safetensors", raw[: len(raw) // 2], ["corrupt or truncated"]),
        ("garbage.safetensors", b"\x00" * 7 + b"garbage" * 20, ["not a safetensors"]),
    ]:
        p = tmp_path / name
        p.write_bytes(data)
        expect_error(["eval", p], name, *words)
        expect_error(["inspect", p], name)
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    expect_error(["eval", foreign], "not a cnnctl checkpoint")


def test_checkpoint_for_another_architecture(trained, tmp_path):
    ckpt = checkpoint.load(trained)
    ckpt.config["model"]["layers"][0]["filters"] = 5
    ckpt.config["model"]["layers"][-1]["units"] = 4
    other = tmp_path / "other.safetensors"
    checkpoint.save(other, ckpt)
    expect_error(["eval", other], "do not fit the architecture", "layers.0.weight")


def test_bad_eval_split(trained):
    expect_error(["eval", trained, "--data-split", "dev"], "--data-split")


def test_failed_run_leaves_no_directory(tmp_path):
    cfg = write(tmp_path, TINY.replace("dataset: shapes", f"dataset: mnist\n  root: {tmp_path}")
                .replace("[1, 16, 16]", "[1, 28, 28]").replace("units: 4", "units: 10"))
    expect_error(["train", cfg, "--runs-dir", tmp_path / "runs"], "train-images")
    assert not (tmp_path / "runs").exists() or not list(Path(tmp_path / "runs").iterdir())


def test_fix_hints_keep_their_brackets(tmp_path, monkeypatch):
    """Hints such as pip install 'cnnctl[plot]' must not be eaten as rich markup."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("name: r\n")
    (tmp_path / "r" / "metrics.jsonl").write_text('{"epoch": 1, "lr": 0.1}\n')
    text = expect_error(["plot", tmp_path / "r", "--out", tmp_path / "x.png"], "matplotlib")
    assert "pip install 'cnnctl[plot]'" in text


@pytest.mark.parametrize("text,words", [
    (TINY + "optimizer: {type: sgd, lr: 0.1}\n", ["duplicate key 'optimizer'",
                                                  f"first given at line {TINY.count(chr(10)) - 1}",
                                                  f"line {TINY.count(chr(10)) + 1}"]),
    (TINY.replace("lr: 0.01", "lr: .inf"), ["optimizer.lr", "finite number"]),
    (TINY.replace("lr: 0.01", "lr: 1e400"), ["optimizer.lr", "finite number"]),
    (TINY.replace("lr: 0.01", "lr: 0.01, eps: .nan"), ["optimizer.eps", "finite number"]),
    (TINY.replace("dataset: shapes", "dataset: shapes\n  normalize: {mean: [0.5], std: [.inf]}"),
     ["data.normalize", "finite number"]),
    (TINY.replace("epochs: 2", "epochs: true"), ["train.epochs", "valid integer"]),
    (TINY.replace("filters: 4", "filters: 3.5"), ["model.layers[0].filters", "valid integer"]),
])
def test_values_that_must_be_refused(tmp_path, text, words):
    expect_error(["inspect", write(tmp_path, text)], *words)


def test_name_is_taken_as_written(tmp_path, tiny_config):
    res = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path / "runs"), "--name", "007", "-q",
                              "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("007-") and yaml.safe_load((run / "config.yaml").read_text())["name"] == "007"


def test_alias_bomb_in_a_run_config_is_refused(tmp_path, tiny_config):
    res = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path / "runs"), "-q",
                              "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (run / "config.yaml").write_text(bomb)
    expect_error(["runs", "diff", run, run], "aliases", "config.yaml")


@pytest.mark.parametrize("runs_dir", ["a[/]b", "[bold red]x"])
def test_user_text_is_never_rich_markup(tmp_path, tiny_config, runs_dir):
    """Paths and names print exactly as given: square brackets are not markup (no MarkupError, nothing eaten)."""
    target = tmp_path / runs_dir
    res = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(target), "-q", "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert str(target) in res.output
    res = runner.invoke(app, ["runs", str(target)])
    assert res.exit_code == 0 and str(target) in res.output, res.output
    bad = tmp_path / "[x]" / "missing.yaml"
    expect_error(["inspect", bad], str(bad))


def test_unwritable_destinations_are_clear_errors(tmp_path, tiny_config):
    (tmp_path / "adir").mkdir()
    expect_error(["schema", "--out", tmp_path / "adir"], "cannot write", "adir")
    (tmp_path / "afile").write_text("x")
    expect_error(["train", tiny_config, "--runs-dir", tmp_path / "afile", "-q"], "cannot create the run directory",
                 "afile")
    assert [p.name for p in (tmp_path / "adir").iterdir()] == []  # no temporary file left behind


@pytest.fixture
def one_epoch_run(tmp_path, tiny_config):
    res = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path / "runs"), "-q",
                              "--set", "train.epochs=2"])
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    return run


def test_damaged_run_files_do_not_break_the_listing_or_plots(tmp_path, one_epoch_run):
    other = one_epoch_run.with_name("other")
    other.mkdir()
    (other / "config.yaml").write_text((one_epoch_run / "config.yaml").read_text())
    (other / "summary.json").write_text('["not", "an", "object"]')
    res = runner.invoke(app, ["runs", str(one_epoch_run.parent)])
    assert res.exit_code == 0 and one_epoch_run.name in res.output and "other" in res.output, res.output
    with (one_epoch_run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "train_lo')  # torn by a crash mid-write
    res = runner.invoke(app, ["plot", str(one_epoch_run)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("damage,words", [
    (lambda w: w.astype(np.int8), ["layers.0.weight", "int8", "floating-point"]),
    (lambda w: np.full_like(w, np.nan), ["layers.0.weight", "NaN"]),
])
def test_checkpoint_weights_of_the_wrong_kind_are_refused(tmp_path, one_epoch_run, damage, words):
    ckpt = checkpoint.load(one_epoch_run / "checkpoints" / "best.safetensors")
    ckpt.model_state["layers.0.weight"] = damage(ckpt.model_state["layers.0.weight"])
    checkpoint.save(tmp_path / "bad.safetensors", ckpt)
    expect_error(["eval", tmp_path / "bad.safetensors"], *words)


def test_a_run_directory_is_trained_by_one_process_at_a_time(one_epoch_run):
    import os

    from cnnctl.run import runs

    with runs.locked(one_epoch_run):
        expect_error(["train", "--resume", one_epoch_run, "--set", "train.epochs=3", "-q"],
                     "being trained by another process", f"pid {os.getpid()}")
    stale = one_epoch_run / "checkpoints" / ".last.safetensors.abc.tmp"
    stale.write_bytes(b"half a checkpoint")
    res = runner.invoke(app, ["train", "--resume", str(one_epoch_run), "--set", "train.epochs=3", "-q"])
    assert res.exit_code == 0, res.output
    assert not stale.exists()  # left by a killed writer: removed once the lock is held
    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.yaml", "summary.json", "metrics.csv", "checkpoints/last.safetensors"):
        assert (one_epoch_run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_resume_says_why_there_is_nothing_to_continue(one_epoch_run):
    import json

    summary = json.loads((one_epoch_run / "summary.json").read_text())
    (one_epoch_run / "summary.json").write_text(json.dumps({**summary, "stopped_early": True}))
    expect_error(["train", "--resume", one_epoch_run, "--set", "train.epochs=4"], "early stopping", "--force")
    (one_epoch_run / "checkpoints" / "last.safetensors").unlink()
    expect_error(["train", "--resume", one_epoch_run, "--set", "train.epochs=4"], "no checkpoints/last.safetensors",
                 "start it again")


def test_a_checkpoint_never_makes_cnnctl_download(tmp_path, one_epoch_run):
    from tests.http_fixture import FileServer

    ckpt = checkpoint.load(one_epoch_run / "checkpoints" / "best.safetensors")
    with FileServer(tmp_path) as server:
        ckpt.config["data"].update(dataset="mnist", root=str(tmp_path / "fetched"), download=True, mirror=server.url)
        checkpoint.save(tmp_path / "evil.safetensors", ckpt)
        expect_error(["eval", tmp_path / "evil.safetensors"], "fetched")
        assert server.requests == [] and not (tmp_path / "fetched").exists()


def _set(obj, attr, key, value):
    getattr(obj, attr)[key] = value


METADATA_DAMAGE = {
    "normalization a list": lambda c: setattr(c, "normalization", [0.5, 0.2]),
    "normalization a string": lambda c: setattr(c, "normalization", "auto"),
    "std missing": lambda c: c.normalization.pop("std"),
    "std infinite": lambda c: _set(c, "normalization", "std", [float("inf")]),
    "config a list": lambda c: setattr(c, "config", [1, 2]),
    "trainer without seeds": lambda c: setattr(c.run, "seeds", None),
    "bad generator state": lambda c: c.run.seeds.update(shuffle={"bit_generator": "nope"}),
    "generator state 10^40": lambda c: c.run.seeds["shuffle"]["state"].update(state=10**40),
    "best without its metric": lambda c: setattr(c.run, "best", {}),
    "position 10^9": lambda c: setattr(c.run, "partial", checkpoint.Partial.model_construct(
        position=10**9, shuffle_state=c.run.seeds["shuffle"], loss_sum=0, correct=0, seen=0)),
}


@pytest.mark.parametrize("damage", list(METADATA_DAMAGE))
def test_damaged_checkpoint_metadata_is_one_clear_error(tmp_path, one_epoch_run, damage):
    last = one_epoch_run / "checkpoints" / "last.safetensors"
    ckpt = checkpoint.load(last)
    METADATA_DAMAGE[damage](ckpt)
    checkpoint.save(last, ckpt)
    verbs = [["train", "--resume", one_epoch_run, "--set", "train.epochs=3", "--force"]]
    if damage in ("normalization a list", "normalization a string", "std missing", "std infinite", "config a list"):
        np.savez(tmp_path / "x.npz", x=np.zeros((1, 16, 16), np.uint8))
        verbs += [["eval", last], ["predict", last, tmp_path / "x.npz"]]
    for args in verbs:
        expect_error(args, "last.safetensors")


@pytest.mark.parametrize("space,words", [
    ({"optimizer.lr": {"uniform": [float("nan"), 1]}}, ["finite numbers"]),
    ({"train.epochs": {"randint": [5, 1]}}, ["low < high"]),
])
def test_impossible_sweep_spaces(tmp_path, tiny_config, space, words):
    sweep = {"name": "s", "base": str(tiny_config), "space": space}
    expect_error(["sweep", write(tmp_path, yaml.safe_dump(sweep), "s.yaml")], *words)


def test_absurd_sizes_are_validation_errors(tmp_path):
    expect_error(["inspect", write(tmp_path, TINY.replace("filters: 4", "filters: 1000000000000000000000000000000"))],
                 "model.layers[0].filters", "less than or equal to 2147483647")


def test_inspect_needs_no_weights_and_train_refuses_what_cannot_fit(tmp_path):
    """A dense layer of 10^6 units on 64x64 inputs (4.1e9 weights, 16 GB as float32): inspect shows it without
    drawing a weight (in a few MB), and training is refused from the estimate before anything is drawn."""
    import resource

    big = write(tmp_path, TINY.replace("[1, 16, 16]", "[1, 64, 64]").replace(
        "{type: dense, units: 4}", "{type: dense, units: 1000000}\n    - {type: dense, units: 4}"), "big.yaml")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = runner.invoke(app, ["inspect", str(big), "--json"])
    assert res.exit_code == 0, res.output
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: no 16 GB weight
    report = json.loads(res.output)
    assert report["trainable_params"] == 4 * 32 * 32 * 10**6 + 10**6 + 10**6 * 4 + 4 + 4 * 9 + 4
    assert report["training_bytes"] > 64e9
    expect_error(["train", big, "--runs-dir", tmp_path / "runs"], "training tiny at batch size 32", "GB",
                 "data.batch_size")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_huge_sweeps_and_names_are_refused(tmp_path, tiny_config):
    space = {f"k{i}": {"choice": list(range(10))} for i in range(5)}  # 100,000 trials
    sweep = {"name": "s", "base": str(tiny_config), "space": space}
    expect_error(["sweep", write(tmp_path, yaml.safe_dump(sweep), "s.yaml")], "100,000 trials", "random")
    expect_error(["train", tiny_config, "--name", "n" * 300, "--runs-dir", tmp_path / "runs"], "name",
                 "at most 100")


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.integers(-10**40, 10**40),
                   st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(
                       st.sampled_from(["type", "filters", "kernel_size", "x"]), st.integers(-2, 5), max_size=3))


def set_key(node, parts, value):
    """Set a dotted key in nested YAML data, creating mappings on the way; a no-op where an earlier change put a
    scalar, or a list where a name is asked (and an index past a list's end)."""
    for i, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return
            part = int(part)
        elif not isinstance(node, dict):
            return
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part] if isinstance(node, list) else node.setdefault(part, {})


@settings(max_examples=150)  # the same examples on every run: CI never flakes
@given(st.lists(st.tuples(st.sampled_from(["name", "seed", "data.batch_size", "data.val_split", "data.normalize",
                                           "model.input_shape", "model.layers.0", "model.layers.0.filters",
                                           "model.layers.0.kernel_size", "model.layers.1.type", "model.blocks",
                                           "model.layers.2", "optimizer", "optimizer.lr", "schedule",
                                           "train.epochs", "train.early_stopping", "loss"]), VALUES),
                min_size=1, max_size=4))
def test_fuzzed_configs_give_a_spec_or_a_clear_error(changes):
    """Random values at random keys: validation and shape checking either accept the config or raise a
    CnnctlError (exit code 2 in the CLI); never another exception."""
    from cnnctl.config.build import build_model
    from cnnctl.config.reading import validate
    from cnnctl.errors import CnnctlError

    data = yaml.safe_load(TINY)
    for key, value in changes:
        set_key(data, key.split("."), value)
    try:
        build_model(validate(data).model)
    except CnnctlError:
        pass


@pytest.mark.parametrize("removed", ["layers.0.", ""])  # one layer's moments, or every optimizer tensor
def test_resume_refuses_a_checkpoint_without_its_optimizer_state(one_epoch_run, removed):
    last = one_epoch_run / "checkpoints" / "last.safetensors"
    ckpt = checkpoint.load(last)
    assert any(k.startswith("layers.0.weight.") for k in ckpt.optimizer_state)  # Adam's moments are stored
    ckpt.optimizer_state = {k: v for k, v in ckpt.optimizer_state.items() if not k.startswith(removed)}
    checkpoint.save(last, ckpt)
    expect_error(["train", "--resume", one_epoch_run, "--set", "train.epochs=3"], "optimizer state",
                 "layers.0.weight", "not be exact")


def test_data_that_cannot_fit_is_refused_before_it_is_made(tmp_path):
    big = write(tmp_path, TINY.replace("[1, 16, 16]", "[1, 3000, 3000]"), "big.yaml")
    expect_error(["train", big, "--runs-dir", tmp_path / "runs", "--set", "data.batch_size=1"], "shapes data", "GB",
                 "input_shape")  # the model itself fits at batch size 1
    res = runner.invoke(app, ["inspect", str(big)])  # inspect still shows the model, and says why no data
    assert res.exit_code == 0 and "not loaded" in res.output and "GB" in res.output, res.output
    expect_error(["inspect", write(tmp_path, TINY.replace("dataset: shapes", "dataset: shapes\n  augment: "
                                                          "{random_crop: 8000}"))], "random_crop", "16 pixels")


def test_a_full_disk_mid_run_is_a_clear_error_and_the_summary_says_failed(tmp_path, tiny_config, monkeypatch):
    """The OS cuts the metrics append short (as on a full disk): the partial line is undone, the run exits 2
    naming the file and how to continue, and summary.json says failed (never stays 'running')."""
    from cnnctl.run import runs

    real_write = runs.os.write

    def short_write(fd, data):
        if data.startswith(b'{"epoch": 2'):  # the second epoch's metrics.jsonl line
            return real_write(fd, data[:7])
        return real_write(fd, data)

    monkeypatch.setattr(runs.os, "write", short_write)
    expect_error(["train", tiny_config, "--runs-dir", tmp_path / "runs"], "cannot append to", "metrics.jsonl",
                 "--resume")
    monkeypatch.undo()
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]  # no torn second line
    res = runner.invoke(app, ["train", "--resume", str(run), "-q", "--set", "train.epochs=3"])  # space is back
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    """A finished two-epoch run, its last checkpoint's tensors and metadata (decoded), and an input file."""
    from safetensors import safe_open

    root = tmp_path_factory.mktemp("fuzz")
    (root / "tiny.yaml").write_text(TINY)
    res = runner.invoke(app, ["train", str(root / "tiny.yaml"), "--runs-dir", str(root / "runs"), "-q"])
    assert res.exit_code == 0, res.output
    (run,) = (root / "runs").iterdir()
    last = run / "checkpoints" / "last.safetensors"
    with safe_open(last, "np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    decoded = {k: (json.loads(v) if k in ("config", "metrics", "normalization", "trainer") else v)
               for k, v in meta.items()}
    np.savez(root / "x.npz", x=np.zeros((2, 16, 16), np.uint8))
    return FuzzBase((run, tensors, decoded, root / "x.npz"))


class FuzzBase(tuple):
    def __repr__(self):  # hypothesis prints the fixture with a failing example: not the tensors
        return f"FuzzBase({self[0]})"


def _leaf_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaf_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            yield from _leaf_paths(v, (*prefix, i))


@settings(max_examples=100)
@given(data=st.data())
def test_fuzzed_checkpoint_metadata_gives_exit_0_or_2(fuzz_base, tmp_path_factory, data):
    """Random values at random places of a checkpoint's metadata (config, metrics, normalisation, trainer state,
    epoch, step): eval, predict and --resume either work or give one clear error (exit 2; exit 1 when the damage
    makes training diverge, as any divergence), never a traceback."""
    import copy
    import shutil

    from safetensors.numpy import save_file

    run, tensors, decoded, x = fuzz_base
    meta = copy.deepcopy(decoded)
    paths = [p for p in _leaf_paths(meta) if p and p[0] not in ("format", "format_version")]
    for _ in range(data.draw(st.integers(1, 3))):
        set_key(meta, [str(p) for p in data.draw(st.sampled_from(paths))], data.draw(VALUES))
    raw = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    copy_dir = tmp_path_factory.mktemp("fuzzrun") / run.name
    shutil.copytree(run, copy_dir)
    last = copy_dir / "checkpoints" / "last.safetensors"
    save_file(tensors, last, metadata=raw)
    for args in (["eval", last], ["predict", last, x], ["train", "--resume", copy_dir, "--force", "-q",
                                                         "--set", "train.epochs=3"]):
        res = runner.invoke(app, [str(a) for a in args])
        diverged = res.exit_code == 1 and "the loss became" in res.output  # e.g. a mean of 1e35: said, exit 1
        assert res.exit_code in (0, 2) or diverged, (args, raw, res.output, repr(res.exception))
        assert "Traceback" not in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), (args, raw, repr(res.exception))
