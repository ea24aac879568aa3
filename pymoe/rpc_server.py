"""`pymoe rpc-server`: this build's CPU backend as a ggml RPC device.

A model loaded with `--rpc HOST:PORT` puts its layers and its expert slots on
such a device as it would on a GPU: the device's memory is reachable only
through ggml's backend API, over the network. It is how pymoe's GPU tier is
tested without a GPU (on loopback), and how a model that outgrows one machine
spreads over several (docs/design.md, "The GPU tier"). A stock llama.cpp
`rpc-server` cannot serve pymoe: its CPU backend would index the engine's
negative expert ids out of bounds.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from . import _core


def setup_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 for every interface)",
    )
    parser.add_argument("--port", type=int, default=50052, help="TCP port (default: %(default)s)")
    parser.add_argument("-t", "--threads", type=int, default=0, metavar="N", help="CPU threads (default: all)")
    return parser


def main(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is out of range; hint: use 1-65535")
    if args.threads < 0:
        raise ValueError("--threads must be >= 0")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    where = "this machine only" if loopback else "the network: anyone who can reach it can run code on this CPU"
    print(f"pymoe rpc-server: serving the CPU backend on {args.host}:{args.port} ({where})", file=sys.stderr)
    print(
        f"pymoe rpc-server: use it with --rpc {args.host}:{args.port} (and -ngl 99); Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    _core.rpc_serve(args.host, args.port, args.threads)  # returns only when it cannot listen (raises)
    return 0
