"""The causal-LM loss, summed over loss tokens (callers divide by the token count they choose).

Only positions that predict a loss token get logits: the model is called with `logits_to_keep`
set to those positions, so a batch whose prompts are masked skips most of the output-head matmul
(vocabulary-sized) and its backward.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
import torch.nn.functional as F

IGNORE = -100


@cache
def _accepts_logits_to_keep(forward) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _inner_forward(model):
    # Through DDP's wrapper (`module`) and peftctl's to the transformers model's own forward.
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    while hasattr(model, "base_model") and hasattr(model.base_model, "model"):
        model = model.base_model.model
    return type(model).forward


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over loss tokens, number of loss tokens) for one batch."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    n_tokens = int((targets != IGNORE).sum())
    # Every key but the labels is a model input (input_ids, attention_mask, position_ids, ...).
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    if _accepts_logits_to_keep(_inner_forward(model)):
        positions = torch.nonzero((targets != IGNORE).any(dim=0)).squeeze(1)
        logits = model(**kwargs, logits_to_keep=positions).logits
        targets = targets[:, positions]
    else:
        logits = model(**kwargs).logits[:, :-1]
    # Cross-entropy in float32 on the kept logits, as transformers' own loss does: bf16 logits lose
    # the precision a softmax over a large vocabulary needs.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1).to(logits.device),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, n_tokens


@torch.no_grad()
def eval_loss(model, examples, batch_size: int, pad_id: int, device) -> tuple[float, int]:
    """(summed loss, loss tokens) over examples, batched by similar length to limit padding."""
    from peftctl.data import collate

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    for i in range(0, len(order), batch_size):
        batch = collate([examples[j] for j in order[i : i + batch_size]], pad_id)
        loss, n = loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        total += float(loss)
        count += n
    return total, count
