"""Which modules an adapter config targets: names, dotted suffixes, regexes, `all-linear`, layer
indices, and per-module patterns. The rules are PEFT's, so an adapter_config.json selects the same
modules here as there."""

from __future__ import annotations

import re

from torch import nn

from peftctl.adapters.layer import AdapterLayer
from peftctl.adapters.modules_to_save import ModulesToSaveWrapper

ALL_LINEAR = "all-linear"

# Defaults when target_modules is unset, by model type (the attention projections PEFT uses).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
        "olmo", "olmo2", "granite", "smollm3", "opt", "gptj", "codegen", "cohere",
    )},
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "phi": ["q_proj", "v_proj"],
}


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers always has it
        pass
    return tuple(types)


def _name_matches(name: str, spec: list[str] | str) -> bool:
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
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def pattern_key(patterns, name: str) -> str | None:
    """The first rank_pattern / alpha_pattern key whose regex matches the end of `name` (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _under_modules_to_save(name: str, modules_to_save: list[str] | None) -> bool:
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def candidate_modules(model: nn.Module):
    """(name, module) pairs a config may target: not the adapters' own parts, not wrappers' bases."""
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, AdapterLayer | ModulesToSaveWrapper):
            wrapped.append(name)
        yield name, module


def resolve_targets(model: nn.Module, config) -> list[str] | str:
    spec = config.target_modules
    if spec is None or spec == []:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"target_modules is unset and there is no default for model type {model_type!r}; "
                "set target_modules (a list of names, a regex, or 'all-linear')"
            )
        return DEFAULT_TARGETS[model_type]
    return spec


def find_targets(model: nn.Module, config) -> list[str]:
    """Dotted names of the modules `config` adapts, in model order. Errors name what exists."""
    spec = resolve_targets(model, config)
    linear_types = _linear_types()
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in candidate_modules(model):
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        if spec == ALL_LINEAR:
            hit = isinstance(base, linear_types) and base is not output_head and not (
                output_head is None and name.split(".")[-1] == "lm_head"
            )
        else:
            hit = _name_matches(name, spec)
        if hit and config.exclude_modules and _name_matches(name, config.exclude_modules):
            hit = False
        if hit and (_under_modules_to_save(name, config.modules_to_save) or not in_selected_layers(name, config)):
            hit = False
        if hit:
            names.append(name)
    if not names:
        leaf_names = sorted({n.split(".")[-1] for n, m in candidate_modules(model) if not list(m.children())})
        raise ValueError(
            f"target_modules {spec!r} matches no module of this model; module names here include: "
            + ", ".join(leaf_names[:12])
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
    """Dotted names of the modules `modules_to_save` names (exact name or dotted suffix)."""
    if not config.modules_to_save:
        return []
    found = [name for name, _ in candidate_modules(model) if _name_matches(name, config.modules_to_save)]
    missing = [m for m in config.modules_to_save if not any(_name_matches(n, [m]) for n in found)]
    if missing:
        top = sorted({n.split(".")[-1] for n, m in candidate_modules(model) if not list(m.children())})
        raise ValueError(
            f"modules_to_save {missing!r} matches no module of this model; module names here include: "
            + ", ".join(top[:12])
        )
    for name in found:
        _refuse_quantized(name, model.get_submodule(name))
    adapted = [n for n in found if isinstance(model.get_submodule(n), AdapterLayer)]
    if adapted:
        raise ValueError(f"modules_to_save names {adapted[0]}, which an adapter already adapts; it cannot also be saved in full")
    # Outermost matches only: a module inside one already saved in full is saved with it.
    return [n for n in found if not any(n.startswith(o + ".") for o in found)]
