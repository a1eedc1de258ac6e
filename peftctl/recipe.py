"""The recipe: its schema (the one source of truth for every option and its documentation), YAML
loading with line numbers, `--set a.b=v` overrides, and path resolution.

Relative paths: a path written in a recipe file resolves against that file's folder, so a recipe
runs the same from any working directory; a path given on the command line (`--set`) resolves
against the current directory, as a shell user expects. Fields that hold paths say so in their
schema (`json_schema_extra={"path": True}`).
"""

from __future__ import annotations

import difflib
import inspect
import os
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from peftctl.adapters.registry import METHODS, config_classes
from peftctl.data.formats import FORMAT_FIELDS, ROLES
from peftctl.errors import Problem, RecipeError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PATH = {"path": True}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantizationSection(Section):
    bits: Literal[4, 8] = Field(
        description=(
            "4: QLoRA, the base model's linear layers stored in 4 bits (bitsandbytes Linear4bit, about "
            "0.52 bytes per weight with double_quant); 8: LLM.int8 (Linear8bitLt, 1 byte per weight)."
        ),
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4",
        description="4-bit only: the 4-bit data type. nf4 (NormalFloat, QLoRA's) suits normally distributed weights.",
    )
    double_quant: bool = Field(
        default=True,
        description=(
            "4-bit only: quantize the per-block scales too (about 0.37 bits per weight less: 3 GB for a 65B "
            "model), at no measurable cost in quality."
        ),
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "4-bit only: the dtype the quantized layers compute in (the 4-bit weight is dequantized to it "
            "for each matmul). auto: model.dtype as resolved."
        ),
    )
    int8_threshold: float = Field(
        default=6.0,
        ge=0,
        description=(
            "8-bit only: activations larger than this in magnitude go through a float16 matmul (LLM.int8's "
            "outlier decomposition); 0 turns it off."
        ),
    )

    @model_validator(mode="after")
    def _fields_of_the_other_width(self):
        # A value other than the default for the other width is a mistake worth saying (defaults are
        # written out in a run's resolved recipe, so their presence alone is not).
        other = ("quant_type", "double_quant", "compute_dtype") if self.bits == 8 else ("int8_threshold",)
        given = [f for f in other if getattr(self, f) != type(self).model_fields[f].default]
        if given:
            which = "4" if self.bits == 8 else "8"
            raise ValueError(f"{', '.join(given)} applies to bits: {which}, and this is bits: {self.bits}")
        return self


class ModelSection(Section):
    name_or_path: str = Field(
        default="smollm2-135m-instruct",
        description=(
            "Base model: a built-in alias (smollm2-135m-instruct), a local transformers folder, a "
            ".gguf file, or a hub id (needs the hub or its cache)."
        ),
        json_schema_extra=PATH,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "Dtype of the frozen base weights. auto: bfloat16 on a GPU that supports it, else "
            "float32. Adapter weights are kept in float32 and computed in the activations' dtype; "
            "training in float16 uses dynamic loss scaling."
        ),
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(
        default=None, description="Tokenizer location, if not the model's own.", json_schema_extra=PATH
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow the model's own Python code from its folder or the hub to run."
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow loading pickle weights (pytorch_model.bin). Off: only safetensors are read.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = Field(
        default=None, description="Attention kernel; unset lets transformers choose (SDPA when available)."
    )
    cache_dir: str | None = Field(
        default=None,
        description=(
            "Where built-in models (and .gguf bases to quantize) are converted and kept. Unset: "
            "$PEFTCTL_CACHE, else ~/.cache/peftctl."
        ),
        json_schema_extra=PATH,
    )
    quantization: QuantizationSection | None = Field(
        default=None,
        description=(
            "Load the base model's linear layers quantized by bitsandbytes (`{bits: 4}` is QLoRA) and "
            "train the adapter over them. The output head, the embeddings and the norms stay unquantized "
            "in model.dtype, and nothing is copied to float32 but the adapter weights (with their "
            "gradients and optimizer state), which are float32 always: unlike PEFT's "
            "prepare_model_for_kbit_training, which upcasts every unquantized weight (2 GB more for an 8B "
            "Llama 3) and with them the activations. The norms already compute in float32 internally. "
            "Unset: not quantized. On a GPU the weights are quantized as they load onto it."
        ),
    )


FormatName = Literal[tuple(FORMAT_FIELDS)]  # type: ignore[valid-type]  # the names formats.py defines
SOURCE = {"path": "source"}  # a path, glob or folder (resolved like a path) or a hub dataset id (kept)


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
        json_schema_extra=SOURCE,
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Share in the training mix: each row is used `weight` times per epoch (2: twice; 0.5: a "
            "seeded random half). Eval data uses every row once."
        ),
    )
    split: str | None = Field(default=None, description="Split of a hub dataset or a save_to_disk DatasetDict (default: train).")
    subset: str | None = Field(default=None, description="Configuration (subset) name of a hub dataset.")
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
        json_schema_extra=SOURCE,
    )
    eval: Sources | None = Field(
        default=None, description="Evaluation data, given like `train`.", json_schema_extra=SOURCE
    )
    eval_split: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Hold out this fraction of the training examples for evaluation (instead of `eval`).",
    )
    format: FormatName = Field(
        default="chat",
        description=(
            "Row format. text: {text}; completion: {prompt, completion}; alpaca: {instruction, "
            "input?, output}; chat: {messages: [{role, content}, ...]} with an optional system turn, "
            "rendered with the chat template; sharegpt: {conversations: [{from, value}, ...]} with "
            "roles mapped (human: user, gpt: assistant, ...); preference: {prompt, chosen, rejected} as "
            "strings or message lists (trained on the chosen response; the rejected one is tokenized "
            "alongside); classification: {text, label}: the text, a newline, then the label as the "
            "response (exact match is then accuracy)."
        ),
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Column names, {format field: column}, e.g. {prompt: question, completion: answer}; chat "
            "and sharegpt also map the message keys: {messages: dialog, role: from, content: value}."
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
            "Chat template: unset uses the tokenizer's; a name (chatml, llama3, zephyr, mistral, "
            "gemma, phi3) or an inline Jinja template overrides it. The template used is saved with "
            "the adapter's tokenizer."
        ),
    )
    max_length: int = Field(default=1024, ge=8, description="Most tokens per example (and per packed sequence).")
    truncation: Literal["truncate", "drop"] = Field(
        default="truncate",
        description=(
            "Examples longer than max_length: truncate (cut the end) or drop them. Either is counted "
            "in `peftctl data --stats` and the run's summary."
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
        json_schema_extra=PATH,
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


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd")


class TrainSection(Section):
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps. Unset: `epochs` passes over the data."
    )
    epochs: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Passes over the training data (used when max_steps is unset; default 1): every example is "
            "trained exactly this many times; the last step may be smaller."
        ),
    )
    batch_size: int = Field(default=4, ge=1, description="Examples per micro-batch (per device).")
    grad_accum: int = Field(
        default=1,
        ge=1,
        description=(
            "Micro-batches per optimizer step. The loss is normalised by the loss tokens of the whole "
            "step, so accumulating equals one large batch."
        ),
    )
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["constant", "linear", "cosine", "cosine_with_min_lr"] = Field(
        default="cosine",
        description=(
            "Learning-rate schedule after warmup. linear and cosine decay to 0 as the last step ends; "
            "cosine_with_min_lr decays to lr × min_lr_ratio; constant stays at lr."
        ),
    )
    min_lr_ratio: float = Field(
        default=0.1, ge=0, lt=1, description="For cosine_with_min_lr: the final lr as a fraction of lr."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Steps of linear warmup from 0 to `lr`.")
    warmup_ratio: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Warmup as a fraction of the total steps (rounded up), instead of warmup_steps.",
    )
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        default="adamw",
        description=(
            "adamw (torch, fused on GPU); adamw_8bit, paged_adamw_8bit, paged_adamw_32bit "
            "(bitsandbytes; paged ones fall back to unpaged on CPU); adafactor (transformers', with the "
            "recipe's lr); sgd."
        ),
    )
    weight_decay: float = Field(
        default=0.0, ge=0, description="Decoupled weight decay; never applied to biases and norm weights."
    )
    adam_beta1: float = Field(default=0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(default=0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    momentum: float = Field(default=0.0, ge=0, lt=1, description="SGD momentum.")
    loraplus_lr_ratio: float | None = Field(
        default=None,
        gt=0,
        description=(
            "LoRA+: the B matrices (lora_B, lora_embedding_B) learn at lr × this ratio (the paper "
            "suggests 16); unset: one lr for all."
        ),
    )
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the gradient norm to this value; unset: no clipping."
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description=(
            "Recompute each layer's activations in the backward pass: much less memory, about 30% slower. "
            "Unset: on when the base model is quantized (model.quantization), off otherwise."
        ),
    )
    seed: int = Field(default=42, description="Seed for adapter init, data order and dropout.")
    log_every: int = Field(default=10, ge=1, description="Write a metrics line every N steps.")
    eval_every: int | None = Field(
        default=None, ge=1, description="Evaluate on the eval data every N steps (and at the end)."
    )
    save_every: int | None = Field(
        default=500,
        ge=1,
        description=(
            "Write a checkpoint (adapter, optimizer, scheduler, RNG states, data position) every N "
            "steps and at the end, under RUN_DIR/checkpoints/step-NNNNNN. Unset: no checkpoints "
            "(a signal still writes one)."
        ),
    )
    keep_checkpoints: int = Field(
        default=2, ge=1, description="Keep the last N step checkpoints (the best one is kept besides)."
    )
    early_stopping_patience: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Stop when eval_loss has not improved for this many evaluations in a row; unset: never. "
            "Needs eval_every."
        ),
    )
    early_stopping_threshold: float = Field(
        default=0.0, ge=0, description="An eval_loss counts as better only when lower by more than this."
    )
    load_best_at_end: bool = Field(
        default=False,
        description="Save the adapter of the best evaluation (lowest eval_loss) as the run's adapter, not the last.",
    )
    skip_nonfinite_steps: int = Field(
        default=0,
        ge=0,
        description=(
            "Steps whose loss or gradient is NaN or inf may be skipped (no update) this many times; "
            "one more stops the run as diverged. 0: the first one stops it."
        ),
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        if self.warmup_steps and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("train.early_stopping_patience needs train.eval_every")
        return self


class TrackingSection(Section):
    tensorboard: bool = Field(
        default=False, description="Write TensorBoard event files to RUN_DIR/tensorboard (needs `tensorboard`)."
    )
    mlflow: bool = Field(default=False, description="Log params and metrics to MLflow (needs `mlflow` or `mlflow-skinny`).")
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI. Unset: a local file store in RUN_DIR/mlruns (works offline).",
    )
    mlflow_experiment: str = Field(default="peftctl", description="MLflow experiment name.")
    run_name: str | None = Field(default=None, description="Run name for the trackers; unset: the run folder's name.")


class EvalSection(Section):
    batch_size: int = Field(default=8, ge=1, description="Examples per batch in evaluation.")
    max_new_tokens: int = Field(
        default=64, ge=1, description="Longest generated answer when scoring exact match."
    )
    exact_match: bool = Field(
        default=True,
        description="Score greedy generations against the reference answers (data with responses).",
    )
    max_examples: int | None = Field(
        default=None, ge=1, description="Evaluate on at most this many examples (the first ones)."
    )


class OutputSection(Section):
    dir: str = Field(
        description=(
            "Run folder. Must not exist or be empty (nothing in it is ever overwritten), unless the run "
            "resumes from one of its checkpoints (`peftctl train --resume`)."
        ),
        json_schema_extra=PATH,
    )


def _adapter_type() -> Any:
    classes = tuple(config_classes())
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="method")]  # noqa: UP007


class Recipe(Section):
    """A complete, validated run description."""

    model: ModelSection = Field(default_factory=ModelSection, description="The base model.")
    adapter: _adapter_type() = Field(  # type: ignore[valid-type]
        default_factory=lambda: config_classes()[0](),
        description="The adapter: `method` and that method's options, with PEFT's field names.",
    )
    data: DataSection = Field(description="Training and evaluation data.")
    train: TrainSection = Field(default_factory=TrainSection, description="The training loop.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Evaluation (`peftctl eval`).")
    tracking: TrackingSection = Field(
        default_factory=TrackingSection, description="Experiment trackers besides metrics.jsonl."
    )
    output: OutputSection = Field(description="Where the run writes.")

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("adapter"), dict):
            data = {**data, "adapter": {"method": "lora", **data["adapter"]}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.data.eval is not None and self.data.eval_split is not None:
            raise ValueError("data: set eval or eval_split, not both")
        if self.train.eval_every is not None and self.data.eval is None and self.data.eval_split is None:
            raise ValueError("train.eval_every needs eval data: set data.eval or data.eval_split")
        return self

    def uses_gradient_checkpointing(self) -> bool:
        """train.gradient_checkpointing, or when unset: whether the base model is quantized."""
        if self.train.gradient_checkpointing is not None:
            return self.train.gradient_checkpointing
        return self.model.quantization is not None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---- YAML with line numbers ----------------------------------------------------------------

Key = tuple[str | int, ...]


def _construct(node: yaml.Node, path: Key, lines: dict[Key, int], problems: list[Problem], source: str):
    """Build plain Python data from a composed YAML node, recording each value's line.

    Scalars are built by PyYAML's SafeLoader constructors: no tags beyond plain data.
    """
    lines[path] = node.start_mark.line + 1
    dotted_here = ".".join(str(p) for p in path)
    plain = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}
    if type(node) in plain and node.tag != plain[type(node)]:
        problems.append(Problem(source, lines[path], dotted_here, f"unsupported YAML tag {node.tag}"))
        return None
    if isinstance(node, yaml.ScalarNode):
        try:
            return _scalar(node)
        except yaml.YAMLError as e:
            problems.append(Problem(source, lines[path], dotted_here, f"unsupported YAML: {e.problem}"))
            return None
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            if not isinstance(key, str):
                key = str(key)
            dotted = ".".join(str(p) for p in (*path, key))
            if key in out:
                problems.append(Problem(source, key_node.start_mark.line + 1, dotted, "duplicate key"))
            out[key] = _construct(value_node, (*path, key), lines, problems, source)
            lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(n, (*path, i), lines, problems, source) for i, n in enumerate(node.value)]
    return None


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[Key, int], list[Problem]]:
    problems: list[Problem] = []
    lines: dict[Key, int] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        msg = f"YAML syntax error: {e.problem or e.context}"
        return None, lines, [Problem(source, line, "", msg)]
    if node is None:
        return {}, lines, problems
    return _construct(node, (), lines, problems, source), lines, problems


# ---- overrides -----------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: take it as a plain string
    return key.split("."), value


def _set_dotted(data: dict, parts: list[str], value: Any) -> str | None:
    cur = data
    for i, part in enumerate(parts[:-1]):
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            return f"{'.'.join(parts[: i + 1])} is not a section"
        cur = nxt
    cur[parts[-1]] = value
    return None


# ---- schema walking (did-you-mean, path fields, docs) -----------------------------------------


def _unwrap_model(annotation: Any, raw: Any) -> type[BaseModel] | None:
    """The BaseModel class a field holds (picking the adapter class by its `method`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap_model(get_args(annotation)[0], raw)
    if origin is list:  # a list of sections (data sources): the model of its items
        return _unwrap_model(get_args(annotation)[0], None)
    if origin in (Union, types.UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(raw, dict) and "method" in raw:
            for m in models:
                if m.model_fields.get("method") and m.model_fields["method"].default == raw["method"]:
                    return m
        return models[0] if len(models) == 1 else None
    return None


def _model_at(path: Key, data: Any) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    raw = data
    for part in path:
        if isinstance(part, int) and model is not None:
            continue  # an item of a list of sections: the same model
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        raw = raw.get(part) if isinstance(raw, dict) else None
        model = _unwrap_model(model.model_fields[part].annotation, raw)
    return model


def _path_fields(model: type[BaseModel], raw: Any, prefix: Key = ()):
    """Yield the dotted keys of fields marked as paths that hold a value in `raw`."""
    if not isinstance(raw, dict):
        return
    for name, field in model.model_fields.items():
        if name not in raw:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("path"):
            yield (*prefix, name)
        sub = _unwrap_model(field.annotation, raw[name])
        if sub is not None:
            yield from _path_fields(sub, raw[name], (*prefix, name))


def _resolve_path(value: str, base: Path, must_exist_to_resolve: bool) -> str:
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return str(p)
    candidate = (base / p).resolve()
    if must_exist_to_resolve and not candidate.exists():
        return value  # a hub id or alias, not a path
    return str(candidate)


# Fields whose value may be a path or a name (a hub id or alias): they resolve to a path only
# when that path exists.
_PATH_OR_NAME = {("model", "name_or_path"), ("model", "tokenizer")}


# ---- errors --------------------------------------------------------------------------------


def _message(err: dict[str, Any], path: Key, data: Any) -> str:
    t = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    if t == "missing":
        return "required field is missing"
    if t == "extra_forbidden":
        parent = _model_at(path[:-1], data)
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(path[-1]), list(parent.model_fields), n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean '{close[0]}'?"
            else:
                hint = "; known fields: " + ", ".join(parent.model_fields)
        return f"unknown field{hint}"
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if t in bounds:
        bound = next(iter(ctx.values()))
        return f"must be {bounds[t]} {bound}{got_s}"
    if t == "literal_error":
        return f"must be one of {ctx.get('expected', '')}{got_s}"
    if t in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer{got_s}"
    if t in ("float_type", "float_parsing"):
        return f"must be a number{got_s}"
    if t in ("bool_type", "bool_parsing"):
        return f"must be true or false{got_s}"
    if t == "string_type":
        return f"must be a string{got_s}"
    if t in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of fields{got_s}"
    if t == "union_tag_invalid":
        return f"unknown adapter method {ctx.get('tag')!r}; known: {', '.join(METHODS)}"
    if t == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    msg = str(err["msg"])
    return msg[:1].lower() + msg[1:] + got_s


def _clean_loc(loc: tuple, data: Any, err_type: str) -> tuple[Key, str | None]:
    """Drop the discriminator tag from adapter locations; split off a union member label."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "adapter" and parts[1] in METHODS:
        del parts[1]
    clean: list[str | int] = []
    for i, part in enumerate(parts):
        model = _model_at(tuple(c for c in clean if isinstance(c, str)), data)
        known = model is not None and part in model.model_fields
        unknown_key = model is not None and i == len(parts) - 1 and err_type == "extra_forbidden"
        if isinstance(part, int) or known or unknown_key:
            clean.append(part)
            continue
        # A union member's label (e.g. "list[str]"): not part of the recipe's path.
        return tuple(clean), str(part)
    return tuple(clean), None


def _value_at(data: Any, path: Key) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _problems_from_validation(
    exc: ValidationError, data: Any, locate: Any
) -> list[Problem]:
    grouped: dict[Key, list[tuple[dict, str | None]]] = {}
    for err in exc.errors():
        path, member = _clean_loc(err["loc"], data, err["type"])
        grouped.setdefault(path, []).append((err, member))
    problems = []
    for path, errs in grouped.items():
        members = list(dict.fromkeys(m for _, m in errs if m))
        if all(m for _, m in errs) and len(members) > 1:
            got = _value_at(data, path)
            msg = f"must be {' or '.join(members)} (got {got!r})"
            problems.append(locate(path, msg))
            continue
        for err, _ in errs:
            problems.append(locate(path, _message(err, path, data)))
    return problems


# ---- loading -------------------------------------------------------------------------------


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, resolve and validate a recipe. Raises RecipeError with every problem."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(source, None, "", "recipe file not found")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([Problem(source, None, "", f"cannot read recipe: {e}")]) from None
    return loads(text, source=source, base_dir=path.resolve().parent, overrides=overrides)


def loads(
    text: str,
    *,
    source: str = "<recipe>",
    base_dir: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Recipe:
    data, lines, problems = _parse_yaml(text, source)
    if problems:
        raise RecipeError(problems)
    if data == {} and not text.strip():
        raise RecipeError([Problem(source, None, "", "recipe is empty")])
    if not isinstance(data, dict):
        raise RecipeError([Problem(source, 1, "", "a recipe must be a mapping of sections")])

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    # Resolve the file's own relative paths against its folder, before overrides replace any.
    _resolve_paths(data, base, keys_from=None)

    overridden: dict[Key, str] = {}
    for text_ in overrides:
        try:
            parts, value = _parse_override(text_)
        except ValueError as e:
            problems.append(Problem("--set", None, "", str(e)))
            continue
        err = _set_dotted(data, parts, value)
        if err:
            problems.append(Problem(f"--set {text_}", None, "", err))
            continue
        overridden[tuple(parts)] = text_
    _resolve_paths(data, Path.cwd(), keys_from=set(overridden))

    def locate(key: Key, message: str) -> Problem:
        dotted = ".".join(str(p) for p in key)
        for i in range(len(key), 0, -1):
            if key[:i] in overridden:
                return Problem(f"--set {overridden[key[:i]]}", None, dotted, message)
        for i in range(len(key), -1, -1):
            if key[:i] in lines:
                return Problem(source, lines[key[:i]], dotted, message)
        return Problem(source, None, dotted, message)

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems_from_validation(exc, data, locate))
        problems.sort(key=lambda p: (p.line is None, p.line or 0))
        raise RecipeError(problems) from None
    if problems:
        raise RecipeError(problems)
    return recipe


def _resolve_source(value: str, base: Path) -> str:
    """A data source: a path (existing, a glob, or named like a data file) resolves; a hub id stays."""
    from peftctl.data.sources import looks_like_path

    p = Path(os.path.expanduser(value))
    if p.is_absolute() or not ((base / p).exists() or looks_like_path(value)):
        return str(p) if p.is_absolute() else value
    return str((base / p).resolve())


def _resolve_paths(data: dict, base: Path, keys_from: set[Key] | None) -> None:
    for key in list(_path_fields(Recipe, data)):
        if keys_from is not None and not any(key[:i] in keys_from for i in range(1, len(key) + 1)):
            continue
        parent = data
        for part in key[:-1]:
            parent = parent[part]
        value = parent[key[-1]]
        if _field_at(key, data).json_schema_extra == SOURCE:
            # One source or a list of them, each a path string or a mapping with `path`.
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, str) and item:
                    items[i] = _resolve_source(item, base)
                elif isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
                    item["path"] = _resolve_source(item["path"], base)
            if not isinstance(value, list):
                parent[key[-1]] = items[0]
        elif isinstance(value, str) and value:
            parent[key[-1]] = _resolve_path(value, base, must_exist_to_resolve=key in _PATH_OR_NAME)


def _field_at(key: Key, data: Any):
    return _model_at(key[:-1], data).model_fields[key[-1]]


def from_dict(data: dict[str, Any], base_dir: str | os.PathLike | None = None) -> Recipe:
    """Validate a recipe given as Python data (paths resolve against base_dir or the cwd)."""
    return loads(yaml.safe_dump(data), source="<dict>", base_dir=base_dir)


# ---- documentation from the schema ------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin is dict:
        return f"dict[{', '.join(_type_name(a) for a in get_args(annotation))}]"
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(annotation) if a is not type(None))
    if origin is list:
        return f"list[{_type_name(get_args(annotation)[0])}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def reference_markdown() -> str:
    """The recipe reference, generated from the schema (docs/recipe.md is this text)."""
    out = [
        "# Recipe reference",
        "",
        "Generated from the schema in `peftctl/recipe.py` by `peftctl schema`. Do not edit by hand.",
        "",
        "Relative paths in a recipe file resolve against that file's folder; paths given with",
        "`--set` resolve against the current directory.",
        "",
    ]
    for name, field in Recipe.model_fields.items():
        out += [f"## `{name}`", "", field.description or "", ""]
        sub = _unwrap_model(field.annotation, None)
        models = [sub] if sub else []
        if name == "adapter":
            models = config_classes()
        for model in models:
            if name == "adapter":
                out += [f"### `method: {model.model_fields['method'].default}`", ""]
                doc = inspect.cleandoc(model.__doc__ or "")
                if doc:
                    out += [doc, ""]
            out += _field_table(model)
            # Sections listed inside this one (data sources): their own table.
            for fname, f in model.model_fields.items():
                if get_origin(f.annotation) is list and (item := _unwrap_model(f.annotation, None)):
                    out += [f"### `{name}.{fname}` items: `{item.__name__}`", ""]
                    out += ["A plain string is short for `{path: ...}`.", ""] + _field_table(item)
    return "\n".join(out)


def _field_table(model: type[BaseModel]) -> list[str]:
    out = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for fname, f in model.model_fields.items():
        default = "required" if f.is_required() else (
            "(computed)" if f.default_factory is not None else repr(f.default)
        )
        desc = (f.description or "").replace("|", "\\|")
        type_name = _type_name(f.annotation).replace("|", "\\|")
        out.append(f"| `{fname}` | {type_name} | {default} | {desc} |")
    return out + [""]

