"""Which modules an adapter config targets: names, dotted suffixes, regexes, `all-linear`, layer
indices, `modules_to_save`, the modules a task type trains in full, and per-module rank / alpha
patterns. Module selection follows PEFT's rules exactly (tested case by case against PEFT), so an
adapter_config.json selects the same modules here as there.

PEFT's rules, as implemented here:
- `target_modules` list: a module matches when its dotted path *equals* an entry (a full path: no
  layer filter applies, whatever `layers_to_transform` says) or *ends with* "." + an entry (then
  `layers_to_transform` / `layers_pattern` filter it). A list of 20 or more entries is first condensed
  to the shortest dotted suffixes that still tell the targets from the other modules (PEFT's
  `_find_minimal_target_modules`), and those suffixes are what the layer filter then sees.
- `target_modules` string: a regex that must match the whole path; `all-linear`: every `nn.Linear`
  and transformers `Conv1D` except a transformers model's output embedding (for a classification
  model without one, its `score` / `classifier` head when the task type is SEQ_CLS).
- `exclude_modules`: a regex (full match) or a list (equal, or dotted suffix).
- Modules under a `modules_to_save` name (the name as a regex between dots) are never targeted.
- `modules_to_save`: a module is saved in full when its path *ends with* a name (a plain string
  suffix, not a dotted one: `norm` also selects `input_layernorm`, as in PEFT).
- Task types SEQ_CLS and TOKEN_CLS add `classifier` and `score` to `modules_to_save`, QUESTION_ANS
  adds `qa_outputs` (PEFT's task model classes do so); those that the model lacks are skipped.

Rank and alpha patterns are where peftctl deliberately differs: see `pattern_key`.
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings

from torch import nn

from peftctl.adapters.config import LORA_DEFAULT_TARGETS
from peftctl.adapters.layer import AdapterLayer
from peftctl.adapters.modules_to_save import ModulesToSaveWrapper

ALL_LINEAR = "all-linear"

# PEFT's LoRA table of default targets per model type: `adapters.config.LORA_DEFAULT_TARGETS`.
DEFAULT_TARGETS = LORA_DEFAULT_TARGETS

# Modules a task type trains in full (PEFT's PeftModelForSequenceClassification etc. add them to
# modules_to_save); those a model does not have are skipped.
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# PEFT's list of classification head names that `all-linear` leaves out for SEQ_CLS (in its order).
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
# PEFT condenses target lists of this many entries or more (MIN_TARGET_MODULES_FOR_OPTIMIZATION).
_CONDENSE_FROM = 20


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers always has it
        pass
    return tuple(types)


def _name_matches(name: str, spec: list[str] | str) -> bool:
    """PEFT's rule for target_modules and exclude_modules: regex full match, or equal / dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The layer number in a module path: after `<pattern>.` if given, else the first `.<name>.<n>.`."""
    if not layers_pattern:
        # Lazy: the first numbered segment is the layer, not a nested index such as an MoE expert.
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match["idx"]) if match else None


def in_selected_layers(name: str, config) -> bool:
    wanted = getattr(config, "layers_to_transform", None)  # IA3's config has no layer selection
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


# ---- modules_to_save, with the task type's modules ----------------------------------------------


def task_modules_to_save(config) -> tuple[str, ...]:
    return TASK_MODULES_TO_SAVE.get(str(getattr(config, "task_type", None) or ""), ())


def modules_to_save_names(config) -> list[str] | None:
    """`modules_to_save` with the names the task type adds (PEFT's order, duplicates dropped)."""
    names = list(config.modules_to_save or [])
    names += [n for n in task_modules_to_save(config) if n not in names]
    return names or None


def _regex_or_literal(m: str) -> str:
    # PEFT puts the name into the regex as it is; a name that is no valid regex means itself.
    try:
        re.compile(m)
        return m
    except re.error:
        return re.escape(m)


def _under_modules_to_save(name: str, modules_to_save: list[str] | None) -> bool:
    return bool(modules_to_save) and any(
        re.match(rf"(^|.*\.){_regex_or_literal(m)}($|\..*)", name) for m in modules_to_save)


def outside_wrappers(model: nn.Module):
    """(name, module) for every module of `model` (itself first, as "") but those inside an adapter
    layer or a modules_to_save wrapper; the outermost wrappers themselves are included. The one
    walk over a model's wrappers (`candidate_modules`, `io.wrappers`)."""
    inside: str | None = None  # the wrapper whose modules are being skipped
    for name, module in model.named_modules():  # depth first: a module's own modules follow it
        if inside is not None and name.startswith(inside):
            continue
        inside = name + "." if isinstance(module, AdapterLayer | ModulesToSaveWrapper) else None
        yield name, module


def candidate_modules(model: nn.Module):
    """(name, module) pairs a config may target: not the adapters' own parts, not wrappers' bases."""
    return ((name, module) for name, module in outside_wrappers(model) if name)


def resolve_targets(model: nn.Module, config) -> list[str] | str:
    """The config's target_modules, or when unset (or empty) its method's default for the model type
    (the config class's `default_target_modules`, else PEFT's LoRA table `DEFAULT_TARGETS`)."""
    spec = config.target_modules
    if spec is None or spec == []:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        table = getattr(type(config), "default_target_modules", None) or DEFAULT_TARGETS
        if model_type not in table:
            kind = (f"model type {model_type!r}" if model_type is not None else
                    f"model type None ({type(model).__name__} is not a transformers model)")
            raise ValueError(
                f"target_modules is unset and there is no default for {kind}; "
                "set target_modules (a list of names, a regex, or 'all-linear')"
            )
        default = table[model_type]
        return default if isinstance(default, str) else list(default)
    return spec


def condensed_targets(targets: list[str], other_names: list[str]) -> list[str]:
    """PEFT's `_find_minimal_target_modules`: the fewest dotted suffixes that match every entry of
    `targets` (full paths or suffixes) and no name in `other_names`. PEFT applies it to lists of 20
    entries or more, and then matches those suffixes, layer filter included."""

    def suffixes(s: str) -> list[str]:
        parts = s.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    others = {suffix for item in other_names for suffix in suffixes(item)}
    required: set[str] = set()
    # Shortest suffixes first; sorted as PEFT sorts, so that ties resolve the same way.
    for item, item_suffixes in sorted({t: suffixes(t) for t in set(targets)}.items(), key=lambda kv: kv[1]):
        for suffix in item_suffixes:
            if suffix in required or suffix in others:
                continue
            if not any(item.endswith("." + r) for r in required):
                required.add(suffix)
                break
    return sorted(required) if required else sorted(set(targets))


def _output_heads(model: nn.Module, config) -> set[int]:
    """Modules `all-linear` leaves out, as PEFT does: a transformers model's output embedding, or,
    for SEQ_CLS without one, its classification head."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return set()
    if not isinstance(model, PreTrainedModel):
        return set()
    head = model.get_output_embeddings()
    if head is not None:
        return {id(head)}
    if str(getattr(config, "task_type", None) or "") == "SEQ_CLS":
        for name in SEQ_CLS_HEAD_NAMES:
            if getattr(model, name, None) is not None:
                return {id(getattr(model, name))}
    return set()


def natural_key(name: str) -> list:
    """Sort key that orders the numbers in a name by value: layers.2 before layers.10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def targetable_names(candidates) -> list[str]:
    """Every distinct last name part of the modules an adapter can wrap (linear, Conv1D, convolution
    and embedding layers, quantized linear ones), in natural order."""
    kinds = (*_linear_types(), nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sorted({n.split(".")[-1] for n, m in candidates
                   if isinstance(m, kinds) or type(m).__name__ in _QUANTIZED_TYPES}, key=natural_key)


def _example_path(candidates) -> str:
    linear = [n for n, m in candidates if isinstance(m, _linear_types())]
    return linear[0] if linear else ""


def find_targets(model: nn.Module, config) -> list[str]:
    """Dotted names of the modules `config` adapts, in model order. Errors name what exists."""
    spec = resolve_targets(model, config)
    candidates = list(candidate_modules(model))
    if isinstance(spec, list) and len(set(spec)) >= _CONDENSE_FROM:
        everything = [n for n, _ in model.named_modules()]
        spec = condensed_targets(spec, [n for n in everything if n not in spec and not _name_matches(n, spec)])
    linear_types = _linear_types()
    heads = _output_heads(model, config) if spec == ALL_LINEAR else set()
    saved = modules_to_save_names(config)
    names = []
    for name, module in candidates:
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        if config.exclude_modules and _name_matches(name, config.exclude_modules):
            continue
        if _under_modules_to_save(name, saved):
            continue
        if spec == ALL_LINEAR:
            hit = isinstance(base, linear_types) and id(base) not in heads and id(module) not in heads
            hit = hit and in_selected_layers(name, config)  # peftctl's extension: PEFT refuses layers here
        elif isinstance(spec, str):
            hit = re.fullmatch(spec, name) is not None
        elif name in spec:
            hit = True  # a full path: PEFT adapts it whatever the layer filter says
        else:
            hit = any(name.endswith("." + t) for t in spec) and in_selected_layers(name, config)
        if hit:
            names.append(name)
    if not names:
        how = (" (a string is one regular expression over whole dotted names, such as "
               f"{_example_path(candidates)!r})" if isinstance(spec, str) and spec != ALL_LINEAR else "")
        raise ValueError(
            f"target_modules {spec!r} matches no module of this model{how}; the names of the modules that "
            "can be targeted here: " + ", ".join(targetable_names(candidates))
        )
    return names


# bitsandbytes' quantized layers (also their weightless stand-ins on the meta device, `inspect`'s).
_QUANTIZED_TYPES = ("Linear4bit", "Linear8bitLt")


def _refuse_quantized(name: str, module: nn.Module) -> None:
    """A ValueError when `module` is, or holds, a quantized layer: training a copy in full needs
    floating-point weights (and gradients for them), which integer-coded weights do not have."""
    for sub_name, sub in module.named_modules():
        params = list(sub.parameters(recurse=False))
        if type(sub).__name__ in _QUANTIZED_TYPES or any(not p.is_floating_point() for p in params):
            what = f"is a quantized layer ({type(sub).__name__})" if not sub_name else (
                f"holds a quantized layer ({name}.{sub_name}: {type(sub).__name__})")
            raise ValueError(
                f"modules_to_save names {name}, which {what}: its weights are stored as integer codes, "
                "so it cannot be trained in full; adapt it with LoRA instead (list it in target_modules), "
                "or load the base model unquantized"
            )


def find_modules_to_save(model: nn.Module, config) -> list[str]:
    """Dotted names of the modules saved in full: those whose path ends with a `modules_to_save`
    name or one the task type adds (PEFT's plain-suffix rule). A name of the user's that matches
    nothing is an error (PEFT ignores it); a task's name the model lacks is skipped."""
    wanted = modules_to_save_names(config)
    if not wanted:
        return []
    candidates = list(candidate_modules(model))
    found = [name for name, _ in candidates if any(name.endswith(m) for m in wanted)]
    task_names = task_modules_to_save(config)
    missing = [m for m in config.modules_to_save or [] if m not in task_names
               and not any(n.endswith(m) for n in found)]
    if missing:
        top = sorted({n.split(".")[-1] for n, m in candidates if not list(m.children())}, key=natural_key)
        raise ValueError(
            f"modules_to_save {missing!r} matches no module of this model; the names of its modules: "
            + ", ".join(top)
        )
    if task_names and not config.modules_to_save and not any(n.endswith(m) for n in found for m in task_names):
        warnings.warn(
            f"task_type {config.task_type} trains the model's head in full, found by the name "
            f"{' or '.join(task_names)}; this model has no such module, so no head is trained or saved "
            "(name it in modules_to_save)", UserWarning, stacklevel=3)
    for name in found:
        _refuse_quantized(name, model.get_submodule(name))
    adapted = [n for n in found if isinstance(model.get_submodule(n), AdapterLayer)]
    if adapted:
        raise ValueError(f"modules_to_save names {adapted[0]}, which an adapter already adapts; it cannot also be saved in full")
    # Outermost matches only: a module inside one already saved in full is saved with it.
    return [n for n in found if not any(n.startswith(o + ".") for o in found)]


# ---- rank_pattern / alpha_pattern ----------------------------------------------------------------
#
# A key is a regex that matches a module when it matches the module's whole dotted path or the part
# after one of its dots (PEFT's rule: `re.match(rf"(.*\.)?({key})$", path)`). PEFT applies the
# *first* matching key in the dict's order, which is insertion order when the adapter is created and
# sorted order after a reload (adapter_config.json is written with sorted keys): overlapping keys
# then give a layer one scaling in training and another when loaded. peftctl's rule does not depend
# on order: the most specific matching key wins.


@functools.lru_cache(maxsize=4096)
def _compiled(key: str) -> re.Pattern:
    return re.compile(rf"(?:{key})$")


def pattern_coverage(key: str, name: str) -> int | None:
    """How many trailing dotted parts of `name` the key matches (the fewest it can; the whole path
    when it only matches that), or None when it does not match the module."""
    regex = _compiled(key)
    starts = [0] + [i + 1 for i, c in enumerate(name) if c == "."]
    for start in reversed(starts):  # shortest suffix first
        # Matching from `start` (not on a sliced string): `^` only matches at the path's start, as in PEFT.
        if regex.match(name, start):
            return name.count(".", start) + 1
    return None


def _is_plain(key: str) -> bool:
    """A dotted name without regex syntax (dots aside)."""
    return re.escape(key).replace(r"\.", ".") == key


def _specificity(key: str, name: str) -> tuple[int, int] | None:
    coverage = pattern_coverage(key, name)
    return None if coverage is None else (coverage, int(_is_plain(key)))


def pattern_key(patterns, name: str, field: str = "pattern") -> str | None:
    """The `rank_pattern` / `alpha_pattern` key that applies to module `name`, or None.

    Most specific wins, whatever the dict's order: (1) the key that matches more trailing parts of
    the module's dotted path (a key matching the whole path beats every suffix; `self_attn.q_proj`
    beats `q_proj`); (2) at equal length, a plain dotted name beats a regular expression (`q_proj`
    beats `.*_proj`). Keys still tied with different values are ambiguous: ValueError naming them.
    """
    scored = [(s, k) for k in patterns if (s := _specificity(k, name)) is not None]
    if not scored:
        return None
    best = max(s for s, _ in scored)
    top = [k for s, k in scored if s == best]
    if len({patterns[k] for k in top}) > 1:
        raise ValueError(
            f"{field} keys {top[0]!r} and {top[1]!r} both match module {name} equally specifically "
            f"(the last {best[0]} part(s) of its path) with different values ({patterns[top[0]]} and "
            f"{patterns[top[1]]}); make one of them more specific, e.g. a longer part of the path"
        )
    return top[0]


def pattern_value(patterns, name: str, default, field: str = "pattern"):
    key = pattern_key(patterns, name, field)
    return patterns[key] if key is not None else default


def peft_pattern_key(patterns, name: str) -> str | None:
    """The key PEFT applies: the first in the dict's order that matches (`get_pattern_key`)."""
    return next((k for k in patterns if pattern_coverage(k, name) is not None), None)


# A config class may name its own ({field: default field}; `pattern_fields`, empty for none).
PATTERN_FIELDS = {"rank_pattern": "r", "alpha_pattern": "lora_alpha"}


def pattern_fields(config) -> dict[str, str]:
    """{pattern field: the field whose value it overrides}: LoRA's, or the config class's own
    `pattern_fields` (LoHa and LoKr: alpha_pattern overrides alpha)."""
    return getattr(type(config), "pattern_fields", PATTERN_FIELDS)


def check_patterns(config, names: list[str], model: nn.Module, loading: bool = False) -> None:
    """Every rank_pattern / alpha_pattern key must apply to at least one adapted module (`names`);
    a misspelt key is an error naming it and the closest module names (when loading a saved adapter,
    a warning, as PEFT gives: the file's weights are what they are). Ties are errors (`pattern_key`).
    When loading a file, PEFT's first-match rule (the file's order) and the most-specific rule must
    agree for every module: otherwise the file does not say which value the adapter was trained with."""
    for field in pattern_fields(config):
        patterns = getattr(config, field, None) or {}
        if not patterns:
            continue
        used = {k for k in patterns if any(pattern_coverage(k, n) is not None for n in names)}
        unused = [k for k in patterns if k not in used]
        if unused:
            adapted = sorted({n.split(".")[-1] for n in names})
            others = sorted({n.split(".")[-1] for n, _ in candidate_modules(model)})
            close: list[str] = []
            for k in unused:  # the adapted modules' names first, then any module's
                leaf = k.split(".")[-1]
                for m in difflib.get_close_matches(leaf, adapted, n=3, cutoff=0.6) or difflib.get_close_matches(
                        leaf, others, n=3, cutoff=0.6):
                    if m not in close:
                        close.append(m)
            message = (f"{field} key(s) {', '.join(repr(k) for k in unused)} match no module this adapter adapts"
                       + (f"; did you mean: {', '.join(close)}?" if close else "")
                       + f" (adapted: {', '.join(sorted({n.split('.')[-1] for n in names}))})")
            if not loading:
                raise ValueError(message)
            warnings.warn(message + "; those keys are ignored", UserWarning, stacklevel=4)
        for name in names:
            if loading:
                saved_pattern_value(patterns, name, None, field)
            else:
                pattern_key(patterns, name, field)


def saved_pattern_value(patterns, name: str, default, field: str = "pattern"):
    """The value a saved adapter's pattern gives module `name`: PEFT's first match in the file's
    order and the most specific key must agree, since the file cannot say which one the adapter was
    trained with; ValueError otherwise."""
    key = pattern_key(patterns, name, field)
    first = peft_pattern_key(patterns, name)
    if first is not None and patterns[first] != patterns[key]:
        raise ValueError(
            f"{field} keys {first!r} and {key!r} both match module {name} with different values; "
            f"PEFT applies the first in the file ({first!r}: {patterns[first]}), peftctl the more "
            f"specific ({key!r}: {patterns[key]}), and the file cannot say which one the adapter was "
            "trained with; rewrite the pattern so that no two keys match one module")
    return patterns[key] if key is not None else default


def peft_safe_patterns(config, names: list[str]) -> dict:
    """Pattern fields to write to adapter_config.json so that PEFT, which applies the first matching
    key in the file's (sorted) order, resolves every module as peftctl does: the config's own
    patterns when they already agree, else one anchored full-path key per module whose value
    differs from the default (`^model\\.layers\\.0\\.self_attn\\.q_proj`), which no other module
    matches."""
    update = {}
    for field, default_field in pattern_fields(config).items():
        patterns = getattr(config, field, None) or {}
        if not patterns:
            continue
        ordered = dict(sorted(patterns.items()))
        default = getattr(config, default_field)
        resolved = {n: pattern_value(patterns, n, default, field) for n in names}

        def in_peft(n: str, ordered=ordered, default=default):
            k = peft_pattern_key(ordered, n)
            return ordered[k] if k is not None else default

        if all(in_peft(n) == v for n, v in resolved.items()):
            continue
        update[field] = {f"^{re.escape(n)}": v for n, v in resolved.items() if v != default}
    return update
