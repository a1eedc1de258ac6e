"""Other tools' names for recipe fields: Hugging Face transformers, axolotl, LLaMA-Factory.

A recipe keeps its own names (`lr`, `grad_accum`, `save_every`, ...); each field records the name an
option of the same meaning has elsewhere (`fields.aka`, in the schema), and docs/recipe.md shows them.
Only options that mean the same are recorded; their values may be spelled differently.

The adapter sections are the adapter core's config classes, whose field names are PEFT's (and so
transformers' own); the adapter core knows nothing of recipe files, so what axolotl and
LLaMA-Factory call those fields is kept here, by method, and checked against the classes in tests.
"""

from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import BaseModel

from peftctl.adapters.registry import config_classes
from peftctl.recipe.fields import TOOLS, also_known_as_of
from peftctl.recipe.schema import Recipe, unwrap_model

# method -> field -> {tool: name}.
ADAPTER_ALSO_KNOWN_AS: dict[str, dict[str, dict[str, str]]] = {
    "lora": {
        "method": {"axolotl": "adapter", "llamafactory": "finetuning_type"},
        "target_modules": {"axolotl": "lora_target_modules", "llamafactory": "lora_target"},
        "layers_to_transform": {"axolotl": "peft_layers_to_transform"},
        "layers_pattern": {"axolotl": "peft_layers_pattern"},
        "modules_to_save": {"axolotl": "lora_modules_to_save", "llamafactory": "additional_target"},
        "r": {"axolotl": "lora_r", "llamafactory": "lora_rank"},
        "lora_alpha": {"axolotl": "lora_alpha", "llamafactory": "lora_alpha"},
        "lora_dropout": {"axolotl": "lora_dropout", "llamafactory": "lora_dropout"},
        "use_rslora": {"axolotl": "peft_use_rslora", "llamafactory": "use_rslora"},
        "use_dora": {"axolotl": "peft_use_dora", "llamafactory": "use_dora"},
        "fan_in_fan_out": {"axolotl": "lora_fan_in_fan_out"},
        "init_lora_weights": {"axolotl": "peft_init_lora_weights"},
    },
}


def also_known_as(model: type[BaseModel], name: str) -> dict[str, str]:
    """{tool: its name} for field `name` of `model`, a recipe section or an adapter config class
    (empty when no tool has an option of the same meaning). KeyError: `model` has no such field."""
    field = model.model_fields[name]
    method = model.model_fields.get("method")
    if method is not None and any(model is c for c in config_classes()):
        return dict(ADAPTER_ALSO_KNOWN_AS.get(method.default, {}).get(name, {}))
    return also_known_as_of(field.json_schema_extra)


def foreign_name_table() -> list[tuple[str, str, str]]:
    """(tool, its name, the recipe's dotted field) for every recorded name, in schema order. Fields
    of list items (a data source's `path`, `split`, `subset`) are left out: the tools nest them in
    lists too (axolotl's `datasets`), so they are no top-level names."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            for tool, foreign in also_known_as(model, name).items():
                rows.append((tool, foreign, f"{prefix}{name}"))
            inner = unwrap_model(field.annotation, None)
            if inner is not None and not _is_list(field.annotation):
                walk(inner, f"{prefix}{name}.")

    for section, field in Recipe.model_fields.items():
        for model in config_classes() if section == "adapter" else [unwrap_model(field.annotation, None)]:
            walk(model, f"{section}.")
    return rows


def foreign_names(tool: str) -> dict[str, str]:
    """{the tool's name: the recipe's dotted field} (e.g. "learning_rate" -> "train.lr") for one of
    `fields.TOOLS`. ValueError for another tool."""
    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; known: {', '.join(TOOLS)}")
    return {foreign: dotted for t, foreign, dotted in foreign_name_table() if t == tool}


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(_is_list(a) for a in get_args(annotation))
