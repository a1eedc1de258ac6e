"""`build(data_section, tokenizer)`: a recipe's train and eval examples, from the cache when it can.

Each source becomes a table (cached under a content key); the train tables are then split (when
`eval_split` is set), mixed by weight, and packed (when `packing` is set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peftctl.data import cache, sources
from peftctl.data.formats import Formatter
from peftctl.data.packing import PackedSet, layout_for, pack
from peftctl.data.store import ExampleSet, Table, TableWriter
from peftctl.data.templates import ChatRenderer, use_chat_template
from peftctl.data.tokenize import Counts, render_rows, tokenize_source
from peftctl.errors import InputError
from peftctl.ui import Reporter

CHAT_FORMATS = ("chat", "sharegpt")
# A warning, not a refusal nor a drop: TRL's DPOTrainer (and LLaMA-Factory) train such pairs as they are.
IDENTICAL_PAIRS = ("are preference pairs whose chosen and rejected answers are identical: kept, but their loss "
                   "cannot move (ln 2 for dpo; TRL trains them alike); fix or remove them")


@dataclass
class DataStats:
    rows: int = 0  # rows read from the sources
    examples: int = 0  # examples in this split (after weighting)
    truncated: int = 0  # of those, cut to max_length
    dropped_too_long: int = 0  # rows longer than max_length, dropped (`truncation: drop`)
    dropped_no_loss: int = 0  # rows with no token to learn from (after truncation)
    tokens: int = 0
    loss_tokens: int = 0
    split_at_response: int = 0  # rows tokenized as prompt and response apart (tokenize.py)
    merged_at_response: int = 0  # rows whose prompt ends inside a token that could not be split
    prompt_differs: int = 0  # chat rows whose generation prompt differs from the rendered turn
    identical_pairs: int = 0  # preference pairs whose chosen and rejected are the same (kept, as TRL keeps them)
    from_cache: int = 0  # sources read from the cache
    sources: int = 0
    packed_sequences: int | None = None
    packing_fill: float | None = None  # fraction of packed positions holding tokens


@dataclass
class Data:
    train: ExampleSet | PackedSet  # what the training loop batches
    eval: ExampleSet | None
    stats: dict[str, DataStats] = field(default_factory=dict)
    examples: dict[str, ExampleSet] = field(default_factory=dict)  # each split before packing
    tables: dict[str, list[tuple[str, Table]]] = field(default_factory=dict)  # (source, table) per split


class _Builder:
    def __init__(self, cfg, tokenizer, reporter: Reporter):
        self.cfg, self.tokenizer, self.reporter = cfg, tokenizer, reporter
        # Put the recipe's template on the tokenizer: the run folder saves it with the adapter.
        self.template = use_chat_template(tokenizer, cfg.chat_template)
        self.chat = ChatRenderer(tokenizer, self.template) if self.template else None
        self.tokenizer_fp = cache.tokenizer_fingerprint(tokenizer)
        self.cache_dir = None
        if cfg.cache:
            self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache.default_dir()

    def formatter(self, spec) -> Formatter:
        """The row parser of one source (its format, columns and roles, or the section's)."""
        cfg = self.cfg
        fmt = spec.format or cfg.format
        if fmt in CHAT_FORMATS and self.chat is None:
            raise InputError(
                f"data: format {fmt!r} renders conversations with a chat template, and the tokenizer has "
                "none; set data.chat_template (a name such as chatml or llama3, or a Jinja template)"
            )
        return Formatter(
            fmt, self.tokenizer, columns=spec.columns if spec.columns is not None else cfg.columns,
            roles=spec.roles if spec.roles is not None else cfg.roles, train_on=cfg.train_on, chat=self.chat,
            template_prompts=cfg.chat_template is not None,
        )

    def table(self, spec, split: str, prompts: bool) -> tuple[Table, bool]:
        cfg = self.cfg
        formatter = self.formatter(spec)
        fmt = formatter.fmt
        src = sources.resolve(spec.path, split=spec.split, subset=spec.subset, text_sample_by=cfg.text_sample_by)
        key = cache.cache_key({
            "source": src.fingerprint(), "tokenizer": self.tokenizer_fp, "template": self.template,
            "format": fmt, "columns": formatter.columns, "roles": formatter.roles, "train_on": cfg.train_on,
            "template_prompts": formatter.template_prompts,
            "max_length": cfg.max_length, "truncation": cfg.truncation, "prompts": prompts,
        })

        def build(folder: Path) -> None:
            writer = TableWriter(folder, prompts=prompts, rejected=fmt == "preference")
            counts = tokenize_source(src, formatter, self.tokenizer, writer, max_length=cfg.max_length,
                                     truncation=cfg.truncation, prompts=prompts, reporter=self.reporter,
                                     label=f"{split} {spec.path}")
            writer.close({"names": src.names, "key": key, "source": spec.path, "format": fmt,
                          "stats": vars(counts)})

        table, cached = cache.load_or_build(key, self.cache_dir, build)
        table.names = src.names  # the same content may sit at another path now
        c = table.stats
        self.reporter.log(
            f"{split}: {spec.path}: {c['examples']:,} examples of {c['rows']:,} rows"
            + (" (from cache)" if cached else "")
            + (f", {c['truncated']:,} truncated" if c["truncated"] else "")
            + (f", {c['dropped_too_long']:,} dropped as too long" if c["dropped_too_long"] else "")
            + (f", {c['dropped_no_loss']:,} without loss tokens dropped" if c["dropped_no_loss"] else "")
        )
        for count, what in (
            (c.get("split_at_response"), "tokenized as prompt and response apart: tokenized whole, the prompt's "
             "last characters and the response's first made one token, which generating from the prompt never "
             "gives"),
            (c.get("merged_at_response"), "have a token holding the prompt's last characters and the response's "
             "first, and this tokenizer's pieces would not spell the same text: the token is kept, and scoring "
             "generates from the tokens before it"),
            (c.get("prompt_differs"), "end in a turn that the chat template renders differently after its "
             "generation prompt (add_generation_prompt): scoring generates from the conversation as trained"),
            (table.identical_pairs(), IDENTICAL_PAIRS),
        ):
            if count:
                self.reporter.log(f"{split}: {spec.path}: {count:,} rows {what}")
        return table, cached


def _stats(tables: list[tuple[Table, bool]], examples: ExampleSet, count_rows: bool = True) -> DataStats:
    s = DataStats(sources=len(tables), from_cache=sum(c for _, c in tables))
    if count_rows:
        total = Counts()
        for t, _ in tables:
            total.add(Counts(**t.stats))
        s.rows, s.dropped_too_long, s.dropped_no_loss = total.rows, total.dropped_too_long, total.dropped_no_loss
        s.split_at_response, s.merged_at_response = total.split_at_response, total.merged_at_response
        s.prompt_differs = total.prompt_differs
        s.identical_pairs = sum(t.identical_pairs() for t, _ in tables)
    s.examples = len(examples)
    s.tokens = int(examples.lengths().sum())
    s.loss_tokens = int(examples.loss_counts().sum())
    s.truncated = int(examples.truncated().sum())
    return s


def _weighted(examples: ExampleSet, weights: list[float], rng: np.random.Generator) -> ExampleSet:
    """Repeat each source's examples `weight` times (a seeded random part for the fraction)."""
    if all(w == 1.0 for w in weights):
        return examples
    chosen = []
    for i, w in enumerate(weights):
        idx = np.flatnonzero(examples.table == i)
        whole, frac = int(w), w - int(w)
        chosen.append(np.tile(idx, whole))
        if frac:
            chosen.append(np.sort(rng.choice(idx, size=round(frac * len(idx)), replace=False)))
    return examples.take(np.concatenate(chosen))


def check_rows(cfg, tokenizer, limit: int | None = None,
               notes: list[str] | None = None) -> tuple[dict[tuple[str, int], list[str]], int]:
    """Parse every row (the first `limit` of each source when given) of every local source of a
    data section as training will (`tokenize.render_rows`, the same parser), without tokenizing or
    caching anything: ({(split, source index): ["FILE row N: why (format: F)", ...]} for the sources
    with bad rows (at most tokenize.MAX_ERRORS each), the number of sources read). A hub dataset is
    not read (it may need the network); an unreadable file or invalid JSON is its source's one message.
    `notes` gets a line per source with preference pairs whose chosen and rejected are the same text."""
    builder = _Builder(cfg, tokenizer, Reporter())
    problems: dict[tuple[str, int], list[str]] = {}
    checked = 0
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(cfg, split) or []):
            src = sources.resolve(spec.path, split=spec.split, subset=spec.subset, text_sample_by=cfg.text_sample_by)
            if src.kind == "hub":
                continue
            checked += 1
            formatter = builder.formatter(spec)
            errors: list[str] = []
            broken: list[str] = []
            identical = 0
            try:
                for _, r in render_rows(src, formatter, errors, limit):
                    identical += r is not None and r.rejected is not None and r.rejected.text == r.text
            except InputError as e:  # the file itself: invalid JSON, not UTF-8, unreadable
                broken.append(str(e))
            if identical and notes is not None:
                notes.append(f"warning: data.{split} {spec.path}: {identical:,} rows {IDENTICAL_PAIRS}")
            if errors or broken:
                problems[(split, i)] = [f"{e} (format: {formatter.fmt})" for e in errors] + broken
    return problems, checked


def build(cfg, tokenizer, seed: int = 0, *, attention: str | None = None, reporter: Reporter | None = None,
          task: str = "causal_lm", labels: list[str] | None = None) -> Data:
    """Train and eval examples for a recipe's data section.

    The tokenizer is given the recipe's chat template (when it names one), so that the tokenizer
    saved with an adapter renders prompts as training did. `attention` is the model's attention
    implementation; packing shapes its batches for it. `task` (`model.task`): a task other than
    causal_lm reads its rows into `tasks.TaskExample`s (`build_task`), with `labels` (seq_cls,
    token_cls: the label names in id order).
    """
    reporter = reporter or Reporter()
    if task != "causal_lm":
        return build_task(cfg, tokenizer, task, labels, seed, reporter)
    # Every source is found, and its files checked readable, before any is read: a bad eval file
    # stops the build before the training data is tokenized.
    for s in [*cfg.train, *(cfg.eval or [])]:
        sources.resolve(s.path, split=s.split, subset=s.subset, text_sample_by=cfg.text_sample_by)
    builder = _Builder(cfg, tokenizer, reporter)
    layout = layout_for(attention) if cfg.packing else None
    # Prompts (for scoring by generation) are kept for eval data only, which eval_split takes from train.
    train_tables = [builder.table(s, "train", prompts=bool(cfg.eval_split)) for s in cfg.train]
    eval_tables = [builder.table(s, "eval", prompts=True) for s in cfg.eval or []]
    tables = [t for t, _ in train_tables]
    train = ExampleSet.concat(tables)
    rng = np.random.default_rng(seed)
    eval_set = ExampleSet.concat([t for t, _ in eval_tables]) if eval_tables else None
    if cfg.eval_split:
        order = rng.permutation(len(train))
        n_eval = max(1, round(len(train) * cfg.eval_split))
        if n_eval >= len(train):
            raise InputError(f"data.eval_split {cfg.eval_split} leaves no training examples ({len(train)} in all)")
        eval_set = train.take(np.sort(order[:n_eval]))
        train = train.take(np.sort(order[n_eval:]))
    train = _weighted(train, [s.weight for s in cfg.train], rng)

    stats = {"train": _stats(train_tables, train)}
    if eval_set is not None:
        stats["eval"] = _stats(eval_tables, eval_set, count_rows=bool(eval_tables))
    for split, s in stats.items():
        if s.examples == 0:
            raise InputError(
                f"{split} data: no example has any token to learn from (max_length {cfg.max_length}, "
                f"{s.dropped_too_long} dropped as too long, {s.dropped_no_loss} without loss tokens)"
            )
    data = Data(train, eval_set, stats, {"train": train} | ({"eval": eval_set} if eval_set is not None else {}),
                {"train": [(s.path, t) for s, (t, _) in zip(cfg.train, train_tables, strict=True)],
                 "eval": [(s.path, t) for s, (t, _) in zip(cfg.eval or [], eval_tables, strict=True)]})
    if layout is not None:
        data.train = pack(train, cfg.max_length, layout)
        stats["train"].packed_sequences = len(data.train)
        stats["train"].packing_fill = round(data.train.fill(), 4)
        reporter.log(f"packed {len(train):,} examples into {len(data.train):,} sequences of up to "
                     f"{cfg.max_length} tokens ({100 * data.train.fill():.1f}% filled)")
    return data


def _task_stats(examples, rows: int) -> DataStats:
    return DataStats(rows=rows, examples=len(examples), sources=0,
                     truncated=sum(e.truncated for e in examples),
                     tokens=sum(len(e.input_ids) for e in examples),
                     loss_tokens=sum(e.num_loss_tokens for e in examples))


def build_task(cfg, tokenizer, task: str, labels: list[str] | None, seed: int, reporter: Reporter) -> Data:
    """`build` for model.task seq2seq_lm, seq_cls or token_cls (`tasks.py`): every row read into an
    example (no cache), eval_split and source weights as for causal LMs; packing refused."""
    from peftctl.data import tasks

    if cfg.packing:
        raise InputError(f"data.packing: model.task {task} trains on whole examples; packing is for causal_lm only")
    tasks.check_formats(task, cfg)
    for s in [*cfg.train, *(cfg.eval or [])]:
        sources.resolve(s.path, split=s.split, subset=s.subset, text_sample_by=cfg.text_sample_by)
    parts, rows = [], 0
    for spec in cfg.train:
        one = cfg.model_copy(update={"train": [spec], "eval": None})
        examples, n = tasks.build_examples(task, one, tokenizer, labels, "train")
        parts.append(examples)
        rows += n
        reporter.log(f"train: {spec.path}: {len(examples):,} examples ({task})")
    train = [e for part in parts for e in part]
    eval_set, eval_rows = None, 0
    if cfg.eval:
        eval_set, eval_rows = tasks.build_examples(task, cfg, tokenizer, labels, "eval")
        if not eval_set:  # as for causal_lm: an empty data.eval is an error, not evaluation switched off
            raise InputError(f"eval data: {', '.join(str(s.path) for s in cfg.eval)}: no rows")
        reporter.log(f"eval: {len(eval_set):,} examples ({task})")
    rng = np.random.default_rng(seed)
    if cfg.eval_split:
        order = rng.permutation(len(train))
        n_eval = max(1, round(len(train) * cfg.eval_split))
        if n_eval >= len(train):
            raise InputError(f"data.eval_split {cfg.eval_split} leaves no training examples ({len(train)} in all)")
        eval_set = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
    weighted, in_train = [], {id(e) for e in train}
    for part, spec in zip(parts, cfg.train, strict=True):
        kept = [e for e in part if id(e) in in_train]
        whole, frac = int(spec.weight), spec.weight - int(spec.weight)
        weighted += kept * whole
        if frac:
            weighted += [kept[i] for i in sorted(rng.choice(len(kept), size=round(frac * len(kept)), replace=False))]
    train = tasks.TaskExamples(weighted)
    if eval_set is not None:
        eval_set = tasks.TaskExamples(eval_set)
    if not train:
        raise InputError("train data: no examples")
    stats = {"train": _task_stats(train, rows)}
    if eval_set is not None:
        stats["eval"] = _task_stats(eval_set, eval_rows)
    return Data(train, eval_set, stats, {"train": train} | ({"eval": eval_set} if eval_set is not None else {}))
