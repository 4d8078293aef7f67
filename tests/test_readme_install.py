"""Every everyday verb with the README's install alone: the packages `pip install -e ".[standard]"` brings (cnnctl's
requirements and the standard extra's, with theirs) are the only ones a cnnctl process may import; every other
installed distribution (torch, pytest, scikit-learn, mpi4py, ...) is hidden from it by a sitecustomize module, and
the real `cnnctl` console script runs each verb of issue 53's list in its own process."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def installed_with(extra: str) -> set[str]:
    """The distributions `pip install cnnctl[extra]` installs: cnnctl's requirements and the extra's (from
    pyproject.toml, as a fresh clone's install reads them), and theirs (from what is installed)."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [(Requirement(r).name, None) for r in project["dependencies"] + project["optional-dependencies"][extra]]
    seen = {"cnnctl"}
    while wanted:
        dist, ex = wanted.pop()
        if _name(dist) in seen:
            continue
        seen.add(_name(dist))
        try:
            requires = md.distribution(dist).requires or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ex or ""}):
                wanted.append((req.name, None))
    return seen


def hidden_modules(allowed: set[str]) -> set[str]:
    """The top-level modules of installed distributions outside `allowed` (and of no allowed one)."""
    owners = md.packages_distributions()
    return {module for module, dists in owners.items()
            if not any(_name(d) in allowed for d in dists) and module.isidentifier()}


SITECUSTOMIZE = """
import sys

HIDDEN = {hidden!r}


class _Hidden:
    \"\"\"Refuses the modules of distributions the README's install does not bring.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the README's install)", name=name)
        return None


sys.meta_path.insert(0, _Hidden())
"""


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory) -> dict:
    setup = re.search(r'pip install -e "\.\[(\w+)\]" && cnnctl train', (ROOT / "README.md").read_text())
    assert setup, "the README's set-up command is not `pip install -e \".[EXTRA]\" && cnnctl train ...`"
    allowed = installed_with(setup.group(1))
    hidden = hidden_modules(allowed) - {"cnnctl"}
    site = tmp_path_factory.mktemp("readme-install")
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE.format(hidden=sorted(hidden))))
    env = {**os.environ, "PYTHONPATH": str(site), "CNNCTL_THREADS": "1"}
    return {"env": env, "hidden": hidden, "allowed": allowed}


def cnnctl(env: dict, *args, cwd: Path) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("cnnctl")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "cnnctl"]
    res = subprocess.run([*command, *map(str, args)], env=env["env"], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"cnnctl {' '.join(map(str, args))}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def test_the_hiding_is_real(readme_env, tmp_path):
    """The test's own check: a hidden package (pytest is one; torch where installed) cannot be imported."""
    assert "pytest" in readme_env["hidden"] and {"numpy", "onnx", "matplotlib", "pillow"} <= readme_env["allowed"]
    res = subprocess.run([sys.executable, "-c", "import pytest"], env=readme_env["env"], capture_output=True,
                         text=True)
    assert res.returncode != 0 and "not in the README's install" in res.stderr
    res = subprocess.run([sys.executable, "-c", "import cnnctl, onnx, matplotlib, PIL; print('ok')"],
                         env=readme_env["env"], capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr


def test_every_everyday_verb_runs_with_the_readme_install_alone(readme_env, tmp_path):
    """train, eval, predict (a picture and a folder, into a CSV), export (and --int8), import, report, explain,
    plot --out, data --out and viz: each exits 0 and writes what it says, importing nothing the README's
    install lacks."""
    from PIL import Image

    run = lambda *a: cnnctl(readme_env, *a, cwd=tmp_path)  # noqa: E731
    run("train", ROOT / "configs" / "quickstart.yaml", "--runs-dir", "runs", "--quiet", "--set", "train.epochs=2",
        "--set", "data.shapes.train_size=800", "--set", "data.shapes.test_size=200")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "accuracy" in run("eval", run_dir).stdout
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(3):
        pixels = (np.random.default_rng(i).random((28, 28)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(pictures / f"p{i}.png")
    assert "p0.png" in run("predict", run_dir, pictures / "p0.png").stdout
    run("predict", run_dir, pictures, "--out", "predictions.csv")
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 4  # a header and a row per picture
    run("export", run_dir, "--out", "model.onnx", "--int8")
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model-int8.onnx").is_file()
    run("import", "model.onnx", "--out", "imported")
    assert "p1.png" in run("predict", "imported", pictures / "p1.png").stdout
    run("report", run_dir, "--out", "report.html")
    run("explain", run_dir, pictures / "p2.png", "--out", "explained")
    run("plot", run_dir, "--out", "curves.png")
    run("data", run_dir, "--out", "samples.png")
    run("viz", run_dir, "--out", "filters.png")
    for made in ("report.html", "curves.png", "samples.png", "filters.png"):
        assert (tmp_path / made).stat().st_size > 1000, made
    assert any((tmp_path / "explained").glob("*.png"))
