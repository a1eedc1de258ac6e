"""`peftctl data` and `peftctl prepare`: build a recipe's data (no model weights) and show it.

Library functions only; the CLI renders what they return.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from peftctl.constants import IGNORE_INDEX
from peftctl.data.store import Example
from peftctl.errors import InputError
from peftctl.ui import Reporter


def load(recipe, reporter: Reporter | None = None):
    """(Data, tokenizer, label names) for a recipe, built or read from the cache; loads the tokenizer
    only. The label names (seq_cls, token_cls: id order; else None) are what the run would use."""
    from peftctl import models
    from peftctl.data.pipeline import build

    tokenizer = models.load_tokenizer(recipe.model)
    task, labels = recipe.model.task_name, recipe.model.labels
    if task in ("seq_cls", "token_cls") and not labels:
        from peftctl.data.tasks import label_names

        labels = label_names(task, recipe.data)
    data = build(recipe.data, tokenizer, seed=recipe.train.seed, attention=recipe.model.attn_implementation,
                 reporter=reporter, task=task, labels=labels)
    return data, tokenizer, labels


def target(example, labels: list[str] | None) -> str | None:
    """What a task example is trained to give, in words: seq_cls its label's name, seq2seq_lm its
    target text; token_cls: each labelled word's first sub-token and tag ("piece/TAG", spaces
    between); None for causal-LM examples (their loss tokens say it)."""
    task = getattr(example, "task", None)
    if task == "seq_cls":
        return labels[example.labels] if labels else str(example.labels)
    if task == "seq2seq_lm":
        return example.reference
    return None


def tags(example, tokenizer, labels: list[str] | None) -> list[tuple[str, str | None]]:
    """token_cls: (token text, its tag's name or None for a token without a label) per input token."""
    return [(tokenizer.decode([tok]), None if y == IGNORE_INDEX else (labels[y] if labels else str(y)))
            for tok, y in zip(example.input_ids, example.labels, strict=True)]


def split_examples(data, split: str):
    if split not in data.examples:
        raise InputError(f"no {split} data in this recipe (set data.eval or data.eval_split)")
    return data.examples[split]


def runs(example: Example) -> list[tuple[list[int], bool]]:
    """The example's tokens in runs of equal loss state: [(token ids, carries loss), ...]."""
    out: list[tuple[list[int], bool]] = []
    if getattr(example, "task", None) in ("seq_cls", "seq2seq_lm"):  # the labels are not per input token
        return [(list(example.input_ids), False)]
    for tok, label in zip(example.input_ids, example.labels, strict=True):
        loss = label != IGNORE_INDEX
        if out and out[-1][1] == loss:
            out[-1][0].append(tok)
        else:
            out.append(([tok], loss))
    return out


def describe(example: Example, tokenizer, labels: list[str] | None = None) -> dict[str, Any]:
    """One example as `peftctl data --json` prints it (task examples: `label` / `tags` by name)."""
    out = {
        "source": example.source,
        "input_ids": example.input_ids,
        "labels": example.labels,
        "text": tokenizer.decode(example.input_ids),
        "tokens": len(example.input_ids),
        "loss_tokens": example.num_loss_tokens,
        "truncated": example.truncated,
    }
    if example.prompt_ids is not None and example.reference is not None:
        # What `peftctl eval` generates from (the sequence's own first tokens) and the answer it expects.
        out["prompt_ids"] = example.prompt_ids
        out["reference"] = example.reference
    if getattr(example, "reference", None) is not None and "reference" not in out:
        out["reference"] = example.reference  # seq2seq: the target
    task = getattr(example, "task", None)
    if task == "seq_cls":
        out["label"] = target(example, labels)
    elif task == "token_cls":
        out["tags"] = [[piece, tag] for piece, tag in tags(example, tokenizer, labels) if tag is not None]
    if getattr(example, "rejected", None) is not None:
        out["rejected"] = {k: v for k, v in describe(example.rejected, tokenizer).items()
                           if k in ("input_ids", "labels", "text", "tokens", "loss_tokens")}
    return out


def examples_json(data, tokenizer, split: str, n: int | None, labels: list[str] | None = None
                  ) -> Iterator[dict[str, Any]]:
    examples = split_examples(data, split)
    for k in range(len(examples) if n is None else min(n, len(examples))):
        yield describe(examples[k], tokenizer, labels)


def histogram(lengths: np.ndarray, bins: int = 10) -> list[dict[str, int]]:
    """Example counts over equal ranges of token length, from the shortest example to the longest."""
    lo, hi = int(lengths.min()), int(lengths.max())
    edges = np.unique(np.linspace(lo, hi + 1, min(bins, hi + 1 - lo) + 1).round().astype(int))
    counts, _ = np.histogram(lengths, bins=edges)
    return [{"from": int(a), "to": int(b) - 1, "count": int(c)}
            for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)]


def stats(data) -> dict[str, Any]:
    """Counts per split and source, token-length percentiles and a histogram."""
    out: dict[str, Any] = {}
    for split, examples in data.examples.items():
        lengths = examples.lengths()
        entry = asdict(data.stats[split])
        if len(lengths):
            entry["length"] = {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
                               "median": int(np.median(lengths)), "p95": int(np.percentile(lengths, 95)),
                               "max": int(lengths.max())}
            entry["histogram"] = histogram(lengths)
        entry["by_source"] = [{"source": name, **table.stats} for name, table in data.tables.get(split, [])]
        out[split] = entry
    return out


def prepare(recipe, reporter: Reporter | None = None) -> dict[str, Any]:
    """Build (or check) the cache for a recipe's data ahead of training."""
    start = time.perf_counter()
    data, _, _ = load(recipe, reporter)
    tables = [{"split": split, "source": name, "examples": len(t),
               "folder": str(t.folder) if recipe.data.cache else None}
              for split, entries in data.tables.items() for name, t in entries]
    return {
        "seconds": round(time.perf_counter() - start, 3),
        "cache": recipe.data.cache,
        "tables": tables,
        "stats": {split: asdict(s) for split, s in data.stats.items()},
    }
