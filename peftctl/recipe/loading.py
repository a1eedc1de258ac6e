"""Loading a recipe: read the file, parse the YAML (with lines), apply `--set` overrides, resolve
paths, validate against the schema, and report every problem at once (`RecipeError`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from peftctl.errors import Problem, RecipeError
from peftctl.recipe.origin import Key, locate
from peftctl.recipe.overrides import parse_override, set_dotted
from peftctl.recipe.paths import resolve_paths
from peftctl.recipe.problems import problems_from_validation
from peftctl.recipe.schema import Recipe, field_at
from peftctl.recipe.yamlfile import EXTENSION_PREFIX, huge_ints, parse_yaml


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, resolve and validate a recipe. Raises RecipeError with every problem."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(source, None, "", "recipe file not found")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([Problem(source, None, "", f"cannot read recipe: {e}")]) from None
    return loads(text, source=source, base_dir=path.resolve().parent, overrides=overrides)


def loads(
    text: str,
    *,
    source: str = "<recipe>",
    base_dir: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Recipe:
    """A recipe from YAML `text`: `source` names it in problems, relative paths resolve against
    `base_dir` (default: the current directory), `overrides` are `--set` flags. Raises RecipeError."""
    data, lines, problems = parse_yaml(text, source)
    if problems:
        raise RecipeError(problems)
    if data == {} and not text.strip():
        raise RecipeError([Problem(source, None, "", "recipe is empty")])
    if not isinstance(data, dict):
        raise RecipeError([Problem(source, 1, "", "a recipe must be a mapping of sections")])
    for name in [k for k in data if k.startswith(EXTENSION_PREFIX)]:
        del data[name]  # anchors to reuse elsewhere in the file, not fields

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    # Resolve the file's own relative paths against its folder, before overrides replace any.
    resolve_paths(data, base, keys_from=None)

    # Which --set gave each key it set, and each section it created (a problem there is the flag's).
    overridden: dict[Key, str] = {}
    for text_ in overrides:
        try:
            parts, value = parse_override(text_)
        except ValueError as e:
            problems.append(Problem("--set", None, "", str(e)))
            continue
        created: set[Key] = set()
        err = set_dotted(data, parts, value, created)
        if err:
            problems.append(Problem(f"--set {text_}", None, "", err))
            continue
        if (why := _comma_list(data, parts, value)) is not None:
            problems.append(Problem(f"--set {text_}", None, ".".join(parts), why))
            parent = data
            for part in parts[:-1]:
                parent = parent[part]
            del parent[parts[-1]]  # one problem, said once
            continue
        overridden[tuple(parts)] = text_
        overridden.update({k: text_ for k in created if k not in overridden})
    resolve_paths(data, Path.cwd(), keys_from=set(overridden))

    def place(key: Key, message: str) -> Problem:
        return locate(key, message, source, lines, overridden)

    huge = [place(key, f"must be between -2**63 and 2**63 - 1, the integers torch and numpy hold (got {v})")
            for key, v in huge_ints(data)]
    problems += huge
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        said = {p.path for p in huge}
        problems.extend(p for p in problems_from_validation(exc, data, place) if p.path not in said)
        problems.sort(key=lambda p: (p.line is None, p.line or 0))
        raise RecipeError(problems) from None
    if problems:
        raise RecipeError(problems)
    recipe._origin = (source, lines, overridden)
    return recipe


def _comma_list(data: Any, parts: list[str], value: Any) -> str | None:
    """Why `--set key=a,b` (a plain string of names and commas) for a field that takes a list is
    refused: such a string is one value (for target_modules one regular expression, which no module
    name with a comma matches), not the list it looks like. None when that is not the case."""
    if not (isinstance(value, str) and re.fullmatch(r"[\w./\-]+(\s*,\s*[\w./\-]+)+", value)):
        return None
    try:
        field = field_at(tuple(parts), data)
    except (AttributeError, KeyError, TypeError):
        return None
    if "list" not in str(field.annotation):
        return None
    items = [v.strip() for v in value.split(",")]
    regex = (f" (a string here is one regular expression matching whole module names, and no module is "
             f"named {value!r})" if parts[-1] in ("target_modules", "exclude_modules") else "")
    return f"{value!r} is one string, not a list{regex}; write a list: --set '{'.'.join(parts)}=[{', '.join(items)}]'"


def from_dict(data: dict[str, Any], base_dir: str | os.PathLike | None = None) -> Recipe:
    """Validate a recipe given as Python data (paths resolve against base_dir or the cwd)."""
    return loads(yaml.safe_dump(data), source="<dict>", base_dir=base_dir)
