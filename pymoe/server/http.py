"""HTTP/1.1 for the server: the listening socket, a thread per connection, the route table and the endpoints.

Built on the standard library's `http.server` (request line and header
parsing); the request body, JSON answers, server-sent events in chunked
transfer encoding, disconnect detection, the checks of who may ask
(`access`) and the bounds on connections (`connections`) are here."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

from ..model import Model
from ..stats import summary
from .access import Access
from .connections import Connections, DeadlineReader, RateLog
from .protocol import DEFAULT_MAX_TOKENS_LIMIT, Answer, ApiError, model_object, parse_request
from .worker import DEFAULT_QUEUE_SIZE, Counters, Event, Job, Worker

log = logging.getLogger("pymoe.server")

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_TIMEOUT = 60.0
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 64
LISTEN_BACKLOG = 1024  # connections the kernel completes before they are accepted (capped by net.core.somaxconn)
_POLL_SECONDS = 0.2  # how often a waiting connection thread checks that its client is still there


class Server:
    """Serves `model` over HTTP until `close()`.

    >>> with Model("model.gguf") as m, Server(m, port=0) as srv:
    ...     srv.start()            # in a background thread; or srv.serve_forever()
    ...     print(srv.url)         # http://127.0.0.1:PORT

    The socket is bound in the constructor (``port=0`` picks a free port). The
    server does not close the model. ``sampling`` holds the defaults of
    `Model.stream`'s sampling arguments for requests that do not set them;
    ``max_tokens_limit`` bounds ``max_tokens`` and is the default when a
    request gives none; ``queue_size`` requests may wait behind the one being
    generated; ``request_timeout`` (seconds) bounds the time to receive a
    whole request, from the moment a connection waits for it to its last
    byte; ``timeout`` bounds each socket write, and each read once the request
    is in; ``max_connections`` bounds the open connections (each has a thread;
    when all are taken, a new one replaces the one that has waited longest
    for its request; when all are answering, it gets 503);
    ``api_key``, when set, is required as ``Authorization: Bearer KEY`` on
    every endpoint but /health. ``allowed_hosts`` (Host names answered besides
    the bound address, localhost and IP addresses) and ``cors_origins`` (web
    origins whose pages may call it): see `pymoe.server.access`."""

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
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        sampling: dict[str, Any] | None = None,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
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
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        self.model = model
        self.model_name = model_name or model.path.stem
        self.access = Access.make(host, allowed_hosts, cors_origins, api_key)
        self.max_request_bytes = max_request_bytes
        self.max_tokens_limit = max_tokens_limit
        self.queue_size = queue_size
        self.max_connections = max_connections
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.sampling = dict(sampling or {})
        self.created = int(time.time())
        self.worker = Worker(model, queue_size=queue_size, max_tokens_limit=max_tokens_limit)
        self.counters = Counters(
            "requests",  # HTTP requests received
            "bad_requests",  # 4xx other than 401/429
            "unauthorized",  # 401
            "errors",  # 5xx
            "timed_out",  # requests begun but not in whole within request_timeout (idle connections not counted)
            "replaced",  # connections closed to make room for a new one
            "refused_connections",  # 503: every connection was answering a request
        )
        self._started = time.monotonic()
        self._closed = False
        self._serve_thread: threading.Thread | None = None
        self._serving = False
        self._httpd = (_HTTPServer6 if ":" in host else _HTTPServer)((host, port), self)

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
        self.worker.start()
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
        if self._closed:
            return
        self._closed = True
        self.worker.stop()
        if self._serving:
            self._httpd.shutdown()
        if self._serve_thread is not None:
            self._serve_thread.join(timeout)
        self.worker.join(timeout)
        self._httpd.server_close()
        queue_state, model = self.worker.stats()
        log.info(
            "stopped (requests completed: %d); the model since it was loaded:\n%s",
            queue_state["completed"],
            summary(model["offload"], model),
        )

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """Server counters, and the model's (`Model.stats()`) as of the last finished request."""
        queue_state, model = self.worker.stats()
        http = self.counters.snapshot()
        server = {
            "model": self.model_name,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "max_request_bytes": self.max_request_bytes,
            **queue_state,
            **http,
            "rejected": queue_state["rejected_busy"] + http["bad_requests"] + http["unauthorized"],
        }
        return {"server": server, "model": model}


# ---------------------------------------------------------------------- connections


class _ClientGone(Exception):
    pass


_TOO_MANY_CONNECTIONS = json.dumps(
    ApiError(503, "too many open connections; retry later", type="server_error", code="too_many_connections").body()
).encode()


class _HTTPServer(ThreadingHTTPServer):
    """The listening socket; a thread per connection, at most ``app.max_connections`` of them."""

    daemon_threads = True  # a connection thread never keeps the process alive
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], app: Server) -> None:
        self.app = app
        self.connections = Connections(app.max_connections)
        self.rate_log = RateLog(log)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        admitted, replaced = self.connections.admit(request)
        if replaced:
            self.app.counters.add("replaced")
            self.rate_log.warning(
                "replaced",
                f"all {self.connections.limit} connections were taken: closed the one that had waited longest "
                f"for its request, for a new one from {client_address[0]}",
            )
        if not admitted:
            self.app.counters.add("refused_connections")
            self.rate_log.warning(
                "refused",
                f"refused a connection from {client_address[0]}: all {self.connections.limit} are answering requests",
            )
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
            self.connections.release(request)
            raise

    def shutdown_request(self, request: Any) -> None:
        self.connections.release(request)  # before the socket closes
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("the connection from %s failed", client_address)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


# ---------------------------------------------------------------------- requests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pymoe"
    app: Server
    _chunked = False  # the streamed answer is sent with Transfer-Encoding: chunked
    _body_pending = False  # the request has a body that has not been read (yet)
    _responded = False  # the status line of the response has been sent

    _cors: dict[str, str]  # the CORS headers of every answer to this request

    def setup(self) -> None:
        self.httpd = cast(_HTTPServer, self.server)
        self.app = self.httpd.app
        super().setup()
        self.connection.settimeout(self.app.timeout)
        self.rfile.close()  # the socket's file from StreamRequestHandler: reads go through the deadline
        self._reader = DeadlineReader(self.connection, self.app.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._cors = {}
        self._responded = False
        self.httpd.connections.waiting(self.connection)
        self._reader.start(self.app.request_timeout)
        try:
            super().handle_one_request()
        except ConnectionError:  # the client reset the connection: nothing to answer, nothing to log
            self.close_connection = True
        if self._reader.expired and not self._responded:
            self.close_connection = True
            if self._reader.received:  # the request line or headers came too slowly (else: an idle connection)
                self._timed_out()
                with contextlib.suppress(OSError):
                    self.connection.settimeout(1.0)
                    self._send_error(self._timed_out_error())

    def _timed_out(self) -> None:
        self.close_connection = True
        self.app.counters.add("timed_out")
        self.httpd.rate_log.warning(
            "timed out",
            f"closed a connection from {self.client_address[0]}: its request did not arrive within "
            f"{self.app.request_timeout:g} s",
        )

    def _timed_out_error(self) -> ApiError:
        return ApiError(
            408,
            f"the request did not arrive within {self.app.request_timeout:g} s "
            "(set with pymoe serve --request-timeout)",
            code="request_timeout",
        )

    def _request_in(self) -> None:
        """The whole request has been read: no deadline while it is answered, and no replacing it."""
        self._reader.stop()
        if not self.httpd.connections.answering(self.connection):
            raise _ClientGone()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ plumbing

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in {**self._cors, **(headers or {})}.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _count_error(self, status: int) -> None:
        if status == 401:
            self.app.counters.add("unauthorized")
        elif status >= 500:
            self.app.counters.add("errors")
        elif status != 429:  # the worker counts those
            self.app.counters.add("bad_requests")

    def _send_error(self, e: ApiError) -> None:
        self._count_error(e.status)
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
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            self.close_connection = True
            raise ApiError(400, "the request has more than one Content-Length header")
        length = lengths[0].strip() if lengths else None
        if length is None or not (length.isascii() and length.isdigit()):
            self.close_connection = True
            raise ApiError(411 if length is None else 400, "a valid Content-Length header is required")
        size = int(length)
        media_type = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(
                415,
                "the request body must be JSON sent with 'Content-Type: application/json', got "
                f"{media_type or 'no Content-Type'!r} (web pages of other origins may send other types unasked)",
                code="unsupported_media_type",
            )
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
            self._timed_out()
            raise self._timed_out_error() from None
        if len(data) < size:
            self.close_connection = True
            raise _ClientGone()
        self._request_in()
        try:
            return json.loads(data)
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except ValueError:  # an integer of more digits than Python converts
            raise ApiError(
                400, "the request body holds a number too long to read (over 4300 digits)", code="invalid_json"
            ) from None

    def _drain(self) -> None:
        """Reads and drops an unread request body, for at most two seconds: closing a socket with unread
        data resets the connection, and the client might lose the error response."""
        try:
            size = int(self.headers.get("Content-Length") or 0)
            self._reader.start(2.0)
            while size > 0:
                data = self.rfile.read1(min(size, 1 << 16))
                if not data:
                    break
                size -= len(data)
        except (OSError, ValueError):
            pass

    def _preflight(self, methods: list[str], host: str | None) -> None:
        """Answers OPTIONS: the path's methods and, to a web page of an allowed origin, CORS's permission."""
        headers = self.app.access.preflight(
            self.headers.get("Origin"), host, methods, self.headers.get("Access-Control-Request-Headers")
        )
        self.send_response(204)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _dispatch(self) -> None:
        if self._reader.eof or not self.httpd.connections.is_open(self.connection):
            # headers cut short by the end of the stream (the client left, or was replaced): not a request
            self.close_connection = True
            return
        self.app.counters.add("requests")
        self._body_pending = bool(self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"))
        path = urlsplit(self.path).path.rstrip("/") or "/"
        access = self.app.access
        try:
            hosts = self.headers.get_all("Host") or []
            access.check_host(hosts, required=self.request_version == "HTTP/1.1")
            host = hosts[0].strip().lower() if hosts else None
            self._cors = access.check_origin(self.headers.get("Origin"), host)
            matches = [(route, params) for route in ROUTES if (params := route.match(path)) is not None]
            if self.command == "OPTIONS" and matches:  # needs no key: browsers send none with a preflight
                self._preflight([route.method for route, _ in matches], host)
                return
            if all(route.auth for route, _ in matches):
                access.authorize(self.headers.get("Authorization"))
            found = next(((route, params) for route, params in matches if route.method == self.command), None)
            if found is None:
                raise ApiError(
                    405 if matches else 404,
                    f"{self.command} {path} is not {'allowed' if matches else 'an endpoint of this server'}; "
                    f"endpoints: {ENDPOINTS}",
                )
            route, params = found
            if not self._body_pending:
                self._request_in()
            route.endpoint(self, **params)
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
        except Exception:  # the details go to the log, not to the client
            log.exception("%s %s failed", self.command, path)
            self.close_connection = True
            if not self._responded:
                with contextlib.suppress(OSError):
                    self._send_error(
                        ApiError(500, "internal error; the server's log has the details", type="server_error")
                    )

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    # ------------------------------------------------------------------ endpoints

    def _health(self) -> None:
        queued = self.app.stats()["server"]["queued"]
        self._send_json(200, {"status": "ok", "model": self.app.model_name, "queued": queued})

    def _stats(self) -> None:
        self._send_json(200, self.app.stats())

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [model_object(self.app.model_name, self.app.created)]})

    def _model(self, id: str) -> None:
        if id != self.app.model_name:
            raise ApiError(
                404,
                f"the model {id!r} does not exist; this server has {self.app.model_name!r}",
                param="model",
                code="model_not_found",
            )
        self._send_json(200, model_object(self.app.model_name, self.app.created))

    def _chat_completions(self) -> None:
        self._completion(chat=True)

    def _completions(self) -> None:
        self._completion(chat=False)

    # ------------------------------------------------------------------ completions

    def _completion(self, *, chat: bool) -> None:
        body = self._read_body()
        app = self.app
        req = parse_request(body, chat=chat, max_tokens_limit=app.max_tokens_limit, defaults=app.sampling)
        job = app.worker.submit(req)
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
            app.worker.withdraw(job, disconnected=gone)

    def _next_event(self, job: Job) -> Event:
        """The worker's next event for `job`; raises _ClientGone when the client closes meanwhile."""
        while True:
            try:
                return job.events.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self._client_gone():
                    raise _ClientGone() from None

    def _answer(self, job: Job) -> None:
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
        answer = Answer(chat=job.req.chat, model=self.app.model_name)
        self._send_json(200, answer.whole("".join(pieces), finish, prompt_tokens, completion_tokens))

    def _write_chunk(self, data: bytes) -> None:
        if self._chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)

    def _event(self, payload: dict[str, Any] | str) -> None:
        """One server-sent event: ``data: JSON``."""
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self._write_chunk(b"data: " + text.encode() + b"\n\n")

    def _stream(self, job: Job) -> None:
        req = job.req
        kind, value = self._next_event(job)
        if kind == "error":
            raise value  # before any byte of the answer: a plain JSON error
        prompt_tokens = value
        answer = Answer(chat=req.chat, model=self.app.model_name)
        self._chunked = self.request_version == "HTTP/1.1"
        if not self._chunked:
            self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        for k, v in self._cors.items():
            self.send_header(k, v)
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            if (first := answer.first_chunk()) is not None:
                self._event(first)
            while True:
                kind, value = self._next_event(job)
                if kind == "piece":
                    self._event(answer.piece_chunk(value))
                elif kind == "end":
                    finish, completion_tokens = value
                    self._event(answer.last_chunk(finish))
                    if req.include_usage:
                        self._event(answer.usage_chunk(prompt_tokens, completion_tokens))
                    break
                elif kind == "error":  # after the headers: an error event, then the end of the stream
                    self._count_error(value.status)
                    self._event(value.body())
                    break
            self._event("[DONE]")
            if self._chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise _ClientGone() from None


# ---------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """One endpoint. A path ending in ``{name}`` matches any non-empty rest, passed to the endpoint as `name`."""

    method: str
    path: str
    endpoint: Callable[..., None]
    auth: bool = True  # needs the API key when the server has one

    def match(self, path: str) -> dict[str, str] | None:
        """The path's parameters when `path` is this route's, else None."""
        prefix, brace, name = self.path.partition("{")
        if not brace:
            return {} if path == self.path else None
        if path.startswith(prefix) and len(path) > len(prefix):
            return {name.rstrip("}"): path[len(prefix) :]}
        return None


ROUTES = (
    Route("POST", "/v1/chat/completions", _Handler._chat_completions),
    Route("POST", "/v1/completions", _Handler._completions),
    Route("GET", "/v1/models", _Handler._models),
    Route("GET", "/v1/models/{id}", _Handler._model),
    Route("GET", "/health", _Handler._health, auth=False),
    Route("GET", "/stats", _Handler._stats),
)
ENDPOINTS = ", ".join(f"{route.method} {route.path}" for route in ROUTES)
