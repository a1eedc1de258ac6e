"""`peftctl generate` and `peftctl chat`: a run (or a merged or plain model) answering prompts.

`load(path)` takes a run or adapter folder (the base model its recipe or adapter_config.json names,
with the adapter attached; `base=True` leaves it off; `adapter_name` picks one of several adapters
saved in one folder, PEFT's layout: "default" at the top, each other in a subfolder of its name), a
merged or plain transformers folder, a `.gguf` file or the built-in alias, and returns a `Generator`.

Prompts are rendered as training rendered them: with the tokenizer's chat template (the run saves
the template it trained with beside the adapter, `chat_template.jinja`) as one user message, or, for
a run trained on a plain-text format (`text`, `completion`, `alpaca`, `classification`), as that
format writes a prompt (a completion prompt as it is, an alpaca instruction inside Alpaca's
preamble, a classification text followed by a newline). A message list always goes through the
chat template. Token ids are those training and `peftctl eval` use: a conversation's text is
encoded without added special tokens (the template writes them), a plain prompt with the ones the
tokenizer adds in front of a text (BOS).

Decoding is greedy unless `temperature` > 0 (then sampled, with `top_p` and `seed`); it stops at the
tokenizer's EOS token or any the model's generation config names, or after `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftctl.errors import InputError
from peftctl.ui import Reporter

# The data formats whose prompts are plain text (no chat template), and the field each puts a prompt
# in; the other formats render conversations with the chat template.
PLAIN_PROMPT_FIELD = {"text": "text", "completion": "prompt", "alpaca": "instruction", "classification": "text"}
# A placeholder for the response fields a format requires (the prompt ends before it).
_PLACEHOLDER = {"completion": "completion", "alpaca": "output", "classification": "label"}


@dataclass(frozen=True)
class Sampling:
    """How answers are decoded. `temperature` 0 (the default) is greedy; above 0 it samples, with
    nucleus sampling when `top_p` < 1, seeded by `seed` (each prompt from the same seed, so an
    answer does not depend on the prompts before it). InputError (naming the flag) for a bad value
    or one that would change nothing (`top_p` or `seed` with greedy decoding)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise InputError(f"--temperature must be a number >= 0 (got {self.temperature})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise InputError(f"--seed must be 0 to 2**32 - 1 (got {self.seed})")
        if self.temperature == 0:
            given = [flag for flag, v in (("--top-p", self.top_p), ("--seed", self.seed)) if v is not None]
            if given:
                raise InputError(f"{given[0]} applies to sampling, and decoding is greedy (--temperature 0); "
                                 "give --temperature > 0 to sample")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Answer:
    text: str
    new_tokens: int
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_new_tokens reached)


@dataclass
class Generator:
    """A loaded model and tokenizer that answer prompts (see the module docstring)."""

    model: Any
    tokenizer: Any
    device: Any
    source: str  # what was loaded: the model, and the adapter folder when one is attached
    adapter: str | None  # the adapter folder attached, or None
    data_format: str | None = None  # the run's data.format, when the folder holds its recipe
    columns: dict[str, str] = field(default_factory=dict)  # the run's data.columns
    raw: bool = False  # prompts as they are: no chat template, no format

    def __post_init__(self):
        from peftctl.data.templates import ChatRenderer, use_chat_template
        from peftctl.data.tokenize import Tokenizer
        from peftctl.models import stop_token_ids

        template = use_chat_template(self.tokenizer, None)  # the tokenizer's own (the run's)
        self.chat = ChatRenderer(self.tokenizer, template) if template else None
        self._around = Tokenizer(self.tokenizer).around  # what encoding adds around a text (BOS, EOS)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)

    @property
    def plain_format(self) -> bool:
        """Whether string prompts render as the run's plain-text data format did (no chat template)."""
        return self.data_format in PLAIN_PROMPT_FIELD

    # ---- prompts ------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[dict[str, Any]]) -> list[int]:
        """The token ids to generate from: a string prompt or a list of messages ({role, content},
        the conversation so far), rendered as the module docstring says. ValueError (a message for
        the caller to place) for a prompt that is neither, or messages the template refuses (its
        `TemplateError` is one)."""
        if isinstance(prompt, list):
            if self.raw:
                raise ValueError("a list of messages needs the chat template (drop --raw)")
            return self._conversation_ids(_check_messages(prompt))
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt is a string or a list of messages, got {_kind(prompt)}")
        if self.raw or (self.chat is None and not self.plain_format):
            return self._encode(prompt, specials=True)
        if self.plain_format:
            return self._encode(self._plain_prompt(prompt), specials=True)
        return self._conversation_ids([{"role": "user", "content": prompt}])

    def _conversation_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.chat is None:
            raise ValueError("the tokenizer has no chat template, so a list of messages cannot be rendered; "
                             "give the prompt as a string")
        text = self.chat(messages, add_generation_prompt=True)
        return self._encode(text, specials=False)  # the template wrote the special tokens

    def _plain_prompt(self, prompt: str) -> str:
        """The prompt as the run's plain-text format rendered prompts in training (its Formatter,
        with a placeholder response that the prompt ends before)."""
        from peftctl.data.formats import Formatter

        fmt = self.data_format
        if fmt == "text":
            return prompt  # a continuation
        formatter = Formatter(fmt, self.tokenizer, columns=self.columns, chat=self.chat)
        col = formatter.columns
        row = {col.get(PLAIN_PROMPT_FIELD[fmt], PLAIN_PROMPT_FIELD[fmt]): prompt,
               col.get(_PLACEHOLDER[fmt], _PLACEHOLDER[fmt]): "x"}
        rendered = formatter(row)
        return rendered.text[: rendered.prompt_end]

    def _encode(self, text: str, specials: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if specials:
            if self._around is None:  # unknown: the tokenizer's own encoding with its specials
                return self.tokenizer(text, add_special_tokens=True)["input_ids"]
            ids = [*self._around[0], *ids]  # the ones in front (BOS); never an EOS after the prompt
        return list(ids)

    # ---- decoding -----------------------------------------------------------------------------

    def generate(self, ids: list[int], sampling: Sampling, streamer=None) -> Answer:
        """Decode an answer to `ids` (from `prompt_ids`). `streamer`: a transformers streamer
        (TextStreamer) that prints the answer as it is made."""
        import torch

        if not sampling.greedy and sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # also seeds every CUDA device
        kwargs: dict[str, Any] = {"do_sample": not sampling.greedy}
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p if sampling.top_p is not None else 1.0,
                          top_k=None)
        else:  # the model's generation config may ask for sampling: greedy means greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=sampling.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids, streamer=streamer, **kwargs,
            )
        new = out[0, len(ids):].tolist()
        stopped = bool(new) and new[-1] in self.stop_ids
        text = self.tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
        return Answer(text, len(new), "stop" if stopped else "length")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _check_messages(messages: list) -> list[dict[str, Any]]:
    """Messages as chat templates take them: a non-empty list of {role, content} objects, both strings."""
    if not messages:
        raise ValueError("the list of messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content, got {_kind(m)}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"messages[{i}].{key} must be a string, got {_kind(m.get(key))}")
    return messages


# ---- what a folder holds ------------------------------------------------------------------------


def adapter_names(folder: Path) -> list[str]:
    """The adapters saved in `folder` as PEFT saves several: "default" at the top, each other one in
    a subfolder of its name."""
    from peftctl.adapters.io import has_adapter

    names = ["default"] if has_adapter(folder) else []
    return names + sorted(p.name for p in folder.iterdir() if p.is_dir() and has_adapter(p))


def _choose_adapter(folder: Path, names: list[str], name: str | None) -> str:
    from peftctl.adapters.io import check_adapter_name

    if name is not None:
        try:
            check_adapter_name(name)  # a plain name: never a path
        except ValueError as e:
            raise InputError(f"--adapter: {e}") from None
        if name not in names:
            raise InputError(f"{folder}: no adapter named {name!r} here (adapters: {', '.join(names)})")
        return name
    if "default" in names or len(names) == 1:
        return names[0]
    raise InputError(f"{folder} holds several adapters ({', '.join(names)}); choose one with --adapter NAME")


def load(path: str | Path, *, adapter_name: str | None = None, base: bool = False, raw: bool = False,
         reporter: Reporter | None = None) -> Generator:
    """A `Generator` for a run or adapter folder, a merged or plain model folder, a .gguf file or the
    built-in alias (see the module docstring). `base`: the run's base model without its adapter (the
    run's tokenizer and template all the same, so the two compare on the same prompts). Every file
    is checked before any weights load; problems are InputError naming the folder or file."""
    import torch

    from peftctl import models, runs
    from peftctl.sections import ModelSection

    reporter = reporter or Reporter()
    p = Path(path)
    names = adapter_names(p) if p.is_dir() else []
    if not names:
        if base or adapter_name is not None:
            flag = "--base" if base else "--adapter"
            raise InputError(f"{flag} applies to a run or adapter folder; {p} holds no adapter "
                             "(adapter_config.json and adapter_model.safetensors)")
        if p.is_dir():
            if not (p / "config.json").is_file() and not any(p.glob("*.gguf")):
                raise InputError(f"{p}: neither a run or adapter folder (adapter_config.json) nor a model folder "
                                 "(config.json)")
        elif str(path) not in models.BUILTIN_MODELS and not (p.is_file() and p.suffix == ".gguf"):
            raise InputError(f"{p}: no such folder" if not p.exists() else
                             f"{p}: not a folder (give a run folder, a model folder, a .gguf file or "
                             f"{', '.join(models.BUILTIN_MODELS)})")
        spec, folder, recipe = ModelSection(name_or_path=str(path)), None, None
    else:
        name = _choose_adapter(p, names, adapter_name)
        folder = p if name == "default" else p / name
        run = runs.read_run(folder)
        recipe = run.recipe
        spec = run.model_section
        # The run's own tokenizer (it carries the template trained with; a subfolder adapter shares
        # the folder's), else the base model's.
        own = next((d for d in (folder, p) if (d / "tokenizer_config.json").is_file()), None)
        if own is not None:
            spec = spec.model_copy(update={"tokenizer": str(own)})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = models.resolve(spec.name_or_path, spec.cache_dir)
    models.check_model_files(spec, source)
    tokenizer = models.load_tokenizer(spec, source)
    if recipe is not None:
        # The template training used: the run's saved tokenizer has it, a checkpoint folder has none.
        from peftctl.data.templates import use_chat_template

        use_chat_template(tokenizer, recipe.data.chat_template)
    reporter.log(f"loading {spec.name_or_path}" + (f" with the adapter in {folder}" if folder and not base else ""))
    model = models.load_model(spec, source, device_map={"": device} if device.type == "cuda" else None)
    if folder is not None and not base:
        model = runs.attach_saved_adapter(model, folder)
    model.eval()
    rows = models.embedding_rows(model)
    if rows is not None:
        models.check_token_ids(tokenizer.get_vocab(), rows, f"{spec.tokenizer}: the tokenizer" if spec.tokenizer
                               else models.tokenizer_name(spec))
    data = recipe.data if recipe is not None else None
    return Generator(
        model, tokenizer, device,
        source=spec.name_or_path if folder is None or base else f"{spec.name_or_path} + {folder}",
        adapter=None if folder is None or base else str(folder),
        data_format=data.format if data is not None else None,
        columns=dict(data.columns) if data is not None else {},
        raw=raw,
    )


# ---- prompt files -------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[tuple[int, str | list[dict[str, Any]]]]:
    """(line number, prompt) for each non-empty line of a JSON-lines file: a JSON string (one prompt)
    or a list of messages ({role, content}, the conversation so far). Anything else is
    `BadFileError` naming the file and line."""
    from peftctl.userfiles import BadFileError, read_jsonl

    prompts = []
    for n, value in read_jsonl(path, "a prompts file (JSON lines)", expect=None):
        if isinstance(value, list):
            try:
                _check_messages(value)
            except ValueError as e:
                raise BadFileError(path, f"line {n}: {e}") from None
        elif not isinstance(value, str):
            raise BadFileError(path, f"line {n}: must be a prompt (a JSON string) or a list of messages "
                                     f"({{role, content}} objects), got {_kind(value)}")
        prompts.append((n, value))
    if not prompts:
        raise BadFileError(path, "holds no prompts (one JSON string or list of messages a line)")
    return prompts


def render_all(gen: Generator, prompts: list[tuple[int, Any]], path: str | Path) -> list[list[int]]:
    """Every prompt's token ids, before any is answered: a prompt that cannot be rendered is
    `BadFileError` naming the file and line."""
    from peftctl.userfiles import BadFileError

    out = []
    for n, prompt in prompts:
        try:
            out.append(gen.prompt_ids(prompt))
        except ValueError as e:
            raise BadFileError(path, f"line {n}: {e}") from None
    return out


def answer_file(gen: Generator, prompts: list[tuple[int, Any]], ids: list[list[int]],
                sampling: Sampling, reporter: Reporter | None = None) -> Iterator[dict[str, Any]]:
    """One result per prompt, in order, as each is answered: {"line", "prompt", "output",
    "new_tokens", "finish_reason"}."""
    reporter = reporter or Reporter()
    reporter.start(len(prompts), "generate", unit="prompt(s)")
    try:
        for k, ((n, prompt), prompt_ids) in enumerate(zip(prompts, ids, strict=True)):
            a = gen.generate(prompt_ids, sampling)
            yield {"line": n, "prompt": prompt, "output": a.text, "new_tokens": a.new_tokens,
                   "finish_reason": a.finish_reason}
            reporter.advance(k + 1, {})
    finally:
        reporter.stop()


# ---- chat ---------------------------------------------------------------------------------------


class Chat:
    """A multi-turn conversation: each `say` adds the user's message and the model's answer to the
    history the next answer is generated from; `reset` forgets it."""

    def __init__(self, gen: Generator, sampling: Sampling, system: str | None = None):
        if gen.chat is None:
            raise InputError(f"{gen.source}: the tokenizer has no chat template, so a conversation cannot be "
                             "rendered (use peftctl generate)")
        self.gen, self.sampling, self.system = gen, sampling, system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str, streamer=None) -> Answer:
        messages = [*self.messages, {"role": "user", "content": text}]
        try:
            ids = self.gen.prompt_ids(messages)
        except ValueError as e:
            raise InputError(f"chat: {e}") from None
        answer = self.gen.generate(ids, self.sampling, streamer)
        self.messages = [*messages, {"role": "assistant", "content": answer.text}]
        return answer


def write_jsonl(path: str | Path, rows) -> int:
    """Write `rows` (an iterable of JSON-able dicts) as JSON lines to `path`, atomically: the file
    appears whole when the last row is written, or not at all. Returns the number of rows."""
    import json

    from peftctl.fsio import atomic_file

    n = 0
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
