"""`peftctl validate`: beyond the schema, check that what the recipe points to exists.

No weights are loaded. Missing files are errors (exit 2) naming the field; facts worth knowing
(a model that will be converted on first use, an output folder that already holds a run) are notes.
"""

from __future__ import annotations

from pathlib import Path

from peftctl.errors import Problem, RecipeError


def check_files(recipe, source: str) -> list[str]:
    from peftctl import models
    from peftctl.data import sources
    from peftctl.data.templates import resolve_template
    from peftctl.errors import InputError
    from peftctl.fsio import is_nonempty_dir

    problems: list[Problem] = []
    notes: list[str] = []
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, split) or []):
            where = f"data.{split}" if len(getattr(recipe.data, split)) == 1 else f"data.{split}.{i}"
            try:
                src = sources.resolve(spec.path)
            except InputError as e:
                problems.append(Problem(source, None, where, str(e)))
                continue
            if src.kind == "hub":
                notes.append(f"{where} {spec.path}: a hub dataset; it must be reachable or in the datasets cache")
    try:
        resolve_template(recipe.data.chat_template)
    except InputError as e:
        problems.append(Problem(source, None, "data.chat_template", str(e)))
    name = recipe.model.name_or_path
    try:
        src = models.resolve(name, recipe.model.cache_dir, convert=False)
        if name in models.BUILTIN_MODELS and src.kind == "gguf":
            notes.append(f"model {name}: converted from GGUF on first use (about 40 s)")
        elif src.kind == "hub":
            notes.append(f"model {name}: a hub id; it must be reachable or in the hub cache")
    except InputError as e:
        problems.append(Problem(source, None, "model.name_or_path", str(e)))
    else:
        problems += token_problems(recipe, src, source)
    if is_nonempty_dir(Path(recipe.output.dir)):
        notes.append(f"output.dir {recipe.output.dir} is not empty: `train` will refuse it")
    if problems:
        raise RecipeError(problems)
    return notes


def token_problems(recipe, model_source, source: str) -> list[Problem]:
    """Every token of the tokenizer has a row in the model's embedding matrix: train's check
    (`models.check_token_ids`), made from config.json and tokenizer.json where the model is a
    local folder that has them."""
    from peftctl import models
    from peftctl.errors import InputError

    try:
        found = models.vocabulary_from_files(recipe.model, model_source)
        if found is not None:
            models.check_token_ids(*found, models.tokenizer_name(recipe.model))
    except InputError as e:
        return [Problem(source, None, "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path", str(e))]
    return []
