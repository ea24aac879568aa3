"""`pymoe serve`: an OpenAI-compatible HTTP API for a model.

POST /v1/chat/completions and /v1/completions (streamed with server-sent
events when "stream" is true), GET /v1/models, /health and /stats (counters of
generation, the expert cache and the server). One llama.cpp context answers one
request at a time: requests wait in a bounded queue, in arrival order, and a
full queue answers 429. Binds to 127.0.0.1 unless --host says otherwise; with
an API key (PYMOE_API_KEY, --api-key-file or --api-key) every endpoint but
/health needs "Authorization: Bearer KEY". Requests are answered only for the
bound address, localhost and IP addresses in the Host header (--allowed-host
adds names), and web pages of other origins only with --cors-origin.
Ctrl-C stops the server."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from types import FrameType

from ._args import CliError, add_model_args, add_sampling_args, load_model, sampling_from_args
from .server import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_TOKENS_LIMIT,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TIMEOUT,
    Access,
    Server,
)

API_KEY_ENV = "PYMOE_API_KEY"


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe serve")
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_args(parser)
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    s.add_argument(
        "--port", type=int, default=8080, help="TCP port; 0 picks a free one and prints it (default: %(default)s)"
    )
    key = s.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key-file",
        metavar="FILE",
        help=f"require 'Authorization: Bearer KEY' on every request but /health, KEY being FILE's content "
        f"(default: ${API_KEY_ENV}; none)",
    )
    key.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"the same with KEY given here, where other users of this machine see it in `ps`: prefer "
        f"--api-key-file or ${API_KEY_ENV}",
    )
    s.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (repeatable; '*': any). Without it only the "
        "--host address, localhost and IP addresses are answered: a defence against DNS rebinding",
    )
    s.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages of ORIGIN (scheme://host[:port]) call the server (repeatable; '*': any); "
        "requests from pages of other origins get 403 (default: none)",
    )
    s.add_argument("--model-name", metavar="NAME", help="the model id in /v1/models and answers (default: file stem)")
    s.add_argument(
        "--max-tokens-limit",
        type=int,
        default=DEFAULT_MAX_TOKENS_LIMIT,
        metavar="N",
        help="the largest max_tokens a request may ask for, and the default when it gives none; an answer "
        "also stops at the end of the context (default: %(default)s)",
    )
    s.add_argument(
        "--queue-size",
        type=int,
        default=DEFAULT_QUEUE_SIZE,
        metavar="N",
        help="requests that may wait behind the one being answered; more get 429 (default: %(default)s)",
    )
    s.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help="largest request body; larger ones get 413 (default: %(default)s)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open connections at most (one thread each); one more replaces the connection that has waited "
        "longest for its request, or gets 503 when all are answering (default: %(default)s)",
    )
    s.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="socket timeout for each write to a client, and each read once its request is in (default: %(default)s)",
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        metavar="SECONDS",
        help="time for a whole request to arrive, headers and body, counted from when the connection waits "
        "for it (default: %(default)s)",
    )
    add_sampling_args(parser)
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the content of --api-key-file, else $PYMOE_API_KEY; None: no key."""
    if args.api_key is not None:
        return str(args.api_key)
    if args.api_key_file is None:
        return os.environ.get(API_KEY_ENV) or None
    try:
        with open(args.api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read the API key file {args.api_key_file}: {getattr(e, 'strerror', None) or e}") from e
    if not key or "\n" in key:
        what = "nothing" if not key else "several lines"
        raise CliError(f"the API key file {args.api_key_file} must hold one line, the key; it holds {what}")
    return key


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be in [0, 65535], got {args.port}")
    for flag, value, low in (
        ("--max-tokens-limit", args.max_tokens_limit, 1),
        ("--queue-size", args.queue_size, 0),
        ("--max-request-bytes", args.max_request_bytes, 1024),
        ("--max-connections", args.max_connections, 1),
    ):
        if value < low:
            raise CliError(f"{flag} must be >= {low}, got {value}")
    for flag, seconds in (("--timeout", args.timeout), ("--request-timeout", args.request_timeout)):
        if not seconds > 0:
            raise CliError(f"{flag} must be > 0, got {seconds}")
    try:  # before the model loads
        Access.make(args.host, args.allowed_host, args.cors_origin)
    except ValueError as e:
        raise CliError(str(e)) from e
    api_key = resolve_api_key(args)
    sampling = sampling_from_args(args)
    # the server's log on stderr: warnings and the stats at shutdown; --verbose adds the access log
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger("pymoe").addHandler(handler)
    logging.getLogger("pymoe").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    with load_model(args) as model:
        try:
            server = Server(
                model,
                host=args.host,
                port=args.port,
                model_name=args.model_name,
                api_key=api_key,
                max_request_bytes=args.max_request_bytes,
                max_tokens_limit=args.max_tokens_limit,
                queue_size=args.queue_size,
                timeout=args.timeout,
                request_timeout=args.request_timeout,
                max_connections=args.max_connections,
                sampling=sampling,
                allowed_hosts=args.allowed_host,
                cors_origins=args.cors_origin,
            )
        except OSError as e:
            raise CliError(
                f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; "
                "hint: pick another --port (0: any free one) or --host"
            ) from e
        if not api_key and not _is_loopback(args.host):
            print(
                f"pymoe serve: warning: listening on {args.host} without an API key: anyone who can reach this "
                f"port can use the model; hint: set {API_KEY_ENV} or pass --api-key-file",
                file=sys.stderr,
            )
        print(
            f"pymoe serve: {server.model_name} on {server.url}/v1 (context {model.n_ctx} tokens; one request at a "
            f"time, {args.queue_size} may wait; Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            server.close()
        print("pymoe serve: stopped", file=sys.stderr)
    return 0
