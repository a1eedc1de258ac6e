"""`--set a.b=v` overrides: the flag parsed (the value as YAML, or a plain string when it is not
YAML), and the value set into the recipe's data, creating the sections it names."""

from __future__ import annotations

from typing import Any

from peftctl.recipe.origin import Key, dotted
from peftctl.recipe.yamlfile import SYNTAX, parse_yaml


def parse_override(text: str) -> tuple[list[str], Any]:
    """(the key's parts, the value) of one `--set KEY=VALUE`; ValueError saying what is wrong."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {text!r}: empty key")
    if not raw.strip():
        return key.split("."), None
    value, _, problems = parse_yaml(raw, f"--set {text}")
    if problems and problems[0].message.startswith(SYNTAX):
        value = raw  # not YAML: take it as a plain string
    elif problems:
        p = problems[0]
        raise ValueError(f"--set {text!r}: {dotted((key, p.path) if p.path else (key,))}: {p.message}")
    return key.split("."), value


def set_dotted(data: dict, parts: list[str], value: Any, created: set[Key]) -> str | None:
    """Set `data[a][b]... = value`; sections the override creates are added to `created`."""
    cur = data
    for i, part in enumerate(parts[:-1]):
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
            created.add(tuple(parts[: i + 1]))
        if not isinstance(nxt, dict):
            return f"{'.'.join(parts[: i + 1])} is not a section"
        cur = nxt
    cur[parts[-1]] = value
    return None
