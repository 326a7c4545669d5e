"""The load test's configuration: what defines a run, the option types only it has, the cross-flag checks.

Every flag is checked as it is parsed (the types here and in ``graphcache._cli``); `config_from_args`
adds the checks that need several flags. Either way a bad flag is one line and exit 2 before anything
runs. Reports carry the config with every URL password masked.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import msgspec

from .._cli import UsageError, number, redact
from ..actors import DEFAULT_MIN_REBUILD_INTERVAL
from ..storage import GraphSpec, SpecError
from ._lt_graph import GraphWorkload
from ._strategies import NAMES
from ._workload import DEFAULT_CHILDREN, Dist

__all__ = (
    "LoadConfig",
    "config_from_args",
    "fresh_out_directory",
    "ring_sizes",
    "shown",
    "strategy_list",
    "zipf_exponent",
)


DEFAULT_FEED_INTERVAL = 0.01
"""``graphcache serve --feed-interval``'s default, passed to every sidecar of a run."""


class LoadConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that defines a run; the same config and seed give every strategy the same workload."""

    roots: int = 8
    children: int = DEFAULT_CHILDREN
    dist: Dist = "zipf"
    zipf_s: float = 1.1
    writers: int = 64
    writer_procs: int = 2
    readers: int = 8
    reader_procs: int = 1
    read_rate: float = 50.0
    rate: float = 0.0
    duration: float = 10.0
    settle: float = 10.0
    seed: int = 1
    nodes: int = 2
    min_rebuild_interval: float = DEFAULT_MIN_REBUILD_INTERVAL
    feed_interval: float = DEFAULT_FEED_INTERVAL
    latency: tuple[float, float] = (0.0005, 0.002)
    load_latency: float = 0.005
    redis: str | None = None
    postgres: str | None = None
    progress: bool = True
    rounds: int = 1
    graph: GraphWorkload | None = None  # --graph: the service's own tables (real servers only)

    @property
    def embedded(self) -> bool:
        return self.redis is None


def strategy_list(text: str) -> tuple[str, ...]:
    """``--strategy cas,actor``: known names, each once, in the order given."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"want a comma list of distinct strategies from {', '.join(NAMES)}; got {text!r}"
        )
    return names


def ring_sizes(text: str) -> tuple[int, ...]:
    """``--simulate-ring 3,10,100``: node counts, each 2 or more."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"want a comma list of node counts >= 2, got {text!r}")
    return sizes


MAX_ZIPF_S = 10.0
"""The steepest root popularity: beyond it rank ** s overflows a float for any realistic root count."""


def zipf_exponent(text: str) -> float:
    """``--zipf-s``: a positive number up to `MAX_ZIPF_S`."""
    value = number(text)
    if value > MAX_ZIPF_S:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_ZIPF_S:g}, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """The run's config; `UsageError` for flags that do not fit together, before anything starts."""
    graph = None
    if args.graph is not None:
        if args.redis is None or args.postgres is None:
            raise UsageError("--graph runs on the real servers only: give --redis URL and --postgres DSN")
        graph = _graph_workload(args.graph)
    if (args.redis is None) != (args.postgres is None):
        raise UsageError("--redis and --postgres go together (or neither, for the embedded run)")
    low, high = args.latency
    if low > high:
        raise UsageError(f"--latency MIN MAX: MIN ({low:g}) must not exceed MAX ({high:g})")
    return LoadConfig(
        roots=args.roots, children=args.children, dist=args.dist, zipf_s=args.zipf_s, writers=args.writers,
        writer_procs=min(args.writer_procs, args.writers), readers=args.readers,
        reader_procs=max(1, min(args.reader_procs, args.readers)), read_rate=args.read_rate, rate=args.rate,
        duration=args.duration, settle=args.settle, seed=args.seed, nodes=args.nodes,
        min_rebuild_interval=args.min_rebuild_interval, feed_interval=args.feed_interval,
        latency=(low, high), load_latency=args.load_latency, redis=args.redis, postgres=args.postgres,
        progress=not args.no_progress, rounds=args.rounds, graph=graph,
    )  # fmt: skip


def _graph_workload(path: str) -> GraphWorkload:
    """``--graph SPEC``: the spec file read and checked (what the file alone can show), as bad input."""
    try:
        spec = GraphSpec.from_toml(path)
    except SpecError as exc:
        raise UsageError(str(exc)) from exc
    return GraphWorkload(path=str(Path(path).resolve()), spec=spec)


def shown(config: LoadConfig) -> LoadConfig:
    """``config`` with the servers' passwords masked: reports are files people share."""
    return msgspec.structs.replace(
        config,
        redis=None if config.redis is None else redact(config.redis),
        postgres=None if config.postgres is None else redact(config.postgres),
    )


def fresh_out_directory(parent: Path) -> Path:
    """A new ``loadtest-YYYYmmdd-HHMMSS`` folder in ``parent`` (``-2``, ``-3``... if that one exists)."""
    stamp = time.strftime("loadtest-%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        path = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        return path
    raise UsageError(f"--out: no free name like {stamp} in {parent}")
