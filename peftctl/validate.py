"""`peftctl validate`: beyond the schema, check that what the recipe points to exists and is readable.

No weights are loaded. Missing or unreadable files, a model folder without a config, weights or
tokenizer, and a model that needs its own code are errors (exit 2) naming the field and the line
(or --set flag) that gave it; facts worth knowing (a model that will be converted on first use, an
output folder that already holds a run) are notes.
"""

from __future__ import annotations

from pathlib import Path

from peftctl.errors import InputError, Problem, RecipeError


def check_files(recipe, source: str | None = None, rows: int | None = None) -> list[str]:
    """Problems with the files a recipe names, all at once (RecipeError), else notes.

    When the files are fine, every row of every local data source is parsed in its format as
    training will parse it (`rows`: only the first that many of each source; 0: none), with the
    tokenizer (no weights) for the chat template. `source` is unused (kept for callers): problems
    are placed by the recipe itself.
    """
    from peftctl import models
    from peftctl.data import sources
    from peftctl.data.templates import resolve_template
    from peftctl.fsio import is_nonempty_dir

    problems: list[Problem] = []
    notes: list[str] = []
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, split) or []):
            where = f"data.{split}" if len(getattr(recipe.data, split)) == 1 else f"data.{split}.{i}"
            try:
                src = sources.resolve(spec.path)
            except InputError as e:
                problems.append(recipe.problem(where, str(e)))
                continue
            if src.kind == "hub":
                notes.append(f"{where} {spec.path}: a hub dataset; it must be reachable or in the datasets cache")
    try:
        resolve_template(recipe.data.chat_template)
    except InputError as e:
        problems.append(recipe.problem("data.chat_template", str(e).removeprefix("data.chat_template: ")))
    spec = recipe.model
    try:
        src = models.resolve(spec.name_or_path, spec.cache_dir, convert=False)
    except InputError as e:
        problems.append(recipe.problem("model.name_or_path", str(e)))
    else:
        if spec.name_or_path in models.BUILTIN_MODELS and src.kind == "gguf":
            notes.append(f"model {spec.name_or_path}: converted from GGUF on first use (about 40 s)")
        elif src.kind == "hub":
            notes.append(f"model {spec.name_or_path}: a hub id; it must be reachable or in the hub cache")
        problems += [recipe.problem("model.name_or_path", m) for m in model_problems(spec, src)]
        if src.kind != "hub" and not spec.tokenizer:
            problems += [recipe.problem("model.name_or_path", m) for m in tokenizer_problems(Path(src.path), src)]
        if not problems:  # the files are there and readable: every token has an embedding row
            field = "model.tokenizer" if spec.tokenizer else "model.name_or_path"
            problems += [recipe.problem(field, m) for m in token_problems(spec, src)]
        if not problems and src.kind == "folder":  # the model fits model.task, as train checks it
            problems += _task_problems(recipe, src, notes)
    if spec.tokenizer:
        folder = Path(spec.tokenizer)
        if folder.is_dir():
            problems += [recipe.problem("model.tokenizer", m) for m in tokenizer_problems(folder)]
        elif folder.exists() or spec.tokenizer.startswith(("/", ".", "~")):
            problems.append(recipe.problem("model.tokenizer", f"tokenizer {spec.tokenizer}: not a folder"))
        else:
            notes.append(f"model.tokenizer {spec.tokenizer}: a hub id; it must be reachable or in the hub cache")
    init = recipe.train.init_adapter
    if init is not None:
        from peftctl.adapters.io import has_adapter

        if not Path(init).exists():
            notes.append(f"train.init_adapter {init}: not there yet; `train` needs the adapter (a run folder) there")
        elif not has_adapter(init):
            problems.append(recipe.problem("train.init_adapter", f"{init}: holds no adapter (adapter_model.safetensors)"))
        else:  # train's check (train.checkpoint.check_same_adapter), with the model-type defaults unknown here
            from peftctl.adapters.config import CONFIG_NAME, read_config_file

            try:
                diff = recipe.adapter.differences(read_config_file(Path(init) / CONFIG_NAME), unset_matches=True)
            except ValueError as e:
                problems.append(recipe.problem("train.init_adapter", str(e)))
            else:
                if diff:
                    problems.append(recipe.problem(
                        "train.init_adapter", f"the adapter in {init} is not the one the recipe describes (its value "
                        f"vs the recipe's: {'; '.join(diff)}); make the adapter section match its adapter_config.json"))
    if not problems and rows != 0:
        problems += _row_problems(recipe, rows, notes)
    if is_nonempty_dir(Path(recipe.output.dir)):
        notes.append(f"output.dir {recipe.output.dir} is not empty: `train` will refuse it")
    if problems:
        raise RecipeError(problems)
    return notes


def _task_problems(recipe, src, notes: list[str]) -> list[Problem]:
    """train's checks of the model's config against model.task (`models.check_causal_lm`: an
    encoder-only model as a causal LM), and its note when the config implies another task."""
    from peftctl import models

    spec = recipe.model
    try:
        config = models.load_config(spec, src)
        if spec.task_name == "causal_lm":
            models.check_causal_lm(spec, config, src.description)
    except InputError as e:
        return [recipe.problem("model.task" if "model.task" in str(e) else "model.name_or_path", str(e))]
    if recipe.adapter.is_prompt_learning:  # token_dim, num_layers, ... against the model's, as train fills them
        from types import SimpleNamespace

        from peftctl.adapters import TaskType
        from peftctl.adapters.prompt import with_model_dims
        from peftctl.sections import TASK_TYPES

        adapter = recipe.adapter.model_copy(update={"task_type": TaskType(TASK_TYPES[spec.task_name]).value})
        try:
            with_model_dims(adapter, SimpleNamespace(config=config))
        except ValueError as e:
            field = next((f for f in ("token_dim", "num_layers", "num_attention_heads") if str(e).startswith(f)), "method")
            return [recipe.problem(f"adapter.{field}", str(e))]
    note = models.task_note(spec, config)
    if note:
        notes.append(note)
    return []


def _row_problems(recipe, rows: int | None, notes: list[str]) -> list[Problem]:
    from peftctl import models
    from peftctl.data.pipeline import check_rows

    data = recipe.data
    try:
        tokenizer = models.load_tokenizer(recipe.model, models.resolve(recipe.model.name_or_path,
                                                                       recipe.model.cache_dir, convert=False))
    except InputError as e:  # a hub model that is not reachable: the files checks said what they could
        notes.append(f"data: rows not checked: the tokenizer did not load ({str(e).splitlines()[0]})")
        return []
    if recipe.model.task_name != "causal_lm":
        return _task_row_problems(recipe, tokenizer, notes)
    try:
        found, checked = check_rows(data, tokenizer, limit=rows, notes=notes)
    except InputError as e:
        return [recipe.problem("data", str(e).removeprefix("data: "))]
    problems = []
    for (split, i), messages in found.items():
        where = f"data.{split}" if len(getattr(data, split)) == 1 else f"data.{split}.{i}"
        problems += [recipe.problem(where, m) for m in messages]
    if checked:
        notes.append(f"data: every row of {checked} local source(s) parses in its format" if rows is None
                     else f"data: the first {rows:,} rows of each of {checked} local source(s) parse (--quick)")
    return problems


def _task_row_problems(recipe, tokenizer, notes: list[str]) -> list[Problem]:
    """A seq2seq or classification recipe's rows, read as training reads them (`data.tasks`: its labels
    from the training rows unless `model.labels`, then every train and eval row into an example):
    the first bad rows as one problem naming them. Every row is read (`--quick` does not apply)."""
    from peftctl.data import tasks
    from peftctl.sections import LABELLED_TASKS

    task, data = recipe.model.task_name, recipe.data
    try:
        labels = (recipe.model.labels or tasks.label_names(task, data, tokenizer)) if task in LABELLED_TASKS else None
        for split in ("train", "eval"):
            tasks.build_examples(task, data, tokenizer, labels, split)
    except InputError as e:
        return [recipe.problem("data", str(e).removeprefix("data: "))]
    sources = len(data.train) + len(data.eval or [])
    notes.append(f"data: every row of {sources} source(s) reads as model.task {task} reads it")
    return []


def model_problems(spec, src) -> list[str]:
    """What is wrong with a local model (folder or GGUF file), read without loading any weights: the
    checks every load runs first (`models.model_file_problems`), all reported at once here."""
    from peftctl import models

    return models.model_file_problems(spec, src)


def tokenizer_problems(folder: Path, src=None) -> list[str]:
    """What is wrong with a tokenizer folder, read without building the tokenizer
    (`models.tokenizer_file_problems`)."""
    from peftctl import models

    return models.tokenizer_file_problems(folder, src)


def token_problems(spec, src) -> list[str]:
    """Every token of the tokenizer has a row in the model's embedding matrix: train's check
    (`models.check_token_ids`), made from config.json and tokenizer.json where the model is a
    local folder that has them."""
    from peftctl import models

    try:
        found = models.vocabulary_from_files(spec, src)
        if found is not None:
            models.check_token_ids(*found, models.tokenizer_name(spec))
    except InputError as e:
        return [str(e)]
    return []
