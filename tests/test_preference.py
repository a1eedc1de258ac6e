"""Preference objectives (train.objective: dpo, ipo, orpo, simpo) against TRL, the test-only oracle.

For one tiny Llama, one set of LoRA weights (random, so that policy and reference differ) and one
batch of pairs tokenized by peftctl, TRL's own code computes the loss and the logged metrics:
DPOTrainer._compute_loss (sigmoid, ipo; its concatenated forward, its reference = adapters
disabled), ORPOTrainer and CPOTrainer (loss_type simpo) get_batch_loss_metrics (their concatenated
forward on full logits), and CPOTrainer.cpo_loss for conservative DPO's label smoothing. peftctl
computes the same through its chunked per-row linear cross-entropy (no full logits).

Tolerance: everything runs in float32. A sequence's log-probability sums ~10-20 token terms, each a
log-sum-exp over 320 logits of size ~1-10, so each side carries a rounding error of a few float32
ulps of the summed magnitude (|log p| ~ 60): ~60 x 1.2e-7 x ~10 ~ 1e-4 at worst, typically 1e-5.
The losses and rewards are differences of such sums times beta (0.1-2): atol 2e-4 and rtol 1e-4
hold that with room, and are 100x tighter than any formula error (a wrong sign, average vs sum,
a missing gamma / beta) would produce.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from clirun import gloo_env, run, run_json
from tiny import recipe_text, write_preference_data

ATOL, RTOL = 2e-4, 1e-4


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("trl", reason="TRL is the test-only oracle of the preference losses")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftctl import data as data_lib
    from peftctl.recipe.data import DataSection
    from peftctl.runs import attach_saved_adapter

    tmp = tmp_path_factory.mktemp("pref")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_preference_data(tmp / "pairs.jsonl", 8, seed=3)
    examples = data_lib.build(DataSection(train=str(path), format="preference", max_length=64), tokenizer).train
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(tmp / "adapter")
    ours = attach_saved_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp / "adapter",
                                is_trainable=True)
    return {"tmp": tmp, "tokenizer": tokenizer, "examples": examples, "peft": peft_model, "ours": ours,
            "path": path, "model_dir": tiny_model_dir}


@pytest.fixture
def trl_trainer():
    """TRL's trainers set accelerate's process-wide state (mixed precision): reset after each test,
    as peftctl's runs set their own."""
    yield
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def _ours(setup, objective, examples=None):
    """peftctl's loss (with its gradient) and metrics (TRL's names) for one batch of pairs."""
    from peftctl.loss import loss_plan
    from peftctl.preference import eval_metrics, micro_step, pair_batch

    model = setup["ours"]
    model.zero_grad()
    pb = pair_batch(list(examples or setup["examples"]), setup["tokenizer"].pad_token_id, objective)
    loss, nll, stats = micro_step(objective, model, pb.batch, loss_plan(pb.batch["labels"]), pb.lengths,
                                  answer=pb.answer)
    total = loss / pb.pairs + objective.nll_weight * nll / pb.chosen_tokens
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = eval_metrics(objective, [pb.pairs, float(loss.detach()), pb.chosen_tokens, float(nll.detach()),
                                       *stats.tolist()], "")
    assert metrics["loss"] == pytest.approx(float(total.detach()), rel=1e-6)
    return pb.batch, metrics, grads


def _close(ours: float, theirs: float, what: str):
    assert abs(ours - theirs) <= ATOL + RTOL * abs(theirs), f"{what}: peftctl {ours} vs TRL {theirs}"


def _grads_close(ours: dict, peft_model):
    theirs = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    for name, g in ours.items():
        # The same sums as the loss, differentiated: the gradient's rounding scales with its norm.
        torch.testing.assert_close(g, theirs[name], atol=ATOL * max(1.0, float(theirs[name].abs().max())), rtol=RTOL)
    assert any(float(g.abs().max()) > 1e-3 for g in ours.values())  # a real gradient was compared


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@pytest.mark.parametrize("loss_type,beta,rpo_alpha", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("sigmoid", 0.1, 0.7)])
def test_dpo_and_ipo_match_trl(setup, trl_trainer, loss_type, beta, rpo_alpha):
    """rpo_alpha: TRL 1.x's RPO is loss_type [sigmoid, sft] with loss_weights [1, rpo_alpha]."""
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from peftctl.preference import Objective

    name = "dpo" if loss_type == "sigmoid" else "ipo"
    batch, ours, grads = _ours(setup, Objective(name, beta=beta, rpo_alpha=rpo_alpha))
    rpo = dict(loss_type=[loss_type, "sft"], loss_weights=[1.0, rpo_alpha]) if rpo_alpha else dict(loss_type=[loss_type])
    if rpo_alpha:
        assert ours["nll_loss"] > 0.1  # the NLL term is really in the compared loss
    args = DPOConfig(output_dir=str(setup["tmp"] / f"trl-{name}-{rpo_alpha}"), beta=beta, **rpo, report_to=[],
                     use_cpu=True, bf16=False, max_length=64, per_device_train_batch_size=8)
    # A fresh adapter from peft_config: TRL's reference is then the adapter-off model (given a
    # PeftModel it would copy the adapter as the reference); the weights are set afterwards.
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(setup["model_dir"]), args=args,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=0.0),
                         processing_class=setup["tokenizer"],
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    set_peft_model_state_dict(trainer.model, load_file(setup["tmp"] / "adapter" / "adapter_model.safetensors"))
    trainer.model.zero_grad()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    loss = trainer._compute_loss(trainer.model, inputs, False)
    loss.backward()
    _close(ours["loss"], float(loss.detach()), "loss")
    for key in METRICS:
        _close(ours[key], trainer._metrics["train"][key][-1], key)
    assert abs(ours["rewards/margins"]) > 20 * ATOL  # the adapter moved the policy away from the reference
    _grads_close(grads, trainer.model)


def _trl_batch(setup, objective):
    """TRL's CPO / ORPO batch of the same pairs (labels on the answers)."""
    from peftctl.preference import collate_pairs

    batch = collate_pairs(list(setup["examples"]), setup["tokenizer"].pad_token_id)
    b = batch["input_ids"].shape[0] // 2
    out = {}
    for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, None))):
        out[f"{side}_input_ids"] = batch["input_ids"][rows]
        out[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{side}_labels"] = batch["labels"][rows]
    return out


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_orpo_and_simpo_match_trl(setup, trl_trainer, name):
    from datasets import Dataset

    from peftctl.preference import Objective

    ds = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    common = dict(report_to=[], use_cpu=True, bf16=False, max_length=64)
    if name == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        objective = Objective("orpo", beta=0.2)
        trainer = ORPOTrainer(model=setup["peft"], args=ORPOConfig(output_dir=str(setup["tmp"] / "orpo"), beta=0.2,
                                                                   **common), processing_class=setup["tokenizer"],
                              train_dataset=ds)
        extra = {"nll_loss": "nll_loss", "log_odds_ratio": "log_odds_ratio", "log_odds_chosen": "log_odds_chosen"}
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        objective = Objective("simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=0.3, label_smoothing=0.1)
        trainer = CPOTrainer(model=setup["peft"], args=CPOConfig(
            output_dir=str(setup["tmp"] / "simpo"), beta=2.0, loss_type="simpo", simpo_gamma=0.7, cpo_alpha=0.3,
            label_smoothing=0.1, **common), processing_class=setup["tokenizer"], train_dataset=ds)
        extra = {"nll_loss": "nll_loss"}
    batch, ours, grads = _ours(setup, objective)
    trainer.model.zero_grad()
    loss, theirs = trainer.get_batch_loss_metrics(trainer.model, _trl_batch(setup, objective), "train")
    loss.backward()
    _close(ours["loss"], float(loss.detach()), "loss")
    for key in (*METRICS, *extra):
        _close(ours[key], float(theirs[key]), key)
    _grads_close(grads, trainer.model)


def test_dpo_label_smoothing_is_conservative_dpo(setup):
    """TRL 1.16's DPOTrainer dropped label smoothing from its sigmoid loss; its CPOTrainer keeps
    the conservative-DPO form, which is DPO's once fed the log-ratios (policy minus reference)."""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    from peftctl.loss import loss_plan
    from peftctl.preference import Objective, PairBatch, collate_pairs, pair_logps

    pb = PairBatch(collate_pairs(list(setup["examples"]), setup["tokenizer"].pad_token_id))
    plan = loss_plan(pb.batch["labels"])
    with torch.no_grad():
        pi = pair_logps(setup["ours"], pb.batch, plan)
        ref = pair_logps(setup["ours"], pb.batch, plan, reference=True)
    b = pb.pairs
    losses, _ = Objective("dpo", beta=0.3, label_smoothing=0.2).terms(pi[:b], pi[b:], ref[:b], ref[b:], None, None)
    trl_self = SimpleNamespace(alpha=0.0, beta=0.3, label_smoothing=0.2, loss_type="sigmoid",
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs, _, _ = CPOTrainer.cpo_loss(trl_self, pi[:b] - ref[:b], pi[b:] - ref[b:])
    torch.testing.assert_close(losses, theirs, atol=1e-6, rtol=1e-6)  # the same float32 inputs


def test_linear_cross_entropy_rows_matches_plain_and_weights_rows():
    """Per-row losses equal F.cross_entropy's; the backward weighs each row by its incoming
    gradient, for the hidden states and for a head that trains (recomputed in the backward)."""
    import torch.nn.functional as F

    from peftctl.kernels.linear_cross_entropy import linear_cross_entropy_rows

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    t[::5] = -100
    weights = torch.randn(37, dtype=torch.float64, generator=g)
    rows = linear_cross_entropy_rows(h, w, t, chunk_rows=8)
    (rows * weights).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    plain = F.cross_entropy(h @ w.T, t, reduction="none", ignore_index=-100)
    (plain * weights).sum().backward()
    # float64 on both sides, the same operations in another order: agreement to ~1e-12.
    torch.testing.assert_close(rows, plain.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gh, h.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gw, w.grad, atol=1e-12, rtol=1e-12)


def _recipe(tmp_path, model_dir, data, out, **train):
    path = tmp_path / f"{out}.yaml"
    train = {"objective": "dpo", "max_steps": 4, "batch_size": 2, "log_every": 1, "save_every": 2, **train}
    path.write_text(recipe_text(model_dir, str(data[0]), str(data[1]), str(tmp_path / out),
                                data={"format": "preference"}, train=train))
    return path


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefdata")
    return (write_preference_data(folder / "train.jsonl", 16, seed=1),
            write_preference_data(folder / "eval.jsonl", 6, seed=2, messages=True))


def _metrics(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_run_resumes_exactly_and_accumulation_equals_one_batch(tmp_path, tiny_model_dir, pref_data):
    """A dpo run: TRL's metric names in metrics.jsonl and eval --json; stopped after step 2 and
    resumed, it logs what the uninterrupted run logs, to the bit; batch 2 x grad_accum 2 trains
    the same adapter as batch 4 (the loss is a mean over the step's pairs, not over micro-batches)."""
    from safetensors.torch import load_file

    full = _recipe(tmp_path, tiny_model_dir, pref_data, "full", eval_every=2)
    run("train", full)
    records = _metrics(tmp_path / "full")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(k in steps[0] for k in METRICS) and steps[0]["pairs"] == 2
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(f"eval_{k}" in evals[-1] for k in METRICS)
    result = run_json("eval", full)
    assert result["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
    assert result["eval_rewards/accuracies"] == evals[-1]["eval_rewards/accuracies"]

    # Interrupted after step 2 (max_steps 2 ends it there, with its checkpoint), then resumed to 4.
    part = _recipe(tmp_path, tiny_model_dir, pref_data, "part", eval_every=2)
    run("train", part, "--set", "train.max_steps=2")
    run("train", part, "--resume", "auto")
    assert [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in _metrics(tmp_path / "part")] \
        == [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in records]
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    one = _recipe(tmp_path, tiny_model_dir, pref_data, "one", batch_size=4, max_steps=2, lr=1e-2)
    acc = _recipe(tmp_path, tiny_model_dir, pref_data, "acc", batch_size=2, grad_accum=2, max_steps=2, lr=1e-2)
    run("train", one)
    run("train", acc)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "acc" / "adapter_model.safetensors")
    # The same sums in two halves: float32 rounding of the gradient (~1e-7 relative), through two
    # AdamW updates of lr 1e-2 whose step is ~lr whatever the gradient's size: 1e-5 absolute.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    losses = [[r["loss"] for r in _metrics(tmp_path / name) if "loss" in r] for name in ("one", "acc")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_preference_objective_refuses_other_formats(make_recipe):
    result = run("validate", make_recipe(train={"objective": "dpo"}), code=2)
    assert "format preference" in result.stderr


@pytest.mark.parametrize("objective,option", [("sft", "beta"), ("dpo", "cpo_alpha"), ("orpo", "rpo_alpha"),
                                              ("simpo", "precompute_ref_log_probs")])
def test_an_option_of_another_objective_is_refused_not_ignored(make_recipe, objective, option):
    result = run("validate", make_recipe(train={"objective": objective, option: 1}), code=2)
    assert f"train.{option} applies to objective" in result.stderr and objective in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_rpo_logs_nll_loss_in_training_and_can_be_watched(tmp_path, tiny_model_dir, pref_data):
    """dpo + rpo_alpha 1 from a fresh adapter: at step 1 policy = reference, so the pair loss is
    ln 2 and the logged loss is ln 2 + nll_loss; nll_loss is a metric_for_best (lower is better)."""
    import math

    recipe = _recipe(tmp_path, tiny_model_dir, pref_data, "rpo", rpo_alpha=1.0, max_steps=2, eval_every=1,
                     save_every=None, metric_for_best="nll_loss")
    summary = run_json("train", recipe)
    steps = [r for r in _metrics(tmp_path / "rpo") if "loss" in r and "pairs" in r]
    assert steps[0]["step"] == 1 and steps[0]["nll_loss"] > 1.0
    assert steps[0]["loss"] == pytest.approx(math.log(2) + steps[0]["nll_loss"], rel=1e-5)
    evals = [r for r in _metrics(tmp_path / "rpo") if "eval_nll_loss" in r]
    assert summary["best_eval"]["metric"] == "nll_loss"
    assert summary["best_eval"]["step"] == min(evals, key=lambda r: r["eval_nll_loss"])["step"]


def test_pairs_truncate_together_prompt_first(tmp_path, tiny_model_dir):
    """A pair longer than max_length loses the beginning of its prompt (the tokens both sequences
    share), the same tokens from both, so that both answers stay whole; a pair whose answers alone
    do not fit is dropped and counted; truncation: drop drops every pair that is too long."""
    from transformers import AutoTokenizer

    from peftctl import data as data_lib
    from peftctl.recipe.data import DataSection

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_preference_data(tmp_path / "pairs.jsonl", 12, seed=5)
    whole = data_lib.build(DataSection(train=str(path), format="preference", max_length=64, cache=False), tokenizer)
    lengths = [max(len(e.input_ids), len(e.rejected.input_ids)) for e in whole.train]
    answers = [max(e.num_loss_tokens, e.rejected.num_loss_tokens) for e in whole.train]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the pairs are too long
    cut = data_lib.build(DataSection(train=str(path), format="preference", max_length=limit, cache=False), tokenizer)
    kept = [i for i, a in enumerate(answers) if a + 1 <= limit]  # the answers and one prompt token fit
    assert cut.stats["train"].dropped_too_long == len(answers) - len(kept)
    assert len(cut.train) == len(kept) and cut.stats["train"].truncated == sum(lengths[i] > limit for i in kept) > 0
    for e, i in zip(cut.train, kept, strict=True):
        full = whole.train[i]
        over = max(0, lengths[i] - limit)
        for got, ref in ((e, full), (e.rejected, full.rejected)):
            assert got.input_ids == ref.input_ids[over:] and got.labels == ref.labels[over:]
    dropped = data_lib.build(DataSection(train=str(path), format="preference", max_length=limit, cache=False,
                                         truncation="drop"), tokenizer)
    assert len(dropped.train) == sum(n <= limit for n in lengths)
    # A limit the longest answers alone reach: those pairs are dropped, the others cut.
    tight = max(answers)
    few = data_lib.build(DataSection(train=str(path), format="preference", max_length=tight, cache=False), tokenizer)
    assert few.stats["train"].dropped_too_long == sum(a + 1 > tight for a in answers) > 0
    assert len(few.train) == sum(a + 1 <= tight for a in answers) > 0


def test_dry_run_counts_both_sequences_of_a_pair_and_names_the_objective(tmp_path, tiny_model_dir, pref_data):
    """The dry run's tokens are the run's tokens_seen: a pair's chosen and rejected sequences both
    (one epoch of the 16 pairs: the expected count is exact); its plan names the objective and the
    reference pass."""
    recipe = _recipe(tmp_path, tiny_model_dir, pref_data, "dry", batch_size=4, max_steps=4, save_every=None)
    plan = run_json("train", recipe, "--dry-run")
    shown = run("train", recipe, "--dry-run").stdout
    assert "objective    dpo (beta 0.1), reference (the adapter disabled): a second forward in every step" in shown
    pre = run("train", recipe, "--dry-run", "--set", "train.precompute_ref_log_probs=true").stdout
    assert "one pass over the pairs before the first step" in pre
    assert "no reference model" in run("train", recipe, "--dry-run", "--set", "train.objective=orpo").stdout
    summary = run_json("train", recipe)
    assert plan["tokens"] == summary["tokens_seen"]


def test_identical_pairs_are_counted_and_a_null_answer_is_named(tmp_path, tiny_model_dir, pref_data):
    """Pairs whose chosen and rejected answers are the same: kept (TRL trains them too), counted and
    warned of by validate, `data --stats` and the run's data log. A null answer is said to be null
    (not "missing" next to a keys list that shows it)."""
    import json

    rows = [json.loads(line) for line in pref_data[0].read_text().splitlines()]
    for row in rows[:3]:
        row["rejected"] = row["chosen"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(tmp_path, tiny_model_dir, (pairs, pref_data[1]), "same", max_steps=1, save_every=None)
    notes = run_json("validate", recipe)["notes"]
    assert any(f"data.train {pairs}: 3 rows are preference pairs whose chosen and rejected answers are identical"
               in n for n in notes), notes
    stats = run_json("data", recipe, "--stats")["stats"]
    assert stats["train"]["identical_pairs"] == 3 and stats["train"]["examples"] == 16  # kept
    assert stats["eval"]["identical_pairs"] == 0
    assert "3 preference pairs have identical chosen and rejected answers" in run("data", recipe, "--stats").stdout
    assert "3 rows are preference pairs whose chosen and rejected" in run("train", recipe).stderr

    rows[5]["chosen"] = None
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run("validate", recipe, code=2)
    assert "row 6: field 'chosen' is null; it needs a value" in r.stderr and "the row's keys" not in r.stderr


def test_dpo_from_an_existing_adapter_uses_it_as_the_reference(tmp_path, tiny_model_dir, pref_data):
    """train.init_adapter: the run starts from that adapter, and DPO's reference is the model with
    it (precomputed): at the first step, before any update, policy and reference are the same
    model, so the rewards are 0 and the loss ln 2 (with the adapter-off base as the reference they
    would not be: the first run moved the adapter)."""
    import math

    run("train", _recipe(tmp_path, tiny_model_dir, pref_data, "first", objective="simpo", max_steps=3, lr=2e-2))
    refused = _recipe(tmp_path, tiny_model_dir, pref_data, "no", init_adapter=str(tmp_path / "first"))
    assert "precompute_ref_log_probs" in run("validate", refused, code=2).stderr
    second = _recipe(tmp_path, tiny_model_dir, pref_data, "second", init_adapter=str(tmp_path / "first"),
                     precompute_ref_log_probs=True, max_steps=1, save_every=None, eval_every=1)
    run("train", second)
    step, evaluation = _metrics(tmp_path / "second")
    # The same float32 sums in another batch (another padding): ~1e-6 apart.
    assert abs(step["rewards/chosen"]) < 1e-5 and abs(step["rewards/rejected"]) < 1e-5
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # The base as the reference: the first run's adapter is far from it.
    base_ref = run_json("eval", second, "--adapter", tmp_path / "first", "--set", "train.init_adapter=null",
                        "--set", "train.precompute_ref_log_probs=false")
    assert abs(base_ref["eval_rewards/margins"]) > 1e-3
    # eval of the run: the reference is the init adapter, as in training
    result = run_json("eval", second)
    assert result["eval_loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-5)

    # The starting adapter must be the one the recipe describes: its weights at another scaling
    # would start (and be the reference of) another model. validate, train and eval refuse it.
    run("validate", second)  # the adapter the recipe describes: fine
    other = ("--set", "adapter.lora_alpha=64", "--set", "adapter.use_rslora=true")
    for command in (("validate",), ("train", "--set", f"output.dir={tmp_path / 'alpha'}")):
        err = run(command[0], second, *command[1:], *other, code=2).stderr
        assert "train.init_adapter" in err and "lora_alpha: 8.0 vs 64.0" in err and "use_rslora: False vs True" in err
    assert not (tmp_path / "alpha").exists()
    scaled = tmp_path / "first_alpha64"  # the first run's weights, saved as another scaling
    shutil.copytree(tmp_path / "first", scaled)
    config = json.loads((scaled / "adapter_config.json").read_text())
    (scaled / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 64}))
    err = run("eval", second, "--set", f"train.init_adapter={scaled}", code=2).stderr
    assert "first_alpha64" in err and "lora_alpha: 64" in err
    # Resuming with another starting adapter (so another reference) is another run.
    third = _recipe(tmp_path, tiny_model_dir, pref_data, "third", init_adapter=str(tmp_path / "first"),
                    precompute_ref_log_probs=True, max_steps=1, save_every=1)
    run("train", third)
    shutil.copytree(tmp_path / "first", tmp_path / "first_copy")
    err = run("train", third, "--set", "train.max_steps=2", "--set", f"train.init_adapter={tmp_path / 'first_copy'}",
              "--resume", "auto", code=2).stderr
    assert "cannot resume" in err and "train.init_adapter" in err

    # eval of a run takes the reference the run used (its reference_logps.safetensors), even after
    # the starting adapter's folder changed; on other eval pairs that changed folder is refused.
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "first" / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in weights.items()}, tmp_path / "first" / "adapter_model.safetensors")
    again = run("eval", second, "--json")
    assert json.loads(again.stdout)["eval_loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-5)
    assert "reference log-probabilities of the run" in again.stderr
    err = run("eval", second, "--set", f"data.eval={pref_data[0]}", code=2).stderr
    assert "train.init_adapter" in err and "no longer those the run started from" in err


def test_two_processes_train_dpo_as_one_process_does(tmp_path, tiny_model_dir, pref_data):
    """`--num-processes 2` (gloo on CPU), one pair each, with gradient checkpointing, is the global
    batch of two pairs in one process with the reference computed in each step: the same losses,
    metrics and adapter, whether the two processes compute the reference in each step too or
    precompute it (train.precompute_ref_log_probs: the train split's read from the data cache,
    where a one-process run put it, and handed to both processes; the eval split's computed half by
    each process: the same numbers as one process computes)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from peftctl import data as data_lib
    from peftctl.models import load

    cache = {"cache_dir": str(tmp_path / "cache")}
    # One process, no eval data: the train split's reference in the cache.
    warm = tmp_path / "warm.yaml"
    warm.write_text(recipe_text(tiny_model_dir, str(pref_data[0]), None, str(tmp_path / "warm"),
                                data={"format": "preference", **cache},
                                train={"objective": "dpo", "max_steps": 1, "batch_size": 2,
                                       "precompute_ref_log_probs": True}, eval={"batch_size": 2}))
    run("train", warm)
    two = tmp_path / "two.yaml"
    two.write_text(recipe_text(tiny_model_dir, str(pref_data[0]), str(pref_data[1]), str(tmp_path / "two"),
                               data={"format": "preference", **cache},
                               train={"objective": "dpo", "max_steps": 3, "batch_size": 1, "log_every": 1, "lr": 1e-2,
                                      "eval_every": 3, "gradient_checkpointing": True,
                                      "precompute_ref_log_probs": True},
                               eval={"batch_size": 2}))  # 3 eval batches: the processes' shares differ in size
    ddp = tmp_path / "ddp.yaml"  # the reference in each step, through DDP's wrapper
    ddp.write_text(two.read_text().replace("precompute_ref_log_probs: true", "precompute_ref_log_probs: false")
                   .replace(str(tmp_path / "two"), str(tmp_path / "ddp")))
    for recipe in (ddp, two):
        p = subprocess.run([sys.executable, "-m", "peftctl", "train", str(recipe), "--num-processes", "2"],
                           env={**gloo_env(), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    assert not (tmp_path / "ddp" / "reference_logps.safetensors").exists()
    assert "train: reference log-probabilities of 16 pairs from the cache" in p.stderr
    assert "eval: computing the reference log-probabilities of 6 pairs" in p.stderr
    assert torch.equal(load_file(tmp_path / "two" / "reference_logps.safetensors")["train"],
                       load_file(tmp_path / "warm" / "reference_logps.safetensors")["train"])
    run("train", _recipe(tmp_path, tiny_model_dir, pref_data, "one", batch_size=2, max_steps=3, save_every=None,
                         lr=1e-2, eval_every=3))
    for name in ("ddp", "two"):
        a, b = ([r for r in _metrics(tmp_path / n) if "loss" in r or "eval_loss" in r] for n in ("one", name))
        assert len(a) == len(b) == 4
        for x, y in zip(a, b, strict=True):
            for key in ("loss", *METRICS) if "loss" in x else ("eval_loss", *(f"eval_{m}" for m in METRICS)):
                # float32 sums over other batches of the same pairs (the reference's too), then three
                # AdamW steps: ~1e-6.
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), (name, key)
        a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("one", name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)

    # The eval split's numbers, shared by two processes, are those one process computes: the same
    # batches of the same model; another process's thread count may round a matmul otherwise
    # (float32 sums of ~60 over ~20 tokens, each term off by a few ulps at most: ~1e-5; atol 1e-4
    # leaves room and is far below a wrong pair's error, whole nats).
    from peftctl.preference import reference_logps
    from peftctl.recipe import load as load_recipe

    recipe = load_recipe(two)
    model, tokenizer = load(recipe.model)
    examples = data_lib.build(recipe.data, tokenizer).eval
    mine = reference_logps(model, examples, 2, tokenizer.pad_token_id, torch.device("cpu"))
    torch.testing.assert_close(load_file(tmp_path / "two" / "reference_logps.safetensors")["eval"], mine,
                               atol=1e-4, rtol=1e-6)


def test_preference_objective_with_tasks_metric_for_best_and_validate_rows(tmp_path, tiny_model_dir, pref_data):
    """Where preference training meets model.task, metric_for_best and validate's every-row check:
    a preference objective on another task is refused; metric_for_best takes the objective's TRL
    metrics (eval_ prefix or not; the rejected answers' lower is better) and early stopping and
    load_best_at_end follow it; a bad pair row is named by validate."""
    from peftctl.recipe import load

    path = _recipe(tmp_path, tiny_model_dir, pref_data, "seqcls")
    text = path.read_text().replace("dtype: float32", "dtype: float32\n  task: seq_cls")
    path.write_text(text)
    result = run("validate", path, code=2)
    assert "train.objective dpo" in result.stderr and "model.task seq_cls" in result.stderr
    prompt = _recipe(tmp_path, tiny_model_dir, pref_data, "prompt")
    prompt.write_text(recipe_text(tiny_model_dir, str(pref_data[0]), None, "prompt", data={"format": "preference"},
                                  adapter={"method": "prompt_tuning", "num_virtual_tokens": 4},
                                  train={"objective": "dpo"}))
    assert "prompt_tuning adapter is trained with objective sft" in run("validate", prompt, code=2).stderr

    sft = _recipe(tmp_path, tiny_model_dir, pref_data, "sft", objective="sft", eval_every=1,
                  metric_for_best="eval_rewards/accuracies")
    assert "metric_for_best" in run("validate", sft, code=2).stderr
    rejected = load(_recipe(tmp_path, tiny_model_dir, pref_data, "rej", eval_every=1,
                                   metric_for_best="eval_rewards/rejected"))
    assert rejected.train.best_metric == "rewards/rejected" and not rejected.train.best_is_greater

    margins = load(_recipe(tmp_path, tiny_model_dir, pref_data, "mar", eval_every=1, metric_for_best="rewards/margins"))
    assert margins.train.best_is_greater
    # Watched the other way (the smallest margin is best), so that the best evaluation is not the
    # one eval_loss would pick: DPO training raises the margin as it lowers the loss.
    best = _recipe(tmp_path, tiny_model_dir, pref_data, "best", eval_every=1, max_steps=3, save_every=None,
                   metric_for_best="eval_rewards/margins", greater_is_better=False, load_best_at_end=True, lr=1e-2)
    summary = run_json("train", best)
    evals = [r for r in _metrics(tmp_path / "best") if "eval_loss" in r]
    low = min(evals, key=lambda r: r["eval_rewards/margins"])
    assert low["step"] != min(evals, key=lambda r: r["eval_loss"])["step"]  # the case tells the metrics apart
    assert summary["best_eval"]["metric"] == "rewards/margins" and summary["best_eval"]["step"] == low["step"]
    assert summary["final_eval"] == low  # load_best_at_end: the run's adapter is the best step's
    assert run_json("eval", best)["eval_rewards/margins"] == pytest.approx(low["eval_rewards/margins"], rel=1e-4)

    bad = tmp_path / "bad.jsonl"
    rows = pref_data[0].read_text().splitlines()
    rows[2] = '{"prompt": "Convert May 1, 2000 to ISO: ", "chosen": "2000-05-01"}'
    bad.write_text("\n".join(rows) + "\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text(path.read_text().replace("\n  task: seq_cls", "").replace(str(pref_data[0]), str(bad)))
    result = run("validate", broken, code=2)
    assert "bad.jsonl row 3" in result.stderr and "rejected" in result.stderr


def test_dpo_on_a_4bit_base_trains_with_the_adapter_off_model_as_reference(tmp_path, tiny_model_dir, pref_data):
    """QLoRA: DPO on a 4-bit (bitsandbytes) base. Before the first update the adapter is a no-op, so the
    policy is its own reference: the first step's rewards are exactly 0 (the reference pass is the same
    4-bit network with the adapter off); after training the held-out margin is not 0."""
    path = tmp_path / "q.yaml"
    path.write_text(recipe_text(tiny_model_dir, str(pref_data[0]), str(pref_data[1]), str(tmp_path / "q"),
                                model={"quantization": {"bits": 4}}, data={"format": "preference"},
                                train={"objective": "dpo", "max_steps": 3, "batch_size": 2, "log_every": 1,
                                       "lr": 5e-2, "eval_every": 3, "warmup_steps": 0}))
    run("train", path)
    records = _metrics(tmp_path / "q")
    first = next(r for r in records if "loss" in r)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)  # -log sigmoid(0)
    last = [r for r in records if "eval_loss" in r][-1]
    assert math.isfinite(last["eval_loss"]) and last["eval_rewards/margins"] != 0.0


def test_precomputed_reference_is_cached_per_split_and_reused(tmp_path, tiny_model_dir, pref_data):
    """train.precompute_ref_log_probs keeps each split's reference log-probabilities in the data
    cache: a second run with the same inputs reads them (and says so), the same numbers to the bit;
    the same init adapter at another path is the same reference; a changed init adapter recomputes
    both splits, changed eval data the eval split only; a resumed run reads the run folder's copy
    even when the cache is gone; data.cache: false neither reads nor writes the cache."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    reference = cache / "reference"

    def recipe(out, init, eval_path=None, model=tiny_model_dir, **data):
        path = tmp_path / f"{out}.yaml"
        path.write_text(recipe_text(model, str(pref_data[0]), str(eval_path or pref_data[1]),
                                    str(tmp_path / out), data={"format": "preference", "cache_dir": str(cache), **data},
                                    train={"objective": "dpo", "max_steps": 1, "batch_size": 2, "log_every": 1,
                                           "save_every": 1, "eval_every": 1, "init_adapter": str(init),
                                           "precompute_ref_log_probs": True}))
        return path

    def ref(out):
        return load_file(tmp_path / out / "reference_logps.safetensors")

    def same(a, b):
        return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # An init adapter whose weights move the model away from the base (lora_B is 0 when fresh).
    run("train", _recipe(tmp_path, tiny_model_dir, pref_data, "sft", objective="simpo", max_steps=2, lr=5e-2,
                         save_every=None))
    first = run("train", recipe("a", tmp_path / "sft"))
    assert first.stderr.count("computing the reference log-probabilities") == 2
    assert "reference log-probabilities (train): 16 pairs" in first.stderr  # the progress (a bar on a terminal)
    assert "from the cache" not in first.stderr and len(list(reference.glob("*.safetensors"))) == 2
    second = run("train", recipe("b", tmp_path / "sft"))
    assert "computing the reference" not in second.stderr
    assert "train: reference log-probabilities of 16 pairs from the cache" in second.stderr
    assert "eval: reference log-probabilities of 6 pairs from the cache" in second.stderr
    assert same(ref("a"), ref("b"))

    # peftctl eval of such a run (its reference: the init adapter's model) reads the run's own copy.
    evaluated = run("eval", recipe("b", tmp_path / "sft"), "--json")
    assert "reference log-probabilities of the run" in evaluated.stderr
    assert json.loads(evaluated.stdout)["eval_loss"] == pytest.approx(
        [r for r in _metrics(tmp_path / "b") if "eval_loss" in r][-1]["eval_loss"], rel=1e-5)

    shutil.copytree(tmp_path / "sft", tmp_path / "copy")  # the same weights elsewhere: the same reference
    assert "computing the reference" not in run("train", recipe("c", tmp_path / "copy")).stderr
    weights = load_file(tmp_path / "copy" / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = weights[key] * 2
    save_file(weights, tmp_path / "copy" / "adapter_model.safetensors")
    changed = run("train", recipe("d", tmp_path / "copy"))
    assert changed.stderr.count("computing the reference log-probabilities") == 2
    assert not torch.equal(ref("d")["train"], ref("a")["train"])  # another reference, really computed
    assert len(list(reference.glob("*.safetensors"))) == 4

    # The model's files are part of the key: a weights file written again is another model.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert run("train", recipe("m1", tmp_path / "sft", model=model)).stderr.count("computing the reference") == 2
    assert "computing the reference" not in run("train", recipe("m2", tmp_path / "sft", model=model)).stderr
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert run("train", recipe("m3", tmp_path / "sft", model=model)).stderr.count("computing the reference") == 2
    assert same(ref("m3"), ref("a"))  # the same weights, in fact: the same numbers

    rows = pref_data[1].read_text().splitlines()
    row = json.loads(rows[0])
    row["rejected"][0]["content"] = "1999-99-99"
    other_eval = tmp_path / "eval2.jsonl"
    other_eval.write_text("\n".join([json.dumps(row), *rows[1:]]) + "\n")
    new_eval = run("train", recipe("e", tmp_path / "sft", other_eval))
    assert "train: reference log-probabilities of 16 pairs from the cache" in new_eval.stderr
    assert "eval: computing the reference log-probabilities" in new_eval.stderr
    assert torch.equal(ref("e")["train"], ref("a")["train"])
    assert torch.equal(ref("e")["eval"][1:], ref("a")["eval"][1:]) and ref("e")["eval"][0, 1] != ref("a")["eval"][0, 1]

    # A damaged cache file is computed again (and replaced).
    damaged = sorted(reference.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)[0]
    damaged.write_bytes(damaged.read_bytes()[:20])
    again = run("train", recipe("g", tmp_path / "sft"))
    assert again.stderr.count("computing the reference log-probabilities") == 1
    assert same(ref("g"), ref("a")) and load_file(damaged)["logps"].shape == (16, 2)  # replaced whole

    # Resumed with the cache cleared: the run folder's numbers, nothing computed.
    shutil.rmtree(cache)
    resumed = run("train", recipe("a", tmp_path / "sft"), "--resume", "auto", "--set", "train.max_steps=2")
    assert "computing the reference" not in resumed.stderr and "reference_logps.safetensors" in resumed.stderr
    assert not reference.exists() and same(ref("a"), ref("b"))

    off = run("train", recipe("f", tmp_path / "sft", cache=False))
    assert off.stderr.count("computing the reference log-probabilities") == 2 and not reference.exists()
    assert same(ref("f"), ref("b"))


def test_dpo_divergence_stops_as_sft_does(tmp_path, tiny_model_dir, pref_data):
    """Divergence detection on a preference run, provoked for real: float16 and a learning rate of
    1e4. Step 1's update (the reference is the adapter-off model, so its rewards are 0 and its
    gradient is not) overflows the float16 activations: the next step's log-probabilities and
    so its DPO loss are not finite. With one skip allowed, that step is skipped and the next one
    ends the run, exit 1, with the sft path's message, status and files (the last good checkpoint
    kept, no final adapter)."""
    from safetensors.torch import load_file

    out = tmp_path / "div"
    path = _recipe(tmp_path, tiny_model_dir, pref_data, "div", max_steps=20, save_every=1, lr=1e4,
                   skip_nonfinite_steps=1, warmup_steps=0)
    path.write_text(path.read_text().replace("dtype: float32", "dtype: float16"))
    r = run("train", path, code=1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 1 and summary["steps"] == 2
    assert "training diverged at step 3: the loss is not finite" in r.stderr and "Traceback" not in r.stderr
    assert [m for m in _metrics(out) if "skipped" in m] == [{"step": 2, "skipped": "loss is not finite"}]
    assert f"last checkpoint {out / 'checkpoints' / 'step-000002'}" in r.stderr
    for step in (1, 2):  # the skipped step changed nothing
        weights = load_file(out / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "adapter_model.safetensors").exists()
