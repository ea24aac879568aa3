"""Formatting a conversation with a model's chat template.

llama.cpp's template engine (``llama_chat_apply_template``) comes first: it
recognises the common templates by their text. A template it does not know is
rendered with Jinja, the way Hugging Face's ``apply_chat_template`` does. A
model without a template gets ChatML.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
FALLBACK_TEMPLATE = "chatml"  # a llama.cpp built-in template name


def validate_messages(messages: Sequence[Any]) -> list[tuple[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        out.append((m["role"], m["content"]))
    return out


def render_jinja(template: str, messages: list[tuple[str, str]], add_assistant: bool, bos: str, eos: str) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        tmpl = env.from_string(template)
        return tmpl.render(
            messages=[{"role": r, "content": c} for r, c in messages],
            add_generation_prompt=add_assistant,
            bos_token=bos,
            eos_token=eos,
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"the model's chat template could not be rendered: {e}") from e


# llama.cpp's template engine: (messages, template, add_assistant) -> text; raises
# ValueError for a template it does not recognise
BuiltinRenderer = Callable[[list[tuple[str, str]], str, bool], str]


def format_messages(
    messages: Sequence[Any],
    template: str,
    *,
    builtin: BuiltinRenderer,
    bos: str = "",
    eos: str = "",
    add_assistant: bool = True,
) -> str:
    """The prompt text for `messages` under `template` (a llama.cpp built-in
    template's text or name, or Jinja; empty: ChatML). `bos` and `eos` are the
    texts a Jinja template sees as bos_token and eos_token."""
    msgs = validate_messages(messages)
    tmpl = template or FALLBACK_TEMPLATE
    try:
        return builtin(msgs, tmpl, add_assistant)
    except ValueError:
        pass  # not one llama.cpp recognises: render the Jinja text itself
    return render_jinja(tmpl, msgs, add_assistant, bos, eos)
