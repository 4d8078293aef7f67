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
