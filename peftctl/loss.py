"""The causal-LM loss, summed over loss tokens (callers divide by the token count they choose).

Only positions that predict a loss token reach the output head: the model is called with
`logits_to_keep` set to those positions, so a batch whose prompts are masked skips most of the
vocabulary-sized matmul and its backward. Where the head is a plain linear layer whose output the
model returns as is (Llama-family architectures), its logits are never materialised either: the
head's input is taken and the loss computed chunk by chunk (`kernels.linear_cross_entropy`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.constants import IGNORE_INDEX as IGNORE
from peftctl.kernels.linear_cross_entropy import linear_cross_entropy_rows, linear_cross_entropy_sum

# Architectures whose logits are exactly lm_head(hidden states): no soft-capping, scaling or bias
# after the head. Others (Gemma 2/3, Cohere, Granite, ...) take the model's own logits.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "phi3"})


@cache
def _accepts(forward, name: str) -> bool:
    try:
        return name in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _accepts_logits_to_keep(forward) -> bool:
    return _accepts(forward, "logits_to_keep")


def inner_model(model):
    """The transformers model inside DDP's wrapper (`module`) and peftctl's (`base_model.model`)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    while hasattr(model, "base_model") and hasattr(model.base_model, "model"):
        model = model.base_model.model
    return model


def prepended_tokens(model) -> int:
    """Virtual tokens the model's adapter puts before each sequence in its output (prompt tuning,
    P-tuning: `PeftModel.prepended_tokens`); 0 for every other model."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    count = getattr(type(model), "prepended_tokens", None)
    return count(model) if count is not None else 0


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


@dataclass
class LossPlan:
    """Where a batch's loss tokens are, worked out once (on the host for a host batch, so that the
    step needs no device sync): `n_tokens` loss tokens; `targets` (batch, seq): the labels shifted
    left by one, -100 at the end (position t predicts targets[:, t]); `rows`: the flat indices
    (into batch x seq) of positions that predict a loss token, or None when (nearly) all do;
    `positions`: the columns where any row predicts one (the logits path's `logits_to_keep`)."""

    n_tokens: int
    targets: torch.Tensor
    rows: torch.Tensor | None
    positions: torch.Tensor

    def to(self, device, pin: bool = False) -> LossPlan:
        def move(t):
            if t is None:
                return None
            return (t.pin_memory() if pin and t.device.type == "cpu" else t).to(device, non_blocking=True)

        return LossPlan(self.n_tokens, move(self.targets), move(self.rows), move(self.positions))


# Below this share of loss positions the loss gathers the loss rows of the head's input; above it,
# computing the few others too costs less than the gather.
_GATHER_BELOW = 0.9


def loss_plan(labels: torch.Tensor) -> LossPlan:
    """The `LossPlan` of a (batch, seq) label tensor (-100: no loss)."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    valid = targets != IGNORE
    n = int(valid.sum())
    rows = None if n >= _GATHER_BELOW * valid.numel() else torch.nonzero(valid.reshape(-1)).squeeze(1)
    return LossPlan(n, targets, rows, torch.nonzero(valid.any(dim=0)).squeeze(1))


# A batch of another task than causal LM names it under this key (`data.batch.collate_task`).
TASK_KEY = "task"


def count_loss_tokens(batch: dict) -> int:
    """Tokens (sequence classification: examples) that carry loss in a host batch: the labels after
    the first position for a causal LM (position 0 predicts nothing), every label that is not -100
    for the other tasks (their labels are not shifted)."""
    labels = batch["labels"]
    if TASK_KEY in batch:
        return int((labels != IGNORE).sum())
    return int((labels[:, 1:] != IGNORE).sum())


def task_plan(batch: dict) -> LossPlan:
    """The plan of a batch of another task: its loss count only (`task_loss_sum` needs nothing else)."""
    labels = batch["labels"]
    return LossPlan(count_loss_tokens(batch), labels, None, labels.new_zeros(0))


def prepare(batch: dict[str, torch.Tensor], device, pin: bool = False) -> tuple[dict[str, torch.Tensor], LossPlan]:
    """A host batch from `data.collate` moved to `device` (copies queued, not waited for) and its
    loss plan, computed on the host. A 2D attention mask of all ones is dropped: the model then
    takes its causal fast path instead of checking the mask on the device. `pin`: the host tensors
    are first copied to pinned memory, so that the copies to a CUDA device are asynchronous DMA
    (from pageable memory the host stages them itself)."""
    plan = task_plan(batch) if TASK_KEY in batch else loss_plan(batch["labels"])
    mask = batch.get("attention_mask")
    drop = TASK_KEY not in batch and mask is not None and mask.dim() == 2 and bool(mask.all())

    def move(t: torch.Tensor) -> torch.Tensor:
        return (t.pin_memory() if pin and t.device.type == "cpu" else t).to(device, non_blocking=True)

    moved = {k: move(v) if isinstance(v, torch.Tensor) else v
             for k, v in batch.items() if not (drop and k == "attention_mask")}
    return moved, plan.to(device, pin=pin)


def loss_sum(model, batch: dict[str, torch.Tensor], plan: LossPlan | None = None) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over loss tokens, number of loss tokens) for one batch.
    `plan`: the batch's `loss_plan`, on the model's device (default: worked out here, which waits
    for the device when the labels live there)."""
    if TASK_KEY in batch:
        return task_loss_sum(model, batch, plan)
    if plan is None:
        plan = loss_plan(batch["labels"])
    # Every key but the labels is a model input (input_ids, attention_mask, position_ids, ...).
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    inner = inner_model(model)
    if _accepts(type(inner).forward, "use_cache"):
        kwargs["use_cache"] = False  # a loss needs no KV cache (transformers builds one by default)
    # Positions the output holds before the batch's own (a prompt-learning adapter's virtual tokens).
    skip = prepended_tokens(model)
    if not _accepts_logits_to_keep(type(inner).forward):
        logits = model(**kwargs).logits[:, skip:]
        return _cross_entropy(logits, plan.targets), plan.n_tokens
    head = plain_head(inner)
    if head is None:
        logits = model(**kwargs, logits_to_keep=plan.positions + skip).logits
        return _cross_entropy(logits, plan.targets[:, plan.positions]), plan.n_tokens
    # The head passes its input through for this call (an instance attribute shadows the class's
    # forward), so the model returns the hidden states and no logits are computed.
    head.forward = _identity
    try:
        hidden = model(**kwargs, logits_to_keep=0).logits[:, skip:]
    finally:
        del head.forward
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = plan.targets.reshape(-1).to(hidden.device)
    if plan.rows is not None:
        hidden, targets = hidden.index_select(0, plan.rows), targets.index_select(0, plan.rows)
    return linear_cross_entropy_sum(hidden, head.weight, targets), plan.n_tokens


def task_logits(model, batch: dict) -> torch.Tensor:
    """The logits of a batch of another task (`TASK_KEY`): seq_cls (batch, labels); token_cls (batch,
    seq, labels); seq2seq_lm (batch, target length, vocabulary), the decoder fed the labels shifted
    right (teacher forcing, as transformers' seq2seq models do when given labels)."""
    kwargs = {k: v for k, v in batch.items() if k not in ("labels", TASK_KEY)}
    if batch[TASK_KEY] == "seq2seq_lm":
        inner = inner_model(model)
        labels = batch["labels"]
        kwargs["decoder_input_ids"] = inner.prepare_decoder_input_ids_from_labels(labels=labels)
        kwargs["use_cache"] = False
    return model(**kwargs).logits


def task_loss_sum(model, batch: dict, plan: LossPlan | None = None) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, count) of a batch of another task: over the examples (seq_cls), the
    labelled tokens (token_cls: each word's first sub-token) or the target tokens (seq2seq_lm). The
    labels are not shifted: logits[..., t, :] scores labels[..., t]."""
    plan = plan if plan is not None else task_plan(batch)
    return _cross_entropy(task_logits(model, batch), batch["labels"]), plan.n_tokens


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


def token_losses(model, batch: dict[str, torch.Tensor], plan: LossPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token cross-entropies, flat row-major index into batch x seq of the position each
    predicts from) for the positions that predict a loss token (and, when `plan.rows` is None, all
    others with loss 0), in float32 (float64 for a float64 model). The same model call as
    `loss_sum`: logits only at loss positions, and none at all through a plain head (chunked
    linear cross-entropy, `kernels.linear_cross_entropy_rows`)."""
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    inner = inner_model(model)
    if _accepts(type(inner).forward, "use_cache"):
        kwargs["use_cache"] = False
    batch_size, seq = plan.targets.shape
    head = plain_head(inner) if _accepts_logits_to_keep(type(inner).forward) else None
    if head is None:
        if _accepts_logits_to_keep(type(inner).forward):
            logits = model(**kwargs, logits_to_keep=plan.positions).logits
            targets, columns = plan.targets[:, plan.positions], plan.positions
        else:
            logits = model(**kwargs).logits
            targets, columns = plan.targets, torch.arange(seq, device=plan.targets.device)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1).to(logits.device),
                                 ignore_index=IGNORE, reduction="none")
        index = (torch.arange(batch_size, device=logits.device)[:, None] * seq + columns.to(logits.device)).reshape(-1)
        return losses, index
    head.forward = _identity
    try:
        hidden = model(**kwargs, logits_to_keep=0).logits
    finally:
        del head.forward
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = plan.targets.reshape(-1).to(hidden.device)
    if plan.rows is not None:
        index = plan.rows.to(hidden.device)
        hidden, targets = hidden.index_select(0, index), targets.index_select(0, index)
    else:
        index = torch.arange(hidden.shape[0], device=hidden.device)
    return linear_cross_entropy_rows(hidden, head.weight, targets), index


def sequence_logps(model, batch: dict[str, torch.Tensor], plan: LossPlan,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its loss tokens, sum_t log p(y_t | y_<t): a (batch,)
    float32 tensor (float64 for a float64 model), differentiable; computed from `token_losses`
    (no full logits). Returned twice, or with `mask` ((batch, seq) bool, True where position t
    predicts a token to count) first the sum over the masked tokens, then over all loss tokens."""
    losses, index = token_losses(model, batch, plan)
    seq = plan.targets.shape[1]
    rows = torch.div(index, seq, rounding_mode="floor")
    total = losses.new_zeros(plan.targets.shape[0]).index_add(0, rows, -losses)
    if mask is None:
        return total, total
    picked = mask.reshape(-1).to(losses.device).index_select(0, index)
    return losses.new_zeros(plan.targets.shape[0]).index_add(0, rows, torch.where(picked, -losses, 0.0)), total


@torch.no_grad()
def eval_loss(model, examples, batch_size: int, pad_id: int, device) -> tuple[float, int]:
    """(summed loss, loss tokens) over examples, batched by similar length to limit padding."""
    from peftctl.data import collate

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    for i in range(0, len(order), batch_size):
        batch = collate([examples[j] for j in order[i : i + batch_size]], pad_id)
        loss, n = loss_sum(model, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        total += float(loss)
        count += n
    return total, count
