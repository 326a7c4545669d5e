"""The consistency checker: G1 (no regression), G2 (no torn graph), G3 (convergence) and two lags.

It reads a history (see ``_history.py``) in one pass, grouping events per root, then judges each root:

  G1  a read that began after another read of the same root had ended must not return an older version.
      Reads that overlap in time may return versions in any order; absent reads carry no version.
  G2  a read stamped with version v must hash like the committed graph at v. The committed graphs are
      rebuilt by replaying each root's create and write-ok ``ops`` in version order, or taken from a
      write-ok ``hash`` recorded without ops (the whole graph as its writer's transaction left it); from
      the first version whose commit is unknown (a write with outcome "info"), reads are ``unjudged``.
  G3  the last read of a root that began after its ``final`` event must return the final version
      (absent counts apart: an invalidated key is allowed).
  visibility lag   from each write's ok to the first put of that version or newer that the cache
      acknowledged as stored ("rebuild" ok events): when the cache first held it. 0 when that put was
      acknowledged before the write's ok was recorded (the commit was cached before its writer heard
      back). Writes no put covered are ``invisible_commits``. Needs put acknowledgements in the history.
  read lag   from each write's ok to the end of the first read that began after it and saw that version
      or newer: what readers observed, so it includes their sampling delay (``lag_p50`` ...).

A read's interval runs from its "invoke" event to its completion, paired per (process, root); a process
should have one read per root in flight (if not, intervals are widened, see _pop_start).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import msgspec

from ..storage import Delete, Op, Upsert
from ._history import Event, HistoryError, rows_hash

__all__ = ("CheckReport", "Lags", "Violation", "check", "check_with_all_lags", "check_with_lags")

logger = logging.getLogger(__name__)

Kind = Literal["G1", "G2", "G3"]
VISIBILITY_THRESHOLDS: dict[str, float] = {"10ms": 0.010, "100ms": 0.100, "1s": 1.0}
_NO_INVOKE = -math.inf  # a completion without its invoke: never judged as having begun after anything


class Violation(msgspec.Struct, frozen=True):
    """One example of a broken guarantee, in words."""

    kind: Kind
    root: str
    detail: str


class CheckReport(msgspec.Struct):
    """What the checker found in one history. G1 = ``regressions``, G2 = ``torn``, G3 = ``stale``."""

    reads: int
    writes: int
    roots: int
    regressions: int
    torn: int
    unjudged: int
    stale: int
    absent_at_end: int
    lag_p50: float | None
    lag_p95: float | None
    lag_p99: float | None
    visible_within: dict[str, float]
    examples: list[Violation]
    absent_reads: int = 0  # reads that found no item: not versions, so outside G1 and G2
    unread_at_end: int = 0  # roots with a final event but no read after it: G3 not judged for them
    unseen_commits: int = 0  # writes no later read observed (counted as not visible in visible_within)
    # Visibility lag (seconds): a write's ok to the first stored put of its version or newer. lag_p50...
    # above are the read lag: a write's ok to the end of the first later read that saw it.
    visibility_lag_p50: float | None = None
    visibility_lag_p95: float | None = None
    visibility_lag_p99: float | None = None
    invisible_commits: int = 0  # writes no acknowledged put of their version or newer covered
    stored_puts: int = 0  # put acknowledgements ("rebuild" ok events) in the history

    @property
    def ok(self) -> bool:
        """True when G1, G2 and G3 all hold."""
        return self.regressions == 0 and self.torn == 0 and self.stale == 0


@dataclass(slots=True)
class _Read:
    """A read that found an item (a miss is kept as its interval only)."""

    process: str
    start: float
    end: float
    version: int
    hash: str | None


@dataclass(slots=True)
class _Miss:
    start: float
    end: float


@dataclass(slots=True)
class _Commit:
    ops: list[Any] | None
    hash: str | None


@dataclass(slots=True)
class _Root:
    reads: list[_Read] = field(default_factory=list)
    misses: list[_Miss] = field(default_factory=list)
    commits: dict[int, _Commit] = field(default_factory=dict)
    ambiguous: set[int] = field(default_factory=set)  # versions reported by two different commits
    writes: list[tuple[float, int]] = field(default_factory=list)  # (ok time, version)
    puts: list[tuple[float, int]] = field(default_factory=list)  # (acknowledged time, version stored)
    final: tuple[float, int] | None = None


@dataclass(slots=True)
class _Tally:
    max_examples: int
    t0: float
    regressions: int = 0
    torn: int = 0
    unjudged: int = 0
    stale: int = 0
    absent_at_end: int = 0
    unread_at_end: int = 0
    unseen_commits: int = 0
    invisible_commits: int = 0
    lags: list[float] = field(default_factory=list)
    visibility_lags: list[float] = field(default_factory=list)
    examples: list[Violation] = field(default_factory=list)
    _shown: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def wants(self, kind: Kind) -> bool:
        """Whether another example of ``kind`` would be kept (so costly details can be skipped)."""
        return self._shown[kind] < self.max_examples

    def example(self, kind: Kind, root: str, detail: str) -> None:
        if self.wants(kind):
            self._shown[kind] += 1
            self.examples.append(Violation(kind, root, detail))

    def at(self, t: float) -> str:
        return f"t=+{t - self.t0:.6f}s"


class Lags(NamedTuple):
    """Every lag measured (seconds), for charts: ``visibility`` (commit to stored put), ``read`` (commit to
    the first read that saw it)."""

    visibility: list[float]
    read: list[float]


def check(events: Iterable[Event], *, max_examples: int = 5) -> CheckReport:
    """Judge a history against G1, G2 and G3 and measure the visibility and read lags."""
    return check_with_all_lags(events, max_examples=max_examples)[0]


def check_with_lags(events: Iterable[Event], *, max_examples: int = 5) -> tuple[CheckReport, list[float]]:
    """As ``check``, also returning every observed read lag (seconds) for charts."""
    report, lags = check_with_all_lags(events, max_examples=max_examples)
    return report, lags.read


def check_with_all_lags(events: Iterable[Event], *, max_examples: int = 5) -> tuple[CheckReport, Lags]:
    """As ``check``, also returning every visibility lag and every read lag (seconds) for charts."""
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    ordered = sorted(events, key=_time)
    roots = _group(ordered)
    tally = _Tally(max_examples=max_examples, t0=ordered[0].time if ordered else 0.0)
    for root_id, root in roots.items():
        _judge_regressions(root_id, root, tally)
        _judge_torn(root_id, root, tally)
        _judge_end(root_id, root, tally)
        _measure_lags(root, tally)
        _measure_visibility(root, tally)
    return _report(roots, tally), Lags(visibility=tally.visibility_lags, read=tally.lags)


def _time(event: Event) -> float:
    return event.time


def _group(events: list[Event]) -> dict[str, _Root]:
    """One pass: pair each read with its invoke; collect each root's reads, commits and final version.

    Only reads need their invoke (G1 and lag compare read intervals); a write counts from its ok. A write
    that ended in "fail" did not commit; one that ended in "info" may have, leaving a version gap.
    """
    roots: dict[str, _Root] = {}
    in_flight: dict[tuple[str, str], list[float]] = {}  # (process, root) -> invoke times of open reads
    for e in events:
        root = roots.get(e.root)
        if root is None:
            root = roots[e.root] = _Root()
        if e.op != "read":
            if e.type == "ok":
                _record_ok(root, e)
        elif e.type == "invoke":
            in_flight.setdefault((e.process, e.root), []).append(e.time)
        else:
            start = _pop_start(in_flight.get((e.process, e.root)))
            if e.type != "ok":
                pass  # a failed read saw nothing
            elif e.version is None:
                root.misses.append(_Miss(start, e.time))
            else:
                root.reads.append(_Read(e.process, start, e.time, e.version, e.hash))
    return roots


def _pop_start(starts: list[float] | None) -> float:
    """The start to judge a completion by, never later than its true invoke.

    With one read in flight (the normal case) that is its invoke. If a process broke the one-at-a-time
    rule, any open invoke may be this completion's: take the earliest as its start and drop the latest,
    so every interval can only widen (fewer precedences, never a false regression).
    """
    if not starts:
        return _NO_INVOKE
    start = starts[0]
    starts.pop()
    return start


def _record_ok(root: _Root, e: Event) -> None:
    """A commit (create, write), a stored put (rebuild) or the final version."""
    if e.version is None:
        return
    if e.op == "rebuild":
        root.puts.append((e.time, e.version))
        return
    if e.op in ("create", "write"):
        if e.op == "write":
            root.writes.append((e.time, e.version))
        known = root.commits.get(e.version)
        if known is None:
            root.commits[e.version] = _Commit(e.ops, e.hash)
        elif (known.ops, known.hash) != (e.ops, e.hash):
            # two transactions were given one version: the store broke its contract, so G2 cannot judge it
            logger.warning(
                "root %r: two different commits of v%d; reads at or past it are unjudged", e.root, e.version
            )
            root.ambiguous.add(e.version)
    elif e.op == "final" and (root.final is None or e.time >= root.final[0]):
        root.final = (e.time, e.version)


def _judge_regressions(root_id: str, root: _Root, tally: _Tally) -> None:
    """G1: sweep reads in start order, knowing the newest version of every read that ended before."""
    by_end = sorted(root.reads, key=_end)
    ends = [r.end for r in by_end]
    newest: _Read | None = None
    newest_version = 0
    i, count = 0, len(by_end)
    for read in sorted(root.reads, key=_start):
        while i < count and ends[i] < read.start:
            if by_end[i].version > newest_version:
                newest, newest_version = by_end[i], by_end[i].version
            i += 1
        if read.version < newest_version and newest is not None:
            tally.regressions += 1
            tally.example(
                "G1",
                root_id,
                f"{read.process} read v{read.version} (began {tally.at(read.start)}) after "
                f"{newest.process}'s read of v{newest.version} had ended ({tally.at(newest.end)})",
            )


def _start(read: _Read) -> float:
    return read.start


def _end(read: _Read) -> float:
    return read.end


def _judge_torn(root_id: str, root: _Root, tally: _Tally) -> None:
    """G2: compare each stamped read with the replayed committed graph at its version."""
    wanted = {r.version for r in root.reads if r.hash is not None}
    expected = _committed_hashes(root_id, root, wanted)
    last_version = max(root.final[1] if root.final is not None else 0, max(root.commits, default=0))
    for read in root.reads:
        if read.version < 1 or (root.final is not None and read.version > last_version):
            tally.torn += 1
            tally.example(
                "G2",
                root_id,
                f"{read.process} read v{read.version}, never committed (last committed v{last_version})",
            )
        elif read.hash is None or read.version not in expected:
            tally.unjudged += 1
        elif read.hash != expected[read.version]:
            tally.torn += 1
            if tally.wants("G2"):
                tally.example("G2", root_id, _torn_detail(root_id, root, read, expected[read.version], tally))


def _torn_detail(root_id: str, root: _Root, read: _Read, expected: str, tally: _Tally) -> str:
    """Say which committed version, if any, the torn read's content belongs to (a second replay)."""
    every = _committed_hashes(root_id, root, None)
    matches = [f"v{version}" for version, digest in every.items() if digest == read.hash]
    content = f"the content of {', '.join(matches)}" if matches else "content no known version had"
    return (
        f"{read.process} read v{read.version} ({tally.at(read.end)}) holding {content}; "
        f"the committed graph at v{read.version} hashes to {expected}, the read to {read.hash}"
    )


def _committed_hashes(root_id: str, root: _Root, wanted: set[int] | None) -> dict[int, str]:
    """Replay versions 1, 2, ... while each is known; hash the state at ``wanted`` versions (None: all)."""
    rows: dict[str, tuple[str | None, dict[str, Any]]] | None = {}  # None: known by hash only
    hashes: dict[int, str] = {}
    version = 1
    while (commit := root.commits.get(version)) is not None and version not in root.ambiguous:
        if commit.ops is None:
            if commit.hash is None:
                break
            # A commit recorded as the hash of the whole graph it left (writers of plain SQL read it
            # inside their transaction); later versions need their own hash too.
            hashes[version] = commit.hash
            rows = None
            version += 1
            continue
        if rows is None:
            break
        _apply(rows, _decode_ops(root_id, version, commit.ops))
        if wanted is None or version in wanted or commit.hash is not None:
            hashes[version] = rows_hash((nid, parent, data) for nid, (parent, data) in rows.items())
        if commit.hash is not None and commit.hash != hashes[version]:
            raise HistoryError(
                f"root {root_id!r}: replaying v{version} gives hash {hashes[version]}, the history "
                f"recorded {commit.hash}: the recorder and the checker disagree on graph content"
            )
        version += 1
    return hashes


def _decode_ops(root_id: str, version: int, ops: list[Any]) -> list[Op]:
    try:
        return msgspec.convert(ops, list[Op])
    except msgspec.ValidationError as exc:
        raise HistoryError(f"root {root_id!r} v{version}: ops are not storage operations: {exc}") from exc


def _apply(rows: dict[str, tuple[str | None, dict[str, Any]]], ops: list[Op]) -> None:
    for op in ops:
        match op:
            case Upsert(node_id=node_id, parent_id=parent_id, data=data):
                rows[node_id] = (parent_id, data)
            case Delete(node_id=node_id):
                _delete_subtree(rows, node_id)


def _delete_subtree(rows: dict[str, tuple[str | None, dict[str, Any]]], node_id: str) -> None:
    children: dict[str | None, list[str]] = defaultdict(list)
    for nid, (parent, _) in rows.items():
        children[parent].append(nid)
    doomed = [node_id]
    while doomed:
        nid = doomed.pop()
        if rows.pop(nid, None) is not None:
            doomed.extend(children[nid])


def _judge_end(root_id: str, root: _Root, tally: _Tally) -> None:
    """G3: the last read that began after the final event must see the final version (or nothing)."""
    if root.final is None:
        return
    final_time, final_version = root.final
    last = max((r for r in root.reads if r.start >= final_time), key=_end, default=None)
    last_miss = max((m.end for m in root.misses if m.start >= final_time), default=-math.inf)
    if last is None and last_miss == -math.inf:
        tally.unread_at_end += 1
    elif last is None or last_miss > last.end:
        tally.absent_at_end += 1
    elif last.version != final_version:
        tally.stale += 1
        tally.example(
            "G3",
            root_id,
            f"final committed version v{final_version}, the last read after it ({last.process}, "
            f"{tally.at(last.end)}) returned v{last.version}",
        )


def _measure_lags(root: _Root, tally: _Tally) -> None:
    """For each write, the end of the earliest-ending read that began after it and saw it or newer.

    Writes are taken newest first while the reads that began after each one enter a Fenwick tree over
    versions (reversed, so a prefix is a suffix of versions) holding the earliest end: O((W + R) log V).
    """
    reads = sorted(root.reads, key=_start, reverse=True)
    top = max((r.version for r in reads), default=0)
    tree = [math.inf] * (top + 1)
    i, count = 0, len(reads)
    for committed_at, version in sorted(root.writes, reverse=True):
        while i < count and reads[i].start > committed_at:
            _tree_lower(tree, top - reads[i].version + 1, reads[i].end)
            i += 1
        seen_at = _tree_min(tree, top - version + 1) if 1 <= version <= top else math.inf
        if seen_at == math.inf:
            tally.unseen_commits += 1
        else:
            tally.lags.append(seen_at - committed_at)


def _measure_visibility(root: _Root, tally: _Tally) -> None:
    """For each write, when the cache first held its version or a newer one: the earliest acknowledged
    put of any version >= it, at any time (a put acknowledged before the write's ok is lag 0).

    Puts sorted by version with a running minimum of their times from the newest version down, then one
    bisection per write: O((W + P) log P).
    """
    if not root.writes:
        return
    puts = sorted(root.puts, key=_version_of)
    versions = [version for _, version in puts]
    earliest = [math.inf] * (len(puts) + 1)  # earliest[i]: first put time among puts[i:]
    for i in range(len(puts) - 1, -1, -1):
        earliest[i] = min(puts[i][0], earliest[i + 1])
    for committed_at, version in root.writes:
        stored_at = earliest[bisect.bisect_left(versions, version)]
        if stored_at == math.inf:
            tally.invisible_commits += 1
        else:
            tally.visibility_lags.append(max(0.0, stored_at - committed_at))


def _version_of(put: tuple[float, int]) -> int:
    return put[1]


def _tree_lower(tree: list[float], index: int, value: float) -> None:
    size = len(tree)
    while index < size:
        if value < tree[index]:  # noqa: PLR1730  (hot loop: cheaper than calling min)
            tree[index] = value
        index += index & -index


def _tree_min(tree: list[float], index: int) -> float:
    best = math.inf
    while index > 0:
        if tree[index] < best:  # noqa: PLR1730  (hot loop: cheaper than calling min)
            best = tree[index]
        index -= index & -index
    return best


def _report(roots: dict[str, _Root], tally: _Tally) -> CheckReport:
    lags = sorted(tally.lags)
    visibility = sorted(tally.visibility_lags)
    commits = len(lags) + tally.unseen_commits
    return CheckReport(
        reads=sum(len(r.reads) + len(r.misses) for r in roots.values()),
        writes=sum(len(r.writes) for r in roots.values()),
        roots=len(roots),
        regressions=tally.regressions,
        torn=tally.torn,
        unjudged=tally.unjudged,
        stale=tally.stale,
        absent_at_end=tally.absent_at_end,
        lag_p50=_percentile(lags, 50),
        lag_p95=_percentile(lags, 95),
        lag_p99=_percentile(lags, 99),
        visible_within={
            name: bisect.bisect_right(lags, limit) / commits for name, limit in VISIBILITY_THRESHOLDS.items()
        }
        if commits
        else {},
        examples=tally.examples,
        absent_reads=sum(len(r.misses) for r in roots.values()),
        unread_at_end=tally.unread_at_end,
        unseen_commits=tally.unseen_commits,
        visibility_lag_p50=_percentile(visibility, 50),
        visibility_lag_p95=_percentile(visibility, 95),
        visibility_lag_p99=_percentile(visibility, 99),
        invisible_commits=tally.invisible_commits,
        stored_puts=sum(len(r.puts) for r in roots.values()),
    )


def _percentile(ordered: list[float], p: float) -> float | None:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]
