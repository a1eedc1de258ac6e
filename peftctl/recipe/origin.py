"""Where each value of a recipe was given, so that a problem names it: the recipe file and line, or
the `--set` flag that gave the value (or created the section holding it)."""

from __future__ import annotations

from peftctl.errors import Problem

# A value's place in the recipe: section and field names, list indices ("data.train.0.path").
Key = tuple[str | int, ...]


def dotted(path: Key) -> str:
    return ".".join(str(p) for p in path)


def locate(key: Key, message: str, source: str, lines: dict[Key, int], overridden: dict[Key, str]) -> Problem:
    """Place a problem about `key`: the --set that gave it (or created its section), else the line
    of the recipe file where it (or the nearest section holding it) is written."""
    where = dotted(key)
    for i in range(len(key), 0, -1):
        if key[:i] in overridden:
            return Problem(f"--set {overridden[key[:i]]}", None, where, message)
    for i in range(len(key), -1, -1):
        if key[:i] in lines:
            return Problem(source, lines[key[:i]], where, message)
    return Problem(source, None, where, message)
