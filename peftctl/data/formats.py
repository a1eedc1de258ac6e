"""Row formats: each turns a row into text plus the character spans that carry loss.

Masking works on characters, not tokens: a format returns the rendered text and the spans of the
responses; tokenization then labels exactly the tokens that overlap those spans. This holds for any
chat template, including ones that add text around each message: each assistant span starts where
the conversation rendered up to that turn's generation prompt stops matching the full rendering,
and ends where the conversation rendered up to and including that turn stops matching it.

A format also says where each response starts (`Rendered.boundaries`): tokenization keeps every
token on one side of it, so the tokens before a response are the prompt's own. A conversation is
rendered with every key of every message (and the row's tools); a row whose rendering leaves out
part of it (a message's content, or a key without which the template renders the same text) is
refused, naming the message and key.

Pure Python (no torch, no numpy): the recipe schema imports FORMAT_FIELDS from here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

# The fields each format reads; `data.columns` maps any of them onto another column name.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "chat": ("messages", "role", "content", "tools", "system"),
    "sharegpt": ("messages", "role", "content", "tools", "system"),
    "preference": ("prompt", "chosen", "rejected", "tools", "role", "content"),
    "classification": ("text", "label", "text_pair"),
    # model.task token_cls only (peftctl.data.tasks): a word list and one tag per word, CoNLL style.
    "token_classification": ("tokens", "tags"),
}
# The formats each model.task other than causal_lm reads (peftctl.data.tasks); causal_lm reads all
# but token_classification.
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "seq2seq_lm": ("completion", "alpaca", "chat", "sharegpt"),
    "seq_cls": ("classification",),
    "token_cls": ("token_classification",),
}
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value"},
}
# Role names in the data mapped onto the roles chat templates know; `data.roles` adds to these.
DEFAULT_ROLES: dict[str, dict[str, str]] = {
    "sharegpt": {"human": "user", "gpt": "assistant", "observation": "tool", "function_call": "assistant"},
}
ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{inp_intro}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{inp}### Response:\n"
)


class RowError(ValueError):
    """A row that does not fit its format; the message says what is wrong."""


class MissingField(RowError):
    """A row without a field its format reads (the message gets the row's keys added)."""


def _holds_messages(value: Any, role: str, content: str) -> bool:
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)
            and role in value[0] and content in value[0])


def guess_format(row: dict[str, Any], fmt: str) -> str | None:
    """What a row that lacks a field of format `fmt` looks like instead, as a hint ("rows have
    "conversations" with "from"/"value": did you mean format: sharegpt?"), or None."""
    keys = set(row)
    for col, role, content, other in (("conversations", "from", "value", "sharegpt"),
                                      ("messages", "role", "content", "chat")):
        if other != fmt and _holds_messages(row.get(col), role, content):
            return f'rows have "{col}" with "{role}"/"{content}": did you mean format: {other}?'
    if _holds_messages(row.get("conversations"), "role", "content"):
        return ('rows have "conversations" with "role"/"content": did you mean format: chat with data.columns '
                '{messages: conversations}?')
    for other, fields in (("preference", ("prompt", "chosen", "rejected")), ("alpaca", ("instruction", "output")),
                          ("completion", ("prompt", "completion")), ("classification", ("text", "label")),
                          ("text", ("text",))):
        if set(fields) <= keys:
            return None if other == fmt else (
                f"rows have {'/'.join(repr(f) for f in fields)}: did you mean format: {other}?")
    return None


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # (start, end) character spans that carry loss
    # Where each response starts (character offsets): tokens never straddle these, so the tokens
    # before a response are the prompt's own tokens, as when a model generates from the prompt.
    boundaries: list[int] = field(default_factory=list)
    prompt_end: int | None = None  # for scoring by generation: text[:prompt_end] is the prompt ...
    reference: str | None = None  # ... and this the reference answer
    add_special_tokens: bool = True  # False when a chat template already wrote them
    rejected: Rendered | None = None  # preference data: the rejected response, rendered alike
    # Chat: the template's generation prompt is not how it renders the assistant turn in the
    # conversation; the prompt kept for scoring is the conversation's rendering (training's).
    prompt_differs: bool = False


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search on C-speed comparisons)."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


class Formatter:
    """Renders the rows of one source: its format, column names, role map and `train_on`."""

    def __init__(self, fmt: str, tokenizer, *, columns: dict[str, str] | None = None,
                 roles: dict[str, str] | None = None, train_on: str = "assistant", chat=None,
                 template_prompts: bool = False):
        self.fmt = fmt
        # completion and alpaca rows as a user turn and an assistant turn of the chat template (when
        # the recipe names a template), instead of plain text
        self.template_prompts = template_prompts and chat is not None
        self.columns = {**DEFAULT_COLUMNS.get(fmt, {}), **(columns or {})}
        self.roles = {**DEFAULT_ROLES.get(fmt, {}), **(roles or {})}
        self.train_on = train_on
        self.eos = tokenizer.eos_token or ""
        self.chat = chat  # a templates.ChatRenderer, or None when the tokenizer has no template
        # Special (added) tokens, longest first, to keep loss spans from cutting through one.
        self.special_texts = sorted(getattr(tokenizer, "added_tokens_encoder", {}) or {}, key=len, reverse=True)
        self.specials = re.compile("|".join(map(re.escape, self.special_texts))) if self.special_texts else None
        self._render = getattr(self, f"_{fmt}")

    def __call__(self, row: dict[str, Any]) -> Rendered:
        if not isinstance(row, dict):
            raise RowError(f"a row must be an object with named fields, got {type(row).__name__}")
        try:
            return self._render(row)
        except MissingField as e:
            keys = ", ".join(map(repr, row)) or "none"
            guess = guess_format(row, self.fmt)
            raise MissingField(f"{e} (the row's keys: {keys})" + (f"; {guess}" if guess else "")
                               + "; name other columns in data.columns") from None

    # ---- fields ----------------------------------------------------------------------------

    def _col(self, field: str) -> str:
        return self.columns.get(field, field)

    def _missing(self, field: str) -> RowError:
        col = self._col(field)
        if col != field:
            return MissingField(f"missing column {col!r} (the format's {field!r}, mapped in data.columns)")
        return MissingField(f"missing field {field!r}")

    def _str(self, row: dict[str, Any], field: str, required: bool = True, nonempty: bool = False) -> str:
        col = self._col(field)
        value = row.get(col)
        if value is None:
            if required:
                raise self._missing(field)
            return ""
        if not isinstance(value, str):
            raise RowError(f"field {col!r} must be a string, got {type(value).__name__}")
        if nonempty and not value.strip():
            raise RowError(f"field {col!r} is empty")
        return value

    # ---- plain-text formats ----------------------------------------------------------------

    def _response(self, prompt: str, response: str) -> Rendered:
        text = prompt + response + self.eos
        span = (0, len(text)) if self.train_on == "all" else (len(prompt), len(text))
        return Rendered(text, [span], boundaries=[len(prompt)], prompt_end=len(prompt), reference=response)

    def _text(self, row):
        text = self._str(row, "text", nonempty=True) + self.eos
        return Rendered(text, [(0, len(text))])

    def _completion(self, row):
        prompt, completion = self._str(row, "prompt"), self._str(row, "completion", nonempty=True)
        if self.template_prompts:
            return self._as_turns(None, prompt, completion, ["", self._col("prompt"), self._col("completion")])
        return self._response(prompt, completion)

    def _as_turns(self, system: str | None, user: str, assistant: str, wheres: list[str]) -> Rendered:
        """A prompt and its response rendered as a conversation with the chat template: an optional
        system turn, a user turn, an assistant turn (the response, which carries the loss); `wheres`
        names the row's fields each came from (system, user, assistant)."""
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return self._conversation(messages, wheres[-len(messages):])

    def _alpaca(self, row):
        instruction = self._str(row, "instruction", nonempty=True)
        inp = self._str(row, "input", required=False)
        output = self._str(row, "output", nonempty=True)
        # LLaMA-Factory's alpaca rows may carry a system prompt and earlier turns: the system prompt
        # takes the place of Alpaca's preamble; earlier turns are a conversation (never dropped).
        system = self._str(row, "system", required=False)
        history = row.get(self._col("history"))
        if history not in (None, [], ""):
            raise RowError(f"field {self._col('history')!r}: earlier turns are a conversation, which the alpaca "
                           "format does not render; write the row as messages (format: chat)")
        if self.template_prompts:  # the instruction, then the input, as the user's message
            user = instruction + (f"\n\n{inp}" if inp else "")
            where = f"{self._col('instruction')}+{self._col('input')}" if inp else self._col("instruction")
            return self._as_turns(system if system.strip() else None, user, output,
                                  [self._col("system"), where, self._col("output")])
        prompt = ALPACA_PROMPT.format(
            inp_intro=", paired with an input that provides further context" if inp else "",
            instruction=instruction,
            inp=f"### Input:\n{inp}\n\n" if inp else "",
        )
        if system.strip():
            prompt = system + prompt[prompt.index("\n\n### Instruction:"):]
        return self._response(prompt, output)

    def _classification(self, row):
        text = self._str(row, "text", nonempty=True)
        col = self._col("label")
        label = row.get(col)
        if label is None:
            raise self._missing("label")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise RowError(f"field {col!r} must be a string or an integer, got {type(label).__name__}")
        if not str(label).strip():
            raise RowError(f"field {col!r} is empty")
        # The text, a newline, then the label as the response: exact match on it is accuracy.
        return self._response(text + "\n", str(label))

    # ---- conversations ---------------------------------------------------------------------

    def _messages(self, value: Any, field: str = "messages") -> tuple[list[dict[str, Any]], list[str]]:
        """The messages as the chat template gets them (role mapped, content as text, every other key
        as it is), and where each came from ("messages[3]") for error messages."""
        col = self._col(field)
        if not isinstance(value, list) or not value:
            raise RowError(f"field {col!r} must be a non-empty list of messages")
        role_key, content_key = self._col("role"), self._col("content")
        out, wheres = [], []
        for i, m in enumerate(value):
            where = f"{col}[{i}]"
            if not isinstance(m, dict):
                raise RowError(f"{where} must be an object with {role_key!r} and {content_key!r}")
            role = m.get(role_key)
            if role is None:
                raise RowError(f"{where} has no {role_key!r}")
            if not isinstance(role, str) or not role.strip():
                raise RowError(f"{where}.{role_key} is empty" if isinstance(role, str) else
                               f"{where}.{role_key} must be a string, got {type(role).__name__}")
            mapped = self.roles.get(role, role)
            if mapped not in ROLES:
                raise RowError(
                    f"{where}.{role_key}: unknown role {role!r}; known: {', '.join(ROLES)} "
                    "(map other names with data.roles, e.g. {human: user, gpt: assistant})"
                )
            content = self._content(m.get(content_key), f"{where}.{content_key}")
            if mapped == "assistant" and not content.strip() and not m.get("tool_calls"):
                raise RowError(f"{where}: the assistant message is empty")
            for own, mapped_from in (("role", role_key), ("content", content_key)):
                if own != mapped_from and own in m:
                    raise RowError(f"{where}.{own}: not used: the message's {own} is read from {mapped_from!r} "
                                   "(data.columns); remove one of the two")
            # Every other key reaches the template as it is (None is a key's absence: datasets
            # fills keys missing from a row with null); _unrendered refuses what the template ignores.
            msg = {"role": mapped, "content": content}
            msg.update((k, v) for k, v in m.items() if k not in (role_key, content_key) and v is not None)
            if "weight" in msg:  # axolotl's and LLaMA-Factory's per-message loss switch: 0 or 1
                w = msg["weight"]
                if isinstance(w, bool) or w not in (0, 1):
                    raise RowError(f"{where}.weight must be 0 (no loss on this turn) or 1, got {w!r}")
                if w == 1 and mapped != "assistant":
                    raise RowError(f"{where}.weight: 1 on a {mapped} message: only assistant turns carry loss "
                                   "(data.train_on: all trains every token)")
                msg["weight"] = int(w)
            out.append(msg)
            wheres.append(where)
        return out, wheres

    @staticmethod
    def _content(value: Any, where: str) -> str:
        if isinstance(value, str):
            return value
        if value is None:
            raise RowError(f"{where} is missing")
        if isinstance(value, list):  # OpenAI-style content parts: text only
            texts = []
            for part in value:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise RowError(f"{where}: only text content parts ({{type: text, text: ...}}) are supported")
                texts.append(part["text"])
            return "".join(texts)
        raise RowError(f"{where} must be a string, got {type(value).__name__}")

    def _tools(self, row: dict[str, Any]) -> list | None:
        """The row's tool definitions (for templates that render them, as apply_chat_template's tools)."""
        col = self._col("tools")
        tools = row.get(col)
        if tools is not None and not isinstance(tools, list):
            raise RowError(f"field {col!r} must be a list of tool definitions, got {type(tools).__name__}")
        return tools or None

    def _conversation(self, messages: list[dict[str, Any]], wheres: list[str], first_trained: int = 0,
                      tools: list | None = None) -> Rendered:
        """Render a conversation (with the row's tools); loss on its assistant turns from index
        `first_trained` on."""
        if self.chat is None:
            raise RowError("this format needs a chat template, and the tokenizer has none: set data.chat_template")
        # A message's `weight` (0 or 1) is no text: the template never sees it.
        weights = [m.get("weight") for m in messages]
        messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        if self.train_on == "all" and 0 in weights:
            raise RowError(f"{wheres[weights.index(0)]}.weight: 0, and data.train_on: all trains every token; "
                           "use train_on: assistant (or last) for per-message weights")
        trained = [i for i, m in enumerate(messages)
                   if m["role"] == "assistant" and i >= first_trained and weights[i] != 0]
        if not trained:
            raise RowError("no assistant message with weight 1: nothing to learn from" if 0 in weights
                           else "no assistant message: nothing to learn from")

        def render(msgs: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
            return self.chat(msgs, add_generation_prompt, tools=tools)

        text = render(messages)
        self._unrendered(messages, wheres, text, render)
        if tools and self.chat(messages) == text:
            raise RowError(f"field {self._col('tools')!r}: the chat template ignores the tool definitions (it "
                           "renders the same text without them), so the row would be trained as if it had "
                           "none; remove them, or use a template that renders them (data.chat_template)")
        last = len(messages) - 1
        every = self.train_on == "all"
        spans, boundaries, prompt_end, differs = [], [], None, False
        for i in trained[-1:] if self.train_on == "last" else trained:
            before = self._prompt_for(messages, i, render)
            upto = text if i == last else render(messages[: i + 1])
            start, end = _common_prefix(before, text), _common_prefix(upto, text)
            if end < len(upto):
                # The template ends a conversation with text (often EOS) that the next message's
                # opening happens to share a few characters with: never end inside a special token.
                end = min(self._outside_special(text, end), self._outside_special(upto, end))
            if start < len(before):
                start = self._outside_special(text, start)
            content = messages[i]["content"].strip()
            if end <= start or (content and content not in text[start:end]):
                if every:  # no loss span to get wrong; the turn just has no boundary
                    continue
                raise RowError(
                    f"cannot locate assistant message {i} in the chat template's output: the template "
                    "renders a conversation differently from its beginning (set data.chat_template to a "
                    "template that does not)"
                )
            spans.append((start, end))
            boundaries.append(start)
            if i == last:
                # Scoring generates from the conversation as training rendered it up to this turn,
                # so the prompt's tokens are the training sequence's own.
                prompt_end, differs = start, start < len(before)
        if every:
            spans = [(0, len(text))]
        reference = messages[last]["content"] if prompt_end is not None else None
        return Rendered(text, spans, boundaries=boundaries, prompt_end=prompt_end, reference=reference,
                        add_special_tokens=False, prompt_differs=differs)

    def _unrendered(self, messages: list[dict[str, Any]], wheres: list[str], text: str, render) -> None:
        """Refuse a conversation whose rendering dropped part of it: a message's content that is not in
        the text, or a key of a message (beyond role and content) without which the template renders
        the very same text. An empty value ("", [], {}) carries nothing and is not checked."""
        for i, m in enumerate(messages):
            content = m["content"].strip()
            # As written, or as a JSON string (Llama 3.1's template writes tool results with tojson).
            if content and content not in text and json.dumps(content, ensure_ascii=False)[1:-1] not in text:
                raise RowError(
                    f"{wheres[i]}: the chat template leaves out this {m['role']} message's content, so the "
                    "row would be trained without it; use a template that renders it (data.chat_template)"
                )
            for key, value in m.items():
                if key in ("role", "content") or (isinstance(value, str | list | dict) and not value):
                    continue
                without = [*messages[:i], {k: v for k, v in m.items() if k != key}, *messages[i + 1 :]]
                try:
                    ignored = render(without) == text
                except RowError:  # the template cannot do without the key: it reads it
                    ignored = False
                if ignored:
                    hint = ("; a message's name reaches only templates that write it (such as an inline "
                            "Jinja template using message.name)" if key == "name" else "")
                    raise RowError(
                        f"{wheres[i]}.{key}: the chat template ignores this key (it renders the same text "
                        f"without it), so the row would be trained as if it were not there; remove the key, "
                        f"or use a template that renders it (data.chat_template){hint}"
                    )

    def _outside_special(self, text: str, pos: int) -> int:
        """`pos`, or the start of the special token whose text contains it."""
        if self.specials is None:
            return pos
        window = max(len(t) for t in self.special_texts)
        lo = max(0, pos - window)
        for m in self.specials.finditer(text, lo, pos + window):
            if m.start() < pos < m.end():
                return m.start()
        return pos

    def _prompt_for(self, messages: list[dict[str, Any]], i: int, render) -> str:
        """The text before message i's content: the conversation so far and the generation prompt."""
        try:
            return render(messages[:i], add_generation_prompt=True)
        except RowError:
            if i:
                raise
            return ""  # a template that cannot render an empty conversation

    def _chat(self, row):
        value = row.get(self._col("messages"))
        if value is None:
            raise self._missing("messages")
        messages, wheres = self._messages(value)
        # A row-level system prompt (LLaMA-Factory's and axolotl's `system` column) opens the conversation.
        system = self._str(row, "system", required=False)
        if system.strip():
            if messages[0]["role"] == "system":
                raise RowError(f"field {self._col('system')!r}: the row has a system prompt and its first message "
                               "is a system message too; keep one of the two")
            messages, wheres = [{"role": "system", "content": system}, *messages], [self._col("system"), *wheres]
        return self._conversation(messages, wheres, tools=self._tools(row))

    _sharegpt = _chat

    # ---- preference pairs ------------------------------------------------------------------

    def _preference(self, row):
        values = {f: row.get(self._col(f)) for f in ("prompt", "chosen", "rejected")}
        for f, v in values.items():
            if v is None:
                raise self._missing(f)
        # Conversational pairs (TRL's layout): prompt messages, then the chosen or rejected turns; a
        # single message (LLaMA-Factory's and axolotl's chosen / rejected) is a list of one. Plain
        # strings too when the recipe names a chat template (as completion and alpaca rows).
        if self.template_prompts or any(isinstance(v, list | dict) for v in values.values()):
            def turns(field: str, role: str) -> tuple[list[dict[str, Any]], list[str]]:
                v = values[field]
                if isinstance(v, str):
                    messages, _ = self._messages([{self._col("role"): role, self._col("content"): v}], field)
                    return messages, [self._col(field)]
                return self._messages([v] if isinstance(v, dict) else v, field)

            prompt, where = turns("prompt", "user")
            pairs = [turns(f, "assistant") for f in ("chosen", "rejected")]
            tools = self._tools(row)
            chosen, rejected = (self._conversation(prompt + m, where + w, first_trained=len(prompt), tools=tools)
                                for m, w in pairs)
            chosen.rejected = rejected
            return chosen
        if self._tools(row):
            raise RowError(f"field {self._col('tools')!r}: tool definitions go with conversations (prompt, chosen "
                           "and rejected as message lists), not plain text")
        prompt = self._str(row, "prompt")
        chosen = self._response(prompt, self._str(row, "chosen", nonempty=True))
        chosen.rejected = self._response(prompt, self._str(row, "rejected", nonempty=True))
        return chosen
