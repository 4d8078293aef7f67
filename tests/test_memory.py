"""The memory check (core/memory.py): the budget under an address-space limit, the checks before patch
whitening, evaluation and gradcheck, and an allocation that fails anyway."""
import subprocess
import sys

from cnnctl.core import memory
from tests.conftest import TINY
from tests.helpers import invoke, write_tiny
from tests.test_errors import expect_error


def test_patch_whitening_with_a_kernel_larger_than_the_image_is_a_shape_error(tmp_path):
    cfg = write_tiny(tmp_path, lambda s: s["model"]["layers"][0].update(kernel_size=17, init="patch_whitening"))
    expect_error(["train", cfg], "patch_whitening", "17x17", "16x16", "larger than the image")


def test_patch_whitening_and_evaluation_batches_pass_the_memory_check(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "budget", lambda: (64 << 20, "a test's limit"))  # 64 MiB: tiny trains, no more
    cfg = write_tiny(tmp_path, lambda s: s["model"]["layers"][0].update(kernel_size=7, init="patch_whitening"))
    cfg_big = write_tiny(tmp_path, lambda s: s["data"]["shapes"].update(train_size=3000), "big.yaml")
    expect_error(["train", cfg_big, "--set", "model.layers.0.kernel_size=7", "--set",
                  "model.layers.0.init=patch_whitening"], "patch_whitening of layers.0", "of a test's limit")
    invoke("train", cfg, "--runs-dir", tmp_path / "runs")  # 240 images: fits
    evals = write_tiny(tmp_path, lambda s: s["data"].update(eval_batch_size=100_000, shapes={"train_size": 300,
                                                                                           "test_size": 5000}))
    expect_error(["train", evals], "evaluating tiny at batch size 5000", "lower data.eval_batch_size")


def test_the_budget_honours_the_address_space_limit():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY)); "
            "from cnnctl.core import memory; print(*memory.budget(), sep='|')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    left, bound = res.stdout.strip().split("|")
    assert 0 < int(left) < 3 << 30 and "ulimit -v" in bound, res.stdout + res.stderr


def test_an_allocation_that_fails_anyway_is_one_message(tmp_path, monkeypatch):
    from cnnctl.run import trainer as train

    def fail(*args, **kwargs):
        raise MemoryError("Unable to allocate 6.01 GiB for an array")

    monkeypatch.setattr(train, "evaluate", fail)
    expect_error(["train", write_tiny(tmp_path), "--runs-dir", tmp_path / "runs"], "out of memory: Unable to allocate",
                 "lower data.batch_size")


def test_gradcheck_refuses_a_batch_beyond_memory_and_eval_an_empty_split(tiny_run, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    expect_error(["gradcheck", cfg, "--batch", "100000000"], "more than can be spared", "smaller --batch")
    expect_error(["gradcheck", cfg, "--tol", "nan"], "give a positive number")
    expect_error(["eval", tiny_run, "--data-split", "val", "--set", "data.val_split=0", "--set",
                  "train.monitor=train_loss"],
                 "the val split of the shapes data holds no images", "val_split is 0")
