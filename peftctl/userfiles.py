"""Reading the files a user hands over: one place turns "this file is not what it should be" into
an input error that names the file.

Every reader of a user's file (adapter folders, run folders, checkpoints, model folders, data)
goes through these functions, so a truncated safetensors file, a JSON list where an object belongs,
a pickle that `weights_only` refuses or an unreadable file ends as `BadFileError` (exit 2, the path
and what is wrong in one line) instead of a library's bare exception. A new reader gets that by
calling `read_json`, `read_jsonl`, `load_safetensors`, `safetensors_keys`, `torch_load`,
`check_readable`, or by wrapping its own parsing in `reading(path, what)`. JSON is parsed by `loads`,
which refuses nesting deeper than `MAX_JSON_DEPTH` levels before the parser recurses (a row nested
100,000 levels deep is an error naming it, never a RecursionError or a crashed interpreter).

`BadFileError` is also a `ValueError`, so code written against PEFT's API, which raises
`ValueError` for a bad adapter file, keeps working.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftctl.errors import InputError


class BadFileError(InputError, ValueError):
    """A user's file is missing, unreadable, or not what it should be (exit 2)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _reason(e: BaseException) -> str:
    first = (str(e).splitlines() or [""])[0].strip()
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return first or type(e).__name__


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Run the body that parses `path`; any failure becomes `BadFileError` naming it.

    `what` says what the file should be ("an adapter config", "a safetensors file"). Errors that
    are already peftctl's pass through unchanged; so do `KeyboardInterrupt`, `MemoryError` and
    torch's `OutOfMemoryError` (the machine's limits, not the file's fault).
    """
    from peftctl.errors import PeftctlError

    try:
        yield
    except PeftctlError:
        raise
    except FileNotFoundError:
        raise BadFileError(path, f"missing (expected {what})") from None
    except PermissionError:
        raise BadFileError(path, f"not readable (permission denied); expected {what}") from None
    except IsADirectoryError:
        raise BadFileError(path, f"is a folder, expected {what}") from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - every parser's own exception type ends here
        if type(e).__name__ == "OutOfMemoryError":  # torch's (a RuntimeError): the machine, not the file
            raise
        raise BadFileError(path, f"not {what} ({_reason(e)})") from e


# Deeper than any real config, checkpoint or data row; far below the interpreter's recursion limit,
# so whatever walks the parsed value afterwards (formatters, templates, pyarrow) cannot overflow it.
MAX_JSON_DEPTH = 100
# A JSON string (escapes included) or one bracket: strings are skipped when counting the depth.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON `text` nests arrays and objects more than `limit` levels deep.

    Counting brackets costs two C-level scans for the usual text (fewer brackets than `limit`
    cannot nest deeper); only text with more brackets is walked token by token.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def loads(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` that refuses (ValueError) text nested more than `max_depth` levels deep, before
    parsing it. Any other problem is json's own ValueError (JSONDecodeError)."""
    if json_depth_exceeds(text, max_depth):
        raise ValueError(f"nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except RecursionError:  # only with max_depth above the interpreter's limit
        raise ValueError("nested too deeply") from None


def check_readable(path: str | os.PathLike, what: str = "a readable file") -> Path:
    """Open `path` for reading (and close it): missing or unreadable is `BadFileError` now, not later."""
    path = Path(path)
    with reading(path, what), open(path, "rb"):
        pass
    return path


def read_json(path: str | os.PathLike, what: str = "a JSON file", expect: type | None = dict) -> Any:
    """Parse a JSON file; `expect` (dict, list or None for anything) is the top-level type it must have."""
    with reading(path, what):
        value = loads(Path(path).read_text(encoding="utf-8"))
    if expect is not None and not isinstance(value, expect):
        raise BadFileError(path, f"not {what}: it holds a JSON {_json_kind(value)}, not a JSON {_json_kind(expect)}")
    return value


def _json_kind(value: Any) -> str:
    tp = value if isinstance(value, type) else type(value)
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(tp, tp.__name__)


def read_jsonl(path: str | os.PathLike, what: str = "a JSON-lines file",
               partial_last_line: bool = False, expect: type | None = dict) -> Iterator[tuple[int, Any]]:
    """Yield (line number, object) for each non-empty line; a line that is not a JSON object is
    `BadFileError` naming the file and the line (`expect=None`: any JSON value, for the caller to
    check). With `partial_last_line`, a last line without its newline that is not JSON is skipped
    (the half line a writer killed mid-line leaves)."""
    with reading(path, what):
        text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    for n, line in enumerate(lines + [tail], start=1):
        if not line.strip():
            continue
        try:
            value = loads(line)
        except ValueError as e:
            if partial_last_line and n == len(lines) + 1:
                return
            raise BadFileError(path, f"line {n} is not JSON ({_reason(e)})") from None
        if expect is not None and not isinstance(value, expect):
            raise BadFileError(path, f"line {n} is not a JSON {_json_kind(expect)}")
        yield n, value


def safetensors_keys(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a safetensors file declares, `{key: (dtype, shape)}`, from its header alone
    (no tensor is read). A truncated file, random bytes or a header too large is `BadFileError`."""
    from safetensors import safe_open

    with reading(path, "a complete safetensors file"), safe_open(str(path), framework="pt") as f:
        out = {}
        for k in f.keys():
            sl = f.get_slice(k)
            out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        return out


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    """Every tensor of a safetensors file, `{key: torch.Tensor}` on `device`."""
    from safetensors import safe_open

    with reading(path, "a complete safetensors file"), safe_open(str(path), framework="pt", device=device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def torch_load(path: str | os.PathLike, what: str = "a PyTorch file", mmap: bool = False) -> Any:
    """`torch.load` with `weights_only=True` (no code runs); a truncated file or a pickle that
    `weights_only` refuses is `BadFileError` naming the file. `mmap=True` maps the tensors' bytes
    instead of reading them: a cheap way to check a large file's structure and pickle."""
    import pickle

    import torch

    try:
        with reading(path, what):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except BadFileError as e:
        if isinstance(e.__cause__, pickle.UnpicklingError) and "Weights only load failed" in str(e.__cause__):
            # torch's message runs over many lines; the point is that the file holds more than
            # tensors and plain values, so loading it would run code.
            raise BadFileError(path, f"not {what}: it holds objects other than tensors and plain values, "
                                     "which weights_only loading refuses (loading them could run code)") from None
        raise
