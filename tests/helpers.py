"""Helpers shared by the CLI tests."""

from typer.testing import CliRunner

from cnnctl.cli import app

runner = CliRunner()


def invoke(*args, code=0):
    """Run the CLI in-process; assert the exit code; return the result."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res
