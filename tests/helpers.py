"""Helpers shared by the CLI tests."""

from typer.testing import CliRunner

from cnnctl.cli import app

runner = CliRunner()


def invoke(*args, code=0):
    """Run the CLI in-process; assert the exit code; return the result."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res


def metric_rows(run_dir):
    """A run's metrics.jsonl rows without the wall-clock column: what must be equal between equal runs."""
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_tiny(tmp_path, change=None, name="c.yaml", **train):
    """TINY (conftest) as a config file, with `change(spec)` applied to its mapping and train keys set."""
    import yaml

    from tests.conftest import TINY

    spec = yaml.safe_load(TINY)
    if change:
        change(spec)
    spec["train"].update(train)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def trained_run(tmp_path, name="r", **train):
    """A one-epoch run of TINY (with train keys set) in tmp_path/runs-NAME; its run directory."""
    write_tiny(tmp_path, name=f"{name}.yaml", epochs=1, **train)
    invoke("train", tmp_path / f"{name}.yaml", "--runs-dir", tmp_path / f"runs-{name}")
    return next((tmp_path / f"runs-{name}").iterdir())


def strict_json(path):
    """Parse a JSON file refusing NaN and Infinity tokens, as strict readers do."""
    import json

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)
