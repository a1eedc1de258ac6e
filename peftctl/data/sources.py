"""Where rows come from: files, folders, globs, `save_to_disk` folders, hub datasets.

`resolve` turns a recipe's source into concrete files (or a dataset) without reading them;
`Source.rows` streams the rows one at a time with their location (file and row number), so files
larger than memory are fine; `Source.fingerprint` is a hash of the content, the cache key's part.
Rows are numbered from 1: a JSONL row is its line number, a CSV row the data row under the header.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftctl.errors import InputError
from peftctl.userfiles import MAX_JSON_DEPTH, loads, reading

READERS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
GLOB_CHARS = set("*?[")
# A folder written by datasets' save_to_disk holds one of these.
SAVED_MARKERS = ("state.json", "dataset_dict.json")


@dataclass
class Row:
    file: int  # index into Source.files (or 0 for a dataset)
    number: int  # 1-based row number in that file
    value: Any


@dataclass
class Source:
    """One resolved data source."""

    spec: str  # as the recipe wrote it (resolved path or hub id)
    kind: str  # "files" | "saved" | "hub"
    files: list[Path] = field(default_factory=list)  # files: the data files; saved: the folder's files
    split: str | None = None
    subset: str | None = None
    text_sample_by: str = "line"
    _dataset: Any = None

    @property
    def names(self) -> list[str]:
        """What row locations are called in messages: file paths, or the dataset and split."""
        if self.kind == "files":
            return [str(f) for f in self.files]
        split = self.split or "train"
        return [f"{self.spec} ({'subset ' + self.subset + ', ' if self.subset else ''}split {split})"]

    def estimated_rows(self) -> int:
        """About how many rows there are, for progress: lines of text files, rows of the others."""
        if self.kind != "files":
            return len(self.dataset())
        total = 0
        for f in self.files:
            if f.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq

                with reading(f, "a Parquet file"):
                    total += pq.ParquetFile(f).metadata.num_rows
            else:
                with open(f, "rb") as fh:
                    total += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        return total

    # ---- content hash ------------------------------------------------------------------------

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.kind}\0{self.split}\0{self.subset}\0{self.text_sample_by}\0".encode())
        if self.kind == "hub":
            # datasets fingerprints what it built from the hub files; the name pins the source.
            h.update(f"{self.spec}\0{self.dataset()._fingerprint}".encode())
            return h.hexdigest()
        for f in self.files:
            h.update(READERS.get(f.suffix.lower(), f.name).encode() + b"\0")
            h.update(_file_digest(f) + b"\0")
        return h.hexdigest()

    # ---- reading -----------------------------------------------------------------------------

    def dataset(self):
        """The `datasets.Dataset` of a save_to_disk folder or hub dataset (loaded once)."""
        if self._dataset is None:
            self._dataset = _load_saved(self) if self.kind == "saved" else _load_hub(self)
        return self._dataset

    def rows(self) -> Iterator[Row]:
        if self.kind != "files":
            yield from _dataset_rows(self.dataset())
            return
        for i, path in enumerate(self.files):
            for row in _READ[READERS[path.suffix.lower()]](path, self):
                row.file = i
                yield row


def _file_digest(path: Path) -> bytes:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):
            return hashlib.file_digest(f, "sha256").digest()
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        return h.digest()


# ---- resolving -----------------------------------------------------------------------------


def looks_like_path(value: str) -> bool:
    """A source string meant as a local path (not a hub id), whether or not it exists."""
    return (
        value.startswith(("/", "./", "../", "~"))
        or any(c in value for c in GLOB_CHARS)
        or Path(value).suffix.lower() in READERS
    )


def resolve(spec: str, *, split: str | None = None, subset: str | None = None,
            text_sample_by: str = "line") -> Source:
    """Find what a source names, without reading rows. Errors name the source."""
    kw = {"split": split, "subset": subset, "text_sample_by": text_sample_by}
    path = Path(os.path.expanduser(spec))
    if any(c in spec for c in GLOB_CHARS):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise InputError(f"data source {spec}: the pattern matches no files")
        return Source(spec, "files", [_check_file(p) for p in files], **kw)
    if path.is_file():
        return Source(spec, "files", [_check_file(path)], **kw)
    if path.is_dir():
        if any((path / m).exists() for m in SAVED_MARKERS):
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return Source(spec, "saved", files, **kw)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in READERS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise InputError(
                f"data source {spec}: the folder holds no data files ({', '.join(READERS)}) and was "
                "not written by datasets' save_to_disk"
            )
        return Source(spec, "files", [_check_file(p) for p in files], **kw)
    if looks_like_path(spec):
        raise InputError(f"data file {spec} not found")
    return Source(spec, "hub", **kw)


def _check_file(path: Path) -> Path:
    """A data file of a known type that can be opened (checked when it is found, so an unreadable
    file stops `validate`, a dry run or a run before anything loads)."""
    from peftctl.userfiles import check_readable

    if path.suffix.lower() not in READERS:
        raise InputError(f"data file {path}: unknown type {path.suffix!r}; use one of {', '.join(READERS)}")
    check_readable(path, "a data file")
    if path.suffix.lower() == ".parquet":  # its footer (the schema) is cheap to read: a corrupt file stops here
        import pyarrow.parquet as pq

        from peftctl.userfiles import reading

        with reading(path, "a Parquet file"):
            pq.read_schema(path)
    return path


def _hub_unreachable() -> str | None:
    """Why the hub does not answer within a few seconds, or None when it does (any HTTP answer).

    Asked through huggingface_hub's own HTTP session, which the download that follows uses: its
    proxies (HTTPS_PROXY, ...), certificates and offline mode (HF_HUB_OFFLINE) apply alike, so a hub
    reached through a proxy is reachable here too."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=3)
    except Exception as e:  # the client's own error types (they change between versions)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_hub(src: Source):
    import datasets

    datasets.disable_progress_bars()
    what = f"data source {src.spec!r} is not a local file, folder or glob, and"
    if not _offline() and (unreachable := _hub_unreachable()):
        # Without this check the hub client retries for about half a minute before giving up.
        raise InputError(
            f"{what} the hub cannot be reached ({unreachable}); if it is in the datasets cache, run with "
            "HF_HUB_OFFLINE=1"
        )
    try:
        return datasets.load_dataset(src.spec, src.subset, split=src.split or "train")
    except (ConnectionError, FileNotFoundError) as e:
        why = "not in the datasets cache (the hub is offline: HF_HUB_OFFLINE=1)" if _offline() else (
            f"the hub has no such dataset: {str(e).splitlines()[0][:200]}")
        raise InputError(f"{what} {why}") from None
    except ValueError as e:  # unknown split or subset
        raise InputError(f"data source {src.spec!r}: {str(e).splitlines()[0][:300]}") from None


def _load_saved(src: Source):
    import datasets

    folder = Path(src.spec)
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises several types for damaged folders
        raise InputError(f"data source {folder}: cannot read it as a save_to_disk folder: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = src.split or "train"
        if split not in ds:
            raise InputError(f"data source {folder}: no split {split!r}; it has {', '.join(ds)} (set split)")
        return ds[split]
    return ds


# ---- readers: each yields Row(file=0, number, value) ----------------------------------------


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line; bytes that are not UTF-8 are an error naming the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path} row {number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            yield number, line


def _read_jsonl(path: Path, src: Source) -> Iterator[Row]:
    for number, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            value = loads(line)  # refuses deep nesting before the parser recurses
        except json.JSONDecodeError as e:
            raise InputError(f"{path} row {number}: invalid JSON: {e.msg} (column {e.colno})") from None
        except ValueError as e:
            raise InputError(f"{path} row {number}: invalid JSON: {e}") from None
        yield Row(0, number, value)


def _read_json(path: Path, src: Source) -> Iterator[Row]:
    # A JSON document is read whole (it cannot be streamed row by row); use JSONL for large data.
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path} line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        value = loads(text, MAX_JSON_DEPTH + 1)  # the list of rows is one level more
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except ValueError as e:
        raise InputError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(value, list):
        raise InputError(f"{path}: a .json file must hold a list of rows (objects); got {type(value).__name__}")
    for i, item in enumerate(value, start=1):
        yield Row(0, i, item)


def _read_csv(path: Path, src: Source) -> Iterator[Row]:
    lines = (line for _, line in _utf8_lines(path))
    try:
        reader = csv.DictReader(lines)
        for number, row in enumerate(reader, start=1):
            # A short row leaves its last fields None (reported as missing); extra cells go under None.
            row.pop(None, None)
            yield Row(0, number, row)
    except csv.Error as e:
        raise InputError(f"{path}: not valid CSV: {e}") from None


def _read_text(path: Path, src: Source) -> Iterator[Row]:
    if src.text_sample_by == "document":
        text = "".join(line for _, line in _utf8_lines(path))
        if text.strip():
            yield Row(0, 1, {"text": text})
        return
    block: list[str] = []
    count = 0
    for number, line in _utf8_lines(path):
        line = line.rstrip("\r\n")
        if src.text_sample_by == "line":
            if line.strip():
                yield Row(0, number, {"text": line})
            continue
        if line.strip():
            block.append(line)
        elif block:
            count += 1
            yield Row(0, count, {"text": "\n".join(block)})
            block = []
    if block:
        yield Row(0, count + 1, {"text": "\n".join(block)})


def _read_parquet(path: Path, src: Source) -> Iterator[Row]:
    import pyarrow.parquet as pq

    number = 0
    with reading(path, "a Parquet file"):
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    while True:
        with reading(path, f"a Parquet file readable past row {number}" if number else "a Parquet file"):
            batch = next(batches, None)
            values = batch.to_pylist() if batch is not None else []
        if batch is None:
            return
        for value in values:
            number += 1
            yield Row(0, number, value)


def _dataset_rows(ds) -> Iterator[Row]:
    number = 0
    for batch in ds.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            number += 1
            yield Row(0, number, dict(zip(columns, values, strict=True)))


_READ = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "text": _read_text, "parquet": _read_parquet}
