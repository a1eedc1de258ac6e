"""Row formats: each turns a row into text plus the character spans that carry loss.

Masking works on characters, not tokens: a format returns the rendered text and the spans of the
responses; tokenization then labels exactly the tokens that overlap those spans. This holds for any
chat template, including ones that add text around each message, because each assistant span is
found by rendering the conversation with and without that turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{inp_intro}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{inp}### Response:\n"
)


class RowError(ValueError):
    """A row that does not fit its format; the message says what is wrong."""


@dataclass
class Rendered:
    text: str
    # (start, end) character spans that carry loss when training on responses.
    response_spans: list[tuple[int, int]] = field(default_factory=list)
    # The span of the last response, for `train_on: last`.
    last_span: tuple[int, int] | None = None
    # For scoring by generation: the prompt text and the reference answer.
    prompt: str | None = None
    reference: str | None = None
    add_special_tokens: bool = True


def _str_field(row: dict[str, Any], name: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise RowError(f"missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def render_text(row: dict[str, Any], tokenizer) -> Rendered:
    text = _str_field(row, "text")
    if not text:
        raise RowError("field 'text' is empty")
    full = text + (tokenizer.eos_token or "")
    return Rendered(full, [(0, len(full))], (0, len(full)))


def render_completion(row: dict[str, Any], tokenizer) -> Rendered:
    prompt = _str_field(row, "prompt")
    completion = _str_field(row, "completion")
    if not completion:
        raise RowError("field 'completion' is empty")
    eos = tokenizer.eos_token or ""
    span = (len(prompt), len(prompt) + len(completion) + len(eos))
    return Rendered(prompt + completion + eos, [span], span, prompt=prompt, reference=completion)


def render_alpaca(row: dict[str, Any], tokenizer) -> Rendered:
    instruction = _str_field(row, "instruction")
    inp = _str_field(row, "input", required=False)
    output = _str_field(row, "output")
    if not instruction:
        raise RowError("field 'instruction' is empty")
    if not output:
        raise RowError("field 'output' is empty")
    prompt = ALPACA_PROMPT.format(
        inp_intro=", paired with an input that provides further context" if inp else "",
        instruction=instruction,
        inp=f"### Input:\n{inp}\n\n" if inp else "",
    )
    eos = tokenizer.eos_token or ""
    span = (len(prompt), len(prompt) + len(output) + len(eos))
    return Rendered(prompt + output + eos, [span], span, prompt=prompt, reference=output)


ROLES = ("system", "user", "assistant", "tool")


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    messages = row.get("messages")
    if messages is None:
        raise RowError("missing field 'messages'")
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RowError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("messages has no assistant turn: nothing to learn from")
    return out


def render_chat(row: dict[str, Any], tokenizer) -> Rendered:
    if not getattr(tokenizer, "chat_template", None):
        raise RowError("format 'chat' needs a tokenizer with a chat template, and this one has none")
    messages = _messages(row)

    def render(msgs, gen_prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], gen_prompt=True) if i else ""
        upto = render(messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(before):
            raise RowError(
                "the chat template renders a conversation differently from its prefixes, so the "
                "assistant turns cannot be located"
            )
        spans.append((len(before), len(upto)))
    last = spans[-1]
    prompt = reference = None
    if messages[-1]["role"] == "assistant":
        prompt = render(messages[:-1], gen_prompt=True)
        reference = messages[-1]["content"]
    return Rendered(text, spans, last, prompt=prompt, reference=reference, add_special_tokens=False)


FORMATS = {
    "text": render_text,
    "completion": render_completion,
    "alpaca": render_alpaca,
    "chat": render_chat,
}
