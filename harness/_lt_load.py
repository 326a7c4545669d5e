"""The load phase: writers for ``duration`` seconds (or until Ctrl-C) with readers alongside.

Embedded, writers and readers are tasks of this process on the memory backends; on the real servers
they are worker processes (``harness/_procs.py``), started together by a signal once all are connected,
so no process's connection set-up counts against its share of the time.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from ._history import HistoryWriter
from ._lt_backends import Env
from ._lt_config import LoadConfig
from ._lt_fleet import finish, worker_processes
from ._strategies import STRATEGIES, Tally
from ._workload import Lane, RootPicker, Stopper, read_loop, task_picker, write_loop

__all__ = ("Progress", "load", "picker")


async def load(env: Env, name: str, out: Path, interrupt: Stopper) -> tuple[Tally, float]:
    """Run writers for ``duration`` (or until interrupted) with readers alongside; (tally, write seconds)."""
    if env.config.embedded:
        return await _load_embedded(env, name, out, interrupt)
    return await _load_processes(env, name, out, interrupt)


def picker(config: LoadConfig, role: str, task: int) -> RootPicker:
    """Task ``task``'s root picker: the same sequence of roots for every strategy of one seed."""
    return task_picker(
        roots=config.roots, dist=config.dist, zipf_s=config.zipf_s, seed=config.seed, role=role, task=task
    )


async def _load_embedded(env: Env, name: str, out: Path, interrupt: Stopper) -> tuple[Tally, float]:
    config, tally = env.config, Tally()
    writers_stop, readers_stop = Stopper(), Stopper()
    with HistoryWriter(out / "embedded.jsonl") as history:
        async with anyio.create_task_group() as readers:
            for i in range(config.readers):
                lane = Lane(
                    f"reader-{i}", i, picker(config, "reader", i), history, readers_stop, config.read_rate
                )
                readers.start_soon(read_loop, lane, env.cache)
            started = time.monotonic()
            async with anyio.create_task_group() as writers:
                for i in range(config.writers):
                    lane = Lane(
                        f"writer-{i}", i, picker(config, "writer", i), history, writers_stop, config.rate,
                        children=config.children,
                    )  # fmt: skip
                    writers.start_soon(write_loop, lane, env.store, env.cache, STRATEGIES[name], tally)
                await Progress(name, config, lambda: tally.updates).run(interrupt)
                writers_stop.stop()
            seconds = time.monotonic() - started
            readers_stop.stop()
    return tally, seconds


async def _load_processes(env: Env, name: str, out: Path, interrupt: Stopper) -> tuple[Tally, float]:
    """Writer and reader processes on the real servers; (summed writer tally, write seconds)."""
    async with worker_processes(env, name, out) as (writers, readers):
        started = time.monotonic()
        for child in (*writers, *readers):
            child.signal(signal.SIGUSR1)
        progress = Progress(name, env.config, lambda: sum(w.tally.updates for w in writers))
        await progress.run(interrupt)
        await finish(writers, interrupt.event)
        seconds = time.monotonic() - started
        for reader in readers:
            reader.signal(signal.SIGTERM)
        await finish(readers, interrupt.event)
    total = Tally()
    for writer in writers:
        total.add(writer.tally)
    return total, seconds


class Progress:
    """Waits out the write phase (``duration`` or an interrupt) behind a tqdm bar of updates so far."""

    def __init__(self, name: str, config: LoadConfig, updates: Callable[[], int]) -> None:
        self._name = name
        self._duration = config.duration
        self._enabled = config.progress
        self._updates = updates

    async def run(self, interrupt: Stopper) -> None:
        bar = self._bar()
        start = time.monotonic()
        deadline = start + self._duration
        try:
            while not interrupt.stopped and (left := deadline - time.monotonic()) > 0:
                with anyio.move_on_after(min(0.5, left)):
                    await interrupt.event.wait()
                if bar is not None:
                    elapsed = time.monotonic() - start
                    updates = self._updates()
                    bar.n = min(elapsed, self._duration)
                    bar.set_postfix_str(f"{updates} updates, {updates / elapsed:.0f}/s")
        finally:
            if bar is not None:
                bar.close()

    def _bar(self) -> Any:
        """A tqdm bar, or None with --no-progress or without tqdm (the bar is a nicety, not a need)."""
        if not self._enabled:
            return None
        try:
            from tqdm import tqdm  # noqa: PLC0415  (optional: the 'loadtest' extra)
        except ModuleNotFoundError:
            return None
        fmt = "{desc}: {bar} {n:.0f}/{total:.0f}s{postfix}"
        return tqdm(total=self._duration, desc=self._name, bar_format=fmt)
