"""The two kinds of failure peftctl reports, and their exit codes.

`InputError` (exit 2): the user's input is wrong: a recipe field, a flag, a missing file, a bad data
row. `RuntimeFailure` (exit 1): the input was fine but the work failed. The CLI prints either as a
one-line message without a traceback (`--debug` shows it).
"""

from __future__ import annotations

from dataclasses import dataclass


class PeftctlError(Exception):
    """Base class of the errors peftctl reports to users."""

    exit_code = 1


class RuntimeFailure(PeftctlError):
    exit_code = 1


class InputError(PeftctlError):
    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One problem in a recipe: where it is and what is wrong."""

    source: str  # a file name, or "--set" for a command-line override
    line: int | None
    path: str  # dotted path, e.g. "adapter.r"
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class RecipeError(InputError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
