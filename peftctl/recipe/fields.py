"""What every schema section shares: the `Section` base class and the markers a field's
`json_schema_extra` carries (defined in `peftctl.sections`, below the recipe, with the model section
that rooms below the recipe take as input; `SOURCE` here).

- `PATH`: the field holds a path; written in a recipe file it resolves against the file's folder,
  given with `--set` against the current directory (`paths.py`).
- `SOURCE`: a data source: a path, glob or folder (resolved like a path) or a hub dataset id (kept).
- `also_known_as`: the field's name in other tools where an option there means the same: Hugging
  Face transformers (`TrainingArguments`; for the `model` section `from_pretrained` and
  `BitsAndBytesConfig`), axolotl and LLaMA-Factory. docs/recipe.md shows them beside each field
  (`docs.py`), and `foreign.py` reads them back as one table.
"""

from __future__ import annotations

from peftctl.sections import PATH, TOOLS, Section, aka, also_known_as_of, training_argument

__all__ = ["PATH", "SOURCE", "TOOLS", "Section", "aka", "also_known_as_of", "training_argument"]

SOURCE = {"path": "source"}
