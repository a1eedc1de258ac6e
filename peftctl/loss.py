"""The causal-LM loss, summed over loss tokens (callers divide by the token count they choose).

Only positions that predict a loss token reach the output head: the model is called with
`logits_to_keep` set to those positions, so a batch whose prompts are masked skips most of the
vocabulary-sized matmul and its backward. Where the head is a plain linear layer whose output the
model returns as is (Llama-family architectures), its logits are never materialised either: the
head's input is taken and the loss computed chunk by chunk (`kernels.linear_cross_entropy`).
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.constants import IGNORE_INDEX as IGNORE
from peftctl.kernels.linear_cross_entropy import linear_cross_entropy_sum

# Architectures whose logits are exactly lm_head(hidden states): no soft-capping, scaling or bias
# after the head. Others (Gemma 2/3, Cohere, Granite, ...) take the model's own logits.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "phi3"})


@cache
def _accepts_logits_to_keep(forward) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def inner_model(model):
    """The transformers model inside DDP's wrapper (`module`) and peftctl's (`base_model.model`)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    while hasattr(model, "base_model") and hasattr(model.base_model, "model"):
        model = model.base_model.model
    return model


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def plain_head(inner) -> nn.Linear | None:
    """The output head when the loss may bypass its logits, else None."""
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    # Exactly nn.Linear: not a modules_to_save copy, an adapter layer or a sharded (FSDP) module.
    if type(head) is not nn.Linear or head.bias is not None or type(head.weight) is not nn.Parameter:
        return None
    if hasattr(head, "_hf_hook") or "forward" in vars(head):  # accelerate's dispatch hooks
        return None
    return head


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over loss tokens, number of loss tokens) for one batch."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    n_tokens = int((targets != IGNORE).sum())
    # Every key but the labels is a model input (input_ids, attention_mask, position_ids, ...).
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    inner = inner_model(model)
    if not _accepts_logits_to_keep(type(inner).forward):
        logits = model(**kwargs).logits[:, :-1]
        return _cross_entropy(logits, targets), n_tokens
    positions = torch.nonzero((targets != IGNORE).any(dim=0)).squeeze(1)
    targets = targets[:, positions]
    head = plain_head(inner)
    if head is None:
        logits = model(**kwargs, logits_to_keep=positions).logits
        return _cross_entropy(logits, targets), n_tokens
    # The head passes its input through for this call (an instance attribute shadows the class's
    # forward), so the model returns the hidden states at `positions` and no logits are computed.
    head.forward = _identity
    try:
        hidden = model(**kwargs, logits_to_keep=positions).logits
    finally:
        del head.forward
    keep = targets != IGNORE
    loss = linear_cross_entropy_sum(hidden[keep], head.weight, targets[keep].to(hidden.device))
    return loss, n_tokens


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # In float32 on the kept logits, as transformers' own loss does: bf16 logits lose the precision
    # a softmax over a large vocabulary needs.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1).to(logits.device),
        ignore_index=IGNORE,
        reduction="sum",
    )


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
