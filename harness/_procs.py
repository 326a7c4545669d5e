"""Load-test worker processes: ``python -m graphcache.harness._procs writer|reader [options]``.

The load test (``harness/_lt_fleet.py``) starts these in their own sessions and speaks to them with
signals and stdout lines, so no process needs a thread blocked on stdin:

  child  -> "ready"            connected to the servers, waiting for the start signal
  parent -> SIGUSR1            go: run for ``--duration`` seconds
  parent -> SIGTERM / SIGINT   stop now (before or during the run)
  child  -> "progress {json}"  the process's running tally, every half second
  child  -> "done {json}"      the final tally; the history file is complete

Each process runs many tasks (``--tasks``) and writes one history file (``--history``). With
``--graph-plan`` (a ``loadtest --graph`` run) writers update the spec's tables with plain SQL and both
roles pick among the plan's sampled roots.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import NamedTuple

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from ..cache import RedisCache, VersionedCache
from ..storage import GraphSpec, GraphStore, PostgresStore
from ._history import HistoryWriter
from ._lt_graph import GraphRun, TableWrites, loader_statement, read_plan, writer_pool
from ._strategies import NAMES, STRATEGIES, Tally
from ._workload import DEFAULT_CHILDREN, Commit, Lane, Stopper, read_loop, task_picker, write_loop

__all__ = ("Child", "open_cache", "open_store", "spawn", "worker_argv")

logger = logging.getLogger(__name__)
PROGRESS_INTERVAL = 0.5


@contextlib.asynccontextmanager
async def open_store(dsn: str, schema: str, *, graph: GraphSpec | None = None) -> AsyncIterator[GraphStore]:
    store: GraphStore = await PostgresStore.connect(dsn, schema=schema, graph=graph)
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()


@contextlib.asynccontextmanager
async def open_cache(url: str, namespace: str) -> AsyncIterator[VersionedCache]:
    cache: VersionedCache = RedisCache.from_url(url, namespace=namespace)
    try:
        yield cache
    finally:
        with anyio.CancelScope(shield=True):
            await cache.aclose()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=("writer", "reader"))
    parser.add_argument("--redis", required=True)
    parser.add_argument("--postgres", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--strategy", choices=NAMES, default="none")
    parser.add_argument("--first", type=int, default=0, help="number of this process's first task")
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--roots", type=int, required=True)
    parser.add_argument("--children", type=int, default=DEFAULT_CHILDREN)
    parser.add_argument("--dist", choices=("uniform", "zipf"), default="zipf")
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="operations/s per task (0: as fast as possible)"
    )
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--history", required=True)
    parser.add_argument(
        "--graph-plan", help="a --graph run's plan (harness/_lt_graph.py): write to the spec's tables"
    )


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _await_go(signals: AsyncIterator[int]) -> bool:
    async for signum in signals:
        return signum == signal.SIGUSR1
    return False


async def _stop_on_signal_or_deadline(signals: AsyncIterator[int], stopper: Stopper, duration: float) -> None:
    with anyio.move_on_after(duration):
        async for _ in signals:
            break
    stopper.stop()


async def _report_progress(tally: Tally) -> None:
    while True:
        await anyio.sleep(PROGRESS_INTERVAL)
        _say("progress " + json.dumps(tally.as_dict()))


class _Connections(NamedTuple):
    store: GraphStore | None  # writers only
    cache: VersionedCache
    commit: Commit | None  # a --graph run's writes (plain SQL on the spec's tables)


@contextlib.asynccontextmanager
async def _connections(
    args: argparse.Namespace, plan: GraphRun | None, tally: Tally
) -> AsyncIterator[_Connections]:
    async with contextlib.AsyncExitStack() as stack:
        cache = await stack.enter_async_context(open_cache(args.redis, args.namespace))
        store, commit = None, None
        if args.role == "writer":
            spec = None if plan is None else plan.workload.spec
            store = await stack.enter_async_context(open_store(args.postgres, args.schema, graph=spec))
            if plan is not None:
                pool = await stack.enter_async_context(writer_pool(args.postgres))
                commit = TableWrites(pool, plan, loader_statement(store), seed=args.seed, tally=tally)
        yield _Connections(store, cache, commit)


async def _work(args: argparse.Namespace, connections: _Connections, lanes: list[Lane], tally: Tally) -> None:
    store, cache, commit = connections
    async with anyio.create_task_group() as tg:
        for lane in lanes:
            if store is None:
                tg.start_soon(read_loop, lane, cache)
            else:
                loop = functools.partial(write_loop, commit=commit)
                tg.start_soon(loop, lane, store, cache, STRATEGIES[args.strategy], tally)


def _lanes(
    args: argparse.Namespace, plan: GraphRun | None, history: HistoryWriter, stopper: Stopper
) -> list[Lane]:
    ids = () if plan is None else plan.workload.roots
    return [
        Lane(
            f"{args.role}-{task}",
            task,
            task_picker(
                roots=args.roots,
                dist=args.dist,
                zipf_s=args.zipf_s,
                seed=args.seed,
                role=args.role,
                task=task,
                ids=ids,
            ),
            history,
            stopper,
            args.rate,
            children=args.children,
        )
        for task in range(args.first, args.first + args.tasks)
    ]


class Child:
    """The parent's handle on one worker process: its "ready", progress and "done" lines, and signals.

    ``pump`` must run (in a task) for the events to fire. At end of output (a crash included) both
    events are set, so nobody waits forever; ``returncode`` then says how it ended.
    """

    def __init__(self, name: str, process: anyio.abc.Process, *, ready_marker: str = "ready") -> None:
        self.name = name
        self.process = process
        self.ready_marker = ready_marker
        self.ready_line = ""
        self.ready = anyio.Event()
        self.done = anyio.Event()
        self.tally = Tally()
        self.finished = False

    def __repr__(self) -> str:
        state = "done" if self.done.is_set() else "ready" if self.ready.is_set() else "starting"
        return f"<Child {self.name} pid={self.process.pid} {state} updates={self.tally.updates}>"

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def pump(self) -> None:
        assert self.process.stdout is not None
        lines = BufferedByteReceiveStream(self.process.stdout)
        try:
            while True:
                self._line(await lines.receive_until(b"\n", 1 << 20))
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            pass  # the process closed its stdout: it ended (or crashed)
        except anyio.get_cancelled_exc_class():
            # Only the parent stopped listening: the process runs on, and "done" must stay unset so that
            # stop() still signals it (rather than waiting out its grace period before a SIGKILL).
            raise
        except BaseException:
            self._ended()
            raise
        self._ended()

    def _ended(self) -> None:
        self.ready.set()
        self.done.set()

    def _line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip()
        word, _, payload = text.partition(" ")
        if word in ("progress", "done"):
            self.tally = Tally(**json.loads(payload))
            if word == "done":
                self.finished = True
                self.done.set()
        elif not self.ready.is_set() and self.ready_marker in text:
            self.ready_line = text
            self.ready.set()
        else:
            logger.info("%s: %s", self.name, text)

    def signal(self, signum: int) -> None:
        """Signal a child that has not closed its output yet: one that has is exiting by itself, and
        signalling it would reap it behind asyncio's back (``Popen.send_signal`` polls first)."""
        if not self.done.is_set() and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.Signals(signum))

    async def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM (unless it is already ending), SIGKILL after ``grace`` seconds; waits for the exit."""
        self.signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            await self.process.wait()
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        with anyio.CancelScope(shield=True):
            await self.process.aclose()


async def spawn(
    name: str, argv: Sequence[str], *, log: Path, cwd: Path | None = None, ready_marker: str = "ready"
) -> Child:
    """Start ``argv`` in its own session (a terminal's Ctrl-C reaches only the parent), stderr to ``log``."""
    with log.open("ab") as stderr:
        process = await anyio.open_process(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
    return Child(name, process, ready_marker=ready_marker)


def worker_argv(role: str, options: dict[str, object]) -> list[str]:
    """The command line of one worker process (``options``: long option name -> value)."""
    argv = [sys.executable, "-m", "graphcache.harness._procs", role]
    for option, value in options.items():
        argv += [f"--{option.replace('_', '-')}", str(value)]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphcache.harness._procs", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{args.role} %(levelname)s %(name)s: %(message)s")
    code: int = anyio.run(_main, args)
    return code


async def _main(args: argparse.Namespace) -> int:
    tally = Tally()
    stopper = Stopper()
    plan = None if args.graph_plan is None else read_plan(args.graph_plan)
    with (
        anyio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT) as signals,
        HistoryWriter(args.history) as history,
    ):
        async with _connections(args, plan, tally) as connections:
            _say("ready")
            if await _await_go(signals):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_stop_on_signal_or_deadline, signals, stopper, args.duration)
                    tg.start_soon(_report_progress, tally)
                    await _work(args, connections, _lanes(args, plan, history, stopper), tally)
                    tg.cancel_scope.cancel()
    _say("done " + json.dumps(tally.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
