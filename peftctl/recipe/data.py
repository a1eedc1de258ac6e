"""The `data` section: sources (files, folders, globs, hub datasets) and how rows become tokens."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from peftctl.data.formats import FORMAT_FIELDS, ROLES
from peftctl.recipe.fields import PATH, SOURCE, Section, aka

FormatName = Literal[tuple(FORMAT_FIELDS)]  # type: ignore[valid-type]  # the names formats.py defines


def _columns_problem(fmt: str, columns: dict[str, str] | None) -> str | None:
    unknown = [k for k in columns or {} if k not in FORMAT_FIELDS[fmt]]
    if not unknown:
        return None
    close = difflib.get_close_matches(unknown[0], FORMAT_FIELDS[fmt], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; its fields: {', '.join(FORMAT_FIELDS[fmt])}"
    return f"format {fmt!r} has no field {unknown[0]!r}{hint}"


def _roles_problem(roles: dict[str, str] | None) -> str | None:
    bad = [v for v in (roles or {}).values() if v not in ROLES]
    return f"roles map onto {', '.join(ROLES)}, not {bad[0]!r}" if bad else None


class DataSource(Section):
    path: str = Field(
        description=(
            "A data file (.jsonl, .json, .csv, .parquet, .txt), a folder of such files, a glob "
            "(data/*.jsonl), a folder written by datasets' save_to_disk, or a hub dataset id (needs "
            "the hub, or its datasets cache with HF_HUB_OFFLINE=1)."
        ),
        json_schema_extra=aka(axolotl="path", **SOURCE),
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Share in the training mix: each row is used `weight` times per epoch (2: twice; 0.5: a "
            "seeded random half). Eval data uses every row once."
        ),
    )
    split: str | None = Field(
        default=None,
        description="Split of a hub dataset or a save_to_disk DatasetDict (default: train).",
        json_schema_extra=aka(axolotl="split"),
    )
    subset: str | None = Field(
        default=None,
        description="Configuration (subset) name of a hub dataset.",
        json_schema_extra=aka(axolotl="name"),
    )
    format: FormatName | None = Field(default=None, description="This source's format (default: data.format).")
    columns: dict[str, str] | None = Field(default=None, description="This source's column names (default: data.columns).")
    roles: dict[str, str] | None = Field(default=None, description="This source's role names (default: data.roles).")


def _as_sources(value: Any) -> Any:
    # A single path (or mapping) is shorthand for a list of one source; a path item for {path: ...}.
    if isinstance(value, str | dict):
        value = [value]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


Sources = Annotated[list[DataSource], BeforeValidator(_as_sources), Field(min_length=1)]


class DataSection(Section):
    train: Sources = Field(
        description=(
            "Training data: one source (a path, glob, folder or hub id) or a list of sources, each a "
            "path or a mapping {path, weight, split, subset, format, columns, roles}. Several sources "
            "are mixed by weight."
        ),
        json_schema_extra=aka(axolotl="datasets", **SOURCE),
    )
    eval: Sources | None = Field(
        default=None,
        description="Evaluation data, given like `train`.",
        json_schema_extra=aka(axolotl="test_datasets", **SOURCE),
    )
    eval_split: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Hold out this fraction of the training examples for evaluation (instead of `eval`).",
        json_schema_extra=aka(axolotl="val_set_size", llamafactory="val_size"),
    )
    format: FormatName = Field(
        default="chat",
        description=(
            "Row format. text: {text}; completion: {prompt, completion}; alpaca: {instruction, "
            "input?, output, system?} (both as plain text, prompt then response then EOS, or, when "
            "chat_template is set, as a user turn and an assistant turn of that template); chat: "
            "{messages: [{role, content, weight?}, ...]} with an optional system turn, rendered with "
            "the chat template (an assistant message with weight 0 carries no loss); sharegpt: "
            "{conversations: [{from, value}, ...]} with roles mapped (human: user, gpt: assistant, "
            "...); preference: {prompt, chosen, rejected} as strings or message lists (with "
            "train.objective sft trained on the chosen response; with dpo, ipo, orpo or simpo on the "
            "pair); classification: {text, label} (label a string or an integer): for model.task "
            "seq_cls, {text, text_pair?, label} read by the classification head (one label id per row); "
            "for causal_lm, the text, a newline, then the label as the response (exact match is then "
            "accuracy); token_classification (model.task token_cls only): {tokens, tags}, lists of equal "
            "length (CoNLL style), a word's tag the label of its first sub-token. seq2seq_lm reads "
            "completion, alpaca, chat and sharegpt as source -> target."
        ),
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Column names, {format field: column}, e.g. {prompt: question, completion: answer}; chat "
            "and sharegpt also map the message keys and the row's tool definitions: {messages: dialog, role: "
            "from, content: value, tools: functions}."
        ),
    )
    roles: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Role names in the data mapped onto system, user, assistant, tool, e.g. {human: user, "
            "bot: assistant}; added to the format's own (sharegpt: human, gpt, observation, "
            "function_call)."
        ),
    )
    chat_template: str | None = Field(
        default=None,
        description=(
            "Chat template: unset uses the tokenizer's (for chat, sharegpt and conversational "
            "preference rows); a name (chatml, llama3, zephyr, mistral, gemma, phi3) or an inline "
            "Jinja template overrides it, and then renders completion and alpaca rows too. The "
            "template used is saved with the adapter's tokenizer."
        ),
        json_schema_extra=aka(axolotl="chat_template", llamafactory="template"),
    )
    max_length: int = Field(
        default=1024,
        ge=8,
        description="Most tokens per example (and per packed sequence).",
        json_schema_extra=aka(axolotl="sequence_len", llamafactory="cutoff_len"),
    )
    truncation: Literal["truncate", "drop"] = Field(
        default="truncate",
        description=(
            "Examples longer than max_length: truncate (cut the end) or drop them. Either is counted "
            "in `peftctl data --stats` and the run's summary. A preference pair is cut as one: its prompt "
            "loses its first tokens (the same in both sequences) so that both answers stay whole; a pair "
            "whose answers alone do not fit is dropped."
        ),
    )
    train_on: Literal["assistant", "all", "last"] = Field(
        default="assistant",
        description=(
            "Which tokens carry loss. assistant: the responses (every assistant turn of a chat; the "
            "completion, output or label; the chosen response); last: only the last assistant turn; "
            "all: every token, prompts included."
        ),
    )
    packing: bool = Field(
        default=False,
        description=(
            "Pack several training examples into each sequence of up to max_length tokens. They do not "
            "attend to each other (a block-diagonal mask, or variable-length flash attention) and "
            "their positions restart; `train.batch_size` then counts packed sequences."
        ),
        json_schema_extra=aka(axolotl="sample_packing", llamafactory="neat_packing"),
    )
    text_sample_by: Literal["line", "paragraph", "document"] = Field(
        default="line", description="Rows of a .txt file: each non-empty line, each paragraph, or the whole file."
    )
    cache: bool = Field(
        default=True,
        description=(
            "Keep tokenized data in the cache, keyed by the data files' content, the tokenizer, the "
            "template and the options above; any change rebuilds it (`peftctl prepare` builds it ahead)."
        ),
    )
    cache_dir: str | None = Field(
        default=None,
        description="Folder of the tokenized-data cache. Unset: $PEFTCTL_CACHE/data, else ~/.cache/peftctl/data.",
        json_schema_extra=aka(axolotl="dataset_prepared_path", **PATH),
    )

    @field_serializer("train", "eval")
    def _compact(self, value: list[DataSource] | None) -> Any:
        if value is None:
            return None
        items = [s.path if s == DataSource(path=s.path) else s.model_dump(exclude_defaults=True) for s in value]
        return items[0] if len(items) == 1 and isinstance(items[0], str) else items

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        if "format" in info.data and (p := _columns_problem(info.data["format"], value)):
            raise ValueError(p)
        return value

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        if (p := _roles_problem(value)):
            raise ValueError(p)
        return value

    @model_validator(mode="after")
    def _source_columns_and_roles(self):
        problems = []
        for split in ("train", "eval"):
            for i, s in enumerate(getattr(self, split) or []):
                if s.columns is not None or s.format is not None:
                    cols = s.columns if s.columns is not None else self.columns
                    if (p := _columns_problem(s.format or self.format, cols)):
                        problems.append(f"{split}.{i}.columns: {p}")
                if (p := _roles_problem(s.roles)):
                    problems.append(f"{split}.{i}.roles: {p}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


