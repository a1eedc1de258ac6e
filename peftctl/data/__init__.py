"""Data: rows from files, rendered by format, tokenized with labels (-100 where no loss).

`build(data_section, tokenizer, seed)` returns the train and eval examples for a recipe.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from peftctl.data.formats import FORMATS, Rendered, RowError
from peftctl.data.sources import read_rows
from peftctl.errors import InputError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] | None = None  # the prompt alone, for generation-based scoring
    reference: str | None = None
    truncated: bool = False

    @property
    def num_loss_tokens(self) -> int:
        # Position 0 never carries loss: nothing precedes it.
        return sum(1 for y in self.labels[1:] if y != IGNORE)


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0


@dataclass
class Data:
    train: list[Example]
    eval: list[Example] | None
    stats: dict[str, DataStats] = field(default_factory=dict)


def _spans_for(rendered: Rendered, train_on: str) -> list[tuple[int, int]]:
    if train_on == "all":
        return [(0, len(rendered.text))]
    if train_on == "last":
        return [rendered.last_span] if rendered.last_span else []
    return rendered.response_spans


def tokenize(rendered: list[Rendered], tokenizer, max_length: int, train_on: str) -> list[Example]:
    """Tokenize rendered rows; a token carries loss when its characters overlap a loss span."""
    out: list[Example] = []
    groups: dict[bool, list[int]] = {}
    for i, r in enumerate(rendered):
        groups.setdefault(r.add_special_tokens, []).append(i)
    encoded: list[Any] = [None] * len(rendered)
    prompt_ids: list[list[int] | None] = [None] * len(rendered)
    for add_special, idx in groups.items():
        enc = tokenizer(
            [rendered[i].text for i in idx],
            add_special_tokens=add_special,
            return_offsets_mapping=True,
        )
        for j, i in enumerate(idx):
            encoded[i] = (enc["input_ids"][j], enc["offset_mapping"][j])
        with_prompt = [i for i in idx if rendered[i].prompt is not None]
        if with_prompt:
            prompts = tokenizer([rendered[i].prompt for i in with_prompt], add_special_tokens=add_special)
            for j, i in enumerate(with_prompt):
                prompt_ids[i] = prompts["input_ids"][j]
    for r, (ids, offsets), p_ids in zip(rendered, encoded, prompt_ids, strict=True):
        spans = _spans_for(r, train_on)
        labels = [
            tok if any(s < end and e > start for start, end in spans) and e > s else IGNORE
            for tok, (s, e) in zip(ids, offsets, strict=True)
        ]
        truncated = len(ids) > max_length
        out.append(
            Example(ids[:max_length], labels[:max_length], p_ids, r.reference, truncated=truncated)
        )
    return out


def load_examples(path: str, fmt: str, tokenizer, max_length: int, train_on: str) -> tuple[list[Example], DataStats]:
    rows = read_rows(path)
    render = FORMATS[fmt]
    rendered = []
    for i, row in enumerate(rows, start=1):
        try:
            rendered.append(render(row, tokenizer))
        except RowError as e:
            raise InputError(f"{path} row {i}: {e} (format: {fmt})") from None
    examples = tokenize(rendered, tokenizer, max_length, train_on)
    stats = DataStats(rows=len(rows), truncated=sum(e.truncated for e in examples))
    kept = [e for e in examples if e.num_loss_tokens > 0]
    stats.dropped_no_loss = len(examples) - len(kept)
    if not kept:
        raise InputError(f"{path}: no example has any token to learn from (after truncation to {max_length})")
    return kept, stats


def build(cfg, tokenizer, seed: int = 0) -> Data:
    """Train and eval examples for a recipe's data section."""
    train, train_stats = load_examples(cfg.train, cfg.format, tokenizer, cfg.max_length, cfg.train_on)
    stats = {"train": train_stats}
    eval_examples = None
    if cfg.eval:
        eval_examples, stats["eval"] = load_examples(
            cfg.eval, cfg.format, tokenizer, cfg.max_length, cfg.train_on
        )
    elif cfg.eval_split:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train) * cfg.eval_split))
        if n_eval >= len(train):
            raise InputError(f"data.eval_split {cfg.eval_split} leaves no training examples")
        eval_idx = set(order[:n_eval])
        eval_examples = [e for i, e in enumerate(train) if i in eval_idx]
        train = [e for i, e in enumerate(train) if i not in eval_idx]
    return Data(train, eval_examples, stats)


def collate(examples: list[Example], pad_id: int, pad_left: bool = False):
    """Pad a list of examples into tensors: input_ids, attention_mask, labels."""
    import torch

    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        sl = slice(length - n, length) if pad_left else slice(0, n)
        ids[i, sl] = torch.tensor(e.input_ids)
        labels[i, sl] = torch.tensor(e.labels)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
