"""Data: formats and masking (decoded back to text, for several templates), sources, bad rows named by
file and row, truncation, mixing, caching, and packing that leaves the loss unchanged."""

from __future__ import annotations

import json
import time

import pytest
import torch
from tiny import recipe_text
from transformers import AutoTokenizer

from peftctl import data as data_lib
from peftctl.data.templates import NAMED_TEMPLATES, ChatRenderer
from peftctl.errors import InputError
from peftctl.recipe import DataSection

CHAT = {"messages": [
    {"role": "user", "content": "First question"},
    {"role": "assistant", "content": "First answer"},
    {"role": "user", "content": "Second question"},
    {"role": "assistant", "content": "Second answer"},
]}
# Zephyr-style, written out here rather than taken from the code under test: text around every
# message, and a generation prompt that is not the whole assistant header ('\n' follows it).
ZEPHYR_STYLE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token }}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}"
)


@pytest.fixture
def tok(tiny_model_dir):
    # A fresh tokenizer per test: building data puts the recipe's chat template on it.
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled(tok, example) -> str:
    return tok.decode([t for t in example.labels if t != -100])


def build(tok, path, **kw):
    return data_lib.build(DataSection(train=str(path), **kw), tok)


def test_multi_turn_chat_labels_every_assistant_turn(tmp_path, tok):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    (ex,) = build(tok, path).train
    assert labelled(tok, ex) == "First answer<|im_end|>\nSecond answer<|im_end|>\n"
    (last,) = build(tok, path, train_on="last").train
    assert labelled(tok, last) == "Second answer<|im_end|>\n"
    (every,) = build(tok, path, train_on="all").train
    assert all(t != -100 for t in every.labels)
    # eval data keeps the prompt for scoring: it ends where the last answer starts
    (ev,) = data_lib.build(DataSection(train=str(path), eval=str(path)), tok).eval
    assert tok.decode(ev.prompt_ids).endswith("Second question<|im_end|>\n<|im_start|>assistant\n")
    assert ev.reference == "Second answer"
    assert ev.source == f"{path} row 1"


@pytest.mark.parametrize("template, expected", [
    (ZEPHYR_STYLE, "\nFirst answer<|im_end|>\nSecond answer<|im_end|>"),
    ("llama3", "First answer<|eot_id|>Second answer<|eot_id|>"),
    # phi3 ends a conversation with EOS, which the next message's '<|user|>' shares '<|' with
    ("phi3", "First answer<|end|>\nSecond answer<|end|>\n<|im_end|>"),
    ("mistral", "First answer<|im_end|>Second answer<|im_end|>"),
])
def test_masking_with_templates_that_add_text_around_messages(tmp_path, tok, template, expected):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    (ex,) = build(tok, path, chat_template=template).train
    assert labelled(tok, ex) == expected
    assert tok.chat_template == NAMED_TEMPLATES.get(template, template)  # what gets saved with the adapter


def test_fast_renderer_renders_as_apply_chat_template(tok):
    """The renderer compiled once through transformers' private helper, and its public fallback
    (apply_chat_template per row, on transformers versions the helper was not checked with), give
    apply_chat_template's text, and refuse what it refuses."""
    import transformers
    import transformers.utils.chat_template_utils as chat_utils

    from peftctl.data.templates import compile_checked

    assert compile_checked("5.24.0") and not compile_checked("5.23.1") and not compile_checked("6.0.0")
    # transformers 4.x has no such helper: forced, the renderer then falls back to the public way too.
    helper = hasattr(chat_utils, "_cached_compile_jinja_template")
    assert helper or not compile_checked(transformers.__version__)
    messages = [{"role": "system", "content": "S"}, *CHAT["messages"]]
    for template in [tok.chat_template, ZEPHYR_STYLE, *NAMED_TEMPLATES.values()]:
        renders = [ChatRenderer(tok, template, private=True), ChatRenderer(tok, template, private=False)]
        assert (renders[0].template is not None) == helper and renders[1].template is None  # the two ways
        if compile_checked(transformers.__version__):
            assert ChatRenderer(tok, template).template is not None  # the product's way here: the fast one
        msgs = messages[1:] if "raise_exception" in template else messages
        for gen in (False, True):
            try:
                ref = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
            except Exception:  # the template refuses: ours must too
                for render in renders:
                    with pytest.raises(ValueError):
                        render(msgs, gen)
                continue
            assert [render(msgs, gen) for render in renders] == [ref, ref]


def test_template_syntax_error_is_the_same_input_error_both_ways(tok):
    from peftctl.data.templates import use_chat_template
    from peftctl.errors import InputError

    broken = "{% for message in messages %}{{ message['content'] }}\n{% endfor"
    errors = []
    for private in (True, False):
        with pytest.raises(InputError) as e:
            use_chat_template(tok, broken, private=private)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and errors[0].startswith("data.chat_template: Jinja syntax error on line 2")


def test_completion_alpaca_classification_mask_the_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    (ex,) = build(tok, path, format="completion").train
    assert labelled(tok, ex) == " 4<|im_end|>"
    (ex,) = build(tok, path, format="completion", train_on="all").train
    assert labelled(tok, ex) == "Q: 2+2?\nA: 4<|im_end|>"
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 2", "output": "4"}])
    (ex,) = build(tok, path, format="alpaca", max_length=512).train
    assert labelled(tok, ex) == "4<|im_end|>" and "### Input:\n2 and 2" in tok.decode(ex.input_ids)
    path = write_jsonl(tmp_path / "k.jsonl", [{"text": "great fun", "label": "positive"}, {"text": "dull", "label": 0}])
    d = data_lib.build(DataSection(train=str(path), eval=str(path), format="classification"), tok)
    assert [labelled(tok, e) for e in d.train] == ["positive<|im_end|>", "0<|im_end|>"]
    assert [e.reference for e in d.eval] == ["positive", "0"]
    assert tok.decode(d.eval[0].prompt_ids) == "great fun\n"


def test_sharegpt_roles_and_column_mapping(tmp_path, tok):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello!"}]}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    (ex,) = build(tok, path, format="sharegpt", roles={"bot": "assistant"}).train
    assert labelled(tok, ex) == "Hello!<|im_end|>\n"
    assert tok.decode(ex.input_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q?", "answer": " A."}])
    (ex,) = build(tok, path, format="completion", columns={"prompt": "question", "completion": "answer"}).train
    assert labelled(tok, ex) == " A.<|im_end|>"


def test_a_rows_system_prompt_is_rendered_and_its_history_never_dropped(tmp_path, tok):
    # LLaMA-Factory's alpaca and sharegpt rows carry `system` (and alpaca `history`): a system prompt
    # reaches the text, a history is refused (issue 19 §2: nothing the user wrote is ignored).
    sysrow = {"instruction": "Add", "input": "2 and 2", "output": "4", "system": "You add numbers."}
    (ex,) = build(tok, write_jsonl(tmp_path / "a.jsonl", [sysrow]), format="alpaca", max_length=512).train
    text = tok.decode(ex.input_ids)
    assert text.startswith("You add numbers.\n\n### Instruction:\nAdd") and "Below is" not in text
    assert labelled(tok, ex) == "4<|im_end|>"
    hist = {**sysrow, "history": [["Add 1 and 1", "2"]]}
    with pytest.raises(InputError, match="row 1: field 'history': earlier turns are a conversation"):
        build(tok, write_jsonl(tmp_path / "h.jsonl", [hist]), format="alpaca")
    rows = [{"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    (ex,) = build(tok, write_jsonl(tmp_path / "s.jsonl", rows), format="sharegpt").train
    assert tok.decode(ex.input_ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                        "<|im_start|>assistant\nYo<|im_end|>\n")
    both = [{"system": "A", "messages": [{"role": "system", "content": "B"}, *CHAT["messages"]]}]
    with pytest.raises(InputError, match="row 1: field 'system': the row has a system prompt and its first message"):
        build(tok, write_jsonl(tmp_path / "b.jsonl", both))


def test_preference_pairs_tokenize_chosen_and_rejected(tmp_path, tok):
    rows = [
        {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
         "rejected": [{"role": "assistant", "content": "Go away"}]},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    plain, chat = build(tok, path, format="preference").train
    assert labelled(tok, plain) == " Paris<|im_end|>" and labelled(tok, plain.rejected) == " Rome<|im_end|>"
    assert labelled(tok, chat) == "Hello<|im_end|>\n" and labelled(tok, chat.rejected) == "Go away<|im_end|>\n"
    assert tok.decode(chat.rejected.input_ids).startswith("<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.parametrize("rows, kw, message", [
    ([{"text": "ok"}, {"txt": "bad"}], {"format": "text"}, "row 2: missing field 'text'"),
    ([{"prompt": "p", "completion": 5}], {"format": "completion"}, "row 1: field 'completion' must be a string, got int"),
    ([{"q": "p"}], {"format": "completion", "columns": {"prompt": "q", "completion": "a"}},
     "row 1: missing column 'a' (the format's 'completion', mapped in data.columns)"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], {}, "row 1: no assistant message"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], {}, "row 1: messages[0].role: unknown role 'robot'"),
    ([{"messages": [{"role": " ", "content": "hi"}]}], {}, "row 1: messages[0].role is empty"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}], {},
     "row 1: messages[1]: the assistant message is empty"),
    ([{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}],
     {"chat_template": "mistral"}, "row 1: the chat template refused this conversation: Conversation roles must alternate"),
    ([{"instruction": "x", "output": ""}], {"format": "alpaca"}, "row 1: field 'output' is empty"),
    # A field that is there but null is said to be null, not missing (the keys list would show it).
    ([{"prompt": "p", "chosen": None, "rejected": "r"}], {"format": "preference"},
     "row 1: field 'chosen' is null; it needs a value"),
    ([{"text": None}], {"format": "text"}, "row 1: field 'text' is null; it needs a value"),
    ([{"q": "p", "a": None}], {"format": "completion", "columns": {"prompt": "q", "completion": "a"}},
     "row 1: field 'a' (the format's 'completion', mapped in data.columns) is null"),
    ([{"messages": None}], {}, "row 1: field 'messages' is null"),
    ([{"messages": [{"role": "user", "content": None}]}], {}, "row 1: messages[0].content is null"),
    ([{"messages": [{"role": None, "content": "hi"}]}], {}, "row 1: messages[0].role is null"),
])
def test_bad_rows_name_file_and_row(tmp_path, tok, rows, kw, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError) as e:
        build(tok, path, **kw)
    assert str(e.value).startswith(f"{path} {message}")


def test_bad_bytes_bad_json_and_several_bad_rows(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(InputError, match=rf"{path} row 2: invalid JSON"):
        build(tok, path, format="text")
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(InputError, match=rf"{path} row 2: not UTF-8"):
        build(tok, path, format="text")
    csv = tmp_path / "bad.csv"
    csv.write_bytes(b"text\nfine\nbad \xe9 byte\n")
    with pytest.raises(InputError, match=rf"{csv} row 3: not UTF-8"):
        build(tok, csv, format="text")
    path = write_jsonl(tmp_path / "many.jsonl", [{"text": "ok"}, {"text": 1}, {"text": "ok"}, {"nope": 2}])
    with pytest.raises(InputError) as e:
        build(tok, path, format="text")
    assert str(e.value).splitlines()[:2] == [f"{path} row 2: field 'text' must be a string, got int",
                                             f"{path} row 4: missing field 'text' (the row's keys: 'nope'); name other columns in "
                                             "data.columns (format: text)"]


def test_sources_files_folders_globs_and_saved_datasets(tmp_path, tok):
    import datasets

    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d"}]
    folder = tmp_path / "mixed"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "d.parquet"))
    (folder / "d.csv").write_text("prompt,completion\na, b\nc, d\n")
    (folder / "d.json").write_text(json.dumps(rows))
    write_jsonl(folder / "d.jsonl", rows)
    for name in ("d.parquet", "d.csv", "d.json", "d.jsonl"):
        d = build(tok, folder / name, format="completion")
        assert [labelled(tok, e) for e in d.train] == [" b<|im_end|>", " d<|im_end|>"], name
    assert len(build(tok, folder, format="completion").train) == 8
    assert len(build(tok, folder / "d.*s*", format="completion").train) == 6  # d.csv, d.json, d.jsonl
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    d = build(tok, tmp_path / "saved", format="completion")
    assert len(d.train) == 2 and d.train[1].source.endswith("split train) row 2")
    (tmp_path / "t.txt").write_text("one line\n\nsecond line\nsame paragraph\n")
    assert len(build(tok, tmp_path / "t.txt", format="text").train) == 3
    assert len(build(tok, tmp_path / "t.txt", format="text", text_sample_by="paragraph").train) == 2
    with pytest.raises(InputError, match="matches no files"):
        build(tok, tmp_path / "*.nothing", format="text")
    with pytest.raises(InputError, match="not found"):
        build(tok, tmp_path / "nope.jsonl", format="text")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(InputError, match="unknown type"):
        build(tok, tmp_path / "x.xml", format="text")


def test_hub_dataset_offline_fails_fast_and_clearly(tok):
    start = time.perf_counter()
    with pytest.raises(InputError, match="is not a local file, folder or glob, and not in the datasets cache") as e:
        build(tok, "someorg/some-dataset")
    assert time.perf_counter() - start < 10
    assert "HF_HUB_OFFLINE=1" in str(e.value)


class _ProxyStandIn:
    """A local HTTP proxy stand-in: records each request line; answers CONNECT (HTTPS through the
    proxy) with 403 and any other request (plain HTTP through the proxy) with 200."""

    def __init__(self):
        import socketserver
        import threading

        seen = self.seen = []

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                seen.append(self.rfile.readline().decode().strip())
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                status = "403 Forbidden" if seen[-1].startswith("CONNECT") else "200 OK"
                self.wfile.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_hub_check_goes_through_huggingface_hubs_session_and_its_proxy(tmp_path, tiny_model_dir):
    """The hub is asked through huggingface_hub's HTTP client, so its proxy settings and offline mode
    apply: hub.invalid (a name that never resolves) answers through a proxy, a proxy that refuses is
    reported, and HF_HUB_OFFLINE=1 asks nothing. Each in a fresh process: huggingface_hub reads its
    endpoint and proxies when it starts."""
    import ast
    import os
    import subprocess
    import sys

    proxy = _ProxyStandIn()
    base = {k: v for k, v in os.environ.items() if k.lower() not in (
        "http_proxy", "https_proxy", "all_proxy", "no_proxy", "hf_hub_offline", "hf_datasets_offline")}
    check = "from peftctl.data.sources import _hub_unreachable; print(repr(_hub_unreachable()))"

    def unreachable(**env):
        start = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", check], env={**base, "HTTP_PROXY": proxy.url,
                           "HTTPS_PROXY": proxy.url, **env}, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr[-2000:]
        assert time.perf_counter() - start < 20
        return ast.literal_eval(p.stdout.strip())

    try:
        assert unreachable(HF_ENDPOINT="http://hub.invalid") is None  # only the proxy could answer
        assert proxy.seen == ["HEAD http://hub.invalid/ HTTP/1.1"]
        why = unreachable(HF_ENDPOINT="https://hub.invalid")
        # huggingface_hub 1.x (httpx) says HTTP/1.1, 0.x (requests, under transformers 4) HTTP/1.0
        assert proxy.seen[-1].startswith("CONNECT hub.invalid:443 HTTP/1.") and "403" in why, why
        asked = len(proxy.seen)
        assert "offline" in unreachable(HF_ENDPOINT="http://hub.invalid", HF_HUB_OFFLINE="1").lower()
        assert len(proxy.seen) == asked

        # the whole path: a hub dataset behind a proxy that refuses is exit 2 naming the reason
        recipe = tmp_path / "r.yaml"
        recipe.write_text(recipe_text(tiny_model_dir, "someorg/some-dataset", None, str(tmp_path / "out")))
        start = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "peftctl", "data", str(recipe)], capture_output=True, text=True,
                           env={**base, "HTTPS_PROXY": proxy.url, "HF_ENDPOINT": "https://hub.invalid"}, timeout=120)
        assert p.returncode == 2 and time.perf_counter() - start < 60, p.stderr[-2000:]
        assert "'someorg/some-dataset' is not a local file, folder or glob, and the hub cannot be reached (" in p.stderr
        assert "403" in p.stderr and "HF_HUB_OFFLINE=1" in p.stderr and "Traceback" not in p.stderr
    finally:
        proxy.server.shutdown()


def test_sources_mix_by_weight_after_the_eval_split(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b {i}"} for i in range(10)])
    cfg = DataSection(train=[{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}], format="text",
                      eval_split=0.2)
    d = data_lib.build(cfg, tok, seed=1)
    texts = [tok.decode(e.input_ids) for e in d.train]
    held_out = {tok.decode(e.input_ids) for e in d.eval}
    assert len(held_out) == 4 and not held_out & set(texts)  # repeats never leak into eval
    n_a = sum(t.startswith("a") for t in texts)
    n_b = sum(t.startswith("b") for t in texts)
    kept_a = 10 - sum(t.startswith("a") for t in held_out)
    kept_b = 10 - sum(t.startswith("b") for t in held_out)
    assert n_a == 2 * kept_a and n_b == round(0.5 * kept_b)
    assert d.stats["train"].examples == len(d.train) == n_a + n_b


def test_too_long_examples_are_truncated_or_dropped_and_counted(tmp_path, tok):
    rows = [{"text": "The quick brown fox jumps over the lazy dog. " * 5}, {"text": "short"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    d = build(tok, path, format="text", max_length=10)
    assert [len(e.input_ids) for e in d.train][0] == 10 and d.train[0].truncated
    assert (d.stats["train"].truncated, d.stats["train"].dropped_too_long) == (1, 0)
    d = build(tok, path, format="text", max_length=10, truncation="drop")
    assert len(d.train) == 1 and (d.stats["train"].truncated, d.stats["train"].dropped_too_long) == (0, 1)


def test_cache_is_hit_and_rebuilt_on_any_change(tmp_path, tok, tiny_model_dir):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    cfg = dict(train=str(path), cache_dir=str(tmp_path / "cache"))

    def from_cache(**kw) -> bool:
        return data_lib.build(DataSection(**{**cfg, **kw}), AutoTokenizer.from_pretrained(tiny_model_dir)) \
            .stats["train"].from_cache == 1

    assert not from_cache() and from_cache()
    for change in ({"max_length": 100}, {"train_on": "last"}, {"chat_template": "llama3"},
                   {"roles": {"bot": "assistant"}}, {"truncation": "drop"}):
        assert not from_cache(**change) and from_cache(**change), change
    write_jsonl(path, [CHAT, CHAT])  # new content, same file name
    assert not from_cache()
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert data_lib.build(DataSection(**cfg), other).stats["train"].from_cache == 0
    # a build that fails leaves nothing behind that a later run could take for finished
    before = set((tmp_path / "cache").iterdir())
    write_jsonl(path, [CHAT, {"messages": []}])
    with pytest.raises(InputError):
        data_lib.build(DataSection(**cfg), tok)
    assert set((tmp_path / "cache").iterdir()) == before


def test_packed_batches_keep_examples_apart(tmp_path, tok):
    rows = [{"text": "one two"}, {"text": "three four five six"}, {"text": "seven"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    plain = build(tok, path, format="text")
    lengths = [len(e.input_ids) for e in plain.train]
    d = data_lib.build(DataSection(train=str(path), format="text", packing=True, max_length=sum(lengths)), tok)
    (seq,) = d.train
    assert sorted(seq.input_ids) == sorted(t for e in plain.train for t in e.input_ids)
    batch = data_lib.collate([seq, d.train[0]], pad_id=tok.pad_token_id)
    starts = [i for i, p in enumerate(seq.position_ids) if p == 0]
    assert len(starts) == 3 and all(seq.labels[i] == -100 for i in starts)
    mask = batch["attention_mask"][0, 0]
    for a, b in zip(starts, [*starts[1:], len(seq.input_ids)], strict=True):
        assert mask[a:b, a:b].equal(torch.ones(b - a, b - a, dtype=torch.bool).tril())  # causal inside
        assert not mask[b:, a:b].any()  # nothing later sees this example
    assert data_lib.count_input_tokens(batch) == 2 * sum(lengths)
    # a shorter row in the batch is padded with one-token blocks, not counted as input
    short = data_lib.collate([seq, data_lib.Packed(seq.input_ids[:2], seq.labels[:2], seq.position_ids[:2], "bool")],
                             pad_id=tok.pad_token_id)
    assert data_lib.count_input_tokens(short) == sum(lengths) + 2
    assert short["attention_mask"][1, 0].diagonal().all()  # no empty mask row: no NaN in attention
    varlen = data_lib.collate([data_lib.Packed(s.input_ids, s.labels, s.position_ids, "varlen") for s in (seq, seq)],
                              pad_id=tok.pad_token_id)
    assert "attention_mask" not in varlen and varlen["input_ids"].shape == (1, 2 * sum(lengths))
    assert data_lib.count_input_tokens(varlen) == 2 * sum(lengths)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_leaves_the_eval_loss_unchanged(chat_data, tok, tiny_model_dir, attention):
    from transformers import AutoModelForCausalLM

    from peftctl.loss import eval_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    cfg = dict(train=str(chat_data[1]), max_length=256)
    plain = data_lib.build(DataSection(**cfg), tok).train
    packed = data_lib.build(DataSection(**cfg, packing=True), tok, attention=attention).train
    assert len(packed) < len(plain) / 2
    loss, n = eval_loss(model, plain, 4, tok.pad_token_id, "cpu")
    loss_p, n_p = eval_loss(model, packed, 2, tok.pad_token_id, "cpu")
    assert n == n_p
    assert loss_p / n_p == pytest.approx(loss / n, rel=1e-4)


def test_varlen_layout_gives_the_same_loss(chat_data, tok, tiny_model_dir):
    """The flash-attention layout (one flat row, boundaries in the position ids only). Flash attention
    needs a GPU; on CPU, SDPA without a cache reads the same boundaries from the position ids."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from peftctl.loss import eval_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    cfg = dict(train=str(chat_data[1]), max_length=256)
    plain = data_lib.build(DataSection(**cfg), tok).train
    packed = data_lib.build(DataSection(**cfg, packing=True), tok, attention="flash_attention_2").train
    loss, n = eval_loss(model, plain, 4, tok.pad_token_id, "cpu")
    batch = data_lib.collate(list(packed), tok.pad_token_id)
    assert set(batch) == {"input_ids", "position_ids", "labels"} and batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss_v = F.cross_entropy(logits[0, :-1], targets[0], ignore_index=-100, reduction="sum")
    assert int((targets != -100).sum()) == n
    assert float(loss_v) / n == pytest.approx(loss / n, rel=1e-4)


def test_packing_refuses_an_attention_without_a_boundary_path(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}])
    with pytest.raises(InputError, match="not supported with packing"):
        data_lib.build(DataSection(train=str(path), format="text", packing=True), tok, attention="flex_attention")


def run_cli(*args, code=0):
    from typer.testing import CliRunner

    from peftctl.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result


def test_data_and_prepare_commands(make_recipe, tmp_path, tiny_model_dir):
    recipe = make_recipe(data={"cache_dir": str(tmp_path / "cache")})
    first = json.loads(run_cli("prepare", recipe, "--json").stdout)
    assert [t["split"] for t in first["tables"]] == ["train", "eval"]
    assert first["stats"]["train"]["from_cache"] == 0 and first["stats"]["train"]["examples"] == 48
    again = json.loads(run_cli("prepare", recipe, "--json").stdout)
    assert again["stats"]["train"]["from_cache"] == 1 and again["stats"]["eval"]["from_cache"] == 1

    shown = run_cli("data", recipe, "--show", "2").stdout
    assert shown.count("── #") == 2 and "row 2 ·" in shown
    first = shown.split("── #1")[1]
    assert first.split("⟦")[1].split("⟧")[0].endswith("<|im_end|>\n")  # the answer, marked
    listed = json.loads(run_cli("data", recipe, "--json", "--show", "3", "--split", "eval").stdout)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert listed["split"] == "eval" and len(listed["examples"]) == 3
    for ex in listed["examples"]:
        assert tok.decode(ex["input_ids"]) == ex["text"] and len(ex["labels"]) == len(ex["input_ids"])
        assert tok.decode([t for t in ex["labels"] if t != -100]).endswith("<|im_end|>\n")
    assert len(json.loads(run_cli("data", recipe, "--json").stdout)["examples"]) == 48  # all of them
    stats = json.loads(run_cli("data", recipe, "--stats", "--json", "--set", "data.max_length=40",
                               "--set", "data.truncation=drop").stdout)["stats"]
    s = stats["train"]
    assert s["dropped_too_long"] > 0 and s["examples"] + s["dropped_too_long"] == s["rows"] == 48
    assert sum(b["count"] for b in s["histogram"]) == s["examples"] and s["length"]["max"] <= 40
    text = run_cli("data", recipe, "--stats").stdout
    assert "tokens per example" in text and "dropped too long 0" in text
    bad = run_cli("data", recipe, "--set", f"data.train={tmp_path / 'missing.jsonl'}", code=2)
    assert "missing.jsonl not found" in bad.stderr and "Traceback" not in bad.stderr


def test_train_with_packing_saves_the_recipe_template(make_recipe, tmp_path):
    recipe = make_recipe(data={"packing": True, "chat_template": "zephyr", "max_length": 256},
                         train={"max_steps": None, "epochs": 1, "batch_size": 4})
    summary = json.loads(run_cli("train", recipe, "--json").stdout)
    run_dir = tmp_path / "run"
    assert (run_dir / "chat_template.jinja").read_text() == NAMED_TEMPLATES["zephyr"]
    assert AutoTokenizer.from_pretrained(run_dir).chat_template == NAMED_TEMPLATES["zephyr"]
    train = summary["data"]["train"]
    assert train["examples"] == 48 and 0 < train["packed_sequences"] < 48 / 2
    # one epoch sees every example once, and padding in the packed batches is not counted
    assert summary["tokens_seen"] == train["tokens"]
    assert summary["steps"] == -(-train["packed_sequences"] // 4) and summary["final_eval"]["eval_loss"] > 0


# A turn ends with a special token and, only at the end of a conversation, a newline: rendered up
# to an assistant turn, the text leaves the whole conversation right after that turn's <|im_end|>.
END_ONLY_NEWLINE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% else %}{{ '\n' }}{% endif %}"
)


def test_a_loss_span_holding_no_token_adds_nothing_to_the_loss():
    """Labels follow the tokens whose characters lie in a loss span; a span of characters that no
    token holds (spaces a whitespace-splitting tokenizer drops) marks no token, and does not fail."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from peftctl.data.tokenize import _ids_and_mask

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    enc = tok.encode("a   b")
    assert enc.ids == [0, 1] and enc.char_to_token(2) is None
    ids, mask = _ids_and_mask(enc, [(1, 4)])
    assert ids.tolist() == [0, 1] and mask.tolist() == [0, 0]
    assert _ids_and_mask(enc, [(1, 4), (4, 5)])[1].tolist() == [0, 1]


def test_a_turn_ending_exactly_at_a_special_token_keeps_it_in_the_loss(tmp_path, tok):
    """A span boundary right after a special token is outside it: the token stays whole in the loss
    (only a boundary strictly inside a special token's text moves to its start)."""
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    (ex,) = build(tok, path, chat_template=END_ONLY_NEWLINE).train
    assert labelled(tok, ex) == "First answer<|im_end|>Second answer<|im_end|>\n"


def test_a_tokenizer_without_a_fast_backend_is_refused_by_name(tmp_path):
    """Labels are placed by character offsets, which only the Rust (tokenizers) backend gives: a
    Python-only tokenizer (here Canine's, built without files) is an input error naming its class,
    raised before anything is tokenized (its cache fingerprint is taken from its saved files)."""
    from transformers import CanineTokenizer

    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "one two"}])
    with pytest.raises(InputError, match="tokenizer CanineTokenizer has no fast \\(tokenizers\\) backend"):
        data_lib.build(DataSection(train=str(path), format="text", cache_dir=str(tmp_path / "cache")),
                       CanineTokenizer())


def test_stats_percentiles_and_histogram_describe_the_token_lengths(make_recipe, tmp_path):
    """`data --stats`: min, mean, median, p95 and max of the examples' token lengths (numpy's
    percentile, linear interpolation, as the reference), and a histogram of contiguous integer
    ranges from the shortest to the longest whose counts are the examples in each range."""
    import numpy as np

    # lengths about 10 tokens apart, so that neighbouring percentiles differ
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(["x"] * (5 * k))} for k in range(1, 41)])
    recipe = make_recipe(data={"train": str(text), "format": "text", "eval": None, "max_length": 512})
    lengths = np.array([len(e["input_ids"]) for e in json.loads(run_cli("data", recipe, "--json").stdout)["examples"]])
    assert len(set(lengths.tolist())) == 40
    s = json.loads(run_cli("data", recipe, "--stats", "--json").stdout)["stats"]["train"]
    assert s["length"] == {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
                           "median": int(np.median(lengths)), "p95": int(np.percentile(lengths, 95)),
                           "max": int(lengths.max())}
    assert [b["examples"] for b in s["by_source"]] == [40]
    bins = s["histogram"]
    assert len(bins) == 10 and bins[0]["from"] == lengths.min() and bins[-1]["to"] == lengths.max()
    assert all(a["to"] + 1 == b["from"] for a, b in zip(bins, bins[1:], strict=False))
    assert [b["count"] for b in bins] == [int(((lengths >= b["from"]) & (lengths <= b["to"])).sum()) for b in bins]


def test_eval_split_holds_out_at_least_one_example(tmp_path, tok, chat_data):
    data = data_lib.build(DataSection(train=str(chat_data[0]), eval_split=0.001), tok)
    assert len(data.eval) == 1 and len(data.train) == 47


def test_rows_of_a_json_list_are_numbered_from_one(tmp_path, tok):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"text": "ok"}, {"txt": "bad"}]))
    with pytest.raises(InputError, match=rf"{path} row 2: missing field 'text'"):
        build(tok, path, format="text")


def test_packing_fill_is_the_share_of_packed_positions_holding_tokens(tok, chat_data):
    plain = data_lib.build(DataSection(train=str(chat_data[0]), max_length=128), tok)
    packed = data_lib.build(DataSection(train=str(chat_data[0]), max_length=128, packing=True), tok)
    tokens = sum(len(e.input_ids) for e in plain.train)
    assert len(packed.train) < len(plain.train) / 2  # examples of about 40 tokens, up to 3 in 128
    assert packed.stats["train"].packing_fill == round(tokens / (len(packed.train) * 128), 4)


def test_a_response_cut_off_entirely_by_truncation_drops_the_row_as_without_loss(tmp_path, tok):
    rows = [{"prompt": "word " * 40, "completion": "answer"}, {"prompt": "short", "completion": "answer"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    d = build(tok, path, format="completion", max_length=16)
    assert len(d.train) == 1 and tok.decode(d.train[0].input_ids).startswith("short")
    assert (d.stats["train"].dropped_no_loss, d.stats["train"].truncated) == (1, 0)


# ---- every part of a row reaches the chat template, or the row is refused (issue 19 §2) ---------

# A template that renders tool calls; and one in Qwen3's manner, which renders an assistant turn's
# reasoning_content only after the last user message (earlier turns' reasoning is dropped).
TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.tool_calls or [] %}<call>{{ c.name }}"
    "({{ c.arguments | tojson }})</call>{% endfor %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REASONING_TEMPLATE = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and "
    "loop.index0 > ns.last and m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
USER = {"role": "user", "content": "hi"}
CALL = [{"name": "add", "arguments": {"a": 1}}]


@pytest.mark.parametrize("messages, template, refused", [
    # keys the template ignores: the row would be trained on a rendering without them
    ([USER, {"role": "assistant", "content": "", "tool_calls": CALL}], None, "messages[1].tool_calls: the chat template ignores"),
    ([USER, {"role": "assistant", "content": "yo", "name": "bot"}], None, "messages[1].name: the chat template ignores"),
    ([USER, {"role": "assistant", "content": "a", "reasoning_content": "r1"}, USER,
      {"role": "assistant", "content": "b", "reasoning_content": "r2"}], REASONING_TEMPLATE,
     "messages[1].reasoning_content: the chat template ignores"),
    # a whole message the template leaves out (zephyr renders no tool turns)
    ([USER, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "yo"}], "zephyr",
     "messages[1]: the chat template leaves out this tool message's content"),
    # rendered: passes, and what the key carries is in the training text
    ([USER, {"role": "assistant", "content": "", "tool_calls": CALL}], TOOL_TEMPLATE, '<call>add({"a": 1})</call>'),
    ([USER, {"role": "assistant", "content": "a"}, USER, {"role": "assistant", "content": "b", "reasoning_content": "r2"}],
     REASONING_TEMPLATE, "<think>r2</think>b"),
    # a tool result written as a JSON string (Llama 3.1's template pipes tool content through tojson)
    ([USER, {"role": "tool", "content": '{"t": "20 °C"}'}, {"role": "assistant", "content": "yo"}],
     "{% for m in messages %}{{ m.role }}: {% if m.role == 'tool' %}{{ m.content | tojson }}{% else %}"
     "{{ m.content }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
     'tool: "{\\"t\\": \\"20 °C\\"}"'),
    # null and empty values carry nothing (datasets fills missing keys with null)
    ([{**USER, "name": None, "tool_calls": []}, {"role": "assistant", "content": "yo"}], None, "assistant\nyo"),
])
def test_every_message_key_reaches_the_template_or_the_row_is_refused(tmp_path, tok, messages, template, refused):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    if "ignores" in refused or "leaves out" in refused:
        with pytest.raises(InputError) as e:
            build(tok, path, chat_template=template)
        assert str(e.value).startswith(f"{path} row 1: {refused}")
    else:
        (ex,) = build(tok, path, chat_template=template).train
        assert refused in tok.decode(ex.input_ids)


def test_a_rows_tools_reach_the_template_or_the_row_is_refused(tmp_path, tok):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    row = {"messages": [USER, {"role": "assistant", "content": "yo"}], "functions": tools}
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    with pytest.raises(InputError, match=r"row 1: field 'functions': the chat template ignores the tool definitions"):
        build(tok, path, columns={"tools": "functions"})
    listing = ("{% for t in tools or [] %}<tool>{{ t.function.name }}</tool>\n{% endfor %}"
               "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (ex,) = build(tok, path, columns={"tools": "functions"}, chat_template=listing).train
    assert tok.decode(ex.input_ids).startswith("<tool>add</tool>\n<|im_start|>user")
    assert labelled(tok, ex) == "yo<|im_end|>\n"


def test_a_message_key_shadowed_by_a_column_mapping_is_refused(tmp_path, tok):
    rows = [{"conversations": [{"from": "human", "value": "Hi", "role": "system"}, {"from": "gpt", "value": "Yo"}]}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(InputError, match=r"row 1: conversations\[0\]\.role: not used: the message's role is read from 'from'"):
        build(tok, path, format="sharegpt")


# ---- the prompt scoring generates from is the training sequence's own beginning (issue 19 §4) ----

def _prefix(ex) -> bool:
    return ex.prompt_ids == ex.input_ids[: len(ex.prompt_ids)]


def test_generation_prompt_is_a_token_prefix_of_the_training_sequence(tmp_path, tok, make_recipe):
    # The tiny byte-level BPE tokenizes "answer 19" whole as "er", "Ġ19", while the prompt
    # "question 1 answer " alone ends "er", "Ġ": training must see the prompt's own tokens.
    row = {"prompt": "question 1 answer ", "completion": "19"}
    ids = tok("question 1 answer 19", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[-2:] == ["er", "Ġ19"]  # the premise of the test
    prompt_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    response_ids = tok("19<|im_end|>", add_special_tokens=False)["input_ids"]
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    d = data_lib.build(DataSection(train=str(path), eval=str(path), format="completion"), tok)
    (ex,) = d.eval
    assert ex.input_ids == prompt_ids + response_ids and ex.prompt_ids == prompt_ids
    assert tok.convert_ids_to_tokens(ex.input_ids)[len(prompt_ids) - 2 : len(prompt_ids) + 1] == ["er", "Ġ", "1"]
    assert labelled(tok, ex) == "19<|im_end|>" and ex.reference == "19"
    assert d.stats["train"].split_at_response == 1 and d.stats["eval"].merged_at_response == 0
    (train,) = d.train
    assert train.input_ids == ex.input_ids  # training and eval data are tokenized alike

    # Every format whose eval data keeps a prompt: the prompt is a prefix of the training sequence.
    cases = [
        ("preference", {"prompt": "question 1 answer ", "chosen": "19", "rejected": "20"}, {}),
        ("alpaca", {"instruction": "Convert", "input": "May 1, 1999", "output": "1999-05-01"}, {"max_length": 256}),
        ("classification", {"text": "question 1", "label": 1}, {}),
        ("chat", {"messages": [USER, {"role": "assistant", "content": "19"}]}, {}),
        # a template whose generation prompt ends in a space: "assistant: " + "19" merges as above
        ("chat", {"messages": [USER, {"role": "assistant", "content": "19"}]},
         {"chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}"}),
    ]
    for fmt, r, kw in cases:
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", [r])
        (ex,) = data_lib.build(DataSection(train=str(path), eval=str(path), format=fmt, **kw), tok).eval
        assert _prefix(ex) and len(ex.prompt_ids) < len(ex.input_ids), (fmt, kw)
        assert ex.input_ids[len(ex.prompt_ids)] == ex.labels[len(ex.prompt_ids)], (fmt, kw)  # loss starts there
        assert tok.decode(ex.input_ids).startswith(tok.decode(ex.prompt_ids) + ex.reference), (fmt, kw)
        if fmt == "preference" or "chat_template" in kw:  # the boundary moved when tokenized whole
            assert tok.convert_ids_to_tokens(ex.input_ids)[len(ex.prompt_ids) - 1 :][:2] == ["Ġ", "1"], (fmt, kw)

    # End to end: `peftctl data --split eval --json` shows what `peftctl eval` generates from.
    recipe = make_recipe(data={"train": str(tmp_path / "c.jsonl"), "eval": str(tmp_path / "c.jsonl"),
                               "format": "completion"})
    (shown,) = json.loads(run_cli("data", recipe, "--json", "--split", "eval").stdout)["examples"]
    assert shown["prompt_ids"] == prompt_ids and shown["input_ids"] == prompt_ids + response_ids
    assert shown["reference"] == "19"


def test_a_tokenizer_that_cannot_split_keeps_its_tokens_and_the_prompt_stops_before_the_merge(tmp_path):
    # SentencePiece style (Metaspace): a piece tokenized alone gets a space in front ("19" -> "▁19"),
    # so pieces would not spell the text; the whole text's tokens stay, the prompt ends before "▁19"
    # and the reference starts with the prompt's space (scoring compares answers without spaces).
    from tiny import corpus
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(corpus() + ["question 1 answer 19"] * 5,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "question 1 answer ", "completion": "19"}])
    d = data_lib.build(DataSection(train=str(path), eval=str(path), format="completion"), sp)
    (ex,) = d.eval
    assert sp.convert_ids_to_tokens(ex.input_ids) == ["▁question", "▁1", "▁answer", "▁19", "</s>"]
    assert sp.convert_ids_to_tokens(ex.prompt_ids) == ["▁question", "▁1", "▁answer"]
    assert ex.reference == " 19" and d.stats["eval"].merged_at_response == 1
