"""`peftctl validate`: beyond the schema, check that what the recipe points to exists and is readable.

No weights are loaded. Missing or unreadable files, a model folder without a config, weights or
tokenizer, and a model that needs its own code are errors (exit 2) naming the field and the line
(or --set flag) that gave it; facts worth knowing (a model that will be converted on first use, an
output folder that already holds a run) are notes.
"""

from __future__ import annotations

from pathlib import Path

from peftctl.errors import InputError, Problem, RecipeError

# Files one of which a transformers tokenizer is built from (fast, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def check_files(recipe, source: str | None = None) -> list[str]:
    """Problems with the files a recipe names, all at once (RecipeError), else notes.

    `source` is unused (kept for callers): problems are placed by the recipe itself.
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
    if spec.tokenizer:
        folder = Path(spec.tokenizer)
        if folder.is_dir():
            problems += [recipe.problem("model.tokenizer", m) for m in tokenizer_problems(folder)]
        elif folder.exists() or spec.tokenizer.startswith(("/", ".", "~")):
            problems.append(recipe.problem("model.tokenizer", f"tokenizer {spec.tokenizer}: not a folder"))
        else:
            notes.append(f"model.tokenizer {spec.tokenizer}: a hub id; it must be reachable or in the hub cache")
    if is_nonempty_dir(Path(recipe.output.dir)):
        notes.append(f"output.dir {recipe.output.dir} is not empty: `train` will refuse it")
    if problems:
        raise RecipeError(problems)
    return notes


def model_problems(spec, src) -> list[str]:
    """What is wrong with a local model (folder or GGUF file), read without loading any weights:
    a config that is missing or not JSON, code it needs (model.trust_remote_code), weights that are
    missing, pickle only (model.allow_pickle), or safetensors files whose header cannot be read."""
    from peftctl import models
    from peftctl.userfiles import BadFileError, check_readable, read_json, safetensors_keys

    if src.kind == "hub":
        return []
    if src.kind == "gguf":
        path = Path(src.path) / src.gguf_file
        try:
            check_readable(path, "a GGUF file")
            with open(path, "rb") as f:
                magic = f.read(4)
        except (BadFileError, OSError) as e:
            return [str(e)]
        return [] if magic == b"GGUF" else [f"{path}: not a GGUF file (it does not start with GGUF)"]
    folder = Path(src.path)
    out: list[str] = []
    try:
        read_json(folder / "config.json", "a model config (JSON)")
        models.check_remote_code(spec, src)
    except InputError as e:
        out.append(str(e))
    index = folder / SAFETENSORS_INDEX
    shards = sorted(folder.glob("*.safetensors"))
    try:
        if index.exists():
            weight_map = read_json(index, "a safetensors index (JSON)").get("weight_map")
            if not isinstance(weight_map, dict):
                raise BadFileError(index, "not a safetensors index (no weight_map)")
            missing = sorted({f for f in map(str, weight_map.values()) if not (folder / f).is_file()})
            if missing:
                raise BadFileError(index, f"names shard(s) missing from the folder: {', '.join(missing[:3])}")
        for shard in shards:
            safetensors_keys(shard)  # the header only
        models._check_weights_format(src, spec.allow_pickle)
    except InputError as e:
        out.append(str(e))
        return out
    if not shards and not (spec.allow_pickle and any(folder.glob(p) for p in ("*.bin", "*.pt"))):
        out.append(f"model {folder}: no weights (model.safetensors or model-*-of-*.safetensors)"
                   + (" nor pickle weights (*.bin)" if spec.allow_pickle else ""))
    return out


def tokenizer_problems(folder: Path, src=None) -> list[str]:
    """What is wrong with a tokenizer folder, read without building the tokenizer: no tokenizer file,
    or a tokenizer_config.json that is not JSON. A GGUF model carries its tokenizer."""
    from peftctl.userfiles import check_readable, read_json

    if src is not None and src.kind == "gguf":
        return []
    try:
        if (folder / "tokenizer_config.json").exists():
            read_json(folder / "tokenizer_config.json", "a tokenizer config (JSON)")
        present = [folder / n for n in TOKENIZER_FILES if (folder / n).exists()]
        if not present:
            return [f"tokenizer {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); set model.tokenizer "
                    "to a folder that has them"]
        for path in present:
            check_readable(path, "a tokenizer file")
    except InputError as e:
        return [str(e)]
    return []
