"""Running the CLI in-process from tests: `run(...)` asserts the exit code, `run_json(...)` parses `--json`."""

from __future__ import annotations

import json
import os

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


def gloo_env() -> dict[str, str]:
    """The environment of a `--num-processes 2` run that tests the host path (gloo on CPU): on a GPU
    machine the processes would each need a GPU of their own (the launcher refuses two on one).
    Read when called: conftest points PEFTCTL_CACHE at a private cache after the test modules load."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
