"""Formatting a conversation with a model's chat template, and its tokens.

llama.cpp's template engine (``llama_chat_apply_template``) comes first: it
recognises the common templates by their text. A template it does not know is
rendered with Jinja, the way Hugging Face's ``apply_chat_template`` does. A
model without a template gets ChatML.

Message text never becomes control tokens. The template is rendered twice:
with the messages, and with a unique placeholder in place of each message's
text, which shows the parts of the prompt that are the template's own
(`render_chat`). Control tokens are parsed in those parts only
(`tokenize_chat`).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
FALLBACK_TEMPLATE = "chatml"  # a llama.cpp built-in template name

# llama.cpp's template engine: (messages, template, add_assistant) -> text; raises
# ValueError for a template it does not recognise
BuiltinRenderer = Callable[[list[tuple[str, str]], str, bool], str]


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


# ---------------------------------------------------------------- the prompt and its parts


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: its text in order, each part marked as the
    template's own text (False) or a message's (True)."""

    parts: tuple[tuple[str, bool], ...]

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.parts)


_C_SPACE = " \t\n\v\f\r"  # what llama.cpp's templates trim (C isspace)


def _variants(content: str) -> list[str]:
    """What a template may have made of a message's text: itself, or trimmed
    (Jinja's ``trim``, llama.cpp's trim()), longest first."""
    seen: dict[str, None] = {}
    for v in (
        content,
        content.rstrip(_C_SPACE),
        content.lstrip(_C_SPACE),
        content.strip(_C_SPACE),
        content.rstrip(),
        content.lstrip(),
        content.strip(),
    ):
        seen.setdefault(v, None)
    return list(seen)


def _align(text: str, segments: list[str], contents: list[str]) -> list[str] | None:
    """Finds in `text` = segments[0] x1 segments[1] x2 ... the message texts x_i
    (each a variant of contents[i - 1]); None when there is no such reading."""
    if not text.startswith(segments[0]):
        return None
    # depth-first over the variants, longest first; (i, pos) pairs known to fail are not retried
    stack: list[tuple[int, int, list[str]]] = [(0, len(segments[0]), [])]
    failed: set[tuple[int, int]] = set()
    while stack:
        i, pos, found = stack.pop()
        if i == len(contents):
            if pos == len(text):
                return found
            continue
        if (i, pos) in failed:
            continue
        failed.add((i, pos))
        after = segments[i + 1]
        for v in reversed(_variants(contents[i])):  # the stack pops the longest first
            if text.startswith(v, pos) and text.startswith(after, pos + len(v)):
                stack.append((i + 1, pos + len(v) + len(after), [*found, v]))
    return None


def render_chat(
    messages: Sequence[Any],
    template: str,
    *,
    builtin: BuiltinRenderer,
    bos: str = "",
    eos: str = "",
    add_assistant: bool = True,
) -> ChatPrompt:
    """`messages` under `template` (a llama.cpp built-in template's text or
    name, or Jinja; empty: ChatML), with the parts that came from the messages
    marked. `bos` and `eos` are the texts a Jinja template sees as bos_token and
    eos_token.

    Where the template changed a message's text other than by trimming it (a
    Jinja template may split, replace or test it), the placeholders' rendering
    with the message text put in as written is the prompt."""
    msgs = validate_messages(messages)
    tmpl = template or FALLBACK_TEMPLATE

    def render(ms: list[tuple[str, str]]) -> str:
        try:
            return builtin(ms, tmpl, add_assistant)
        except ValueError:  # not one llama.cpp recognises: render the Jinja text itself
            return render_jinja(tmpl, ms, add_assistant, bos, eos)

    real = render(msgs)
    while True:  # a marker that no message, template or output contains
        nonce = f"pymoe{secrets.token_hex(8)}"
        if nonce not in real and nonce not in tmpl and not any(nonce in c for _, c in msgs):
            break
    marks = [f"{nonce}m{i}z" if c else "" for i, (_, c) in enumerate(msgs)]  # an empty text needs no mark
    pieces = re.split(f"({nonce}m[0-9]+z)", render([(r, mark) for (r, _), mark in zip(msgs, marks, strict=True)]))
    segments = pieces[0::2]
    contents = [msgs[int(m[len(nonce) + 1 : -1])][1] for m in pieces[1::2]]
    found = _align(real, segments, contents)
    parts: list[tuple[str, bool]] = [(segments[0], False)]
    for x, seg in zip(found if found is not None else contents, segments[1:], strict=True):
        parts += [(x, True), (seg, False)]
    return ChatPrompt(tuple((t, is_msg) for t, is_msg in parts if t))


# ---------------------------------------------------------------- tokens


Tokenizer = Callable[[str, bool], list[int]]  # (text, parse control tokens) -> ids, no BOS


def tokenize_chat(
    prompt: ChatPrompt, *, tokenize: Tokenizer, is_control: Callable[[int], bool], control_text: Callable[[int], str]
) -> list[int]:
    """The prompt's tokens (no BOS added), with control tokens only where the
    template wrote them.

    `tokenize(text, special)` is the model's tokenizer without BOS (`special`:
    parse control tokens); `is_control(t)` says whether `t` is one that only
    special parsing produces; `control_text(t)` is its text.

    The whole text is tokenized as llama.cpp tokenizes any text with special
    parsing: control tokens cut it into runs, each run is tokenized alone. When
    that yields exactly the template's control tokens, those are the tokens,
    the same as a model's own tokenizer gives for the text. Otherwise a message
    holds the text of a control token, and `tokenize_by_runs` cuts the text at
    the template's control tokens only."""
    tokens = tokenize(prompt.text, True)
    controls_of: dict[str, list[int]] = {}  # a template repeats its few parts
    for text, is_msg in prompt.parts:
        if not is_msg and text not in controls_of:
            controls_of[text] = list(filter(is_control, tokenize(text, True)))
    own = [t for text, is_msg in prompt.parts if not is_msg for t in controls_of[text]]
    if list(filter(is_control, tokens)) == own:
        return tokens
    return tokenize_by_runs(prompt, tokenize=tokenize, is_control=is_control, control_text=control_text)


def tokenize_by_runs(
    prompt: ChatPrompt, *, tokenize: Tokenizer, is_control: Callable[[int], bool], control_text: Callable[[int], str]
) -> list[int]:
    """The template's control tokens, and between them each run of text
    (template text and message text together, as a tokenizer merges them)
    tokenized with no special parsing. (Arguments as for `tokenize_chat`.)"""
    out: list[int] = []
    run: list[str] = []

    def flush() -> None:
        if text := "".join(run):
            out.extend(tokenize(text, False))
        run.clear()

    for text, is_msg in prompt.parts:
        if is_msg:
            run.append(text)
            continue
        toks = tokenize(text, True)
        cuts: list[tuple[int, int, int]] = []  # (start, end, token) of each control token in `text`
        for t in filter(is_control, toks):
            at = text.find(control_text(t), cuts[-1][1] if cuts else 0)
            if at < 0:  # not where its text says: this part alone, as its own tokens
                flush()
                out.extend(toks)
                break
            cuts.append((at, at + len(control_text(t)), t))
        else:
            pos = 0
            for start, end, t in cuts:
                run.append(text[pos:start])
                flush()
                out.append(t)
                pos = end
            run.append(text[pos:])
    flush()
    return out
