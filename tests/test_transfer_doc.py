"""docs/transfer.md's commands, run as written: its Python export with a small network in place of the
pretrained ResNet-18 (the one line marked `# your network`), then each cnnctl command in a shell, on a folder of
generated pictures."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
Image = pytest.importorskip("PIL.Image")

SMALL = ("torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, 4, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), "
         "torch.nn.MaxPool2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1000))")


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", (ROOT / "docs" / "transfer.md").read_text(), re.S)


def test_the_transfer_walkthrough_runs_as_written(tmp_path):
    python, state_dict = blocks("python")
    code = "\n".join(f"model = {SMALL}.eval()" if "# your network" in line else line
                     for line in python.splitlines() if not line.startswith("import torch, torchvision"))
    subprocess.run([sys.executable, "-c", "import torch\n" + code], cwd=tmp_path, check=True, capture_output=True)
    g = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for k, name in enumerate(("cat", "dog")):
            folder = tmp_path / "my-images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = g.integers(0, 128, (40, 50, 3), dtype=np.uint8) + 127 * k
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    Image.fromarray(g.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    # the second route: torchvision's state dict (a torchvision-named ResNet-18 with random weights) and the
    # shipped configs, copied beside it as a clone has them
    prelude = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
               "from tests.test_transfer import _torchvision_models\n_, models = _torchvision_models()\n")
    code = "\n".join(line for line in state_dict.splitlines() if not line.startswith("import torchvision"))
    code = code.replace('torchvision.models.resnet18(weights="DEFAULT")', "models['resnet18']()")
    subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "resnet18.safetensors").is_file()
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.startswith("cnnctl ")]
    assert [c.split()[1] for c in commands] == ["import", "train", "predict", "export", "train"]
    for command in commands:
        # `cnnctl` as the user types it (this interpreter's), through a shell: runs/pets-*/ is a glob
        res = subprocess.run(["bash", "-c", f"cnnctl() {{ {sys.executable} -m cnnctl \"$@\"; }}; {command}"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (command, res.stdout[-2000:], res.stderr[-2000:])
        if command.startswith("cnnctl import"):
            assert "mapped 7 tensors of the graph onto 8 parameters and buffers" in res.stdout
        if command.startswith("cnnctl train resnet18"):
            assert "copied 6 of 8 parameters and buffers" in res.stdout and "fresh: layers.4.weight" in res.stdout
        if command.startswith("cnnctl train configs/transfer-folder.yaml"):
            assert "(122 tensors renamed by model.init_from.rename): copied 120 of 122" in res.stdout
    assert (tmp_path / "pets.onnx").is_file()
