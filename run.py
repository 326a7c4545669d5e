"""graphcache command line: demo | serve | loadtest | check | bench.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``;
this file only wires them together, so ``python run.py --help`` stays fast and the modules stay private.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("harness._demo", "a naive re-cache vs graphcache side by side (embedded, no servers needed)"),
    "serve": ("actors._sidecar", "the sidecar: one node with Prometheus /metrics and a health check"),
    "loadtest": ("harness._loadtest", "load test in separate processes, strategies side by side, checked"),
    "check": ("harness._check_cli", "run the consistency checker on a recorded history (JSON lines)"),
    "bench": ("harness._bench", "micro-benchmarks against raw redis-py / asyncpg in the same run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="graphcache: cached object graphs that stay correct under concurrency.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args._module.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
