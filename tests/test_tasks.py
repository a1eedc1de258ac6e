"""model.task seq2seq_lm, seq_cls and token_cls end to end through the CLI (train, eval with the
task's metrics, merge/export), each adapter loaded by PEFT (the oracle) with identical outputs and
the metrics recomputed from PEFT's predictions by the reference definitions (scikit-learn for
accuracy and macro F1, seqeval for entity F1); and the label and row errors (exit 2, naming the row)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from peftctl.errors import InputError
from tests.clirun import run, run_json
from tests.tiny_tasks import build_bert, build_t5, write_classification, write_seq2seq, write_tagging

# Tolerance of peftctl's logits against PEFT's for one float32 model: the same weights, the LoRA
# product computed in another order (peftctl scales the r-wide intermediate, PEFT the output), so
# each adapted projection differs by a few float32 roundings (relative 6e-8 each) of O(1) values;
# through two tiny layers that stays far below 1e-5.
ATOL = 1e-5


def _recipe(tmp_path: Path, model: Path, task: str, fmt: str, targets: list[str], train: Path, eval_: Path,
            **train_fields) -> Path:
    recipe = {
        "model": {"name_or_path": str(model), "dtype": "float32", "task": task},
        "adapter": {"r": 4, "lora_alpha": 8, "target_modules": targets},
        "data": {"train": str(train), "eval": str(eval_), "format": fmt, "max_length": 32},
        "train": {"max_steps": 24, "batch_size": 8, "lr": 1e-2, "log_every": 4, "eval_every": 12,
                  "warmup_steps": 0, "seed": 0, "save_every": None, **train_fields},
        "eval": {"batch_size": 8, "max_new_tokens": 6},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _examples(task, fmt, path, tokenizer, labels):
    from peftctl.data.tasks import build_examples
    from peftctl.recipe import DataSection

    return build_examples(task, DataSection(train=[str(path)], format=fmt, max_length=32), tokenizer, labels,
                          "train")[0]


def _batch(examples, pad_id):
    from peftctl.data.batch import collate_task

    batch = collate_task(examples, pad_id)
    return {k: v for k, v in batch.items() if k not in ("labels", "task")}, batch["labels"]


def _common_checks(tmp_path, task_type: str, metrics: tuple[str, ...]) -> dict:
    """What every task's run folder holds: the task type, the eval metrics in metrics.jsonl."""
    run_dir = tmp_path / "run"
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["task_type"] == task_type
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24]
    for r in evals:
        assert all(isinstance(r[f"eval_{m}"], float) and 0 <= r[f"eval_{m}"] <= 1 for m in metrics)
    return config


def test_seq_cls_end_to_end(tmp_path):
    from peft import PeftModel
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = build_bert(tmp_path / "bert")
    train = write_classification(tmp_path / "train.jsonl", 64)
    eval_ = write_classification(tmp_path / "eval.jsonl", 16, seed=1)
    recipe = _recipe(tmp_path, model_dir, "seq_cls", "classification", ["query", "value"], train, eval_,
                     metric_for_best="accuracy", load_best_at_end=True)
    summary = run_json("train", recipe)
    # The best evaluation is the one of highest accuracy (the first of equals), not of lowest loss.
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_accuracy" in r]
    best = max(evals, key=lambda r: (r["eval_accuracy"], -r["step"]))
    assert summary["best_eval"]["metric"] == "accuracy" and summary["best_eval"]["step"] == best["step"]
    assert summary["best_eval"]["eval_accuracy"] == best["eval_accuracy"]
    # report names the metric the run chose its best evaluation by, with the evaluation's metrics.
    text = run("report", tmp_path / "run", "--no-image").stdout
    assert f"best accuracy {best['eval_accuracy']:.4f} at step {best['step']}" in text
    assert "final eval  loss " in text and ", accuracy " in text and ", f1 " in text
    config = _common_checks(tmp_path, "SEQ_CLS", ("accuracy", "f1"))
    assert "classifier" in config["modules_to_save"]
    run_dir = tmp_path / "run"
    # The labels, sorted, are the run's: in its recipe.yaml.
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["labels"] == ["neg", "pos"]

    result = run_json("eval", recipe, "--predictions", tmp_path / "predictions.jsonl")
    id2label = {0: "neg", 1: "pos"}
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, id2label=id2label,
                                                              label2id={"neg": 0, "pos": 1})
    peft_model = PeftModel.from_pretrained(base, run_dir).eval()
    tok = AutoTokenizer.from_pretrained(run_dir)
    examples = _examples("seq_cls", "classification", eval_, tok, ["neg", "pos"])
    inputs, labels = _batch(examples, tok.pad_token_id)
    from peftctl import models, runs
    from peftctl.recipe import load

    ours = runs.attach_saved_adapter(models.load_model(load(run_dir / "recipe.yaml").model), run_dir).eval()
    with torch.no_grad():
        expected, got = peft_model(**inputs).logits, ours(**inputs).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    preds = expected.argmax(-1).tolist()
    assert result["accuracy"] == pytest.approx(accuracy_score(labels.tolist(), preds), abs=1e-12)
    assert result["f1"] == pytest.approx(f1_score(labels.tolist(), preds, average="macro"), abs=1e-12)
    # Trained: the head and the adapter learned the task (untrained, the head is a coin flip).
    assert result["accuracy"] >= 0.9, result
    # --predictions: every example in data order, labels by name, the predicted label's probability.
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    probs = expected.softmax(-1).max(-1).values.tolist()
    assert [r["source"] for r in rows] == [f"{eval_} row {i + 1}" for i in range(len(examples))]
    assert [r["prediction"] for r in rows] == [id2label[p] for p in preds]
    assert [r["reference"] for r in rows] == [id2label[y] for y in labels.tolist()]
    assert sum(r["correct"] for r in rows) == round(result["accuracy"] * len(rows))
    # float32 softmax of logits that agree to 1e-5: probabilities agree to ~1e-5 too.
    assert [r["probability"] for r in rows] == pytest.approx(probs, abs=1e-5)

    out = tmp_path / "merged"
    run_json("export", run_dir, "--format", "merged", "-o", out)
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == id2label
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=ATOL, rtol=0)
    # The shared adapter's model card loads the base with the run's labels both ways.
    run("export", run_dir, "--format", "peft", "-o", tmp_path / "share")
    card = (tmp_path / "share" / "README.md").read_text()
    assert "num_labels=2, id2label={0: 'neg', 1: 'pos'}, label2id={'neg': 0, 'pos': 1})" in card
    refused = run("export", run_dir, "--format", "gguf", "-o", tmp_path / "gguf", code=2)
    assert "causal language models" in refused.stderr and "seq_cls" in refused.stderr
    assert not (tmp_path / "gguf").exists()


def test_token_cls_end_to_end(tmp_path):
    from peft import PeftModel
    from seqeval.metrics import f1_score
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model_dir = build_bert(tmp_path / "bert")
    train = write_tagging(tmp_path / "train.jsonl", 64)
    eval_ = write_tagging(tmp_path / "eval.jsonl", 16, seed=1)
    recipe = _recipe(tmp_path, model_dir, "token_cls", "token_classification", ["query", "value"], train, eval_,
                     lr=3e-2)
    # inspect sizes the head from the training data's tags, as the run does (it showed 2 labels).
    head = [m for m in run_json("inspect", recipe)["modules"] if m["module"].endswith("classifier")]
    hidden = AutoModelForTokenClassification.from_pretrained(model_dir).config.hidden_size
    assert sum(m["trainable_params"] for m in head) == 4 * hidden + 4, head
    run_json("train", recipe)
    config = _common_checks(tmp_path, "TOKEN_CLS", ("accuracy", "f1"))
    assert "classifier" in config["modules_to_save"]
    run_dir = tmp_path / "run"
    labels = ["B-LOC", "B-PER", "I-PER", "O"]
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["labels"] == labels

    result = run_json("eval", recipe)
    id2label = dict(enumerate(labels))
    base = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=4, id2label=id2label,
                                                           label2id={v: k for k, v in id2label.items()})
    peft_model = PeftModel.from_pretrained(base, run_dir).eval()
    tok = AutoTokenizer.from_pretrained(run_dir)
    examples = _examples("token_cls", "token_classification", eval_, tok, labels)
    # CoNLL labelling: a word's tag on its first sub-token, -100 on the others (zorbo splits).
    rows = [json.loads(line) for line in eval_.read_text().splitlines()]
    for example, row in zip(examples, rows, strict=True):
        enc = tok(row["tokens"], is_split_into_words=True)
        firsts = [i for i, w in enumerate(enc.word_ids()) if w is not None and (i == 0 or enc.word_ids()[i - 1] != w)]
        assert [example.labels[i] for i in firsts] == [labels.index(t) for t in row["tags"]]
        assert sum(y != -100 for y in example.labels) == len(row["tags"])
    assert any(len(e.input_ids) > len(r["tokens"]) + 2 for e, r in zip(examples, rows, strict=True))

    inputs, gold = _batch(examples, tok.pad_token_id)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    from peftctl.adapters import AutoPeftModelForTokenClassification

    ours = AutoPeftModelForTokenClassification.from_pretrained(run_dir, num_labels=4, id2label=id2label).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, expected, atol=ATOL, rtol=0)
    keep = gold != -100
    pred = expected.argmax(-1)
    refs = [[labels[t] for t in gold[i][keep[i]].tolist()] for i in range(len(examples))]
    preds = [[labels[p] for p in pred[i][keep[i]].tolist()] for i in range(len(examples))]
    assert result["accuracy"] == pytest.approx(float((pred[keep] == gold[keep]).float().mean()), abs=1e-6)
    assert result["f1"] == pytest.approx(f1_score(refs, preds), abs=1e-12)
    assert result["f1"] >= 0.5, result  # trained: most entities found

    out = tmp_path / "merged"
    run_json("export", run_dir, "--format", "merged", "-o", out)
    merged = AutoModelForTokenClassification.from_pretrained(out).eval()
    assert merged.config.id2label == id2label
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=ATOL, rtol=0)


def test_seq2seq_end_to_end(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model_dir = build_t5(tmp_path / "t5")
    train = write_seq2seq(tmp_path / "train.jsonl", 64)
    eval_ = write_seq2seq(tmp_path / "eval.jsonl", 8, seed=1)
    recipe = _recipe(tmp_path, model_dir, "seq2seq_lm", "completion", ["q", "v", "wi", "wo"], train, eval_,
                     lr=3e-2, metric_for_best="exact_match")
    run_json("train", recipe)
    run_dir = tmp_path / "run"
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and not config["modules_to_save"]
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval_exact_match" in r] == [12, 24]

    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(base, run_dir).eval()
    tok = AutoTokenizer.from_pretrained(run_dir)
    examples = _examples("seq2seq_lm", "completion", eval_, tok, None)
    inputs, labels = _batch(examples, tok.pad_token_id)
    from peftctl.adapters import AutoPeftModelForSeq2SeqLM

    ours = AutoPeftModelForSeq2SeqLM.from_pretrained(run_dir).eval()
    with torch.no_grad():
        expected = peft_model(**inputs, labels=labels).logits
        torch.testing.assert_close(ours(**inputs, labels=labels).logits, expected, atol=ATOL, rtol=0)
        # PEFT's model generating greedily from each source.
        answers = [tok.decode(peft_model.generate(input_ids=torch.tensor([e.input_ids]), max_new_tokens=6,
                                                  do_sample=False)[0], skip_special_tokens=True)
                   for e in examples]
    # Exact match is generated: references that are PEFT's answers for up to 3 rows and something
    # else for the others give exactly that share, whatever the model learned.
    rows = [json.loads(line) for line in eval_.read_text().splitlines()]
    same = [i for i, a in enumerate(answers) if a.strip()][:3]
    assert same, answers
    for i, row in enumerate(rows):
        row["completion"] = " ".join(answers[i].split()) if i in same else f"not {answers[i]}"
    eval_.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_json("eval", recipe)
    assert result["exact_match"] == len(same) / 8
    # The loss is over the target tokens, each ending with </s>; the adapter learned (base: about ln V).
    examples = _examples("seq2seq_lm", "completion", eval_, tok, None)
    assert result["eval_tokens"] == sum(len(e.labels) for e in examples)
    assert all(e.labels[-1] == tok.eos_token_id for e in examples)
    # The untrained model's loss is about ln V (its logits are near uniform); trained on answers like
    # the eval set's, far less. The rewritten file's "not ..." rows are nothing it learned: there it
    # is only below the base model's loss on the same file (the tiny T5's random init, so both values,
    # differs between transformers 4 and 5).
    assert evals[-1]["eval_loss"] < 0.75 * math.log(len(tok)), evals
    base_result = run_json("eval", recipe, "--base")
    assert base_result["eval_tokens"] == result["eval_tokens"]
    assert result["eval_loss"] < base_result["eval_loss"] - 0.5, (result["eval_loss"], base_result["eval_loss"])

    out = tmp_path / "merged"
    run_json("export", run_dir, "--format", "merged", "-o", out)
    merged = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs, labels=labels).logits, expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return build_bert(tmp_path_factory.mktemp("bert") / "m")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_and_row_errors(tmp_path, bert_dir):
    train = write_classification(tmp_path / "train.jsonl", 8)
    good_eval = write_classification(tmp_path / "eval.jsonl", 4, seed=1)

    # An eval label the training data never had: exit 2, naming the file and row; nothing written.
    bad_eval = _write(tmp_path / "bad_eval.jsonl", [{"text": "the food was good", "label": "pos"},
                                                     {"text": "the food was bad", "label": "meh"}])
    recipe = _recipe(tmp_path, bert_dir, "seq_cls", "classification", ["query"], train, bad_eval)
    r = run("train", recipe, code=2)
    assert f"{bad_eval} row 2: label 'meh' is not one of the model's labels (neg, pos) (the training data's" in r.stderr
    assert not (tmp_path / "run").exists()
    r = run("eval", recipe, "--base", code=2)
    assert f"{bad_eval} row 2: label 'meh'" in r.stderr

    # model.labels that leave out a training label: the row named.
    r = run("train", recipe, "--set", "model.labels=[pos]", "--set", f"data.eval={good_eval}", code=2)
    assert f"{train} row " in r.stderr and "is not one of model.labels (pos)" in r.stderr

    # Bad rows: a missing label, a label that is not a string or integer, tags of another length.
    bad = _write(tmp_path / "bad.jsonl", [{"text": "the movie"}, {"text": "a", "label": [1]}])
    r = run("train", recipe, "--set", f"data.train={bad}", "--set", f"data.eval={good_eval}", code=2)
    assert f"{bad} row 1: missing field 'label'" in r.stderr
    assert f"{bad} row 2: field 'label' must be a string or an integer" in r.stderr
    tags = _write(tmp_path / "tags.jsonl", [{"tokens": ["alice", "in", "paris"], "tags": ["B-PER", "O"]}])
    recipe = _recipe(tmp_path, bert_dir, "token_cls", "token_classification", ["query"], tags, tags)
    r = run("train", recipe, code=2)
    assert f"{tags} row 1: fields 'tokens' and 'tags' differ in length (3 tokens, 2 tags)" in r.stderr
    # validate reads the rows as the task does: the same rows refused there, before any training.
    r = run("validate", recipe, code=2)
    assert f"{tags} row 1: fields 'tokens' and 'tags' differ in length (3 tokens, 2 tags)" in r.stderr
    r = run("validate", _recipe(tmp_path, bert_dir, "seq_cls", "classification", ["query"], train, bad_eval), code=2)
    assert f"{bad_eval} row 2: label 'meh' is not one of the model's labels" in r.stderr
    assert "reads as model.task seq_cls" in run("validate", _recipe(tmp_path, bert_dir, "seq_cls", "classification",
                                                                    ["query"], train, good_eval)).stdout
    recipe = _recipe(tmp_path, bert_dir, "token_cls", "token_classification", ["query"], tags, tags)

    # data.columns maps other names; a format that does not fit the task and packing are refused.
    renamed = _write(tmp_path / "renamed.jsonl", [{"words": ["alice"], "ner": ["B-PER"]}])
    r = run_json("train", recipe, "--dry-run", "--set", f"data.train={renamed}", "--set", f"data.eval={renamed}",
                 "--set", "data.columns={tokens: words, tags: ner}")
    assert r["train_examples"] == 1
    shown = run("data", recipe, "--show", "1", "--set", f"data.train={renamed}", "--set", f"data.eval={renamed}",
                "--set", "data.columns={tokens: words, tags: ner}")
    assert "1 with loss" in shown.stdout  # one word, one labelled first sub-token
    r = run("validate", recipe, "--set", "data.packing=true", code=2)
    assert "packing is for causal_lm only" in r.stderr
    r = run("train", recipe, "--set", "data.format=chat", code=2)
    assert "does not fit model.task token_cls" in r.stderr


def test_integer_labels_sort_numerically(tmp_path):
    from peftctl.data.tasks import label_names
    from peftctl.recipe import DataSection

    path = _write(tmp_path / "ints.jsonl", [{"text": "a", "label": v} for v in (10, 2, 0, 2)])
    assert label_names("seq_cls", DataSection(train=[str(path)], format="classification")) == ["0", "2", "10"]


def test_task_unset_names_the_task_the_config_implies(tmp_path):
    model_dir = build_t5(tmp_path / "t5")
    train = write_seq2seq(tmp_path / "train.jsonl", 4)
    recipe = _recipe(tmp_path, model_dir, "seq2seq_lm", "completion", ["q"], train, train)
    r = run("train", recipe, "--set", "model.task=null", code=2)
    assert "set model.task: seq2seq_lm, which its config implies" in r.stderr


def test_the_seq2seq_recipe_plans_on_a_local_t5_folder(tmp_path):
    recipe = Path(__file__).parent.parent / "recipes" / "tasks" / "seq2seq.yaml"
    model_dir = build_t5(tmp_path / "t5")
    plan = run_json("train", recipe, "--dry-run", "--set", f"model.name_or_path={model_dir}",
                    "--set", f"output.dir={tmp_path / 'run'}")
    assert plan["model_type"] == "t5" and plan["adapted_modules"] == 2 * (2 + 2) + 2 * (2 + 2 + 2)
    assert plan["train_examples"] > 0 and plan["eval_examples"] > 0


def test_task_unset_notes_the_task_a_classifier_config_implies(tmp_path, caplog):
    from transformers import BertForSequenceClassification

    from peftctl import models
    from peftctl.recipe import ModelSection

    folder = build_bert(tmp_path / "bert")
    BertForSequenceClassification.from_pretrained(folder, num_labels=3).save_pretrained(folder)
    # An encoder-only config is no causal LM: refused, naming the task its config implies.
    with pytest.raises(InputError, match="set model.task: seq_cls, which its config implies"):
        models.load_model(ModelSection(name_or_path=str(folder), dtype="float32"))
    model = models.load_model(ModelSection(name_or_path=str(folder), dtype="float32", task="seq_cls",
                                           labels=["a", "b"]))
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label == {0: "a", 1: "b"}
    assert "implies" not in caplog.text


def test_metrics_match_seqeval_and_scikit_learn_on_random_tags():
    import random

    from seqeval.metrics import f1_score as seqeval_f1
    from seqeval.metrics.sequence_labeling import get_entities
    from sklearn.metrics import f1_score

    from peftctl.metrics import entities, entity_f1, macro_f1

    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "I-MISC", "B-MISC"]
    for _ in range(200):  # every chunking rule: broken I- runs, type changes, E-/S- tags
        refs = [[rng.choice(tags) for _ in range(rng.randint(1, 9))] for _ in range(4)]
        preds = [[t if rng.random() < 0.6 else rng.choice(tags) for t in r] for r in refs]
        assert entities(refs[0]) == get_entities(refs[0])
        assert entity_f1(refs, preds) == pytest.approx(seqeval_f1(refs, preds), abs=1e-12)
        y, p = [rng.randint(0, 3) for _ in range(12)], [rng.randint(0, 4) for _ in range(12)]
        assert macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)


def test_seq2seq_reads_alpaca_and_chat_rows_as_source_and_target(tmp_path):
    from transformers import AutoTokenizer

    from peftctl.data.formats import ALPACA_PROMPT
    from peftctl.data.tasks import build_examples
    from peftctl.recipe import DataSection

    tok = AutoTokenizer.from_pretrained(build_t5(tmp_path / "t5"))

    def one(fmt, row, **cfg):
        path = _write(tmp_path / f"{fmt}.jsonl", [row])
        (e,), _ = build_examples("seq2seq_lm", DataSection(train=[str(path)], format=fmt, **cfg), tok, None, "train")
        return tok.decode(e.input_ids, skip_special_tokens=True), tok.decode(e.labels, skip_special_tokens=True), e

    source, target, e = one("alpaca", {"instruction": "name the city", "input": "bob visited rome", "output": "rome"})
    assert source == ALPACA_PROMPT.format(inp_intro=", paired with an input that provides further context",
                                          instruction="name the city", inp="### Input:\nbob visited rome\n\n")
    assert target == "rome" and e.labels[-1] == tok.eos_token_id and e.reference == "rome"
    chat = {"conversation": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "alice in oslo"},
                             {"role": "assistant", "content": "oslo"}]}
    source, target, _ = one("chat", chat, columns={"messages": "conversation"})
    assert (source, target) == ("be brief\nalice in oslo", "oslo")
    with pytest.raises(Exception, match=r"chat.jsonl row 1: .*ends with the assistant's message"):
        one("chat", {"messages": [{"role": "user", "content": "alice"}]})


def test_seq_cls_on_a_decoder_trains_its_score_head(tmp_path, tiny_model_dir):
    """A Llama-style model (LlamaForSequenceClassification: the head is `score`, the row's last token
    before padding is read, so the config needs a pad token id) as seq_cls; PEFT loads the run."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train = write_classification(tmp_path / "train.jsonl", 16, int_labels=True)
    recipe = _recipe(tmp_path, tiny_model_dir, "seq_cls", "classification", ["q_proj", "v_proj"], train, train,
                     max_steps=4, eval_every=4)
    run_json("train", recipe)
    run_dir = tmp_path / "run"
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    from peftctl.userfiles import safetensors_keys

    assert "base_model.model.score.weight" in safetensors_keys(run_dir / "adapter_model.safetensors")
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["labels"] == ["0", "1"]
    tok = AutoTokenizer.from_pretrained(run_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2,
                                                              pad_token_id=tok.pad_token_id)
    peft_model = PeftModel.from_pretrained(base, run_dir).eval()
    inputs, _ = _batch(_examples("seq_cls", "classification", train, tok, ["0", "1"]), tok.pad_token_id)
    from peftctl import models, runs
    from peftctl.recipe import load

    spec = load(run_dir / "recipe.yaml").model
    ours = runs.attach_saved_adapter(models.load(spec)[0], run_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, peft_model(**inputs).logits, atol=ATOL, rtol=0)


def test_a_new_head_is_said_in_one_line_not_in_transformers_load_report(bert_dir, caplog):
    import logging

    from peftctl import models
    from peftctl.sections import ModelSection

    class Seen(logging.Handler):  # what transformers' logger lets through to its handlers
        def __init__(self):
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    seen, reporter = Seen(), logging.getLogger("transformers.modeling_utils")
    spec = ModelSection(name_or_path=str(bert_dir), task="seq_cls", labels=["a", "b", "c"])
    reporter.addHandler(seen)
    try:
        with caplog.at_level(logging.INFO, logger="peftctl"):
            model = models.load_model(spec)
    finally:
        reporter.removeHandler(seen)
    assert model.classifier.out_features == 3
    # transformers 5 says it in a load report, 4.x in a "newly initialized" warning: neither gets through
    assert not [m for m in seen.messages if "LOAD REPORT" in m or "newly initialized" in m]
    assert "new seq_cls head (classifier.bias, classifier.weight)" in caplog.text
    # A report with anything else in it (here an unexpected key) goes through whole.
    head_only = models._NewHeadReport()
    record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1,
                               "X LOAD REPORT from: m\nKey | Status |\nclassifier.bias | MISSING |\n"
                               "pooler.dense.weight | UNEXPECTED |", None, None)
    assert head_only.filter(record) and head_only.keys == []
    # transformers 4.x's warning of missing keys: kept out when it lists only the head's
    warning_4x = ("Some weights of BertForSequenceClassification were not initialized from the model checkpoint at m "
                  "and are newly initialized: {}\nYou should probably TRAIN this model on a down-stream task.")
    for keys, passes in ([["classifier.weight", "classifier.bias"], False], [["classifier.bias", "pooler.dense.bias"], True]):
        head_only = models._NewHeadReport()
        record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, warning_4x.format(keys),
                                   None, None)
        assert head_only.filter(record) == passes
        assert head_only.keys == ([] if passes else ["classifier.bias", "classifier.weight"])


def test_eval_takes_the_runs_labels_and_a_seeded_base_head(tmp_path, bert_dir):
    train = write_classification(tmp_path / "train.jsonl", 16)
    eval_ = write_classification(tmp_path / "eval.jsonl", 8, seed=1)
    recipe = _recipe(tmp_path, bert_dir, "seq_cls", "classification", ["query"], train, eval_, max_steps=2,
                     eval_every=None)
    run_json("train", recipe)
    run_dir = tmp_path / "run"
    # Labels in another order than the run's: refused naming both (it would score with a wrong mapping).
    r = run("eval", recipe, "--adapter", run_dir, "--set", "model.labels=[pos, neg]", code=2)
    assert "model.labels [pos, neg] differ from the run's [neg, pos]" in r.stderr
    same = run_json("eval", recipe, "--adapter", run_dir, "--set", "model.labels=[neg, pos]")
    assert same == run_json("eval", recipe, "--adapter", run_dir)
    # --base: the new head is seeded by train.seed, so two runs agree exactly; another seed differs.
    first, second = run_json("eval", recipe, "--base"), run_json("eval", recipe, "--base")
    assert first == second
    other = run_json("eval", recipe, "--base", "--set", "train.seed=1")
    assert other["eval_loss"] != first["eval_loss"]


def test_an_empty_train_or_eval_file_is_refused_naming_it(tmp_path, bert_dir):
    train = write_classification(tmp_path / "train.jsonl", 4)
    empty = _write(tmp_path / "empty.jsonl", [])
    recipe = _recipe(tmp_path, bert_dir, "seq_cls", "classification", ["query"], train, empty)
    for command in (("train", recipe), ("eval", recipe, "--base")):
        r = run(*command, code=2)
        assert f"eval data: {empty}: no rows" in r.stderr
    assert not (tmp_path / "run").exists()
    r = run("train", recipe, "--set", f"data.train={empty}", "--set", f"data.eval={train}", code=2)
    assert f"training data: {empty}: no rows, so no labels" in r.stderr


def test_an_encoder_only_model_is_refused_as_a_causal_lm(tmp_path, bert_dir):
    train = write_classification(tmp_path / "train.jsonl", 4)
    recipe = _recipe(tmp_path, bert_dir, "causal_lm", "text", ["query"], train, train)
    for task in ("causal_lm", "null"):
        # validate (config only), the plan (config only) and the real load
        for command in (("validate",), ("train", "--dry-run"), ("train",)):
            r = run(command[0], recipe, *command[1:], "--set", f"model.task={task}", code=2)
            assert f"model {bert_dir}" in r.stderr and "encoder-only model (bert, is_decoder false)" in r.stderr
            assert "set model.task: seq_cls or token_cls" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_word_without_sub_tokens_is_refused_naming_it(tmp_path, bert_dir):
    good = _write(tmp_path / "good.jsonl", [{"tokens": ["alice", "in", "paris"], "tags": ["B-PER", "O", "B-LOC"]}])
    bad = _write(tmp_path / "bad.jsonl", [{"tokens": ["alice", "in", "paris"], "tags": ["B-PER", "O", "B-LOC"]},
                                          {"tokens": ["alice", " ", "paris"], "tags": ["B-PER", "O", "B-LOC"]},
                                          {"tokens": ["alice", "\u200b"], "tags": ["B-PER", "O"]}])
    recipe = _recipe(tmp_path, bert_dir, "token_cls", "token_classification", ["query"], bad, good)
    r = run("train", recipe, code=2)
    assert f"{bad} row 2: word 1 (' ') of field 'tokens' has no sub-token" in r.stderr
    assert f"{bad} row 3: word 1 ('\\u200b') of field 'tokens' has no sub-token" in r.stderr
    assert not (tmp_path / "run").exists()
    # Truncation is not this error: a row cut at max_length trains (its last words untagged).
    long = _write(tmp_path / "long.jsonl", [{"tokens": ["alice", "in", "paris"] * 14,
                                            "tags": ["B-PER", "O", "B-LOC"] * 14}])
    assert run_json("train", recipe, "--dry-run", "--set", f"data.train={long}")["train_examples"] == 1


def test_duplicate_or_empty_labels_are_refused_naming_them(tmp_path, bert_dir):
    train = write_classification(tmp_path / "train.jsonl", 4)
    recipe = _recipe(tmp_path, bert_dir, "seq_cls", "classification", ["query"], train, train)
    r = run("validate", recipe, "--set", "model.labels=[neg, pos, neg]", code=2)
    assert "'neg' given more than once" in r.stderr and str(recipe) in r.stderr
    r = run("validate", recipe, "--set", "model.labels=[neg, '', pos]", code=2)
    assert "label 1 is empty ('')" in r.stderr


def test_integer_tags_index_named_model_labels(tmp_path):
    """datasets' ClassLabel columns (ner_tags: 0, 1, 2, ...) with model.labels naming the ids: the run
    trains exactly as on the named tags (same metrics, entity f1 on the names), and eval's
    predictions give names."""
    import shutil

    model_dir = build_bert(tmp_path / "bert")
    names = ["B-LOC", "B-PER", "I-PER", "O"]
    results = {}
    for kind in ("named", "ids"):
        folder = tmp_path / kind
        folder.mkdir()
        paths = [write_tagging(folder / "train.jsonl", 64), write_tagging(folder / "eval.jsonl", 8, seed=1)]
        if kind == "ids":
            for p in paths:
                rows = [json.loads(line) for line in p.read_text().splitlines()]
                p.write_text("".join(json.dumps({**r, "tags": [names.index(t) for t in r["tags"]]}) + "\n"
                                     for r in rows))
        recipe = _recipe(folder, model_dir, "token_cls", "token_classification", ["query", "value"], *paths,
                         lr=3e-2)
        text = yaml.safe_load(recipe.read_text())
        text["model"]["labels"] = names
        recipe.write_text(yaml.safe_dump(text, sort_keys=False))
        run_json("train", recipe)
        results[kind] = run_json("eval", recipe, "--predictions", str(folder / "pred.jsonl"))
        results[kind + "_pred"] = (folder / "pred.jsonl").read_text()
        shutil.rmtree(folder / "run")
    assert results["ids"]["f1"] == results["named"]["f1"] and results["ids"]["f1"] > 0
    assert results["ids"]["accuracy"] == results["named"]["accuracy"]
    assert "B-PER" in results["ids_pred"]
    # An id out of range is still a row error naming it.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": ["a", "b"], "tags": [0, 7]}) + "\n")
    recipe = _recipe(tmp_path, model_dir, "token_cls", "token_classification", ["query"], bad, bad)
    text = yaml.safe_load(recipe.read_text())
    text["model"]["labels"] = names
    recipe.write_text(yaml.safe_dump(text, sort_keys=False))
    assert "label '7' is not one of model.labels" in run("validate", recipe, code=2).stderr


def test_data_show_gives_each_task_examples_target(tmp_path):
    """`peftctl data --show` / `--json` of task data: the label's name, each word's tag, the target."""
    bert = build_bert(tmp_path / "bert")
    cases = [("seq_cls", "classification", bert, write_classification(tmp_path / "c.jsonl", 4)),
             ("token_cls", "token_classification", bert, write_tagging(tmp_path / "t.jsonl", 4)),
             ("seq2seq_lm", "completion", build_t5(tmp_path / "t5"), write_seq2seq(tmp_path / "s.jsonl", 4))]
    for task, fmt, model, path in cases:
        recipe = _recipe(tmp_path, model, task, fmt, ["q"], path, path)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        shown = run("data", recipe, "--show", "1").stdout
        got = run_json("data", recipe, "--show", "1")["examples"][0]
        if task == "seq_cls":
            assert f"→ label ⟦{rows[0]['label']}⟧" in shown and got["label"] == rows[0]["label"]
        elif task == "token_cls":
            assert [tag for _, tag in got["tags"]] == rows[0]["tags"]  # one tag per word, by name
            assert f"/{rows[0]['tags'][0]}⟧" in shown
        else:
            assert f"→ target ⟦{rows[0]['completion']}⟧" in shown and got["reference"] == rows[0]["completion"]
