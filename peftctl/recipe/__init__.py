"""The recipe: its schema (the one source of truth for every option and its documentation), YAML
loading with line numbers, `--set a.b=v` overrides, and path resolution.

Files, each one concern:
- `fields.py`: the `Section` base and field markers (paths, other tools' names; defined in
  `peftctl.sections`, below the recipe, with the `model` section);
- `data.py`, `train.py`, `schema.py`: the sections, and `Recipe`, which holds them (with the model
  section of `peftctl.sections` and the adapter configs of `peftctl.adapters`) and knows how to walk
  itself;
- `yamlfile.py`: YAML to plain data with each value's line, within limits (aliases, depth, tags);
- `overrides.py`: `--set`; `paths.py`: relative paths; `origin.py`: where a value was given;
- `problems.py`: validation errors as `file:line path: message` with "did you mean";
- `loading.py`: `load`, `loads`, `from_dict`, which put the above together;
- `docs.py`: docs/recipe.md (`peftctl schema`); `foreign.py`: transformers', axolotl's and
  LLaMA-Factory's names for the recipe's fields (and "did you mean" from them); `translate.py`:
  axolotl and LLaMA-Factory configs translated into recipes.

Importing it imports no torch (`peftctl --help`, `validate` stay fast).
"""

from __future__ import annotations

from peftctl.recipe.data import DataSection, DataSource
from peftctl.recipe.docs import reference_markdown
from peftctl.recipe.fields import PATH, SOURCE, TOOLS, Section
from peftctl.recipe.foreign import also_known_as, foreign_names
from peftctl.recipe.loading import from_dict, load, loads
from peftctl.recipe.origin import Key
from peftctl.recipe.schema import EvalSection, OutputSection, Recipe, TrackingSection
from peftctl.recipe.train import MAX_SEED, OPTIMIZERS, TrainSection
from peftctl.recipe.yamlfile import EXTENSION_PREFIX, MAX_DEPTH, MAX_VALUES
from peftctl.sections import ModelSection, QuantizationSection

__all__ = [
    "EXTENSION_PREFIX",
    "MAX_DEPTH",
    "MAX_SEED",
    "MAX_VALUES",
    "OPTIMIZERS",
    "PATH",
    "SOURCE",
    "TOOLS",
    "DataSection",
    "DataSource",
    "EvalSection",
    "Key",
    "ModelSection",
    "OutputSection",
    "QuantizationSection",
    "Recipe",
    "Section",
    "TrackingSection",
    "TrainSection",
    "also_known_as",
    "foreign_names",
    "from_dict",
    "load",
    "loads",
    "reference_markdown",
]
