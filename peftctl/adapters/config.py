"""What every adapter method's config shares, and the PEFT `adapter_config.json` mapping.

Config classes are pydantic models and import no torch: the recipe's `adapter` section validates
into them directly (one schema, two front doors: YAML and Python), and `peftctl validate` stays fast.
"""

from __future__ import annotations

import contextvars
import enum
import json
import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONFIG_NAME = "adapter_config.json"
# True while a config is built from a saved adapter_config.json (`from_peft_dict`): validators that
# only judge a new config (e.g. pattern keys that match no target) let a saved file through, as PEFT does.
READING_SAVED: contextvars.ContextVar[bool] = contextvars.ContextVar("peftctl_reading_saved", default=False)
WEIGHTS_NAME = "adapter_model.safetensors"


class TaskType(str, enum.Enum):
    """PEFT's task types. The value only decides which model class `AutoPeftModel` loads."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """PEFT's method names, as written to adapter_config.json's `peft_type`."""

    LORA = "LORA"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    ADALORA = "ADALORA"
    VERA = "VERA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"


def positive_ranks(v: dict[str, int]) -> dict[str, int]:
    """A rank_pattern's ranks are >= 1 (ValueError naming the key); shared by the methods with ranks."""
    bad = [k for k, r in v.items() if r < 1]
    if bad:
        raise ValueError(f"rank_pattern ranks must be >= 1 (got {v[bad[0]]} for {bad[0]!r})")
    return v


def regex_keys(v: dict[str, Any], field_name: str) -> dict[str, Any]:
    """Every key of a rank_pattern / alpha_pattern compiles as a regular expression (ValueError naming it)."""
    import re

    for key in v:
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{field_name} key {key!r} is not a valid regular expression: {e}") from None
    return v


class _ConfigCall(type(BaseModel)):
    """Checks the keyword arguments of a direct call, `LoraConfig(...)`, as PEFT's dataclasses do:
    an unknown name is a TypeError (with the closest field names); a PEFT option the method does not
    implement is a ValueError naming it, unless it holds the value that leaves it off; inert PEFT
    keys (`inert_peft_keys`) are accepted and dropped. A recipe's `adapter` section, validated as a
    nested model, does not pass through here and gets pydantic's errors with line numbers."""

    def __call__(cls, *args: Any, **data: Any):
        extra = [k for k in data if k not in cls.model_fields]
        if extra:
            import difflib

            refused = []
            for key in extra:
                value = data.pop(key)
                if key == "peft_type" and value not in (cls.peft_type, None):
                    refused.append(f"peft_type={value!r} (this is a {cls.peft_type} config)")
                elif key in cls.unsupported_peft_keys and value not in cls.unsupported_peft_keys[key]:
                    refused.append(f"{key}={value!r}")
                elif key in cls.warned_peft_keys:  # PEFT ignores it with a warning: so does peftctl
                    import warnings

                    warnings.warn(f"{cls.__name__}: {cls.warned_peft_keys[key]}", UserWarning, stacklevel=2)
                elif key not in cls.unsupported_peft_keys and key not in cls.inert_peft_keys:
                    close = difflib.get_close_matches(key, list(cls.model_fields), n=2)
                    raise TypeError(f"{cls.__name__} got an unexpected keyword argument {key!r}"
                                    + (f"; did you mean {' or '.join(close)}?" if close else ""))
            if refused:
                raise ValueError(f"{cls.__name__}: PEFT options peftctl does not implement: {', '.join(refused)}")
        return super().__call__(*args, **data)


class AdapterConfig(BaseModel, metaclass=_ConfigCall):
    """Fields shared by all methods. Subclasses set `method` (a Literal) and `peft_type`."""

    # No field takes inf or NaN (a scaling of inf would silently poison every output).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=True, allow_inf_nan=False)

    # The PEFT `peft_type` string written to adapter_config.json (e.g. "LORA").
    peft_type: ClassVar[str]
    # PEFT config keys this method does not implement, with the values that mean "off". An adapter
    # file carrying another value is refused on load, since ignoring it would change the numbers.
    unsupported_peft_keys: ClassVar[dict[str, tuple]] = {}
    # PEFT config keys a direct call may pass that change nothing, with the warning PEFT gives for them
    # (AdaLoRA's `r`); in a saved file they are inert.
    warned_peft_keys: ClassVar[dict[str, str]] = {}
    # PEFT config keys that change nothing here whatever their value: metadata (peft_version,
    # auto_mapping), runtime settings, and settings of features that are off (refused otherwise).
    inert_peft_keys: ClassVar[tuple[str, ...]] = ("peft_type", "auto_mapping", "peft_version", "runtime_config")
    # What the shared machinery needs to know about a method (see docs/ARCHITECTURE.md, "How to add a
    # method"). `prefix`: the start of the method's tensor names in a layer (PEFT's tuner prefix,
    # e.g. "lora_"), which groups a saved file's keys by module. `default_target_modules`: PEFT's
    # table of targets by model type for this method (None: PEFT's LoRA table, which most methods
    # share; `matching.DEFAULT_TARGETS`). `mixed_batches`: whether `adapter_names` (a different
    # adapter per row) works. `combination_types`: the `add_weighted_adapter` combination types (empty:
    # adapters of this method cannot be combined), `default_combination` the one `peftctl merge` uses.
    prefix: ClassVar[str] = ""
    default_target_modules: ClassVar[dict[str, list[str] | str] | None] = None
    mixed_batches: ClassVar[bool] = False
    combination_types: ClassVar[tuple[str, ...]] = ()
    default_combination: ClassVar[str | None] = None

    method: str = Field(description="Adapter method.")
    task_type: TaskType | None = Field(
        default=None,
        description=(
            "PEFT task type (CAUSAL_LM, SEQ_CLS, ...); recorded in adapter_config.json, where it tells "
            "PEFT's AutoPeftModel which model class to load. SEQ_CLS and TOKEN_CLS also train and save "
            "the model's head in full (modules named classifier or score), QUESTION_ANS its qa_outputs, "
            "as PEFT does. In a recipe it follows model.task (causal_lm: CAUSAL_LM, seq2seq_lm: "
            "SEQ_2_SEQ_LM, seq_cls: SEQ_CLS, token_cls: TOKEN_CLS): leave it unset; a value that differs "
            "is refused."
        ),
    )
    target_modules: list[str] | str | None = Field(
        default=None,
        description=(
            "Modules to adapt: a list of names (a name matches a module whose dotted path equals it, "
            "whatever layers_to_transform says, or ends with '.' + it), a regular expression string "
            "(full match against the dotted path), or 'all-linear' (every linear layer except the "
            "output head). Empty: PEFT's default for the model type (q_proj and v_proj for "
            "Llama-style models)."
        ),
    )
    exclude_modules: list[str] | str | None = Field(
        default=None,
        description="Modules never adapted, matched like target_modules (list or regex).",
    )
    modules_to_save: list[str] | None = Field(
        default=None,
        description=(
            "Modules trained in full and saved with the adapter (e.g. 'lm_head', 'score'): every "
            "module whose dotted path ends with a name (a plain suffix, as in PEFT: 'norm' also "
            "selects 'input_layernorm'). Each adapter gets its own copy; the original stays frozen."
        ),
    )
    inference_mode: bool = Field(
        default=False,
        description="Load the adapter frozen (PEFT's flag). Training sets it to false.",
    )
    base_model_name_or_path: str | None = Field(
        default=None, description="Base model the adapter was trained on (written on save)."
    )
    revision: str | None = Field(default=None, description="Base model revision (written on save).")

    @field_validator("target_modules", "exclude_modules", mode="before")
    @classmethod
    def _names_as_sorted_list(cls, v: Any) -> Any:
        # PEFT accepts sets; keep a stable, duplicate-free order so configs compare and save stably.
        if isinstance(v, set | frozenset | tuple | list):
            return sorted(set(v))
        return v

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _regex_compiles(cls, v: Any) -> Any:
        # A string is a regular expression (PEFT's re.fullmatch); one that does not compile is bad
        # input here, not an error when the model is matched.
        if isinstance(v, str) and v != "all-linear":
            import re

            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"invalid regular expression {v!r}: {e}") from None
        return v

    # ---- PEFT's adapter_config.json -------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json contents, in PEFT's field names (sorted on write)."""
        d = self.model_dump(mode="json", exclude={"method"})
        d["peft_type"] = self.peft_type
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """Build a config from an adapter_config.json written by peftctl or PEFT.

        PEFT writes many keys for features a method here may not implement; those are accepted
        only when they hold the value that leaves the feature off.
        """
        known = set(cls.model_fields) - {"method"}
        kwargs: dict[str, Any] = {}
        refused, unknown = [], []
        for key, value in d.items():
            if key in known:
                kwargs[key] = value
            elif key in cls.unsupported_peft_keys and value not in cls.unsupported_peft_keys[key]:
                refused.append(f"{key}={value!r}")
            elif key not in cls.unsupported_peft_keys and key not in cls.inert_peft_keys:
                unknown.append(key)
        if refused:
            raise ValueError(
                f"this {cls.peft_type} adapter uses options peftctl does not implement: "
                + ", ".join(refused)
            )
        if unknown:  # PEFT likewise warns about keys of a newer version and ignores them
            import warnings

            warnings.warn(f"adapter_config.json keys unknown to peftctl are ignored: {', '.join(unknown)}",
                          UserWarning, stacklevel=3)
        # A saved adapter: checks that only a new config needs (see `LoraConfig`) are skipped.
        token = READING_SAVED.set(True)
        try:
            return cls(**kwargs)
        finally:
            READING_SAVED.reset(token)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        from peftctl.fsio import atomic_write_text

        path = Path(save_directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_peft_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike,
                        subfolder: str | None = None) -> AdapterConfig:
        """The config in a local adapter folder (PEFT's hub keywords are not taken: TypeError).
        A missing or bad adapter_config.json is `BadFileError` (a ValueError) naming it."""
        path = pretrained_model_name_or_path
        folder = Path(path) / subfolder if subfolder else Path(path)
        return read_config_file(folder / CONFIG_NAME, cls)

    @property
    def is_prompt_learning(self) -> bool:
        return False

    # Fields that do not change what an adapter computes from its saved weights: metadata, training-
    # time randomness and schedules, and how fresh weights are drawn (the weights are loaded). Methods
    # add theirs (`weights_only_fields`); every name ending in "dropout" is one too.
    weights_only_fields: ClassVar[tuple[str, ...]] = (
        "task_type", "inference_mode", "base_model_name_or_path", "revision", "init_lora_weights",
        "init_weights", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
        "tokenizer_kwargs", "save_projection", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
        "orth_reg_weight", "total_step")

    def differences(self, other: AdapterConfig, unset_matches: bool = False) -> list[str]:
        """Why `other`'s saved weights would compute something else in an adapter of this config:
        ["FIELD: OTHER's value vs this one's", ...] in PEFT's names (empty: the same function). Two
        lists of target module names are compared as sets; LoRA inits that change the base model
        (PiSSA, OLoRA, ...) are compared too. `unset_matches`: a field this config leaves None (filled
        from the model type when the adapter is created, e.g. target_modules) matches any value."""
        if self.peft_type != other.peft_type:
            return [f"peft_type: {other.peft_type} vs {self.peft_type}"]
        mine, theirs = self.to_peft_dict(), other.to_peft_dict()
        out = []
        for key in sorted(set(mine) | set(theirs)):
            a, b = theirs.get(key), mine.get(key)
            if key.endswith("dropout") or (key in self.weights_only_fields and key != "init_lora_weights"):
                continue
            if unset_matches and b is None:
                continue
            if key == "init_lora_weights":  # only an init that rewrites the base weights matters
                a, b = (v if isinstance(v, str) and v != "gaussian" else True for v in (a, b))
            if isinstance(a, list | tuple) and isinstance(b, list | tuple):
                a, b = sorted(map(str, a)), sorted(map(str, b))
            if a != b:
                out.append(f"{key}: {theirs.get(key)!r} vs {mine.get(key)!r}")
        return out

    # ---- what a method may override -------------------------------------------------------
    def with_model_defaults(self, model_type: str | None) -> AdapterConfig:
        """The config with the defaults that depend on the model type filled in (PEFT's
        `_prepare_adapter_config`), as it is recorded when the adapter is created; ValueError when
        a needed default does not exist for `model_type`. Target modules are resolved separately
        (`default_target_modules`)."""
        return self

    def recorded(self, adapted: list[str]) -> AdapterConfig:
        """The config as adapter_config.json records it, once it adapted the modules at the dotted
        paths `adapted` (with `target_modules` already written out where it was all-linear or the
        default): a method rewrites what PEFT could not read back (IA3's feedforward_modules)."""
        return self

    def describe_module(self, module: str, tensors: dict[str, list[int]]) -> dict[str, Any]:
        """What `peftctl inspect ADAPTER_DIR` shows for one adapted module, from its saved tensors
        (`tensors`: name after the module path, e.g. "lora_A.weight", -> shape); e.g. LoRA's rank."""
        return {}


class LayerSelectionConfig(AdapterConfig):
    """The fields of the methods whose PEFT config selects layers by index (LoRA, AdaLoRA, VeRA,
    LoHa, LoKr; not IA3)."""

    layers_to_transform: int | list[int] | None = Field(
        default=None,
        description=(
            "Adapt only these layer indices (the number after layers_pattern, or after the first "
            "'<name>.<index>.' in the module path). Needs a list of target_modules or 'all-linear'; "
            "a target given as a module's full path is adapted whatever its layer (PEFT's rule)."
        ),
    )
    layers_pattern: str | list[str] | None = Field(
        default=None,
        description="Name of the layer list that layers_to_transform indexes (e.g. 'layers', 'h').",
    )

    @model_validator(mode="after")
    def _layer_selection_needs_names(self):
        regex = isinstance(self.target_modules, str) and self.target_modules != "all-linear"
        if regex and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be combined with a regex target_modules; put the layer "
                "indices in the regex instead"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (the indices to adapt)")
        return self


def read_config_file(path: str | os.PathLike, cls: type[AdapterConfig] | None = None) -> AdapterConfig:
    """The config in an adapter_config.json file, of class `cls` (None or AdapterConfig: any method).

    Raises `BadFileError` (a ValueError) naming the file when it is missing, unreadable, not a JSON
    object, of an unknown `peft_type`, or holds values the config refuses.
    """
    from pydantic import ValidationError

    from peftctl.adapters.registry import config_from_peft_dict
    from peftctl.userfiles import BadFileError, read_json

    d = read_json(path, "an adapter config")
    try:
        cfg = config_from_peft_dict(d)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise BadFileError(path, f"{where}: {err['msg']}{more}" if where else f"{err['msg']}{more}") from None
    except (ValueError, TypeError) as e:
        raise BadFileError(path, str(e)) from None
    if cls not in (None, AdapterConfig) and not isinstance(cfg, cls):
        raise BadFileError(path, f"holds a {d.get('peft_type')} adapter, not {cls.__name__}")
    return cfg


# PEFT's name for the base config class (`PeftConfig.from_pretrained(path).base_model_name_or_path`).
PeftConfig = AdapterConfig


# Defaults when target_modules is unset, by model type: PEFT 0.21's table
# (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), entry for entry; a test
# compares the two. A string entry is a regex over the whole module path.
LORA_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
