"""Data: formats, label masking decoded back to text, truncation, bad rows named by file and row."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from peftctl import data as data_lib
from peftctl.errors import InputError
from peftctl.recipe import DataSection


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled_text(tok, example) -> str:
    return tok.decode([t for t in example.labels if t != -100])


def section(path, **kw):
    return DataSection(train=str(path), **kw)


def test_multi_turn_chat_labels_every_assistant_turn(tmp_path, tok):
    rows = [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "Second answer"},
    ]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    (ex,) = data_lib.build(section(path, format="chat", max_length=256), tok).train
    assert labelled_text(tok, ex) == "First answer<|im_end|>\nSecond answer<|im_end|>\n"
    (last,) = data_lib.build(section(path, format="chat", max_length=256, train_on="last"), tok).train
    assert labelled_text(tok, last) == "Second answer<|im_end|>\n"
    (every,) = data_lib.build(section(path, format="chat", max_length=256, train_on="all"), tok).train
    assert all(t != -100 for t in every.labels)
    # the prompt for scoring ends where the last answer starts
    assert tok.decode(ex.prompt_ids).endswith("Second question<|im_end|>\n<|im_start|>assistant\n")
    assert ex.reference == "Second answer"


def test_completion_and_alpaca_mask_the_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    (ex,) = data_lib.build(section(path, format="completion", max_length=64), tok).train
    assert labelled_text(tok, ex) == " 4<|im_end|>"
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 2", "output": "4"}])
    (ex,) = data_lib.build(section(path, format="alpaca", max_length=512), tok).train
    assert labelled_text(tok, ex) == "4<|im_end|>"
    assert "### Input:\n2 and 2" in tok.decode(ex.input_ids)


def test_text_format_trains_on_everything(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox"}])
    (ex,) = data_lib.build(section(path, format="text", max_length=64), tok).train
    assert labelled_text(tok, ex) == "The quick brown fox<|im_end|>"


def test_truncation_to_max_length(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 5}])
    d = data_lib.build(section(path, format="text", max_length=10), tok)
    assert len(d.train[0].input_ids) == 10 and d.stats["train"].truncated == 1


def test_eval_split_is_deterministic_and_disjoint(tmp_path, tok):
    rows = [{"text": f"row {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    d1 = data_lib.build(section(path, format="text", max_length=16, eval_split=0.25), tok, seed=3)
    d2 = data_lib.build(section(path, format="text", max_length=16, eval_split=0.25), tok, seed=3)
    assert len(d1.eval) == 5 and len(d1.train) == 15
    assert [e.input_ids for e in d1.eval] == [e.input_ids for e in d2.eval]
    assert not {tuple(e.input_ids) for e in d1.eval} & {tuple(e.input_ids) for e in d1.train}


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"text": "ok"}, {"txt": "bad"}], "text", "row 2: missing field 'text'"),
    ([{"prompt": "p", "completion": 5}], "completion", "row 1: field 'completion' must be a string, got int"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "chat", "row 1: messages has no assistant turn"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], "chat", "row 1: messages[0].role must be one of"),
    ([{"instruction": "x", "output": ""}], "alpaca", "row 1: field 'output' is empty"),
])
def test_bad_rows_name_file_and_row(tmp_path, tok, rows, fmt, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError) as e:
        data_lib.build(section(path, format=fmt, max_length=64), tok)
    assert str(e.value).startswith(f"{path} {message}")


def test_invalid_json_line_and_non_utf8_are_named(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(InputError, match=rf"{path}:2: invalid JSON"):
        data_lib.build(section(path, format="text"), tok)
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(InputError, match=rf"{path}:2: not UTF-8"):
        data_lib.build(section(path, format="text"), tok)


def test_csv_and_parquet_sources(tmp_path, tok):
    import datasets

    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text("prompt,completion\na, b\nc, d\n")
    for name in ("d.parquet", "d.csv"):
        d = data_lib.build(section(tmp_path / name, format="completion", max_length=16), tok)
        assert len(d.train) == 2


def test_missing_file_and_unknown_type(tmp_path, tok):
    with pytest.raises(InputError, match="not found"):
        data_lib.build(section(tmp_path / "nope.jsonl", format="text"), tok)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="unknown type"):
        data_lib.build(section(tmp_path / "x.txt", format="text"), tok)
