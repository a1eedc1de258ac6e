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
    PrivateAttr,
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
    # No field takes inf or NaN (YAML's .inf, .nan, or 1e400, which overflows to inf).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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


# numpy's legacy seeding (np.random.seed, which transformers' and accelerate's set_seed call) takes
# 0 <= seed < 2**32; torch and random take more, so this range suits all three.
MAX_SEED = 2**32 - 1
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
    seed: int = Field(
        default=42,
        ge=0,
        le=MAX_SEED,
        description="Seed for adapter init, data order and dropout (0 to 2**32 - 1, as numpy takes).",
    )
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

    @field_validator("adapter")
    @classmethod
    def _causal_lm(cls, v: Any) -> Any:
        # Runs load the base with AutoModelForCausalLM; the adapter file records CAUSAL_LM.
        if getattr(v, "task_type", None) not in (None, "CAUSAL_LM"):
            raise ValueError(f"task_type: peftctl trains causal language models; set CAUSAL_LM or leave it "
                             f"unset (got {v.task_type})")
        return v

    # Where each value was given (file, lines, --set flags), for problems found after validation.
    _origin: Any = PrivateAttr(default=None)

    def problem(self, dotted: str, message: str) -> Problem:
        """A problem with field `dotted` (e.g. "data.train"), placed where the value was given: the
        recipe file and line, or the --set flag (checks after the schema's, such as `validate`'s)."""
        source, lines, overridden = self._origin or ("<recipe>", {}, {})
        key = tuple(int(p) if p.isdigit() else p for p in dotted.split(".")) if dotted else ()
        return _locate(key, message, source, lines, overridden)

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

# Limits on a recipe's YAML. A real recipe is a few hundred values at most, five levels deep; these
# are far beyond that, and low enough that hostile input is refused in well under a second (an
# "alias bomb", 7 levels of 9 aliases in a few hundred bytes, expands to 4.8 million values).
MAX_DEPTH = 64
MAX_VALUES = 100_000
# Top-level keys starting with this are not fields: they hold YAML anchors to reuse (`<<: *name`).
EXTENSION_PREFIX = "x-"

_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}
_SYNTAX = "YAML syntax error"


class _Refused(Exception):
    """Stops reading YAML at the first limit crossed; carries the one problem to report."""

    def __init__(self, line: int | None, path: Key, message: str):
        super().__init__(message)
        self.line, self.path, self.message = line, path, message


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than MAX_DEPTH while composing (PyYAML's
    composer recurses once per level: 5,000 levels would exhaust Python's stack)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(mark.line + 1, (), f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _dotted(path: Key) -> str:
    return ".".join(str(p) for p in path)


class _Builder:
    """Plain Python data from a composed YAML node graph, recording each value's line.

    Aliases are expanded (at most MAX_VALUES values in all, and an alias inside what it names is
    refused), merge keys (`<<: *anchor`, or a list of anchors) are applied with YAML's rules (the
    mapping's own keys win, then earlier merged mappings over later ones), and a merged value keeps
    the line where it is written. Scalars are built by PyYAML's SafeLoader constructors: no tags
    beyond plain data.
    """

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[Key, int] = {}
        self.problems: list[Problem] = []
        self.count = 0
        self.active: set[int] = set()  # the mappings and sequences being built (ids)
        self.loader = yaml.SafeLoader("")

    def problem(self, node: yaml.Node, path: Key, message: str) -> None:
        self.problems.append(Problem(self.source, node.start_mark.line + 1, _dotted(path), message))

    def tick(self, node: yaml.Node, path: Key) -> None:
        self.count += 1
        if self.count > MAX_VALUES:
            top = path[:1]
            raise _Refused(
                self.lines.get(top, node.start_mark.line + 1), top,
                f"more than {MAX_VALUES:,} values once YAML aliases are expanded (an alias repeats all "
                "it names); a recipe is far smaller",
            )

    def scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        finally:
            self.loader.recursive_objects.pop(node, None)
            self.loader.deep_construct = False

    def build(self, node: yaml.Node, path: Key, depth: int = 0) -> Any:
        self.lines[path] = node.start_mark.line + 1
        self.tick(node, path)
        if depth > MAX_DEPTH:  # nesting built up through aliases of aliases
            top = path[:1]
            raise _Refused(self.lines.get(top), top, f"nested deeper than {MAX_DEPTH} levels once YAML "
                           "aliases are expanded")
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.scalar(node)
            except yaml.YAMLError as e:
                self.problem(node, path, f"unsupported YAML: {getattr(e, 'problem', None) or e}")
                return None
        if node.tag != _PLAIN_TAGS.get(type(node)):
            self.problem(node, path, f"unsupported YAML tag {node.tag}")
            return None
        if id(node) in self.active:
            self.problem(node, path, "a YAML alias inside the value it names (a recursive alias)")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(n, (*path, i), depth + 1) for i, n in enumerate(node.value)]
            out: dict[str, Any] = {}
            for key, key_node, value_node in self.pairs(node, path):
                out[key] = self.build(value_node, (*path, key), depth + 1)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        finally:
            self.active.discard(id(node))

    def pairs(self, node: yaml.MappingNode, path: Key) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(key, key node, value node) of a mapping, merge keys applied."""
        own: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        merged: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            self.tick(key_node, path)
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in sources:
                    self.tick(src, path)
                    if not isinstance(src, yaml.MappingNode) or src.tag != _PLAIN_TAGS[yaml.MappingNode]:
                        self.problem(src, path, "a merge key (<<) takes a mapping or a list of mappings")
                    elif id(src) in self.active:
                        self.problem(src, path, "a YAML alias inside the value it names (a recursive alias)")
                    else:
                        self.active.add(id(src))
                        try:
                            for key, kn, vn in self.pairs(src, path):
                                merged.setdefault(key, (kn, vn))  # an earlier mapping wins
                        finally:
                            self.active.discard(id(src))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, path, "a key must be a plain name, not a list or mapping")
                continue
            try:
                key = self.scalar(key_node)
            except yaml.YAMLError as e:
                self.problem(key_node, path, f"unsupported YAML: {getattr(e, 'problem', None) or e}")
                continue
            key = key if isinstance(key, str) else str(key)
            if key in own:
                self.problem(key_node, (*path, key), "duplicate key")
            own[key] = (key_node, value_node)
        merged.update(own)  # the mapping's own keys win over merged ones
        return [(k, kn, vn) for k, (kn, vn) in merged.items()]


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[Key, int], list[Problem]]:
    """(data, {dotted key: line}, problems) of one YAML document, within the limits above."""
    builder = _Builder(source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}, []
        data = builder.build(node, ())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        return None, {}, [Problem(source, line, "", f"{_SYNTAX}: {e.problem or e.context}")]
    except yaml.YAMLError as e:  # a reader error (a control character), without a line
        return None, {}, [Problem(source, None, "", f"{_SYNTAX}: {e}")]
    except _Refused as e:
        return None, {}, [Problem(source, e.line, _dotted(e.path), e.message)]
    finally:
        loader.dispose()
        builder.loader.dispose()
    return data, builder.lines, builder.problems


# ---- overrides -----------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {text!r}: empty key")
    if not raw.strip():
        return key.split("."), None
    value, _, problems = _parse_yaml(raw, f"--set {text}")
    if problems and problems[0].message.startswith(_SYNTAX):
        value = raw  # not YAML: take it as a plain string
    elif problems:
        p = problems[0]
        raise ValueError(f"--set {text!r}: {_dotted((key, p.path) if p.path else (key,))}: {p.message}")
    return key.split("."), value


def _set_dotted(data: dict, parts: list[str], value: Any, created: set[Key]) -> str | None:
    """Set `data[a][b]... = value`; sections the override creates are added to `created`."""
    cur = data
    for i, part in enumerate(parts[:-1]):
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
            created.add(tuple(parts[: i + 1]))
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


def _absolute(path: Path) -> Path:
    """An absolute path, `..` folded, symlinks kept: a data file linked into a content-addressed
    store (the hub cache's blobs) keeps the name, and so the type, it was given under."""
    return Path(os.path.abspath(path))


def _resolve_path(value: str, base: Path, must_exist_to_resolve: bool) -> str:
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return str(p)
    candidate = _absolute(base / p)
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
    if t == "finite_number":
        return f"must be a finite number{got_s}"
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
    for name in [k for k in data if k.startswith(EXTENSION_PREFIX)]:
        del data[name]  # anchors to reuse elsewhere in the file, not fields

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    # Resolve the file's own relative paths against its folder, before overrides replace any.
    _resolve_paths(data, base, keys_from=None)

    # Which --set gave each key it set, and each section it created (a problem there is the flag's).
    overridden: dict[Key, str] = {}
    for text_ in overrides:
        try:
            parts, value = _parse_override(text_)
        except ValueError as e:
            problems.append(Problem("--set", None, "", str(e)))
            continue
        created: set[Key] = set()
        err = _set_dotted(data, parts, value, created)
        if err:
            problems.append(Problem(f"--set {text_}", None, "", err))
            continue
        overridden[tuple(parts)] = text_
        overridden.update({k: text_ for k in created if k not in overridden})
    _resolve_paths(data, Path.cwd(), keys_from=set(overridden))

    def locate(key: Key, message: str) -> Problem:
        return _locate(key, message, source, lines, overridden)

    huge = [locate(key, f"must be between -2**63 and 2**63 - 1, the integers torch and numpy hold (got {v})")
            for key, v in _huge_ints(data)]
    problems += huge
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        said = {p.path for p in huge}
        problems.extend(p for p in _problems_from_validation(exc, data, locate) if p.path not in said)
        problems.sort(key=lambda p: (p.line is None, p.line or 0))
        raise RecipeError(problems) from None
    if problems:
        raise RecipeError(problems)
    recipe._origin = (source, lines, overridden)
    return recipe


def _huge_ints(data: Any, key: Key = ()):
    """(key, value) of every integer beyond int64 anywhere in the data (torch and numpy overflow)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _huge_ints(v, (*key, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _huge_ints(v, (*key, i))
    elif isinstance(data, int) and not isinstance(data, bool) and not -(2**63) <= data < 2**63:
        yield key, data


def _locate(key: Key, message: str, source: str, lines: dict[Key, int], overridden: dict[Key, str]) -> Problem:
    """Place a problem about `key`: the --set that gave it (or created its section), else the line
    of the recipe file where it (or the nearest section holding it) is written."""
    dotted = _dotted(key)
    for i in range(len(key), 0, -1):
        if key[:i] in overridden:
            return Problem(f"--set {overridden[key[:i]]}", None, dotted, message)
    for i in range(len(key), -1, -1):
        if key[:i] in lines:
            return Problem(source, lines[key[:i]], dotted, message)
    return Problem(source, None, dotted, message)


def _resolve_source(value: str, base: Path) -> str:
    """A data source: a path (existing, a glob, or named like a data file) resolves; a hub id stays."""
    from peftctl.data.sources import looks_like_path

    p = Path(os.path.expanduser(value))
    if p.is_absolute() or not ((base / p).exists() or looks_like_path(value)):
        return str(p) if p.is_absolute() else value
    return str(_absolute(base / p))


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
        "YAML anchors, aliases and merge keys work (`<<: *name`, or `<<: [*a, *b]`: the mapping's own",
        f"keys win, then earlier merged mappings). Top-level keys starting with `{EXTENSION_PREFIX}` are not fields: they",
        "hold anchors to reuse, e.g. `x-defaults: &defaults {...}`. A recipe may nest at most",
        f"{MAX_DEPTH} levels and hold at most {MAX_VALUES:,} values once aliases are expanded; no float field takes",
        "inf or NaN, and no integer exceeds int64.",
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

