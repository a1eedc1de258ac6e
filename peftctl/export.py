"""`peftctl export`: a run in a form to ship: the PEFT adapter with a model card (`peft`), the
merged model as a transformers folder (`merged`), or as one GGUF file for llama.cpp and Ollama
(`gguf`, llama-family models)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from peftctl.constants import DTYPES
from peftctl.errors import InputError
from peftctl.fsio import atomic_dir
from peftctl.ui import Reporter, rounded

FORMATS = ("peft", "merged", "gguf")
GGUF_FILE = "model.gguf"

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)


def _builtin_note(run) -> str | None:
    """What the base model is when the run used a built-in alias (its weights are a GGUF file's)."""
    from peftctl import models

    alias = run.recipe.model.name_or_path if run.recipe is not None else None
    alias = alias if alias in models.BUILTIN_MODELS else models.builtin_for_hub_id(
        run.adapter_config.get("base_model_name_or_path"))
    if alias is None:
        return None
    b = models.BUILTIN_MODELS[alias]
    if b.gguf_file is None:  # a plain model folder shipped in a package: the weights as they are
        return (f"The base model was peftctl's built-in `{alias}`: `{b.hub_id}` as the `{b.distribution}` package "
                f"ships it (a transformers folder). The adapter loads on `{b.hub_id}` from the hub as well.")
    return (f"The base model was peftctl's built-in `{alias}`: `{b.hub_id}` as the {b.gguf_file} file of the "
            f"`{b.distribution}` package holds it, dequantized to floating point. The adapter loads on `{b.hub_id}` "
            "from the hub as well; its outputs there differ slightly, by the quantization error of the GGUF file's "
            "weights it was trained on.")


def _portable_fields(run) -> dict[str, Any]:
    """What a recipe run's adapter config records today, for runs trained before too: the built-in
    model under its original hub id (not this machine's cache path), and the task type (CAUSAL_LM)
    that PEFT's AutoPeftModel needs."""
    from peftctl import models

    if run.recipe is None:
        return {}
    update: dict[str, Any] = {}
    if run.recipe.model.name_or_path in models.BUILTIN_MODELS:
        update["base_model_name_or_path"] = models.base_model_reference(run.recipe.model)
    if run.adapter_config.get("task_type") is None:
        update["task_type"] = "CAUSAL_LM"
    return update


def _card_settings(cfg: dict) -> list[str]:
    """The adapter_config.json keys a model card lists: the method and its own options (those set),
    the targets and the task type."""
    from peftctl.adapters.config import AdapterConfig
    from peftctl.adapters.registry import config_classes

    cls = next((c for c in config_classes() if c.peft_type == cfg.get("peft_type")), None)
    own = [k for k in (cls.model_fields if cls else ()) if k not in AdapterConfig.model_fields]
    keys = ["peft_type", *own, "target_modules", "task_type"]
    return [k for k in keys if k in cfg and cfg[k] not in (None, {}, [])]


def model_card(run, summary: dict | None, converted_from: str | None = None) -> str:
    cfg = run.adapter_config
    base = cfg.get("base_model_name_or_path")
    note = _builtin_note(run)
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [peftctl, " + str(cfg.get("peft_type", "")).lower() + "]",
        "---",
        "",
        f"# {cfg.get('peft_type')} adapter",
        "",
        f"Trained with peftctl on `{base}`.",
        "",
        *([note, ""] if note else []),
        "| setting | value |",
        "|---|---|",
    ]
    for key in _card_settings(cfg):
        lines.append(f"| {key} | {rounded(cfg[key])} |")
    quantization = run.recipe.model.quantization if run.recipe is not None else None
    if quantization is not None:
        how = (f"{quantization.bits}-bit {quantization.quant_type}" + (" (double quantization)" if quantization.double_quant else "")
               if quantization.bits == 4 else "8-bit (LLM.int8)")
        lines.append(f"| base model quantized in training | {how}, bitsandbytes |")
    if summary:
        lines += ["", "## Training", ""]
        for key in ("steps", "train_loss", "tokens_seen", "train_time_s"):
            if summary.get(key) is not None:
                lines.append(f"- {key}: {rounded(summary[key])}")
        if summary.get("final_eval"):
            lines.append(f"- final eval: {json.dumps(rounded(summary['final_eval']))}")
    from peftctl.models import AUTO_CLASSES

    section = run.model_section
    auto = AUTO_CLASSES[section.task_name]
    labels = (f", num_labels={len(section.labels)}, id2label={dict(enumerate(section.labels))!r}, "
              f"label2id={ {name: i for i, name in enumerate(section.labels)}!r}") if section.labels else ""
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {auto}",
        "from peft import PeftModel  # or: from peftctl import PeftModel",
        "",
        f"base = {auto}.from_pretrained({cfg.get('base_model_name_or_path')!r}{labels})",
        "model = PeftModel.from_pretrained(base, 'path/to/this/folder')",
        "```",
    ]
    if converted_from is not None:
        lines += [
            "",
            f"Trained with `init_lora_weights: {converted_from}`, which moves part of the base weights into the "
            "adapter. This folder holds the equivalent plain LoRA (rank 2r, `init_lora_weights: true`) for the "
            "original base model: load it on the unchanged base, as any LoRA adapter.",
        ]
    if quantization is not None:
        lines += [
            "",
            "The adapter was trained on the base quantized as above. It loads on the base in its original "
            "precision as well (the outputs differ by the quantization error); to deploy, `peftctl merge` folds "
            "it into the full-precision base and reports how far the result is from the model as trained.",
        ]
    if run.recipe is not None:
        lines += ["", "## Recipe", "", "```yaml", run.recipe.to_yaml().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def export(run_dir: str | Path, fmt: str, out_dir: str | Path, dtype: str | None = None,
           max_shard_size: str | int | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    from peftctl import runs

    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if max_shard_size is not None and fmt != "merged":
        raise InputError(f"--max-shard-size applies to --format merged, not {fmt}")
    if dtype is not None and fmt == "peft":
        raise InputError("--dtype applies to --format merged or gguf; --format peft copies the adapter as saved")
    if fmt == "merged":
        from peftctl.merge import merge_run

        return {"format": fmt, **merge_run(run_dir, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                                           reporter=reporter)}
    if fmt == "gguf":
        return _export_gguf(run_dir, out_dir, dtype or "float16", reporter or Reporter())
    run = runs.read_run(run_dir)
    portable = _portable_fields(run)
    run.adapter_config.update(portable)
    converted = _plain_lora(run, reporter or Reporter()) if _changes_base_weights(run) else None
    if converted is not None and portable:
        converted = (converted[0], converted[1].model_copy(update=portable))
    files = []
    with atomic_dir(out_dir) as tmp:
        if converted is not None:
            from peftctl.adapters import io

            tensors, config = converted
            io.save_tensors(tensors, tmp)
            config.save_pretrained(tmp)
            files += ["adapter_config.json", "adapter_model.safetensors"]
        for name in ("adapter_config.json", "adapter_model.safetensors", *_TOKENIZER_FILES):
            if (run.path / name).exists() and name not in files:
                shutil.copy2(run.path / name, tmp / name)
                files.append(name)
        if converted is None:  # the run's config, with what older runs did not record
            (tmp / "adapter_config.json").write_text(json.dumps(run.adapter_config, indent=2, sort_keys=True) + "\n",
                                                     encoding="utf-8")
        card = model_card(run, run.summary) if converted is None else model_card(
            dataclasses.replace(run, adapter_config=converted[1].to_peft_dict()), run.summary,
            converted_from=run.adapter_config.get("init_lora_weights"))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        files.append("README.md")
    result = {"format": fmt, "output": str(out_dir), "files": files}
    if converted is not None:
        result["converted_from"] = run.adapter_config.get("init_lora_weights")
    return result


def _changes_base_weights(run) -> bool:
    init = run.adapter_config.get("init_lora_weights")
    return run.adapter_config.get("peft_type") == "LORA" and isinstance(init, str) and init != "gaussian"


def _plain_lora(run, reporter: Reporter):
    """A PiSSA / OLoRA run as the equivalent plain LoRA of rank 2r on the original base model.

    Such an adapter only fits a base whose weights went through its init (W - scaling * B0 A0), and
    PEFT redoes that init when it loads the adapter: for `pissa_niter_<n>` with its own random
    generator, so its base moves away from the one trained on. The init is recomputed here on the
    original base (deterministic in peftctl, so the same B0, A0 as in training on this machine), and
    the trained B A becomes [B | -B0] [A ; A0], which any PEFT loads on the original base.
    """
    from peftctl import models
    from peftctl.adapters import io
    from peftctl.adapters.config import AdapterConfig
    from peftctl.adapters.lora.init import as_plain_lora
    from peftctl.adapters.peft_model import PeftModel, get_peft_model_state_dict

    reporter.log(f"converting the {run.adapter_config.get('init_lora_weights')} adapter to plain LoRA for the "
                 "original base model (this loads the base model)")
    try:
        config = AdapterConfig.from_pretrained(run.path)
        spec = run.model_section
        base = models.load_model(spec.model_copy(update={"quantization": None}))
        initial = PeftModel._for_loading(base, config, "default")  # runs the init: B0, A0
        start = {k: t.clone() for k, t in get_peft_model_state_dict(initial).items()}
        return as_plain_lora(io.read_weights(run.path), start, config,
                             f"{run.path} (its init, recomputed on {spec.name_or_path})")
    except (ValueError, TypeError) as e:
        raise InputError(f"{run.path}: cannot convert the {run.adapter_config.get('init_lora_weights')} adapter to "
                         f"plain LoRA: {e}") from None


def _export_gguf(run_dir, out_dir, dtype: str, reporter: Reporter) -> dict[str, Any]:
    """Merge (into the base in its original precision) and write OUT_DIR/model.gguf."""
    from peftctl import gguf_writer, models, runs
    from peftctl.fsio import refuse_nonempty
    from peftctl.merge import merged_model

    if dtype not in DTYPES:
        raise InputError(f"--dtype for gguf must be one of {', '.join(DTYPES)}, got {dtype!r}")
    refuse_nonempty(Path(out_dir))
    run = runs.read_run(run_dir)
    task = run.model_section.task_name
    if task != "causal_lm":
        raise InputError(f"{run_dir}: --format gguf writes causal language models (llama.cpp's), and this run is "
                         f"model.task {task}; use --format merged (a transformers folder) or peft")
    # What the file cannot hold is refused before any weights load.
    gguf_writer.check_config(models.load_config(run.model_section), run.model_section.name_or_path)
    gguf_writer.check_tokenizer(runs.load_tokenizer(run))
    merged, tokenizer, report = merged_model([run_dir], reporter=reporter)
    reporter.log(f"writing {GGUF_FILE} ({dtype})")
    with atomic_dir(out_dir) as tmp:
        info = gguf_writer.write(merged, tokenizer, tmp / GGUF_FILE, dtype=dtype, name=Path(run_dir).resolve().name)
        size = (tmp / GGUF_FILE).stat().st_size
    if info["pre_tokenizer"] is None:
        reporter.log("the tokenizer's pre-tokenizer is not one llama.cpp knows by name: llama.cpp will split text "
                     "with its default rule, which may tokenize some text differently")
    result = {"format": "gguf", "output": str(out_dir), "file": str(Path(out_dir) / GGUF_FILE), "dtype": dtype,
              "bytes": size, "max_logit_diff": report["max_logit_diff"], **info}
    if "vs_quantized_training_model" in report:
        result["vs_quantized_training_model"] = report["vs_quantized_training_model"]
    return result
