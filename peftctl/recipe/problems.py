"""Validation errors as problems a user can act on: `file:line dotted.path: message`, in plain words
("must be >= 1 (got 0)"), with "did you mean" for a misspelt field, the adapter's `method` tag and
union member labels taken out of the path, and one message for a value that fits no member of a
union."""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import ValidationError

from peftctl.adapters.registry import METHODS
from peftctl.errors import Problem
from peftctl.recipe.foreign import familiar_hint
from peftctl.recipe.origin import Key
from peftctl.recipe.schema import model_at


def _message(err: dict[str, Any], path: Key, data: Any) -> str:
    t = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    if t == "missing":
        return "required field is missing"
    if t == "extra_forbidden":
        parent = model_at(path[:-1], data)
        hint = ""
        if parent is not None:
            where = ".".join(p for p in path[:-1] if isinstance(p, str))
            familiar = familiar_hint(str(path[-1]), where, list(parent.model_fields))
            if familiar:
                return f"unknown field; {familiar}"
            close = difflib.get_close_matches(str(path[-1]), list(parent.model_fields), n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean '{close[0]}'?"
            else:
                hint = "; known fields: " + ", ".join(parent.model_fields)
        return f"unknown field{hint}"
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if t in bounds:
        bound = next(iter(ctx.values()))
        return f"must be {bounds[t]} {bound}{got_s}"
    if t == "literal_error":
        return f"must be one of {ctx.get('expected', '')}{got_s}"
    if t in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer{got_s}"
    if t in ("float_type", "float_parsing"):
        return f"must be a number{got_s}"
    if t == "finite_number":
        return f"must be a finite number{got_s}"
    if t in ("bool_type", "bool_parsing"):
        return f"must be true or false{got_s}"
    if t == "string_type":
        return f"must be a string{got_s}"
    if t in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of fields{got_s}"
    if t == "union_tag_invalid":
        return f"unknown adapter method {ctx.get('tag')!r}; known: {', '.join(METHODS)}"
    if t == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    msg = str(err["msg"])
    return msg[:1].lower() + msg[1:] + got_s


def _clean_loc(loc: tuple, data: Any, err_type: str) -> tuple[Key, str | None]:
    """Drop the discriminator tag from adapter locations; split off a union member label."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "adapter" and parts[1] in METHODS:
        del parts[1]
    clean: list[str | int] = []
    for i, part in enumerate(parts):
        model = model_at(tuple(c for c in clean if isinstance(c, str)), data)
        known = model is not None and part in model.model_fields
        unknown_key = model is not None and i == len(parts) - 1 and err_type == "extra_forbidden"
        if isinstance(part, int) or known or unknown_key:
            clean.append(part)
            continue
        # A union member's label (e.g. "list[str]"): not part of the recipe's path.
        return tuple(clean), str(part)
    return tuple(clean), None


def _value_at(data: Any, path: Key) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _written(data: Any, key: Key) -> bool:
    for part in key:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


_DOTTED = re.compile(r"(?<![\w.])([a-z_]+(?:\.[a-z_0-9]+)+)")


def _field_named(err: dict[str, Any], path: Key, data: Any) -> Key:
    """A cross-field check fails on its section (or the whole recipe): place it at the first field
    its message names (`train.rpo_alpha ...`) that the recipe writes under that path, else the path."""
    if err["type"] != "value_error":
        return path
    for name in _DOTTED.findall(str(err.get("msg", ""))):
        key = tuple(name.split("."))
        if key[: len(path)] == path and len(key) > len(path) and _written(data, key):
            return key
    return path


def problems_from_validation(exc: ValidationError, data: Any, locate: Any) -> list[Problem]:
    """One problem per error of `exc` about raw recipe `data`, each placed by `locate(key, message)`."""
    grouped: dict[Key, list[tuple[dict, str | None]]] = {}
    for err in exc.errors():
        path, member = _clean_loc(err["loc"], data, err["type"])
        path = _field_named(err, path, data)
        grouped.setdefault(path, []).append((err, member))
    problems = []
    for path, errs in grouped.items():
        members = list(dict.fromkeys(m for _, m in errs if m))
        if all(m for _, m in errs) and len(members) > 1:
            got = _value_at(data, path)
            msg = f"must be {' or '.join(members)} (got {got!r})"
            problems.append(locate(path, msg))
            continue
        for err, _ in errs:
            problems.append(locate(path, _message(err, path, data)))
    return problems
