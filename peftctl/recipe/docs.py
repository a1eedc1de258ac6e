"""The recipe reference (docs/recipe.md, `peftctl schema`), generated from the schema: every section,
field, type, default and description, and each field's names in other tools (`foreign.py`)."""

from __future__ import annotations

import inspect
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from peftctl.adapters.registry import config_classes
from peftctl.recipe.fields import TOOLS
from peftctl.recipe.foreign import also_known_as
from peftctl.recipe.schema import Recipe, unwrap_model
from peftctl.recipe.yamlfile import EXTENSION_PREFIX, MAX_DEPTH, MAX_VALUES


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
    tools = " / ".join(TOOLS.values())
    out = [
        "# Recipe reference",
        "",
        "Generated from the schema in `peftctl/recipe/` and `peftctl/sections.py` by `peftctl schema`. Do not",
        "edit by hand.",
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
        f"The last column gives the name in {tools} of the option that means the same",
        "there (`-`: none does). For transformers that is `TrainingArguments` (which LLaMA-Factory takes",
        "as it is), and for `model` `from_pretrained` and `BitsAndBytesConfig`. Values may be spelled",
        "differently there (optimizer and attention names, lists as comma-separated strings).",
        "",
    ]
    for name, field in Recipe.model_fields.items():
        out += [f"## `{name}`", "", field.description or "", ""]
        sub = unwrap_model(field.annotation, None)
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
            # Sections inside this one (model.quantization; data sources, listed): their own table.
            for fname, f in model.model_fields.items():
                if not (inner := unwrap_model(f.annotation, None)):
                    continue
                if get_origin(f.annotation) is list:
                    out += [f"### `{name}.{fname}` items: `{inner.__name__}`", ""]
                    out += ["A plain string is short for `{path: ...}`.", ""] + _field_table(inner)
                else:
                    out += [f"### `{name}.{fname}`: `{inner.__name__}`", ""] + _field_table(inner)
    return "\n".join(out)


def _field_table(model: type[BaseModel]) -> list[str]:
    tools = " / ".join(TOOLS.values())
    out = [f"| field | type | default | meaning | {tools} |", "|---|---|---|---|---|"]
    for fname, f in model.model_fields.items():
        default = "required" if f.is_required() else (
            "(computed)" if f.default_factory is not None else repr(f.default)
        )
        desc = (f.description or "").replace("|", "\\|")
        type_name = _type_name(f.annotation).replace("|", "\\|")
        names = also_known_as(model, fname)
        elsewhere = " / ".join(f"`{names[t]}`" if t in names else "-" for t in TOOLS) if names else ""
        out.append(f"| `{fname}` | {type_name} | {default} | {desc} | {elsewhere} |")
    return out + [""]
