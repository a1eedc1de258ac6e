"""Other tools' names for recipe fields: Hugging Face transformers, axolotl, LLaMA-Factory.

A recipe keeps its own names (`lr`, `grad_accum`, `save_every`, ...); each field records the name an
option of the same meaning has elsewhere (`fields.aka`, in the schema), and docs/recipe.md shows them.
Only options that mean the same are recorded; their values may be spelled differently.

The adapter sections are the adapter core's config classes, whose field names are PEFT's (and so
transformers' own); the adapter core knows nothing of recipe files, so what axolotl and
LLaMA-Factory call those fields is kept here, by method, and checked against the classes in tests.
"""

from __future__ import annotations

import difflib
import functools
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


# Names users bring from those tools whose option peftctl has in another form (the value differs, so
# they are no `aka`): name -> (the recipe's dotted field, how to write it there).
FAMILIAR_NAMES: dict[str, tuple[str, str]] = {
    "bf16": ("model.dtype", "model.dtype: bfloat16"),
    "fp16": ("model.dtype", "model.dtype: float16"),
    "load_in_4bit": ("model.quantization", "model.quantization: {bits: 4}"),
    "load_in_8bit": ("model.quantization", "model.quantization: {bits: 8}"),
    "lora_target_linear": ("adapter.target_modules", "adapter.target_modules: all-linear"),
    "train_on_inputs": ("data.train_on", "data.train_on: all (true) or assistant (false)"),
    "dataset": ("data.train", "data.train: a file, folder, glob or hub id"),
    "eval_dataset": ("data.eval", "data.eval: a file, folder, glob or hub id"),
    "max_seq_length": ("data.max_length", "data.max_length"),
    "report_to": ("tracking", "tracking.tensorboard: true (or mlflow, wandb)"),
}


@functools.cache
def _table() -> tuple[tuple[str, str, str], ...]:
    return tuple(foreign_name_table())


def _who(tools: list[str]) -> str:
    names = [f"{TOOLS[t]}'" if TOOLS[t].endswith("s") else f"{TOOLS[t]}'s" for t in dict.fromkeys(tools)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@functools.cache
def _own_fields() -> dict[str, list[str]]:
    """{field name: its dotted paths} for every field of every recipe section (the adapter: LoRA's)."""
    out: dict[str, list[str]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            out.setdefault(name, []).append(f"{prefix}{name}")
            inner = unwrap_model(field.annotation, None)
            if inner is not None and not _is_list(field.annotation):
                walk(inner, f"{prefix}{name}.")

    for section, field in Recipe.model_fields.items():
        walk(config_classes()[0] if section == "adapter" else unwrap_model(field.annotation, None), f"{section}.")
    return out


def _where(dotted: str, parent: str) -> str:
    section, _, name = dotted.rpartition(".")
    if section == parent:
        return f"'{name}'"
    return f"'{name}' in section {section} ({dotted})" if section else f"section {dotted}"


def familiar_hint(key: str, parent: str, parent_fields: list[str]) -> str | None:
    """A "did you mean" for an unknown recipe key `key` found in section `parent` (dotted, "" at the
    top; `parent_fields` its fields): another tool's name for a recipe field (transformers'
    `learning_rate`: `train.lr`), a name whose option peftctl spells differently (`bf16`:
    `model.dtype: bfloat16`), or a recipe field written in the wrong section (`lr` at the top).
    None when the key is none of those (the caller then matches misspellings of its own fields)."""
    table = _table()
    # a field of this very section first (lora_r in adapter: r), then any other
    # (not a field of this very section that its class lacks: lora_r under an IA3 adapter)
    exact = [(t, d) for t, f, d in table if f == key
             and (d.rpartition(".")[0] != parent or d.rpartition(".")[2] in parent_fields)]
    exact.sort(key=lambda td: td[1].rpartition(".")[0] != parent)
    if exact:
        dotted = exact[0][1]
        tools = [t for t, d in exact if d == dotted]
        return f"did you mean {_where(dotted, parent)}? ({key} is {_who(tools)} name for it)"
    if key in FAMILIAR_NAMES:
        dotted, how = FAMILIAR_NAMES[key]
        return f"did you mean {how}? ({key} is another tool's name: peftctl's is {_where(dotted, parent)})"
    own = [d for d in _own_fields().get(key, []) if d.rpartition(".")[0] != parent]
    if own:
        return f"did you mean {' or '.join(own)}? ({key} is a field of section {own[0].rpartition('.')[0]})"
    if difflib.get_close_matches(key, parent_fields, n=1, cutoff=0.6):
        return None  # a misspelling of this section's own field: the caller says which
    names = {f: d for _, f, d in table} | {f: d for f, (d, _) in FAMILIAR_NAMES.items()}
    names |= {n: ds[0] for n, ds in _own_fields().items() if len(ds) == 1}
    names = {f: d for f, d in names.items() if f != key
             and (d.rpartition(".")[0] != parent or d.rpartition(".")[2] in parent_fields)}
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.8)
    if close:
        return f"did you mean {_where(names[close[0]], parent)}? ({key} looks like {close[0]})"
    return None
