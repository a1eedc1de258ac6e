"""Reading rows from local files through `datasets`, with errors that name the file and row."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peftctl.errors import InputError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _first_bad_json_line(path: Path) -> str | None:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}:{i}: not UTF-8 text ({e.reason} at byte {e.start})"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{i}: invalid JSON: {e.msg} (column {e.colno})"
            if not isinstance(value, dict):
                return f"{path}:{i}: each line must be a JSON object, got {type(value).__name__}"
    return None


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a data file, as dicts. Row i (1-based) is element i-1."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data file {path} not found")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise InputError(
            f"data file {path}: unknown type {path.suffix!r}; use one of {', '.join(BUILDERS)}"
        )
    if path.suffix.lower() == ".jsonl":
        # datasets reports a bad line as an Arrow error without its number; find it first.
        bad = _first_bad_json_line(path)
        if bad:
            raise InputError(bad)
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in several types
        cause = e.__cause__ or e
        raise InputError(f"data file {path}: cannot read it: {str(cause).splitlines()[0][:300]}") from None
    return ds.to_list()
