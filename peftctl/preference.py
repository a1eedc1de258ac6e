"""Preference objectives on (prompt, chosen, rejected) pairs: DPO, IPO, ORPO and SimPO, with TRL's
names and formulas.

A micro-batch of B pairs is one forward of 2B rows, the B chosen sequences then the B rejected ones
(as TRL's concatenated forward), each row's summed log-probability of its answer tokens taken
from the chunked linear cross-entropy (`loss.sequence_logps`: no full logits). DPO and IPO compare
with a reference: the same network with its adapters disabled, under no_grad, on the same inputs,
in the same step (or log-probabilities computed once before training, `reference_logps`).

With policy log-probabilities pi_c, pi_r (summed over the answer's tokens), reference ref_c, ref_r,
answer lengths n_c, n_r, beta = `train.beta`, eps = `train.label_smoothing`:

- dpo (Rafailov et al. 2023, eq. 7; conservative DPO's label smoothing, Mitchell 2023):
  h = (pi_c - ref_c) - (pi_r - ref_r);  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
  With eps = 0 this is TRL's DPOTrainer loss_type "sigmoid".
  RPO (Pang et al. 2024, eq. 3): dpo or ipo + rpo_alpha NLL(chosen answers), TRL's loss_type [.., "sft"]
  with loss_weights [1, rpo_alpha].
- ipo (Azar et al. 2023, eq. 17, on per-token averages as TRL's loss_type "ipo"):
  loss = ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2.
- orpo (Hong et al. 2024, eqs. 4-7; TRL's ORPOTrainer): with averages a_c = pi_c / n_c, a_r = pi_r / n_r,
  log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r));
  loss = NLL(chosen) - beta log sigmoid(log_odds), NLL the mean cross-entropy of the chosen sequences'
  tokens (prompt and answer, as TRL's; elsewhere NLL(chosen) covers the chosen answers' tokens only).
- simpo (Meng et al. 2024, eq. 6; TRL's CPOTrainer with loss_type "simpo"): with gamma = `train.simpo_gamma`,
  z = a_c - a_r - gamma / beta;  loss = -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
  + cpo_alpha NLL(chosen).

Rewards (logged, TRL's names): dpo / ipo beta (pi - ref); orpo / simpo beta a (the averages). The
per-pair losses are averaged over the pairs of the whole optimizer step (all micro-batches and
processes), the NLL over the chosen tokens of the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from peftctl.constants import IGNORE_INDEX
from peftctl.loss import loss_plan, sequence_logps
from peftctl.sections import OBJECTIVE_METRICS, PREFERENCE_METRICS, reported_metrics

OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo")
# TRL's metric names: each a mean over pairs (`sections.OBJECTIVE_METRICS`, which the recipe checks
# train.metric_for_best against).
METRICS = PREFERENCE_METRICS


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass(frozen=True)
class Objective:
    name: str
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    rpo_alpha: float = 0.0

    @classmethod
    def of(cls, train_cfg) -> Objective:
        return cls(train_cfg.objective, train_cfg.beta, train_cfg.label_smoothing, train_cfg.simpo_gamma,
                   train_cfg.cpo_alpha, train_cfg.rpo_alpha)

    @property
    def pairs(self) -> bool:
        return self.name != "sft"

    @property
    def needs_reference(self) -> bool:
        return self.name in ("dpo", "ipo")

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen answers' mean token cross-entropy in the loss."""
        return {"orpo": 1.0, "simpo": self.cpo_alpha, "dpo": self.rpo_alpha, "ipo": self.rpo_alpha}.get(self.name, 0.0)

    @property
    def reports_nll(self) -> bool:
        """Whether the loss has an NLL term, reported as nll_loss (training and evaluation): the
        recipe's rule (`sections.reported_metrics`), which metric_for_best is checked against."""
        return "nll_loss" in reported_metrics(self.name, self)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return OBJECTIVE_METRICS[self.name]

    def terms(self, pi_c, pi_r, ref_c, ref_r, n_c, n_r) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pair losses (B,), per-pair metrics (B, len(metric_names)), detached) from summed
        log-probabilities (B,) and answer token counts (B,), all float32 or float64."""
        beta, eps = self.beta, self.label_smoothing
        if self.name in ("dpo", "ipo"):
            chosen, rejected = pi_c - ref_c, pi_r - ref_r
            if self.name == "dpo":
                h = beta * (chosen - rejected)
                losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
            else:
                losses = (chosen / n_c - rejected / n_r - 1 / (2 * beta)) ** 2
            logp_c, logp_r = pi_c, pi_r
            extra = []
        else:
            a_c, a_r = pi_c / n_c, pi_r / n_r
            chosen, rejected = a_c, a_r
            logp_c, logp_r = a_c, a_r
            if self.name == "orpo":
                log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
                ratio = F.logsigmoid(log_odds)
                losses = -beta * ratio
                extra = [ratio.detach(), log_odds.detach()]
            else:
                z = beta * (a_c - a_r - self.simpo_gamma / beta)
                losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
                extra = []
        r_c, r_r = beta * chosen.detach(), beta * rejected.detach()
        stats = torch.stack([r_c, r_r, (r_c > r_r).to(r_c.dtype), r_c - r_r, logp_c.detach(), logp_r.detach(),
                             *extra], dim=1)
        return losses, stats


class PairBatch:
    """A micro-batch of pairs on the host: the 2B rows (chosen then rejected), each row's answer
    token count, and the counts the loop normalises by (counted here: no device sync).

    `whole_chosen` (orpo, as TRL's ORPOTrainer: its NLL term covers the chosen sequence's prompt
    and answer): the batch's labels then cover every real token of the chosen rows, so that the one
    forward gives both, and `answer` ((2B, seq) bool, the positions predicting an answer token)
    picks the answers' tokens for the log-probabilities. `chosen_tokens` counts the NLL's tokens."""

    __slots__ = ("batch", "lengths", "pairs", "chosen_tokens", "answer")

    def __init__(self, batch: dict[str, torch.Tensor], whole_chosen: bool = False):
        self.batch = batch
        labels = batch["labels"]
        self.pairs = labels.shape[0] // 2
        self.lengths = (labels[:, 1:] != IGNORE_INDEX).sum(1)
        self.answer = None
        if whole_chosen:
            self.answer = torch.zeros_like(labels, dtype=torch.bool)
            self.answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
            whole = torch.where(batch["attention_mask"][: self.pairs].bool(), batch["input_ids"][: self.pairs],
                                IGNORE_INDEX)
            batch["labels"] = torch.cat([whole, labels[self.pairs :]])
        self.chosen_tokens = int((batch["labels"][: self.pairs, 1:] != IGNORE_INDEX).sum())


def collate_pairs(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of the chosen sequences of `examples` followed by their rejected ones."""
    from peftctl.data import collate

    return collate([e for e in examples] + [e.rejected for e in examples], pad_id)


def pair_batch(examples, pad_id: int, objective: Objective) -> PairBatch:
    return PairBatch(collate_pairs(examples, pad_id), whole_chosen=objective.name == "orpo")


def peft_of(model):
    """The adapter-holding model inside DDP's wrapper, or None for a plain model."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model if hasattr(model, "disable_adapter") else None


def pair_logps(model, batch, plan, reference: bool = False, adapter_off: bool = True) -> torch.Tensor:
    """(2B,) summed answer log-probabilities; `reference`: under no_grad, through the unwrapped
    model, with its adapters disabled when `adapter_off` (a plain model is its own reference)."""
    if not reference:
        return sequence_logps(model, batch, plan)[0]
    peft = peft_of(model)
    with torch.no_grad():
        if peft is not None and adapter_off:
            with peft.disable_adapter():
                return sequence_logps(peft, batch, plan)[0]
        return sequence_logps(peft if peft is not None else model, batch, plan)[0]


def micro_step(objective: Objective, model, batch, plan, lengths: torch.Tensor,
               ref: torch.Tensor | None = None, answer: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro-batch of pairs: (sum of per-pair losses, sum of the chosen tokens' cross-entropies,
    per-pair metrics summed over the pairs (detached)). `ref`: the (2B,) reference log-probabilities
    (precomputed); None computes them here when the objective needs them. `answer`: see
    `PairBatch` (the labels then cover more than the answers)."""
    logps, row_sums = sequence_logps(model, batch, plan, answer)
    b = logps.shape[0] // 2
    lengths = lengths.to(logps.device, logps.dtype).clamp(min=1)
    if objective.needs_reference:
        if ref is None:
            ref = pair_logps(model, batch, plan, reference=True)
        ref = ref.to(logps.device, logps.dtype)
        ref_c, ref_r = ref[:b], ref[b:]
    else:
        ref_c = ref_r = None
    losses, stats = objective.terms(logps[:b], logps[b:], ref_c, ref_r, lengths[:b], lengths[b:])
    return losses.sum(), -row_sums[:b].sum(), stats.sum(0)


def _batches(examples, batch_size: int):
    """Example indices in batches of similar length (less padding), a fixed order."""
    order = sorted(range(len(examples)), key=lambda i: max(len(examples[i].input_ids),
                                                            len(examples[i].rejected.input_ids)))
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


@torch.no_grad()
def reference_logps(model, examples, batch_size: int, pad_id: int, device, adapter_off: bool = True,
                    share: tuple[int, int] = (0, 1), progress=None) -> torch.Tensor:
    """(N, 2) float32 on the host: each pair's reference log-probabilities (chosen, rejected),
    computed once (`train.precompute_ref_log_probs`). `share` (rank, world): only every world-th
    batch from the rank-th is computed (the others' rows stay 0; summed over the processes, the
    batches are the ones a single process makes, so the numbers are too). `progress(done, total)`:
    called with (0, this share's pairs) first, then after each batch."""
    out = torch.zeros(len(examples), 2, dtype=torch.float32)
    rank, world = share
    mine = [idx for n, idx in enumerate(_batches(examples, batch_size)) if n % world == rank]
    total, done = sum(len(idx) for idx in mine), 0
    if progress is not None:
        progress(0, total)
    for idx in mine:
        batch = collate_pairs([examples[j] for j in idx], pad_id)  # labels on the answers
        plan = loss_plan(batch["labels"]).to(device)
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = pair_logps(model, batch, plan, reference=True, adapter_off=adapter_off).float().cpu()
        out[idx, 0], out[idx, 1] = logps[: len(idx)], logps[len(idx) :]
        done += len(idx)
        if progress is not None:
            progress(done, total)
    return out


@torch.no_grad()
def eval_sums(objective: Objective, model, examples, batch_size: int, pad_id: int, device,
              ref: torch.Tensor | None = None) -> list[float]:
    """Summed evaluation terms over `examples` (pairs), to add up over processes and finish with
    `eval_metrics`: [pairs, sum of pair losses, chosen tokens, sum of their cross-entropies, metric sums...].
    `ref`: (N, 2) precomputed reference log-probabilities of these examples, or None."""
    sums = torch.zeros(4 + len(objective.metric_names), dtype=torch.float64)
    for idx in _batches(examples, batch_size):
        pb = pair_batch([examples[j] for j in idx], pad_id, objective)
        plan = loss_plan(pb.batch["labels"]).to(device)
        batch = {k: v.to(device) for k, v in pb.batch.items()}
        r = None if ref is None else torch.cat([ref[idx, 0], ref[idx, 1]])
        answer = None if pb.answer is None else pb.answer.to(device)
        loss, nll, stats = micro_step(objective, model, batch, plan, pb.lengths, r, answer)
        sums += torch.cat([torch.tensor([pb.pairs, float(loss), pb.chosen_tokens, float(nll)], dtype=torch.float64),
                           stats.double().cpu()])
    return sums.tolist()


def eval_metrics(objective: Objective, sums: list[float], prefix: str = "eval_") -> dict[str, float]:
    """The objective's eval_loss (mean per-pair loss plus nll_weight x the chosen tokens' mean
    cross-entropy) and TRL's metrics, each a mean over pairs, named `prefix` + TRL's name."""
    pairs, loss, tokens, nll = sums[:4]
    out = {f"{prefix}loss": loss / pairs + objective.nll_weight * nll / max(tokens, 1)}
    for name, value in zip(objective.metric_names, sums[4:], strict=True):
        out[prefix + name] = value / pairs
    if objective.reports_nll:
        out[f"{prefix}nll_loss"] = nll / max(tokens, 1)
    out[f"{prefix}pairs"] = int(pairs)
    return out
