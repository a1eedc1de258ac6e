"""Rows to token ids and loss masks, in batches, straight into a table folder.

Rendering (Python, Jinja) and tokenizing (Rust, which releases the GIL and uses every core) overlap:
while the tokenizer encodes one batch in a worker thread, the next batch is rendered. A token
carries loss when any of its characters lies in a loss span; the spans are mapped to tokens with
the tokenizer's own character-to-token map, so no per-token Python work is done.

The tokens before a response are the prompt's own tokens, as when a model generates from the
prompt: where tokenizing the whole text merges the prompt's last characters with the response's
first (byte-level BPE: "answer " + "7" gives "Ġanswer", "Ġ7"; the prompt alone ends in "Ġ"), the
row is tokenized in pieces cut at each response's start and the ids joined, as TRL's DPO and
torchtune do. A tokenizer whose pieces do not spell the same text as the whole (SentencePiece-style
ones add a space in front of each piece) keeps the whole text's tokens; the prompt kept for scoring
then ends before the merged token, so it is still a prefix of the training sequence.
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
    split_at_response: int = 0  # tokenized in pieces: whole, the prompt's end merged into the response
    merged_at_response: int = 0  # the same merge, and pieces would not spell the text: whole tokens kept
    prompt_differs: int = 0  # chat: the generation prompt is not how the template renders the turn

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


def _straddling(enc, pos: int) -> int | None:
    """The token that holds the characters on both sides of `pos`, if one does."""
    t = enc.char_to_token(pos - 1) if pos > 0 else None
    return t if t is not None and enc.token_to_chars(t)[1] > pos else None


def _first_token_from(enc, pos: int, text_len: int) -> int:
    """The first token whose characters start at or after `pos`."""
    for c in range(pos, text_len):
        t = enc.char_to_token(c)
        if t is not None:
            return t
    return len(enc.ids)


@dataclass
class Tokens:
    """One rendered text as token ids and a loss mask (1 where the token carries loss)."""

    ids: np.ndarray
    mask: np.ndarray
    prompt_len: int | None = None  # the first prompt_len ids are the prompt for scoring by generation
    reference_head: str = ""  # prompt characters inside the response's first token (merged, below)
    split: bool = False  # tokenized in pieces at the response boundaries
    merged: bool = False  # a boundary falls inside a token, and pieces would not spell the same text


class Tokenizer:
    """Encodes rendered rows with the fast backend, honouring each row's add_special_tokens and
    response boundaries."""

    def __init__(self, tokenizer):
        self.backend = backend_of(tokenizer)
        # The ids encoding adds around a text (BOS, EOS, [CLS] ... [SEP]), to add them around pieces.
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        self.around = next(((full[:k], full[k + len(plain):]) for k in range(len(full) - len(plain) + 1)
                            if full[k : k + len(plain)] == plain), None)

    def encode(self, texts: list[str], specials: list[bool]):
        out = [None] * len(texts)
        for flag in set(specials):
            idx = [i for i, s in enumerate(specials) if s == flag]
            for i, enc in zip(idx, self.backend.encode_batch([texts[i] for i in idx], add_special_tokens=flag),
                              strict=True):
                out[i] = enc
        return out

    def tokenize(self, rendered: list[Rendered]) -> list[Tokens]:
        whole = self.encode([r.text for r in rendered], [r.add_special_tokens for r in rendered])
        out: list[Tokens | None] = [None] * len(rendered)
        pieces: list[str] = []
        split: list[tuple[int, list[int], int]] = []  # (row, piece bounds, index of its first piece)
        for k, (r, enc) in enumerate(zip(rendered, whole, strict=True)):
            cuts = sorted({b for b in r.boundaries if 0 < b < len(r.text)})
            straddled = any(_straddling(enc, b) is not None for b in cuts)
            if straddled and self.around is not None:
                bounds = [0, *cuts, len(r.text)]
                split.append((k, bounds, len(pieces)))
                pieces += [r.text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
            else:  # (without knowing what encoding adds around a text, pieces cannot be joined)
                out[k] = self._whole(r, enc, merged=straddled)
        if pieces:
            encoded = self.backend.encode_batch(pieces, add_special_tokens=False)
            for k, bounds, first in split:
                joined = self._joined(rendered[k], encoded[first : first + len(bounds) - 1], bounds, whole[k])
                out[k] = joined if joined is not None else self._whole(rendered[k], whole[k], merged=True)
        return out

    def _whole(self, r: Rendered, enc, merged: bool = False) -> Tokens:
        ids, mask = _ids_and_mask(enc, r.spans)
        tokens = Tokens(ids, mask, merged=merged)
        if r.prompt_end is not None:
            t = _straddling(enc, r.prompt_end)
            if t is not None:  # the prompt ends inside the response's first token: stop before it
                tokens.prompt_len = t
                tokens.reference_head = r.text[enc.token_to_chars(t)[0] : r.prompt_end]
            else:
                tokens.prompt_len = _first_token_from(enc, r.prompt_end, len(r.text))
        return tokens

    def _joined(self, r: Rendered, encs, bounds: list[int], whole) -> Tokens | None:
        """The pieces' ids joined (with the specials encoding adds around a text), or None when
        they do not spell the same text as the whole (decoded alike)."""
        before, after = self.around if r.add_special_tokens else ([], [])
        ids = [np.asarray(before, dtype=np.int32)]
        mask = [np.zeros(len(before), dtype=np.uint8)]
        count, prompt_len = len(before), None
        for enc, a, b in zip(encs, bounds, bounds[1:], strict=False):
            if a == r.prompt_end:
                prompt_len = count
            spans = [(max(s, a) - a, min(e, b) - a) for s, e in r.spans if s < b and e > a]
            piece_ids, piece_mask = _ids_and_mask(enc, spans)
            ids.append(piece_ids)
            mask.append(piece_mask)
            count += len(piece_ids)
        ids.append(np.asarray(after, dtype=np.int32))
        mask.append(np.zeros(len(after), dtype=np.uint8))
        joined = np.concatenate(ids)
        decode = self.backend.decode
        if decode(joined.tolist(), skip_special_tokens=False) != decode(whole.ids, skip_special_tokens=False):
            return None
        return Tokens(joined, np.concatenate(mask), prompt_len=prompt_len, split=True)

    def encode_batch(self, batch: list[tuple[Row, Rendered]]):
        rendered = [r for _, r in batch]
        main = self.tokenize(rendered)
        rejected = None
        if any(r.rejected is not None for r in rendered):
            rejected = self.tokenize([r.rejected for r in rendered])
        return main, rejected


def _truncate_pair(ids, mask, rej_ids, rej_mask, max_length: int):
    """A preference pair cut to max_length together: the tokens both sequences share (the prompt)
    lose their beginning, as many as the longer sequence is over, so that both answers stay whole
    and comparable; None when even the answers with one prompt token do not fit."""
    n = min(len(ids), len(rej_ids))
    same = ids[:n] == rej_ids[:n]
    shared = n if same.all() else int(np.argmin(same))
    # The prompt: shared, and before either answer's first loss token (train_on: all has none).
    if mask.any() and rej_mask.any() and not mask[0] and not rej_mask[0]:
        shared = min(shared, int(np.argmax(mask)), int(np.argmax(rej_mask)))
    over = max(len(ids), len(rej_ids)) - max_length
    if over > shared - 1:
        return None
    return (ids[over:], mask[over:]), (rej_ids[over:], rej_mask[over:])


def render_rows(src: Source, formatter: Formatter, errors: list[str],
                limit: int | None = None) -> Iterator[tuple[Row, Rendered | None]]:
    """(row, its rendering) for each row of `src` (the first `limit` rows when given), parsed by the
    source's `formatter`; a row that does not fit gives None and its message ("FILE row N: why")
    appended to `errors`, and reading stops at MAX_ERRORS of them. The one place rows are parsed:
    training (`tokenize_source`) and `peftctl validate` (`data.check`) both read them here."""
    names = src.names
    for n, row in enumerate(src.rows(), start=1):
        if limit is not None and n > limit:
            return
        try:
            yield row, formatter(row.value)
        except RowError as e:
            errors.append(f"{names[row.file]} row {row.number}: {e}")
            yield row, None
            if len(errors) >= MAX_ERRORS:
                return


def tokenize_source(src: Source, formatter: Formatter, tokenizer, writer: TableWriter, *, max_length: int,
                    truncation: str, prompts: bool, reporter: Reporter, label: str) -> Counts:
    """Read, render and tokenize every row of a source into `writer`; return the counts."""
    counts = Counts()
    errors: list[str] = []
    encoder = Tokenizer(tokenizer)

    def batches() -> Iterator[list[tuple[Row, Rendered]]]:
        batch: list[tuple[Row, Rendered]] = []
        reporter.start(src.estimated_rows(), f"tokenizing {label}", unit="rows")
        for row, rendered in render_rows(src, formatter, errors):
            counts.rows += 1
            if counts.rows % BATCH_ROWS == 0:
                reporter.advance(counts.rows, {})
            if rendered is not None:
                batch.append((row, rendered))
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
        reporter.advance(counts.rows, {})
        if batch:
            yield batch

    def finish(batch, encoded) -> None:
        main, rejected = encoded
        out: dict[str, list] = {k: [] for k in ("ids", "loss", "rows", "files", "truncated", "prompts", "refs",
                                                "rej_ids", "rej_loss")}
        for k, ((row, r), tokens) in enumerate(zip(batch, main, strict=True)):
            ids, mask = tokens.ids, tokens.mask
            pair = (rejected[k].ids, rejected[k].mask) if rejected is not None else None
            too_long = len(ids) > max_length or (pair is not None and len(pair[0]) > max_length)
            if too_long and truncation == "drop":
                counts.dropped_too_long += 1
                continue
            if pair is not None and too_long:
                cut = _truncate_pair(ids, mask, *pair, max_length)
                if cut is None:  # the answers alone are longer than max_length
                    counts.dropped_too_long += 1
                    continue
                (ids, mask), pair = cut
            ids, mask = ids[:max_length], mask[:max_length]
            if not mask[1:].any() or (pair is not None and not pair[1][1:].any()):
                counts.dropped_no_loss += 1
                continue
            counts.truncated += too_long
            both = [tokens] + ([rejected[k]] if rejected is not None else [])
            counts.split_at_response += any(t.split for t in both)
            counts.merged_at_response += any(t.merged for t in both)
            out["ids"].append(ids)
            out["loss"].append(mask)
            out["rows"].append(row.number)
            out["files"].append(row.file)
            out["truncated"].append(too_long)
            if prompts:
                scored = tokens.prompt_len is not None and r.reference is not None
                counts.prompt_differs += scored and r.prompt_differs
                # The prompt is the training sequence's own beginning (before any truncation).
                out["prompts"].append(tokens.ids[: tokens.prompt_len] if scored else np.zeros(0, dtype=np.int32))
                out["refs"].append(tokens.reference_head + r.reference if scored else None)
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
                job = None if errors else pool.submit(encoder.encode_batch, batch)
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
