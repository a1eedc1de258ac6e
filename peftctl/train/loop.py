"""The training loop: one readable function, top to bottom.

Each optimizer step takes `grad_accum` micro-batches and divides the summed token losses by the
number of loss tokens in the whole step (all micro-batches, all processes), so the gradient equals
the one of a single large batch whatever the accumulation, padding or number of processes.

Per step: forward and backward of each micro-batch, unscale (float16), clip, check that loss and
gradient are finite, update, schedule, log, maybe evaluate, maybe checkpoint, maybe stop (signal,
early stopping). An adapter method may add loss terms and act after each update (`hooks`, from
`peftctl.adapters.hooks`); the loop calls them without knowing the method. Everything the loop counts lives in a `TrainState`, which checkpoints save, so a
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
from peftctl.loss import count_loss_tokens, eval_loss, inner_model, loss_sum, prepare
from peftctl.preference import Objective, eval_metrics, eval_sums, micro_step, pair_batch
from peftctl.train.checkpoint import TrainState
from peftctl.ui import Reporter


class Diverged(RuntimeFailure):
    """The run cannot go on: a NaN or inf loss or gradient, or a collapsed model (`reason`)."""

    def __init__(self, step: int, what: str, reason: str = "nonfinite", since: int | None = None):
        verb = "collapsed" if reason == "collapsed" else "diverged"
        super().__init__(f"training {verb} at step {step}: {what}")
        self.step, self.what, self.reason = step, what, reason
        self.since = since  # the first bad step, when it is earlier than `step`


# A collapsed model: the gradient norm exactly 0 and the loss at ln(vocabulary size) (every token
# equally likely) on this many consecutive steps. A learning rate orders of magnitude too high
# (a typo such as 1e4) pushes the activations into saturation: the output no longer depends on the
# input, so every gradient is exactly 0 and nothing can recover, but nothing is NaN either. A run
# that converged has small but never exactly zero gradients, and a loss far below ln(V).
COLLAPSE_STEPS = 5
# Uniform logits give ln(V) up to float32 rounding of the log-sum-exp (relative 1e-7); 1e-4 leaves
# room for bfloat16 models, whose logits the loss reads in float32.
COLLAPSE_RTOL = 1e-4


# Window sums of the chosen answers' cross-entropy and their token count (state.window_stats, kept
# across a resume with the preference metrics' sums).
NLL_SUM, NLL_TOKENS = "_nll_sum", "_nll_tokens"

def looks_collapsed(grad_norm: float, mean_loss: float, vocab_size: int) -> bool:
    """One step's signature of a collapsed model (see COLLAPSE_STEPS)."""
    uniform = math.log(vocab_size)
    return grad_norm == 0.0 and abs(mean_loss - uniform) <= COLLAPSE_RTOL * uniform


def target_examples(cfg, n_examples: int) -> int | None:
    """Examples an epochs-based run draws in all (every example `epochs` times, a fractional last
    epoch taking the first part of its shuffle); None for a run of `max_steps`."""
    if cfg.max_steps is not None:
        return None
    return max(1, round((cfg.epochs or 1.0) * n_examples))


def micro_batches_between(n_examples: int, per_micro: int, start: int, stop: int) -> int:
    """Global micro-batches that draw the examples from `start` to `stop` (counted over the whole
    run: epoch × n + position). A micro-batch takes `per_micro` examples and never crosses the end
    of an epoch (the last one of an epoch is smaller)."""
    # In closed form (a recipe may ask for 1e300 epochs): the rest of the first epoch, whole epochs
    # (each the same count), then the start of the last one.
    count, pos = 0, start
    if pos < stop and pos % n_examples:
        seg_end = min((pos // n_examples + 1) * n_examples, stop)
        count, pos = -(-(seg_end - pos) // per_micro), seg_end
    if pos < stop:
        full = (stop - pos) // n_examples
        count, pos = count + full * -(-n_examples // per_micro), pos + full * n_examples
    if pos < stop:
        count += -(-(stop - pos) // per_micro)
    return count


def total_steps(cfg, n_examples: int, world: int, step: int = 0, epoch: int = 0, position: int = 0) -> int:
    """The run's optimizer steps: `max_steps`, or as many as draw `target_examples` from the state
    (`step`, `epoch`, `position`) on: finished steps are counted as they were made, the rest at the
    recipe's batch geometry (batch_size × grad_accum × processes), the last step possibly smaller."""
    target = target_examples(cfg, n_examples)
    if target is None:
        return cfg.max_steps
    micro = micro_batches_between(n_examples, cfg.batch_size * world, epoch * n_examples + position, target)
    return step + -(-micro // cfg.grad_accum)


def examples_in_steps(cfg, n_examples: int, world: int, steps: int) -> int:
    """Examples that `steps` steps from the start draw (the plan's epochs: examples / n)."""
    target = target_examples(cfg, n_examples)
    per_micro, micro = cfg.batch_size * world, steps * cfg.grad_accum
    # In closed form: every epoch starts at its first example and takes `need` micro-batches; the
    # whole epochs (as many as the micro-batches and the target allow), then part of the next one.
    need = -(-n_examples // per_micro)
    epochs = micro // need
    if target is not None:
        epochs = min(epochs, -(-target // n_examples))
    pos, micro = epochs * n_examples, micro - epochs * need
    if micro > 0 and (target is None or pos < target):
        pos += micro * per_micro
    return pos if target is None else min(pos, target)


class MicroBatch:
    """One process's share of a global micro-batch, on the host, with its counts (counted here, so
    that the loop needs no device sync per micro-batch). `weight` is 0 for a stand-in: a process
    whose share is empty (the last micro-batch of an epoch smaller than the number of processes)
    still runs an example forward and backward, as every process must, with its loss times 0.
    `units`: what the step's loss is averaged over: loss tokens, or pairs for a preference
    objective (`pair`: the pairs' counts); `indices`: the examples' positions in the data."""

    __slots__ = ("batch", "loss_tokens", "input_tokens", "weight", "units", "indices", "pair")

    def __init__(self, batch: dict[str, torch.Tensor], real: bool, indices: list[int] | None = None, pair=None):
        self.batch, self.weight, self.indices, self.pair = batch, 1.0 if real else 0.0, indices, pair
        self.loss_tokens = count_loss_tokens(batch) if real else 0
        if pair is not None and real:
            self.loss_tokens = int(pair.lengths.sum())  # the answers' tokens (orpo's labels cover more)
        self.input_tokens = count_input_tokens(batch) if real else 0
        self.units = (pair.pairs if pair is not None else self.loss_tokens) if real else 0


class DataStream:
    """Micro-batches: each epoch a fresh seeded shuffle of all examples.

    A global micro-batch is the next `world × batch_size` examples of the epoch's order (fewer at
    the end of an epoch: micro-batches never cross one); process `rank` takes every `world`-th of
    them. The position is counted in examples over all processes, so a checkpoint's position means
    the same with another batch size or number of processes. With `limit` (examples over the whole
    run), the stream ends there and `next` returns None; every example is drawn once per epoch.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, rank: int, world: int,
                 pad_id: int, epoch: int = 0, position: int = 0, limit: int | None = None,
                 pairs: Objective | None = None):
        self.examples, self.batch_size, self.seed, self.pairs = examples, batch_size, seed, pairs
        self.rank, self.world, self.pad_id = rank, world, pad_id
        self.epoch, self.position, self.limit = epoch, position, limit
        self._order: tuple[int, list[int]] | None = None

    @property
    def consumed(self) -> int:
        """Examples drawn since the run began, over all processes."""
        return self.epoch * len(self.examples) + self.position

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def next(self) -> MicroBatch | None:
        n = len(self.examples)
        if self.limit is not None and self.consumed >= self.limit:
            return None
        if self.position >= n:
            self.epoch, self.position = self.epoch + 1, 0
        end = min(self.position + self.world * self.batch_size, n)
        if self.limit is not None:
            end = min(end, self.position + self.limit - self.consumed)
        chunk = self.order(self.epoch)[self.position : end]
        self.position = end
        mine = chunk[self.rank :: self.world]
        picked = mine or chunk[:1]
        examples = [self.examples[j] for j in picked]
        if self.pairs is not None:
            pair = pair_batch(examples, self.pad_id, self.pairs)
            return MicroBatch(pair.batch, bool(mine), picked, pair)
        return MicroBatch(collate(examples, self.pad_id), bool(mine), picked)


def fit(model, optimizer, scheduler, scaler, train: list[Example], eval_examples: list[Example] | None,
        recipe, accelerator, pad_id: int, state: TrainState, steps: int, *,
        write_metrics: Callable[[dict[str, Any]], None],
        checkpoint: Callable[[TrainState], None],
        stop_signal: Callable[[], bool],
        reporter: Reporter, hooks=None, ref_logps: dict[str, torch.Tensor] | None = None,
        eval_tokenizer: dict[str, Any] | None = None) -> str:
    """Train from `state` to `steps`. Returns why it ended: completed, early_stopping or interrupted.
    `hooks` (a `peftctl.adapters.hooks.HookSet`, false when empty): the adapter method's loss terms,
    added to each step's objective once, and its action after each update, before gradients are zeroed.
    `ref_logps`: precomputed reference log-probabilities ("train", "eval": (N, 2) host tensors) of a
    preference objective that needs them (`train.precompute_ref_log_probs`).
    `eval_tokenizer`: {"tokenizer", "id2label"} for the evaluations of a task other than causal LM
    (`metrics.task_metrics`: generation, tag names); early stopping watches `train.metric_for_best`."""
    cfg = recipe.train
    objective = Objective.of(cfg)
    pairs = objective.pairs
    logs_nll = objective.reports_nll  # nll_loss in the metrics, as evaluations give it
    ref_logps = ref_logps or {}
    world = accelerator.num_processes
    device = accelerator.device
    params = [p for p in model.parameters() if p.requires_grad]
    stream = DataStream(train, cfg.batch_size, cfg.seed, accelerator.process_index, world, pad_id,
                        state.epoch, state.position, limit=target_examples(cfg, len(train)),
                        pairs=objective if pairs else None)
    vocab_size = getattr(getattr(inner_model(model), "config", None), "vocab_size", None)
    keep_best = cfg.save_every is not None or cfg.load_best_at_end or cfg.early_stopping_patience is not None

    def reduce(*values: float) -> list[float]:
        if world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        return accelerator.reduce(t, reduction="sum").tolist()

    task = getattr(eval_examples[0], "task", "causal_lm") if eval_examples else "causal_lm"
    metric, greater = cfg.best_metric, cfg.best_is_greater

    def pair_evaluate() -> dict[str, Any]:
        """A preference objective's eval_loss and TRL's metrics (`preference.eval_metrics`)."""
        ref = ref_logps.get("eval")
        if accelerator.distributed_type == DistributedType.FSDP:
            sums = eval_sums(objective, model, eval_examples, recipe.eval.batch_size, pad_id, device, ref)
        else:
            rank = accelerator.process_index
            sums = reduce(*eval_sums(objective, accelerator.unwrap_model(model), eval_examples[rank::world],
                                     recipe.eval.batch_size, pad_id, device,
                                     None if ref is None else ref[rank::world]))
        return eval_metrics(objective, sums)

    def evaluate() -> dict[str, Any]:
        if pairs:
            return pair_evaluate()
        if task != "causal_lm":
            # Every process evaluates all examples through the unwrapped model (a few hundred
            # forwards at most), so that F1 and exact match need no gathering of predictions.
            from peftctl.metrics import task_metrics

            tok = eval_tokenizer or {}
            found = task_metrics(accelerator.unwrap_model(model), tok.get("tokenizer"), eval_examples,
                                 recipe.eval.batch_size, device, id2label=tok.get("id2label"),
                                 max_new_tokens=recipe.eval.max_new_tokens, exact_match=recipe.eval.exact_match)
            found.pop("samples", None)
            record = {"eval_loss": found.pop("eval_loss"), "eval_tokens": found.pop("eval_tokens")}
            if task == "seq2seq_lm":
                record["eval_perplexity"] = math.exp(min(record["eval_loss"], 50))
            return record | {f"eval_{k}": v for k, v in found.items()}
        if accelerator.distributed_type == DistributedType.FSDP:
            # Every forward of a sharded model is collective: each process runs the same batches.
            loss, n = eval_loss(model, eval_examples, recipe.eval.batch_size, pad_id, device)
        else:
            # Each process its share, through the unwrapped model (DDP's forward would sync
            # buffers: a collective, which shares of unequal batch counts would deadlock).
            shard = eval_examples[accelerator.process_index :: world]
            loss, n = reduce(*eval_loss(accelerator.unwrap_model(model), shard, recipe.eval.batch_size,
                                        pad_id, device))
        return {"eval_loss": loss / n, "eval_perplexity": math.exp(min(loss / n, 50)), "eval_tokens": int(n)}

    def run_eval(step: int) -> bool:
        """Evaluate; record the metrics; return whether metric_for_best improved on the best so far
        (kept in `state.best_eval_loss`, whichever metric it is)."""
        model.eval()
        record = {"step": step, **evaluate()}
        model.train()
        write_metrics(record)
        state.evals.append(record)
        shown = "  ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in record.items()
                          if k not in ("step", "eval_tokens", "eval_pairs"))
        reporter.log(f"step {step}: eval {shown}")
        value = record["eval_loss" if metric == "eval_loss" else f"eval_{metric}"]
        best = state.best_eval_loss
        thr = cfg.early_stopping_threshold
        if best is None or (value > best + thr if greater else value < best - thr):
            state.best_eval_loss, state.best_step, state.evals_since_best = value, step, 0
            return True
        state.evals_since_best += 1
        return False

    reporter.start(steps, "train")
    reporter.advance(state.step, {"loss": state.last_loss})
    model.train()
    start = window_start = time.perf_counter()
    time_before = state.train_time_s
    if cfg.early_stopping_patience is not None and state.evals_since_best >= cfg.early_stopping_patience:
        reporter.stop()  # a checkpoint written as early stopping ended the run: nothing more to train
        return "early_stopping"
    pin = device.type == "cuda"

    def draw() -> tuple[list[MicroBatch], list, int, int, int]:
        """One step's micro-batches (up to grad_accum: an epochs-based run's last step may have
        fewer), collated and moved with their loss plans (worked out on the host: the forward
        waits for nothing), and the stream's epoch, position and count after them."""
        micro = []
        while len(micro) < cfg.grad_accum and (mb := stream.next()) is not None:
            micro.append(mb)
        return micro, [prepare(mb.batch, device, pin) for mb in micro], stream.epoch, stream.position, \
            stream.consumed

    ahead = draw() if state.step < steps else None
    for step in range(state.step + 1, steps + 1):
        # Drawn ahead, during the last step's backward (see below); their token counts come from
        # the host tensors, so nothing here waits for the device.
        micro, moved, epoch_after, position_after, consumed_after = ahead
        if not micro:  # the data ran out: total_steps counts exactly, so this is only a safeguard
            break
        # The step's loss is averaged over its units (loss tokens, or pairs) of all processes; a
        # preference objective's NLL term over the chosen answers' tokens.
        step_tokens, step_chosen = reduce(sum(mb.units for mb in micro),
                                          sum(mb.pair.chosen_tokens * mb.weight for mb in micro) if pairs else 0)
        local_loss = torch.zeros((), dtype=torch.float32, device=device)
        local_stats = torch.zeros(len(objective.metric_names), dtype=torch.float64, device=device) if pairs else None
        local_nll = torch.zeros((), dtype=torch.float64, device=device)  # the chosen answers' cross-entropy sum
        step_terms: dict[str, torch.Tensor] = {}  # the hooks' loss terms of this step (read when logging)
        for i, mb in enumerate(micro):
            batch, plan = moved[i]
            sync = i == len(micro) - 1
            ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model)
            with ctx:
                if pairs:
                    ref = ref_logps.get("train")
                    if ref is not None:  # (2B,): the chosen rows' then the rejected rows'
                        ref = torch.cat([ref[mb.indices, 0], ref[mb.indices, 1]]).to(device, non_blocking=True)
                    answer = None if mb.pair.answer is None else mb.pair.answer.to(device, non_blocking=True)
                    pair_loss, nll, stats = micro_step(objective, model, batch, plan, mb.pair.lengths, ref, answer)
                    # In loss-sum units: divided by the step's pairs below, the objective of the step.
                    loss = pair_loss + objective.nll_weight * nll * (step_tokens / max(step_chosen, 1))
                    local_stats += stats * mb.weight
                    local_nll += nll.detach().double() * mb.weight
                else:
                    loss, _ = loss_sum(model, batch, plan)
                if mb.weight != 1.0:
                    loss = loss * mb.weight  # a stand-in: every process runs a backward, this one adds nothing
                # DDP averages gradients over processes; multiplying by `world` turns that average
                # into the sum over all loss tokens divided by their global count.
                scaled = loss * (world / max(step_tokens, 1))
                if hooks:
                    # Each micro-batch adds 1/len(micro) of the terms: the step adds each once.
                    for key, term in hooks.loss_terms().items():
                        scaled = scaled + term / len(micro)
                        step_terms[key] = step_terms.get(key, 0) + term.detach() / len(micro)
                if scaler is not None:
                    scaled = scaler.scale(scaled)
                accelerator.backward(scaled)
            local_loss += loss.detach().float()
        del moved, batch, plan
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
        if type(grad_norm).__name__ == "DTensor":  # FSDP2
            grad_norm = grad_norm.full_tensor()
        # The next step's batches are collated, pinned and queued for the device now, while the
        # device runs this step's backward: after the step's one wait (the gradient norm below)
        # the next forward starts at once. The state takes the stream's position from the values
        # drawn with this step's batches (a run that stops after this step resumes after it).
        ahead = draw() if step < steps else None
        grad_norm = float(grad_norm)  # the step's one wait for the device (with the loss below)
        step_loss, inputs, loss_tokens, stopping, step_nll, *stats = reduce(
            float(local_loss), sum(mb.input_tokens for mb in micro), sum(mb.loss_tokens for mb in micro),
            float(stop_signal()), float(local_nll) if logs_nll else 0.0, *(local_stats.tolist() if pairs else ()))
        # The rate this step's update uses: logged for this step (the scheduler then moves on).
        lr = optimizer.param_groups[0]["lr"]

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
            if hooks:
                hooks.after_optimizer_step(step)  # the step's gradients are still there
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

        if bad is None and not pairs and step_tokens and vocab_size and looks_collapsed(grad_norm, step_loss / step_tokens,
                                                                          vocab_size):
            state.collapsed_steps += 1
        else:
            state.collapsed_steps = 0

        state.step, state.epoch, state.position = step, epoch_after, position_after
        if bad is None:
            state.window_loss += step_loss
            state.window_tokens += step_tokens
            state.tokens_seen += int(inputs)
            state.loss_tokens_seen += int(loss_tokens)
            for name, value in zip(objective.metric_names if pairs else (), stats, strict=True):
                state.window_stats[name] = state.window_stats.get(name, 0.0) + value
            if logs_nll:  # a sum over tokens, not pairs: kept apart (NLL_SUM, NLL_TOKENS)
                for key, value in ((NLL_SUM, step_nll), (NLL_TOKENS, step_chosen)):
                    state.window_stats[key] = state.window_stats.get(key, 0.0) + value
        state.window_inputs += inputs
        if step % cfg.log_every == 0 or step == steps:
            now = time.perf_counter()
            # The mean loss per token over the steps since the last line (None: all were skipped).
            loss_now = state.window_loss / state.window_tokens if state.window_tokens else None
            if loss_now is not None:
                state.last_loss = loss_now
            record = {
                "step": step,
                "epoch": round(consumed_after / len(train), 4),  # passes over the data when the step ended
                "loss": loss_now,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": state.window_inputs / max(now - window_start, 1e-9),
                "loss_tokens": int(state.window_tokens),
                "elapsed_s": time_before + now - start,
            }
            shown_pairs = ""
            if pairs:  # TRL's metrics, means over the window's pairs
                record["pairs"] = record.pop("loss_tokens")
                record.update({k: v / state.window_tokens for k, v in state.window_stats.items()
                               if state.window_tokens and k not in (NLL_SUM, NLL_TOKENS)})
                if state.window_stats.get(NLL_TOKENS):  # the mean over the window's chosen tokens
                    record["nll_loss"] = state.window_stats[NLL_SUM] / state.window_stats[NLL_TOKENS]
                if state.window_tokens:
                    shown_pairs = (f"  acc {record['rewards/accuracies']:.2f}  "
                                   f"margin {record['rewards/margins']:.3g}")
            if step_terms:  # the adapter method's loss terms at this step (not in `loss`)
                record["loss_terms"] = {k: float(v) for k, v in step_terms.items()}
            write_metrics(record)
            reporter.advance(step, {"loss": state.last_loss, "lr": lr, "tok/s": round(record["tokens_per_s"])})
            shown = "-" if loss_now is None else f"{loss_now:.4f}"
            reporter.log(f"step {step}/{steps}  loss {shown}{shown_pairs}  lr {lr:.3g}  "
                         f"tok/s {record['tokens_per_s']:.0f}")
            state.window_loss = state.window_tokens = state.window_inputs = 0.0
            state.window_stats = {}
            window_start = now
        else:
            reporter.advance(step, {"loss": state.last_loss})

        if state.collapsed_steps >= COLLAPSE_STEPS:  # the step is done and logged; the run ends here
            since = step - state.collapsed_steps + 1
            raise Diverged(step, f"since step {since} the gradient norm has been exactly 0 and the loss "
                                 f"{step_loss / step_tokens:.4f} = ln({vocab_size}) (every token equally likely): "
                                 f"the model collapsed; the learning rate (train.lr {cfg.lr:g}) is most likely "
                                 "far too high", reason="collapsed", since=since)

        improved = False
        if eval_examples and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
            improved = run_eval(step)
        patience_out = (cfg.early_stopping_patience is not None
                        and state.evals_since_best >= cfg.early_stopping_patience)
        state.train_time_s = time_before + time.perf_counter() - start
        # While the model looks collapsed no periodic checkpoint is written: pruning would otherwise
        # delete the last good ones before the collapse is certain.
        periodic = cfg.save_every is not None and (step % cfg.save_every == 0 or step == steps)
        if ((periodic and not state.collapsed_steps) or stopping or (improved and keep_best)
                or (patience_out and keep_best)):
            checkpoint(state)
        if stopping:
            reporter.stop()
            return "interrupted"
        if patience_out:
            reporter.log(f"step {step}: {metric} has not improved for {state.evals_since_best} "
                         f"evaluations (best {state.best_eval_loss:.4f} at step {state.best_step}); stopping")
            reporter.stop()
            return "early_stopping"
    reporter.stop()
    return "completed"
