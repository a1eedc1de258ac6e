"""The recipe sections that rooms below the recipe take as input, and the base every section derives from.

`models` loads from a `ModelSection` (its `quantization` a `QuantizationSection`), and the adapter
core builds one for a base model it reads from a GGUF file (`AutoPeftModel`), so the model section
sits below both, as the adapters' configs sit in `adapters/`: `peftctl.recipe` composes them all
into one schema (the single source of truth; docs/recipe.md is generated from it) and re-exports
these names. Pydantic only: no torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from peftctl.constants import DTYPES

# A field holding a path (resolved against the recipe's folder, or the working directory for --set).
PATH = {"path": True}
# A dtype a recipe may name: one of constants.DTYPES, or auto (decided by the hardware).
DtypeName = Literal[("auto", *DTYPES)]  # type: ignore[valid-type]
# What a recipe trains (`model.task`) -> PEFT's task_type, which adapter_config.json records.
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq_lm": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS"}
TaskName = Literal[tuple(TASK_TYPES)]  # type: ignore[valid-type]
# The metrics each task's evaluations report besides eval_loss (higher is better for all).
TASK_METRICS = {"causal_lm": (), "seq2seq_lm": ("exact_match",), "seq_cls": ("accuracy", "f1"),
                "token_cls": ("accuracy", "f1")}
# TRL's metrics of each preference objective (`train.objective`; evaluations prefix them with eval_).
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected")
OBJECTIVE_METRICS = {"sft": (), "dpo": PREFERENCE_METRICS, "ipo": PREFERENCE_METRICS, "simpo": PREFERENCE_METRICS,
                     "orpo": (*PREFERENCE_METRICS, "log_odds_ratio", "log_odds_chosen")}


def reported_metrics(objective: str, train) -> tuple[str, ...]:
    """The preference metrics a run of `objective` reports (besides eval_loss): TRL's, and nll_loss
    when the loss has an NLL term (orpo; simpo with cpo_alpha; dpo or ipo with rpo_alpha)."""
    nll = objective == "orpo" or (objective == "simpo" and train.cpo_alpha > 0) or (
        objective in ("dpo", "ipo") and train.rpo_alpha > 0)
    return (*OBJECTIVE_METRICS[objective], *(("nll_loss",) if nll else ()))


# The tasks whose model gets a new head with one output per label (`model.labels`).
LABELLED_TASKS = ("seq_cls", "token_cls")


class Section(BaseModel):
    """A recipe section: unknown fields refused, frozen once validated."""

    # No field takes inf or NaN (YAML's .inf, .nan, or 1e400, which overflows to inf).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The tools whose names `aka` records (a field's name elsewhere when an option there means the same):
# key -> the name the documentation shows. `peftctl.recipe.foreign` reads them back as one table.
TOOLS = {"transformers": "transformers", "axolotl": "axolotl", "llamafactory": "LLaMA-Factory"}


def aka(*, transformers: str | None = None, axolotl: str | None = None, llamafactory: str | None = None,
        **extra: Any) -> dict[str, Any]:
    """`json_schema_extra` for a field that other tools call by these names (None: no option there
    means the same): transformers (`TrainingArguments`; for the model section `from_pretrained` and
    `BitsAndBytesConfig`), axolotl, LLaMA-Factory. `extra` adds other markers (`**PATH`)."""
    names = {"transformers": transformers, "axolotl": axolotl, "llamafactory": llamafactory}
    return {**extra, "also_known_as": {tool: name for tool, name in names.items() if name}}


def training_argument(name: str, *, axolotl: str | None = None, **extra: Any) -> dict[str, Any]:
    """A field that is transformers' `TrainingArguments.<name>`, which LLaMA-Factory takes as it is
    (its training arguments are transformers' own)."""
    return aka(transformers=name, axolotl=axolotl, llamafactory=name, **extra)


def also_known_as_of(extra: Any) -> dict[str, str]:
    """{tool: name} recorded in a field's `json_schema_extra` (empty when none)."""
    return dict(extra.get("also_known_as", {})) if isinstance(extra, dict) else {}


class QuantizationSection(Section):
    bits: Literal[4, 8] = Field(
        description=(
            "4: QLoRA, the base model's linear layers stored in 4 bits (bitsandbytes Linear4bit, about "
            "0.52 bytes per weight with double_quant); 8: LLM.int8 (Linear8bitLt, 1 byte per weight)."
        ),
        json_schema_extra=aka(llamafactory="quantization_bit"),
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4",
        description="4-bit only: the 4-bit data type. nf4 (NormalFloat, QLoRA's) suits normally distributed weights.",
        json_schema_extra=aka(transformers="bnb_4bit_quant_type", llamafactory="quantization_type"),
    )
    double_quant: bool = Field(
        default=True,
        description=(
            "4-bit only: quantize the per-block scales too (about 0.37 bits per weight less: 3 GB for a 65B "
            "model), at no measurable cost in quality."
        ),
        json_schema_extra=aka(transformers="bnb_4bit_use_double_quant",
                              llamafactory="double_quantization"),
    )
    compute_dtype: DtypeName = Field(
        default="auto",
        description=(
            "4-bit only: the dtype the quantized layers compute in (the 4-bit weight is dequantized to it "
            "for each matmul). auto: model.dtype as resolved."
        ),
        json_schema_extra=aka(transformers="bnb_4bit_compute_dtype"),
    )
    int8_threshold: float = Field(
        default=6.0,
        ge=0,
        description=(
            "8-bit only: activations larger than this in magnitude go through a float16 matmul (LLM.int8's "
            "outlier decomposition); 0 turns it off."
        ),
        json_schema_extra=aka(transformers="llm_int8_threshold"),
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
            "Base model: a built-in alias (smollm2-135m-instruct; all-minilm-l6-v2, an encoder for "
            "classification), a local transformers folder, a "
            ".gguf file, or a hub id (needs the hub or its cache)."
        ),
        json_schema_extra=aka(axolotl="base_model", llamafactory="model_name_or_path", **PATH),
    )
    task: TaskName | None = Field(
        default=None,
        description=(
            "What the model is trained to do, and so which transformers class loads it: causal_lm "
            "(AutoModelForCausalLM), seq2seq_lm (AutoModelForSeq2SeqLM: source -> target, e.g. T5), "
            "seq_cls (AutoModelForSequenceClassification: format classification) or token_cls "
            "(AutoModelForTokenClassification: format token_classification). adapter_config.json records "
            "PEFT's task_type (CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS); seq_cls and token_cls train "
            "the new head in full (classifier or score, in modules_to_save). Unset: causal_lm, and a note "
            "when the model's config implies another task."
        ),
    )
    labels: list[str] | None = Field(
        default=None,
        description=(
            "seq_cls and token_cls: the label names, in id order (id2label). Unset: the labels found in "
            "the training data, sorted (integer labels numerically). Integer labels in the data that are "
            "not among these names are ids into them (datasets' ClassLabel: labels [O, B-PER, I-PER] with "
            "tags 0, 1, 2). A run writes them here in its recipe.yaml, and a merged model has them in its config."
        ),
    )
    dtype: DtypeName = Field(
        default="auto",
        description=(
            "Dtype of the frozen base weights. auto: bfloat16 on a GPU that supports it, else "
            "float32. Adapter weights are kept in float32 and computed in the activations' dtype; "
            "training in float16 uses dynamic loss scaling."
        ),
        json_schema_extra=aka(transformers="dtype"),
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit).",
        json_schema_extra=aka(transformers="revision", axolotl="revision_of_model",
                              llamafactory="model_revision"),
    )
    tokenizer: str | None = Field(
        default=None,
        description="Tokenizer location, if not the model's own.",
        json_schema_extra=aka(axolotl="tokenizer_config", **PATH),
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow the model's own Python code from its folder or the hub to run.",
        json_schema_extra=aka(transformers="trust_remote_code", axolotl="trust_remote_code",
                              llamafactory="trust_remote_code"),
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow loading pickle weights (pytorch_model.bin). Off: only safetensors are read.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = Field(
        default=None,
        description="Attention kernel; unset lets transformers choose (SDPA when available).",
        json_schema_extra=aka(transformers="attn_implementation", llamafactory="flash_attn"),
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
        json_schema_extra=aka(transformers="quantization_config"),
    )

    @model_validator(mode="after")
    def _labels_of_the_task(self):
        if self.labels is not None:
            if self.task not in LABELLED_TASKS:
                raise ValueError(f"labels: only model.task seq_cls or token_cls has labels (task is {self.task})")
            if len(self.labels) < 1:
                raise ValueError("labels: give at least one label")
            if blank := [i for i, name in enumerate(self.labels) if not name.strip()]:
                raise ValueError(f"labels: label {blank[0]} is empty ({self.labels[blank[0]]!r}); give each a name")
            if dups := sorted({name for name in self.labels if self.labels.count(name) > 1}):
                raise ValueError(f"labels: {', '.join(map(repr, dups))} given more than once; give each label once")
        return self

    @property
    def task_name(self) -> str:
        """The task as run: `task`, or causal_lm when unset."""
        return self.task or "causal_lm"

