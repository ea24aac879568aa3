"""Who may talk to the server: the Host header, web pages (Origin, CORS) and the API key.

Pure checks of request headers against the server's settings; they raise
`ApiError`. The threats they answer:

- DNS rebinding: a web page on attacker.example whose name then resolves to
  127.0.0.1 reaches a server on this machine with ``Host: attacker.example``.
  A request is answered only when its Host names the address the server is
  bound to, a form of localhost, an IP address (a browser sends one only when
  it connected to that address: no DNS name was rebound) or a name allowed
  with ``--allowed-host``.
- Other web pages: a browser adds ``Origin`` to cross-origin requests. One
  from an origin not allowed with ``--cors-origin`` is refused (403), and
  CORS preflights are answered for the allowed origins only. A page can send a
  cross-origin POST without a preflight only as text/plain, form or multipart
  data: the server takes ``application/json`` only (that check is in `http`).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from .protocol import ApiError

ANY = "*"
_CORS_MAX_AGE = 600  # seconds a browser may cache a preflight's answer


def host_name(value: str) -> str | None:
    """The host of a Host header value (``name``, ``name:port``, ``[v6]:port``), lower case without a
    trailing dot; None when it is malformed."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        name, rest = v[1:end], v[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return name
    name, colon, port = v.partition(":")
    if not name or (colon and not port.isdigit()):
        return None
    return name.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Access:
    """The server's rules. `allowed_hosts`: Host names answered besides the bound address, localhost
    forms and IP addresses (``"*"``: any). `cors_origins`: web origins (``scheme://host[:port]``) whose
    pages may call the server (``"*"``: any). `api_key`: required as ``Authorization: Bearer KEY`` on the
    routes that ask for it."""

    bound_host: str = "127.0.0.1"
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    cors_origins: frozenset[str] = field(default_factory=frozenset)
    api_key: str | None = None

    @classmethod
    def make(
        cls,
        bound_host: str,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
        api_key: str | None = None,
    ) -> Access:
        hosts = set()
        for h in allowed_hosts:
            name = h if h == ANY else host_name(h)
            if not name:
                raise ValueError(f"allowed host {h!r} is not a host name; hint: give a name such as example.com")
            hosts.add(name)
        origins = set()
        for o in cors_origins:
            if o != ANY and not (o.startswith(("http://", "https://")) and len(o.split("/")) == 3):
                raise ValueError(
                    f"CORS origin {o!r} is not an origin; hint: give scheme://host[:port], e.g. http://localhost:3000"
                )
            origins.add(o.lower())
        return cls(host_name(bound_host) or bound_host, frozenset(hosts), frozenset(origins), api_key or None)

    # ------------------------------------------------------------------ Host

    def check_host(self, values: list[str], *, required: bool) -> None:
        """`values`: the request's Host headers. `required`: HTTP/1.1, where one must be there."""
        if len(values) > 1:
            raise ApiError(400, "the request has more than one Host header")
        if not values:
            if required:
                raise ApiError(400, "an HTTP/1.1 request needs a Host header")
            return
        name = host_name(values[0])
        if name is None:
            raise ApiError(400, f"the Host header {values[0]!r} is malformed")
        if (
            ANY in self.allowed_hosts
            or name in self.allowed_hosts
            or name == self.bound_host
            or name == "localhost"
            or name.endswith(".localhost")
            or _is_ip(name)
        ):
            return
        raise ApiError(
            403,
            f"this server does not answer to the host name {name!r} (a defence against DNS rebinding); "
            f"hint: use its address, or start it with --allowed-host {name}",
            code="host_not_allowed",
        )

    # ------------------------------------------------------------------ web pages

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """A page of `origin` may call the server: the same origin as the request's Host, or allowed."""
        o = origin.lower()
        return ANY in self.cors_origins or o in self.cors_origins or (host is not None and o == f"http://{host}")

    def check_origin(self, origin: str | None, host: str | None) -> dict[str, str]:
        """The CORS headers of the answer to a request with this Origin (none without one); 403 when
        the origin is not allowed."""
        if origin is None:
            return {}
        if not self.origin_allowed(origin, host):
            raise ApiError(
                403,
                f"requests from web pages of {origin!r} are not allowed; "
                f"hint: start the server with --cors-origin {origin} to allow them",
                code="origin_not_allowed",
            )
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def preflight(
        self, origin: str | None, host: str | None, methods: list[str], headers: str | None
    ) -> dict[str, str]:
        """The headers answering an OPTIONS request to a path served with `methods`."""
        allow = ", ".join([*methods, "OPTIONS"])
        out = {"Allow": allow, **self.check_origin(origin, host)}
        if origin is not None:
            out.update(
                {
                    "Access-Control-Allow-Methods": allow,
                    "Access-Control-Allow-Headers": headers or "Authorization, Content-Type",
                    "Access-Control-Max-Age": str(_CORS_MAX_AGE),
                }
            )
        return out

    # ------------------------------------------------------------------ the API key

    def authorize(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(
                401,
                "a valid API key is required: send 'Authorization: Bearer KEY'",
                type="invalid_request_error",
                code="invalid_api_key",
            )
