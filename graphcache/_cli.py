"""graphcache's command line: demo | serve | loadtest | check | bench (``python -m graphcache``).

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``;
this module only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "graphcache.harness._demo",
        "a naive re-cache vs graphcache side by side (embedded, no servers needed)",
    ),
    "serve": (
        "graphcache.sidecar._serve",
        "the sidecar: one node with Prometheus /metrics, /healthz and /readyz",
    ),
    "loadtest": (
        "graphcache.harness._loadtest",
        "load test in separate processes, strategies side by side, checked",
    ),
    "check": (
        "graphcache.harness._check_cli",
        "run the consistency checker on a recorded history (JSON lines)",
    ),
    "bench": ("graphcache.harness._bench", "micro-benchmarks against raw redis-py / asyncpg in the same run"),
}


_EXTRAS = {"prometheus_client": "sidecar", "tqdm": "loadtest"}
"""Optional dependencies, by module, and the extra that installs each."""


def _missing_extra(sub: Any, name: str, help_text: str, extra: str) -> None:
    """A subcommand whose optional dependencies are not installed: it says how to install them."""
    cmd = sub.add_parser(name, help=f"{help_text} (needs: pip install 'graphcache-pg[{extra}]')")
    cmd.add_argument("rest", nargs=argparse.REMAINDER)
    message = f"graphcache {name} needs the {extra!r} extra: pip install 'graphcache-pg[{extra}]'"
    cmd.set_defaults(_missing=message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphcache",
        description="graphcache: cached object graphs that stay correct under concurrency and faults.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            extra = _EXTRAS.get(exc.name or "")
            if extra is None:
                raise
            _missing_extra(sub, name, help_text, extra)
            continue
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
    missing = getattr(args, "_missing", None)
    if missing is not None:
        sys.stderr.write(f"{missing}\n")
        return 2
    code: int = args._module.run(args)
    return code
