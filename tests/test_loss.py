"""The training loss: only loss positions get logits, and the result is the plain formula's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftctl.data import Example, collate
from peftctl.loss import loss_sum


def test_loss_sum_equals_full_logits_cross_entropy(tiny_llama):
    model = tiny_llama().double()
    torch.manual_seed(0)
    examples = []
    for n, start in ((12, 7), (9, 3), (15, 14)):
        ids = torch.randint(0, 300, (n,)).tolist()
        examples.append(Example(ids, [-100] * start + ids[start:]))
    batch = collate(examples, pad_id=0)
    loss, n = loss_sum(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")
    assert n == (12 - 7) + (9 - 3) + (15 - 14)
    assert torch.allclose(loss.double(), ref, rtol=1e-10)


def test_plain_head_path_matches_the_model_logits_and_gradients(tiny_llama):
    """Llama's head is bypassed (no logits); loss and adapter gradients equal the plain path's."""
    from peftctl import LoraConfig, get_peft_model
    from peftctl import loss as loss_mod

    torch.manual_seed(0)
    examples = [Example(ids, [-100] * 4 + ids[4:]) for ids in (torch.randint(0, 300, (n,)).tolist() for n in (10, 14))]
    batch = collate(examples, pad_id=0)
    results = []
    for fused in (True, False):
        torch.manual_seed(1)
        model = get_peft_model(tiny_llama().double(), LoraConfig(r=4, target_modules="all-linear",
                                                                 init_lora_weights=False))
        assert (loss_mod.plain_head(model.base_model.model) is not None) is True
        if not fused:
            loss_mod.PLAIN_HEAD_TYPES, saved = frozenset(), loss_mod.PLAIN_HEAD_TYPES
        try:
            loss, n = loss_sum(model, batch)
        finally:
            if not fused:
                loss_mod.PLAIN_HEAD_TYPES = saved
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    assert "forward" not in vars(model.base_model.model.lm_head)  # the head is restored
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-10)
    for k, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][k], rtol=1e-8, atol=1e-12), k
