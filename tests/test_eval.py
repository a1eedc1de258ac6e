"""`peftctl eval`'s exact match against a model whose greedy answer is known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from clirun import run_json

ANSWER = "fox jump"
AFTER_EOS = "z"  # what the model would go on to write if generation did not stop at EOS


def build_scripted_model(folder: Path, answer: str, after_eos: str) -> Path:
    """The tiny Llama turned into a bigram model whose greedy output to any chat prompt is
    `answer`, EOS, then `after_eos` repeated.

    Every layer's output projections are zero, so the residual stream is the current token's
    embedding; the head then picks the next token from it. Dimension 0 of every embedding is 1
    (the default: the answer's first token wins); a token of the chain a1 -> a2 -> ... -> EOS ->
    z -> z also sets its own dimension, where the head's row of its successor scores 3 against
    the default's 1 (the final RMSNorm scales a row, never reorders it).
    """
    from tiny import build_tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_llama(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.encode(answer, add_special_tokens=False)
    z = tok.encode(after_eos, add_special_tokens=False)
    assert tok.decode(ids) == answer and len(z) == 1
    chain = [*ids, tok.eos_token_id, z[0], z[0]]
    assert len(set(chain[:-1])) == len(chain) - 1, "a bigram model needs distinct tokens"
    prompt_end = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)[-1]
    assert prompt_end not in chain, "the generation prompt's last token must not be in the chain"

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        head.zero_()
        emb[:, 0] = 1.0
        head[ids[0], 0] = 1.0
        for dim, (src, dst) in enumerate(zip(chain[:-1], chain[1:], strict=True), start=1):
            emb[src, dim] = 1.0
            head[dst, dim] = 3.0
    model.save_pretrained(folder)
    return folder


def test_exact_match_scores_known_right_and_wrong_answers(make_recipe, tmp_path):
    """The model answers every question with "fox jump" and then stops (EOS). Exact match compares
    whole answers after collapsing runs of whitespace: case, inner spaces and extra or missing words
    count. The prediction must end at EOS (else it would read "fox jumpzzz...")."""
    model = build_scripted_model(tmp_path / "scripted", ANSWER, AFTER_EOS)
    references = [
        ("fox jump", True),
        ("  fox \n jump\t", True),  # leading, trailing and repeated whitespace are ignored
        ("fox", False),  # a prefix of the prediction
        ("fox jump high", False),  # the prediction is a prefix of it
        ("Fox jump", False),  # case counts
        ("foxjump", False),  # a missing space counts
        ("fox jumpz", False),
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": ref}]}) + "\n"
                            for i, (ref, _) in enumerate(references)))
    recipe = make_recipe(model={"name_or_path": str(model)}, data={"eval": str(data)},
                         eval={"max_new_tokens": 12, "batch_size": 3})  # room to go past EOS
    res = run_json("eval", recipe, "--base")
    expected = [right for _, right in references]
    assert res["exact_match_n"] == len(references)
    assert res["exact_match"] == sum(expected) / len(expected)
    samples = res["samples"]  # the first five, in data order
    assert [s["reference"] for s in samples] == [ref for ref, _ in references[:5]]
    assert [s["prediction"] for s in samples] == [ANSWER] * 5
    assert [s["correct"] for s in samples] == expected[:5]
