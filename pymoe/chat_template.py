"""Formatting a conversation with a model's chat template, and its tokens.

llama.cpp's template engine (``llama_chat_apply_template``) comes first: it
recognises the common templates by their text. A template it does not know is
rendered with Jinja, the way Hugging Face's ``apply_chat_template`` does, in a
sandbox with a size and a time limit. A model without a template gets ChatML.

Message text never becomes control tokens. The template is rendered twice:
with the messages, and with a unique placeholder in place of each message's
text, which shows the parts of the prompt that are the template's own
(`render_chat`). Control tokens are parsed in those parts only
(`tokenize_chat`).
"""

from __future__ import annotations

import functools
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
FALLBACK_TEMPLATE = "chatml"  # a llama.cpp built-in template name

# Limits of one rendering: a template may repeat the messages' text this many
# times and add this much of its own; a Jinja template may run this long.
TEMPLATE_COPIES = 4
TEMPLATE_OWN_CHARS = 1 << 20
TEMPLATE_SECONDS = 2.0

# llama.cpp's template engine: (messages, template, add_assistant) -> text; raises
# ValueError for a template it does not recognise
BuiltinRenderer = Callable[[list[tuple[str, str]], str, bool], str]


class TemplateLimitError(ValueError):
    """A chat template produced too much text or ran too long."""


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


def output_limit(messages: Sequence[tuple[str, str]]) -> int:
    """The most characters a template may produce for `messages`."""
    return TEMPLATE_COPIES * sum(len(r) + len(c) for r, c in messages) + TEMPLATE_OWN_CHARS


def _too_long(limit: int) -> TemplateLimitError:
    return TemplateLimitError(
        f"the chat template produced more than {limit} characters for these messages "
        f"(at most {TEMPLATE_COPIES} x the messages' text + {TEMPLATE_OWN_CHARS}); "
        "hint: the model's template is broken: pass another one (template=...)"
    )


# ---------------------------------------------------------------- Jinja, bounded

_budget = threading.local()  # .limit (characters) while rendering
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap"})
_FORMAT_METHODS = frozenset({"format", "format_map"})
_WIDE_FIELD = re.compile(r"%[-+ #0]*\d{7,}|\{[^{}]*:[^{}]*\d{7,}")  # a literal width of a million or more
_ARG_WIDTH = re.compile(r"%[-+ #0]*\*|%[^%]*\.\*|\{[^{}]*:[^{}]*\{")  # a width taken from the arguments


def _check_size(value: Any) -> Any:
    limit = getattr(_budget, "limit", None)
    if limit is not None and isinstance(value, (str, list, tuple, dict)) and len(value) > limit:
        raise _too_long(limit)
    return value


def _ints(values: Any) -> Iterator[int]:
    """The sizes of the integers in an argument, a tuple/list or a dict of them."""
    items = values.values() if isinstance(values, dict) else values if isinstance(values, (tuple, list)) else (values,)
    return (abs(v) for v in items if isinstance(v, int))


def _check_call(name: str, target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Refuses before it runs a call that would make more than the limit at
    once: a width argument, or a format field that wide."""
    limit = getattr(_budget, "limit", None)
    if limit is None:
        return
    if name in _WIDTH_METHODS and any(n > limit for a in (*args, kwargs) for n in _ints(a)):
        raise _too_long(limit)
    if name in _FORMAT_METHODS or name == "%":
        fmt = target if isinstance(target, str) else ""
        if _WIDE_FIELD.search(fmt) or (
            _ARG_WIDTH.search(fmt) and any(n > limit for a in (*args, kwargs) for n in _ints(a))
        ):
            raise _too_long(limit)


def _guard_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        values = [a for a in args if isinstance(a, (str, int))]  # without the context jinja may pass first
        _check_call(name, values[0] if values else None, values[1:], kwargs)
        return _check_size(f(*args, **kwargs))

    return guarded


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            limit = getattr(_budget, "limit", None)
            if limit is not None:
                if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                    left, right = right, left
                if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
                    if len(left) * right > limit:
                        raise _too_long(limit)
                elif operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
                    bits = abs(left).bit_length()
                    if (bits + right.bit_length() if operator == "*" else bits * abs(right)) > 8 * limit:
                        raise _too_long(limit)
                elif operator == "%":
                    _check_call("%", left, [right], {})
            return _check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            _check_call(getattr(method, "__name__", ""), getattr(method, "__self__", None), args, kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs))

    def raise_exception(message: str) -> None:
        raise ValueError(f"the chat template refused the conversation: {message}")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    return env


@functools.lru_cache(maxsize=1)
def _joins() -> frozenset[Any]:
    """The code of Jinja's `~` (string concatenation), whose results are checked."""
    import jinja2.runtime

    return frozenset({jinja2.runtime.str_join.__code__, jinja2.runtime.markup_join.__code__})


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    return _environment().from_string(template)


@contextmanager
def _bounded(limit: int, seconds: float) -> Iterator[None]:
    """Sets the size limit, and a deadline that a trace function checks on
    every line of the template's compiled code (a loop with no output too)."""
    deadline = time.monotonic() + seconds
    joins = _joins()

    def expired() -> TemplateLimitError:
        return TemplateLimitError(
            f"the chat template ran for more than {seconds:g} s; hint: the model's template is broken: "
            "pass another one (template=...)"
        )

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise expired()
        return on_line

    def on_return(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "return":
            _check_size(arg)
        return on_return

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise expired()
        if frame.f_code.co_filename == "<template>":
            return on_line
        if frame.f_code in joins:
            frame.f_trace_lines = False
            return on_return
        return None

    previous = sys.gettrace()
    _budget.limit = limit
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)
        _budget.limit = None


def render_jinja(template: str, messages: list[tuple[str, str]], add_assistant: bool, bos: str, eos: str) -> str:
    import jinja2

    limit = output_limit(messages)
    out: list[str] = []
    size = 0
    try:
        with _bounded(limit, TEMPLATE_SECONDS):  # compiling too: Jinja computes constant expressions then
            tmpl = _compile(template)
            for chunk in tmpl.generate(
                messages=[{"role": r, "content": c} for r, c in messages],
                add_generation_prompt=add_assistant,
                bos_token=bos,
                eos_token=eos,
            ):
                size += len(chunk)
                if size > limit:
                    raise _too_long(limit)
                out.append(chunk)
    except ValueError:
        raise  # the limits, raise_exception()
    except (jinja2.TemplateError, RecursionError, MemoryError, ArithmeticError, TypeError, LookupError) as e:
        raise ValueError(f"the model's chat template could not be rendered: {type(e).__name__}: {e}") from e
    return "".join(out)


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
    limit = output_limit(msgs)

    def render(ms: list[tuple[str, str]]) -> str:
        try:
            text = builtin(ms, tmpl, add_assistant)
        except ValueError:  # not one llama.cpp recognises: render the Jinja text itself
            text = render_jinja(tmpl, ms, add_assistant, bos, eos)
        if len(text) > limit:
            raise _too_long(limit)
        return text

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
