"""An OpenAI-compatible HTTP server for one `pymoe.Model`, standard library only.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or
server-sent events with ``"stream": true``), ``GET /v1/models``, ``GET /health``
and ``GET /stats`` (generation and expert-cache counters plus the server's own).

Design, one module each:

- `protocol`: the OpenAI API — request validation (`parse_request`) and the
  JSON shapes of answers (`Answer`). Pure: no sockets, threads or model.
- `worker`: the job queue and the one thread that owns the model. A llama.cpp
  context holds one sequence, so requests run one at a time, in arrival
  order, from a bounded queue (at most one generating plus ``queue_size``
  waiting; beyond that: 429). The worker hands text pieces to the connection
  thread through a per-request event queue.
- `http`: HTTP/1.1 on `http.server.ThreadingHTTPServer` — one thread per
  connection reads and checks its request, submits it to the worker and
  answers; one route table. When a client goes away (a failed write while
  streaming, or the socket seen closed while it waits), its request is
  withdrawn: dropped from the queue, or its generation stopped after the
  current token, and the worker moves on to the next request. `Server` ties
  the two together.
- `connections`: what keeps the connection threads available — a bounded
  set of connections, a deadline for a whole request, warnings at a rate.
- `access`: who may talk to the server — the Host header (DNS rebinding),
  web pages (Origin, CORS) and the API key.

Bounds: the body size (413), ``max_tokens`` (400 above the limit; a request
without it gets the limit), the queue length (429), the connections (see
`connections`: a deadline for each whole request, and a new connection
replaces the one waiting longest for its request) and a socket timeout on
every write. A prompt that does not leave room for one token in the
context is refused with a 400 (code ``context_length_exceeded``); an answer
that reaches the end of the context stops with ``finish_reason: "length"``.

The library never prints; it logs to the ``pymoe.server`` logger.
"""

from __future__ import annotations

from .access import Access
from .http import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TIMEOUT,
    ROUTES,
    Route,
    Server,
)
from .protocol import DEFAULT_MAX_TOKENS_LIMIT, Answer, ApiError, CompletionRequest, parse_request
from .worker import DEFAULT_QUEUE_SIZE, Job, Worker

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_TOKENS_LIMIT",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "ROUTES",
    "Access",
    "Answer",
    "ApiError",
    "CompletionRequest",
    "Job",
    "Route",
    "Server",
    "Worker",
    "parse_request",
]
