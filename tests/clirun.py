"""Running the CLI in-process from tests: `run(...)` asserts the exit code, `run_json(...)` parses `--json`."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from peftctl.cli import app

runner = CliRunner()


def run(*args, code=0, input=None):
    """Invoke `peftctl *args` (stdin: `input`, a string) and assert it exits with `code`; the result has
    `.stdout` and `.stderr`."""
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False, input=input)
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def run_json(*args, code=0):
    """`run(*args, "--json")` and the one JSON object it printed on stdout."""
    return json.loads(run(*args, "--json", code=code).stdout)
