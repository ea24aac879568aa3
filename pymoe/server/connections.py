"""Keeping the connection threads available: a bounded set of connections that replaces the one waiting
longest, a deadline for a whole request, and warnings at a rate.

A slowloris client opens connections and sends its requests a byte at a
time, to hold every connection thread. Here a request (its headers and body,
and the wait for it on an idle connection) must arrive within one deadline,
not one timeout per read; and when every connection is taken, a new one
replaces the connection that has waited longest for its request, so that
slow clients cannot lock others out while their deadlines run. Only when
every connection is answering a request is a new one refused."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
from collections import Counter
from typing import Any

LOG_INTERVAL = 10.0  # seconds between two warnings of one kind


class RateLog:
    """Warnings of one kind at most once per `LOG_INTERVAL` seconds; those held back are counted in the next."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held = Counter[str]()

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if kind in self._last and now - self._last[kind] < LOG_INTERVAL:
                self._held[kind] += 1
                return
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        self._log.warning("%s%s", message, f" (and {held} more since the last such line)" if held else "")


class Connections:
    """The open connections, at most `limit`: each waits for a request (since some time) or answers one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._waiting_since: dict[socket.socket, float | None] = {}  # None: answering a request

    def admit(self, sock: socket.socket) -> tuple[bool, bool]:
        """(admitted, another replaced). When all are taken, the one that has waited longest for its
        request is shut down (its thread then reads the end of the stream) to make room; when all are
        answering, `sock` is not admitted."""
        with self._lock:
            replaced = len(self._waiting_since) >= self.limit
            if replaced:
                waiting = [(since, s) for s, since in self._waiting_since.items() if since is not None]
                if not waiting:
                    return False, False
                _, oldest = min(waiting, key=lambda w: w[0])
                del self._waiting_since[oldest]
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)
            self._waiting_since[sock] = time.monotonic()
            return True, replaced

    def _set(self, sock: socket.socket, since: float | None) -> bool:
        with self._lock:
            if sock not in self._waiting_since:
                return False
            self._waiting_since[sock] = since
            return True

    def is_open(self, sock: socket.socket) -> bool:
        """False once `sock` was replaced."""
        with self._lock:
            return sock in self._waiting_since

    def waiting(self, sock: socket.socket) -> bool:
        """`sock` waits for its next request; False when it was replaced."""
        return self._set(sock, time.monotonic())

    def answering(self, sock: socket.socket) -> bool:
        """`sock`'s request is in: it is not replaced while answered; False when it was replaced."""
        return self._set(sock, None)

    def release(self, sock: socket.socket) -> None:
        """Forgets `sock`; call it before the socket is closed (`admit` shuts down only open ones)."""
        with self._lock:
            self._waiting_since.pop(sock, None)


class DeadlineReader(io.RawIOBase):
    """A socket's bytes, read within a deadline for a whole request rather than a timeout per read."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout  # per read and write, outside a request
        self.deadline: float | None = None
        self.expired = False
        self.received = 0  # bytes since `start`
        self.eof = False  # the peer closed its side since `start`

    def readable(self) -> bool:
        return True

    def start(self, seconds: float) -> None:
        """The next bytes are a request, due within `seconds`."""
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self.received = 0
        self.eof = False

    def stop(self) -> None:
        """The request is in: back to a timeout per read and write."""
        self.deadline = None
        self._sock.settimeout(self._timeout)

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.expired = True
                raise TimeoutError("the request did not arrive in time")
            self._sock.settimeout(left)
        try:
            n = self._sock.recv_into(buffer)
        except TimeoutError:
            self.expired = self.deadline is not None
            raise
        self.received += n
        self.eof = self.eof or (n == 0 and len(buffer) > 0)
        return n
