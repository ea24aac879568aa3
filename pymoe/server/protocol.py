"""The OpenAI API as this server speaks it: request validation and the JSON shapes of answers.

Pure functions and data: no sockets, no threads, no model."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_TOKENS_LIMIT = 2048
MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------- requests


@dataclass
class CompletionRequest:
    """A validated /v1/chat/completions or /v1/completions request."""

    chat: bool
    messages: list[dict[str, str]] = field(default_factory=list)  # chat
    prompt: str | list[int] = ""  # completions: text, or token ids used as given
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


# The fields a request may carry; any other is refused with a 400 that names it, never ignored.
_USED = {
    # endpoint (chat?) -> fields this server applies (each is type-checked below)
    True: {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
           "repeat_penalty", "seed", "stop", "stream", "stream_options", "n"},
    False: {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed",
            "stop", "stream", "stream_options", "n", "best_of"},
}  # fmt: skip
# fields of the OpenAI API that pymoe does not implement, accepted only at the value that turns them off
_OFF: dict[bool, dict[str, tuple[Any, ...]]] = {
    True: {"logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},), "presence_penalty": (0,),
           "frequency_penalty": (0,), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
           "function_call": ("none",), "response_format": ({"type": "text"},)},
    False: {"logprobs": (False,), "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,),
            "suffix": ("",), "echo": (False,)},
}  # fmt: skip
_MESSAGE_OFF: dict[str, tuple[Any, ...]] = {"tool_calls": ([],)}
_WHY = {  # what the error adds for some refused fields
    "presence_penalty": "; hint: repeat_penalty (llama.cpp's) is supported",
    "frequency_penalty": "; hint: repeat_penalty (llama.cpp's) is supported",
    **dict.fromkeys(
        ("tools", "functions", "tool_choice", "function_call", "tool_calls", "tool_call_id", "parallel_tool_calls"),
        " (tool calling is not implemented)",
    ),
    **dict.fromkeys(("grammar", "json_schema", "response_format"), " (constrained output is not implemented)"),
}
INT32_MAX = 2**31 - 1


def _check_fields(obj: dict[str, Any], used: set[str], off: dict[str, tuple[Any, ...]], where: str = "") -> None:
    """Refuses every field of `obj` that is neither used nor at its off value (null counts as absent)."""
    for name, value in obj.items():
        if value is None or name in used or value in off.get(name, ()):
            continue
        alternatives = " or send " + " or ".join(json.dumps(v) for v in off[name]) if name in off else ""
        raise ApiError(
            400,
            f"'{where}{name}' is not supported by this server; leave it out{alternatives}{_WHY.get(name, '')}",
            param=f"{where}{name}",
            code="unsupported_parameter",
        )


def _text(s: str, param: str) -> str:
    """`s` when it is valid Unicode text (JSON can carry half of a UTF-16 surrogate pair, which is not)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400,
            f"'{param}' contains an unpaired UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), "
            "which is not text",
            param=param,
        ) from None
    return s


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_number(v) or not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be a number in [{lo:g}, {hi:g}], got {v!r}", param=name)
    return float(v)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"'{name}' must be an integer {rng}, got {v!r}", param=name)
    return int(v)


def _boolean(body: dict[str, Any], name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {v!r}", param=name)
    return v


def _stop(body: dict[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(
            400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", param="stop"
        )
    return [_text(s, "stop") for s in stops]


def _content(message: dict[str, Any], i: int) -> str:
    """A message's text: a string, or a list of text parts (images and audio are refused)."""
    c = message.get("content")
    param = f"messages[{i}].content"
    if c is None:
        return ""
    if isinstance(c, str):
        return _text(c, param)
    if isinstance(c, list):
        parts: list[str] = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{param}: only text parts are supported", param=param)
            _check_fields(part, {"type", "text"}, {}, f"{param}[{len(parts)}].")
            parts.append(_text(part["text"], param))
        return "".join(parts)
    raise ApiError(400, f"{param} must be a string or a list of text parts", param=f"messages[{i}]")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(
                400,
                f"messages[{i}].role {m['role']!r} is not supported; use system, developer, user, assistant or tool",
                param=f"messages[{i}].role",
            )
        _check_fields(m, {"role", "content"}, _MESSAGE_OFF, f"messages[{i}].")
        out.append({"role": role, "content": _content(m, i)})
    return out


def _prompt(body: dict[str, Any]) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # one prompt in a batch of one
    if isinstance(p, str):
        return _text(p, "prompt")
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return [int(t) for t in p]
    if isinstance(p, list) and len(p) > 1 and all(isinstance(t, (str, list)) for t in p):
        raise ApiError(400, "one prompt per request: this server answers requests one at a time", param="prompt")
    raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids", param="prompt")


def parse_request(body: Any, *, chat: bool, max_tokens_limit: int, defaults: dict[str, Any]) -> CompletionRequest:
    """Validates a decoded JSON body; raises ApiError (400) on a bad one.

    Every field is either used (and type-checked) or refused: the fields of
    the OpenAI API that this server does not implement (logprobs, tools,
    tool_choice, ...) are accepted only at the value that turns them off, and
    any other field (llama-server's grammar, json_schema, ...) is refused.
    `defaults` are the sampling arguments of `Model.stream` for the fields a
    request does not set."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_fields(body, _USED[chat], _OFF[chat])
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", param="model")
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is supported: the server generates one answer per request", param="n")
    best_of = _integer(body, "best_of", 1)
    if best_of not in (None, 1):
        raise ApiError(400, "only best_of=1 is supported", param="best_of")

    max_tokens = _integer(body, "max_tokens", 1)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is not None and max_tokens > max_tokens_limit:
        param = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}, above this server's limit of {max_tokens_limit} "
            "(set with pymoe serve --max-tokens-limit)",
            param=param,
        )

    sampling = dict(defaults)
    given = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0),
        # llama.cpp's samplers, as llama-server accepts them
        "top_k": _integer(body, "top_k", 0, INT32_MAX),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "repeat_penalty": _number(body, "repeat_penalty", 0.0, 10.0),
    }
    sampling.update({k: v for k, v in given.items() if v is not None})
    if body.get("seed") is not None:
        if not _is_int(body["seed"]):
            raise ApiError(400, f"'seed' must be an integer, got {body['seed']!r}", param="seed")
        sampling["seed"] = body["seed"] % (2**32 - 1)  # llama.cpp's seeds are 32-bit

    stream = _boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    _check_fields(opts or {}, {"include_usage"}, {}, "stream_options.")
    include_usage = _boolean(opts or {}, "include_usage")
    req = CompletionRequest(
        chat=chat,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
    )
    if chat:
        req.messages = _messages(body)
    else:
        req.prompt = _prompt(body)
    return req


# ---------------------------------------------------------------------- answers


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_object(name: str, created: int) -> dict[str, Any]:
    """An entry of /v1/models."""
    return {"id": name, "object": "model", "created": created, "owned_by": "pymoe"}


class Answer:
    """The OpenAI shapes of one answer: a whole ``chat.completion`` / ``text_completion``, or the
    chunks of a stream (``chat.completion.chunk`` events; ``text_completion`` for completions),
    all under one id."""

    def __init__(self, *, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The non-streamed answer."""
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}} if self.chat else {"index": 0, "text": text}
        )
        choice.update({"logprobs": None, "finish_reason": finish})
        out = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None) -> dict[str, Any]:
        c: dict[str, Any] = {"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta}
        c.update({"logprobs": None, "finish_reason": finish})
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [c])

    def first_chunk(self) -> dict[str, Any] | None:
        """The chunk that opens a stream: the assistant's role (chat); None for completions."""
        return self._chunk({"role": "assistant", "content": ""}, None) if self.chat else None

    def piece_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text} if self.chat else text, None)

    def last_chunk(self, finish: str) -> dict[str, Any]:
        return self._chunk({} if self.chat else "", finish)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The chunk after the last one when the client asked for ``stream_options.include_usage``."""
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out
