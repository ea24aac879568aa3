"""An OpenAI-compatible HTTP server for one `pymoe.Model`, standard library only.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or
server-sent events with ``"stream": true``), ``GET /v1/models``, ``GET /health``
and ``GET /stats`` (generation and expert-cache counters plus the server's own).

Design. HTTP is served by `http.server.ThreadingHTTPServer`: one thread per
connection parses and validates a request and answers it. Generation is done
by a single worker thread that owns the model: a llama.cpp context holds one
sequence, so requests run one at a time, in arrival order, from a bounded
queue (at most one generating plus ``queue_size`` waiting; beyond that: 429).
The worker hands text pieces to the connection thread through a per-request
event queue. When a client goes away (a failed write while streaming, or the
socket seen closed while it waits), its request is cancelled: dropped from the
queue, or its generation stopped after the current token, and the worker
moves on to the next request.

Bounds: the body size (413), ``max_tokens`` (400 above the limit; a request
without it gets the limit), the queue length (429) and a socket timeout on
every read and write. A prompt that does not leave room for one token in the
context is refused with a 400 (code ``context_length_exceeded``); an answer
that reaches the end of the context stops with ``finish_reason: "length"``.

The library never prints; it logs to the ``pymoe.server`` logger.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import queue
import select
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

from .model import Model

log = logging.getLogger("pymoe.server")

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_TOKENS_LIMIT = 2048
DEFAULT_QUEUE_SIZE = 16
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 64
MAX_STOP_STRINGS = 16
_POLL_SECONDS = 0.2  # how often a waiting connection thread checks that its client is still there


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


# ---------------------------------------------------------------------- request parsing


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


# fields of the OpenAI API that would change the answer and that pymoe does not implement:
# refused rather than silently ignored (a falsy value is accepted)
_UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "suffix", "echo", "audio", "prediction")


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
    return list(stops)


def _content(message: dict[str, Any], i: int) -> str:
    """A message's text: a string, or a list of text parts (images and audio are refused)."""
    c = message.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(
                    400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}]")


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
        out.append({"role": role, "content": _content(m, i)})
    return out


def _prompt(body: dict[str, Any]) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # one prompt in a batch of one
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return [int(t) for t in p]
    if isinstance(p, list) and len(p) > 1 and all(isinstance(t, (str, list)) for t in p):
        raise ApiError(400, "one prompt per request: this server answers requests one at a time", param="prompt")
    raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids", param="prompt")


def parse_request(body: Any, *, chat: bool, max_tokens_limit: int, defaults: dict[str, Any]) -> CompletionRequest:
    """Validates a decoded JSON body; raises ApiError (400) on a bad one.

    Unknown fields are ignored (the openai client sends some); the fields used
    are type-checked; known fields that would change the answer but are not
    implemented (logprobs, tools, ...) are refused."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", param="model")
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, 0, "", [], {}):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        raise ApiError(400, "only the 'text' response_format is supported", param="response_format")
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
    for name in ("presence_penalty", "frequency_penalty"):  # accepted for compatibility, not applied
        _number(body, name, -2.0, 2.0)

    sampling = dict(defaults)
    given = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0),
        # llama.cpp's samplers, as llama-server accepts them
        "top_k": _integer(body, "top_k", 0),
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


# ---------------------------------------------------------------------- the worker's side


class _Job:
    """One accepted request: the worker puts events in `events`, the connection thread reads them.

    Events: ("start", prompt_tokens), ("piece", text), ("end", (finish_reason, completion_tokens)),
    ("error", ApiError)."""

    def __init__(self, req: CompletionRequest) -> None:
        self.req = req
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.cancelled = threading.Event()


@dataclass
class _Counters:
    requests: int = 0  # HTTP requests received
    completions: int = 0  # completion requests accepted into the queue
    completed: int = 0  # answered in full
    rejected_busy: int = 0  # 429: the queue was full
    bad_requests: int = 0  # 4xx other than 401/429
    unauthorized: int = 0  # 401
    disconnected: int = 0  # clients that went away before their answer was complete
    errors: int = 0  # 5xx
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Server:
    """Serves `model` over HTTP until `close()`.

    >>> with Model("model.gguf") as m, Server(m, port=0) as srv:
    ...     srv.start()            # in a background thread; or srv.serve_forever()
    ...     print(srv.url)         # http://127.0.0.1:PORT

    The socket is bound in the constructor (``port=0`` picks a free port). The
    server does not close the model. ``sampling`` holds the defaults of
    `Model.generate`'s sampling arguments for requests that do not set them;
    ``max_tokens_limit`` bounds ``max_tokens`` and is the default when a
    request gives none; ``queue_size`` requests may wait behind the one being
    generated; ``timeout`` (seconds) bounds each socket read and write;
    ``max_connections`` bounds the open connections (each has a thread; one
    more is answered 503 and closed);
    ``api_key``, when set, is required as ``Authorization: Bearer KEY`` on
    every endpoint but /health."""

    def __init__(
        self,
        model: Model,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        model_name: str | None = None,
        api_key: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        if max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {max_request_bytes}")
        if max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        self.model = model
        self.model_name = model_name or model.path.stem
        self.api_key = api_key or None
        self.max_request_bytes = max_request_bytes
        self.max_tokens_limit = max_tokens_limit
        self.queue_size = queue_size
        self.max_connections = max_connections
        self._connection_slots = threading.BoundedSemaphore(max_connections)
        self.timeout = timeout
        self.sampling = dict(sampling or {})
        self.created = int(time.time())
        self.n_ctx = model.n_ctx
        self.n_vocab = model.n_vocab

        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._running: _Job | None = None
        self._stopping = False
        self._counters = _Counters()
        self._model_stats = model.stats()  # refreshed by the worker after each request
        self._started = time.monotonic()
        self._worker = threading.Thread(target=self._work, name="pymoe-serve-worker", daemon=True)
        self._serve_thread: threading.Thread | None = None
        self._serving = False

        self._httpd = (_HTTPServer6 if ":" in host else _HTTPServer)((host, port), _Handler)
        self._httpd.app = self

    # ------------------------------------------------------------------ lifetime

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serves in the calling thread until `close()` (from another thread) or KeyboardInterrupt."""
        if not self._worker.is_alive():
            self._worker.start()
        self._serving = True
        try:
            self._httpd.serve_forever(poll_interval=0.25)
        finally:
            self._serving = False

    def start(self) -> None:
        """Serves in a background thread."""
        self._serve_thread = threading.Thread(target=self.serve_forever, name="pymoe-serve-http", daemon=True)
        self._serve_thread.start()
        while not self._serving and self._serve_thread.is_alive():
            time.sleep(0.001)

    def close(self, timeout: float = 30.0) -> None:
        """Stops accepting connections, refuses waiting requests (503), stops the running
        generation after its current token and waits up to `timeout` seconds for the worker."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            waiting = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()  # the running generation sees _stopping after its next token
        for job in waiting:
            job.events.put(("error", ApiError(503, "the server is shutting down", type="server_error")))
        if self._serving:
            self._httpd.shutdown()
        if self._serve_thread is not None:
            self._serve_thread.join(timeout)
        if self._worker.is_alive():
            self._worker.join(timeout)
        self._httpd.server_close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ queue

    def submit(self, req: CompletionRequest) -> _Job:
        """Queues a request; raises ApiError 429 when `queue_size` requests already wait
        behind the running one, 503 when the server is stopping."""
        job = _Job(req)
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", type="server_error")
            if len(self._jobs) + (self._running is not None) > self.queue_size:
                self._counters.rejected_busy += 1
                raise ApiError(
                    429,
                    f"the server is busy: one request is being answered and {len(self._jobs)} are waiting "
                    f"(the limit is {self.queue_size}, set with --queue-size); retry later",
                    type="server_busy",
                    code="queue_full",
                )
            self._jobs.append(job)
            self._counters.completions += 1
            self._cond.notify_all()
        return job

    def withdraw(self, job: _Job, *, disconnected: bool) -> None:
        """The connection is done with `job`: drops it from the queue if it still waits and
        stops its generation if it runs."""
        with self._cond:
            if disconnected and not job.cancelled.is_set():
                self._counters.disconnected += 1
            job.cancelled.set()
            if job in self._jobs:
                self._jobs.remove(job)

    def _count(self, name: str, n: int = 1) -> None:
        with self._cond:
            setattr(self._counters, name, getattr(self._counters, name) + n)

    def stats(self) -> dict[str, Any]:
        """Server counters, and the model's (`Model.stats()`) as of the last finished request."""
        with self._cond:
            c = self._counters
            server = {
                "model": self.model_name,
                "uptime_seconds": round(time.monotonic() - self._started, 3),
                "queued": len(self._jobs),
                "running": self._running is not None,
                "queue_size": self.queue_size,
                "max_tokens_limit": self.max_tokens_limit,
                "max_request_bytes": self.max_request_bytes,
                "n_ctx": self.n_ctx,
                **c.__dict__,
                "rejected": c.rejected_busy + c.bad_requests + c.unauthorized,
            }
            model = self._model_stats
        return {"server": server, "model": model}

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
                self._running = job
            try:
                if not job.cancelled.is_set():
                    self._generate(job)
            except ApiError as e:
                job.events.put(("error", e))
            except ValueError as e:  # the model refused the input
                job.events.put(("error", ApiError(400, str(e))))
            except Exception as e:
                log.exception("generation failed")
                job.events.put(("error", ApiError(500, f"generation failed: {e}", type="server_error")))
            finally:
                try:
                    stats = self.model.stats()
                except Exception:
                    log.exception("reading the model's counters failed")
                    stats = self._model_stats
                with self._cond:
                    self._running = None
                    self._model_stats = stats

    def _tokens(self, req: CompletionRequest) -> list[int]:
        model = self.model
        if req.chat:
            return model.chat_tokens(req.messages)
        if isinstance(req.prompt, str):
            return model.tokenize(req.prompt, add_bos=True, special=False)
        bad = [t for t in req.prompt if not 0 <= t < self.n_vocab]
        if bad:
            raise ApiError(
                400, f"token id {bad[0]} is outside this model's vocabulary of {self.n_vocab} tokens", param="prompt"
            )
        return list(req.prompt)

    def _generate(self, job: _Job) -> None:
        req = job.req
        tokens = self._tokens(req)
        n = len(tokens)
        param = "messages" if req.chat else "prompt"
        if n == 0:
            raise ApiError(400, "the prompt is empty", param=param)
        if n >= self.n_ctx:
            raise ApiError(
                400,
                f"the prompt is {n} tokens long but the model's context holds {self.n_ctx} tokens, with at least "
                "one left for the answer; shorten the prompt (or drop old messages), or start the server with a "
                "larger --ctx-size",
                param=param,
                code="context_length_exceeded",
            )
        max_tokens = min(req.max_tokens or self.max_tokens_limit, self.n_ctx - n)
        job.events.put(("start", n))
        pieces = self.model.stream(tokens, max_tokens, stop=req.stop, **req.sampling)
        stopped = False
        try:
            for piece in pieces:
                job.events.put(("piece", piece))
                if job.cancelled.is_set() or self._stopping:
                    stopped = True
                    break
        finally:
            pieces.close()  # stops the generation after the current token and frees the model
        last = self.model.last_stats
        if stopped:
            if not job.cancelled.is_set():
                job.events.put(("error", ApiError(503, "the server is shutting down", type="server_error")))
            return
        self._count("completed")
        self._count("prompt_tokens", n)
        self._count("completion_tokens", last.generated_tokens)
        finish = last.finish_reason if last.finish_reason in ("stop", "length") else "stop"
        job.events.put(("end", (finish, last.generated_tokens)))


# ---------------------------------------------------------------------- HTTP


class _ClientGone(Exception):
    pass


_TOO_MANY_CONNECTIONS = json.dumps(
    ApiError(503, "too many open connections; retry later", type="server_error", code="too_many_connections").body()
).encode()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a connection thread never keeps the process alive
    block_on_close = False
    app: Server

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.app._connection_slots.acquire(blocking=False):
            log.warning("refused a connection from %s: %d are open", client_address, self.app.max_connections)
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                f"Connection: close\r\nContent-Length: {len(_TOO_MANY_CONNECTIONS)}\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(head.encode() + _TOO_MANY_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.app._connection_slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app._connection_slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("the connection from %s failed", client_address)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pymoe"
    app: Server
    _chunked = False  # the streamed answer is sent with Transfer-Encoding: chunked
    _body_pending = False  # the request has a body that has not been read (yet)
    _responded = False  # the status line of the response has been sent

    def setup(self) -> None:
        self.app = cast(_HTTPServer, self.server).app
        super().setup()
        self.connection.settimeout(self.app.timeout)  # for every read and write

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ plumbing

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: ApiError) -> None:
        if e.status == 401:
            self.app._count("unauthorized")
        elif e.status >= 500:
            self.app._count("errors")
        elif e.status != 429:
            self.app._count("bad_requests")
        headers = {"Retry-After": "1"} if e.status in (429, 503) else {}
        if e.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        self._send_json(e.status, e.body(), headers)

    def _client_gone(self) -> bool:
        """True when the peer has closed its side (readable with nothing to read)."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _read_body(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not supported)")
        length = self.headers.get("Content-Length")
        try:
            size = int(length) if length is not None else -1
        except ValueError:
            size = -1
        if size < 0:
            self.close_connection = True
            raise ApiError(411 if length is None else 400, "a valid Content-Length header is required")
        if size > self.app.max_request_bytes:
            raise ApiError(
                413,
                f"the request body is {size} bytes, above this server's limit of {self.app.max_request_bytes} "
                "(set with pymoe serve --max-request-bytes)",
                code="request_too_large",
            )
        try:
            data = self.rfile.read(size)
            self._body_pending = False
        except TimeoutError:
            self.close_connection = True
            raise ApiError(408, "timed out reading the request body") from None
        if len(data) < size:
            self.close_connection = True
            raise _ClientGone()
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def _authorize(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        auth = self.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "a valid API key is required: send 'Authorization: Bearer KEY'",
                type="invalid_request_error",
                code="invalid_api_key",
            )

    def _drain(self) -> None:
        """Reads and drops an unread request body, for at most two seconds: closing a socket with unread
        data resets the connection, and the client might lose the error response."""
        try:
            size = int(self.headers.get("Content-Length") or 0)
            deadline = time.monotonic() + 2.0
            self.connection.settimeout(0.5)
            while size > 0 and time.monotonic() < deadline:
                data = self.rfile.read1(min(size, 1 << 16))
                if not data:
                    break
                size -= len(data)
        except (OSError, ValueError):
            pass

    def _dispatch(self, routes: dict[str, Any]) -> None:
        self.app._count("requests")
        self._body_pending = bool(self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"))
        self._responded = False
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            if path != "/health":
                self._authorize()
            route = routes.get(path)
            if route is None and path.startswith("/v1/models/") and self.command == "GET":
                route = lambda: self._model(path[len("/v1/models/") :])  # noqa: E731
            if route is None:
                known = path in _GET_ROUTES or path in _POST_ROUTES or path.startswith("/v1/models/")
                raise ApiError(
                    405 if known else 404,
                    f"{self.command} {path} is not {'allowed' if known else 'an endpoint of this server'}; "
                    "endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, "
                    "GET /stats",
                )
            route()
            if self._body_pending:  # a body nobody read would be taken for the next request
                self.close_connection = True
        except ApiError as e:
            if self._body_pending:
                self.close_connection = True
            try:
                self._send_error(e)
            except OSError:
                self.close_connection = True
                return
            if self._body_pending:
                self._drain()
        except (_ClientGone, BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:
            log.exception("%s %s failed", self.command, path)
            self.close_connection = True
            if not self._responded:
                with contextlib.suppress(OSError):
                    self._send_error(ApiError(500, f"internal error: {e}", type="server_error"))

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    def do_GET(self) -> None:
        self._dispatch(
            {
                "/health": self._health,
                "/v1/models": self._models,
                "/stats": lambda: self._send_json(200, self.app.stats()),
            }
        )

    def _no_route(self) -> None:
        self._dispatch({})

    do_PUT = do_DELETE = do_PATCH = _no_route

    def do_POST(self) -> None:
        self._dispatch(
            {
                "/v1/chat/completions": lambda: self._completion(chat=True),
                "/v1/completions": lambda: self._completion(chat=False),
            }
        )

    # ------------------------------------------------------------------ endpoints

    def _health(self) -> None:
        s = self.app.stats()["server"]
        self._send_json(200, {"status": "ok", "model": self.app.model_name, "queued": s["queued"]})

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.app.model_name, "object": "model", "created": self.app.created, "owned_by": "pymoe"}

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [self._model_object()]})

    def _model(self, name: str) -> None:
        if name != self.app.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server has {self.app.model_name!r}",
                param="model",
                code="model_not_found",
            )
        self._send_json(200, self._model_object())

    def _completion(self, *, chat: bool) -> None:
        body = self._read_body()
        req = parse_request(body, chat=chat, max_tokens_limit=self.app.max_tokens_limit, defaults=self.app.sampling)
        job = self.app.submit(req)
        gone = False
        try:
            if req.stream:
                self._stream(job)
            else:
                self._answer(job)
        except (_ClientGone, OSError):
            gone = True
            raise _ClientGone() from None
        finally:
            self.app.withdraw(job, disconnected=gone)

    def _next_event(self, job: _Job) -> tuple[str, Any]:
        """The worker's next event for `job`; raises _ClientGone when the client closes meanwhile."""
        while True:
            try:
                return job.events.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self._client_gone():
                    raise _ClientGone() from None

    def _ids(self, chat: bool) -> tuple[str, int]:
        return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())

    def _answer(self, job: _Job) -> None:
        req = job.req
        pieces: list[str] = []
        prompt_tokens = 0
        while True:
            kind, value = self._next_event(job)
            if kind == "error":
                raise value
            if kind == "start":
                prompt_tokens = value
            elif kind == "piece":
                pieces.append(value)
            elif kind == "end":
                finish, completion_tokens = value
                break
        cid, created = self._ids(req.chat)
        text = "".join(pieces)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}} if req.chat else {"index": 0, "text": text}
        )
        choice.update({"logprobs": None, "finish_reason": finish})
        self._send_json(
            200,
            {
                "id": cid,
                "object": "chat.completion" if req.chat else "text_completion",
                "created": created,
                "model": self.app.model_name,
                "choices": [choice],
                "usage": _usage(prompt_tokens, completion_tokens),
            },
        )

    def _write_chunk(self, data: bytes) -> None:
        if self._chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)

    def _stream(self, job: _Job) -> None:
        req = job.req
        kind, value = self._next_event(job)
        if kind == "error":
            raise value  # before any byte of the answer: a plain JSON error
        prompt_tokens = value
        cid, created = self._ids(req.chat)
        obj = "chat.completion.chunk" if req.chat else "text_completion"

        def chunk(delta: dict[str, Any] | str, finish: str | None) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "delta": delta} if req.chat else {"index": 0, "text": delta}
            c.update({"logprobs": None, "finish_reason": finish})
            return {"id": cid, "object": obj, "created": created, "model": self.app.model_name, "choices": [c]}

        def event(payload: dict[str, Any] | str) -> None:
            text = payload if isinstance(payload, str) else json.dumps(payload)
            self._write_chunk(b"data: " + text.encode() + b"\n\n")

        self._chunked = self.request_version == "HTTP/1.1"
        if not self._chunked:
            self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            if req.chat:
                event(chunk({"role": "assistant", "content": ""}, None))
            while True:
                kind, value = self._next_event(job)
                if kind == "piece":
                    event(chunk({"content": value} if req.chat else value, None))
                elif kind == "end":
                    finish, completion_tokens = value
                    event(chunk({} if req.chat else "", finish))
                    if req.include_usage:
                        event(
                            {
                                "id": cid,
                                "object": obj,
                                "created": created,
                                "model": self.app.model_name,
                                "choices": [],
                                "usage": _usage(prompt_tokens, completion_tokens),
                            }
                        )
                    break
                elif kind == "error":  # after the headers: an error event, then the end of the stream
                    self.app._count("errors" if value.status >= 500 else "bad_requests")
                    event(value.body())
                    break
            event("[DONE]")
            if self._chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise _ClientGone() from None


_GET_ROUTES = ("/health", "/v1/models", "/stats")
_POST_ROUTES = ("/v1/chat/completions", "/v1/completions")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
