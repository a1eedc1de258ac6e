"""An axolotl or LLaMA-Factory training config translated into a peftctl recipe.

Every option with an equivalent becomes its recipe field: the names come from the schema's table of
other tools' names (`foreign.py`), the values are converted where the tools spell them otherwise
(`bf16: true` is `model.dtype: bfloat16`, `lora_target: all` is `target_modules: all-linear`,
`optim: adamw_torch` is `optimizer: adamw`, ...). Everything else is dropped, each with its reason; a
value the schema refuses is dropped too (with the schema's message), so the recipe returned validates.
Data: axolotl's `datasets` entries become sources (`type` alpaca, sharegpt, chat_template,
completion); LLaMA-Factory's `dataset` names are looked up in `dataset_dir/dataset_info.json`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftctl.data.templates import NAMED_TEMPLATES
from peftctl.errors import InputError, Problem, RecipeError
from peftctl.recipe.foreign import foreign_names
from peftctl.recipe.schema import Recipe
from peftctl.recipe.train import OPTIMIZERS
from peftctl.recipe.yamlfile import parse_yaml
from peftctl.userfiles import read_json, reading

TRANSLATORS = ("axolotl", "llamafactory")

_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant",
               "constant_with_warmup": "constant", "cosine_with_min_lr": "cosine_with_min_lr"}
_OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
               "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", **{o: o for o in OPTIMIZERS}}
_ATTENTION = {"fa2": "flash_attention_2", "sdpa": "sdpa", "disabled": "eager", "eager": "eager"}
# Options that change nothing peftctl does, or that it decides itself: dropped with this reason.
_NOT_NEEDED = {
    "do_train": "peftctl train trains", "stage": "stage: sft is peftctl's default objective",
    "overwrite_output_dir": "peftctl never overwrites a run folder (it resumes one with --resume)",
    "overwrite_cache": "the data cache is keyed by content: a change rebuilds it",
    "preprocessing_num_workers": "no equivalent", "dataloader_num_workers": "no equivalent",
    "plot_loss": "peftctl report draws the curves", "ddp_timeout": "no equivalent",
    "strict": "peftctl always refuses unknown fields", "tokenizer_type": "the tokenizer is read from the model",
    "model_type": "the model class is read from its config.json", "tf32": "no equivalent",
    "deepspeed": "no DeepSpeed: peftctl train --num-processes N runs DDP",
    "fsdp": "no FSDP: peftctl train --num-processes N runs DDP", "fsdp_config": "no FSDP",
    "resume_from_checkpoint": "peftctl train --resume auto (a flag, not a recipe field)",
    "dataset_dir": "used to look up `dataset`", "formatting": "read from dataset_info.json",
    "quantization_method": "bitsandbytes is peftctl's quantization",
    "eval_strategy": "train.eval_every sets it", "evaluation_strategy": "train.eval_every sets it",
    "save_strategy": "train.save_every sets it", "logging_strategy": "train.log_every sets it",
}


@dataclass
class Translation:
    """The recipe (plain data, paths as written for a file in `base`) and what was dropped:
    (the tool's key, its value, why)."""

    recipe: dict[str, Any]
    dropped: list[tuple[str, Any, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # where the recipe trains otherwise than the tool would

    def to_yaml(self, tool: str, source: str) -> str:
        head = [f"# Translated by peftctl recipe from-{tool} from {source}."]
        head += [f"# Note: {n}" for n in self.notes]
        if self.dropped:
            head.append("# Dropped (no equivalent in peftctl, or not needed):")
            head += [f"#   {k}: {_one_line(v)}  ({why})" for k, v, why in self.dropped]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.recipe, sort_keys=False, allow_unicode=True)


def _one_line(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return " ".join(text.split())  # a comment line holds it whole


class _Builder:
    def __init__(self, tool: str, cwd: Path, base: Path):
        self.tool, self.cwd, self.base = tool, cwd, base
        self.recipe: dict[str, Any] = {}
        self.dropped: list[tuple[str, Any, str]] = []
        self.notes: list[str] = []
        self.origin: dict[tuple[str, ...], str] = {}  # recipe key -> the tool's key that set it

    def set(self, dotted: str, value: Any, key: str) -> None:
        parts = dotted.split(".")
        node = self.recipe
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        self.origin[tuple(parts)] = key

    def drop(self, key: str, value: Any, why: str) -> None:
        self.dropped.append((key, value, why))

    def path(self, written: str, folder: Path | None = None, *, data: bool = True) -> str:
        """A path relative to `folder` (default the working directory, as the tools read them) made
        relative to the recipe's folder; a data source that is no local path (a hub id) kept."""
        p = (folder or self.cwd) / written
        if data and not os.path.lexists(p):
            return written
        return os.path.relpath(os.path.abspath(p), self.base)


def _scalar(b: _Builder, key: str, dotted: str, value: Any) -> None:
    """A field with an equivalent: convert the value where the tools spell it otherwise."""
    last = dotted.rsplit(".", 1)[-1]
    if last == "scheduler":
        if value not in _SCHEDULERS:
            return b.drop(key, value, f"peftctl's schedulers are {', '.join(sorted(set(_SCHEDULERS.values())))}")
        value = _SCHEDULERS[value]
    elif last == "optimizer":
        if value not in _OPTIMIZERS:
            return b.drop(key, value, f"peftctl's optimizers are {', '.join(OPTIMIZERS)}")
        value = _OPTIMIZERS[value]
    elif last == "chat_template":
        if value in ("tokenizer_default", "default", "empty", None):
            return b.drop(key, value, "unset, peftctl uses the tokenizer's template")
        if value not in NAMED_TEMPLATES:
            return b.drop(key, value, f"peftctl has no template named {value!r} (it has {', '.join(NAMED_TEMPLATES)}; "
                                      "unset uses the tokenizer's, or give the Jinja text)")
    elif last == "attn_implementation":
        if value not in _ATTENTION:
            return b.drop(key, value, "auto: transformers chooses")
        value = _ATTENTION[value]
    elif last in ("target_modules", "modules_to_save") and isinstance(value, str):
        value = "all-linear" if value == "all" else [m.strip() for m in value.split(",") if m.strip()]
    elif last == "method":
        if value in ("lora", "qlora"):
            if value == "qlora" and "quantization" not in b.recipe.get("model", {}):
                b.set("model.quantization", {"bits": 4, "quant_type": "nf4"}, key)
            value = "lora"
        else:
            raise InputError(f"{key}: {value}: peftctl trains adapters (lora and qlora here), not {value}")
    elif last == "bits":
        if value in (None, 0):
            return None
    elif last in ("max_steps",) and (value is None or value < 0):
        return b.drop(key, value, "unset: epochs count the steps")
    elif last in ("save_every", "eval_every", "log_every") and isinstance(value, float) and value < 1:
        return b.drop(key, value, "a fraction of the run: peftctl counts steps")
    elif last == "eval_split" and not (isinstance(value, float) and 0 < value < 1):
        return b.drop(key, value, "peftctl's eval_split is a fraction between 0 and 1 (0: no eval data)")
    elif last in ("dir", "cache_dir"):
        value = b.path(str(value), data=False)
    elif last == "init_adapter":
        value = b.path(str(value))  # a local adapter folder, read where the tool reads it
    b.set(dotted, value, key)
    return None


def _axolotl_source(b: _Builder, key: str, ds: Any) -> dict[str, Any] | None:
    if isinstance(ds, str):
        return {"path": b.path(ds)}
    if not isinstance(ds, dict) or "path" not in ds:
        b.drop(key, ds, "a dataset without a path")
        return None
    kind = ds.get("type", "alpaca")
    if kind == "chat_template.default":  # axolotl's preference rows (rl): messages, a chosen and a rejected message
        return _axolotl_pairs(b, key, ds)
    fmt = {"alpaca": "alpaca", "sharegpt": "sharegpt", "chat_template": "chat", "completion": "text"}.get(
        kind if isinstance(kind, str) else "")
    if fmt is None:
        b.drop(key, ds, f"dataset type {kind!r} has no equivalent (peftctl reads alpaca, sharegpt, "
                        "chat_template and completion, and chat_template.default pairs with rl)")
        return None
    src: dict[str, Any] = {"path": b.path(str(ds["path"])), "format": fmt}
    for theirs, ours in (("split", "split"), ("name", "subset")):
        if ds.get(theirs) is not None:
            src[ours] = ds[theirs]
    columns = {}
    if fmt == "chat":
        for theirs, ours in (("field_messages", "messages"), ("message_field_role", "role"),
                             ("message_field_content", "content")):
            if ds.get(theirs):
                columns[ours] = ds[theirs]
        mapping = ds.get("message_property_mappings") or {}
        for ours in ("role", "content"):
            if isinstance(mapping, dict) and mapping.get(ours):
                columns[ours] = mapping[ours]
        if isinstance(ds.get("roles"), dict):  # axolotl: {ours: [theirs, ...]}
            src["roles"] = {t: r for r, theirs in ds["roles"].items() for t in (theirs or []) if t != r}
    elif fmt == "text" and ds.get("field"):
        columns["text"] = ds["field"]
    if columns:
        src["columns"] = columns
    left = sorted(set(ds) - {"path", "type", "split", "name", "field_messages", "message_field_role",
                             "message_field_content", "message_property_mappings", "roles", "field"})
    for k in left:
        b.drop(f"{key}[{ds['path']}].{k}", ds[k], "no equivalent")
    return src


def _axolotl_pairs(b: _Builder, key: str, ds: dict[str, Any]) -> dict[str, Any]:
    """axolotl's `type: chat_template.default` preference dataset as a `preference` source."""
    src: dict[str, Any] = {"path": b.path(str(ds["path"])), "format": "preference"}
    for theirs, ours in (("split", "split"), ("name", "subset")):
        if ds.get(theirs) is not None:
            src[ours] = ds[theirs]
    mapping = ds.get("message_property_mappings") or {}
    columns = {"prompt": ds.get("field_messages", "messages"), "chosen": ds.get("field_chosen", "chosen"),
               "rejected": ds.get("field_rejected", "rejected"),
               "role": ds.get("message_field_role") or mapping.get("role", "role"),
               "content": ds.get("message_field_content") or mapping.get("content", "content")}
    columns = {k: v for k, v in columns.items() if k != v}
    if columns:
        src["columns"] = columns
    if isinstance(ds.get("roles"), dict):  # axolotl: {ours: [theirs, ...]}
        roles = {t: r for r, theirs in ds["roles"].items() for t in (theirs or []) if t != r}
        if roles:
            src["roles"] = roles
    for k in sorted(set(ds) - {"path", "type", "split", "name", "field_messages", "field_chosen", "field_rejected",
                                "message_property_mappings", "message_field_role", "message_field_content", "roles"}):
        b.drop(f"{key}[{ds['path']}].{k}", ds[k], "no equivalent")
    return src


def _llamafactory_sources(b: _Builder, key: str, names: Any, config: dict[str, Any]) -> list[dict[str, Any]]:
    folder = b.cwd / str(config.get("dataset_dir", "data"))
    info_file = folder / "dataset_info.json"
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names or [])
    if not info_file.is_file():
        b.drop(key, names, f"no {info_file} to look the dataset names up in")
        return []
    info = read_json(info_file, "LLaMA-Factory's dataset_info.json")
    sources = []
    for name in names:
        entry = info.get(name)
        if not isinstance(entry, dict) or not (entry.get("file_name") or entry.get("hf_hub_url")):
            b.drop(f"{key}: {name}", name, f"not a local file or hub dataset in {info_file}")
            continue
        path = b.path(entry["file_name"], folder) if entry.get("file_name") else entry["hf_hub_url"]
        cols, tags = entry.get("columns") or {}, entry.get("tags") or {}
        src: dict[str, Any] = {"path": path}
        if entry.get("split"):
            src["split"] = entry["split"]
        if entry.get("subset"):
            src["subset"] = entry["subset"]
        if bool(entry.get("ranking")) != (config.get("stage") == "dpo"):
            b.drop(f"{key}: {name}", name, "stage: dpo trains on ranking (preference) datasets only" if
                   config.get("stage") == "dpo" else "a ranking (preference) dataset, which stage: sft does not read")
            continue
        if entry.get("ranking"):
            if (ranked := _llamafactory_pairs(b, f"{key}: {name}", entry, src)) is not None:
                sources.append(ranked)
            continue
        if entry.get("formatting", "alpaca") == "alpaca":
            src["format"] = "alpaca"
            columns = {ours: cols[theirs] for theirs, ours in
                       (("prompt", "instruction"), ("query", "input"), ("response", "output")) if cols.get(theirs)}
        else:
            role, content = tags.get("role_tag", "from"), tags.get("content_tag", "value")
            chat = (role, content) == ("role", "content")
            src["format"] = "chat" if chat else "sharegpt"
            columns = {"messages": cols["messages"]} if cols.get("messages") else {}
            if not chat:
                columns |= {"role": role, "content": content} if (role, content) != ("from", "value") else {}
            roles = {tags[t]: r for t, r in (("user_tag", "user"), ("assistant_tag", "assistant"),
                                             ("system_tag", "system")) if tags.get(t) and tags[t] != r}
            if roles:
                src["roles"] = roles
        columns = {k: v for k, v in columns.items() if k != v}
        if columns:
            src["columns"] = columns
        sources.append(src)
    return sources


def _llamafactory_pairs(b: _Builder, key: str, entry: dict[str, Any], src: dict[str, Any]) -> dict[str, Any] | None:
    """A `ranking: true` dataset (LLaMA-Factory's preference data) as a `preference` source: alpaca
    rows (prompt, chosen, rejected as strings; the recipe's chat template renders them as turns, as
    LLaMA-Factory's template does) or sharegpt rows (a message list, then the chosen and the
    rejected message)."""
    cols, tags = entry.get("columns") or {}, entry.get("tags") or {}
    src["format"] = "preference"
    if entry.get("formatting", "alpaca") == "alpaca":
        # LLaMA-Factory's prompt is the instruction, then "\n" and the query (input) when a row has
        # one; peftctl's preference rows have one prompt field.
        if cols.get("query") or cols.get("history") or cols.get("system"):
            named = ", ".join(c for c in ("query", "history", "system") if cols.get(c))
            b.drop(key, entry.get("file_name") or entry.get("hf_hub_url"),
                   f"ranking rows with {named} columns: peftctl's preference rows are one prompt, a chosen and a "
                   "rejected answer (write the prompt as messages)")
            return None
        columns = {"prompt": cols.get("prompt", "instruction"), "chosen": cols.get("chosen", "chosen"),
                   "rejected": cols.get("rejected", "rejected")}
        b.notes.append(f"{key}: each row's {columns['prompt']!r} is the prompt; LLaMA-Factory adds the row's "
                       "'input' after it (a newline between), peftctl does not: rows with an input lose it")
    elif entry.get("formatting") == "sharegpt":
        if cols.get("system") or cols.get("tools"):
            b.drop(key, entry.get("file_name") or entry.get("hf_hub_url"),
                   "ranking rows with a system or tools column (write them into the prompt messages)")
            return None
        role, content = tags.get("role_tag", "from"), tags.get("content_tag", "value")
        columns = {"prompt": cols.get("messages", "conversations"), "chosen": cols.get("chosen", "chosen"),
                   "rejected": cols.get("rejected", "rejected"), "role": role, "content": content}
        roles = {tags.get(t, d): r for t, d, r in (("user_tag", "human", "user"), ("assistant_tag", "gpt", "assistant"),
                                                    ("system_tag", "system", "system")) if tags.get(t, d) != r}
        if roles:
            src["roles"] = roles
    else:
        b.drop(key, entry.get("formatting"), "ranking data is alpaca or sharegpt")
        return None
    columns = {k: v for k, v in columns.items() if k != v}
    if columns:
        src["columns"] = columns
    return src


# LLaMA-Factory's pref_loss as peftctl's objective (the others have none here).
_PREF_LOSSES = {"sigmoid": "dpo", "ipo": "ipo", "orpo": "orpo", "simpo": "simpo"}
# LLaMA-Factory's preference options (stage: dpo), translated together by `_llamafactory_preference`.
_PREFERENCE_KEYS = ("stage", "pref_loss", "pref_beta", "pref_ftx", "simpo_gamma", "dpo_label_smoothing",
                    "ld_alpha", "pref_bco_weight", "ref_model", "ref_model_adapters", "ref_model_quantization_bit")


def _llamafactory_preference(b: _Builder, config: dict[str, Any]) -> None:
    """stage and LLaMA-Factory's preference options (its RLHFArguments) as train.objective and its
    options: pref_loss sigmoid / ipo / orpo / simpo is dpo / ipo / orpo / simpo, pref_beta beta,
    simpo_gamma, dpo_label_smoothing label_smoothing (pref_loss sigmoid: LLaMA-Factory applies it
    there only). pref_ftx (LLaMA-Factory adds pref_ftx x the chosen answer's mean token NLL to the
    loss) is simpo's cpo_alpha and dpo / ipo's rpo_alpha where the schema has it; otherwise it must
    be 0. InputError for what would train another loss: another stage, pref_loss, a reference model
    other than the adapter-off one, ld_alpha, pref_bco_weight."""
    from peftctl.recipe.train import TrainSection

    stage = config.get("stage", "sft")
    given = {k: config[k] for k in _PREFERENCE_KEYS if config.get(k) is not None and k != "stage"}
    if stage == "sft":
        if "stage" in config:
            b.drop("stage", stage, _NOT_NEEDED["stage"])
        for k, v in given.items():
            b.drop(k, v, "used by stage: dpo only")
        return
    if stage != "dpo":
        raise InputError(f"stage: {stage}: peftctl translates stage sft and dpo (its objectives are sft, dpo, ipo, "
                         "orpo and simpo; no reward model, PPO or KTO)")
    loss = config.get("pref_loss") or "sigmoid"
    if loss not in _PREF_LOSSES:
        raise InputError(f"pref_loss: {loss}: peftctl has no such objective (pref_loss sigmoid, ipo, orpo and simpo "
                         "translate to train.objective dpo, ipo, orpo and simpo)")
    objective = _PREF_LOSSES[loss]
    b.set("train.objective", objective, "pref_loss" if "pref_loss" in config else "stage")
    for k in ("ld_alpha", "pref_bco_weight"):
        if given.get(k):
            raise InputError(f"{k}: {given[k]}: changes the {loss} loss in a way peftctl's {objective} does not "
                             f"(remove it to translate)")
    if given.get("ref_model"):
        raise InputError(f"ref_model: {given['ref_model']}: peftctl's reference is the model being trained with its "
                         "adapter off (or train.init_adapter's adapter on); a separate reference model is not "
                         "translated")
    for k in ("ref_model_adapters", "ref_model_quantization_bit"):
        if k in given:
            b.drop(k, given[k], "no ref_model: the reference is the trained model with its adapter off")
    if "pref_beta" in given:  # unset: 0.1, LLaMA-Factory's default and peftctl's
        b.set("train.beta", given["pref_beta"], "pref_beta")
    if "simpo_gamma" in given:
        if objective == "simpo":
            b.set("train.simpo_gamma", given["simpo_gamma"], "simpo_gamma")
        else:
            b.drop("simpo_gamma", given["simpo_gamma"], "used by pref_loss: simpo only")
    if "dpo_label_smoothing" in given:
        if objective == "dpo":
            b.set("train.label_smoothing", given["dpo_label_smoothing"], "dpo_label_smoothing")
        elif given["dpo_label_smoothing"]:
            b.drop("dpo_label_smoothing", given["dpo_label_smoothing"], "LLaMA-Factory applies it to pref_loss "
                   "sigmoid only")
    ftx = given.get("pref_ftx", 0)
    if ftx:
        weight = {"simpo": "cpo_alpha", "dpo": "rpo_alpha", "ipo": "rpo_alpha"}.get(objective)
        if weight is not None and weight in TrainSection.model_fields:
            b.set(f"train.{weight}", ftx, "pref_ftx")
            b.notes.append(f"pref_ftx: {ftx} is train.{weight}: the weight of the chosen answers' token NLL, averaged "
                           "over all chosen tokens of a step (LLaMA-Factory averages each answer's first, then the "
                           "answers: the same when the answers are equally long)")
        else:
            why = ("orpo's NLL weight is 1 here, as in TRL (LLaMA-Factory's is 1 + pref_ftx)" if objective == "orpo"
                   else f"peftctl's {objective} has no NLL term on the chosen answers")
            raise InputError(f"pref_ftx: {ftx}: {why}; set pref_ftx: 0 to translate"
                             + ("" if objective == "orpo" else ", or use pref_loss: simpo (cpo_alpha)"))
    if objective == "orpo":
        b.notes.append("pref_loss: orpo is TRL's ORPO: its NLL term is the mean over the chosen sequences' prompt "
                       "and answer tokens (LLaMA-Factory's: the mean of each chosen answer's token average)")
    _from_adapter_note(b, objective, config.get("adapter_name_or_path"), "adapter_name_or_path", "LLaMA-Factory")


def _from_adapter_note(b: _Builder, objective: str, adapter: Any, key: str, tool: str) -> None:
    """dpo / ipo from an existing adapter: peftctl's reference is then the model with that adapter
    (precomputed, which the recipe requires); the tools' is the base with the adapter off."""
    if objective in ("dpo", "ipo") and adapter:
        b.set("train.precompute_ref_log_probs", True, key)
        b.notes.append(f"{key} with {objective}: the reference is the model with that adapter (train.init_adapter, "
                       f"precomputed); {tool}'s is the base model with the adapter off"
                       + (" (unless create_new_adapter: true, which merges it first)" if tool == "LLaMA-Factory" else ""))


def _report_to(b: _Builder, key: str, value: Any) -> None:
    """transformers' (and LLaMA-Factory's) report_to: the trackers peftctl has are switched on."""
    for name in [value] if isinstance(value, str) else list(value or []):
        if name in ("tensorboard", "mlflow", "wandb"):
            b.set(f"tracking.{name}", True, key)
        elif name not in ("none", None):
            b.drop(f"{key}: {name}", name, "peftctl's trackers are tensorboard, mlflow and wandb")


def _axolotl_special(b: _Builder, key: str, value: Any, config: dict[str, Any]) -> bool:
    if key == "wandb_project":
        if value and config.get("wandb_mode") != "disabled":
            b.set("tracking.wandb", True, key)
            b.set("tracking.wandb_project", value, key)
    elif key == "wandb_mode" and value == "disabled":
        b.set("tracking.wandb", False, key)
    elif key == "use_wandb":
        b.set("tracking.wandb", bool(value), key)
    elif key == "rl":
        if value is False:
            return True  # no preference training: the default objective
        if value not in _PREF_LOSSES.values():
            raise InputError(f"rl: {value}: peftctl's preference objectives are dpo, ipo, orpo and simpo "
                             "(train.objective); no KTO, GRPO or PPO")
        b.set("train.objective", value, key)
        if value == "simpo" and config.get("cpo_alpha") is None:
            b.set("train.cpo_alpha", 1.0, key)  # axolotl leaves TRL's CPOConfig default; peftctl's is 0
        _from_adapter_note(b, value, config.get("lora_model_dir"), "lora_model_dir", "axolotl")
    elif key == "orpo_alpha":
        # axolotl passes orpo_alpha to TRL's ORPO beta (the odds-ratio term's weight) when rl_beta is unset.
        if config.get("rl") == "orpo" and config.get("rl_beta") is None and value is not None:
            b.set("train.beta", value, key)
        else:
            b.drop(key, value, "axolotl reads it as ORPO's beta only with rl: orpo and no rl_beta")
    elif key == "rpo_alpha" and key not in foreign_names("axolotl"):
        # TRL's RPO: an NLL term on the chosen answers added to dpo's loss; none here unless the schema has it.
        if value:
            raise InputError(f"rpo_alpha: {value}: peftctl's dpo has no NLL term on the chosen answers; set "
                             "rpo_alpha: 0 (or unset) to translate")
        b.drop(key, value, "0: no NLL term, as peftctl's dpo")
    elif key in ("datasets", "test_datasets"):
        sources = [s for ds in (value if isinstance(value, list) else [value])
                   if (s := _axolotl_source(b, key, ds)) is not None]
        pairs = config.get("rl") in _PREF_LOSSES.values()
        for s in [s for s in sources if (s.get("format") == "preference") != pairs]:
            sources.remove(s)
            b.drop(f"{key}[{s['path']}]", s.get("format"), "rl trains on preference datasets "
                   "(type: chat_template.default) only" if pairs else "a preference dataset, which needs rl")
        if sources:
            b.set("data.train" if key == "datasets" else "data.eval", sources, key)
    elif key in ("bf16", "fp16"):
        if value in (True, "auto"):
            b.set("model.dtype", "bfloat16" if key == "bf16" else "float16", key)
        elif value is not False:
            b.drop(key, value, "true, auto or false")
    elif key in ("load_in_4bit", "load_in_8bit"):
        if value:
            b.set("model.quantization", {"bits": 4, "quant_type": "nf4"} if key == "load_in_4bit" else {"bits": 8}, key)
    elif key == "lora_target_linear":
        if value:
            b.set("adapter.target_modules", "all-linear", key)
    elif key == "train_on_inputs":
        b.set("data.train_on", "all" if value else "assistant", key)
    elif key in ("flash_attention", "sdp_attention"):
        if value:
            b.set("model.attn_implementation", "flash_attention_2" if key == "flash_attention" else "sdpa", key)
    else:
        return False
    return True


def _llamafactory_special(b: _Builder, key: str, value: Any, config: dict[str, Any]) -> bool:
    if key == "report_to":
        _report_to(b, key, value)
    elif key in ("dataset", "eval_dataset"):
        sources = _llamafactory_sources(b, key, value, config)
        if sources:
            b.set("data.train" if key == "dataset" else "data.eval", sources, key)
    elif key in ("bf16", "fp16", "pure_bf16"):
        if value:
            b.set("model.dtype", "float16" if key == "fp16" else "bfloat16", key)
    elif key in _PREFERENCE_KEYS:
        pass  # _llamafactory_preference
    elif key == "train_on_prompt":
        if value:
            b.set("data.train_on", "all", key)
    elif key == "mask_history":
        if value:
            b.set("data.train_on", "last", key)
    elif key == "quantization_bit":
        if value in (4, 8):
            b.set("model.quantization.bits", value, key)
            if value == 4 and "quant_type" not in b.recipe["model"]["quantization"]:
                b.set("model.quantization.quant_type", "nf4", key)
        elif value is not None:
            b.drop(key, value, "bitsandbytes quantizes to 4 or 8 bits")
    elif key == "quantization_method" and value not in (None, "bitsandbytes", "bnb"):
        raise InputError(f"quantization_method: {value}: peftctl quantizes with bitsandbytes only")
    else:
        return False
    return True


def translate(config: dict[str, Any], tool: str, *, cwd: Path, base: Path) -> Translation:
    """`config` (an axolotl or LLaMA-Factory YAML config as data; `tool` one of TRANSLATORS) as a
    recipe whose relative paths hold for a file in folder `base`; the tool's own relative paths are
    read against `cwd`, as the tool reads them. InputError: an option that makes the config
    untranslatable (full fine-tuning, another training stage, no data)."""
    b = _Builder(tool, cwd, base)
    names = foreign_names(tool)
    special = _axolotl_special if tool == "axolotl" else _llamafactory_special
    if tool == "llamafactory":
        _llamafactory_preference(b, config)
    for key, value in config.items():
        if value is None:
            continue  # unset there: the default here too
        if special(b, key, value, config):
            continue
        if key in names:
            _scalar(b, key, names[key], value)
        elif key in _NOT_NEEDED:
            b.drop(key, value, _NOT_NEEDED[key])
        else:
            b.drop(key, value, "no equivalent in peftctl")
    if "train" not in b.recipe.get("data", {}):
        raise InputError(f"no training data could be translated ({'datasets' if tool == 'axolotl' else 'dataset'}); "
                         "write data.train in the recipe by hand")
    if "output" not in b.recipe:
        b.set("output.dir", "runs/translated", "output_dir")
    train = b.recipe.get("train", {})
    if train.get("max_steps") is not None and train.get("epochs") is not None:
        # transformers' Trainer (under both tools): a positive max_steps overrides num_train_epochs.
        b.drop(b.origin[("train", "epochs")], train.pop("epochs"), "max_steps is set, which overrides it (as in "
               "transformers' Trainer)")
    _drop_refused(b)
    order = list(Recipe.model_fields)
    return Translation(dict(sorted(b.recipe.items(), key=lambda kv: order.index(kv[0]))), b.dropped, b.notes)


def _drop_refused(b: _Builder) -> None:
    """Drop what the schema refuses (each with its message) until the recipe validates."""
    from peftctl.recipe.loading import from_dict

    for _ in range(100):
        try:
            from_dict(b.recipe, base_dir=b.base)
            return
        except RecipeError as e:
            problems = e.problems
        removed = False
        for p in problems:
            key = _set_key(b, p)
            if key is None:
                continue
            node = b.recipe
            for part in key[:-1]:
                node = node[part]
            if key[-1] in node:
                b.drop(b.origin[key], node.pop(key[-1]), p.message)
                removed = True
        if not removed:
            raise RecipeError(problems)


def _set_key(b: _Builder, p: Problem) -> tuple[str, ...] | None:
    """The key the translation set that problem `p` is about (its path, or the field a message of a
    section's cross-check names, such as train.eval_every)."""
    path = tuple(str(x) for x in p.path.split(".")) if p.path else ()
    for n in range(len(path), 0, -1):
        if path[:n] in b.origin:
            return path[:n]
    for key in b.origin:
        if ".".join(key) in p.message and len(key) > 1:
            return key
    return None


def read_config(path: Path, tool: str) -> dict[str, Any]:
    """An axolotl or LLaMA-Factory YAML config file as data (safe YAML, the recipe's limits)."""
    with reading(path, f"an {tool} config"):
        text = path.read_text(encoding="utf-8")
    data, _, problems = parse_yaml(text, str(path))
    if problems:
        raise RecipeError(problems)
    if not isinstance(data, dict):
        raise InputError(f"{path}: an {tool} config is a mapping of options")
    return data


def translate_file(path: str | os.PathLike, tool: str, output: str | os.PathLike | None = None) -> dict[str, Any]:
    """Translate the config file `path` of `tool` (one of TRANSLATORS); write the recipe to `output`
    (a new file, written atomically; an existing one is refused) when given. Returns {"recipe" (data),
    "yaml" (the text, the dropped options as comments on top), "dropped": [{"key", "value",
    "reason"}], "output"}. InputError / RecipeError (exit 2) for a bad file or an untranslatable config."""
    from peftctl.fsio import atomic_write_text

    if tool not in TRANSLATORS:
        raise ValueError(f"unknown tool {tool!r}; known: {', '.join(TRANSLATORS)}")
    path = Path(path)
    out = Path(output) if output is not None else None
    if out is not None and os.path.lexists(out):
        raise InputError(f"--output {out}: exists; peftctl never overwrites a file (choose another name)")
    config = read_config(path, tool)
    base = (out.parent if out is not None else Path.cwd()).absolute()
    t = translate(config, tool, cwd=Path.cwd(), base=base)
    text = t.to_yaml(tool, str(path))
    if out is not None:
        atomic_write_text(out, text)
    return {"recipe": t.recipe, "yaml": text, "output": str(out) if out is not None else None,
            "dropped": [{"key": k, "value": v, "reason": why} for k, v, why in t.dropped], "notes": t.notes}
