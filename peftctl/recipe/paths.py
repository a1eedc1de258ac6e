"""Path resolution. A path written in a recipe file resolves against that file's folder, so a recipe
runs the same from any working directory; a path given on the command line (`--set`) resolves
against the current directory, as a shell user expects. Fields that hold paths say so in their
schema (`fields.PATH`; `fields.SOURCE` for data sources, which may also be hub dataset ids)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from peftctl.recipe.origin import Key
from peftctl.recipe.schema import Recipe, field_at, unwrap_model

# Fields whose value may be a path or a name (a hub id or alias): they resolve to a path only
# when that path exists.
_PATH_OR_NAME = {("model", "name_or_path"), ("model", "tokenizer")}


def _path_fields(model: type[BaseModel], raw: Any, prefix: Key = ()):
    """Yield the dotted keys of fields marked as paths that hold a value in `raw`."""
    if not isinstance(raw, dict):
        return
    for name, field in model.model_fields.items():
        if name not in raw:
            continue
        if _marker(field.json_schema_extra):
            yield (*prefix, name)
        sub = unwrap_model(field.annotation, raw[name])
        if sub is not None:
            yield from _path_fields(sub, raw[name], (*prefix, name))


def _marker(extra: Any) -> Any:
    """A field's path marker: True (a path), "source" (a data source), or None."""
    return extra.get("path") if isinstance(extra, dict) else None


def _absolute(path: Path) -> Path:
    """An absolute path, `..` folded, symlinks kept: a data file linked into a content-addressed
    store (the hub cache's blobs) keeps the name, and so the type, it was given under."""
    return Path(os.path.abspath(path))


def _resolve_path(value: str, base: Path, must_exist_to_resolve: bool) -> str:
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return str(p)
    candidate = _absolute(base / p)
    if must_exist_to_resolve and not candidate.exists():
        return value  # a hub id or alias, not a path
    return str(candidate)


def _resolve_source(value: str, base: Path) -> str:
    """A data source: a path (existing, a glob, or named like a data file) resolves; a hub id stays."""
    from peftctl.data.sources import looks_like_path

    p = Path(os.path.expanduser(value))
    if p.is_absolute() or not ((base / p).exists() or looks_like_path(value)):
        return str(p) if p.is_absolute() else value
    return str(_absolute(base / p))


def resolve_paths(data: dict, base: Path, keys_from: set[Key] | None) -> None:
    """Resolve, in place, the path fields of raw recipe `data` against `base`: all of them
    (`keys_from` None), or those at or under the keys in `keys_from` (what `--set` gave)."""
    for key in list(_path_fields(Recipe, data)):
        if keys_from is not None and not any(key[:i] in keys_from for i in range(1, len(key) + 1)):
            continue
        parent = data
        for part in key[:-1]:
            parent = parent[part]
        value = parent[key[-1]]
        if _marker(field_at(key, data).json_schema_extra) == "source":
            # One source or a list of them, each a path string or a mapping with `path`.
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, str) and item:
                    items[i] = _resolve_source(item, base)
                elif isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
                    item["path"] = _resolve_source(item["path"], base)
            if not isinstance(value, list):
                parent[key[-1]] = items[0]
        elif isinstance(value, str) and value:
            parent[key[-1]] = _resolve_path(value, base, must_exist_to_resolve=key in _PATH_OR_NAME)
