"""Chat templates: the tokenizer's own by default, or a named or inline Jinja template from the recipe.

`use_chat_template` puts the recipe's template on the tokenizer, so that the tokenizer saved with an
adapter renders prompts exactly as training did. `ChatRenderer` renders conversations with the
template compiled once (transformers' own sandboxed Jinja environment), which is much cheaper per
row than `apply_chat_template` and gives the same text.

Compiling once needs transformers' private `_cached_compile_jinja_template`: `compile_template` is
the one place that calls it, on the transformers versions it was checked with (`COMPILE_CHECKED`);
on others, and where the helper is gone, it returns None and every rendering goes through the
public `apply_chat_template` (the same text, slower). tests/test_data.py renders each template
both ways and compares them with `apply_chat_template` on the installed version.
"""

from __future__ import annotations

import re

from peftctl.data.formats import RowError
from peftctl.errors import InputError

# Well-known templates, written out as their model families ship them, for tokenizers that have none
# (base models) or for training a model into another family's format.
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
        "+ '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] "
        "+ eos_token }}{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + "
        "eos_token }}{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + "
        "eos_token }}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
        "{% endfor %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
        "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles "
        "are supported!') }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
        "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
        "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + "
        "message['content'] + '<|end|>\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + "
        "message['content'] + '<|end|>\n' }}{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' "
        "+ message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}


def is_inline(template: str) -> bool:
    return "{{" in template or "{%" in template


def resolve_template(name_or_jinja: str | None) -> str | None:
    """The Jinja text for a recipe's `data.chat_template` (None: keep the tokenizer's)."""
    if name_or_jinja is None:
        return None
    if is_inline(name_or_jinja):
        return name_or_jinja
    if name_or_jinja not in NAMED_TEMPLATES:
        raise InputError(
            f"data.chat_template: unknown template name {name_or_jinja!r}; use one of "
            f"{', '.join(NAMED_TEMPLATES)} or an inline Jinja template"
        )
    return NAMED_TEMPLATES[name_or_jinja]


def use_chat_template(tokenizer, name_or_jinja: str | None, private: bool | None = None) -> str | None:
    """Give the tokenizer the recipe's chat template (if any); return the template in effect.

    The tokenizer then carries it into `save_pretrained` (chat_template.jinja), so inference renders
    prompts the way training did. A template with a Jinja syntax error is an InputError, raised here.
    `private`: as in `compile_template`.
    """
    template = resolve_template(name_or_jinja)
    if template is not None:
        if compile_template(template, private) is None:  # the public way to the same syntax check
            import jinja2

            try:
                tokenizer.apply_chat_template([{"role": "user", "content": ""}], chat_template=template,
                                              tokenize=False)
            except jinja2.TemplateSyntaxError as e:
                raise _syntax_error(e) from None
            except Exception:  # the template refused this conversation: it compiled
                pass
        tokenizer.chat_template = template
    current = getattr(tokenizer, "chat_template", None)
    if isinstance(current, dict):  # several named templates: the default one renders conversations
        current = current.get("default")
    return current if isinstance(current, str) else None


# transformers versions [from, to) on which `compile_template` uses transformers' private compile
# helper: checked with 5.24 (tests/test_data.py compares both ways on the installed version).
COMPILE_CHECKED = ((5, 24), (6, 0))


def compile_checked(version: str) -> bool:
    """Whether transformers `version` (e.g. "5.24.0") is one the private compile helper is used on."""
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    low, high = COMPILE_CHECKED
    return low <= parts < high


def _syntax_error(e) -> InputError:
    return InputError(f"data.chat_template: Jinja syntax error on line {e.lineno}: {e.message}")


def compile_template(template: str, private: bool | None = None):
    """A fresh compiled template in transformers' sandboxed Jinja environment, through its private
    `_cached_compile_jinja_template` (the one call of it); None for the public fallback (render with
    `apply_chat_template`). `private`: None decides by the installed transformers version
    (`compile_checked`), True and False force either way. Raises InputError for a Jinja syntax
    error (on the public way, `use_chat_template` checks the syntax)."""
    import jinja2
    import transformers

    if private is False or (private is None and not compile_checked(transformers.__version__)):
        return None
    try:
        from transformers.utils.chat_template_utils import _cached_compile_jinja_template
    except ImportError:
        return None
    try:
        return _cached_compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise _syntax_error(e) from None


class TemplateError(RowError):
    """The template refused a conversation (its own raise_exception, or a rendering error)."""


class ChatRenderer:
    """Renders conversations with one compiled template and the tokenizer's special tokens."""

    def __init__(self, tokenizer, template: str, private: bool | None = None):
        self.tokenizer, self.text = tokenizer, template
        self.template = compile_template(template, private)  # None: apply_chat_template renders
        if self.template is not None:
            # The variables apply_chat_template passes (bos_token, eos_token, ...), bound once: passing
            # them on every call costs as much as rendering a short conversation.
            variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
            self.template.globals.update(variables, tools=None, documents=None)

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        import jinja2

        try:
            if self.template is None:
                return self.tokenizer.apply_chat_template(
                    messages, chat_template=self.text, tokenize=False, add_generation_prompt=add_generation_prompt,
                    tools=tools,
                )
            extra = {"tools": tools} if tools is not None else {}
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template refused this conversation: {e}") from None
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
            raise TemplateError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None
