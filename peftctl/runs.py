"""Reading a run folder (or any PEFT adapter folder) back: its recipe, base model and adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peftctl.errors import InputError


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

        if self.recipe is not None:
            return self.recipe.model
        base = self.adapter_config.get("base_model_name_or_path")
        if not base:
            raise InputError(f"{self.path}: adapter_config.json names no base model (base_model_name_or_path)")
        base = models.builtin_for_hub_id(base) or base
        return ModelSection(name_or_path=base, revision=self.adapter_config.get("revision"))


def read_run(path: str | Path) -> RunInfo:
    from peftctl import recipe as recipe_lib
    from peftctl.adapters.config import CONFIG_NAME
    from peftctl.adapters.io import has_adapter

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a folder")
    if not has_adapter(path):
        raise InputError(f"{path}: no adapter here ({CONFIG_NAME} and adapter_model.safetensors)")
    try:
        adapter_config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path / CONFIG_NAME}: {e}") from None
    recipe = recipe_lib.load(path / "recipe.yaml") if (path / "recipe.yaml").exists() else None
    summary = None
    if (path / "summary.json").exists():
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    return RunInfo(path, recipe, adapter_config, summary)


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

    try:
        return PeftModel.from_pretrained(base, folder, is_trainable=is_trainable)
    except (ValueError, TypeError) as e:
        raise InputError(f"{folder}: {e}") from None
