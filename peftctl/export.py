"""`peftctl export`: a run in a form to ship: the PEFT adapter with a model card, or merged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from peftctl.errors import InputError
from peftctl.fsio import atomic_dir
from peftctl.ui import Reporter

FORMATS = ("peft", "merged")

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)


def model_card(run, summary: dict | None) -> str:
    cfg = run.adapter_config
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {cfg.get('base_model_name_or_path')}",
        "tags: [peftctl, " + str(cfg.get("peft_type", "")).lower() + "]",
        "---",
        "",
        f"# {cfg.get('peft_type')} adapter",
        "",
        f"Trained with peftctl on `{cfg.get('base_model_name_or_path')}`.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "task_type"):
        if key in cfg:
            lines.append(f"| {key} | {cfg[key]} |")
    if summary:
        lines += ["", "## Training", ""]
        for key in ("steps", "train_loss", "tokens_seen", "train_time_s"):
            if summary.get(key) is not None:
                lines.append(f"- {key}: {summary[key]}")
        if summary.get("final_eval"):
            lines.append(f"- final eval: {json.dumps(summary['final_eval'])}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel  # or: from peftctl import PeftModel",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({cfg.get('base_model_name_or_path')!r})",
        "model = PeftModel.from_pretrained(base, 'path/to/this/folder')",
        "```",
    ]
    if run.recipe is not None:
        lines += ["", "## Recipe", "", "```yaml", run.recipe.to_yaml().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def export(run_dir: str | Path, fmt: str, out_dir: str | Path, dtype: str | None = None,
           reporter: Reporter | None = None) -> dict[str, Any]:
    from peftctl import runs

    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "merged":
        from peftctl.merge import merge_run

        return {"format": fmt, **merge_run(run_dir, out_dir, dtype=dtype, reporter=reporter)}
    run = runs.read_run(run_dir)
    files = []
    with atomic_dir(out_dir) as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors", *_TOKENIZER_FILES):
            if (run.path / name).exists():
                shutil.copy2(run.path / name, tmp / name)
                files.append(name)
        (tmp / "README.md").write_text(model_card(run, run.summary), encoding="utf-8")
        files.append("README.md")
    return {"format": fmt, "output": str(out_dir), "files": files}
