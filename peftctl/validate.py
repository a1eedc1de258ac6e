"""`peftctl validate`: beyond the schema, check that what the recipe points to exists.

No weights are loaded. Missing files are errors (exit 2) naming the field; facts worth knowing
(a model that will be converted on first use, an output folder that already holds a run) are notes.
"""

from __future__ import annotations

from pathlib import Path

from peftctl.errors import Problem, RecipeError


def check_files(recipe, source: str) -> list[str]:
    from peftctl import models
    from peftctl.data.sources import BUILDERS
    from peftctl.errors import InputError
    from peftctl.fsio import is_nonempty_dir

    problems: list[Problem] = []
    notes: list[str] = []
    for field in ("train", "eval"):
        value = getattr(recipe.data, field)
        if value is None:
            continue
        path = Path(value)
        if not path.is_file():
            problems.append(Problem(source, None, f"data.{field}", f"file not found: {path}"))
        elif path.suffix.lower() not in BUILDERS:
            problems.append(Problem(source, None, f"data.{field}",
                                    f"unknown file type {path.suffix!r}; use one of {', '.join(BUILDERS)}"))
    name = recipe.model.name_or_path
    try:
        src = models.resolve(name, recipe.model.cache_dir, convert=False)
        if name in models.BUILTIN_MODELS and src.kind == "gguf":
            notes.append(f"model {name}: converted from GGUF on first use (about 40 s)")
        elif src.kind == "hub":
            notes.append(f"model {name}: a hub id; it must be reachable or in the hub cache")
    except InputError as e:
        problems.append(Problem(source, None, "model.name_or_path", str(e)))
    if is_nonempty_dir(Path(recipe.output.dir)):
        notes.append(f"output.dir {recipe.output.dir} is not empty: `train` will refuse it")
    if problems:
        raise RecipeError(problems)
    return notes
