"""Tiny, complete, offline model folders for tests: a 2-layer Llama and a byte-level BPE tokenizer
with a ChatML template, built in-process in well under a second; and the inputs several test
modules share (a recipe's text, a YAML alias bomb)."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
        lines.append(f"Convert {MONTHS[m - 1]} {d}, {y} to ISO: {y:04d}-{m:02d}-{d:02d}")
    lines += ["The quick brown fox jumps over the lazy dog.", "Below is an instruction that describes a task."]
    return lines


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path, seed: int = 0, vocab_size: int = 320, tie_word_embeddings: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_chat_data(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Convert {MONTHS[m - 1]} {d}, {y} to ISO"},
                {"role": "assistant", "content": f"{y:04d}-{m:02d}-{d:02d}"},
            ]}) + "\n")
    return path


def recipe_text(model_dir: Path, train_path: str, eval_path: str | None, out_dir: str, **sections) -> str:
    """A small, fast recipe over the tiny model; `sections` override whole sections' fields."""
    import yaml

    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": train_path, "format": "chat", "max_length": 64, **({"eval": eval_path} if eval_path else {})},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "log_every": 2, "warmup_steps": 1, "seed": 0},
        "eval": {"batch_size": 8, "max_new_tokens": 12},
        "output": {"dir": out_dir},
    }
    for name, fields in sections.items():
        if name == "adapter" and fields.get("method", "lora") != "lora":
            recipe["adapter"] = dict(fields)  # another method: none of LoRA's fields
        else:
            recipe.setdefault(name, {}).update(fields)
    return yaml.safe_dump(recipe, sort_keys=False)


def alias_bomb(levels: int = 7, width: int = 9) -> str:
    """`levels` levels of `width` aliases: width**levels values from a few hundred bytes."""
    names = [chr(ord("a") + i) for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]"]
    for prev, name in zip(names, names[1:], strict=False):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * width)}]")
    return "\n".join(lines) + "\n"


def checkpointing_runs(make_model, batch):
    """Train-mode forward and backward of `batch` without, then with, gradient checkpointing.

    Returns (calls, grads): how often layer 0's attention ran in each run (1, then 2 when the
    backward pass recomputes it) and each run's float32 gradients of the trainable parameters.
    """
    import torch

    from peftctl.loss import loss_sum
    from peftctl.train import enable_gradient_checkpointing

    calls, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = make_model()
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        calls.append(0)
        model.get_base_model().model.layers[0].self_attn.register_forward_hook(
            lambda *a: calls.__setitem__(-1, calls[-1] + 1))
        loss, _ = loss_sum(model, batch)
        loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    return calls, grads


def write_preference_data(path: Path, n: int, seed: int = 0, messages: bool = False) -> Path:
    """Preference pairs: a date question, the ISO answer chosen, a wrong one (day and month
    swapped, or another year) rejected; prompts and answers as strings, or as message lists."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
            prompt = f"Convert {MONTHS[m - 1]} {d}, {y} to ISO: "
            chosen = f"{y:04d}-{m:02d}-{d:02d}"
            rejected = f"{y:04d}-{d:02d}-{m:02d}" if i % 2 else f"{y + 1:04d}-{m:02d}-{d:02d}"
            if messages:
                row = {"prompt": [{"role": "user", "content": prompt.strip()}],
                       "chosen": [{"role": "assistant", "content": chosen}],
                       "rejected": [{"role": "assistant", "content": rejected}]}
            else:
                row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(row) + "\n")
    return path
