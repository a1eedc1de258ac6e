"""The training loop: one readable function, top to bottom.

Each optimizer step takes `grad_accum` micro-batches and divides the summed token losses by the
number of loss tokens in the whole step (all micro-batches, all processes), so the gradient equals
the one of a single large batch whatever the accumulation or padding.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from peftctl.data import Example, collate, count_input_tokens
from peftctl.train.loss import eval_loss, loss_sum
from peftctl.train.optim import build_optimizer, build_scheduler
from peftctl.ui import Reporter


def total_steps(cfg, n_examples: int, world: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * world
    return max(1, math.ceil((cfg.epochs or 1.0) * n_examples / per_step))


def batch_stream(examples: list[Example], batch_size: int, seed: int, rank: int, world: int,
                 pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches: each epoch a fresh seeded shuffle, this process's share of it."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        usable = len(order) - len(order) % world if len(order) >= world else len(order)
        mine = order[rank:usable:world]
        for i in range(0, len(mine), batch_size):
            yield collate([examples[j] for j in mine[i : i + batch_size]], pad_id)
        epoch += 1


@dataclass
class LoopResult:
    steps: int
    tokens_seen: int
    loss_tokens_seen: int
    train_loss: float | None
    wall_time_s: float
    tokens_per_s: float
    evals: list[dict[str, Any]] = field(default_factory=list)


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def fit(model, train: list[Example], eval_examples: list[Example] | None, recipe, accelerator,
        pad_id: int, write_metrics, reporter: Reporter) -> LoopResult:
    cfg = recipe.train
    world = accelerator.num_processes
    steps = total_steps(cfg, len(train), world)
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    stream = batch_stream(train, cfg.batch_size, cfg.seed, accelerator.process_index, world, pad_id)
    device = accelerator.device

    def reduce(x: float) -> float:
        if world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=device)
        return float(accelerator.reduce(t, reduction="sum").item())

    def run_eval(step: int) -> dict[str, Any]:
        model.eval()
        shard = eval_examples[accelerator.process_index :: world]
        loss, n = eval_loss(model, shard, recipe.eval.batch_size, pad_id, device)
        model.train()
        loss, n = reduce(loss), reduce(n)
        record = {"step": step, "eval_loss": loss / n, "eval_perplexity": math.exp(min(loss / n, 50)),
                  "eval_tokens": int(n)}
        write_metrics(record)
        reporter.log(f"step {step}: eval_loss {record['eval_loss']:.4f}  perplexity {record['eval_perplexity']:.3f}")
        return record

    reporter.start(steps, "train")
    model.train()
    start = time.perf_counter()
    window_loss = window_tokens = window_inputs = 0.0
    window_start = start
    tokens_seen = loss_tokens_seen = 0
    last_loss: float | None = None
    evals: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        micro = [_to(next(stream), device) for _ in range(cfg.grad_accum)]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        step_tokens = reduce(local_tokens)
        step_loss = 0.0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model)
            with ctx:
                loss, _ = loss_sum(model, batch)
                # DDP averages gradients over processes; multiplying by `world` turns that average
                # into the sum over all loss tokens divided by their global count.
                accelerator.backward(loss * (world / step_tokens))
            step_loss += float(loss.detach())
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        inputs = reduce(sum(count_input_tokens(b) for b in micro))
        window_loss += reduce(step_loss)
        window_tokens += step_tokens
        window_inputs += inputs
        tokens_seen += int(inputs)
        loss_tokens_seen += int(step_tokens)
        if step % cfg.log_every == 0 or step == steps:
            now = time.perf_counter()
            last_loss = window_loss / max(window_tokens, 1)
            record = {
                "step": step,
                "loss": last_loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": window_inputs / max(now - window_start, 1e-9),
                "loss_tokens": int(window_tokens),
                "elapsed_s": now - start,
            }
            write_metrics(record)
            reporter.advance(step, {"loss": last_loss, "lr": record["lr"], "tok/s": round(record["tokens_per_s"])})
            reporter.log(
                f"step {step}/{steps}  loss {last_loss:.4f}  lr {record['lr']:.3g}  "
                f"tok/s {record['tokens_per_s']:.0f}"
            )
            window_loss = window_tokens = window_inputs = 0.0
            window_start = now
        else:
            reporter.advance(step, {"loss": last_loss})
        if eval_examples and cfg.eval_every and (step % cfg.eval_every == 0 or step == steps):
            evals.append(run_eval(step))
    reporter.stop()
    if eval_examples and not cfg.eval_every:
        evals.append(run_eval(steps))
    wall = time.perf_counter() - start
    return LoopResult(steps, tokens_seen, loss_tokens_seen, last_loss, wall, tokens_seen / max(wall, 1e-9), evals)
