"""Reading the files a user hands over: one place turns "this file is not what it should be" into
an input error that names the file.

Every reader of a user's file (adapter folders, run folders, checkpoints, model folders, data)
goes through these functions, so a truncated safetensors file, a JSON list where an object belongs,
a pickle that `weights_only` refuses or an unreadable file ends as `BadFileError` (exit 2, the path
and what is wrong in one line) instead of a library's bare exception. A new reader gets that by
calling `read_json`, `load_safetensors`, `torch_load`, or by wrapping its own parsing in
`reading(path, what)`.

`BadFileError` is also a `ValueError`, so code written against PEFT's API, which raises
`ValueError` for a bad adapter file, keeps working.
"""

from __future__ import annotations

import contextlib
import json
import os
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
    are already peftctl's pass through unchanged; so do `KeyboardInterrupt` and `MemoryError`.
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
        raise BadFileError(path, f"not {what} ({_reason(e)})") from e


def check_readable(path: str | os.PathLike, what: str = "a readable file") -> Path:
    """Open `path` for reading (and close it): missing or unreadable is `BadFileError` now, not later."""
    path = Path(path)
    with reading(path, what), open(path, "rb"):
        pass
    return path


def read_json(path: str | os.PathLike, what: str = "a JSON file", expect: type | None = dict) -> Any:
    """Parse a JSON file; `expect` (dict, list or None for anything) is the top-level type it must have."""
    with reading(path, what):
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise BadFileError(path, f"not {what} (the JSON holds {type(value).__name__}, expected {kind})")
    return value


def read_jsonl(path: str | os.PathLike, what: str = "a JSON-lines file") -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-empty line; a line that is not a JSON object is
    `BadFileError` naming the file and the line."""
    with reading(path, what):
        text = Path(path).read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise BadFileError(path, f"line {n} is not JSON ({_reason(e)})") from None
        if not isinstance(value, dict):
            raise BadFileError(path, f"line {n} is not a JSON object")
        yield n, value


def safetensors_keys(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a safetensors file declares, `{key: (dtype, shape)}`, from its header alone
    (no tensor is read). A truncated file, random bytes or a header too large is `BadFileError`."""
    from safetensors import safe_open

    with reading(path, "a safetensors file"), safe_open(str(path), framework="pt") as f:
        out = {}
        for k in f.keys():
            sl = f.get_slice(k)
            out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        return out


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    """Every tensor of a safetensors file, `{key: torch.Tensor}` on `device`."""
    from safetensors import safe_open

    with reading(path, "a safetensors file"), safe_open(str(path), framework="pt", device=device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def torch_load(path: str | os.PathLike, what: str = "a PyTorch file") -> Any:
    """`torch.load` with `weights_only=True` (no code runs); a truncated file or a pickle that
    `weights_only` refuses is `BadFileError` naming the file."""
    import torch

    with reading(path, what):
        return torch.load(path, map_location="cpu", weights_only=True)
