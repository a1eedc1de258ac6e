"""What long work shows while it runs: a rich progress bar on a terminal, plain lines otherwise.

Everything goes to stderr, so that `--json` output on stdout stays one clean object. Library code
takes a `Reporter`; `Reporter()` itself is silent.
"""

from __future__ import annotations

from typing import Any


class Reporter:
    """Silent base reporter: the library's default."""

    def start(self, total: int, description: str, unit: str = "steps") -> None: ...

    def advance(self, step: int, fields: dict[str, Any]) -> None: ...

    def log(self, message: str) -> None: ...

    def stop(self) -> None: ...


def rounded(value: Any, digits: int = 4) -> Any:
    """`value` with every float in it (in dicts and lists too) rounded to `digits` significant
    digits, for people to read (2.3456789 -> 2.346); `--json` and the run files keep every digit."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def _fmt(fields: dict[str, Any]) -> str:
    parts = []
    for k, v in fields.items():
        if v is None:
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)


class RichReporter(Reporter):
    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self._progress = None
        self._task = None

    def start(self, total: int, description: str, unit: str = "steps") -> None:
        if self.quiet:
            return
        if not self.console.is_terminal:
            self.console.print(f"{description}: {total:,} {unit}")
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, info="")

    def advance(self, step: int, fields: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=_fmt(fields))

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
