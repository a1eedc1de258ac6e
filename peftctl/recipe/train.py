"""The `train` section: steps, batches, the optimizer and schedule, checkpoints, evaluation, stopping."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from peftctl.recipe.fields import PATH, Section, aka, training_argument

# numpy's legacy seeding (np.random.seed, which transformers' and accelerate's set_seed call) takes
# 0 <= seed < 2**32; torch and random take more, so this range suits all three.
MAX_SEED = 2**32 - 1
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd")


def _gib_or_auto(value: Any) -> Any:
    """train.memory_budget: a positive finite number of GiB, or auto."""
    if value is None or value == "auto":
        return value
    number = value
    if isinstance(value, str):  # as pydantic reads numbers written as strings ("1e400" is one in YAML)
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise ValueError(f"must be a number of GiB or auto (got {value!r})")
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number (got {value!r})")
    if number <= 0:
        raise ValueError(f"must be > 0 (got {value!r})")
    return float(number)


# The preference options and the objectives that read them: one set to other than its default for
# another objective is refused (it would be silently ignored; a resolved recipe carries the defaults).
_OBJECTIVE_OPTIONS = {
    "beta": ("dpo", "ipo", "orpo", "simpo"),
    "label_smoothing": ("dpo", "simpo"),
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("simpo",),
    "rpo_alpha": ("dpo", "ipo"),
    "precompute_ref_log_probs": ("dpo", "ipo"),
}


class TrainSection(Section):
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=2**53,  # beyond any run; the learning-rate schedule computes with it in float64
        description="Optimizer steps. Unset: `epochs` passes over the data.",
        json_schema_extra=training_argument("max_steps", axolotl="max_steps"),
    )
    epochs: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,  # beyond any run (steps are counted from it in closed form, so no limit of time)
        description=(
            "Passes over the training data (used when max_steps is unset; default 1): every example is "
            "trained exactly this many times; the last step may be smaller."
        ),
        json_schema_extra=training_argument("num_train_epochs", axolotl="num_epochs"),
    )
    batch_size: int = Field(
        default=4,
        ge=1,
        description="Examples per micro-batch (per device).",
        json_schema_extra=training_argument("per_device_train_batch_size", axolotl="micro_batch_size"),
    )
    grad_accum: int = Field(
        default=1,
        ge=1,
        description=(
            "Micro-batches per optimizer step. The loss is normalised by the loss tokens of the whole "
            "step, so accumulating equals one large batch."
        ),
        json_schema_extra=training_argument("gradient_accumulation_steps",
                                            axolotl="gradient_accumulation_steps"),
    )
    lr: float = Field(
        default=2e-4,
        gt=0,
        description="Peak learning rate.",
        json_schema_extra=training_argument("learning_rate", axolotl="learning_rate"),
    )
    scheduler: Literal["constant", "linear", "cosine", "cosine_with_min_lr"] = Field(
        default="cosine",
        description=(
            "Learning-rate schedule after warmup. linear and cosine decay to 0 as the last step ends; "
            "cosine_with_min_lr decays to lr × min_lr_ratio; constant stays at lr."
        ),
        json_schema_extra=training_argument("lr_scheduler_type", axolotl="lr_scheduler"),
    )
    min_lr_ratio: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="For cosine_with_min_lr: the final lr as a fraction of lr.",
        json_schema_extra=aka(axolotl="cosine_min_lr_ratio"),
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        description="Steps of linear warmup from 0 to `lr`.",
        json_schema_extra=training_argument("warmup_steps", axolotl="warmup_steps"),
    )
    warmup_ratio: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Warmup as a fraction of the total steps (rounded up), instead of warmup_steps.",
        json_schema_extra=aka(axolotl="warmup_ratio", llamafactory="warmup_ratio"),
    )
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        default="adamw",
        description=(
            "adamw (torch, fused on GPU); adamw_8bit, paged_adamw_8bit, paged_adamw_32bit "
            "(bitsandbytes; paged ones fall back to unpaged on CPU); adafactor (transformers', with the "
            "recipe's lr); sgd."
        ),
        json_schema_extra=training_argument("optim", axolotl="optimizer"),
    )
    weight_decay: float = Field(
        default=0.0,
        ge=0,
        description="Decoupled weight decay; never applied to biases and norm weights.",
        json_schema_extra=training_argument("weight_decay", axolotl="weight_decay"),
    )
    adam_beta1: float = Field(
        default=0.9,
        ge=0,
        lt=1,
        description="AdamW beta1.",
        json_schema_extra=training_argument("adam_beta1", axolotl="adam_beta1"),
    )
    adam_beta2: float = Field(
        default=0.999,
        ge=0,
        lt=1,
        description="AdamW beta2.",
        json_schema_extra=training_argument("adam_beta2", axolotl="adam_beta2"),
    )
    adam_epsilon: float = Field(
        default=1e-8,
        gt=0,
        description="AdamW epsilon.",
        json_schema_extra=training_argument("adam_epsilon", axolotl="adam_epsilon"),
    )
    momentum: float = Field(default=0.0, ge=0, lt=1, description="SGD momentum.")
    loraplus_lr_ratio: float | None = Field(
        default=None,
        gt=0,
        description=(
            "LoRA+: the B matrices (lora_B, lora_embedding_B) learn at lr × this ratio (the paper "
            "suggests 16); unset: one lr for all."
        ),
        json_schema_extra=aka(axolotl="loraplus_lr_ratio", llamafactory="loraplus_lr_ratio"),
    )
    max_grad_norm: float | None = Field(
        default=1.0,
        gt=0,
        description="Clip the gradient norm to this value; unset: no clipping.",
        json_schema_extra=training_argument("max_grad_norm", axolotl="max_grad_norm"),
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description=(
            "Recompute each layer's activations in the backward pass: much less memory, about 30% slower. "
            "Unset: on when the base model is quantized (model.quantization), off otherwise."
        ),
        json_schema_extra=aka(transformers="gradient_checkpointing", axolotl="gradient_checkpointing"),
    )
    memory_budget: Annotated[float | Literal["auto"] | None, BeforeValidator(_gib_or_auto)] = Field(
        default=None,
        description=(
            "GiB of device memory the run may use, or auto (the GPU's memory less 5% and 1 GiB). From "
            "the memory estimate, the run checkpoints as few decoder layers as fit (the first ones) and, "
            "when even all do not, keeps their inputs in pinned host memory (copies overlapped with "
            "compute); the choice is in the dry run and summary.json (memory_plan). Replaces "
            "gradient_checkpointing (set one of them). Unset: gradient_checkpointing decides."
        ),
    )
    kernels: bool | Literal["auto"] = Field(
        default="auto",
        description=(
            "Fused forward and backward for Llama-family blocks (RMSNorm, the LoRA SwiGLU MLP, q/k/v "
            "with one shared A matmul, RoPE; Triton kernels on a GPU) and a fused cross-entropy: less "
            "memory and time, the same function. auto: on with a CUDA GPU; true: also on other devices "
            "(plain PyTorch versions of the same functions); false: the model's own modules."
        ),
    )
    seed: int = Field(
        default=42,
        ge=0,
        le=MAX_SEED,
        description="Seed for adapter init, data order and dropout (0 to 2**32 - 1, as numpy takes).",
        json_schema_extra=training_argument("seed", axolotl="seed"),
    )
    log_every: int = Field(
        default=10,
        ge=1,
        description="Write a metrics line every N steps.",
        json_schema_extra=training_argument("logging_steps", axolotl="logging_steps"),
    )
    eval_every: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate on the eval data every N steps (and at the end).",
        json_schema_extra=training_argument("eval_steps", axolotl="eval_steps"),
    )
    save_every: int | None = Field(
        default=500,
        ge=1,
        description=(
            "Write a checkpoint (adapter, optimizer, scheduler, RNG states, data position) every N "
            "steps and at the end, under RUN_DIR/checkpoints/step-NNNNNN. Unset: no checkpoints "
            "(a signal still writes one)."
        ),
        json_schema_extra=training_argument("save_steps", axolotl="save_steps"),
    )
    keep_checkpoints: int = Field(
        default=2,
        ge=1,
        description="Keep the last N step checkpoints (the best one is kept besides).",
        json_schema_extra=training_argument("save_total_limit", axolotl="save_total_limit"),
    )
    early_stopping_patience: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Stop when metric_for_best (default eval_loss; accuracy, f1 or exact_match for the tasks that "
            "have them) has not improved, by more than early_stopping_threshold, for this many "
            "evaluations in a row; unset: never. Needs eval_every."
        ),
        json_schema_extra=aka(axolotl="early_stopping_patience", llamafactory="early_stopping_steps"),
    )
    early_stopping_threshold: float = Field(
        default=0.0, ge=0,
        description="A value of metric_for_best counts as better only when better by more than this.",
    )
    metric_for_best: str = Field(
        default="eval_loss",
        description=(
            "The evaluation metric that early stopping and load_best_at_end watch: eval_loss, or one of "
            "model.task's metrics: seq2seq_lm exact_match; seq_cls and token_cls accuracy, f1; or, with a "
            "preference train.objective, one of its TRL metrics: rewards/accuracies, rewards/margins, "
            "rewards/chosen, rewards/rejected, logps/chosen, logps/rejected (orpo also log_odds_ratio, "
            "log_odds_chosen; with an NLL term, nll_loss) (an eval_ prefix is accepted, as transformers "
            "writes them)."
        ),
        json_schema_extra=training_argument("metric_for_best_model"),
    )
    greater_is_better: bool | None = Field(
        default=None,
        description=("Whether a larger metric_for_best is better. Unset: false for eval_loss and the preference "
                     "metrics of the rejected answers (rewards/rejected, logps/rejected), true for the others."),
        json_schema_extra=training_argument("greater_is_better"),
    )
    load_best_at_end: bool = Field(
        default=False,
        description=("Save the adapter of the best evaluation (metric_for_best: lowest eval_loss by default) as "
                     "the run's adapter, not the last."),
        json_schema_extra=training_argument("load_best_model_at_end", axolotl="load_best_model_at_end"),
    )
    skip_nonfinite_steps: int = Field(
        default=0,
        ge=0,
        description=(
            "Steps whose loss or gradient is NaN or inf may be skipped (no update) this many times; "
            "one more stops the run as diverged. 0: the first one stops it."
        ),
    )

    objective: Literal["sft", "dpo", "ipo", "orpo", "simpo"] = Field(
        default="sft",
        description=(
            "What the run optimises. sft: the cross-entropy of the loss tokens. dpo, ipo, orpo, simpo: a "
            "preference loss on pairs (data.format: preference), with TRL's formulas (DPOTrainer's sigmoid "
            "and ipo, ORPOTrainer, CPOTrainer's simpo); dpo and ipo compare with the reference, the same "
            "model the run starts from (README, Preference training)."
        ),
        json_schema_extra=aka(axolotl="rl", llamafactory="pref_loss"),
    )
    beta: float = Field(
        default=0.1,
        gt=0,
        description=(
            "TRL's beta: dpo's and simpo's inverse temperature, ipo's regularisation (tau), orpo's weight "
            "of the odds-ratio term (lambda)."
        ),
        json_schema_extra=aka(axolotl="rl_beta", llamafactory="pref_beta"),
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="dpo and simpo: the probability that a pair's labels are flipped (conservative DPO); TRL's name.",
        json_schema_extra=aka(axolotl="dpo_label_smoothing"),
    )
    simpo_gamma: float = Field(
        default=0.5, description="simpo: the target reward margin gamma (TRL's name).",
        json_schema_extra=aka(axolotl="simpo_gamma", llamafactory="simpo_gamma"),
    )
    cpo_alpha: float = Field(
        default=0.0,
        ge=0,
        description=(
            "simpo: weight of the chosen answers' cross-entropy added to the loss (TRL's name; 0 is SimPO as "
            "published, TRL's CPOConfig defaults to 1)."
        ),
        json_schema_extra=aka(axolotl="cpo_alpha"),
    )
    rpo_alpha: float = Field(
        default=0.0,
        ge=0,
        description=(
            "dpo and ipo: weight of the chosen answers' mean token cross-entropy added to the loss (RPO, Pang et "
            "al. 2024; TRL's rpo_alpha, in TRL 1.x loss_type [sigmoid, sft] with loss_weights [1, rpo_alpha]). "
            "Keeps the chosen answers likely while the pair's margin grows."
        ),
        json_schema_extra=aka(axolotl="rpo_alpha", llamafactory="pref_ftx"),
    )
    precompute_ref_log_probs: bool = Field(
        default=False,
        description=(
            "dpo and ipo: compute the reference log-probabilities of every pair once, before the first "
            "step, instead of a second forward in every step: kept in the data cache (a later run with the "
            "same data, model and init_adapter reuses them) and in the run folder (read back on resume)."
        ),
        json_schema_extra=aka(axolotl="precompute_ref_log_probs"),
    )

    init_adapter: str | None = Field(
        default=None,
        description=(
            "Start from the adapter saved in this folder (a run folder, or any PEFT adapter folder) instead of "
            "a fresh one: its weights are loaded into the recipe's adapter, whose `adapter` section must "
            "describe the same adapter (method, rank, targets). For dpo and ipo the reference is then the "
            "model with this adapter (precompute_ref_log_probs)."
        ),
        json_schema_extra=aka(axolotl="lora_model_dir", llamafactory="adapter_name_or_path", **PATH),
    )

    @property
    def best_metric(self) -> str:
        """metric_for_best as evaluations name it: eval_loss, or the metric's own name (accuracy, ...)."""
        name = self.metric_for_best
        return name if name == "eval_loss" else name.removeprefix("eval_")

    @property
    def best_is_greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return self.best_metric not in ("eval_loss", "nll_loss") and not self.best_metric.endswith("/rejected")

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        if self.warmup_steps and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("train.early_stopping_patience needs train.eval_every")
        for name, objectives in _OBJECTIVE_OPTIONS.items():
            if getattr(self, name) != type(self).model_fields[name].default and self.objective not in objectives:
                raise ValueError(f"train.{name} applies to objective {' or '.join(objectives)}, not "
                                 f"{self.objective}: remove it or set train.objective")
        if self.memory_budget is not None and self.gradient_checkpointing is not None:
            raise ValueError("set train.memory_budget or train.gradient_checkpointing, not both (the budget "
                             "decides which layers are checkpointed)")
        return self
