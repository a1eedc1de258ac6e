"""`Recipe`, the whole schema: the sections (`peftctl.sections`' model section, `data.py`, `train.py`,
the small ones here, and the adapter configs of `peftctl.adapters`, one schema with the Python API), the checks across
sections, and how to walk the schema from a dotted key to the class or field that holds it (for
"did you mean", path fields and the docs).
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from peftctl.adapters.registry import config_classes
from peftctl.data.formats import TASK_FORMATS
from peftctl.errors import Problem
from peftctl.recipe.data import DataSection
from peftctl.recipe.fields import PATH, Section, aka, training_argument
from peftctl.recipe.origin import Key, locate
from peftctl.recipe.train import TrainSection
from peftctl.sections import TASK_METRICS, TASK_TYPES, ModelSection, reported_metrics


class TrackingSection(Section):
    tensorboard: bool = Field(
        default=False,
        description="Write TensorBoard event files to RUN_DIR/tensorboard (needs `tensorboard`).",
        json_schema_extra=aka(axolotl="use_tensorboard"),
    )
    mlflow: bool = Field(
        default=False,
        description="Log params and metrics to MLflow (needs `mlflow` or `mlflow-skinny`).",
        json_schema_extra=aka(axolotl="use_mlflow"),
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI. Unset: a local file store in RUN_DIR/mlruns (works offline).",
        json_schema_extra=aka(axolotl="mlflow_tracking_uri"),
    )
    mlflow_experiment: str = Field(
        default="peftctl",
        description="MLflow experiment name.",
        json_schema_extra=aka(axolotl="mlflow_experiment_name"),
    )
    wandb: bool = Field(
        default=False,
        description=(
            "Log params and metrics to Weights & Biases (needs `wandb`), files in RUN_DIR/wandb; a resumed "
            "run continues the same W&B run."
        ),
    )
    wandb_project: str = Field(
        default="peftctl", description="W&B project.", json_schema_extra=aka(axolotl="wandb_project"),
    )
    wandb_entity: str | None = Field(
        default=None, description="W&B entity (user or team); unset: the account's default.",
        json_schema_extra=aka(axolotl="wandb_entity"),
    )
    wandb_mode: Literal["auto", "online", "offline"] = Field(
        default="auto",
        description=(
            "online: sync to the W&B server as the run goes; offline: write the run's files only (upload "
            "later with `wandb sync RUN_DIR/wandb/offline-run-*`); auto: online when an API key is set "
            "(WANDB_API_KEY or `wandb login`) and the server answers within 3 seconds, else offline "
            "(WANDB_MODE, when set, decides)."
        ),
        json_schema_extra=aka(axolotl="wandb_mode"),
    )
    run_name: str | None = Field(
        default=None,
        description="Run name for the trackers; unset: the run folder's name.",
        json_schema_extra=training_argument("run_name", axolotl="wandb_name"),
    )


class EvalSection(Section):
    batch_size: int = Field(
        default=8,
        ge=1,
        description="Examples per batch in evaluation.",
        json_schema_extra=training_argument("per_device_eval_batch_size", axolotl="eval_batch_size"),
    )
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
        json_schema_extra=training_argument("output_dir", axolotl="output_dir", **PATH),
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


    # Where each value was given (file, lines, --set flags), for problems found after validation.
    _origin: Any = PrivateAttr(default=None)

    def problem(self, dotted: str, message: str) -> Problem:
        """A problem with field `dotted` (e.g. "data.train"), placed where the value was given: the
        recipe file and line, or the --set flag (checks after the schema's, such as `validate`'s)."""
        source, lines, overridden = self._origin or ("<recipe>", {}, {})
        key = tuple(int(p) if p.isdigit() else p for p in dotted.split(".")) if dotted else ()
        return locate(key, message, source, lines, overridden)

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("adapter"), dict):
            data = {**data, "adapter": {"method": "lora", **data["adapter"]}}
        return data

    @model_validator(mode="after")
    def _task_checks(self):
        # The adapter file records model.task's PEFT task type; the data formats and metrics fit the task.
        task = self.model.task_name
        objective = self.train.objective
        if objective != "sft" and task != "causal_lm":
            raise ValueError(f"train.objective {objective} trains a causal language model on preference pairs; "
                             f"model.task {task} cannot: use model.task causal_lm or train.objective sft")
        given = getattr(self.adapter, "task_type", None)
        if given is not None and str(getattr(given, "value", given)) != TASK_TYPES[task]:
            raise ValueError(f"adapter.task_type {getattr(given, 'value', given)} does not match model.task {task} "
                             f"({TASK_TYPES[task]}); set model.task, and leave adapter.task_type unset")
        if self.adapter.is_prompt_learning and task in ("seq_cls", "token_cls"):
            # PEFT's prompt methods train the classification head too (modules_to_save), and
            # put the virtual tokens before the labelled positions: not implemented here.
            raise ValueError(f"adapter.method {self.adapter.method} is not supported with model.task {task}: "
                             "prompt-learning methods train causal_lm and seq2seq_lm models here; use a "
                             "LoRA-family method for a classifier")
        if task != "causal_lm" and self.data.packing:
            raise ValueError(f"data.packing: model.task {task} trains on whole examples; packing is for causal_lm only")
        formats = {self.data.format} | {s.format for s in [*self.data.train, *(self.data.eval or [])] if s.format}
        if task == "causal_lm" and "token_classification" in formats:
            raise ValueError("data.format token_classification needs model.task: token_cls")
        if task != "causal_lm" and (wrong := sorted(formats - set(TASK_FORMATS[task]))):
            raise ValueError(f"data.format {wrong[0]!r} does not fit model.task {task}; use "
                             f"{' or '.join(TASK_FORMATS[task])}")
        metric = self.train.best_metric
        allowed = ("eval_loss", *TASK_METRICS[task], *reported_metrics(objective, self.train))
        if metric not in allowed:
            what = f"train.objective {objective}" if objective != "sft" else f"model.task {task}"
            raise ValueError(f"train.metric_for_best {self.train.metric_for_best!r}: {what} reports "
                             f"{', '.join(allowed)}")
        return self

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.data.eval is not None and self.data.eval_split is not None:
            raise ValueError("data: set eval or eval_split, not both")
        if self.data.eval is None and self.data.eval_split is None:
            # Options that act on evaluations: with no eval data the run evaluates nothing.
            t, fields = self.train, type(self.train).model_fields
            for name in ("metric_for_best", "greater_is_better", "load_best_at_end", "early_stopping_patience",
                         "early_stopping_threshold", "eval_every"):
                if getattr(t, name) != fields[name].default:
                    raise ValueError(f"train.{name} needs eval data: set data.eval or data.eval_split")
        if self.adapter.method == "prompt_tuning":
            for name in ("tokenizer_name_or_path", "tokenizer_kwargs"):
                if getattr(self.adapter, name) is not None:
                    raise ValueError(f"adapter.{name}: a recipe tokenizes prompt_tuning_init_text with the run's "
                                     "tokenizer (model.tokenizer, else the model's); leave it unset")
        if self.train.loraplus_lr_ratio is not None and self.adapter.method != "lora":
            raise ValueError(f"train.loraplus_lr_ratio (LoRA+) sets the learning rate of LoRA's B matrices; "
                             f"a {self.adapter.method} adapter has none")
        if self.train.objective != "sft":
            formats = {s.format or self.data.format for s in [*self.data.train, *(self.data.eval or [])]}
            if formats != {"preference"}:
                other = sorted(formats - {"preference"})[0]
                raise ValueError(f"train.objective {self.train.objective} trains on pairs: every data source needs "
                                 f"format preference ({{prompt, chosen, rejected}}), not {other}")
            if self.data.packing:
                raise ValueError(f"data.packing: train.objective {self.train.objective} batches whole pairs, "
                                 "which are not packed; set packing: false")
            if self.adapter.is_prompt_learning:
                # The pairs' log-probabilities (loss.token_losses) index the batch's own positions,
                # which a prompt-learning adapter's virtual tokens or cache would shift.
                raise ValueError(f"train.objective {self.train.objective}: preference training takes a LoRA-family "
                                 f"adapter; a {self.adapter.method} adapter is trained with objective sft")
            if self.train.init_adapter is not None and self.train.objective in ("dpo", "ipo") \
                    and not self.train.precompute_ref_log_probs:
                raise ValueError("train.init_adapter with dpo or ipo: the reference is the model the run starts "
                                 "from (base + that adapter), which is computed once before training; set "
                                 "train.precompute_ref_log_probs: true")
        if self.adapter.is_prompt_learning and self.data.packing:
            raise ValueError(f"data.packing: a {self.adapter.method} adapter puts its virtual tokens before each "
                             "sequence, and a packed row holds several; set data.packing: false")
        if self.adapter.method == "prefix_tuning" and (self.uses_gradient_checkpointing()
                                                       or self.train.memory_budget is not None):
            raise ValueError("prefix tuning's keys and values enter every layer through the cache, which a "
                             "checkpointed layer's recomputation would extend a second time (PEFT refuses it too); "
                             "set train.gradient_checkpointing: false and no train.memory_budget")
        return self

    def uses_gradient_checkpointing(self) -> bool:
        """train.gradient_checkpointing, or when unset: whether the base model is quantized."""
        if self.train.gradient_checkpointing is not None:
            return self.train.gradient_checkpointing
        if self.train.memory_budget is not None:
            return False  # decided by the budget at run time (train.budget)
        return self.model.quantization is not None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---- walking the schema ------------------------------------------------------------------------


def unwrap_model(annotation: Any, raw: Any) -> type[BaseModel] | None:
    """The BaseModel class a field holds (picking the adapter class by its `method`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin is Annotated:
        return unwrap_model(get_args(annotation)[0], raw)
    if origin is list:  # a list of sections (data sources): the model of its items
        return unwrap_model(get_args(annotation)[0], None)
    if origin in (Union, types.UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(raw, dict):
            method = raw.get("method", "lora")  # unset: the default method (`Recipe._default_method`)
            for m in models:
                if m.model_fields.get("method") and m.model_fields["method"].default == method:
                    return m
        return models[0] if len(models) == 1 else None
    return None


def model_at(path: Key, data: Any) -> type[BaseModel] | None:
    """The section class at dotted key `path` of the raw recipe `data` (None: not a section)."""
    model: type[BaseModel] | None = Recipe
    raw = data
    for part in path:
        if isinstance(part, int) and model is not None:
            continue  # an item of a list of sections: the same model
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        raw = raw.get(part) if isinstance(raw, dict) else None
        model = unwrap_model(model.model_fields[part].annotation, raw)
    return model


def field_at(key: Key, data: Any):
    """The pydantic FieldInfo of the field at dotted key `key` (which must name one)."""
    return model_at(key[:-1], data).model_fields[key[-1]]
