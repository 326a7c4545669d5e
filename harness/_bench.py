"""Micro-benchmarks, each against the raw client library in the same run.

bench cache   put_if_newer (plain, leased) vs raw SET, get vs raw GET/HGET (redis-py), same Redis
bench store   apply vs the same transaction in raw asyncpg, load of a 50-node graph, feed latency
bench sidecar GET /v1/graphs/ID through graphcache serve vs raw HGET + msgpack decode, p50/p99 latency
"""

from __future__ import annotations

import argparse
import importlib

_TARGETS = {
    "cache": "graphcache.harness._bench_cache",
    "store": "graphcache.harness._bench_store",
    "sidecar": "graphcache.harness._bench_sidecar",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, module_name in _TARGETS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(
            name, help=(module.__doc__ or "").strip().splitlines()[0], description=module.__doc__
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_bench=module, _prog=cmd.prog)  # failures name "graphcache bench cache"


def run(args: argparse.Namespace) -> int:
    code: int = args._bench.run(args)
    return code
