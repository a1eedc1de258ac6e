"""Examples for the tasks other than causal LM (`model.task`): seq2seq_lm, seq_cls, token_cls.

These read every row of their sources straight into examples (no token cache, no packing):

- seq2seq_lm: `completion`, `alpaca` and `chat` rows as source -> target. The source (the prompt,
  Alpaca's rendered prompt, or a conversation's messages before its last one, their contents joined
  by newlines) is the encoder's input; the target (the completion, the output, or the last message,
  which must be the assistant's) is the decoder's labels, every token carrying loss, ending with the
  tokenizer's eos token.
- seq_cls: `format: classification` rows: `text`, an optional `text_pair`, and `label` (a string or an
  integer); the example's label is the label's id (one per row).
- token_cls: `format: token_classification` rows: `tokens` and `tags`, lists of equal length (CoNLL
  style); a word's tag is the label of its first sub-token, -100 (no loss) the label of its other
  sub-tokens and of the special tokens.

Labels (`label_names`): the recipe's `model.labels`, else the training data's label names sorted
(integer labels numerically). A row whose label is not among them is an input error naming the
file and row (`FILE row N`), as every bad row is; all bad rows (up to `MAX_ERRORS`) are reported
together.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from peftctl.constants import IGNORE_INDEX
from peftctl.data import sources
from peftctl.data.formats import ALPACA_PROMPT, TASK_FORMATS, Formatter, RowError
from peftctl.errors import InputError

SEQ2SEQ_FORMATS = TASK_FORMATS["seq2seq_lm"]
MAX_ERRORS = 5


@dataclass
class TaskExample:
    """One example of a seq2seq or classification task. `labels`: seq_cls, the label id (int);
    token_cls, one label id per input token (-100: no loss); seq2seq_lm, the target's token ids
    (the decoder's labels). `reference`: the target text (seq2seq) for exact match."""

    task: str
    input_ids: list[int]
    labels: Any
    token_type_ids: list[int] | None = None
    reference: str | None = None
    source: str | None = None  # "FILE row N"
    truncated: bool = False
    prompt_ids: None = None  # no prompt-only scoring: these examples are scored by `metrics`
    rejected: None = None  # no preference pairs

    @property
    def num_loss_tokens(self) -> int:
        if self.task == "seq_cls":
            return 1
        return sum(1 for y in self.labels if y != IGNORE_INDEX)


class TaskExamples(list):
    """A split's `TaskExample`s, with the per-example counts an `ExampleSet` gives (`peftctl data`,
    the dry run's plan)."""

    def lengths(self):
        import numpy as np

        return np.array([len(e.input_ids) for e in self], dtype=np.int64)

    def loss_counts(self):
        import numpy as np

        return np.array([e.num_loss_tokens for e in self], dtype=np.int64)


def format_of(spec, cfg) -> str:
    return spec.format or cfg.format


def check_formats(task: str, cfg) -> None:
    """Each source's format fits the task (an input error naming the source otherwise)."""
    allowed = TASK_FORMATS[task]
    for split in ("train", "eval"):
        for i, s in enumerate(getattr(cfg, split) or []):
            fmt = format_of(s, cfg)
            if fmt not in allowed:
                raise InputError(f"data.{split}.{i} ({s.path}): format {fmt!r} does not fit model.task {task}; "
                                 f"use {' or '.join(allowed)}")


class _Reader:
    """A source's rows as (where, fields) for a task, fields read through data.columns."""

    def __init__(self, task: str, spec, cfg, tokenizer):
        self.task, self.fmt = task, format_of(spec, cfg)
        columns = spec.columns if spec.columns is not None else cfg.columns
        roles = spec.roles if spec.roles is not None else cfg.roles
        # The formatter reads fields (columns, roles); the tokenizer only gives it its eos and specials.
        tokenizer = tokenizer if tokenizer is not None else SimpleNamespace(eos_token="", added_tokens_encoder={})
        self.formatter = Formatter(self.fmt if self.fmt in SEQ2SEQ_FORMATS else "text", tokenizer,
                                   columns=columns, roles=roles)
        self.src = sources.resolve(spec.path, split=spec.split, subset=spec.subset,
                                   text_sample_by=cfg.text_sample_by)

    def col(self, field: str) -> str:
        return self.formatter._col(field)

    def rows(self):
        names = self.src.names
        for row in self.src.rows():
            yield f"{names[row.file]} row {row.number}", row.value

    # ---- the fields of each task's rows -------------------------------------------------------

    def label(self, row: dict[str, Any]) -> str | int:
        col = self.col("label")
        label = row.get(col)
        if label is None:
            raise self.formatter._missing("label")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise RowError(f"field {col!r} must be a string or an integer, got {type(label).__name__}")
        if isinstance(label, str) and not label.strip():
            raise RowError(f"field {col!r} is empty")
        return label

    def classification(self, row: dict[str, Any]) -> tuple[str, str | None, str | int]:
        text = self.formatter._str(row, "text", nonempty=True)
        pair = self.formatter._str(row, "text_pair", required=False) or None
        return text, pair, self.label(row)

    def token_classification(self, row: dict[str, Any]) -> tuple[list[str], list[str | int]]:
        tcol, gcol = self.col("tokens"), self.col("tags")
        tokens, tags = row.get(tcol), row.get(gcol)
        if tokens is None:
            raise self.formatter._missing("tokens")
        if tags is None:
            raise self.formatter._missing("tags")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise RowError(f"field {tcol!r} must be a non-empty list of non-empty strings")
        if not isinstance(tags, list) or not all(isinstance(t, str | int) and not isinstance(t, bool) for t in tags):
            raise RowError(f"field {gcol!r} must be a list of strings or integers")
        if len(tags) != len(tokens):
            raise RowError(f"fields {tcol!r} and {gcol!r} differ in length ({len(tokens)} tokens, {len(tags)} tags)")
        return tokens, tags

    def seq2seq(self, row: dict[str, Any]) -> tuple[str, str]:
        f = self.formatter
        if self.fmt == "completion":
            return f._str(row, "prompt"), f._str(row, "completion", nonempty=True)
        if self.fmt == "alpaca":
            instruction = f._str(row, "instruction", nonempty=True)
            inp = f._str(row, "input", required=False)
            output = f._str(row, "output", nonempty=True)
            prompt = ALPACA_PROMPT.format(
                inp_intro=", paired with an input that provides further context" if inp else "",
                instruction=instruction, inp=f"### Input:\n{inp}\n\n" if inp else "")
            system = f._str(row, "system", required=False)
            if system.strip():
                prompt = system + prompt[prompt.index("\n\n### Instruction:"):]
            return prompt, output
        value = row.get(self.col("messages"))
        if value is None:
            raise f._missing("messages")
        messages, wheres = f._messages(value)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise RowError(f"{wheres[-1] if wheres else 'messages'}: a seq2seq conversation ends with the "
                           "assistant's message (the target) after at least one other (the source)")
        target = messages[-1]["content"]
        if not target.strip():
            raise RowError(f"{wheres[-1]}: the target (the last message) is empty")
        return "\n".join(m["content"] for m in messages[:-1]), target


def _raise(errors: list[str], what: str) -> None:
    if errors:
        more = f"\n(stopped after {MAX_ERRORS} bad rows)" if len(errors) >= MAX_ERRORS else ""
        raise InputError("\n".join(errors) + f" ({what}){more}")


def _sorted_names(found: set) -> list[str]:
    ints = sorted(v for v in found if isinstance(v, int))
    strs = sorted(v for v in found if isinstance(v, str))
    return [str(v) for v in ints] + [v for v in strs if v not in {str(i) for i in ints}]


def label_names(task: str, cfg, tokenizer=None) -> list[str]:
    """The label names of the training data of a seq_cls or token_cls task, sorted (integers
    numerically, before strings); bad rows are an input error naming them."""
    check_formats(task, cfg)
    found: set = set()
    errors: list[str] = []
    for spec in cfg.train:
        reader = _Reader(task, spec, cfg, tokenizer)
        for where, row in reader.rows():
            try:
                if not isinstance(row, dict):
                    raise RowError(f"a row must be an object with named fields, got {type(row).__name__}")
                if task == "seq_cls":
                    found.add(reader.classification(row)[2])
                else:
                    found.update(reader.token_classification(row)[1])
            except RowError as e:
                errors.append(f"{where}: {e}")
                if len(errors) >= MAX_ERRORS:
                    break
    _raise(errors, f"format: {TASK_FORMATS[task][0]}")
    if not found:
        raise InputError(f"training data: {', '.join(str(s.path) for s in cfg.train)}: no rows, so no labels")
    return _sorted_names(found)


def _encode_cls(tokenizer, text: str, pair: str | None, max_length: int) -> tuple[dict, bool]:
    full = tokenizer(text, pair, truncation=False)
    enc = tokenizer(text, pair, truncation=True, max_length=max_length)
    return enc, len(full["input_ids"]) > max_length


def build_examples(task: str, cfg, tokenizer, labels: list[str] | None, split: str) -> tuple[list[TaskExample], int]:
    """(the examples of split `train` or `eval` of a task's data section, rows read). `labels`: the
    label names in id order (seq_cls, token_cls); a row whose label is not among them is an input
    error naming the row."""
    label2id = {name: i for i, name in enumerate(labels or [])}
    out: list[TaskExample] = []
    errors: list[str] = []
    rows = 0
    eos = tokenizer.eos_token_id
    if task == "token_cls" and not getattr(tokenizer, "is_fast", False):
        raise InputError("model.task token_cls needs a fast tokenizer (tokenizer.json): words are mapped to "
                         "their sub-tokens by its word ids")
    for spec in getattr(cfg, split) or []:
        reader = _Reader(task, spec, cfg, tokenizer)
        for where, row in reader.rows():
            rows += 1
            try:
                if not isinstance(row, dict):
                    raise RowError(f"a row must be an object with named fields, got {type(row).__name__}")
                out.append(_example(task, reader, row, where, tokenizer, label2id, cfg.max_length, eos, split))
            except RowError as e:
                errors.append(f"{where}: {e}")
                if len(errors) >= MAX_ERRORS:
                    break
        _raise(errors, f"model.task {task}, format: {reader.fmt}")
    return out, rows


def _label_id(value, label2id: dict[str, int], split: str) -> int:
    """A label's id: its name's, else an integer label is the id itself (datasets' ClassLabel: the
    rows hold ids, model.labels the names in id order)."""
    name = str(value)
    if name not in label2id and isinstance(value, int) and not isinstance(value, bool) \
            and 0 <= value < len(label2id):
        return value
    if name not in label2id:
        known = ", ".join(label2id) if len(label2id) <= 12 else ", ".join(list(label2id)[:12]) + ", ..."
        whose = "the model's labels" if split == "eval" else "model.labels"
        why = " (the training data's, unless model.labels lists them)" if split == "eval" else ""
        raise RowError(f"label {name!r} is not one of {whose} ({known}){why}")
    return label2id[name]


def _example(task, reader: _Reader, row, where, tokenizer, label2id, max_length, eos, split) -> TaskExample:
    if task == "seq_cls":
        text, pair, label = reader.classification(row)
        enc, truncated = _encode_cls(tokenizer, text, pair, max_length)
        return TaskExample(task, list(enc["input_ids"]), _label_id(label, label2id, split),
                           token_type_ids=list(enc["token_type_ids"]) if "token_type_ids" in enc else None,
                           source=where, truncated=truncated)
    if task == "token_cls":
        words, tags = reader.token_classification(row)
        ids = [_label_id(t, label2id, split) for t in tags]
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        labels, previous = [], None
        for word in enc.word_ids():
            labels.append(IGNORE_INDEX if word is None or word == previous else ids[word])
            previous = word
        seen = {w for w in enc.word_ids() if w is not None}
        if len(seen) < len(words):  # truncated, or a word with no sub-token (its tag would be lost)
            whole = {w for w in tokenizer(words, is_split_into_words=True).word_ids() if w is not None}
            if empty := [i for i in range(len(words)) if i not in whole]:
                raise RowError(f"word {empty[0]} ({words[empty[0]]!r}) of field {reader.col('tokens')!r} has no "
                               f"sub-token in this tokenizer, so its tag would be lost; drop or replace the word")
        return TaskExample(task, list(enc["input_ids"]), labels,
                           token_type_ids=list(enc["token_type_ids"]) if "token_type_ids" in enc else None,
                           source=where, truncated=len(seen) < len(words))
    source, target = reader.seq2seq(row)
    src = tokenizer(source, truncation=True, max_length=max_length)["input_ids"]
    tgt = list(tokenizer(text_target=target)["input_ids"])
    if eos is not None and (not tgt or tgt[-1] != eos):
        tgt.append(eos)
    truncated = len(tgt) > max_length
    if truncated:
        tgt = tgt[: max_length - 1] + ([eos] if eos is not None else tgt[max_length - 1 : max_length])
    return TaskExample(task, list(src), tgt, reference=target, source=where, truncated=truncated)
