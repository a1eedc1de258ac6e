"""The tokenized-data cache: one table folder per source, named by a hash of everything it depends on.

The key covers the source's content (file hashes), the tokenizer (its full serialization and
special tokens), the chat template, and every option that changes the tokens or labels (format,
columns, roles, train_on, max_length, truncation, whether prompts are kept). Change any and the key
changes, so a stale cache is never read. A table is built in a temporary folder and renamed into
place, so an interrupted build leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftctl.constants import VERSION
from peftctl.data.store import FORMAT_VERSION, Table
from peftctl.fsio import atomic_dir, cache_root


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())  # vocabulary, merges, normalizer, pre/post-processing
    else:
        with tempfile.TemporaryDirectory() as tmp:
            # save_pretrained also names files it did not write (transformers 5: added_tokens.json)
            for f in sorted(tokenizer.save_pretrained(tmp)):
                if Path(f).is_file():
                    h.update(Path(f).read_bytes())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    text = json.dumps({"format_version": FORMAT_VERSION, "peftctl": VERSION, **parts}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def default_dir() -> Path:
    return cache_root() / "data"


def load_or_build(key: str, cache_dir: Path | None, build: Callable[[Path], None]) -> tuple[Table, bool]:
    """The table for `key`: from the cache, or built by `build(folder)` (and cached unless cache_dir is None).

    Returns (table, came_from_cache).
    """
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="peftctl-data-") as tmp:
            build(Path(tmp))
            return Table(Path(tmp), in_memory=True), False
    final = cache_dir / key
    if (final / "meta.json").exists():
        return Table(final), True
    # meta.json is written last: a folder without it is an interrupted build, replaced by this one;
    # one another process finished meanwhile is kept (the same key: the same table).
    with atomic_dir(final, exists="keep", done="meta.json", what="data cache folder") as tmp:
        build(tmp)
    return Table(final), False
