"""The training loop: one readable function, top to bottom.

Each optimizer step takes `grad_accum` micro-batches and divides the summed token losses by the
number of loss tokens in the whole step (all micro-batches, all processes), so the gradient equals
the one of a single large batch whatever the accumulation, padding or number of processes.

Per step: forward and backward of each micro-batch, unscale (float16), clip, check that loss and
gradient are finite, update, schedule, log, maybe evaluate, maybe checkpoint, maybe stop (signal,
early stopping). Everything the loop counts lives in a `TrainState`, which checkpoints save, so a
resumed run continues exactly where the checkpoint was.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import DistributedType

from peftctl.data import Example, collate, count_input_tokens
from peftctl.errors import RuntimeFailure
from peftctl.train.checkpoint import TrainState
from peftctl.train.loss import eval_loss, loss_sum, prepare
from peftctl.ui import Reporter


class Diverged(RuntimeFailure):
    def __init__(self, step: int, what: str):
        super().__init__(f"training diverged at step {step}: {what}")
        self.step, self.what = step, what


def total_steps(cfg, n_examples: int, world: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * world
    return max(1, math.ceil((cfg.epochs or 1.0) * n_examples / per_step))


class DataStream:
    """Endless micro-batches: each epoch a fresh seeded shuffle of all examples.

    A global micro-batch is the next `world × batch_size` examples of the epoch's order; process
    `rank` takes every `world`-th of them. The position is counted in examples over all processes,
    so a checkpoint's position means the same with another batch size or number of processes.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, rank: int, world: int,
                 pad_id: int, epoch: int = 0, position: int = 0):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world, self.pad_id = rank, world, pad_id
        self.epoch, self.position = epoch, position
        # Every process gets the same number of examples: the epoch's last len % world are dropped.
        self.usable = len(examples) - len(examples) % world
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def next(self) -> dict[str, torch.Tensor]:
        if self.position >= self.usable:
            self.epoch, self.position = self.epoch + 1, 0
        chunk = self.order(self.epoch)[self.position : min(self.position + self.world * self.batch_size, self.usable)]
        self.position += len(chunk)
        return collate([self.examples[j] for j in chunk[self.rank :: self.world]], self.pad_id)


def fit(model, optimizer, scheduler, scaler, train: list[Example], eval_examples: list[Example] | None,
        recipe, accelerator, pad_id: int, state: TrainState, steps: int, *,
        write_metrics: Callable[[dict[str, Any]], None],
        checkpoint: Callable[[TrainState], None],
        stop_signal: Callable[[], bool],
        reporter: Reporter) -> str:
    """Train from `state` to `steps`. Returns why it ended: completed, early_stopping or interrupted."""
    cfg = recipe.train
    world = accelerator.num_processes
    device = accelerator.device
    params = [p for p in model.parameters() if p.requires_grad]
    stream = DataStream(train, cfg.batch_size, cfg.seed, accelerator.process_index, world, pad_id,
                        state.epoch, state.position)
    keep_best = cfg.save_every is not None or cfg.load_best_at_end or cfg.early_stopping_patience is not None

    def reduce(*values: float) -> list[float]:
        if world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        return accelerator.reduce(t, reduction="sum").tolist()

    def run_eval(step: int) -> bool:
        """Evaluate; record the metrics; return whether eval_loss improved on the best so far."""
        model.eval()
        if accelerator.distributed_type == DistributedType.FSDP:
            # Every forward of a sharded model is collective: each process runs the same batches.
            loss, n = eval_loss(model, eval_examples, recipe.eval.batch_size, pad_id, device)
        else:
            # Each process its share, through the unwrapped model (DDP's forward would sync
            # buffers: a collective, which shares of unequal batch counts would deadlock).
            shard = eval_examples[accelerator.process_index :: world]
            loss, n = reduce(*eval_loss(accelerator.unwrap_model(model), shard, recipe.eval.batch_size,
                                        pad_id, device))
        model.train()
        record = {"step": step, "eval_loss": loss / n, "eval_perplexity": math.exp(min(loss / n, 50)),
                  "eval_tokens": int(n)}
        write_metrics(record)
        state.evals.append(record)
        reporter.log(f"step {step}: eval_loss {record['eval_loss']:.4f}  perplexity {record['eval_perplexity']:.3f}")
        best = state.best_eval_loss
        if best is None or record["eval_loss"] < best - cfg.early_stopping_threshold:
            state.best_eval_loss, state.best_step, state.evals_since_best = record["eval_loss"], step, 0
            return True
        state.evals_since_best += 1
        return False

    reporter.start(steps, "train")
    reporter.advance(state.step, {"loss": state.last_loss})
    model.train()
    start = window_start = time.perf_counter()
    time_before = state.train_time_s
    for step in range(state.step + 1, steps + 1):
        # Counted on the host batches and moved with their loss plans: nothing here waits for the device.
        host = [stream.next() for _ in range(cfg.grad_accum)]
        micro = [prepare(b, device) for b in host]
        (step_tokens,) = reduce(sum(plan.n_tokens for _, plan in micro))
        local_loss = torch.zeros((), dtype=torch.float32, device=device)
        for i, (batch, plan) in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model)
            with ctx:
                loss, _ = loss_sum(model, batch, plan)
                # DDP averages gradients over processes; multiplying by `world` turns that average
                # into the sum over all loss tokens divided by their global count.
                scaled = loss * (world / max(step_tokens, 1))
                if scaler is not None:
                    scaled = scaler.scale(scaled)
                accelerator.backward(scaled)
            local_loss += loss.detach().float()
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
        if type(grad_norm).__name__ == "DTensor":  # FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        step_loss, inputs, stopping = reduce(float(local_loss), sum(count_input_tokens(b) for b in host),
                                             float(stop_signal()))

        # A float16 loss scaler skips steps with inf gradients by itself (and lowers its scale);
        # otherwise a non-finite loss or gradient means the run has diverged.
        bad = "loss" if not math.isfinite(step_loss) else (
            "gradient norm" if scaler is None and not math.isfinite(grad_norm) else None)
        if bad is None:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        elif state.skipped_steps < cfg.skip_nonfinite_steps:
            state.skipped_steps += 1
            if scaler is not None:
                scaler.update(scaler.get_scale())  # end the scaler's step, keeping its scale
            write_metrics({"step": step, "skipped": f"{bad} is not finite"})
            reporter.log(f"step {step}: {bad} is not finite; step skipped "
                         f"({state.skipped_steps} of {cfg.skip_nonfinite_steps} allowed)")
        else:
            raise Diverged(step, f"the {bad} is not finite (loss {step_loss / max(step_tokens, 1):.4g}, "
                                 f"gradient norm {grad_norm:.4g})")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state.step, state.epoch, state.position = step, stream.epoch, stream.position
        if bad is None:
            state.window_loss += step_loss
            state.window_tokens += step_tokens
            state.tokens_seen += int(inputs)
            state.loss_tokens_seen += int(step_tokens)
        state.window_inputs += inputs
        if step % cfg.log_every == 0 or step == steps:
            now = time.perf_counter()
            state.last_loss = state.window_loss / max(state.window_tokens, 1)
            record = {
                "step": step,
                "epoch": round(stream.epoch + stream.position / max(stream.usable, 1), 4),
                "loss": state.last_loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": state.window_inputs / max(now - window_start, 1e-9),
                "loss_tokens": int(state.window_tokens),
                "elapsed_s": time_before + now - start,
            }
            write_metrics(record)
            reporter.advance(step, {"loss": state.last_loss, "lr": record["lr"], "tok/s": round(record["tokens_per_s"])})
            reporter.log(f"step {step}/{steps}  loss {state.last_loss:.4f}  lr {record['lr']:.3g}  "
                         f"tok/s {record['tokens_per_s']:.0f}")
            state.window_loss = state.window_tokens = state.window_inputs = 0.0
            window_start = now
        else:
            reporter.advance(step, {"loss": state.last_loss})

        improved = False
        if eval_examples and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
            improved = run_eval(step)
        patience_out = (cfg.early_stopping_patience is not None
                        and state.evals_since_best >= cfg.early_stopping_patience)
        state.train_time_s = time_before + time.perf_counter() - start
        if ((cfg.save_every is not None and (step % cfg.save_every == 0 or step == steps))
                or stopping or (improved and keep_best) or (patience_out and keep_best)):
            checkpoint(state)
        if stopping:
            reporter.stop()
            return "interrupted"
        if patience_out:
            reporter.log(f"step {step}: eval_loss has not improved for {state.evals_since_best} "
                         f"evaluations (best {state.best_eval_loss:.4f} at step {state.best_step}); stopping")
            reporter.stop()
            return "early_stopping"
    reporter.stop()
    return "completed"
