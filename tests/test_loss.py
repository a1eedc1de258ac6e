"""The training loss: only loss positions get logits, and the result is the plain formula's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftctl.data import Example, collate
from peftctl.train.loss import loss_sum


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
