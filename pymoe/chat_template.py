"""Formatting a conversation with a model's chat template.

llama.cpp's template engine (``llama_chat_apply_template``) comes first: it
recognises the common templates by their text. A template it does not know is
rendered with Jinja, the way Hugging Face's ``apply_chat_template`` does. A
model without a template gets ChatML.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import Model

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


def format_messages(
    model: Model, messages: Sequence[Any], *, template: str | None = None, add_assistant: bool = True
) -> str:
    msgs = validate_messages(messages)
    tmpl = template if template is not None else model.chat_template()
    if not tmpl:
        tmpl = FALLBACK_TEMPLATE
    try:
        return str(model._native.apply_chat_template(msgs, template=tmpl, add_assistant=add_assistant))
    except ValueError:
        pass  # not one llama.cpp recognises: render the Jinja text itself
    native = model._native
    bos = (
        model.token_to_bytes(native.token_bos, special=True).decode("utf-8", "replace") if native.token_bos >= 0 else ""
    )
    eos = (
        model.token_to_bytes(native.token_eos, special=True).decode("utf-8", "replace") if native.token_eos >= 0 else ""
    )
    return render_jinja(tmpl, msgs, add_assistant, bos, eos)
