"""What every schema section shares: the `Section` base class and the markers a field's
`json_schema_extra` carries.

- `PATH`: the field holds a path; written in a recipe file it resolves against the file's folder,
  given with `--set` against the current directory (`paths.py`).
- `SOURCE`: a data source: a path, glob or folder (resolved like a path) or a hub dataset id (kept).
- `also_known_as`: the field's name in other tools where an option there means the same: Hugging
  Face transformers (`TrainingArguments`; for the `model` section `from_pretrained` and
  `BitsAndBytesConfig`), axolotl and LLaMA-Factory. docs/recipe.md shows them beside each field
  (`docs.py`), and `foreign.py` reads them back as one table.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

DTYPES = ("auto", "float32", "bfloat16", "float16")
PATH = {"path": True}
SOURCE = {"path": "source"}

# The tools whose names `also_known_as` records: key -> the name the documentation shows.
TOOLS = {"transformers": "transformers", "axolotl": "axolotl", "llamafactory": "LLaMA-Factory"}


class Section(BaseModel):
    # No field takes inf or NaN (YAML's .inf, .nan, or 1e400, which overflows to inf).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def aka(*, transformers: str | None = None, axolotl: str | None = None, llamafactory: str | None = None,
        **extra: Any) -> dict[str, Any]:
    """`json_schema_extra` for a field that other tools call by these names (None: no option there
    means the same); `extra` adds other markers (`**PATH`)."""
    names = {"transformers": transformers, "axolotl": axolotl, "llamafactory": llamafactory}
    return {**extra, "also_known_as": {tool: name for tool, name in names.items() if name}}


def training_argument(name: str, *, axolotl: str | None = None, **extra: Any) -> dict[str, Any]:
    """A field that is transformers' `TrainingArguments.<name>`, which LLaMA-Factory takes as it is
    (its training arguments are transformers' own)."""
    return aka(transformers=name, axolotl=axolotl, llamafactory=name, **extra)


def also_known_as_of(extra: Any) -> dict[str, str]:
    """{tool: name} recorded in a field's `json_schema_extra` (empty when none)."""
    return dict(extra.get("also_known_as", {})) if isinstance(extra, dict) else {}
