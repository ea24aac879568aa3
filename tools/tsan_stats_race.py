#!/usr/bin/env python3
"""Races between decoding and reading the engine's counters, for ThreadSanitizer.

One thread generates (with prefetching, so the loader thread runs too) while the
main thread polls `offload_stats()` every 10 ms, as `/stats` on a busy server
does. Run it with a ThreadSanitizer build of the extension (docs/fuzzing.md);
with `--rpc` the model and its expert slots are on an RPC device served by
`pymoe rpc-server` (started here), so background admission's uploads run too.

    python tools/tsan_stats_race.py MODEL.gguf [--rpc-port 50121 --server-python PY]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time

import pymoe


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the rpc-server exited") from None
            time.sleep(0.3)
    raise RuntimeError("the rpc-server did not start listening")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rpc-port", type=int, help="put the layers and slots on an RPC device on this port")
    ap.add_argument("--server-python", default=sys.executable, help="the Python that runs the rpc-server")
    ap.add_argument("--tokens", type=int, default=12)
    args = ap.parse_args()
    kw: dict = {"n_ctx": 256, "offload": "on", "expert_budget": 0.3, "prefetch": True, "n_threads": 2}
    server = None
    if args.rpc_port:
        cmd = [args.server_python, "-m", "pymoe", "rpc-server", "--port", str(args.rpc_port), "-t", "1"]
        server = subprocess.Popen(cmd, cwd="/")
        wait_listening(args.rpc_port, server)
        kw.update(rpc=(f"127.0.0.1:{args.rpc_port}",), n_gpu_layers=99)
    try:
        with pymoe.Model(args.model, **kw) as m:
            done = threading.Event()

            def work() -> None:
                try:
                    m.generate("Once upon a time", max_tokens=args.tokens, temperature=0)
                finally:
                    done.set()

            t = threading.Thread(target=work)
            t.start()
            polls = 0
            while not done.is_set():
                m.offload_stats()
                polls += 1
                time.sleep(0.01)
            t.join()
            print(f"{polls} polls of offload_stats() while decoding")
    finally:
        if server is not None:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
