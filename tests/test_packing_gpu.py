"""Packing on a GPU: the eval loss with and without packing, for each attention path peftctl packs for.

Runs only where CUDA is available (the CPU suite covers the same layouts with SDPA and eager on CPU);
flash attention additionally needs the flash_attn package.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from peftctl import data as data_lib
from peftctl.recipe import DataSection

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


@pytest.mark.parametrize("attention, dtype, rel", [
    ("sdpa", torch.float32, 1e-4),
    ("eager", torch.float32, 1e-4),
    ("sdpa", torch.bfloat16, 1e-2),
    ("eager", torch.bfloat16, 1e-2),
    ("flash_attention_2", torch.bfloat16, 1e-2),
])
def test_packing_leaves_the_eval_loss_unchanged_on_gpu(chat_data, tiny_model_dir, attention, dtype, rel):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftctl.loss import eval_loss

    if attention.startswith("flash") and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attention_2 needs the flash_attn package, which is not installed here")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention, dtype=dtype)
    model = model.to("cuda").eval()
    cfg = dict(train=str(chat_data[0]), max_length=256, cache=False)
    plain = data_lib.build(DataSection(**cfg), tok).train
    packed = data_lib.build(DataSection(**cfg, packing=True), tok, attention=attention).train
    loss, n = eval_loss(model, plain, 8, tok.pad_token_id, torch.device("cuda"))
    loss_p, n_p = eval_loss(model, packed, 4, tok.pad_token_id, torch.device("cuda"))
    print(f"{attention} {dtype}: unpacked {loss / n:.6f}, packed {loss_p / n_p:.6f}")
    assert n == n_p
    assert loss_p / n_p == pytest.approx(loss / n, rel=rel)
