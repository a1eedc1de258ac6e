"""Rows to token ids and loss masks, in batches, straight into a table folder.

Rendering (Python, Jinja) and tokenizing (Rust, which releases the GIL and uses every core) overlap:
while the tokenizer encodes one batch in a worker thread, the next batch is rendered. A token
carries loss when any of its characters lies in a loss span; the spans are mapped to tokens with
the tokenizer's own character-to-token map, so no per-token Python work is done.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from peftctl.data.formats import Formatter, Rendered, RowError
from peftctl.data.sources import Row, Source
from peftctl.data.store import TableWriter
from peftctl.errors import InputError
from peftctl.ui import Reporter

BATCH_ROWS = 1000
MAX_ERRORS = 5  # bad rows reported together before giving up


@dataclass
class Counts:
    rows: int = 0  # rows read
    examples: int = 0  # examples kept
    truncated: int = 0  # kept, cut to max_length
    dropped_too_long: int = 0  # longer than max_length with `truncation: drop`
    dropped_no_loss: int = 0  # no token left to learn from (after truncation)
    tokens: int = 0
    loss_tokens: int = 0

    def add(self, other: Counts) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def backend_of(tokenizer):
    """The Rust tokenizer behind a transformers tokenizer: batched encoding with character maps."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        raise InputError(
            f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; peftctl places labels by "
            "character offsets and needs one"
        )
    return backend


def _token_range(enc, start: int, end: int) -> tuple[int, int] | None:
    """First and last token whose characters overlap [start, end); None if no token does."""
    first = last = None
    for c in range(start, end):  # characters in no token (trimmed spaces) are skipped
        first = enc.char_to_token(c)
        if first is not None:
            break
    if first is None:
        return None
    for c in range(end - 1, start - 1, -1):
        last = enc.char_to_token(c)
        if last is not None:
            break
    return first, last


def _ids_and_mask(enc, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(enc.ids, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for start, end in spans:
        r = _token_range(enc, start, end)
        if r is not None:
            mask[r[0] : r[1] + 1] = 1
    return ids, mask


class Tokenizer:
    """Encodes rendered rows with the fast backend, honouring each row's add_special_tokens."""

    def __init__(self, tokenizer):
        self.backend = backend_of(tokenizer)

    def encode(self, texts: list[str], specials: list[bool]):
        out = [None] * len(texts)
        for flag in set(specials):
            idx = [i for i, s in enumerate(specials) if s == flag]
            for i, enc in zip(idx, self.backend.encode_batch([texts[i] for i in idx], add_special_tokens=flag),
                              strict=True):
                out[i] = enc
        return out

    def encode_batch(self, batch: list[tuple[Row, Rendered]], prompts: bool):
        rendered = [r for _, r in batch]
        specials = [r.add_special_tokens for r in rendered]
        main = self.encode([r.text for r in rendered], specials)
        prompt = self.encode([r.prompt or "" for r in rendered], specials) if prompts else None
        rejected = None
        if any(r.rejected is not None for r in rendered):
            rejected = self.encode([r.rejected.text for r in rendered],
                                   [r.rejected.add_special_tokens for r in rendered])
        return main, prompt, rejected


def tokenize_source(src: Source, formatter: Formatter, tokenizer, writer: TableWriter, *, max_length: int,
                    truncation: str, prompts: bool, reporter: Reporter, label: str) -> Counts:
    """Read, render and tokenize every row of a source into `writer`; return the counts."""
    counts = Counts()
    errors: list[str] = []
    names = src.names
    encoder = Tokenizer(tokenizer)

    def batches() -> Iterator[list[tuple[Row, Rendered]]]:
        batch: list[tuple[Row, Rendered]] = []
        reporter.start(src.estimated_rows(), f"tokenizing {label}", unit="rows")
        for row in src.rows():
            counts.rows += 1
            if counts.rows % BATCH_ROWS == 0:
                reporter.advance(counts.rows, {})
            try:
                batch.append((row, formatter(row.value)))
            except RowError as e:
                errors.append(f"{names[row.file]} row {row.number}: {e}")
                if len(errors) >= MAX_ERRORS:
                    break
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
        reporter.advance(counts.rows, {})
        if batch:
            yield batch

    def finish(batch, encoded) -> None:
        main, prompt, rejected = encoded
        out: dict[str, list] = {k: [] for k in ("ids", "loss", "rows", "files", "truncated", "prompts", "refs",
                                                "rej_ids", "rej_loss")}
        for k, ((row, r), enc) in enumerate(zip(batch, main, strict=True)):
            ids, mask = _ids_and_mask(enc, r.spans)
            pair = _ids_and_mask(rejected[k], r.rejected.spans) if rejected is not None else None
            too_long = len(ids) > max_length or (pair is not None and len(pair[0]) > max_length)
            if too_long and truncation == "drop":
                counts.dropped_too_long += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            if pair is not None:
                pair = (pair[0][:max_length], pair[1][:max_length])
            if not mask[1:].any() or (pair is not None and not pair[1][1:].any()):
                counts.dropped_no_loss += 1
                continue
            counts.truncated += too_long
            out["ids"].append(ids)
            out["loss"].append(mask)
            out["rows"].append(row.number)
            out["files"].append(row.file)
            out["truncated"].append(too_long)
            if prompts:
                out["prompts"].append(np.asarray(prompt[k].ids if r.prompt is not None else [], dtype=np.int32))
                out["refs"].append(r.reference if r.prompt is not None else None)
            if pair is not None:
                out["rej_ids"].append(pair[0])
                out["rej_loss"].append(pair[1])
        writer.write(out["ids"], out["loss"], out["rows"], out["files"], out["truncated"],
                     prompts=out["prompts"], references=out["refs"],
                     rejected=(out["rej_ids"], out["rej_loss"]) if writer.rejected else None)
        counts.examples += len(out["ids"])
        counts.tokens += sum(len(a) for a in out["ids"])
        counts.loss_tokens += sum(int(m[1:].sum()) for m in out["loss"])

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for batch in batches():
                # Once a row is bad the data will not be used: keep reading only to report more bad rows.
                job = None if errors else pool.submit(encoder.encode_batch, batch, prompts)
                if pending is not None:
                    finish(pending[0], pending[1].result())
                pending = (batch, job) if job is not None else None
            if pending is not None and not errors:
                finish(pending[0], pending[1].result())
    finally:
        reporter.stop()
    if errors:
        more = f"\n(stopped after {MAX_ERRORS} bad rows)" if len(errors) >= MAX_ERRORS else ""
        raise InputError("\n".join(errors) + f" (format: {formatter.fmt}){more}")
    return counts
