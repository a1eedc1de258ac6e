"""Reading a run folder (or any PEFT adapter folder) back: its recipe, base model and adapter.

Every file is read through `peftctl.userfiles` and checked before any model loads: a run folder
whose adapter_config.json, adapter weights (their safetensors header), recipe.yaml or summary.json
is not what it should be is an input error naming that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftctl.errors import InputError

SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"


@dataclass
class RunInfo:
    path: Path
    recipe: object | None  # the resolved recipe, when the folder is a peftctl run
    adapter_config: dict
    summary: dict | None

    @property
    def model_section(self):
        """The model section to load the base with: the run's own, else one from adapter_config
        (where the hub id peftctl records for a built-in model means that built-in)."""
        from peftctl import models
        from peftctl.recipe import ModelSection
        from peftctl.sections import TASK_TYPES

        if self.recipe is not None:
            return self.recipe.model
        base = self.adapter_config.get("base_model_name_or_path")
        if not base:
            raise InputError(f"{self.path}: adapter_config.json names no base model (base_model_name_or_path)")
        base = models.builtin_for_hub_id(base) or base
        # PEFT's task type says which model class the adapter was trained on (labels unknown: the
        # head's size comes from the base's config).
        task = {v: k for k, v in TASK_TYPES.items()}.get(str(self.adapter_config.get("task_type") or ""))
        return ModelSection(name_or_path=base, revision=self.adapter_config.get("revision"), task=task)


def check_adapter_files(path: Path) -> dict:
    """Check an adapter folder's files without loading a tensor: adapter_config.json must be a config
    peftctl implements and adapter_model.safetensors a complete safetensors file (its header is read).
    Returns the config as a dict. Errors are `BadFileError` naming the file."""
    from peftctl.adapters.config import CONFIG_NAME, WEIGHTS_NAME, read_config_file
    from peftctl.adapters.io import PICKLE_WEIGHTS_NAME
    from peftctl.userfiles import BadFileError, read_json, safetensors_keys

    read_config_file(path / CONFIG_NAME)
    adapter_config = read_json(path / CONFIG_NAME, "an adapter config")
    weights = path / WEIGHTS_NAME
    if not weights.exists() and (path / PICKLE_WEIGHTS_NAME).is_file():
        raise BadFileError(
            path / PICKLE_WEIGHTS_NAME,
            f"the adapter's weights are a pickle file, which can run code when loaded; peftctl reads "
            f"{WEIGHTS_NAME} only (convert it: torch.load(..., weights_only=True), then safetensors' save_file)",
        )
    safetensors_keys(weights)
    return adapter_config


def read_run(path: str | Path) -> RunInfo:
    from peftctl import recipe as recipe_lib
    from peftctl.adapters.config import CONFIG_NAME
    from peftctl.adapters.io import has_adapter

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a folder")
    if not has_adapter(path):
        raise InputError(f"{path}: no adapter here ({CONFIG_NAME} and adapter_model.safetensors)")
    adapter_config = check_adapter_files(path)
    recipe = recipe_lib.load(path / "recipe.yaml") if (path / "recipe.yaml").exists() else None
    return RunInfo(path, recipe, adapter_config, read_summary(path))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# What readers of summary.json format: each field, when present, must have its type (None allowed).
_SUMMARY_FIELDS = {
    "status": (lambda v: isinstance(v, str), "a string"),
    "steps": (_is_int, "an integer"),
    "max_steps": (_is_int, "an integer"),
    "tokens_seen": (_is_int, "an integer"),
    "peak_memory_bytes": (_is_int, "an integer"),
    "trainable_params": (_is_int, "an integer"),
    "train_loss": (_is_number, "a number"),
    "tokens_per_s": (_is_number, "a number"),
    "train_time_s": (_is_number, "a number"),
    "final_eval": (lambda v: isinstance(v, dict) and _is_number(v.get("eval_loss")), "an object with eval_loss"),
    "best_eval": (lambda v: isinstance(v, dict) and _is_number(v.get("eval_loss")) and _is_int(v.get("step")),
                  "an object with eval_loss and step"),
}


def read_summary(run_dir: str | Path) -> dict | None:
    """A run's summary.json (None when there is none); one that is not the summary peftctl writes
    (truncated, not an object, a field of the wrong type) is `BadFileError` naming it."""
    from peftctl.userfiles import BadFileError, read_json

    path = Path(run_dir) / SUMMARY_NAME
    if not path.exists():
        return None
    summary = read_json(path, "a run summary")
    for key, (ok, kind) in _SUMMARY_FIELDS.items():
        if summary.get(key) is not None and not ok(summary[key]):
            raise BadFileError(path, f"{key} must be {kind} (got {summary[key]!r:.60})")
    return summary


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order. Each is an object with an integer `step`, and
    numbers (or null) for loss, eval_loss and lr; anything else is `BadFileError` naming the file and
    line. A last line without its newline that is not JSON is skipped: the half line a killed run leaves."""
    from peftctl.userfiles import BadFileError, read_jsonl

    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise InputError(f"{run_dir}: no {METRICS_NAME} here (not a peftctl run folder)")
    records = []
    for n, record in read_jsonl(path, "a metrics file (JSON lines)", partial_last_line=True):
        if not _is_int(record.get("step")):
            raise BadFileError(path, f"line {n}: step must be an integer (got {record.get('step')!r:.60})")
        for key in ("loss", "eval_loss", "lr"):
            value = record.get(key)
            if value is not None and not _is_number(value):
                raise BadFileError(path, f"line {n}: {key} must be a number (got {value!r:.60})")
        records.append(record)
    return records


def load_tokenizer(run: RunInfo):
    """The run's own tokenizer when it saved one, else the base model's."""
    from peftctl import models

    spec = run.model_section
    if (run.path / "tokenizer_config.json").exists():
        spec = spec.model_copy(update={"tokenizer": str(run.path)})
    return models.load_tokenizer(spec)


def attach_saved_adapter(base, folder: str | Path, is_trainable: bool = False):
    """`base` with the adapter saved in `folder`; an adapter that does not fit is an input error."""
    from peftctl.adapters import PeftModel
    from peftctl.errors import PeftctlError

    try:
        return PeftModel.from_pretrained(base, folder, is_trainable=is_trainable)
    except PeftctlError:
        raise  # a bad file: the error names it
    except (ValueError, TypeError) as e:
        raise InputError(f"{folder}: {e}") from None
